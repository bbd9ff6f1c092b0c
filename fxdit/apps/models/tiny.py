"""Tiny, structurally faithful configurations of the diffusers transformers, built offline with seeded weights.

Every model here is built from a config (no download) with depth 2 (or 1 double-stream + 1 single-stream
block), hidden size <= 64 and 64-96 image tokens, and keeps what the analysis has to cope with in the real
model: joint text+image attention and its token order, cross-attention, padded-text masks, odd head dims,
non-square grids, blocks that differ from each other. Read against diffusers 0.42.1
(``diffusers/models/transformers/`` and ``attention.py``, ``attention_processor.py``).

Counting conventions of :class:`~fxdit.apps.models.Expected` (also used by ``tests/test_models.py``, which
checks every number against the Dynamo graph):

- an *attention site* is one ``scaled_dot_product_attention`` call in one forward;
  *self* when keys come from the query sequence (joint text+image attention counts as self), *cross* when
  image queries attend to text keys;
- *blocks* are the transformer blocks that carry image tokens (``transformer_blocks``,
  ``single_transformer_blocks``, ``blocks``). HunyuanVideo's token-refiner blocks
  (``context_embedder.token_refiner.refiner_blocks``) only see text: their attention calls are counted in
  ``attention_sites``/``self_attention_sites`` and in ``text_only_attention_sites``, not in ``blocks``;
- linear roles by module (what a reader of the model would call it):

  ===========================================================  ==============
  ``to_q``, ``add_q_proj`` (text stream)                        ``q``
  ``to_k``, ``add_k_proj``                                      ``k``
  ``to_v``, ``add_v_proj``                                      ``v``
  ``attn.qkv`` (fused; reference DiT only)                      ``qkv``
  ``to_out.0``, ``to_add_out`` (text stream)                    ``attn_out``
  ``ff.net.0.proj``, ``ff_context.net.0.proj``, ``ffn.net.0.proj``, ``proj_mlp``  ``mlp_in``
  ``ff.net.2``, ``ff_context.net.2``, ``ffn.net.2``             ``mlp_out``
  ``norm1.linear``, ``norm1_context.linear``, ``norm.linear``   ``modulation``
  anything else (timestep-embedding MLPs inside a block, the fused ``proj_out`` of single-stream blocks,
  which mixes attention output and MLP hidden state in one matmul)                       ``other``
  ===========================================================  ==============
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fxdit.errors import FxditError, did_you_mean

__all__ = ["build", "TINY", "expected_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Tiny:
    """One tiny model: diffusers class name, config, input sizes, and the functions making inputs/expectations."""

    cls: str
    config: dict[str, Any]
    inputs: dict[str, Any]
    make_inputs: Callable[[Any, dict[str, Any], int], tuple[tuple, dict[str, Any]]]
    expected: Callable[[dict[str, Any], dict[str, Any]], Any]
    description: str


def _roles(**counts: int) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# --------------------------------------------------------------------------------------------------------------
# DiTTransformer2DModel ("diffusers-dit")
# --------------------------------------------------------------------------------------------------------------


def _dit_inputs(cfg: Any, inp: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    size = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, cfg.num_embeds_ada_norm, (batch,))
    return (x,), {"timestep": t, "class_labels": y, "return_dict": False}


def _dit_expected(cfg: dict[str, Any], inp: dict[str, Any]) -> Any:
    from fxdit.apps.models import Expected

    n_layers = cfg["num_layers"]
    g = cfg["sample_size"] // cfg["patch_size"]
    # BasicTransformerBlock(norm_type="ada_norm_zero"), no cross_attention_dim -> attn2 is None: one self-attention
    # (attn1) per block. Linears per block: attn1.to_q/to_k/to_v, attn1.to_out.0, ff.net.0.proj (GELU-tanh proj),
    # ff.net.2, norm1.linear (6*dim adaLN-Zero) and, because AdaLayerNormZero embeds the timestep itself,
    # norm1.emb.timestep_embedder.linear_1/linear_2 ("other"). Note: after the blocks the model calls
    # transformer_blocks[0].norm1.emb again for the output adaLN, so two more linears with module path
    # "transformer_blocks.0.norm1.emb.timestep_embedder.*" appear in the graph after the last block.
    return Expected(
        attention_sites=n_layers,
        self_attention_sites=n_layers,
        cross_attention_sites=0,
        blocks=n_layers,
        linear_roles=_roles(q=1, k=1, v=1, attn_out=1, mlp_in=1, mlp_out=1, modulation=1, other=2),
        token_grid=(1, g, g),
        image_span=(0, g * g),
        site_kinds=("image",) * n_layers,
        site_blocks=tuple(range(n_layers)),
        notes="num_layers blocks x attn1 (self); the block embeds timestep+class itself (2 'other' linears)",
    )


# --------------------------------------------------------------------------------------------------------------
# PixArtTransformer2DModel ("pixart-alpha")
# --------------------------------------------------------------------------------------------------------------


def _pixart_inputs(cfg: Any, inp: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    size = cfg.sample_size
    n_txt = inp["text_tokens"]
    x = torch.randn(batch, cfg.in_channels, size, size)
    text = torch.randn(batch, n_txt, cfg.caption_channels)
    mask = torch.ones(batch, n_txt, dtype=torch.long)
    for b in range(batch):  # padded prompts: sample b keeps n_txt - pad - b tokens (at least one)
        mask[b, max(1, n_txt - inp["text_padding"] - b):] = 0
    t = torch.randint(0, 1000, (batch,))
    kwargs: dict[str, Any] = {"encoder_hidden_states": text, "timestep": t, "encoder_attention_mask": mask,
                              "return_dict": False}
    if cfg.use_additional_conditions:
        px = float(size * 8)
        kwargs["added_cond_kwargs"] = {"resolution": torch.tensor([[px, px]] * batch),
                                       "aspect_ratio": torch.tensor([[1.0]] * batch)}
    else:
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return (x,), kwargs


def _pixart_expected(cfg: dict[str, Any], inp: dict[str, Any]) -> Any:
    from fxdit.apps.models import Expected

    n_layers = cfg["num_layers"]
    g = cfg["sample_size"] // cfg["patch_size"]
    # BasicTransformerBlock(norm_type="ada_norm_single", cross_attention_dim set): attn1 = self-attention over the
    # image tokens, attn2 = cross-attention (image queries, caption keys/values, float bias mask from
    # encoder_attention_mask). Linears per block: attn1.to_q/k/v/to_out.0 + attn2.to_q/k/v/to_out.0 -> q 2, k 2,
    # v 2, attn_out 2; ff.net.0.proj, ff.net.2. Modulation is a per-block scale_shift_table *parameter* added to
    # the shared adaln_single output (computed once outside the blocks): no modulation linear in a block.
    return Expected(
        attention_sites=2 * n_layers,
        self_attention_sites=n_layers,
        cross_attention_sites=n_layers,
        blocks=n_layers,
        linear_roles=_roles(q=2, k=2, v=2, attn_out=2, mlp_in=1, mlp_out=1),
        token_grid=(1, g, g),
        image_span=(0, g * g),
        attention_per_block=2,
        site_kinds=("image", "cross") * n_layers,
        site_blocks=tuple(i for i in range(n_layers) for _ in range(2)),
        notes="num_layers blocks x (attn1 self + attn2 cross with padded-caption float mask)",
    )


# --------------------------------------------------------------------------------------------------------------
# SD3Transformer2DModel ("sd3")
# --------------------------------------------------------------------------------------------------------------


def _sd3_inputs(cfg: Any, inp: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    x = torch.randn(batch, cfg.in_channels, inp["height"], inp["width"])
    text = torch.randn(batch, inp["text_tokens"], cfg.joint_attention_dim)
    pooled = torch.randn(batch, cfg.pooled_projection_dim)
    t = torch.rand(batch) * 1000
    return (x,), {"encoder_hidden_states": text, "pooled_projections": pooled, "timestep": t, "return_dict": False}


def _sd3_expected(cfg: dict[str, Any], inp: dict[str, Any]) -> Any:
    from fxdit.apps.models import Expected

    n_layers = cfg["num_layers"]
    p = cfg["patch_size"]
    gh, gw = inp["height"] // p, inp["width"] // p
    n, n_txt = gh * gw, inp["text_tokens"]
    dual = [i for i in cfg.get("dual_attention_layers", ()) if i < n_layers]
    # JointTransformerBlock: one joint attention per block (JointAttnProcessor2_0 cats [image, text] along the
    # sequence: image FIRST). Block i < num_layers-1: image to_q/k/v + text add_q/k/v_proj, to_out.0 + to_add_out,
    # ff and ff_context (2 x mlp_in/mlp_out), norm1.linear + norm1_context.linear (AdaLayerNormZero, 6*dim).
    # The last block has context_pre_only=True: no to_add_out, no ff_context, and norm1_context is an
    # AdaLayerNormContinuous (its .linear, 2*dim, still modulation). Blocks in dual_attention_layers (SD3.5)
    # add attn2 (image-only self-attention: +1 q/k/v/attn_out).
    per_block = []
    for i in range(n_layers):
        last = i == n_layers - 1
        extra = 1 if i in dual else 0
        per_block.append(_roles(q=2 + extra, k=2 + extra, v=2 + extra, attn_out=(1 if last else 2) + extra,
                                mlp_in=1 if last else 2, mlp_out=1 if last else 2, modulation=2))
    return Expected(
        attention_sites=n_layers + len(dual),
        self_attention_sites=n_layers + len(dual),
        cross_attention_sites=0,
        blocks=n_layers,
        linear_roles=per_block[0],
        linear_roles_per_block=per_block,
        token_grid=(1, gh, gw),
        image_span=(0, n),
        text_span=(n, n + n_txt),
        site_kinds=tuple(k for i in range(n_layers) for k in (("joint", "image") if i in dual else ("joint",))),
        site_blocks=tuple(i for i in range(n_layers) for _ in range(2 if i in dual else 1)),
        notes="joint attention, image first; last block context_pre_only (no to_add_out / ff_context)",
    )


# --------------------------------------------------------------------------------------------------------------
# FluxTransformer2DModel ("flux")
# --------------------------------------------------------------------------------------------------------------


def _flux_inputs(cfg: Any, inp: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    gh, gw, n_txt = inp["grid_h"], inp["grid_w"], inp["text_tokens"]
    x = torch.randn(batch, gh * gw, cfg.in_channels)  # packed latents: 2x2 latent patches already folded in
    text = torch.randn(batch, n_txt, cfg.joint_attention_dim)
    pooled = torch.randn(batch, cfg.pooled_projection_dim)
    img_ids = torch.zeros(gh, gw, 3)
    img_ids[..., 1] = torch.arange(gh)[:, None]
    img_ids[..., 2] = torch.arange(gw)[None, :]
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": text, "pooled_projections": pooled, "timestep": torch.rand(batch),
        "img_ids": img_ids.reshape(gh * gw, 3), "txt_ids": torch.zeros(n_txt, 3), "return_dict": False,
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return (x,), kwargs


def _double_stream_roles() -> dict[str, int]:
    # image + text stream each: q, k, v, attention output (to_out.0 / to_add_out), ff / ff_context in+out, and
    # norm1.linear / norm1_context.linear.
    return _roles(q=2, k=2, v=2, attn_out=2, mlp_in=2, mlp_out=2, modulation=2)


def _single_stream_roles() -> dict[str, int]:
    # attn.to_q/k/v over the joint sequence (attention has pre_only=True: no to_out), proj_mlp (mlp_in),
    # norm.linear (modulation, 3*dim), proj_out over cat([attn, mlp]) -> dim ("other": attention output and MLP
    # output projections fused in one matmul).
    return _roles(q=1, k=1, v=1, mlp_in=1, modulation=1, other=1)


def _flux_expected(cfg: dict[str, Any], inp: dict[str, Any]) -> Any:
    from fxdit.apps.models import Expected

    n_double, n_single = cfg["num_layers"], cfg["num_single_layers"]
    gh, gw, n_txt = inp["grid_h"], inp["grid_w"], inp["text_tokens"]
    n = gh * gw
    # One joint attention per block, double- and single-stream alike; FluxAttnProcessor cats [text, image]
    # (text FIRST) and the single blocks cat [encoder_hidden_states, hidden_states] too.
    per_block = [_double_stream_roles()] * n_double + [_single_stream_roles()] * n_single
    return Expected(
        attention_sites=n_double + n_single,
        self_attention_sites=n_double + n_single,
        cross_attention_sites=0,
        blocks=n_double + n_single,
        linear_roles=per_block[0],
        linear_roles_per_block=per_block,
        token_grid=(1, gh, gw),
        text_span=(0, n_txt),
        image_span=(n_txt, n_txt + n),
        site_kinds=("joint",) * (n_double + n_single),
        site_blocks=tuple(range(n_double + n_single)),
        notes="num_layers double-stream + num_single_layers single-stream blocks, text first, RoPE from ids",
    )


# --------------------------------------------------------------------------------------------------------------
# HunyuanVideoTransformer3DModel ("hunyuan-video")
# --------------------------------------------------------------------------------------------------------------


def _hunyuan_inputs(cfg: Any, inp: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    n_txt = inp["text_tokens"]
    x = torch.randn(batch, cfg.in_channels, inp["frames"], inp["height"], inp["width"])
    text = torch.randn(batch, n_txt, cfg.text_embed_dim)
    mask = torch.ones(batch, n_txt, dtype=torch.long)
    for b in range(batch):  # padded prompts (the pipeline pads to max_sequence_length)
        mask[b, max(1, n_txt - inp["text_padding"] - b):] = 0
    kwargs: dict[str, Any] = {
        "timestep": torch.randint(0, 1000, (batch,)), "encoder_hidden_states": text,
        "encoder_attention_mask": mask, "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim),
        "return_dict": False,
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 6000.0)
    return (x,), kwargs


def _hunyuan_expected(cfg: dict[str, Any], inp: dict[str, Any]) -> Any:
    from fxdit.apps.models import Expected

    n_double, n_single, n_ref = cfg["num_layers"], cfg["num_single_layers"], cfg["num_refiner_layers"]
    p, pt = cfg["patch_size"], cfg["patch_size_t"]
    grid = (inp["frames"] // pt, inp["height"] // p, inp["width"] // p)
    n, n_txt = grid[0] * grid[1] * grid[2], inp["text_tokens"]
    # context_embedder.token_refiner: num_refiner_layers text-only self-attentions (bool mask from
    # encoder_attention_mask). Then each double-stream block (HunyuanVideoTransformerBlock) and each single-stream
    # block runs one joint attention over cat([image, text]) (image FIRST) with a bool mask (B, 1, 1, N + L)
    # that drops the padded text tokens. Linear roles as for Flux (same block designs).
    per_block = [_double_stream_roles()] * n_double + [_single_stream_roles()] * n_single
    return Expected(
        attention_sites=n_ref + n_double + n_single,
        self_attention_sites=n_ref + n_double + n_single,
        cross_attention_sites=0,
        blocks=n_double + n_single,
        linear_roles=per_block[0],
        linear_roles_per_block=per_block,
        token_grid=grid,
        image_span=(0, n),
        text_span=(n, n + n_txt),
        text_only_attention_sites=n_ref,
        site_kinds=("text",) * n_ref + ("joint",) * (n_double + n_single),
        site_blocks=(None,) * n_ref + tuple(range(n_double + n_single)),
        notes="token refiner (text only) + double-stream + single-stream blocks, image first, bool text mask",
    )


# --------------------------------------------------------------------------------------------------------------
# WanTransformer3DModel ("wan")
# --------------------------------------------------------------------------------------------------------------


def _wan_inputs(cfg: Any, inp: dict[str, Any], batch: int) -> tuple[tuple, dict[str, Any]]:
    x = torch.randn(batch, cfg.in_channels, inp["frames"], inp["height"], inp["width"])
    text = torch.randn(batch, inp["text_tokens"], cfg.text_dim)
    return (x,), {"timestep": torch.randint(0, 1000, (batch,)), "encoder_hidden_states": text, "return_dict": False}


def _wan_expected(cfg: dict[str, Any], inp: dict[str, Any]) -> Any:
    from fxdit.apps.models import Expected

    n_layers = cfg["num_layers"]
    pt, ph, pw = cfg["patch_size"]
    grid = (inp["frames"] // pt, inp["height"] // ph, inp["width"] // pw)
    n = grid[0] * grid[1] * grid[2]
    # WanTransformerBlock: attn1 self-attention (RoPE), attn2 cross-attention to the text (no image_dim ->
    # no add_k/v_proj). Linears: attn1/attn2 to_q/to_k/to_v/to_out.0 (q 2, k 2, v 2, attn_out 2),
    # ffn.net.0.proj, ffn.net.2. Modulation: scale_shift_table parameter + the shared condition_embedder.time_proj
    # computed outside the blocks -> no modulation linear in a block.
    return Expected(
        attention_sites=2 * n_layers,
        self_attention_sites=n_layers,
        cross_attention_sites=n_layers,
        blocks=n_layers,
        linear_roles=_roles(q=2, k=2, v=2, attn_out=2, mlp_in=1, mlp_out=1),
        token_grid=grid,
        image_span=(0, n),
        attention_per_block=2,
        site_kinds=("image", "cross") * n_layers,
        site_blocks=tuple(i for i in range(n_layers) for _ in range(2)),
        notes="num_layers blocks x (attn1 self + attn2 cross), head_dim = attention_head_dim (12 here)",
    )


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------

TINY: dict[str, _Tiny] = {
    "diffusers-dit": _Tiny(
        "DiTTransformer2DModel",
        dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             sample_size=16, patch_size=2, num_embeds_ada_norm=1000),
        {},
        _dit_inputs, _dit_expected,
        "DiTTransformer2DModel: 2 ada_norm_zero blocks, hidden 64, 16x16 latent, patch 2 (64 tokens), learned sigma",
    ),
    "pixart-alpha": _Tiny(
        "PixArtTransformer2DModel",
        # hidden 48 = 3 heads x 16: the resolution/aspect-ratio conditions split the hidden size in three.
        dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=48, caption_channels=32, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
             use_additional_conditions=True),
        {"text_tokens": 12, "text_padding": 4},
        _pixart_inputs, _pixart_expected,
        "PixArtTransformer2DModel: 2 blocks of self + cross attention, hidden 48, 64 tokens, 12 padded caption tokens",
    ),
    "sd3": _Tiny(
        "SD3Transformer2DModel",
        dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
             pos_embed_max_size=16, qk_norm="rms_norm"),
        {"height": 16, "width": 24, "text_tokens": 8},
        _sd3_inputs, _sd3_expected,
        "SD3Transformer2DModel (MMDiT): 2 joint blocks (last context_pre_only), hidden 64, 8x12 grid, 8 text tokens",
    ),
    "flux": _Tiny(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6)),
        {"grid_h": 8, "grid_w": 12, "text_tokens": 8},
        _flux_inputs, _flux_expected,
        "FluxTransformer2DModel: 1 double-stream + 1 single-stream block, hidden 64, packed 8x12 grid, text first",
    ),
    "hunyuan-video": _Tiny(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
             guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6)),
        {"frames": 3, "height": 8, "width": 12, "text_tokens": 10, "text_padding": 3},
        _hunyuan_inputs, _hunyuan_expected,
        "HunyuanVideoTransformer3DModel: 1 refiner + 1 double + 1 single block, hidden 64, (3,4,6) grid, padded text",
    ),
    "wan": _Tiny(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=32, freq_dim=256, ffn_dim=96, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        {"frames": 4, "height": 8, "width": 12, "text_tokens": 8},
        _wan_inputs, _wan_expected,
        "WanTransformer3DModel: 2 blocks (self + cross), 4 heads of dim 12 (hidden 48), (4,4,6) grid = 96 tokens",
    ),
}


def expected_for(name: str, **overrides: Any) -> Any:
    """The :class:`~fxdit.apps.models.Expected` of a tiny model without building it."""
    spec = TINY[name]
    cfg, inp = _split_overrides(name, spec, overrides)
    return spec.expected(cfg, inp)


def _split_overrides(name: str, spec: _Tiny, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    import diffusers

    cls = getattr(diffusers, spec.cls)
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    cfg, inp = dict(spec.config), dict(spec.inputs)
    for key, value in overrides.items():
        if key in inp:
            inp[key] = value
        elif key in params:
            cfg[key] = value
        else:
            valid = sorted(params | set(inp))
            raise FxditError(f"build({name!r}): override {key!r} is neither a {spec.cls} config key nor an input size"
                             f"{did_you_mean(key, valid)}; expected one of {valid}")
    # Defaults of the class for keys the expectations read.
    for key, param in inspect.signature(cls.__init__).parameters.items():
        if key != "self" and key not in cfg and param.default is not inspect.Parameter.empty:
            cfg[key] = param.default
    return cfg, inp


def build(name: str, *, batch: int = 1, seed: int = 0, **overrides: Any) -> Any:
    """Build the tiny diffusers model ``name`` with seeded random weights and example inputs.

    Args:
        name: one of :data:`TINY`.
        batch: batch size of the example inputs.
        seed: seed of the weights and the inputs (the caller's RNG state is left unchanged).
        **overrides: diffusers config keys, or the input-size keys of the model (``text_tokens``, ``height``...).

    Returns:
        A :class:`~fxdit.apps.models.ModelSpec`.

    Raises:
        FxditError: unknown name or override.
    """
    from fxdit.apps.models import ModelSpec

    if name not in TINY:
        raise FxditError(f"tiny model {name!r} is unknown{did_you_mean(name, TINY)}; expected one of {list(TINY)}")
    spec = TINY[name]
    import diffusers

    cls = getattr(diffusers, spec.cls)
    cfg, inp = _split_overrides(name, spec, overrides)
    model_kwargs = {k: v for k, v in cfg.items() if k in spec.config or k in overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**model_kwargs).eval().float()
        # Some diffusers modules initialise parameters to zero (adaLN-Zero style output layers) or to constants;
        # re-draw every parameter so all paths carry signal and seeds give different models.
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, param[0].numel() ** -0.5)
                elif pname.endswith("weight"):  # norm scales
                    param.normal_(1.0, 0.02)
                else:
                    param.normal_(0.0, 0.02)
        args, kwargs = spec.make_inputs(model.config, inp, batch)
    return ModelSpec(name, model, args, kwargs, spec.expected(cfg, inp), spec.description)
