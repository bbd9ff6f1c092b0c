"""The pipeline's typed state and the passes' declarations of what they read and produce."""

from __future__ import annotations

import pytest
import torch
from fxdit.passes._base import PassReport, declares
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta
from fxdit.passes._records import PassState
from fxdit.passes.pipeline import PIPELINE, VARIANT_PASSES, run_passes

from fxdit.config import FxditConfig

#: Fields the backend fills before the passes run (from the example inputs and earlier graphs).
FROM_BACKEND = {"position_ids", "carried_tokens"}


def _gm() -> torch.fx.GraphModule:
    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    return torch.fx.symbolic_trace(M())


def test_unknown_state_field_is_an_error():
    state = PassState()
    with pytest.raises(KeyError, match="not a field of PassState"):
        state["token_gird"] = None
    with pytest.raises(KeyError, match="not a field of PassState"):
        state.get("attention_site")
    state["token_grid_reason"] = "why"
    assert "token_grid_reason" in state and "blocks" not in state and state["blocks"] is None
    assert dict(state) == {"token_grid_reason": "why"}


def test_every_pass_declares_and_reads_only_what_an_earlier_step_produces():
    produced = set(FROM_BACKEND) | {"constants"}  # lift_constant's mapping is created by whoever lifts first
    for p in PIPELINE:
        assert hasattr(p, "reads") and hasattr(p, "produces"), p.__name__
        missing = set(p.reads) - produced - set(p.produces)
        assert not missing, f"{p.__name__} reads {missing}, produced by no earlier pass"
        produced |= set(p.produces)
    for name, p in VARIANT_PASSES.items():
        assert hasattr(p, "reads") and hasattr(p, "produces"), name
        assert set(p.reads) <= produced, (name, set(p.reads) - produced)


@declares(reads=("attention_sites",), produces=())
def write_undeclared(gm, cfg):
    fxdit_meta(gm)["blocks"] = []
    return PassReport("write_undeclared")


@declares(reads=(), produces=("blocks",))
def read_undeclared(gm, cfg):
    fxdit_meta(gm).get("token_grid")
    fxdit_meta(gm)["blocks"] = []
    return PassReport("read_undeclared")


@pytest.mark.parametrize("bad", [write_undeclared, read_undeclared])
def test_undeclared_state_use_fails_like_a_pass_error(bad):
    cfg = FxditConfig.from_options({"on_pass_error": "raise"})
    with pytest.raises(RuntimeError, match="undeclared state"):
        run_passes(_gm(), cfg, passes=(bad,))
    cfg = FxditConfig.from_options({"on_pass_error": "fallback"})
    with pytest.warns(UserWarning, match="undeclared state"):
        work, reports = run_passes(_gm(), cfg, passes=(bad,))
    assert fxdit_meta(work).get("blocks") is None  # the graph as it was before the failing pass
    assert reports[0].skipped == {"pass failed: RuntimeError": 1}


def test_state_copies_share_lifted_tensors_and_copy_records():
    gm = _gm()
    state = fxdit_meta(gm)
    t = torch.ones(2)
    state["constants"] = {"c": t}
    state["token_grid_reason"] = "r"
    new = fxdit_meta(fresh_copy(gm))
    assert isinstance(new, PassState) and new["constants"]["c"] is t and new["constants"] is not state["constants"]
    assert new["token_grid_reason"] == "r"
