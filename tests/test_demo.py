"""The comparison engine (fxdit.apps.demo) and the ``fxdit demo`` / ``fxdit eval`` commands."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxdit.apps.sampler as sampling
from fxdit.apps import demo
from fxdit.cli import main as cli_main
from fxdit.errors import FxditError

# ---------------------------------------------------------------------------------------------------- MACs


def test_grat_density_of_known_patterns():
    # 16x16 tokens, 4x4 groups -> 4x4 group grid; GRAT-B radius 1 visits 4 corners x4, 8 edges x6, 4 inner x9.
    assert demo.grat_density((16, 16), (4, 4), "grat-b") == pytest.approx((4 * 4 + 8 * 6 + 4 * 9) / 256)
    assert demo.grat_density((16, 16), (4, 4), "grat-x") == pytest.approx(7 / 16)
    assert demo.grat_density((16, 16), (16, 16), "grat-b") == 1.0
    assert demo.grat_density((16, 16), (4, 4), "grat-b", radius=3) == 1.0


def _cost() -> demo.StepCost:
    linears = {
        "transformer_blocks.0.attn1.to_q": (10 * 8 * 8.0, 8, 8, 10),
        "transformer_blocks.0.ff.net.0.proj": (10 * 8 * 32.0, 8, 32, 10),
        "transformer_blocks.0.norm1.linear": (10 * 8 * 48.0, 8, 48, 10),  # adaLN: never cached
    }
    return demo.StepCost(total=10_000.0, attention=1_000.0, linears=linears, grid=(16, 16))


def test_run_macs_per_mode_formulas():
    cost = _cost()
    assert demo.run_macs(cost, None, 4, rank=2) == 40_000.0
    cached_linear = 640.0 + 2560.0
    reuse = {"cache": {"mode": "reuse", "schedule": {"period": 2}}}
    assert demo.run_macs(cost, reuse, 4, rank=2) == 2 * 10_000 + 2 * (10_000 - cached_linear)
    icc = {"cache": {"factors": demo.SvdFactors(), "schedule": {"period": 2}}}
    inc = 10 * 2 * (8 + 8) + 10 * 2 * (8 + 32)
    assert demo.run_macs(cost, icc, 3, rank=2) == 2 * 10_000 + (10_000 - cached_linear + inc)
    grat = {"attention": {"mode": "grat-b", "group": (4, 4), "min_tokens": 0}}
    assert demo.run_macs(cost, grat, 1, rank=2) == pytest.approx(10_000 - 1_000 * (1 - 100 / 256))


def test_equal_mac_steps_rounds_to_the_target_modes_macs():
    s = demo.CompareSettings(steps=10, rank=2)
    mode = demo.MODES["fewer-step DDIM (equal MACs)"]
    target = demo.run_macs(_cost(), demo.MODES["fxdit ICC"].options, 10, 2)
    assert demo._equal_mac_steps(mode, _cost(), s, demo.MODES) == round(target / 10_000)
    with pytest.raises(FxditError, match="names no mode"):
        demo._equal_mac_steps(demo.Mode("x", "inductor", steps="equal-macs:nope"), _cost(), s, demo.MODES)


def test_measure_step_cost_counts_linears_and_attention_of_the_shipped_model():
    loaded = sampling.load_dit("demo-dit")
    model = loaded.transformer
    den = sampling.Denoiser.for_model(model)
    x = torch.zeros(2, 1, 32, 32)
    cost = demo.measure_step_cost(model, den, x, torch.tensor([10, 10]), torch.tensor([1, 10]))
    n, d = 256, 192
    q = cost.linears["transformer_blocks.0.attn1.to_q"]
    assert q == (2.0 * n * d * d, d, d, 2 * n)
    assert cost.linears["transformer_blocks.5.ff.net.0.proj"][0] == 2.0 * n * d * 4 * d
    assert cost.attention == 6 * 2 * 6 * n * n * (32 + 32)  # blocks x batch x heads x N^2 x (d_qk + d_v)
    assert cost.grid == (16, 16)
    assert cost.total > cost.attention + sum(v[0] for v in cost.linears.values()) * 0.99


# ---------------------------------------------------------------------------------------------------- table


def test_select_modes_and_unknown_name():
    assert [m.name for m in demo.select_modes(None)] == list(demo.MODES)
    with pytest.raises(FxditError, match="did you mean 'inductor'"):
        demo.select_modes(["inductr"])


def test_every_mode_is_one_entry_with_a_known_backend():
    backends = {"eager", "inductor", "fxdit", "diffusers-cache", "cache-dit"}
    for name, mode in demo.MODES.items():
        assert mode.name == name and mode.backend in backends and mode.description


def test_format_table_has_a_row_per_mode_and_shows_unavailable_reasons():
    rows = [demo.ModeResult("eager", "ok", steps=4, time_s=2.0, macs=4e9, psnr_db=math.inf, ssim=1.0,
                            gate_pass=True, class_accuracy=0.9, fd=1.5, speedup_vs_eager=1.0),
            demo.ModeResult("fxdit GRAT", "unavailable: attention: not available")]
    table = demo.format_table(rows).splitlines()
    assert table[0] == ("| mode | time | speedup vs eager | vs inductor | MACs | PSNR / SSIM vs full | "
                        "class accuracy | FD |")
    assert len(table) == 4
    assert "inf / 1.000 pass" in table[2] and "90 %" in table[2]
    assert table[3].startswith("| fxdit GRAT | unavailable: attention: not available |")


# ---------------------------------------------------------------------------------------------------- compare


def test_compare_keeps_going_when_modes_fail(tmp_path):
    loaded = sampling.load_dit("demo-dit")
    bad = demo.Mode("bad options", "fxdit", {"attention": {"mode": "grat-z"}}, description="invalid on purpose")
    modes = [demo.MODES["eager"], bad, demo.MODES["cache-dit"], demo.MODES["diffusers FirstBlockCache"]]
    s = demo.CompareSettings(steps=2, classes=(0, 1), per_class=1, progress=False)
    results = demo.compare(loaded, modes, s)
    by = {r.name: r for r in results}
    assert by["eager"].status == "ok" and by["eager"].psnr_db == math.inf and by["eager"].gate_pass
    assert by["eager"].images.shape == (2, 1, 32, 32)
    assert by["bad options"].status.startswith("unavailable: attention.mode='grat-z'")
    assert by["cache-dit"].status.startswith("unavailable: ")
    assert by["diffusers FirstBlockCache"].status == ("unavailable: not supported for DiTTransformer2DModel "
                                                      "(diffusers enable_cache needs CacheMixin)")
    written = demo.write_outputs(results, tmp_path, settings=s, meta={"model": "demo-dit"})
    assert {p.name for p in written.values()} == {"all_modes.png", "report.md", "report.json"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert [m["name"] for m in report["modes"]] == [m.name for m in modes]


def test_every_fxdit_mode_runs_and_rewrites(no_inductor):
    """Every fxdit row of the demo runs (no row may be 'unavailable') and does what its name says: the lossless row
    rewrites nothing and equals eager; GRAT rows rewrite attention and differ from eager; caching rows plan caches and
    differ from eager at cached steps. Graphs run as Python here; the compiled rows are in the slow CLI test."""
    loaded = sampling.load_dit("demo-dit")
    fx_modes = [m for m in demo.MODES.values() if m.backend == "fxdit"]
    assert {m.name for m in fx_modes} >= {"fxdit (lossless)", "plain reuse", "fxdit ICC", "fxdit GRAT", "ICC+GRAT"}
    s = demo.CompareSettings(steps=3, classes=(0, 1), per_class=1, progress=False, rank=8)
    results = demo.compare(loaded, [demo.MODES["eager"], *fx_modes], s)
    by = {r.name: r for r in results}
    for m in fx_modes:
        assert by[m.name].status == "ok", (m.name, by[m.name].status)
    eager = by["eager"].images

    def rewritten(name, pass_name):
        return by[name].rewrites.get(pass_name, {}).get("rewritten", 0)

    assert sum(v["rewritten"] for v in by["fxdit (lossless)"].rewrites.values()) == 0
    assert torch.equal(by["fxdit (lossless)"].images, eager)
    for name in ("fxdit GRAT", "ICC+GRAT"):
        assert rewritten(name, "rewrite_grouped_attention") > 0, by[name].rewrites
    for name in ("plain reuse", "fxdit ICC", "ICC+GRAT"):
        assert by[name].rewrites["plan_cache"]["matched"] > 0, by[name].rewrites
        assert rewritten(name, "insert_lowrank_increments") > 0, by[name].rewrites
    for name in ("plain reuse", "fxdit ICC", "fxdit GRAT", "ICC+GRAT"):
        assert not torch.allclose(by[name].images, eager, atol=1e-4), name
        assert math.isfinite(by[name].psnr_db), name
    # GRAT and ICC each change the sample on their own, and together differently from either alone.
    assert not torch.allclose(by["ICC+GRAT"].images, by["fxdit GRAT"].images, atol=1e-4)
    assert not torch.allclose(by["ICC+GRAT"].images, by["fxdit ICC"].images, atol=1e-4)


def test_demo_cli_runs_end_to_end_on_cheap_modes(tmp_path):
    out = tmp_path / "out"
    rc = cli_main(["demo", "--out", str(out), "--steps", "2", "--per-class", "1", "--classes", "0,1,2",
                   "--modes", "eager,cache-dit", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    eager = report["modes"][0]
    assert eager["name"] == "eager" and eager["status"] == "ok" and eager["steps"] == 2
    assert 0.0 <= eager["class_accuracy"] <= 1.0 and eager["fd"] >= 0.0
    assert (out / "all_modes.png").is_file() and (out / "report.md").read_text().startswith("# fxdit comparison")


@pytest.mark.slow
def test_demo_cli_all_modes_end_to_end(tmp_path):
    from PIL import Image

    out = tmp_path / "demo_out"
    assert cli_main(["demo", "--out", str(out), "--steps", "4", "--per-class", "1", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    by = {m["name"]: m for m in report["modes"]}
    assert list(by) == list(demo.MODES)
    for name in ("eager", "inductor", "fxdit (lossless)", "fewer-step DDIM (equal MACs)"):
        assert by[name]["status"] == "ok", (name, by[name]["status"])
    assert by["fxdit (lossless)"]["psnr_db"] == "inf" or by["fxdit (lossless)"]["psnr_db"] > 60
    # each row reports only its own graphs: the lossless row rewrote nothing
    assert sum(v["rewritten"] for v in by["fxdit (lossless)"]["rewrites"].values()) == 0
    for name, mode in demo.MODES.items():
        if mode.backend in ("eager", "inductor", "fxdit"):  # fxdit's own rows and the baselines must all run
            assert by[name]["status"] == "ok", (name, by[name]["status"])
        else:  # a peer that cannot run on this model says why, in its own words
            assert by[name]["status"] == "ok" or by[name]["status"].startswith("unavailable: ")
    for name in ("fxdit GRAT", "ICC+GRAT"):
        assert by[name]["rewrites"]["rewrite_grouped_attention"]["rewritten"] > 0
    for name in ("plain reuse", "fxdit ICC", "ICC+GRAT"):
        assert by[name]["rewrites"]["insert_lowrank_increments"]["rewritten"] > 0
    img = Image.open(out / "compare_inductor.png")
    assert img.width > img.height  # one column per class, full / mode / difference stacked


# ---------------------------------------------------------------------------------------------------- eval


def _tiny_pipeline(path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    pipe.save_pretrained(path)
    return path


def test_eval_modes_and_svd_placeholder():
    from fxdit.commands.eval import modes_for

    rows = modes_for({"cache": {"factors": "svd:16", "schedule": {"period": 3}}})
    names = [m.name for m in rows]
    assert names[:5] == ["eager", "inductor", "fxdit (evaluated)", "plain reuse", "fewer-step DDIM (equal MACs)"]
    assert rows[2].options["cache"]["factors"] == demo.SvdFactors(16)
    assert rows[3].options == {"cache": {"mode": "reuse", "schedule": {"period": 3}}}
    assert rows[4].steps == "equal-macs:fxdit (evaluated)"
    assert {"diffusers FirstBlockCache", "diffusers TaylorSeer", "cache-dit"} <= set(names)
    with pytest.raises(FxditError, match="attention"):
        modes_for({"attention": {"mode": "bogus"}})


def test_tiny_pipeline_loads_and_compares_decoded_images(tmp_path):
    path = _tiny_pipeline(tmp_path / "pipe")
    loaded = sampling.load_dit(path)
    assert loaded.vae is not None and type(loaded.transformer).__name__ == "DiTTransformer2DModel"
    s = demo.CompareSettings(steps=2, classes=(0, 2), per_class=1, progress=False)
    (res,) = demo.compare(loaded, [demo.MODES["eager"]], s)
    assert res.status == "ok" and res.images.shape == (2, 3, 16, 16)
    assert res.images.abs().max() <= 1.0


@pytest.mark.slow
def test_eval_cli_on_a_tiny_pipeline(tmp_path):
    path = _tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "eval_out"
    rc = cli_main(["eval", "--model", str(path), "--options", '{"cache": {"mode": "reuse"}}', "--out", str(out),
                   "--steps", "4", "--classes", "0,1", "--per-class", "1", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    by = {m["name"]: m for m in report["modes"]}
    assert by["eager"]["status"] == "ok" and by["inductor"]["status"] == "ok"
    assert by["eager"]["class_accuracy"] is None  # the digit classifier only judges the digits model
    assert by["diffusers FirstBlockCache"]["status"].startswith("unavailable: not supported for DiTTransformer2DModel")
