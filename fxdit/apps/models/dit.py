"""A small, plain DiT (Peebles & Xie 2023) used as the reference model of fxdit's tests, benchmarks and demo.

Structure, per forward ``(x, t, y[, text]) -> (B, out_channels, *spatial)``:

- patch embedding: ``Conv2d`` (images, ``input_size=(H, W)``) or ``Conv3d`` (videos, ``input_size=(T, H, W)``),
  kernel = stride = patch, then ``flatten(2).transpose(1, 2)`` to tokens ``(B, N, hidden)`` in row-major
  ``(T, H, W)`` order;
- a fixed 2-D / 3-D sin-cos positional embedding (a buffer, not a parameter);
- conditioning ``c = t_embedder(t) + y_embedder(y)``: sinusoidal timestep features through
  ``Linear → SiLU → Linear``; a class-embedding table with one extra row (index ``num_classes``) as the null
  class for classifier-free guidance;
- ``depth`` adaLN-Zero blocks: ``adaLN_modulation = Sequential(SiLU, Linear(hidden, 6 * hidden))`` gives
  shift/scale/gate for attention and MLP; ``LayerNorm(elementwise_affine=False)``; attention with one fused
  ``qkv = Linear(hidden, 3 * hidden)`` reshaped to ``(B, heads, S, head_dim)`` and ``proj = Linear(hidden, hidden)``;
  MLP ``fc1 → GELU(tanh) → fc2``;
- final layer: adaLN (``Linear(hidden, 2 * hidden)``), ``Linear(hidden, patch_volume * out_channels)``, then
  unpatchify (reshape / permute / reshape back to the image or video).

Optional joint text tokens (SD3 / Flux style): with ``text_tokens > 0`` the forward takes ``text`` of shape
``(B, text_tokens, text_dim)``; ``text_proj`` maps it to ``hidden`` once, and inside every block the normalised
text tokens are concatenated with the modulated image tokens (``text_position`` "before" or "after") before the
``qkv`` projection. After attention the joint output is split and only the image part continues through the
block; the text tokens are the same in every block.

The attention form is selectable so the analysis can be tested on every call form it claims to know:
``"sdpa"`` calls ``F.scaled_dot_product_attention(q, k, v)`` positionally; ``"unfused"`` computes
``softmax(q @ k^T * scale) @ v``; ``"unfused_prescaled"`` computes ``softmax((q * scale) @ k^T) @ v``.
The three give the same output for the same weights.

Weights use PyTorch's default initialisation (seed before building); ``zero_init=True`` gives the paper's
adaLN-Zero initialisation (zero modulation and output layers) for training from scratch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxdit.errors import FxditError

__all__ = ["DiT", "DiTConfig", "ATTENTION_FORMS", "TEXT_POSITIONS", "BLOCK_LINEAR_ROLES", "block_linear_roles",
           "set_lowrank_block_weights", "sincos_pos_embed"]

log = logging.getLogger(__name__)

ATTENTION_FORMS = ("sdpa", "unfused", "unfused_prescaled")
TEXT_POSITIONS = ("before", "after")


def _bad(name: str, value: object, expected: str) -> FxditError:
    return FxditError(f"DiTConfig.{name}={value!r}; expected {expected}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DiTConfig:
    """Configuration of the reference :class:`DiT`.

    Args:
        depth: number of transformer blocks.
        hidden: hidden size; a multiple of ``heads``, of 4 for 2-D grids and of 2 for 3-D grids (sin-cos).
        heads: attention heads.
        patch: patch size; an int (spatial, and 1 in time for videos) or one int per grid axis.
        input_size: ``(H, W)`` for images or ``(T, H, W)`` for videos, in latent pixels; divisible by the patch.
        in_channels: latent channels.
        num_classes: class labels (0 disables class conditioning; ``y`` may then be ``None``).
        attention: ``"sdpa"``, ``"unfused"`` or ``"unfused_prescaled"``.
        mlp_ratio: MLP hidden size / hidden size.
        learn_sigma: if True the output has ``2 * in_channels`` channels (mean and variance).
        text_tokens: number of joint text tokens (0: none).
        text_dim: feature size of the ``text`` input (default: ``hidden``).
        text_position: whether text tokens go ``"before"`` or ``"after"`` the image tokens in the joint sequence.
        zero_init: adaLN-Zero initialisation (zero modulation and final projection) instead of random weights.

    Raises:
        FxditError: (a ``ValueError``) naming the field when a value is invalid.
    """

    depth: int = 2
    hidden: int = 64
    heads: int = 4
    patch: int | tuple[int, ...] = 2
    input_size: tuple[int, ...] = (16, 16)
    in_channels: int = 4
    num_classes: int = 10
    attention: str = "sdpa"
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    text_tokens: int = 0
    text_dim: int | None = None
    text_position: str = "before"
    zero_init: bool = False

    def __post_init__(self) -> None:
        for name in ("depth", "hidden", "heads", "in_channels"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise _bad(name, v, "an integer >= 1")
        for name in ("num_classes", "text_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise _bad(name, v, "an integer >= 0")
        if self.hidden % self.heads:
            raise _bad("hidden", self.hidden, f"a multiple of heads={self.heads}")
        size = self.input_size
        if isinstance(size, (str, bytes)) or not hasattr(size, "__iter__"):
            raise _bad("input_size", size, "(H, W) or (T, H, W)")
        size = tuple(size)
        if len(size) not in (2, 3) or not all(_is_int(s) and s >= 1 for s in size):
            raise _bad("input_size", self.input_size, "(H, W) or (T, H, W) of integers >= 1")
        object.__setattr__(self, "input_size", size)
        patch = self.patch
        if _is_int(patch):
            patch = (patch,) * 2 if len(size) == 2 else (1, patch, patch)
        elif isinstance(patch, (tuple, list)):
            patch = tuple(patch)
        else:
            raise _bad("patch", self.patch, "an integer or one integer per input_size axis")
        if len(patch) != len(size) or not all(_is_int(p) and p >= 1 for p in patch):
            raise _bad("patch", self.patch, f"an integer >= 1 or {len(size)} integers >= 1")
        if not _is_int(self.patch):
            object.__setattr__(self, "patch", patch)
        if any(s % p for s, p in zip(size, patch)):
            raise _bad("input_size", self.input_size, f"divisible by the patch {patch}")
        if len(size) == 2 and self.hidden % 4:
            raise _bad("hidden", self.hidden, "a multiple of 4 for the 2-D sin-cos embedding")
        if len(size) == 3 and (self.hidden % 2 or self.hidden < 8):
            raise _bad("hidden", self.hidden, "an even integer >= 8 for the 3-D sin-cos embedding")
        if self.attention not in ATTENTION_FORMS:
            raise _bad("attention", self.attention, f"one of {ATTENTION_FORMS}")
        if self.text_position not in TEXT_POSITIONS:
            raise _bad("text_position", self.text_position, f"one of {TEXT_POSITIONS}")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or self.mlp_ratio <= 0:
            raise _bad("mlp_ratio", self.mlp_ratio, "a number > 0")
        if int(self.hidden * self.mlp_ratio) < 1:
            raise _bad("mlp_ratio", self.mlp_ratio, "a ratio giving an MLP width >= 1")
        if self.text_dim is not None and (not _is_int(self.text_dim) or self.text_dim < 1):
            raise _bad("text_dim", self.text_dim, "an integer >= 1 or None")
        if not isinstance(self.learn_sigma, bool):
            raise _bad("learn_sigma", self.learn_sigma, "a bool")
        if not isinstance(self.zero_init, bool):
            raise _bad("zero_init", self.zero_init, "a bool")

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The patch per axis of ``input_size``."""
        if _is_int(self.patch):
            return (self.patch,) * 2 if len(self.input_size) == 2 else (1, self.patch, self.patch)
        return tuple(self.patch)

    @property
    def grid(self) -> tuple[int, int, int]:
        """The token grid ``(T, H, W)`` (``T == 1`` for images)."""
        g = tuple(s // p for s, p in zip(self.input_size, self.patch_size))
        return (1, *g) if len(g) == 2 else g  # type: ignore[return-value]

    @property
    def tokens(self) -> int:
        """Image/video tokens per sample."""
        t, h, w = self.grid
        return t * h * w

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed(hidden: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Fixed sin-cos positional embedding ``(prod(grid), hidden)`` for a 2-D ``(H, W)`` or 3-D ``(T, H, W)`` grid.

    2-D: half the channels encode the row, half the column (as in DiT). 3-D: the two spatial axes get
    ``2 * (hidden // 6)`` channels each (rounded down to even) and time gets the rest.

    Args:
        hidden: embedding size.
        grid: token grid, row-major order of the tokens.
    """
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    if len(grid) == 2:
        dims = [hidden // 2, hidden // 2]
    else:
        d_s = (hidden // 3) // 2 * 2
        dims = [hidden - 2 * d_s, d_s, d_s]
    parts = [_sincos_1d(d, c) for d, c in zip(dims, coords)]
    return torch.cat(parts, dim=1).to(torch.float32)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (``freq_dim``) followed by ``Linear → SiLU → Linear``."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.reshape(-1).float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        weight = self.mlp[0].weight
        if emb.dtype != weight.dtype:  # fp16/bf16 models: the features are computed in fp32
            emb = emb.to(weight.dtype)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Class embedding table with a null class (index ``num_classes``) for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and the selected call form."""

    def __init__(self, hidden: int, heads: int, form: str) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.scale = self.head_dim**-0.5
        self.form = form
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        qkv = self.qkv(x).reshape(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.form == "unfused":
            out = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v
        else:  # "unfused_prescaled"
            out = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class Mlp(nn.Module):
    """``fc1 → GELU(tanh) → fc2``."""

    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block; with ``text_tokens`` the attention runs over the joint text + image sequence."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.text_tokens = cfg.text_tokens
        self.text_first = cfg.text_position == "before"
        self.norm1 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg.hidden, cfg.heads, cfg.attention)
        self.norm2 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(cfg.hidden, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = _modulate(self.norm1(x), shift_msa, scale_msa)
        if text is None:
            h = self.attn(h)
        else:
            n_img = h.shape[1]
            ctx = self.norm1(text)
            joint = torch.cat([ctx, h], dim=1) if self.text_first else torch.cat([h, ctx], dim=1)
            joint = self.attn(joint)
            h = joint[:, self.text_tokens:] if self.text_first else joint[:, :n_img]
        x = x + gate_msa.unsqueeze(1) * h
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then ``Linear(hidden, patch_volume * out_channels)``."""

    def __init__(self, hidden: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The reference Diffusion Transformer; see the module docstring.

    Args:
        cfg: the configuration (default: :class:`DiTConfig` defaults, 64 tokens of a 16x16 latent).
    """

    def __init__(self, cfg: DiTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else DiTConfig()
        self.config = cfg
        patch = cfg.patch_size
        conv = nn.Conv2d if len(cfg.input_size) == 2 else nn.Conv3d
        self.x_embedder = conv(cfg.in_channels, cfg.hidden, kernel_size=patch, stride=patch)
        spatial_grid = tuple(s // p for s, p in zip(cfg.input_size, patch))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.hidden, spatial_grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden) if cfg.num_classes > 0 else None
        if cfg.text_tokens > 0:
            self.text_proj = nn.Linear(cfg.text_dim or cfg.hidden, cfg.hidden)
        else:
            self.text_proj = None
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden, math.prod(patch), cfg.out_channels)
        if cfg.zero_init:
            self._zero_init()

    def _zero_init(self) -> None:
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def null_class(self) -> int:
        """The label of the null (unconditional) class used for classifier-free guidance."""
        return self.config.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, patch_volume * C) -> (B, C, *input_size)``."""
        cfg = self.config
        b = x.shape[0]
        c = cfg.out_channels
        patch = cfg.patch_size
        grid = tuple(s // p for s, p in zip(cfg.input_size, patch))
        x = x.reshape(b, *grid, *patch, c)
        nd = len(grid)
        # (b, g0.., p0.., c) -> (b, c, g0, p0, g1, p1, ...)
        perm = [0, 1 + 2 * nd] + [i for a in range(nd) for i in (1 + a, 1 + nd + a)]
        x = x.permute(*perm)
        return x.reshape(b, c, *cfg.input_size)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict noise (and variance with ``learn_sigma``).

        Args:
            x: latents ``(B, in_channels, *input_size)``.
            t: timesteps ``(B,)``.
            y: class labels ``(B,)`` (``num_classes`` is the null class); ignored when ``num_classes == 0``.
            text: ``(B, text_tokens, text_dim)`` when the config has text tokens.

        Returns:
            ``(B, out_channels, *input_size)``.

        Raises:
            FxditError: when ``y`` or ``text`` is missing although the config needs it.
        """
        cfg = self.config
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise FxditError("DiT.forward: y=None; expected class labels (the config has num_classes > 0)")
            c = c + self.y_embedder(y)
        ctx = None
        if self.text_proj is not None:
            if text is None:
                raise FxditError(f"DiT.forward: text=None; expected (B, {cfg.text_tokens}, text_dim) tokens")
            ctx = self.text_proj(text)
        for block in self.blocks:
            h = block(h, c, ctx)
        return self.unpatchify(self.final_layer(h, c))


#: The reference DiT's cacheable block linears, by attribute name → the ICC role ``find_blocks`` gives them.
BLOCK_LINEAR_ROLES: dict[str, str] = {"qkv": "qkv", "proj": "attn_out", "fc1": "mlp_in", "fc2": "mlp_out"}


def block_linear_roles(model: nn.Module) -> dict[str, str]:
    """Qualified name → ICC role of every cacheable linear in the blocks of a reference DiT (the ``modules=``
    argument of :func:`fxdit.calibrate`)."""
    return {n: BLOCK_LINEAR_ROLES[n.split(".")[-1]] for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("blocks.") and n.split(".")[-1] in BLOCK_LINEAR_ROLES}


@torch.no_grad()
def set_lowrank_block_weights(model: nn.Module, rank: int) -> None:
    """Overwrite every cacheable block linear's weight with a random matrix of rank ``min(rank, out, in)`` (each
    third of the fused qkv weight separately), drawn from torch's global generator, so that ICC with factors of that
    rank is exact in real arithmetic. For tests and benchmarks."""
    for name in block_linear_roles(model):
        mod = model.get_submodule(name)
        out, inp = mod.weight.shape
        parts = 3 if name.split(".")[-1] == "qkv" else 1
        rows = out // parts
        r = min(rank, rows, inp)
        for p in range(parts):
            mod.weight[p * rows:(p + 1) * rows] = torch.randn(rows, r) @ torch.randn(r, inp) / inp
