"""With no lossy option, fxdit through inductor equals eager on every reference model, and adds no
graph breaks."""

import pytest
import torch

import fxdit
from fxdit.apps import models

FAST = ["dit-tiny"]
SLOW = [n for n in ("dit-tiny-unfused", "dit-video-tiny", "diffusers-dit", "pixart-alpha", "sd3", "flux",
                    "hunyuan-video", "wan")]


def _tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


def _check_identity(name):
    spec = models.build(name)
    with torch.no_grad():
        expected = _first(spec.run())
        fast = torch.compile(spec.model, backend="fxdit", options={"on_pass_error": "raise"})
        got = _first(spec.run(fast))
    torch.testing.assert_close(got, expected, **_tol(expected.dtype))
    records = fxdit.reports(spec.model)
    assert records, "the backend recorded no graph for this model"
    sites = sum(r.summary["attention_sites"] for r in records)
    assert sites == spec.expected.attention_sites


@pytest.mark.parametrize("name", FAST)
def test_identity_pipeline_equals_eager(name):
    _check_identity(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_identity_pipeline_equals_eager_all_models(name):
    _check_identity(name)


def _check_no_breaks(name):
    """fxdit compiles the graphs Dynamo hands it; it must never add a break: same graph count as plain Dynamo."""
    spec = models.build(name)
    with torch.no_grad():
        baseline = torch._dynamo.explain(spec.model)(*spec.args, **spec.kwargs)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fast = torch.compile(spec.model, backend="fxdit", options={"on_pass_error": "raise"})
        spec.run(fast)
    compiled_graphs = len(fxdit.reports(spec.model))
    if name.startswith("dit-"):
        assert baseline.graph_break_count == 0  # our reference models trace whole
    assert compiled_graphs == baseline.graph_count
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == baseline.graph_break_count


@pytest.mark.parametrize("name", FAST)
def test_no_graph_breaks_added(name):
    _check_no_breaks(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_no_graph_breaks_added_all_models(name):
    _check_no_breaks(name)
