"""End to end: torch.compile(model, backend="fxdit") with grouped attention equals eager with the grouped mask.

The oracle (tests/grat_oracle.py) patches SDPA in the *eager* model so that the calls the pass rewrites apply the
dense boolean mask built from ``grat_layout`` in the model's own token order. The compiled model runs the rewritten
graph through inductor (the op lowers to FlexAttention on CPU). Whole-model compiles take 30-70 s on the shared
2-core machine, so every case is ``slow`` (``pytest -m slow tests/test_grat_e2e.py``).
"""

from __future__ import annotations

import pytest
import torch
from grat_oracle import capture, grouped_sdpa

import fxdit
import fxdit.models as M
from fxdit.config import FxditConfig
from fxdit.models import output_tensor
from fxdit.models.dit import DiT, DiTConfig


def _run(model, args, kwargs, attention, *, expect_rewritten, expect_hoisted=True):
    options = {"attention": {"min_tokens": 0, **attention}, "on_pass_error": "raise"}
    cfg = FxditConfig.from_options(options)
    gm, _ = capture(model, args, kwargs)
    with torch.no_grad():
        with grouped_sdpa(gm, cfg) as calls:
            expected = output_tensor(model(*args, **kwargs))
        dense = output_tensor(model(*args, **kwargs))
        torch._dynamo.reset()
        fast = torch.compile(model, backend="fxdit", options=options)
        out = output_tensor(fast(*args, **kwargs))
    assert calls["calls"] == calls["expected"] and calls["masked"] == expect_rewritten
    # fp32 compiled vs eager through several blocks: reassociation noise reaches ~6e-5; a wrong mask errs by O(0.1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3  # the grouped pattern changed the result: the check has teeth
    records = fxdit.reports(model)
    assert len(records) == 1
    report = records[0].report("rewrite_grouped_attention")
    assert report is not None and report.rewritten == expect_rewritten
    assert report.details["hoisted"] is expect_hoisted
    assert torch._dynamo.utils.counters["fxdit"]["rewrite_grouped_attention"] == expect_rewritten
    return report


def _dit(**overrides):
    cfg = DiTConfig(**{"depth": 2, "hidden": 32, "heads": 2, "input_size": (32, 32), "num_classes": 4, **overrides})
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    args = (torch.randn(2, cfg.in_channels, *cfg.input_size), torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    return model, args, {}


@pytest.mark.slow
def test_reference_dit_grat_b():
    model, args, kwargs = _dit()
    report = _run(model, args, kwargs, {"mode": "grat-b", "group": (4, 4), "radius": 0}, expect_rewritten=2)
    assert report.details["permutes_saved"] > 0


@pytest.mark.slow
def test_reference_dit_grat_x():
    model, args, kwargs = _dit()
    _run(model, args, kwargs, {"mode": "grat-x", "group": (8, 8)}, expect_rewritten=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grat-b", "grat-x"])
def test_reference_video_dit(mode):
    model, args, kwargs = _dit(input_size=(4, 16, 16), hidden=48, patch=(1, 2, 2))
    _run(model, args, kwargs, {"mode": mode, "group": (2, 4, 4), "radius": 0}, expect_rewritten=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, attention, rewritten", [
    ("sd3", {"group": (4, 4)}, 2),
    ("flux", {"group": (4, 4), "grid": (8, 12)}, 2),  # text first
    # bool key-padding mask -> kv_valid; refiner stays dense. On CPU kv_valid sites lower to the dense masked
    # formula (inductor's C++ flex template rejects a batch-indexed mask_mod), so they are exact but not sparse.
    ("hunyuan-video", {"group": (1, 2, 3)}, 2),  # kv_valid sites lower to the dense masked formula on CPU
    ("wan", {"group": (2, 2, 3)}, 2),  # cross-attention stays dense
    ("pixart-alpha", {"group": (4, 4)}, 2),  # self-attention only
])
@pytest.mark.parametrize("mode", ["grat-b", "grat-x"])
def test_diffusers_tiny_models(name, attention, rewritten, mode):
    spec = M.build(name, batch=2)
    _run(spec.model, spec.args, spec.kwargs, {"mode": mode, "radius": 0, **attention}, expect_rewritten=rewritten)
