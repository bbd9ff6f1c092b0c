"""Per-class cases of ``tools/coverage.py``: a tiny config, dummy inputs and the token layout of each diffusers class.

The generic derivation of ``tools/coverage.py`` (argument-name shrink rules, one input table) builds the classes
whose constructors and forwards follow the common conventions. The others need what diffusers' own model tests
give them (``tests/models/transformers/test_models_transformer_*.py``: ``get_init_dict`` / ``get_dummy_inputs``):
extra conditioning inputs, position ids, packed sequences, configs whose constraints no name rule meets. Each
:class:`Case` here holds the small configuration of those tests (sizes moved to at most ~64 hidden, 1-2 layers and
an 8×8 token grid where the test uses a smaller one, so GRAT has groups), an input builder, and the **token layout**
the GRAT oracle uses: the token grid ``(T, H, W)`` of the latent the inputs describe and where the non-image tokens
sit in a joint sequence. The layout is written from the model's config and the inputs below (the patch sizes, the
latent shape, the order in which the model's source concatenates text and image), never from fxdit's inference.

A case with ``init=None`` keeps the generic tiny config, with ``inputs=None`` the generic inputs; such a case only
states the layout of what the generic path builds (its latent is 16×16, 2 frames for video, or 8×8 packed tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Case", "CASES", "TEXT_SIDES"]

#: Where the non-image tokens of a joint sequence sit: ``none`` (image-only self-attention; text by
#: cross-attention), ``before`` (``[text, image]``) or ``after`` (``[image, text]``).
TEXT_SIDES = ("none", "before", "after")


@dataclass(frozen=True)
class Case:
    """How to build one class tinily, what to feed it, and its token layout.

    Args:
        init: ``__init__`` kwargs (``None``: the generic tiny config of ``tools/coverage.py``).
        inputs: ``inputs(model) -> kwargs`` of ``forward`` (``None``: the generic inputs). Draws from the global
            RNG, which the caller seeds.
        grid: token grid ``(T, H, W)`` of the image/video tokens of the inputs (``None``: no image token grid,
            e.g. audio or a sequence GRAT does not apply to).
        text: where the non-image tokens sit in joint sequences (:data:`TEXT_SIDES`).
        latent: the ``forward`` argument holding the noisy latent (moved a little for the cached ICC step).
        image_start: index of the first image token in the attention sequences when the model puts other tokens
            before the image tokens besides the text of ``text`` (``None``: none).
        joint_kv: the model attends the image queries over joint keys (image and text, on the side ``text`` says)
            rather than over a joint sequence.
        source: the diffusers test the configuration and inputs follow.
    """

    init: dict[str, Any] | None = None
    inputs: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    grid: tuple[int, int, int] | None = None
    text: str = "none"
    latent: str = "hidden_states"
    image_start: int | None = None
    joint_kv: bool = False
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.text not in TEXT_SIDES:
            raise ValueError(f"text={self.text!r}; expected one of {TEXT_SIDES}")
        if self.grid is not None and len(self.grid) != 3:
            raise ValueError(f"grid={self.grid!r}; expected (T, H, W)")


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _t(batch: int, value: float = 500.0) -> torch.Tensor:
    return torch.full((batch,), value)


def _ids(t: int, h: int, w: int, axes: int = 3) -> torch.Tensor:
    """Raster-order position ids ``(t, h, w[, l])`` of a token grid, one row per token."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    ids = grid.reshape(-1, 3).float()
    if axes == 3:
        return ids if t > 1 else torch.cat([torch.zeros(h * w, 1), ids[:, 1:]], 1)
    return torch.cat([ids, torch.zeros(ids.shape[0], axes - 3)], 1)


def _text_ids(n: int, axes: int = 3) -> torch.Tensor:
    ids = torch.zeros(n, axes)
    if axes == 4:
        ids[:, 3] = torch.arange(n)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Input builders (the dummy inputs of the diffusers tests, at an 8×8 token grid)
# ---------------------------------------------------------------------------------------------------------------


def _ace_step(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 16, 8), "timestep": torch.rand(2), "timestep_r": torch.rand(2),
            "encoder_hidden_states": _r(2, 10, 32), "context_latents": _r(2, 16, 16), "return_dict": False}


def _anyflow(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 2, 4, 16, 16), "timestep": torch.full((1, 2), 500.0),
            "r_timestep": torch.full((1, 2), 250.0), "encoder_hidden_states": _r(1, 12, 16), "return_dict": False}


