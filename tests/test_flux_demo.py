"""The shipped Flux demo model, its flow-matching sampler, its training script, and fxdit on it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import fxdit  # noqa: E402
from fxdit.apps import flow_sampler  # noqa: E402
from fxdit.apps.models import flux  # noqa: E402
from fxdit.errors import FxditError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    return flux.load_flux_demo()


def _sample(demo, fn=None, steps=2, labels=(3, 7), seed=0):
    labels = torch.tensor(labels)
    noise = flow_sampler.initial_noise(len(labels), (demo.channels, *demo.image_size), seed=seed)
    den = flow_sampler.FlowDenoiser.for_demo(demo, fn)
    with torch.no_grad():
        return flow_sampler.flow_sample(den, labels, noise, demo.scheduler, steps=steps, guidance_scale=2.0,
                                        progress=False)


def test_shipped_folder_loads_with_from_pretrained_and_is_small():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(flux.DEMO_FLUX_DIR, torch_dtype=torch.float32)
    for key, value in flux.transformer_config().items():
        value = list(value) if isinstance(value, tuple) else value
        assert model.config[key] == value, key
    files = [f for f in flux.DEMO_FLUX_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20e6
    from safetensors import safe_open

    with safe_open(str(flux.DEMO_FLUX_DIR / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    info = json.loads((flux.DEMO_FLUX_DIR / "training_info.json").read_text())
    assert info["final"] and info["steps"] > 0


def test_text_encoder_gives_text_tokens_and_pooled_vectors(demo):
    enc = demo.text_encoder
    ehs, pooled = enc(torch.tensor([0, 9, flux.NULL_CLASS]))
    assert ehs.shape == (3, enc.text_tokens, demo.transformer.config.joint_attention_dim)
    assert pooled.shape == (3, demo.transformer.config.pooled_projection_dim)
    assert not torch.equal(ehs[0], ehs[1]) and not torch.equal(ehs[1], ehs[2])
    with pytest.raises(ValueError, match="text_tokens"):
        flux.DigitTextEncoder(text_tokens=0)


def test_text_encoder_save_load_round_trip(tmp_path):
    enc = flux.DigitTextEncoder(text_tokens=2, text_dim=8, pooled_dim=4)
    enc.save(tmp_path / "te")
    back = flux.DigitTextEncoder.load(tmp_path / "te")
    labels = torch.tensor([1, 10])
    torch.testing.assert_close(back(labels)[0], enc(labels)[0].half().float())
    with pytest.raises(FxditError, match="text_encoder"):
        flux.DigitTextEncoder.load(tmp_path / "missing")


def test_pack_unpack_and_ids():
    x = torch.randn(2, 1, 8, 6)
    tokens = flux.pack(x)
    assert tokens.shape == (2, 12, 4)
    torch.testing.assert_close(flux.unpack(tokens, 8, 6), x, rtol=0, atol=0)
    torch.testing.assert_close(tokens[0, 1], x[0, 0, 0:2, 2:4].reshape(-1))  # token (0, 1) is patch rows 0-1, cols 2-3
    ids = flux.image_ids(8, 6)
    assert ids.shape == (12, 3) and ids[1].tolist() == [0.0, 0.0, 1.0] and ids[-1].tolist() == [0.0, 3.0, 2.0]
    assert flux.image_ids(4, 4, scale=2, offset=0.5)[-1].tolist() == [0.0, 2.5, 2.5]
    with pytest.raises(FxditError, match="divisible"):
        flux.pack(torch.randn(1, 1, 5, 4))


def test_sampler_shape_range_determinism(demo):
    a = _sample(demo)
    b = _sample(demo)
    assert a.shape == (2, 1, 32, 32)
    assert torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, _sample(demo, seed=1))


def test_sampler_batches_uncond_first_and_rejects_bad_input(demo):
    seen = []

    def spy(**kwargs):
        seen.append(kwargs)
        return demo.transformer(**kwargs)

    _sample(demo, spy, steps=1)
    ehs, _ = demo.text_encoder(torch.tensor([flux.NULL_CLASS, flux.NULL_CLASS, 3, 7]))
    torch.testing.assert_close(seen[0]["encoder_hidden_states"], ehs)
    assert seen[0]["hidden_states"].shape == (4, 256, 4) and seen[0]["img_ids"].shape == (256, 3)
    assert float(seen[0]["timestep"][0]) == pytest.approx(1.0)
    den = flow_sampler.FlowDenoiser.for_demo(demo)
    with pytest.raises(FxditError, match="steps"):
        flow_sampler.flow_sample(den, torch.tensor([1]), torch.randn(1, 1, 32, 32), demo.scheduler, steps=0)
    with pytest.raises(FxditError, match="labels"):
        flow_sampler.flow_sample(den, torch.tensor([1, 2]), torch.randn(1, 1, 32, 32), demo.scheduler, steps=1)
    with pytest.raises(ValueError, match="image_size"):
        flow_sampler.FlowDenoiser(demo.transformer, demo.text_encoder, (31, 32))


def test_fxdit_rewrites_grat_and_icc_sites_on_the_demo_model(demo, no_inductor):
    """GRAT-B finds one joint text+image attention per block (text first, 16x16 grid); ICC plans and rewrites the
    cached linears; both runs stay finite and close to the eager sampler at 2 steps."""
    model = demo.transformer
    n_blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    grat = torch.compile(model, backend="fxdit",
                         options={"attention": {"mode": "grat-b", "group": (4, 4), "grid": (16, 16), "min_tokens": 0}})
    out = _sample(demo, grat)
    assert torch.isfinite(out).all()
    assert fxdit.reports(grat)[-1].report("rewrite_grouped_attention").rewritten == n_blocks

    torch.compiler.reset()
    labels = torch.tensor([flux.NULL_CLASS, flux.NULL_CLASS, 3, 7])
    den = flow_sampler.FlowDenoiser.for_demo(demo)
    example = ((), den.example_call(torch.randn(4, 1, 32, 32), torch.ones(4), labels))
    factors = fxdit.calibrate(model, method="svd", rank=16, example=example, progress=False)
    icc = torch.compile(model, backend="fxdit", options={"cache": {"factors": factors, "schedule": {"period": 2}}})
    with fxdit.sampling(icc, calls_per_step=1):
        out = _sample(demo, icc, steps=3)
    assert torch.isfinite(out).all()
    record = fxdit.reports(icc)[-1]
    assert record.report("insert_lowrank_increments").rewritten > 0
    assert record.runtime.stats.cached_calls == 1


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_script_runs_two_steps_and_writes_a_loadable_folder(tmp_path, capsys):
    train = _load_tool("train_flux_demo")
    out = tmp_path / "flux"
    threads = torch.get_num_threads()
    try:
        assert train.main(["--out", str(out), "--max-steps", "2", "--low-res-steps", "1", "--batch", "4",
                           "--eval-per-class", "0", "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 2 and info["low_res_steps_done"] == 1 and info["final"]
    loaded = flux.load_flux_demo(out)
    assert torch.isfinite(_sample(loaded, steps=1)).all()
    assert "settings:" in capsys.readouterr().out
