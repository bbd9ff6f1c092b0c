"""rewrite_grouped_attention on captured graphs (recording backend, no inductor), run eagerly on CPU.

The oracle (tests/grat_oracle.py) is the eager model with SDPA patched to apply the dense grouped mask, built from
the model's config alone (no fxdit code), in the model's own token order, on the calls the stated rule selects; the
rewritten graph runs the op's CPU reference with permuted tokens, so agreement checks the site selection, the
permutations, the hoisting, the sequence layouts and the kv_valid handling.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import torch
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta, lifted_constants
from fxdit.passes._token_flow import reshape_map
from fxdit.passes.pipeline import find_attention, find_blocks
from fxdit.passes.rewrite_grouped_attention import (
    PER_SITE_PERMUTES,
    R_BOOL_MASK,
    R_CAUSAL,
    R_CROSS,
    R_DENSE,
    R_DROPOUT,
    R_FLOAT_MASK,
    R_GRID_MISMATCH,
    R_LAYER,
    R_MIN_TOKENS,
    R_NO_GRID,
    R_SPAN,
    R_TEXT_ONLY,
    R_TILE,
    _why_not,
    rewrite_grouped_attention,
)
from grat_oracle import grouped_sdpa

import fxdit.apps.models as M
from fxdit.apps.models import output_tensor
from fxdit.apps.models.dit import DiT, DiTConfig
from fxdit.config import FxditConfig
from fxdit.errors import FxditError

OP = torch.ops.fxdit.grouped_attention.default
SDPA = torch._C._nn.scaled_dot_product_attention


def _cfg(**attention) -> FxditConfig:
    return FxditConfig.from_options({"attention": {"min_tokens": 0, **attention}, "on_pass_error": "raise"})


def _count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


_MODELS: dict[tuple, tuple] = {}


def _dit(**overrides) -> tuple[torch.nn.Module, tuple, dict]:
    """The reference DiT of the brief: 32x32 latent, patch 2 -> 16x16 tokens (built once per configuration)."""
    key = tuple(sorted(overrides.items()))
    if key not in _MODELS:
        _MODELS[key] = _build_dit(**overrides)
    return _MODELS[key]


def _build_dit(**overrides) -> tuple[torch.nn.Module, tuple, dict]:
    cfg = DiTConfig(**{"depth": 2, "hidden": 32, "heads": 2, "input_size": (32, 32), "num_classes": 4, **overrides})
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    shape = (2, cfg.in_channels, *cfg.input_size)
    args = (torch.randn(shape), torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    kwargs = {}
    if cfg.text_tokens:
        kwargs["text"] = torch.randn(2, cfg.text_tokens, cfg.text_dim or cfg.hidden)
    return model, args, kwargs


_CAPTURED: dict[int, tuple] = {}


def capture(model, args, kwargs):
    """The single Dynamo graph of ``model(*args, **kwargs)`` (recording backend) with its inputs, analysed."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    assert len(graphs) == 1
    gm, inputs = graphs[0]
    cfg = FxditConfig()
    find_attention(gm, cfg)
    find_blocks(gm, cfg)
    return gm, inputs


def _capture(model, args, kwargs):
    """``capture`` once per model object (the analysed graph is only read; each test rewrites a fresh copy)."""
    if id(model) not in _CAPTURED:
        _CAPTURED[id(model)] = (model, *capture(model, args, kwargs))
    return _CAPTURED[id(model)][1:]


def _rewrite(model, args, kwargs, cfg, *, hoist=True):
    gm, inputs = _capture(model, args, kwargs)
    work = fresh_copy(gm)
    if not hoist:
        grid = fxdit_meta(work)["token_grid"]
        grid.patch_node = None
    report = rewrite_grouped_attention(work, cfg)
    return gm, work, inputs, report