def _anyflow_far(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 4, 4, 16, 16), "timestep": torch.full((1, 4), 500.0),
            "r_timestep": torch.full((1, 4), 250.0), "encoder_hidden_states": _r(1, 12, 16),
            "chunk_partition": [2, 2], "return_dict": False}


def _bria_fibo(m: Any) -> dict[str, Any]:
    ehs = _r(1, 16, 64)
    return {"hidden_states": _r(1, 64, 48), "encoder_hidden_states": ehs, "img_ids": _ids(1, 8, 8),
            "txt_ids": _text_ids(16), "timestep": _t(1, 1.0),
            "text_encoder_layers": [ehs[:, :, :32], ehs[:, :, :32]], "return_dict": False}


def _bria_fibo2(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 4, 16, 16), "timestep": _t(1, 0.5), "encoder_hidden_states": _r(1, 2, 6, 24),
            "return_dict": False}


def _cogvideox(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 1, 4, 16, 16), "encoder_hidden_states": _r(2, 8, 8), "timestep": _t(2),
            "return_dict": False}


def _consisid(m: Any) -> dict[str, Any]:
    return {**_cogvideox(m), "id_vit_hidden": [torch.ones(2, 2, 2)], "id_cond": torch.ones(2, 2)}


def _cosmos(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 4, 1, 16, 16), "timestep": _t(1), "encoder_hidden_states": _r(1, 12, 16),
            "attention_mask": torch.ones(1, 12), "fps": 30, "return_dict": False}


def _easyanimate(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 4, 1, 16, 16), "timestep": _t(2), "encoder_hidden_states": _r(2, 16, 16),
            "return_dict": False}


def _ernie_image(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 16, 8, 8), "timestep": _t(1, 1.0), "text_bth": _r(1, 16, 16),
            "text_lens": torch.tensor([16]), "return_dict": False}


def _flux2(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 64, 4), "encoder_hidden_states": _r(1, 16, 32),
            "img_ids": _ids(1, 8, 8, axes=4)[None], "txt_ids": _text_ids(16, axes=4)[None], "timestep": _t(1, 1.0),
            "guidance": _t(1, 1.0), "return_dict": False}


def _flux3(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 64, 4), "encoder_hidden_states": _r(1, 16, 32), "timestep": _t(1, 1.0),
            "img_ids": _ids(1, 8, 8, axes=4), "txt_ids": _text_ids(16, axes=4), "return_dict": False}


def _glm_image(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 4, 16, 16), "encoder_hidden_states": _r(1, 12, 32),
            "prior_token_id": torch.randint(0, 64, (1,)), "prior_token_drop": torch.zeros(1, dtype=torch.bool),
            "timestep": _t(1), "target_size": torch.tensor([[16.0, 16.0]]), "crop_coords": torch.zeros(1, 2),
            "return_dict": False}


def _hidream(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 4, 16, 16), "timesteps": _t(2), "encoder_hidden_states_t5": _r(2, 8, 8),
            "encoder_hidden_states_llama3": _r(2, 2, 8, 4), "pooled_embeds": _r(2, 8), "return_dict": False}


def _hunyuan_video15(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 4, 1, 8, 8), "timestep": _t(1, 1.0), "encoder_hidden_states": _r(1, 6, 16),
            "encoder_hidden_states_2": _r(1, 4, 8), "encoder_attention_mask": torch.ones(1, 6),
            "encoder_attention_mask_2": torch.ones(1, 4), "image_embeds": torch.zeros(1, 3, 12), "return_dict": False}


def _framepack(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 4, 1, 16, 16), "timestep": _t(1), "encoder_hidden_states": _r(1, 12, 16),
            "encoder_attention_mask": torch.ones(1, 12), "pooled_projections": _r(1, 8), "guidance": _t(1, 3.5),
            "image_embeds": _r(1, 12, 16), "indices_latents": torch.arange(1),
            # the history latents (4×, 2×, clean) are prepended to the image tokens: 4 + 16 + 64 tokens
            "latents_clean": _r(1, 4, 1, 16, 16), "indices_latents_clean": torch.arange(1),
            "latents_history_2x": _r(1, 4, 2, 16, 16), "indices_latents_history_2x": torch.arange(2),
            "latents_history_4x": _r(1, 4, 4, 16, 16), "indices_latents_history_4x": torch.arange(4),
            "return_dict": False}


