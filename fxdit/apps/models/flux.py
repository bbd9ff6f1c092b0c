"""The shipped Flux demo model: a tiny class-conditional diffusers ``FluxTransformer2DModel`` on the digits.

The transformer works in pixel space on ``32x32`` one-channel images (the 8x8 digits upsampled, as for the demo
DiT). Images are packed the way diffusers' Flux pipeline packs latents: every ``2x2`` patch becomes one token of
``4`` channels, so an image is ``16x16 = 256`` tokens ``(B, 256, 4)``, with ``img_ids`` ``(256, 3)`` holding
``(0, row, col)`` per token.

The digit class reaches the model as text-to-image models receive a prompt: :class:`DigitTextEncoder`, a small
learned table, gives each class (and the null class ``10`` used by classifier-free guidance) ``text_tokens``
"text tokens" of width ``joint_attention_dim`` (``encoder_hidden_states``) and one ``pooled_projection_dim``
vector (``pooled_projections``). The text tokens sit in front of the image tokens in every block's joint
attention (Flux's ``[text, image]`` order), with ``txt_ids`` all zero.

The model is trained with flow matching (rectified flow, ``x_σ = (1 − σ)·x_0 + σ·ε``, target ``v = ε − x_0``) by
``tools/train_flux_demo.py`` and sampled by :mod:`fxdit.apps.flow_sampler` with diffusers'
``FlowMatchEulerDiscreteScheduler``; ``timestep`` is ``σ`` (the model multiplies it by 1000 itself).

Shipped folder ``fxdit/apps/data/demo_flux/``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (the
transformer, fp16, ``save_pretrained``), ``text_encoder/`` (the class table, same layout), ``scheduler_config.json``
and ``training_info.json``.

Example::

    from fxdit.apps.models import flux
    loaded = flux.load_flux_demo()
    ehs, pooled = loaded.text_encoder(torch.tensor([3, 10]))
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxdit.errors import FxditError

__all__ = [
    "DEMO_FLUX_DIR",
    "NUM_CLASSES",
    "NULL_CLASS",
    "PACK",
    "DigitTextEncoder",
    "FluxDemo",
    "image_ids",
    "load_flux_demo",
    "pack",
    "scheduler_config",
    "text_ids",
    "transformer_config",
    "unpack",
]

log = logging.getLogger(__name__)

#: The shipped folder (package data).
DEMO_FLUX_DIR = Path(__file__).resolve().parent.parent / "data" / "demo_flux"

NUM_CLASSES = 10
#: The class index meaning "no class" (the unconditional half of classifier-free guidance).
NULL_CLASS = NUM_CLASSES
#: Pixels per side of one packed token (diffusers' Flux pipeline packs 2x2 latent patches).
PACK = 2


def transformer_config() -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of the demo model: hidden 128 (4 heads x 32), 2 double-stream and
    4 single-stream blocks, 4 input channels (a packed 2x2 patch of one-channel pixels), no guidance embedding
    (guidance is real classifier-free guidance), RoPE axes 8 + 12 + 12 = head dim."""
    return dict(
        patch_size=1,
        in_channels=PACK * PACK,
        out_channels=None,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def scheduler_config() -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config the demo model is sampled with (shift 1: σ spaced
    linearly from 1 to 0)."""
    return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


class DigitTextEncoder(nn.Module):
    """The class "prompt": ``text_tokens`` learned token embeddings and one pooled vector per class.

    Args:
        num_classes: real classes; index ``num_classes`` is the null class.
        text_tokens: tokens per class (``encoder_hidden_states`` length).
        text_dim: token width (the transformer's ``joint_attention_dim``).
        pooled_dim: pooled vector width (the transformer's ``pooled_projection_dim``).

    Raises:
        ValueError: for a non-positive size.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, text_tokens: int = 4, text_dim: int = 64,
                 pooled_dim: int = 64) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("text_tokens", text_tokens), ("text_dim", text_dim),
                            ("pooled_dim", pooled_dim)):
            if int(value) < 1:
                raise ValueError(f"{name}={value}; expected an integer >= 1")
        self.num_classes = int(num_classes)
        self.text_tokens = int(text_tokens)
        self.text_dim = int(text_dim)
        self.pooled_dim = int(pooled_dim)
        self.tokens = nn.Embedding(self.num_classes + 1, self.text_tokens * self.text_dim)
        self.pooled = nn.Embedding(self.num_classes + 1, self.pooled_dim)
        nn.init.normal_(self.tokens.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    def config(self) -> dict[str, int]:
        """The constructor arguments (what ``config.json`` of the saved folder holds)."""
        return dict(num_classes=self.num_classes, text_tokens=self.text_tokens, text_dim=self.text_dim,
                    pooled_dim=self.pooled_dim)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states (B, text_tokens, text_dim), pooled_projections (B, pooled_dim))`` of labels
        ``(B,)`` in ``[0, num_classes]``."""
        ehs = self.tokens(labels).view(labels.shape[0], self.text_tokens, self.text_dim)
        return ehs, self.pooled(labels)

    def save(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (fp16) to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: str | Path) -> DigitTextEncoder:
        """Load what :meth:`save` wrote, as fp32 in eval mode.

        Raises:
            FxditError: when the folder lacks its files.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FxditError(f"text_encoder={str(folder)!r}: expected config.json and model.safetensors there")
        enc = cls(**json.loads((folder / "config.json").read_text()))
        enc.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()})
        return enc.eval().requires_grad_(False)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → tokens ``(B, (H/2)·(W/2), C·4)``, row-major over the 2x2 patches (the Flux pipeline's
    ``_pack_latents``)."""
    b, c, h, w = images.shape
    if h % PACK or w % PACK:
        raise FxditError(f"images: shape {tuple(images.shape)}; expected H and W divisible by {PACK}")
    x = images.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: tokens ``(B, N, C·4)`` → ``(B, C, height, width)``."""
    b, n, d = tokens.shape
    c = d // (PACK * PACK)
    x = tokens.view(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, *, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """``img_ids`` ``(H/2·W/2, 3)``: ``(0, row·scale + offset, col·scale + offset)`` per packed token.

    ``scale``/``offset`` let a lower-resolution image use the coordinates of the full-resolution grid (training
    at 16x16 uses ``scale=2, offset=0.5``: each token's centre in 32x32 token units).
    """
    gh, gw = height // PACK, width // PACK
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh, dtype=torch.float32)[:, None] * scale + offset
    ids[..., 2] = torch.arange(gw, dtype=torch.float32)[None, :] * scale + offset
    return ids.reshape(gh * gw, 3)


