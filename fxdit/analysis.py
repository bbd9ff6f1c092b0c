"""Graph analysis of a model without compiling it: what fxdit's passes see.

    from fxdit.analysis import analyze
    for g in analyze(model, x, t, y):
        print(len(g.attention_sites), len(g.blocks), g.token_grid)

:func:`analyze` traces the model with Dynamo under ``torch.no_grad()``, using a recording backend that copies
each graph (``fresh_copy``), runs ``find_attention`` and ``find_blocks`` on the copy under a default (or given)
:class:`~fxdit.config.FxditConfig`, and returns the graph's own ``forward`` (no inductor). Dynamo's caches are
reset before and after (``torch.compiler.reset()``), so the call leaves no compiled state behind; functions
compiled before it recompile on their next call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxdit.config import FxditConfig

__all__ = ["GraphAnalysis", "analyze", "analyze_graph"]

log = logging.getLogger(__name__)


@dataclass
class GraphAnalysis:
    """The analysis of one Dynamo graph.

    Attributes:
        gm: the analysed copy of the graph (records in ``gm.meta["fxdit"]`` and on its nodes).
        attention_sites: :class:`~fxdit.passes._records.AttentionSite` records, graph order.
        blocks: :class:`~fxdit.passes._records.BlockInfo` records.
        token_grid: the :class:`~fxdit.passes._records.TokenGrid`, or ``None`` when the graph does not show it.
        reports: the two passes' reports.
        example_inputs: the graph's example inputs (real tensors: parameters and the traced inputs).
    """

    gm: fx.GraphModule
    attention_sites: list[Any]
    blocks: list[Any]
    token_grid: Any
    reports: list[Any] = field(default_factory=list)
    example_inputs: list[Any] = field(default_factory=list, repr=False)


def analyze_graph(gm: fx.GraphModule, example_inputs: Sequence[Any] = (),
                  cfg: FxditConfig | Mapping[str, Any] | None = None) -> GraphAnalysis:
    """Run ``find_attention`` and ``find_blocks`` on a copy of one graph.

    Args:
        gm: a Dynamo graph (left untouched).
        example_inputs: its example inputs; small position-id inputs among them give packed-latent models
            their token grid (see ``_dataflow.record_position_ids``).
        cfg: the configuration (``attention.grid`` overrides the inferred grid); default options when ``None``.
    """
    from fxdit.passes._dataflow import record_position_ids
    from fxdit.passes._fx_utils import fresh_copy, fxdit_meta
    from fxdit.passes.find_attention import find_attention
    from fxdit.passes.find_blocks import find_blocks

    config = FxditConfig.from_options(cfg)
    work = fresh_copy(gm)
    record_position_ids(work, example_inputs)
    reports = [find_attention(work, config), find_blocks(work, config)]
    state = fxdit_meta(work)
    return GraphAnalysis(work, list(state.get("attention_sites") or []), list(state.get("blocks") or []),
                         state.get("token_grid"), reports, list(example_inputs))


def analyze(model: torch.nn.Module, *args: Any, config: FxditConfig | Mapping[str, Any] | None = None,
            **kwargs: Any) -> list[GraphAnalysis]:
    """Trace ``model(*args, **kwargs)`` with Dynamo and analyse every graph it produces.

    The model runs once (eagerly, through the recorded graphs' ``forward``) under ``torch.no_grad()``.

    Args:
        model: the module (or any callable Dynamo can trace).
        *args, **kwargs: its inputs.
        config: fxdit options for the analysis (keyword only; default options when ``None``).

    Returns:
        One :class:`GraphAnalysis` per Dynamo graph, in the order Dynamo compiled them (one when the model
        traces without graph breaks).
    """
    results: list[GraphAnalysis] = []
    cfg = FxditConfig.from_options(config)

    def recording_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Any:
        results.append(analyze_graph(gm, example_inputs, cfg))
        return gm.forward

    torch.compiler.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, backend=recording_backend, dynamic=False)
            compiled(*args, **kwargs)
    finally:
        torch.compiler.reset()
    log.debug("analyze: %d graph(s)", len(results))
    return results