def _ideogram4(m: Any) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    text, side = 4, 8
    seq = text + side * side
    hidden = torch.zeros(1, seq, 16)
    hidden[:, text:] = _r(1, side * side, 16)
    ehs = torch.zeros(1, seq, 24)
    ehs[:, :text] = _r(1, text, 24)
    pos = torch.zeros(1, seq, 3, dtype=torch.long)
    pos[:, :text] = torch.arange(text)[:, None]
    pos[:, text:, 0] = IMAGE_POSITION_OFFSET
    pos[:, text:, 1] = torch.arange(side).repeat_interleave(side) + IMAGE_POSITION_OFFSET
    pos[:, text:, 2] = torch.arange(side).repeat(side) + IMAGE_POSITION_OFFSET
    indicator = torch.full((1, seq), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = LLM_TOKEN_INDICATOR
    return {"hidden_states": hidden, "timestep": torch.tensor([0.5]), "encoder_hidden_states": ehs,
            "position_ids": pos, "segment_ids": torch.ones(1, seq, dtype=torch.long), "indicator": indicator,
            "return_dict": False}


def _joyimage_edit_plus(m: Any) -> dict[str, Any]:
    # already patchified: one (C, pt, ph, pw) patch per token, the (t, h, w) grid of each component in shape_list
    return {"hidden_states": _r(1, 64, 16, 1, 2, 2), "encoder_hidden_states": _r(1, 12, 16),
            "timestep": _t(1, 1.0), "shape_list": [[(1, 8, 8)]], "return_dict": False}


def _kandinsky6_sr(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 2, 16, 16, 9), "timestep": _t(1), "return_dict": False}


def _kandinsky5(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 2, 16, 16, 4), "encoder_hidden_states": _r(1, 6, 8), "timestep": _t(1),
            "pooled_projections": _r(1, 8), "visual_rope_pos": [torch.arange(2), torch.arange(8), torch.arange(8)],
            "text_rope_pos": torch.arange(6), "return_dict": False}


def _kandinsky6(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 2, 16, 16, 9), "encoder_hidden_states": _r(1, 6, 8),
            "pooled_projections": _r(1, 8), "timestep": _t(1), "return_dict": False}


def _krea2(m: Any) -> dict[str, Any]:
    text, side = 4, 8
    pos = torch.zeros(text + side * side, 3)
    pos[text:, 1] = torch.arange(side).repeat_interleave(side).float()
    pos[text:, 2] = torch.arange(side).repeat(side).float()
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False
    return {"hidden_states": _r(1, side * side, 16), "encoder_hidden_states": _r(1, text, 3, 16),
            "timestep": torch.tensor([0.5]), "position_ids": pos, "encoder_attention_mask": mask,
            "return_dict": False}


def _ltx(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 2 * 8 * 8, 4), "encoder_hidden_states": _r(2, 16, 16), "timestep": _t(2),
            "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool), "num_frames": 2, "height": 8, "width": 8,
            "return_dict": False}


def _ltx2(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 2 * 8 * 8, 4), "audio_hidden_states": _r(2, 9, 4),
            "encoder_hidden_states": _r(2, 16, 16), "audio_encoder_hidden_states": _r(2, 16, 16),
            "timestep": _t(2), "encoder_attention_mask": torch.ones(2, 16, dtype=torch.bool), "num_frames": 2,
            "height": 8, "width": 8, "audio_num_frames": 9, "fps": 25.0, "return_dict": False}


def _latte(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 4, 2, 16, 16), "encoder_hidden_states": _r(2, 8, 8), "timestep": _t(2),
            "enable_temporal_attentions": True, "return_dict": False}


def _minimax_h3(m: Any) -> dict[str, Any]:
    text, audio, side = 4, 6, 8
    video = side * side
    seq = text + audio + video
    text_idx, audio_idx = torch.arange(text), torch.arange(text, text + audio)
    video_idx = torch.arange(text + audio, seq)
    tags = torch.empty(seq, dtype=torch.long)
    tags[text_idx], tags[audio_idx], tags[video_idx] = 1, 2, 0
    t_idx = torch.zeros(seq, dtype=torch.long)
    t_idx[audio_idx] = 1
    pos = torch.zeros(seq, 3)
    pos[:, 0] = torch.arange(seq).float()
    pos[video_idx, 1] = torch.arange(side).repeat_interleave(side).float()
    pos[video_idx, 2] = torch.arange(side).repeat(side).float()
    return {"hidden_states": _r(2, video, 16), "audio_hidden_states": _r(2, audio, 6),
            "encoder_hidden_states": _r(2, text, 8), "timestep": torch.tensor([0.7, 0.3]), "timestep_indices": t_idx,
            "token_tags": tags, "position_ids": pos, "video_indices": video_idx, "audio_indices": audio_idx,
            "text_indices": text_idx, "return_dict": False}


