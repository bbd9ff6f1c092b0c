"""Shared helpers of the analysis-pass tests: one Dynamo trace per model, cached for the test session.

Tracing uses a recording backend that returns ``gm.forward`` (no inductor), so each model costs one Dynamo
trace and one eager run.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.fx as fx

import fxdit.apps.models as models
from fxdit.analysis import GraphAnalysis, analyze

try:
    import diffusers  # noqa: F401

    HAS_DIFFUSERS = True
except ImportError:  # pragma: no cover - the dev venv has diffusers
    HAS_DIFFUSERS = False


def needs(name: str) -> list:
    if name in models.DIFFUSERS_NAMES and not HAS_DIFFUSERS:
        return [pytest.mark.skip(reason="diffusers is not installed")]
    return []


ALL_MODELS = [pytest.param(n, marks=needs(n)) for n in models.names()]


@functools.lru_cache(maxsize=None)
def analysed(name: str) -> tuple[models.ModelSpec, GraphAnalysis]:
    """The model spec and the analysis of its single Dynamo graph."""
    spec = models.build(name)
    graphs = analyze(spec.model, *spec.args, **spec.kwargs)
    assert len(graphs) == 1, f"{name}: expected one Dynamo graph, got {len(graphs)}"
    return spec, graphs[0]


def trace(fn: Any, *args: Any, **kwargs: Any) -> tuple[fx.GraphModule, list[Any]]:
    """The single Dynamo graph of ``fn(*args, **kwargs)`` (unanalysed) and its example inputs."""
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def backend(gm: fx.GraphModule, example_inputs: list[Any], **_: Any) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0]