def _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg, *, atol=2e-5):
    with torch.no_grad():
        out = work(*inputs, *lifted_constants(work))
        with grouped_sdpa(model, cfg) as calls:
            ref = output_tensor(model(*args, **kwargs))
        dense = output_tensor(model(*args, **kwargs))
    out = output_tensor(out[0] if isinstance(out, (tuple, list)) else out)
    # the oracle's own site selection agrees with the pass, and every masked call drops some attention
    assert calls["calls"] == len(fxdit_meta(gm)["attention_sites"])
    assert calls["masked"] == _count(work, OP) > 0 and calls["sparse"] == calls["masked"]
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    # the grouped mask is not a no-op here (otherwise the comparison above proves nothing)
    assert (out - dense).abs().max() > 100 * atol


@pytest.mark.parametrize("mode, radius", [("grat-b", 1), ("grat-b", 0), ("grat-x", 1)])
@pytest.mark.parametrize("hoist", [True, False])
def test_reference_dit_rewrite(mode, radius, hoist):
    model, args, kwargs = _dit()
    cfg = _cfg(mode=mode, group=(4, 4), radius=radius)
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg, hoist=hoist)
    work.graph.lint()
    sites = len(fxdit_meta(work)["attention_sites"])
    assert sites == 2
    assert report.matched == report.rewritten == sites and not report.skipped
    assert _count(work, OP) == sites and _count(work, SDPA) == 0
    assert report.details["hoisted"] is hoist
    if hoist:
        # entry after the patch embedding, the (1, N, C) positional table, exit before the unpatchify
        assert _count(work, torch.index_select) == 3
        assert report.details["permutes_saved"] == PER_SITE_PERMUTES * sites - 3 > 0
    else:
        assert _count(work, torch.index_select) == PER_SITE_PERMUTES * sites
        assert report.details["permutes_saved"] == 0 and report.details["hoist_reason"]
    for n in work.graph.nodes:
        if n.target is OP:
            info = n.meta["fxdit"]["grat"]
            assert info["mode"] == mode and info["group"] == (4, 4) and info["grid"] == (16, 16)
            assert 0 < info["density"] <= 1 and info["full_blocks"] > 0
            assert isinstance(n.meta.get("example_value", n.meta.get("val")), torch.Tensor)
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)
    assert torch._dynamo.utils.counters["fxdit"]["grouped_attention_sites"] == sites

    # idempotent: the sites are no longer SDPA calls
    before = [n.format_node() for n in work.graph.nodes]
    again = rewrite_grouped_attention(work, cfg)
    assert again.rewritten == 0 and again.matched == 0
    assert [n.format_node() for n in work.graph.nodes] == before


def test_unfused_and_prescaled_forms_match_sdpa_oracle():
    model, args, kwargs = _dit()
    cfg = _cfg(mode="grat-b", group=(4, 4), radius=0)
    for form in ("unfused", "unfused_prescaled"):
        other, _, _ = _dit(attention=form)
        other.load_state_dict(model.state_dict())  # same weights (seeded alike anyway)
        gm, work, inputs, report = _rewrite(other, args, kwargs, cfg)
        assert report.rewritten == 2 and _count(work, OP) == 2
        assert _count(work, torch.matmul) + _count(work, operator.matmul) == 0
        with torch.no_grad():
            out = work(*inputs, *lifted_constants(work))
            with grouped_sdpa(model, cfg) as calls:
                ref = model(*args, **kwargs)
        assert calls["masked"] == calls["sparse"] == 2
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("hoist", [True, False])
def test_joint_text_sequence(position, hoist):
    model, args, kwargs = _dit(text_tokens=5, text_position=position)
    cfg = _cfg(mode="grat-b", group=(4, 4), radius=0)
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg, hoist=hoist)
    assert report.rewritten == 2 and _count(work, OP) == 2 and _count(work, SDPA) == 0
    assert report.details["hoisted"] is hoist
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