def _minimax_music3(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 16, 16), "timestep": _t(2, 0.5), "encoder_hidden_states": _r(2, 16, 32),
            "return_dict": False}


def _omnigen(m: Any) -> dict[str, Any]:
    text, img = 8, 64
    seq = text + 1 + img
    return {"hidden_states": _r(2, 4, 16, 16), "timestep": torch.rand(2),
            "input_ids": torch.randint(0, 10, (2, text)), "input_img_latents": [], "input_image_sizes": {},
            "attention_mask": torch.ones(2, seq, seq), "position_ids": torch.arange(seq)[None].repeat(2, 1),
            "return_dict": False}


def _prx(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 16, 16, 16), "timestep": _t(2, 1.0), "encoder_hidden_states": _r(2, 8, 32),
            "return_dict": False}


def _qwenimage21(m: Any) -> dict[str, Any]:
    text, side = 4, 8
    mask = torch.zeros(1, text + side * side // 4, dtype=torch.bool)
    mask[:, text:] = True
    return {"hidden_states": _r(1, side * side, 4), "encoder_hidden_states": _r(1, text, 8),
            "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long), "timestep": _t(1, 1.0),
            "img_shapes": [[(1, side, side)]], "img_mask": mask, "return_dict": False}


def _sana_wm(m: Any) -> dict[str, Any]:
    frames, side = 2, 8
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames).float() * 0.1
    intr = torch.tensor([float(side), float(side), side / 2, side / 2]).expand(1, frames, 4)
    return {"hidden_states": _r(1, 4, frames, side, side), "timestep": torch.full((1, 1, frames), 500.0),
            "encoder_hidden_states": _r(1, 1, 16, 8), "encoder_attention_mask": torch.ones(1, 16, dtype=torch.long),
            "camera_conditions": torch.cat([c2w.flatten(-2), intr], -1),
            "chunk_plucker": _r(1, 8, frames, side, side), "return_dict": False}


def _sana_wm_refiner(m: Any) -> dict[str, Any]:
    frames, side, tokens = 2, 8, 2 * 8 * 8
    rope = m.build_rotary_emb_for_absolute_positions(batch_size=2, frame_positions=list(range(frames)), height=side,
                                                     width=side, device=torch.device("cpu"), fps=24.0)
    return {"hidden_states": _r(2, tokens, 4), "encoder_hidden_states": _r(2, 8, 16),
            "timestep": torch.rand(2, tokens) * 1000, "video_rotary_emb": rope,
            "encoder_attention_mask": torch.ones(2, 8), "return_dict": False}


def _temporal(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(2, 4, 8, 8), "timestep": _t(2), "num_frames": 2, "return_dict": False}


def _wan_animate(m: Any) -> dict[str, Any]:
    frames = 4
    return {"hidden_states": _r(1, 12, frames + 1, 16, 16), "timestep": _t(1),
            "encoder_hidden_states": _r(1, 12, 16), "encoder_hidden_states_image": _r(1, 12, 16),
            "pose_hidden_states": _r(1, 4, frames, 16, 16), "face_pixel_values": _r(1, 3, 13, 16, 16),
            "return_dict": False}


