"""Tiny, offline diffusers pipelines: every component random, seeded, saved and loaded back like a real checkpoint.

One pipeline per DiT family of :mod:`fxdit.apps.models.tiny`, built from the same transformer config (so the
expectations of :func:`fxdit.apps.models.tiny.expected_for` apply to the graph Dynamo traces inside the pipeline):

- ``diffusers-dit``: ``DiTPipeline`` (``AutoencoderKL``, ``DDIMScheduler``);
- ``pixart-alpha``: ``PixArtAlphaPipeline`` (T5 encoder and tokenizer, ``AutoencoderKL``, DPM-Solver++);
- ``sd3``: ``StableDiffusion3Pipeline`` (two CLIP encoders with projection, T5, their tokenizers,
  ``AutoencoderKL``, flow-match Euler);
- ``flux``: ``FluxPipeline`` (CLIP + T5 encoders and tokenizers, ``AutoencoderKL``, flow-match Euler with
  dynamic shifting);
- ``hunyuan-video``: ``HunyuanVideoPipeline`` (Llama + CLIP encoders and tokenizers, ``AutoencoderKLHunyuanVideo``,
  flow-match Euler);
- ``wan``: ``WanPipeline`` (UMT5 encoder and tokenizer, ``AutoencoderKLWan``, flow-match Euler).

Tokenizers are built offline by transformers' own classes from a character-level vocabulary written here (CLIP:
byte-level BPE without merges, T5/UMT5: unigram, Llama: BPE without merges), so every prompt character is one
token. :func:`build` writes the pipeline with ``save_pretrained`` and loads it back with
``DiffusionPipeline.from_pretrained`` (nothing is downloaded). :data:`PIPELINES` holds, per family, the call
arguments that make the transformer see the tiny model's token grid and text length, and the classifier-free
guidance forms the pipeline has (:class:`TinyPipeline`).

    pipe = fxdit.apps.models.pipelines.build("flux", tmp_dir)
    out = pipe(**fxdit.apps.models.pipelines.call_kwargs("flux", steps=4))
"""

from __future__ import annotations

import logging
import os
import string
from dataclasses import dataclass, field
from typing import Any

import torch

from fxdit.errors import FxditError, did_you_mean

__all__ = ["PIPELINES", "TinyPipeline", "build", "save", "load", "call_kwargs", "expected", "first_transformer_call",
           "output_array"]

log = logging.getLogger(__name__)

_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


@dataclass(frozen=True)
class TinyPipeline:
    """One tiny pipeline: how to call it, and what its transformer sees.

    Attributes:
        name: the tiny model name (:data:`fxdit.apps.models.tiny.TINY`).
        pipeline: the diffusers pipeline class name.
        call: default ``pipe(...)`` arguments (no generator, no step count, no guidance).
        cfg: guidance forms -> the call arguments that select them. ``"none"``: one conditional call per step;
            ``"batched"``: cond and uncond in one call of twice the batch; ``"separate"``: a cond and an uncond
            call per step with the same timestep (true CFG); ``"distilled"``: a guidance-embedding input, one
            call per step.
        calls_per_step: transformer calls per denoising step for each guidance form.
        sizes: input sizes of :func:`fxdit.apps.models.tiny.expected_for` that the default call produces.
        resize: call arguments giving another resolution (``{}`` when the pipeline fixes it, as DiT does), with
            the input sizes it produces.
        text_padded: the text tokens are padded with a mask the transformer receives.
        overrides: transformer config keys that differ from the tiny model's (what the pipeline needs).
    """

    name: str
    pipeline: str
    call: dict[str, Any]
    cfg: dict[str, dict[str, Any]]
    calls_per_step: dict[str, int]
    sizes: dict[str, Any] = field(default_factory=dict)
    resize: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    text_padded: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