def test_video_grid():
    model, args, kwargs = _dit(input_size=(4, 16, 16), hidden=48, patch=(1, 2, 2))
    cfg = _cfg(mode="grat-x", group=(2, 4, 4))
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg)
    assert report.rewritten == 2 and report.details["hoisted"]
    assert {n.meta["fxdit"]["grat"]["grid"] for n in work.graph.nodes if n.target is OP} == {(4, 8, 8)}
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


def test_two_dimensional_group_for_video_grid_is_an_error():
    model, args, kwargs = _dit(input_size=(4, 16, 16), hidden=48, patch=(1, 2, 2))
    cfg = _cfg(mode="grat-b", group=(4, 4))
    gm, _ = _capture(model, args, kwargs)
    with pytest.raises(FxditError, match="attention.group"):
        rewrite_grouped_attention(fresh_copy(gm), cfg)


@pytest.mark.parametrize("attention, reason, rewritten", [
    ({"mode": "dense"}, R_DENSE, 0),
    ({"mode": "grat-b", "group": (4, 4), "min_tokens": 257}, R_MIN_TOKENS, 0),
    ({"mode": "grat-b", "group": (5, 4)}, R_TILE, 0),
    ({"mode": "grat-b", "group": (4, 4), "layers": (1,)}, R_LAYER, 1),
])
def test_ineligible_sites_untouched(attention, reason, rewritten):
    model, args, kwargs = _dit()
    cfg = FxditConfig.from_options({"attention": {"min_tokens": 0, **attention}})
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg)
    assert report.matched == 2 and report.rewritten == rewritten
    assert report.skipped == {reason: 2 - rewritten}
    assert _count(work, SDPA) == 2 - rewritten and _count(work, OP) == rewritten
    if rewritten == 0:
        assert [n.format_node() for n in work.graph.nodes] == [n.format_node() for n in gm.graph.nodes]
    else:
        _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


def _tiny(name: str):
    key = ("tiny", name)
    if key not in _MODELS:
        spec = M.build(name, batch=2)
        _MODELS[key] = (spec.model, spec.args, spec.kwargs)
    return _MODELS[key]


def test_pixart_cross_attention_stays_dense():
    model, args, kwargs = _tiny("pixart-alpha")
    cfg = _cfg(mode="grat-b", group=(4, 4), radius=0)
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg)
    assert report.matched == 4 and report.rewritten == 2 and report.skipped == {R_CROSS: 2}
    assert _count(work, OP) == 2 and _count(work, SDPA) == 2
    assert report.details["hoisted"]
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


def test_hunyuan_key_padding_mask_and_text_only_site():
    model, args, kwargs = _tiny("hunyuan-video")
    cfg = _cfg(mode="grat-x", group=(1, 2, 3))
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg)
    # the token refiner attends over text only: no image span
    assert report.rewritten == 2 and report.skipped == {R_TEXT_ONLY: 1}
    ops = [n for n in work.graph.nodes if n.target is OP]
    assert all(n.args[10] is not None for n in ops)  # kv_valid from the bool [B, 1, 1, S] mask
    assert report.details["hoisted"]
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


@pytest.mark.parametrize("name, attention", [
    ("sd3", {"group": (4, 4)}),
    ("flux", {"group": (4, 4), "grid": (8, 12)}),
    ("wan", {"group": (2, 2, 3)}),
])
def test_diffusers_joint_and_rope_models(name, attention):
    model, args, kwargs = _tiny(name)
    cfg = _cfg(mode="grat-b", radius=0, **attention)
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg)
    assert report.rewritten == 2 and _count(work, OP) == 2
    assert report.details["hoisted"] and report.details["permutes_saved"] > 0
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


