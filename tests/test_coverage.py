"""tools/coverage.py: diffusers transformer classes built tiny and compiled with fxdit; never an error, never a
wrong result, every site either rewritten or left alone with a reason.

The default run checks the generic config/input derivation and a small subset of classes (the real backend
without inductor); ``-m slow`` runs the whole sweep.
"""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import sys

import pytest
import torch

pytest.importorskip("diffusers")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "coverage.py"
_spec = importlib.util.spec_from_file_location("fxdit_tools_coverage", _PATH)
coverage = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = coverage
_spec.loader.exec_module(coverage)

#: Classes of the default run: the classic DiT (image self-attention), Flux (packed latents, text-first joint
#: attention, single-stream blocks), and AuraFlow (not among fxdit's named models: register tokens before the text).
SUBSET = ("DiTTransformer2DModel", "FluxTransformer2DModel", "AuraFlowTransformer2DModel")


class _Toy(torch.nn.Module):
    """A stand-in transformer with the argument names the shrink rules read (all sizes large)."""

    def __init__(self, num_layers: int = 28, num_single_layers: int = 38, num_attention_heads: int = 24,
                 attention_head_dim: int = 128, joint_attention_dim: int = 4096, caption_projection_dim: int = 3072,
                 ffn_dim: int = 12288, axes_dims_rope: tuple[int, int, int] = (16, 56, 56), sample_size: int = 128,
                 patch_size: int = 2, in_channels: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()


def test_tiny_config_shrinks_by_argument_name_and_relation():
    cfg = coverage.tiny_config(_Toy)
    hidden, head_dim = coverage.HIDDEN, coverage.HEAD_DIM
    assert cfg["num_layers"] == 2 and cfg["num_single_layers"] == 1
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == hidden
    assert cfg["caption_projection_dim"] == hidden  # default == default hidden (24 x 128)
    assert cfg["ffn_dim"] == 4 * hidden  # default == 4 x default hidden
    assert sum(cfg["axes_dims_rope"]) == head_dim and all(a % 2 == 0 for a in cfg["axes_dims_rope"])
    assert cfg["joint_attention_dim"] == coverage.TEXT_DIM
    assert cfg["sample_size"] == coverage.SAMPLE
    assert "patch_size" not in cfg and "eps" not in cfg  # small or non-size arguments keep their defaults
    assert cfg["in_channels"] == coverage.NONE_DEFAULTS["in_channels"]
    _Toy(**cfg)  # every key is an argument


def test_required_init_or_forward_arguments_are_reasons_not_errors():
    class NeedsInit(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()

    with pytest.raises(coverage.Unbuildable, match="vocab"):
        coverage.tiny_config(NeedsInit)

    class NeedsInput(torch.nn.Module):
        config = {"in_channels": 4}

        def forward(self, hidden_states, timestep, frobnicate, return_dict=True):
            return hidden_states

    with pytest.raises(coverage.Unbuildable, match="frobnicate"):
        coverage.make_inputs(NeedsInput(), "image", (1, 8, 8))


def test_inputs_follow_the_signature_and_layout():
    class Model(torch.nn.Module):
        config = {"in_channels": 5, "joint_attention_dim": 7, "pooled_projection_dim": 3, "guidance_embeds": False}

        def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                    img_ids=None, txt_ids=None, guidance=None, unknown_optional=None, return_dict=True):
            return hidden_states

    _, kw = coverage.make_inputs(Model(), "packed", (1, 4, 6), batch=3)
    assert set(kw) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                       "txt_ids", "return_dict"}  # no guidance (guidance_embeds off), no unknown optional argument
    assert kw["hidden_states"].shape == (3, 24, 5) and kw["img_ids"].shape == (24, 3)
    assert kw["encoder_hidden_states"].shape == (3, coverage.TEXT_TOKENS, 7)
    assert kw["pooled_projections"].shape == (3, 3) and kw["return_dict"] is False
    _, kw = coverage.make_inputs(Model(), "video", (2, 4, 6), batch=1)
    assert kw["hidden_states"].shape == (1, 5, 2, 4, 6)


def test_every_exported_transformer_class_is_listed():
    import diffusers

    names = coverage.transformer_classes()
    assert set(SUBSET) <= set(names) and "TransformerTemporalModel" in names
    assert all(n in dir(diffusers) and "Transformer" in n and "Model" in n for n in names)
    assert inspect.isclass(getattr(diffusers, SUBSET[0]))


def _check_row(row):
    assert row.status in ("ok", "not built", "torch.compile fails"), f"{row.cls}: {row.status}: {row.reason}"
    if row.status != "ok":
        assert row.reason
        return
    assert row.err is not None and row.err <= coverage.wrong_tolerance(row.scale, row.inductor), row.cls
    lo = row.lossy
    assert not lo.get("fxdit_error"), f"{row.cls}: {lo.get('error')}"
    if row.sites and lo.get("err_full") is not None:
        # each attention site is either rewritten or left alone with a reason
        assert lo["grat_rewritten"] + sum(lo["grat_skipped"].values()) == row.sites, row.cls
        assert all(isinstance(k, str) and k for k in lo["grat_skipped"])
    if lo.get("grat_rewritten"):
        # every GRAT rewrite is checked against the oracle: same calls masked, same result
        o = row.oracle
        assert o and not o.get("error"), f"{row.cls}: {o}"
        assert o["ok"] and o["rewritten"] == lo["grat_rewritten"], f"{row.cls}: {o}"
        # fewer sites than the oracle masks: the rewritten ones matched a choice of the oracle's calls
        assert o["masked"] == o["rewritten"] or len(o["subset"]) == o["rewritten"], f"{row.cls}: {o}"
        assert o["sparse"] == o["masked"]  # the grouped mask drops something at every masked call