PIPELINES: dict[str, TinyPipeline] = {
    "diffusers-dit": TinyPipeline(
        "diffusers-dit", "DiTPipeline",
        call={"class_labels": [1], "output_type": "np"},
        cfg={"none": {"guidance_scale": 1.0}, "batched": {"guidance_scale": 4.0}},
        calls_per_step={"none": 1, "batched": 1},
    ),
    "pixart-alpha": TinyPipeline(
        "pixart-alpha", "PixArtAlphaPipeline",
        call={"prompt": "a red cat", "height": 32, "width": 32, "max_sequence_length": 12,
              "use_resolution_binning": False, "clean_caption": False, "output_type": "latent"},
        cfg={"none": {"guidance_scale": 1.0}, "batched": {"guidance_scale": 4.5, "negative_prompt": "blur"}},
        calls_per_step={"none": 1, "batched": 1},
        sizes={"text_tokens": 12},
        resize=({"height": 48, "width": 32}, {"sample_size": 24}),
        text_padded=True,
        # PixArtAlphaPipeline passes resolution/aspect-ratio conditions only for sample_size 128 (1024 px), as the
        # model's own default (use_additional_conditions = sample_size == 128) expects.
        overrides={"use_additional_conditions": False},
    ),
    "sd3": TinyPipeline(
        "sd3", "StableDiffusion3Pipeline",
        call={"prompt": "a red cat", "height": 32, "width": 48, "max_sequence_length": 8, "output_type": "latent"},
        cfg={"none": {"guidance_scale": 1.0}, "batched": {"guidance_scale": 5.0, "negative_prompt": "blur"}},
        calls_per_step={"none": 1, "batched": 1},
        # CLIP tokens (tokenizer.model_max_length = 8) then T5 tokens (max_sequence_length = 8)
        sizes={"height": 16, "width": 24, "text_tokens": 16},
        resize=({"height": 48, "width": 48}, {"height": 24, "width": 24}),
    ),
    "flux": TinyPipeline(
        "flux", "FluxPipeline",
        call={"prompt": "a red cat", "height": 32, "width": 48, "max_sequence_length": 8, "output_type": "latent"},
        cfg={"distilled": {"guidance_scale": 3.5},
             "separate": {"guidance_scale": 3.5, "true_cfg_scale": 4.0, "negative_prompt": "blur"}},
        calls_per_step={"distilled": 1, "separate": 2},
        sizes={"grid_h": 8, "grid_w": 12, "text_tokens": 8},
        resize=({"height": 48, "width": 48}, {"grid_h": 12, "grid_w": 12}),
    ),
    "hunyuan-video": TinyPipeline(
        "hunyuan-video", "HunyuanVideoPipeline",
        call={"prompt": "a red cat", "height": 32, "width": 48, "num_frames": 9, "max_sequence_length": 16,
              "prompt_template": {"template": "{}", "crop_start": 0}, "output_type": "latent"},
        cfg={"distilled": {"guidance_scale": 6.0},
             "separate": {"guidance_scale": 6.0, "true_cfg_scale": 4.0, "negative_prompt": "blur"}},
        calls_per_step={"distilled": 1, "separate": 2},
        sizes={"frames": 3, "height": 8, "width": 12, "text_tokens": 16},
        resize=({"height": 48, "width": 48}, {"height": 12, "width": 12}),
        text_padded=True,
    ),
    "wan": TinyPipeline(
        "wan", "WanPipeline",
        call={"prompt": "a red cat", "height": 32, "width": 48, "num_frames": 7, "max_sequence_length": 8,
              "output_type": "latent"},
        cfg={"none": {"guidance_scale": 1.0}, "separate": {"guidance_scale": 5.0, "negative_prompt": "blur"}},
        calls_per_step={"none": 1, "separate": 2},
        sizes={"frames": 4, "height": 8, "width": 12, "text_tokens": 8},
        resize=({"height": 48, "width": 48}, {"height": 12, "width": 12}),
    ),
}


def _spec(name: str) -> TinyPipeline:
    if name not in PIPELINES:
        raise FxditError(f"tiny pipeline {name!r} is unknown{did_you_mean(name, PIPELINES)}; "
                         f"expected one of {list(PIPELINES)}")
    return PIPELINES[name]