def _wan_animate_2(m: Any) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    frames, side = 2, 16  # the reference pass ("extract"): dense self-attention over 2 × 8 × 8 patches
    return {"hidden_states": [_r(16, frames, side, side)], "timestep": torch.tensor([1.0]),
            "encoder_hidden_states": [_r(8, 32)], "condition_latents": [_r(20, frames, side, side)],
            "encoder_hidden_states_image": _r(1, 4, 1280), "kv_cache": WanAnimate2KVCache(2),
            "kv_cache_mode": "extract", "seq_len": frames * (side // 2) ** 2,
            "offset_grid_sizes": torch.tensor([[frames, side // 2, side // 2]]), "return_dict": False}


def _wan_vace(m: Any) -> dict[str, Any]:
    return {"hidden_states": _r(1, 16, 2, 16, 16), "encoder_hidden_states": _r(1, 12, 32),
            "control_hidden_states": _r(1, 48, 2, 16, 16), "timestep": _t(1), "return_dict": False}


def _z_image(m: Any) -> dict[str, Any]:
    return {"x": [_r(16, 1, 16, 16)], "cap_feats": [_r(16, 16)], "t": torch.tensor([0.5]), "return_dict": False}


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

_T = "tests/models/transformers/test_models_transformer_{}.py"

IMG = (1, 8, 8)
VID = (2, 8, 8)

CASES: dict[str, Case] = {
    # -- classes the generic path builds; the case states the layout of the generic inputs --------------------
    "AllegroTransformer3DModel": Case(grid=VID),  # 2 latent frames, patch (1, 2, 2)
    "AuraFlowTransformer2DModel": Case(grid=IMG, text="before"),  # [register + text, image]
    "BriaTransformer2DModel": Case(grid=IMG, text="before"),
    "ChromaTransformer2DModel": Case(grid=IMG, text="before"),
    "ChronoEditTransformer3DModel": Case(grid=VID),
    "CogView3PlusTransformer2DModel": Case(grid=IMG, text="before"),
    "CogView4Transformer2DModel": Case(grid=IMG, text="before"),
    "DiTTransformer2DModel": Case(grid=IMG),
    "DreamLiteTransformer2DModel": Case(grid=(1, 16, 16)),  # patch-free (conv in/out): one token per latent pixel
    "FluxTransformer2DModel": Case(grid=IMG, text="before"),
    "HeliosTransformer3DModel": Case(grid=VID),
    "HunyuanImageTransformer2DModel": Case(grid=(1, 16, 16), text="after"),  # patch 1
    "HunyuanVideoTransformer3DModel": Case(grid=VID, text="after"),
    "JoyImageEditTransformer3DModel": Case(grid=VID, text="after"),
    "LongCatImageTransformer2DModel": Case(grid=IMG, text="before"),
    "Lumina2Transformer2DModel": Case(grid=IMG, text="before"),
    "MochiTransformer3DModel": Case(grid=VID, text="after"),  # 2 latent frames, patched per frame
    "MotifVideoTransformer3DModel": Case(grid=VID, text="after"),
    "NucleusMoEImageTransformer2DModel": Case(grid=IMG, text="after", joint_kv=True),  # [image, text] keys
    "OvisImageTransformer2DModel": Case(grid=IMG, text="before"),
    "PixArtTransformer2DModel": Case(grid=IMG),
    "QwenImageTransformer2DModel": Case(grid=IMG, text="before"),
    "SD3Transformer2DModel": Case(grid=IMG, text="after"),
    "SanaTransformer2DModel": Case(grid=(1, 16, 16)),  # patch 1
    "SanaVideoTransformer3DModel": Case(grid=VID),
    "SkyReelsV2Transformer3DModel": Case(grid=VID),
    "Transformer2DModel": Case(grid=(1, 16, 16)),  # continuous input: one token per latent pixel
    "WanTransformer3DModel": Case(grid=VID),
    # -- classes built from the diffusers tests' configurations -------------------------------------------------
    "AceStepTransformer1DModel": Case(
        init={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "in_channels": 24, "audio_acoustic_hidden_dim": 8,
              "patch_size": 2, "sliding_window": 16},
        inputs=_ace_step, grid=None, source=_T.format("ace_step")),
    "AnyFlowTransformer3DModel": Case(
        init={"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
              "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2,
              "cross_attn_norm": True, "rope_max_seq_len": 32, "gate_value": 0.25, "deltatime_type": "r"},
        inputs=_anyflow, grid=VID, source=_T.format("anyflow")),
    "AnyFlowFARTransformer3DModel": Case(
        init={"patch_size": (1, 2, 2), "compressed_patch_size": (1, 4, 4), "full_chunk_limit": 3,
              "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
              "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
              "rope_max_seq_len": 32, "gate_value": 0.25, "deltatime_type": "r"},
        inputs=_anyflow_far, grid=None, source=_T.format("anyflow_far"),
        notes=("frame chunks at two patch sizes under a block-causal FlexAttention mask: no single token grid",)),
    "BriaFiboTransformer2DModel": Case(
        init={"patch_size": 1, "in_channels": 48, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 64, "text_encoder_dim": 32,
              "pooled_projection_dim": None, "axes_dims_rope": [0, 4, 4]},
        inputs=_bria_fibo, grid=IMG, text="before", source=_T.format("bria_fibo")),
    "BriaFibo2Transformer2DModel": Case(
        init={"in_channels": 4, "patch_size": 2, "dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
              "cap_feat_dim": 24, "injection_layer_ids": (1,), "perceiver_num_layers": 1, "min_num_gist_tokens": 4,
              "max_num_gist_tokens": 8, "gist_step": 4, "gist_min_text_len": 4, "gist_max_text_len": 16,
              "axes_dims": (4, 6, 6), "axes_lens": (16, 16, 16)},
        inputs=_bria_fibo2, grid=IMG, text="after", image_start=8, source=_T.format("bria_fibo2"),
        notes=("one stream [8 gist tokens (6 text tokens), image, context]",)),
    "CogVideoXTransformer3DModel": Case(
        init={"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
              "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 2, "sample_width": 16, "sample_height": 16,
              "sample_frames": 1, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8},
        inputs=_cogvideox, grid=IMG, text="before", source=_T.format("cogvideox")),
    "ConsisIDTransformer3DModel": Case(
        init={"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
              "time_embed_dim": 2, "text_embed_dim": 8, "num_layers": 1, "sample_width": 16, "sample_height": 16,
              "sample_frames": 1, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8,
              "cross_attn_interval": 1, "is_kps": False, "is_train_face": True, "cross_attn_dim_head": 1,
              "cross_attn_num_heads": 1, "LFE_id_dim": 2, "LFE_vit_dim": 2, "LFE_depth": 5, "LFE_dim_head": 8,
              "LFE_num_heads": 2, "LFE_num_id_token": 1, "LFE_num_querie": 1, "LFE_output_dim": 10,
              "LFE_ff_mult": 1, "LFE_num_scale": 1},
        inputs=_consisid, grid=IMG, text="before", source=_T.format("consisid")),
    "CosmosTransformer3DModel": Case(
        init={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12,
              "num_layers": 2, "mlp_ratio": 2, "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32),
              "patch_size": (1, 2, 2), "rope_scale": (2.0, 1.0, 1.0), "concat_padding_mask": False,
              "extra_pos_embed_type": "learnable"},
        inputs=_cosmos, grid=IMG, source=_T.format("cosmos"),
        notes=("concat_padding_mask off: resizing the padding mask needs torchvision, which is not installed",)),
    "EasyAnimateTransformer3DModel": Case(
        init={"attention_head_dim": 16, "num_attention_heads": 2, "in_channels": 4, "mmdit_layers": 2,
              "num_layers": 2, "out_channels": 4, "patch_size": 2, "sample_height": 60, "sample_width": 90,
              "text_embed_dim": 16, "time_embed_dim": 8, "time_position_encoding_type": "3d_rope",
              "timestep_activation_fn": "silu"},
        inputs=_easyanimate, grid=IMG, text="before", source=_T.format("easyanimate")),
    "ErnieImageTransformer2DModel": Case(
        init={"hidden_size": 16, "num_attention_heads": 1, "num_layers": 2, "ffn_hidden_size": 16,
              "in_channels": 16, "out_channels": 16, "patch_size": 1, "text_in_dim": 16, "rope_theta": 256,
              "rope_axes_dim": (8, 4, 4), "eps": 1e-6, "qk_layernorm": True},
        inputs=_ernie_image, grid=IMG, text="after", source=_T.format("ernie_image")),
    "Flux2Transformer2DModel": Case(
        init={"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 256,
              "axes_dims_rope": [4, 4, 4, 4]},
        inputs=_flux2, grid=IMG, text="before", source=_T.format("flux2")),
    "Flux3Transformer2DModel": Case(
        init={"in_channels": 4, "cond_in_channels": 4, "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
              "axes_dims_rope": (4, 4, 4, 4)},
        inputs=_flux3, grid=IMG, text="before", source=_T.format("flux2") + " (Flux 2's sizes; same id layout)"),
    "GlmImageTransformer2DModel": Case(
        init={"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 8,
              "num_attention_heads": 2, "text_embed_dim": 32, "time_embed_dim": 16, "condition_dim": 8,
              "prior_vq_quantizer_codebook_size": 64},
        inputs=_glm_image, grid=IMG, text="before", source=_T.format("glm_image")),
    "HiDreamImageTransformer2DModel": Case(
        init={"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
              "attention_head_dim": 8, "num_attention_heads": 4, "caption_channels": [8, 4], "text_emb_dim": 8,
              "num_routed_experts": 2, "num_activated_experts": 2, "axes_dims_rope": (4, 2, 2),
              "max_resolution": (32, 32), "llama_layers": (0, 1), "force_inference_output": True},
        inputs=_hidream, grid=IMG, text="after", latent="hidden_states", source=_T.format("hidream")),
    "HunyuanVideo15Transformer3DModel": Case(
        init={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
              "num_layers": 2, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1,
              "text_embed_dim": 16, "text_embed_2_dim": 8, "image_embed_dim": 12, "rope_axes_dim": (2, 2, 4),
              "target_size": 16, "task_type": "t2v"},
        inputs=_hunyuan_video15, grid=IMG, text="after", source=_T.format("hunyuan_1_5")),
    "HunyuanVideoFramepackTransformer3DModel": Case(
        init={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10,
              "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1,
              "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4),
              "image_condition_type": None, "has_image_proj": True, "image_proj_dim": 16,
              "has_clean_x_embedder": True},
        inputs=_framepack, grid=IMG, text="after", image_start=4 + 16 + 64,
        source=_T.format("hunyuan_video_framepack"),
        notes=("sequence [4× history, 2× history, clean latents, image, text]",)),
    "Ideogram4Transformer2DModel": Case(
        init={"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
              "intermediate_size": 32, "adaln_dim": 16, "llm_features_dim": 24, "rope_theta": 10_000,
              "mrope_section": (2, 1, 1), "norm_eps": 1e-5},
        inputs=_ideogram4, grid=IMG, text="before", source=_T.format("ideogram4")),
    "JoyImageEditPlusTransformer3DModel": Case(
        init={"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2,
              "text_dim": 16, "num_layers": 2, "rope_dim_list": [4, 6, 6], "theta": 256},
        inputs=_joyimage_edit_plus, grid=IMG, text="after", source=_T.format("joyimage_edit_plus")),
    "Kandinsky5Transformer3DModel": Case(
        init={"in_visual_dim": 4, "in_text_dim": 8, "in_text_dim2": 8, "time_dim": 16, "out_visual_dim": 4,
              "patch_size": (1, 2, 2), "model_dim": 48, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 2,
              "axes_dims": (4, 4, 4)},
        inputs=_kandinsky5, grid=VID, source=_T.format("kandinsky6") + " (Kandinsky 6's sizes; no Kandinsky 5 test)"),
    "Kandinsky6SRTransformer3DModel": Case(
        init={"in_visual_dim": 4, "out_visual_dim": 8, "time_dim": 16, "patch_size": (1, 2, 2), "model_dim": 24,
              "ff_dim": 32, "num_visual_blocks": 2, "axes_dims": (4, 4, 4)},
        inputs=_kandinsky6_sr, grid=VID, source=_T.format("kandinsky6_sr")),
    "Kandinsky6Transformer3DModel": Case(
        init={"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 8, "in_text_dim2": 8, "time_dim": 16,
              "patch_size": (1, 2, 2), "model_dim": 48, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 2,
              "axes_dims": (4, 4, 4), "visual_cond": True, "in_audio_dim": 4, "out_audio_dim": 4},
        inputs=_kandinsky6, grid=VID, source=_T.format("kandinsky6")),
    "Krea2Transformer2DModel": Case(
        init={"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 32, "timestep_embed_dim": 8, "text_hidden_dim": 16,
              "num_text_layers": 3, "text_num_attention_heads": 2, "text_num_key_value_heads": 1,
              "text_intermediate_size": 16, "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1,
              "axes_dims_rope": (4, 2, 2), "rope_theta": 1000.0, "norm_eps": 1e-5},
        inputs=_krea2, grid=IMG, text="before", source=_T.format("krea2")),
    "LTXVideoTransformer3DModel": Case(
        init={"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
              "cross_attention_dim": 16, "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16},
        inputs=_ltx, grid=VID, source=_T.format("ltx")),
    "LTX2VideoTransformer3DModel": Case(
        init={"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
              "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4,
              "audio_num_attention_heads": 2, "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8,
              "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16,
              "rope_double_precision": False},
        inputs=_ltx2, grid=VID, source=_T.format("ltx2")),
    "LatteTransformer3DModel": Case(
        init={"sample_size": 16, "num_layers": 2, "patch_size": 2, "attention_head_dim": 8,
              "num_attention_heads": 2, "caption_channels": 8, "in_channels": 4, "cross_attention_dim": 16,
              "out_channels": 8, "attention_bias": True, "activation_fn": "gelu-approximate",
              "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
              "norm_eps": 1e-6, "video_length": 2},
        inputs=_latte, grid=IMG, source=_T.format("latte"),
        notes=("spatial attention runs per frame over the 8×8 grid; temporal attention over the frames",)),
    "MiniMaxH3Transformer3DModel": Case(
        init={"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 24, "num_layers": 2,
              "num_refiner_layers": 1, "ffn_dim": 32, "in_channels": 4, "audio_in_channels": 6,
              "patch_size": (1, 2, 2), "text_dim": 8, "freq_dim": 8, "time_embed_hidden_dim": 24,
              "time_embed_dim": 16, "rope_freq_dim": 2},
        inputs=_minimax_h3, grid=IMG, text="before", source=_T.format("minimax_h3"),
        notes=("packed [text, audio, video] rows: the non-image tokens (text and audio) sit before the video",)),
    "MiniMaxMusic3Transformer1DModel": Case(
        init={"in_channels": 16, "condition_dim": 32, "num_layers": 2, "num_attention_heads": 2,
              "attention_head_dim": 16, "ff_inner_dim": 64, "rotary_dim": 8, "fourier_embedding_dim": 16},
        inputs=_minimax_music3, grid=None, source=_T.format("minimax_music3")),
    "OmniGenTransformer2DModel": Case(
        init={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 32,
              "num_layers": 2, "pad_token_id": 0, "vocab_size": 1000, "in_channels": 4, "time_step_dim": 4,
              "rope_scaling": {"long_factor": [1, 2, 3, 4], "short_factor": [1, 2, 3, 4]}},
        inputs=_omnigen, grid=IMG, text="before", source=_T.format("omnigen"),
        notes=("sequence [text, time token, image]",)),
    "PRXTransformer2DModel": Case(
        init={"in_channels": 16, "patch_size": 2, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.5,
              "num_heads": 2, "depth": 2, "axes_dim": [16, 16], "theta": 10_000},
        inputs=_prx, grid=IMG, text="before", joint_kv=True,
        source=_T.format("prx") + " (hidden 1792 there, 64 here)",
        notes=("image queries over [text, image] keys",)),
    "QwenImage21Transformer2DModel": Case(
        init={"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 2, "context_in_dim": 8, "mlp_ratio": 2, "axes_dims_rope": (4, 6, 6)},
        inputs=_qwenimage21, grid=IMG, text="before", source=_T.format("qwenimage21")),
    "SanaWMTransformer3DModel": Case(
        init={"in_channels": 4, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
              "patch_size": (1, 1, 1), "softmax_every_n": 2, "linear_head_dim": 16, "t_kernel_size": 3,
              "conv_kernel_size": 4, "caption_channels": 8, "mlp_ratio": 2.0,
              "chunk_plucker_channels": 8, "chunk_plucker_post_attn_blocks": 2},
        inputs=_sana_wm, grid=VID, source=_T.format("sana_wm")),
    "SanaWMLTX2RefinerTransformer3DModel": Case(
        init={"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
              "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4,
              "audio_num_attention_heads": 2, "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8,
              "num_layers": 2, "qk_norm": "rms_norm_across_heads", "caption_channels": 16,
              "rope_double_precision": False},
        inputs=_sana_wm_refiner, grid=VID, source=_T.format("sana_wm_refiner")),
    "TransformerTemporalModel": Case(
        init={"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "num_layers": 1,
              "norm_num_groups": 1},
        inputs=_temporal, grid=None, source=_T.format("temporal"),
        notes=("attention runs along the frames of each pixel: no image token grid",)),
    "WanAnimateTransformer3DModel": Case(
        init={"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 12,
              "latent_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 256, "ffn_dim": 32,
              "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "image_dim": 16,
              "rope_max_seq_len": 32, "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16},
              "motion_encoder_size": 16, "motion_style_dim": 8, "motion_dim": 4, "motion_encoder_dim": 16,
              "face_encoder_hidden_dim": 16, "face_encoder_num_heads": 2, "inject_face_latents_blocks": 2},
        inputs=_wan_animate, grid=(5, 8, 8), source=_T.format("wan_animate")),
    "WanAnimate2Transformer3DModel": Case(
        init={"patch_size": (1, 2, 2), "text_len": 16, "in_dim": 36, "dim": 64, "ffn_dim": 128, "freq_dim": 64,
              "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2, "cross_attn_norm": True,
              "use_img_emb": True},
        inputs=_wan_animate_2, grid=VID, source=_T.format("wan_animate_2") + " (dim 128 there, 64 here)"),
    "WanVACETransformer3DModel": Case(
        init={"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
              "out_channels": 16, "text_dim": 32, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2,
              "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
              "vace_layers": [0, 1], "vace_in_channels": 48},
        inputs=_wan_vace, grid=VID, source=_T.format("wan_vace")),
    "ZImageTransformer2DModel": Case(
        init={"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 32, "n_layers": 2,
              "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 16,
              "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32]},
        inputs=_z_image, grid=IMG, text="after", latent="x", source=_T.format("z_image")),
}