def test_bool_mask_that_is_not_key_padding_stays_dense():
    model, args, kwargs = _dit()
    gm, _ = capture(model, args, kwargs)
    sites = fxdit_meta(gm)["attention_sites"]
    # A [S, S] boolean mask varies over queries: not a key-padding mask.
    nodes = {n.name: n for n in gm.graph.nodes}
    mask_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    mask_node.meta["example_value"] = torch.zeros(256, 256, dtype=torch.bool)
    site = sites[0]
    site.mask, site.mask_kind = mask_node.name, "bool"
    assert _why_not(site, (16, 16), _cfg(mode="grat-b", group=(4, 4)), nodes) == R_BOOL_MASK
    mask_node.meta["example_value"] = torch.zeros(2, 1, 1, 256, dtype=torch.bool)
    cfg = _cfg(mode="grat-b", group=(4, 4))
    assert _why_not(site, (16, 16), cfg, nodes) is None
    # the other per-site reasons, one field at a time
    for change, reason in [({"span_source": "unknown"}, R_SPAN), ({"span_source": "text"}, R_TEXT_ONLY),
                           ({"cross": True}, R_CROSS), ({"causal": True}, R_CAUSAL), ({"dropout": 0.1}, R_DROPOUT),
                           ({"mask_kind": "float"}, R_FLOAT_MASK), ({"image_span": (0, 128)}, R_GRID_MISMATCH)]:
        assert _why_not(dataclasses.replace(site, **change), (16, 16), cfg, nodes) == reason
    assert _why_not(site, None, cfg, nodes) == R_NO_GRID


@pytest.mark.parametrize("in_shape, d, out_shape, expected", [
    ((2, 256, 64), 1, (2, 256, 4, 16), 1),
    ((2, 256, 64), 1, (2, 16, 16, 64), None),  # splits the tokens (unpatchify)
    ((2, 256, 64), 1, (512, 64), None),  # merges batch and tokens
    ((1, 256, 64), 1, (256, 64), 0),
    ((2, 4, 256, 16), 2, (2, 4, 256, 16, 1), 2),
])
def test_reshape_token_map(in_shape, d, out_shape, expected):
    assert reshape_map(in_shape, d, out_shape) == expected


def test_token_mixing_op_blocks_hoisting():
    """A mean over tokens inside the block is not token-wise: the pass falls back to per-site gathers."""

    class Pooled(DiT):
        def forward(self, x, t, y=None, text=None):
            h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
            c = self.t_embedder(t) + self.y_embedder(y)
            for block in self.blocks:
                h = block(h, c)
                c = c + h.mean(dim=1)  # token-mixing feedback into the conditioning
            return self.unpatchify(self.final_layer(h, c))

    torch.manual_seed(0)
    model = Pooled(DiTConfig(depth=2, hidden=32, heads=2, input_size=(32, 32), num_classes=4)).eval()
    _, args, kwargs = _dit()
    cfg = _cfg(mode="grat-b", group=(4, 4), radius=0)
    gm, work, inputs, report = _rewrite(model, args, kwargs, cfg)
    assert report.rewritten == 2
    # each block's mean needs an un-permute: hoisting costs 1 + 3 exits + 1 side = 5 gathers < 8, still chosen
    exits = report.details.get("hoist_exits", [])
    assert report.details["hoisted"] and any("mean over the token dimension" in e for e in exits)
    _check_against_oracle(gm, work, inputs, model, args, kwargs, cfg)


def test_site_compiled_as_dense_formula_is_reported():
    """A float64 model: CPU FlexAttention takes fp32/bf16/fp16 only, so the compiled lowering of a rewritten site is
    the dense masked formula; the report says so per site (and an fp32 model has no such entry)."""
    model, args, kwargs = _dit()
    cfg = _cfg(mode="grat-b", group=(4, 4))
    _, _, _, report = _rewrite(model, args, kwargs, cfg)
    assert report.rewritten == 2 and "dense_lowering" not in report.details
    model64 = copy.deepcopy(model).double()
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    _, _, _, report = _rewrite(model64, args64, kwargs, cfg)
    assert report.rewritten == 2
    dense = report.details["dense_lowering"]
    assert len(dense) == 2 and all("not torch.float64" in why for why in dense.values()), dense