def call_kwargs(name: str, *, steps: int = 2, guidance: str | None = None, seed: int = 0, batch: int = 1,
                resized: bool = False, output_type: str | None = None) -> dict[str, Any]:
    """Arguments of ``pipe(**kwargs)`` for the tiny pipeline ``name``.

    Args:
        name: one of :data:`PIPELINES`.
        steps: denoising steps.
        guidance: a key of ``PIPELINES[name].cfg``; ``None`` picks the first.
        seed: seed of the pipeline's ``generator`` (same seed, same noise).
        batch: images per call (class labels for DiT, prompts otherwise).
        resized: use the other resolution of ``PIPELINES[name].resize``.
        output_type: override the default output type (``"latent"``, or ``"np"`` for DiT).

    Raises:
        FxditError: unknown name, guidance form, or a resolution change the pipeline does not have.
    """
    spec = _spec(name)
    guidance = guidance or next(iter(spec.cfg))
    if guidance not in spec.cfg:
        raise FxditError(f"call_kwargs({name!r}, guidance={guidance!r}); expected one of {list(spec.cfg)}")
    if resized and not spec.resize[0]:
        raise FxditError(f"call_kwargs({name!r}, resized=True): {spec.pipeline} has a fixed resolution")
    if not isinstance(batch, int) or batch < 1:
        raise FxditError(f"call_kwargs(batch={batch!r}); expected a positive integer")
    kw: dict[str, Any] = {**spec.call, **spec.cfg[guidance], "num_inference_steps": steps}
    if resized:
        kw.update(spec.resize[0])
    if "class_labels" in kw:
        kw["class_labels"] = [(kw["class_labels"][0] + i) % 1000 for i in range(batch)]
    else:
        kw["prompt"] = [kw["prompt"]] * batch if batch > 1 else kw["prompt"]
        if "negative_prompt" in kw and batch > 1:
            kw["negative_prompt"] = [kw["negative_prompt"]] * batch
    if output_type is not None:
        kw["output_type"] = output_type
    kw["generator"] = torch.Generator().manual_seed(seed)
    return kw


def expected(name: str, *, resized: bool = False) -> Any:
    """The :class:`~fxdit.apps.models.Expected` of the transformer graph the default (or resized) call traces."""
    from fxdit.apps.models import tiny

    spec = _spec(name)
    sizes = {**spec.overrides, **spec.sizes}
    if resized:
        sizes.update(spec.resize[1])
    return tiny.expected_for(name, **sizes)


