"""Test oracle for grouped attention (GRAT), written from the method's definition and the model's own config.

Nothing here imports fxdit's GRAT code (no layouts, permutations, passes or ops): the token grid, the group and the
text placement come from the model's configuration and inputs, the mask from a few lines below, and the calls that
get the mask from the rule stated in :func:`planned_sites`. The oracle patches
``torch.nn.functional.scaled_dot_product_attention`` in the *eager* model so that exactly those calls apply the
dense boolean mask of the grouped pattern, in the model's own token order (raster image tokens, text where the model
puts it), AND-ed with the model's key-padding mask. Nothing permutes tokens.

The pattern (``shared/design/grat.md`` §1, §2, §2.4):

* image token ``(t, h, w)`` (raster order) belongs to group ``(t // gt, h // gh, w // gw)``;
* GRAT-B: an image query attends an image key when every group coordinate differs by at most ``radius``;
* GRAT-X: images (``(H, W)`` grid): the groups share a row or a column; video (``(T, H, W)``): they share any one of
  t', h', w' (the official "three planes");
* text tokens: text queries attend every key and every query attends every text key; padded text keys are removed
  by the model's own key-padding mask, which the oracle keeps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: Default groups when ``attention.group`` is not given (README: 16×16 for images, 4×8×8 for video).
DEFAULT_GROUPS = {2: (16, 16), 3: (4, 8, 8)}
#: Model attributes holding the transformer blocks (the blocks ``attention.layers`` indexes, in forward order).
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks")
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass(frozen=True)
class ModelLayout:
    """Where a model puts its image tokens: the token grid and the side of the joint text tokens.

    Args:
        grid: token grid ``(H, W)`` or ``(T, H, W)`` (a single-frame video grid is given as ``(H, W)``).
        text_first: joint text+image sequences hold the text tokens *before* the image tokens.
        image_start: index of the first image token in every attention sequence, for models that put other
            tokens (history latents, registers) before the image tokens as well as text after them; ``None``:
            the image tokens start the sequence, or end it when ``text_first``.
        joint_kv: the model also attends image-only queries over joint keys (the image tokens and the text, on the
            side ``text_first`` says): such calls get the grouped pattern too, image keys by group, text keys all.
    """

    grid: tuple[int, ...]
    text_first: bool = False
    image_start: int | None = None
    joint_kv: bool = False

    @property
    def num_image_tokens(self) -> int:
        return math.prod(self.grid)


def _squeeze(grid: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(int(x) for x in grid)
    return grid[1:] if len(grid) == 3 and grid[0] == 1 else grid


def model_layout(model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> ModelLayout:
    """The token grid and text side of ``model(*args, **kwargs)``, from the model's config and its inputs.

    Known models: the reference DiT (``input_size / patch``, ``text_position``) and the diffusers transformers the
    tests build (latent shape / ``patch_size``; Flux: the packed grid from ``img_ids``). Text sides as diffusers
    writes them: SD3 and HunyuanVideo ``[image, text]``, Flux ``[text, image]``; DiT, PixArt and Wan have no joint
    text (PixArt and Wan attend to the text by cross-attention).
    """
    kwargs = dict(kwargs or {})
    cfg = model.config
    name = type(model).__name__
    if name == "DiT" or hasattr(cfg, "input_size"):
        patch = cfg.patch
        size = tuple(cfg.input_size)
        if isinstance(patch, int):
            patch = (patch, patch) if len(size) == 2 else (1, patch, patch)
        grid = tuple(n // p for n, p in zip(size, patch))
        return ModelLayout(_squeeze(grid), text_first=cfg.text_tokens > 0 and cfg.text_position == "before")
    x = args[0] if args else kwargs["hidden_states"]
    if name == "FluxTransformer2DModel":
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.dim() == 3 else ids
        return ModelLayout(_squeeze((int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)), text_first=True)
    if name == "HunyuanVideoTransformer3DModel":
        p, pt = cfg["patch_size"], cfg["patch_size_t"]
        return ModelLayout(_squeeze((x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p)))
    if name == "WanTransformer3DModel":
        pt, ph, pw = cfg["patch_size"]
        return ModelLayout(_squeeze((x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)))
    if name in ("SD3Transformer2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel"):
        p = cfg["patch_size"]
        return ModelLayout((x.shape[-2] // p, x.shape[-1] // p))
    raise NotImplementedError(f"grat_oracle: no layout rule for {name}")


def image_group_ids(grid: Sequence[int], group: Sequence[int]) -> torch.Tensor:
    """int64 ``[N, 3]``: the group coordinates ``(t', h', w')`` of every image token in raster order."""
    grid3 = (1, *grid) if len(grid) == 2 else tuple(grid)
    group3 = (1, *group) if len(group) == 2 else tuple(group)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid3), indexing="ij")
    return torch.stack([t.reshape(-1) // group3[0], h.reshape(-1) // group3[1], w.reshape(-1) // group3[2]], dim=1)


def image_mask(grid: Sequence[int], group: Sequence[int], mode: str, radius: int) -> torch.Tensor:
    """bool ``[N, N]``: which image key (column) each image query (row) attends, tokens in raster order."""
    ids = image_group_ids(grid, group)
    diff = (ids[:, None, :] - ids[None, :, :]).abs()
    if mode == "grat-b":
        return (diff <= radius).all(-1)
    same = diff == 0
    if len(grid) == 2:  # same group row or same group column
        return same[..., 1] | same[..., 2]
    return same.any(-1)  # video: share any one of t', h', w'


def sequence_mask(layout: ModelLayout, grid: Sequence[int], group: Sequence[int], mode: str, radius: int,
                  seq_len: int, kv_len: int | None = None) -> torch.Tensor:
    """bool ``[S, S]``: the grouped pattern over a joint sequence of ``S`` tokens (text where ``layout`` says);
    ``[N, S_kv]`` for the ``N`` image queries over joint keys of ``S_kv`` tokens (``layout.joint_kv``)."""
    n = math.prod(grid)
    if kv_len is not None and kv_len != seq_len:
        start = kv_len - n if layout.text_first else 0
        mask = torch.ones(seq_len, kv_len, dtype=torch.bool)  # text keys: every image query
        mask[:, start:start + n] = image_mask(grid, group, mode, radius)
        return mask
    start = layout.image_start if layout.image_start is not None else (seq_len - n if layout.text_first else 0)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool)  # text rows and text columns: everything
    mask[start:start + n, start:start + n] = image_mask(grid, group, mode, radius)
    return mask


def _options(cfg: Any) -> Any:
    """The ``attention`` options of an ``FxditConfig``, of an options mapping (validated by ``FxditConfig``), or
    ``cfg`` itself when it already is the attention options."""
    if isinstance(cfg, Mapping):
        from fxdit.config import FxditConfig

        cfg = FxditConfig.from_options(cfg)
    return cfg if hasattr(cfg, "min_tokens") else cfg.attention


def _group(grid: tuple[int, ...], group: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if group is None:
        return DEFAULT_GROUPS[len(grid)]
    if len(group) == 3 and len(grid) == 2 and group[0] == 1:
        return group[1:]
    return group if len(group) == len(grid) else None


@dataclass(frozen=True)
class Call:
    """One attention call of an eager forward, as the oracle sees it."""

    index: int
    module: str
    block: int | None
    q_len: int
    kv_len: int
    cross: bool
    mask: str  # "none", "key_padding", "bool" (other bool masks) or "float"
    causal: bool
    dropout: float


def why_dense(call: Call, layout: ModelLayout, cfg: Any) -> str | None:
    """``None`` when GRAT applies to ``call``, else a short reason. The rule the tests state:

    GRAT rewrites the self-attention calls (keys from the query sequence, joint text+image included; with
    ``layout.joint_kv`` also the image-only queries over joint image+text keys) of the transformer blocks selected
    by ``attention.layers`` (all blocks when ``None``) whose sequence holds the ``N`` image tokens with
    ``N >= attention.min_tokens``, when the token grid (``attention.grid``, else the model's) has ``N`` tokens and
    the group tiles it, for calls without causal masking or dropout and with no mask or a boolean key-padding mask
    (``[B, 1, 1, S]``). Cross-attention, text-only attention, additive masks stay dense.
    """
    att = _options(cfg)
    grid = tuple(att.grid) if att.grid is not None else layout.grid
    n = layout.num_image_tokens
    if att.mode == "dense":
        return "dense mode"
    if att.layers is not None and (call.block is None or call.block not in att.layers):
        return "layer not selected"
    joint_kv = layout.joint_kv and call.q_len == n and call.kv_len > n
    if call.cross or (call.q_len != call.kv_len and not joint_kv):
        return "cross-attention"
    if call.q_len < n + (layout.image_start or 0):
        return "no image tokens"
    if n < att.min_tokens:
        return "below min_tokens"
    if math.prod(grid) != n:
        return "grid does not match the image tokens"
    group = _group(grid, None if att.group is None else tuple(att.group))
    if group is None or any(g < 1 or x % g for x, g in zip(grid, group)):
        return "group does not tile the grid"
    if call.causal or call.dropout > 0:
        return "causal or dropout"
    if call.mask not in ("none", "key_padding"):
        return "mask is not a key-padding mask"
    return None


def _mask_kind(mask: Any, batch: int, kv_len: int) -> str:
    if mask is None:
        return "none"
    if mask.dtype != torch.bool:
        return "float"
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape) if mask.dim() <= 4 else ()
    ok = len(shape) == 4 and shape[0] in (1, batch) and shape[1] == 1 and shape[2] == 1 and shape[3] == kv_len
    return "key_padding" if ok else "bool"


class _Tracker:
    """Forward hooks giving, at each SDPA call, the innermost running module and the running block's index."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack: list[tuple[str, torch.nn.Module]] = []
        self.block_names: set[str] = set()
        for attr in BLOCK_LISTS:
            blocks = getattr(model, attr, None)
            if isinstance(blocks, torch.nn.ModuleList):
                self.block_names.update(f"{attr}.{i}" for i in range(len(blocks)))
        self.block_order: dict[str, int] = {}
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(name, module)))
            self.handles.append(module.register_forward_hook(self._post()))

    def _pre(self, name: str, module: torch.nn.Module) -> Any:
        def hook(mod: torch.nn.Module, args: Any) -> None:
            self.stack.append((name, module))
            if name in self.block_names and name not in self.block_order:
                self.block_order[name] = len(self.block_order)  # block index = order of first call
        return hook

    def _post(self) -> Any:
        def hook(mod: torch.nn.Module, args: Any, out: Any) -> None:
            self.stack.pop()
        return hook

    def where(self) -> tuple[str, torch.nn.Module | None, int | None]:
        name, module = self.stack[-1] if self.stack else ("", None)
        block = next((self.block_order[n] for n, _ in self.stack if n in self.block_order), None)
        return name, module, block

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _patched_sdpa(model: torch.nn.Module, fn: Any) -> Iterator[None]:
    orig = F.scaled_dot_product_attention
    tracker = _Tracker(model)
    counter = [0]

    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not tracker.stack:  # a call from outside the model (a pipeline's text encoder): untouched, uncounted
            return orig(*args, **kwargs)
        bound = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
        q, k = bound["query"], bound["key"]
        name, module, block = tracker.where()
        call = Call(index=counter[0], module=name, block=block, q_len=q.shape[-2], kv_len=k.shape[-2],
                    cross=bool(getattr(module, "is_cross_attention", False)),
                    mask=_mask_kind(bound.get("attn_mask"), q.shape[0], k.shape[-2]),
                    causal=bool(bound.get("is_causal", False)), dropout=float(bound.get("dropout_p", 0.0) or 0.0))
        counter[0] += 1
        return fn(orig, call, bound)

    torch.nn.functional.scaled_dot_product_attention = wrapper
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
        tracker.remove()


def planned_sites(model: torch.nn.Module, cfg: Any, args: Sequence[Any],
                  kwargs: Mapping[str, Any] | None = None) -> list[tuple[Call, str | None]]:
    """``(call, reason)`` per attention call of one eager forward; ``reason is None`` when GRAT applies."""
    layout = model_layout(model, args, kwargs)
    plans: list[tuple[Call, str | None]] = []

    def record(orig: Any, call: Call, bound: dict[str, Any]) -> torch.Tensor:
        plans.append((call, why_dense(call, layout, cfg)))
        return orig(**bound)

    with torch.no_grad(), _patched_sdpa(model, record):
        model(*args, **dict(kwargs or {}))
    return plans


@contextlib.contextmanager
def grouped_sdpa(model: torch.nn.Module, cfg: Any, *, layout: ModelLayout | None = None,
                 only: Collection[int] | None = None) -> Iterator[dict[str, Any]]:
    """Patch SDPA so that the calls :func:`why_dense` accepts use the dense grouped mask; yields call counters.

    ``layout`` defaults to :func:`model_layout` of the first forward's inputs; ``only`` (call indices of one
    forward, in call order) keeps every other call dense. The counters: ``calls`` (SDPA calls), ``masked`` (calls
    given the grouped mask), ``reasons`` (reason of every call, ``None`` for masked ones) and ``sparse`` (masked
    calls whose grouped mask drops some element, i.e. differs from dense attention).
    """
    att = _options(cfg)
    counts: dict[str, Any] = {"calls": 0, "masked": 0, "sparse": 0, "reasons": []}
    state: dict[str, ModelLayout] = {}
    if layout is not None:
        state["layout"] = layout

    def pre(mod: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if "layout" not in state:
            state["layout"] = model_layout(mod, args, kwargs)

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)

    def masked(orig: Any, call: Call, bound: dict[str, Any]) -> torch.Tensor:
        lay = state["layout"]
        reason = why_dense(call, lay, att)
        if reason is None and only is not None and call.index not in only:
            reason = "not selected"
        counts["calls"] += 1
        counts["reasons"].append(reason)
        if reason is None:
            grid = tuple(att.grid) if att.grid is not None else lay.grid
            group = _group(grid, None if att.group is None else tuple(att.group))
            q = bound["query"]
            mask = sequence_mask(lay, grid, group, att.mode, att.radius, call.q_len, call.kv_len).to(q.device)
            counts["sparse"] += int(not bool(mask.all()))
            if bound.get("attn_mask") is not None:
                mask = mask & bound["attn_mask"]
            bound["attn_mask"] = mask
            counts["masked"] += 1
        return orig(**bound)

    try:
        with _patched_sdpa(model, masked):
            yield counts
    finally:
        handle.remove()
