"""The shipped demo model and the DDIM + CFG sampler."""

from __future__ import annotations

import json

import pytest
import torch

import fxdit.apps.sampler as sampling
from fxdit.errors import FxditError

DEMO_DIR = sampling.SHIPPED_MODELS["demo-dit"]

#: The shipped model's architecture, as the README documents it.
README_CONFIG = {
    "_class_name": "DiTTransformer2DModel",
    "in_channels": 1,
    "out_channels": 1,
    "sample_size": 32,
    "patch_size": 2,
    "num_layers": 6,
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "norm_type": "ada_norm_zero",
    "num_embeds_ada_norm": 10,
}


def test_shipped_model_loads_with_from_pretrained_and_matches_the_documented_config():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(DEMO_DIR, torch_dtype=torch.float32)
    for key, value in README_CONFIG.items():
        if key != "_class_name":
            assert model.config[key] == value, key
    assert json.loads((DEMO_DIR / "config.json").read_text())["_class_name"] == README_CONFIG["_class_name"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the label table has the 10 classes plus the null label used for classifier-free guidance
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11


def test_shipped_weights_are_small_fp16_safetensors():
    from safetensors import safe_open

    files = list(DEMO_DIR.glob("*.safetensors"))
    assert [f.name for f in files] == ["diffusion_pytorch_model.safetensors"]
    assert sum(f.stat().st_size for f in DEMO_DIR.iterdir()) <= 20 * 1024 * 1024
    with safe_open(str(files[0]), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}
    info = json.loads((DEMO_DIR / "training_info.json").read_text())
    assert info["steps"] > 0 and info["seed"] == 0


def test_shipped_model_records_a_quality_check_at_the_default_guidance_meeting_the_bar():
    """The quality check ``tools/train_demo_model.py`` ran on these weights (100 samples, DDIM 50 steps) is kept in
    ``training_info.json``; the default guidance scale must be one that was checked and met the 90 % bar."""
    info = json.loads((DEMO_DIR / "training_info.json").read_text())
    check = info["evals"][f"cfg{sampling.DEFAULT_GUIDANCE:g}_steps50"]
    assert check["samples"] >= 100 and check["guidance_scale"] == sampling.DEFAULT_GUIDANCE
    assert check["class_accuracy"] >= 0.9


@pytest.mark.slow
def test_shipped_model_samples_are_recognised_as_their_class():
    """Sample one digit of each class twice (DDIM 25 steps, default CFG) and classify them for real."""
    from fxdit.apps.quality import load_classifier

    loaded = sampling.load_dit("demo-dit")
    labels = sampling.class_labels(range(10), per_class=2)
    noise = sampling.initial_noise(len(labels), (1, 32, 32), seed=0)
    with torch.no_grad():
        images = sampling.ddim_sample(sampling.Denoiser.for_model(loaded.transformer), labels, noise,
                                      loaded.scheduler, steps=25, progress=False)
        predicted = load_classifier()(images).argmax(1)
    assert (predicted == labels).float().mean().item() >= 0.8


def test_load_dit_gives_fp32_eval_model_and_ddim_scheduler():
    loaded = sampling.load_dit("demo-dit")
    assert not loaded.transformer.training
    assert loaded.vae is None
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert sampling.sample_shape(loaded.transformer) == (1, 32, 32)


def test_short_sampling_run_gives_images_of_right_shape_and_range():
    loaded = sampling.load_dit("demo-dit")
    labels = sampling.class_labels([3, 7], per_class=1)
    noise = sampling.initial_noise(len(labels), (1, 32, 32), seed=0)
    den = sampling.Denoiser.for_model(loaded.transformer)
    with torch.no_grad():
        out = sampling.ddim_sample(den, labels, noise, loaded.scheduler, steps=2, guidance_scale=3.0, progress=False)
    assert out.shape == (2, 1, 32, 32)
    assert torch.isfinite(out).all()
    assert out.min() >= -1.0 and out.max() <= 1.0  # clip_sample of the shipped scheduler


def test_unknown_or_missing_models_raise_fxdit_error(tmp_path):
    with pytest.raises(FxditError, match="demo-dit"):
        sampling.load_dit("demo-ditt")
    with pytest.raises(FxditError, match="config.json"):
        sampling.load_dit(tmp_path)


def test_initial_noise_is_seeded_per_sample():
    a = sampling.initial_noise(3, (1, 4, 4), seed=5)
    b = sampling.initial_noise(5, (1, 4, 4), seed=5)
    torch.testing.assert_close(a, b[:3], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, sampling.initial_noise(3, (1, 4, 4), seed=6))


def test_class_labels_layout_and_validation():
    assert sampling.class_labels([2, 0], 2).tolist() == [2, 2, 0, 0]
    with pytest.raises(FxditError, match="per_class"):
        sampling.class_labels([1], 0)


class _Recorder(torch.nn.Module):
    """A fake class-conditional DiT whose eps is label-dependent, recording every call."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(in_channels=1, num_embeds_ada_norm=10, sample_size=4)
        self.calls: list[tuple[int, list[int]]] = []

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        self.calls.append((hidden_states.shape[0], class_labels.tolist()))
        eps = 0.1 * hidden_states + 0.01 * class_labels.view(-1, 1, 1, 1).float()
        return (torch.cat([eps, eps], dim=1),)  # learned-sigma layout: the sampler keeps the first channel


def test_cfg_is_one_batched_call_per_step_and_combines_as_documented():
    model = _Recorder()
    sched = sampling.make_scheduler(None)
    labels = torch.tensor([1, 4])
    noise = sampling.initial_noise(2, (1, 4, 4), seed=0)
    out = sampling.ddim_sample(sampling.Denoiser.for_model(model), labels, noise, sched, steps=3, guidance_scale=2.5,
                               progress=False)
    assert [c[0] for c in model.calls] == [4, 4, 4]
    assert model.calls[0][1] == [1, 4, 10, 10]
    # reference: the same DDIM loop written out with the guided eps
    from diffusers import DDIMScheduler

    ref_sched = DDIMScheduler.from_config(sched.config)
    ref_sched.set_timesteps(3)
    x = noise.clone()
    for t in ref_sched.timesteps:
        eps_c = 0.1 * x + 0.01 * labels.view(-1, 1, 1, 1).float()
        eps_u = 0.1 * x + 0.01 * 10.0
        step = ref_sched.step(eps_u + 2.5 * (eps_c - eps_u), t, x, eta=0.0)
        x, x0 = step.prev_sample, step.pred_original_sample
    torch.testing.assert_close(out, x0)


def test_guidance_one_runs_only_the_conditional_half():
    model = _Recorder()
    sampling.ddim_sample(sampling.Denoiser.for_model(model), torch.tensor([2]),
                         sampling.initial_noise(1, (1, 4, 4), seed=0), sampling.make_scheduler(None), steps=2,
                         guidance_scale=1.0, progress=False)
    assert model.calls == [(1, [2]), (1, [2])]


def test_trailing_spacing_starts_from_the_last_training_step():
    sched = sampling.make_scheduler(DEMO_DIR)
    sched.set_timesteps(4)
    assert int(sched.timesteps[0]) == 999


def test_sampler_module_does_not_shadow_the_runtime_context():
    import fxdit
    import fxdit.runtime

    assert fxdit.sampling is fxdit.runtime.sampling  # the sampler lives in fxdit.apps.sampler, not fxdit.sampling
    model = torch.nn.Linear(2, 2)
    with fxdit.sampling(model, calls_per_step=2):
        pass