def output_array(out: Any) -> torch.Tensor:
    """The images/videos/latents of a pipeline output as one float tensor."""
    for attr in ("images", "frames"):
        if hasattr(out, attr):
            out = getattr(out, attr)
            break
    if isinstance(out, (tuple, list)) and not isinstance(out, torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        import numpy as np

        out = torch.from_numpy(np.asarray(out))
    return out.detach().float()


class _Stop(Exception):
    pass


def first_transformer_call(pipe: Any, **kwargs: Any) -> tuple[tuple, dict[str, Any]]:
    """The ``(args, kwargs)`` of the first transformer call ``pipe(**kwargs)`` makes (the pipeline is stopped there).

    Useful as the ``example=`` of :func:`fxdit.calibrate`.
    """
    wrapper = pipe.transformer
    model = getattr(wrapper, "_orig_mod", wrapper)
    seen: list[tuple[tuple, dict[str, Any]]] = []

    def hook(module: Any, args: tuple, kw: dict[str, Any]) -> None:
        seen.append((tuple(args), dict(kw)))
        raise _Stop

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    pipe.transformer = model  # eager: a compiled wrapper would trace the hook
    try:
        pipe(**kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
        pipe.transformer = wrapper
    if not seen:
        raise FxditError(f"{type(pipe).__name__} made no transformer call")
    args, kw = seen[0]
    kw.pop("attention_kwargs", None)
    kw.pop("joint_attention_kwargs", None)
    return args, kw


# ---------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------


def _clip_tokenizer(max_length: int) -> Any:
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte = bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in _CHARS:
            vocab.setdefault(byte[ord(c)] + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _llama_tokenizer() -> Any:
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in "\u2581" + _CHARS:
        vocab.setdefault(c, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[])
    tok.pad_token = "</s>"
    tok.padding_side = "right"
    return tok


def _clip(tokenizer: Any, hidden: int, *, projection: int | None = None, positions: int = 77) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=positions,
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection is not None else CLIPTextModel
    return cls(cfg).eval()


def _t5(tokenizer: Any, d_model: int, *, umt5: bool = False) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    conf_cls, cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = conf_cls(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return cls(cfg).eval()


def _llama(tokenizer: Any, hidden: int) -> Any:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=2, bos_token_id=1, eos_token_id=2)
    return LlamaModel(cfg).eval()


def _vae_kl(latent_channels: int, *, flow: bool = False) -> Any:
    from diffusers import AutoencoderKL

    extra = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
             "use_post_quant_conv": False} if flow else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=32, **extra).eval()


def _flow_scheduler(**kw: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _components(name: str, transformer: Any) -> dict[str, Any]:
    import diffusers

    cfg = transformer.config
    if name == "diffusers-dit":
        return {"transformer": transformer, "vae": _vae_kl(cfg.in_channels),
                "scheduler": diffusers.DDIMScheduler(num_train_timesteps=1000)}
    if name == "pixart-alpha":
        tok = _t5_tokenizer()
        return {"tokenizer": tok, "text_encoder": _t5(tok, cfg.caption_channels), "vae": _vae_kl(cfg.in_channels),
                "transformer": transformer, "scheduler": diffusers.DPMSolverMultistepScheduler()}
    if name == "sd3":
        t1, t2, t3 = _clip_tokenizer(8), _clip_tokenizer(8), _t5_tokenizer()
        half = cfg.pooled_projection_dim // 2
        return {"transformer": transformer, "scheduler": _flow_scheduler(shift=3.0),
                "vae": _vae_kl(cfg.in_channels, flow=True),
                "text_encoder": _clip(t1, half, projection=half), "tokenizer": t1,
                "text_encoder_2": _clip(t2, half, projection=half), "tokenizer_2": t2,
                "text_encoder_3": _t5(t3, cfg.joint_attention_dim), "tokenizer_3": t3,
                "image_encoder": None, "feature_extractor": None}
    if name == "flux":
        t1, t2 = _clip_tokenizer(77), _t5_tokenizer()
        return {"scheduler": _flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
                "vae": _vae_kl(cfg.in_channels // 4, flow=True),
                "text_encoder": _clip(t1, cfg.pooled_projection_dim), "tokenizer": t1,
                "text_encoder_2": _t5(t2, cfg.joint_attention_dim), "tokenizer_2": t2,
                "transformer": transformer, "image_encoder": None, "feature_extractor": None}
    if name == "hunyuan-video":
        from diffusers import AutoencoderKLHunyuanVideo

        t1, t2 = _llama_tokenizer(), _clip_tokenizer(77)
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=cfg.in_channels, block_out_channels=(8, 8, 8),
            down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4, temporal_compression_ratio=4,
            mid_block_add_attention=True).eval()
        return {"text_encoder": _llama(t1, cfg.text_embed_dim), "tokenizer": t1, "transformer": transformer,
                "vae": vae, "scheduler": _flow_scheduler(shift=7.0),
                "text_encoder_2": _clip(t2, cfg.pooled_projection_dim), "tokenizer_2": t2}
    if name == "wan":
        from diffusers import AutoencoderKLWan

        tok = _t5_tokenizer()
        z = cfg.in_channels
        vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True], latents_mean=[0.0] * z, latents_std=[1.0] * z,
                               scale_factor_temporal=2, scale_factor_spatial=4).eval()
        return {"tokenizer": tok, "text_encoder": _t5(tok, cfg.text_dim, umt5=True), "vae": vae,
                "scheduler": _flow_scheduler(shift=3.0), "transformer": transformer}
    raise FxditError(f"tiny pipeline {name!r} is unknown; expected one of {list(PIPELINES)}")  # pragma: no cover


def save(name: str, folder: str | os.PathLike[str], *, seed: int = 0) -> str:
    """Build the tiny pipeline ``name`` with seeded random components and ``save_pretrained`` it to ``folder``.

    The transformer is :func:`fxdit.apps.models.tiny.build` ``(name, seed=seed)``; the other components are seeded
    from ``seed`` too. The caller's RNG state is left unchanged.

    Returns:
        ``folder`` as a string.

    Raises:
        FxditError: unknown name.
    """
    import diffusers

    from fxdit.apps.models import tiny

    spec = _spec(name)
    transformer = tiny.build(name, seed=seed, **spec.overrides).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        components = _components(name, transformer)
    pipe = getattr(diffusers, spec.pipeline)(**components)
    folder = os.fspath(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    log.info("saved tiny %s to %s", spec.pipeline, folder)
    return folder


def load(folder: str | os.PathLike[str]) -> Any:
    """``DiffusionPipeline.from_pretrained(folder)`` (fp32, eval mode, progress bars off)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(os.fspath(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(name: str, folder: str | os.PathLike[str], *, seed: int = 0) -> Any:
    """:func:`save` the tiny pipeline ``name`` to ``folder`` and :func:`load` it back."""
    return load(save(name, folder, seed=seed))