@pytest.mark.parametrize("name", SUBSET)
def test_subset_compiles_lossless_and_reports(name, no_inductor):
    row = coverage.check_class(name, inductor=False)
    _check_row(row)
    assert row.status == "ok" and row.graphs >= 1 and row.sites >= 1 and row.blocks >= 1
    assert row.lossy["cached_linears"] > 0 and row.lossy["cached_blocks"] == row.blocks
    if name != "AuraFlowTransformer2DModel":
        assert row.lossy["grat_rewritten"] == row.sites
    table = coverage.format_table([row], "header")
    assert f"| {name} | ok |" in table and "1 compiled OK" in table


def test_a_class_that_cannot_be_built_is_a_row_with_its_reason(monkeypatch):
    def unbuildable(name, seed=0):
        raise coverage.Unbuildable("constructor: ValueError: needs a vocabulary")

    monkeypatch.setattr(coverage, "build_model", unbuildable)
    row = coverage.check_class("AnyTransformer2DModel", inductor=False)
    assert row.status == "not built" and "vocabulary" in row.reason
    assert "| AnyTransformer2DModel | not built |" in coverage.format_table([row], "h")


def test_case_table_names_configs_and_layouts():
    """Every case names an exported class, its config keys are ``__init__`` arguments of that class, and its token
    layout is a (T, H, W) grid with the text on a stated side."""
    import diffusers

    names = set(coverage.transformer_classes())
    cases = coverage.cases.CASES
    assert set(cases) <= names
    assert len(cases) >= 55
    for name, case in cases.items():
        assert case.text in coverage.cases.TEXT_SIDES, name
        assert case.grid is None or (len(case.grid) == 3 and all(isinstance(x, int) and x > 0 for x in case.grid))
        if case.init is not None:
            params = inspect.signature(getattr(diffusers, name).__init__).parameters
            assert set(case.init) <= set(params), (name, set(case.init) - set(params))
    with pytest.raises(ValueError, match="text="):
        coverage.cases.Case(text="middle")


def test_oracle_layout_comes_from_the_case_table():
    oracle = coverage.grat_oracle()
    assert coverage.oracle_layout("FluxTransformer2DModel") == oracle.ModelLayout((8, 8), text_first=True)
    assert coverage.oracle_layout("WanTransformer3DModel") == oracle.ModelLayout((2, 8, 8), text_first=False)
    framepack = coverage.oracle_layout("HunyuanVideoFramepackTransformer3DModel")
    assert framepack.image_start == 4 + 16 + 64 and not framepack.text_first
    assert coverage.oracle_layout("AceStepTransformer1DModel") is None  # audio: no token grid
    # the image span sits where the layout says: text rows and columns stay dense
    mask = oracle.sequence_mask(framepack, (8, 8), (2, 2), "grat-b", 0, 84 + 64 + 5)
    assert mask[:84].all() and mask[:, :84].all() and mask[148:].all() and not mask[84:148, 84:148].all()
    # image queries over joint [text, image] keys (PRX): the text keys stay visible to every image query
    prx = coverage.oracle_layout("PRXTransformer2DModel")
    assert prx.joint_kv and prx.text_first
    mask = oracle.sequence_mask(prx, (8, 8), (2, 2), "grat-b", 0, 64, kv_len=8 + 64)
    assert mask.shape == (64, 72) and mask[:, :8].all() and torch.equal(mask[:, 8:], oracle.image_mask(
        (8, 8), (2, 2), "grat-b", 0))


@pytest.mark.parametrize("name", ["CogVideoXTransformer3DModel", "ZImageTransformer2DModel"])
def test_a_case_builds_its_model_and_inputs(name):
    """Classes the generic derivation cannot build: the case's config and inputs (CogVideoX: (B, F, C, H, W)
    latents and text before the image; Z-Image: lists of latents and captions)."""
    model, cfg = coverage.build_model(name)
    case = coverage.cases.CASES[name]
    assert cfg == case.init
    layout, grid, args, kwargs, eager = coverage.find_inputs(model)
    assert layout == "case" and grid == case.grid and torch.isfinite(eager).all()
    _, kwargs2, _ = coverage._next_step(model, args, kwargs)  # the moved latent of the cached ICC step
    assert type(kwargs2[case.latent]) is type(kwargs[case.latent])


def test_an_oracle_mismatch_is_a_defect_in_the_table():
    row = coverage.Row("AnyTransformer2DModel", status="oracle mismatch", reason="GRAT differs from the oracle",
                       graphs=1, sites=2, err=0.0, scale=1.0,
                       lossy={"grat_rewritten": 2, "grat_skipped": {}, "cached_linears": 0, "cached_blocks": 0},
                       oracle={"masked": 2, "sparse": 2, "rewritten": 2, "err": 0.5, "tolerance": 1e-4,
                               "ok": False, "error": ""})
    s = coverage.summary([row])
    assert s["fxdit_defects"] == 1 and s["oracle_checked"] == 1 and s["oracle_passed"] == 0
    table = coverage.format_table([row], "h")
    assert "5.0e-01 FAIL (2 sites" in table and "| oracle mismatch |" in table


@pytest.mark.slow
def test_whole_sweep_has_no_fxdit_defects(no_inductor):
    rows = [coverage.check_class(name, inductor=False) for name in coverage.transformer_classes()]
    for row in rows:
        _check_row(row)
    s = coverage.summary(rows)
    assert s["fxdit_defects"] == 0 and s["built"] >= len(SUBSET)