def text_ids(tokens: int) -> torch.Tensor:
    """``txt_ids`` ``(tokens, 3)``: all zero, as in diffusers' Flux pipeline."""
    return torch.zeros(tokens, 3)


@dataclass
class FluxDemo:
    """The loaded demo model.

    Attributes:
        transformer: the ``FluxTransformer2DModel``, eval mode.
        text_encoder: the class table (:class:`DigitTextEncoder`), eval mode.
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        image_size: ``(H, W)`` of a sample in pixels.
        channels: pixel channels.
        source: the folder it came from.
        info: ``training_info.json`` when present.
    """

    transformer: nn.Module
    text_encoder: DigitTextEncoder
    scheduler: Any
    image_size: tuple[int, int] = (32, 32)
    channels: int = 1
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def load_flux_demo(folder: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> FluxDemo:
    """Load the shipped Flux demo model (or a folder ``tools/train_flux_demo.py`` wrote).

    Raises:
        FxditError: when the folder or one of its parts is missing.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    path = Path(folder) if folder is not None else DEMO_FLUX_DIR
    if not (path / "config.json").is_file():
        raise FxditError(f"folder={str(path)!r} has no config.json; expected a folder written by "
                         "tools/train_flux_demo.py (the package may have been installed without its data files)")
    transformer = FluxTransformer2DModel.from_pretrained(path, torch_dtype=dtype).eval().requires_grad_(False)
    text_encoder = DigitTextEncoder.load(path / "text_encoder").to(dtype)
    if (path / "scheduler_config.json").is_file():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config())
    info = json.loads((path / "training_info.json").read_text()) if (path / "training_info.json").is_file() else {}
    size = int(info.get("image_size", 32))
    channels = int(transformer.config.in_channels) // (PACK * PACK)
    return FluxDemo(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler, image_size=(size, size),
                    channels=channels, source=str(path), info=info)
