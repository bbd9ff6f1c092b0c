"""GRAT layouts: token groups, group permutations, group adjacency and FlexAttention BlockMask tables.

Pure torch/python; knows nothing of graphs. See ``shared/design/grat.md`` §1, §2, §6.

Vocabulary:

* ``grid``: the token grid, ``(H, W)`` for images or ``(T, H, W)`` for video, raster (row-major) token order.
* ``group``: the group (tile) shape, same length as ``grid``; it must divide the grid on every axis.
* group grid ``(T', H', W') = grid / group``; ``G = T'H'W'`` groups of ``g = gt·gh·gw`` tokens.
* **Permuted order**: each group is one contiguous run of ``g`` tokens, groups in raster order of the group grid
  (id ``t'·H'W' + h'·W' + w'``), tokens raster-ordered inside a group (view ``(T', gt, H', gh, W', gw)`` →
  ``(T', H', W', gt, gh, gw)``). ``x[..., perm, :]`` permutes, ``y[..., inv, :]`` restores.
* Modes: ``"grat-b"`` (key groups within ``radius`` on every axis, clipped at the border) and ``"grat-x"``
  (2-D grid: same group row or column; 3-D grid: sharing **any** of t', h', w' — the official "three planes").

Sequences with text (:class:`SequenceLayout`): the image span holds the image tokens (permuted or not), every other
position is a text/conditioning token. Per position a single class id (:func:`token_groups`):
``0..G-1`` image group, ``G`` (:attr:`SequenceLayout.text_valid_id`) valid text, ``G+1``
(:attr:`SequenceLayout.text_pad_id`) padded text. The extended adjacency (:func:`group_adj`, bool ``[G+2, G+2]``)
encodes the official text rules (grat.md §2.4): image queries see their structured groups plus all valid text keys;
text queries (padded ones included) see every valid key; padded text keys are masked for everyone. Query ``i`` may
attend key ``j`` iff ``adj[cls[i], cls[j]]``.

BlockMask tables (:func:`block_mask_tables`) use FlexAttention's format exactly: ``kv_num_blocks``/``kv_indices``
list the *partial* blocks, ``full_kv_num_blocks``/``full_kv_indices`` the *full* ones, all int32 shaped
``[1, 1, Qb, …]``, indices ascending then the remaining block ids (as ``create_block_mask`` orders them). A ragged last
block (sequence length not a multiple of the block) counts as partial, as ``create_block_mask`` pads with False.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MODES",
    "BlockTables",
    "SequenceLayout",
    "normalize_grid",
    "why_not_layout",
    "group_permutation",
    "group_adjacency",
    "token_groups",
    "group_adj",
    "block_mask_tables",
    "block_mask_tables_qk",
    "dense_mask",
    "block_density",
    "closed_form_density",
    "ideal_speedup",
    "default_block_size",
]

MODES = ("grat-b", "grat-x")
_MODE_ALIASES = {"b": "grat-b", "x": "grat-x", "grat-b": "grat-b", "grat-x": "grat-x"}


def _mode(mode: str) -> str:
    try:
        return _MODE_ALIASES[mode.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"mode={mode!r}; expected one of {MODES}") from None


def normalize_grid(grid: tuple[int, ...], group: tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Pad a 2-D ``(H, W)`` grid/group to 3-D ``(1, H, W)``; validate lengths and positivity.

    Raises:
        ValueError: when the lengths differ, are not 2 or 3, or a size is < 1 (use :func:`why_not_layout` for the
            message without raising).
    """
    reason = why_not_layout(grid, group)
    if reason is not None:
        raise ValueError(reason)
    g3 = tuple(grid) if len(grid) == 3 else (1, *grid)
    s3 = tuple(group) if len(group) == 3 else (1, *group)
    return g3, s3  # type: ignore[return-value]


def why_not_layout(grid: tuple[int, ...], group: tuple[int, ...]) -> str | None:
    """Why ``group`` cannot tile ``grid`` exactly (``None`` when it can).

    Ragged last groups are not supported: a group must divide the grid on every axis.
    """
    try:
        grid = tuple(int(x) for x in grid)
        group = tuple(int(x) for x in group)
    except (TypeError, ValueError):
        return f"grid={grid!r}, group={group!r}; expected tuples of integers"
    if len(grid) not in (2, 3):
        return f"grid={grid}; expected (H, W) or (T, H, W)"
    if len(group) != len(grid):
        return f"group={group}; expected {len(grid)} sizes to match grid={grid}"
    if any(x < 1 for x in grid) or any(x < 1 for x in group):
        return f"grid={grid}, group={group}; expected positive sizes"
    bad = [i for i, (n, s) in enumerate(zip(grid, group)) if n % s]
    if bad:
        axes = ("t", "h", "w")[-len(grid):]
        detail = ", ".join(f"{axes[i]}: {grid[i]} % {group[i]} = {grid[i] % group[i]}" for i in bad)
        return (f"group={group} does not divide the token grid {grid} ({detail}); choose a group whose sizes divide "
                f"the grid on every axis")
    return None


@functools.lru_cache(maxsize=64)
def _permutation(grid: tuple[int, ...], group: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    (t, h, w), (gt, gh, gw) = normalize_grid(grid, group)
    idx = torch.arange(t * h * w, dtype=torch.int64).view(t // gt, gt, h // gh, gh, w // gw, gw)
    perm = idx.permute(0, 2, 4, 1, 3, 5).reshape(-1).contiguous()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=torch.int64)
    return perm, inv


def group_permutation(grid: tuple[int, ...], group: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The token permutation that makes every group contiguous.

    Args:
        grid: token grid ``(H, W)`` or ``(T, H, W)``.
        group: group shape of the same length.

    Returns:
        ``(perm, inv)`` int64 ``[N]``: ``x[..., perm, :]`` is in group order and ``y[..., inv, :]`` undoes it.
        Cached; do not modify the returned tensors.

    Raises:
        ValueError: when the group does not tile the grid (message from :func:`why_not_layout`).
    """
    return _permutation(tuple(grid), tuple(group))


def _axis_clip_adj(n: int, radius: int) -> Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= radius


@functools.lru_cache(maxsize=64)
def _adjacency(grid: tuple[int, ...], group: tuple[int, ...], mode: str, radius: int) -> Tensor:
    (t, h, w), (gt, gh, gw) = normalize_grid(grid, group)
    ng = (t // gt, h // gh, w // gw)
    mode = _mode(mode)
    if mode == "grat-b":
        if radius < 0:
            raise ValueError(f"radius={radius}; expected an integer >= 0")
        a = [_axis_clip_adj(n, radius) for n in ng]
        adj = (a[0][:, None, None, :, None, None] & a[1][None, :, None, None, :, None]
               & a[2][None, None, :, None, None, :])
    else:
        eq = [torch.eye(n, dtype=torch.bool) for n in ng]
        et = eq[0][:, None, None, :, None, None]
        eh = eq[1][None, :, None, None, :, None]
        ew = eq[2][None, None, :, None, None, :]
        if len(grid) == 2:  # same row or same column (t' is always shared, so it must not count)
            adj = et & (eh | ew)
        else:  # official 3-D rule: share any one coordinate
            adj = et | eh | ew
        adj = adj.expand(*ng, *ng)
    g = ng[0] * ng[1] * ng[2]
    return adj.reshape(g, g).contiguous()


def group_adjacency(grid: tuple[int, ...], group: tuple[int, ...], mode: str, radius: int = 1) -> Tensor:
    """Which key groups each query group attends (groups in raster order of the group grid).

    Args:
        grid: token grid ``(H, W)`` or ``(T, H, W)``.
        group: group shape.
        mode: ``"grat-b"`` or ``"grat-x"``.
        radius: GRAT-B neighbourhood radius in groups (ignored by GRAT-X).

    Returns:
        bool ``[G, G]`` (cached; do not modify).
    """
    return _adjacency(tuple(grid), tuple(group), _mode(mode), int(radius) if _mode(mode) == "grat-b" else 0)


@dataclass(frozen=True)
class SequenceLayout:
    """Where the image tokens and the text tokens sit in an attention sequence (hashable, cacheable).

    Args:
        seq_len: total sequence length ``S``.
        image_start: first position of the image span; the span is ``[image_start, image_start + N)``, ``N = THW``.
        grid: token grid ``(H, W)`` or ``(T, H, W)``.
        group: group shape.
        mode: ``"grat-b"`` or ``"grat-x"``.
        radius: GRAT-B radius.
        text_pad: ``(start, stop)`` spans of *padded* text keys (masked for every query). Every position outside the
            image span and outside these spans is a valid text/conditioning token. Text may come before or after the
            image; nothing assumes an order.
        permuted: ``True`` when the image span is already in group order (the fast layout: whole blocks are full);
            ``False`` when it is in raster order (exact too, but most blocks become partial).
    """

    seq_len: int
    image_start: int
    grid: tuple[int, ...]
    group: tuple[int, ...]
    mode: str = "grat-b"
    radius: int = 1
    text_pad: tuple[tuple[int, int], ...] = ()
    permuted: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(x) for x in self.grid))
        object.__setattr__(self, "group", tuple(int(x) for x in self.group))
        object.__setattr__(self, "mode", _mode(self.mode))
        object.__setattr__(self, "text_pad", tuple((int(a), int(b)) for a, b in self.text_pad))
        reason = why_not_layout(self.grid, self.group)
        if reason is not None:
            raise ValueError(reason)
        if self.image_start < 0 or self.image_stop > self.seq_len:
            raise ValueError(f"image span [{self.image_start}, {self.image_stop}) does not fit in seq_len="
                             f"{self.seq_len}")
        for a, b in self.text_pad:
            if not (0 <= a <= b <= self.seq_len):
                raise ValueError(f"text_pad span ({a}, {b}) outside [0, {self.seq_len}]")
            if a < self.image_stop and b > self.image_start:
                raise ValueError(f"text_pad span ({a}, {b}) overlaps the image span [{self.image_start}, "
                                 f"{self.image_stop})")

    @property
    def num_image_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def image_stop(self) -> int:
        return self.image_start + self.num_image_tokens

    @property
    def group_tokens(self) -> int:
        return math.prod(self.group)

    @property
    def num_groups(self) -> int:
        return self.num_image_tokens // self.group_tokens

    @property
    def text_valid_id(self) -> int:
        """Class id of valid text positions (``G``)."""
        return self.num_groups

    @property
    def text_pad_id(self) -> int:
        """Class id of padded text positions (``G + 1``)."""
        return self.num_groups + 1

    @classmethod
    def image_then_text(cls, grid: tuple[int, ...], group: tuple[int, ...], mode: str, radius: int = 1, *,
                        text_len: int = 0, text_valid: int | None = None) -> SequenceLayout:
        """``[image | text]`` (HunyuanVideo order); the last ``text_len - text_valid`` text positions are padding."""
        n = math.prod(grid)
        valid = text_len if text_valid is None else text_valid
        pad = ((n + valid, n + text_len),) if valid < text_len else ()
        return cls(n + text_len, 0, tuple(grid), tuple(group), mode, radius, pad)

    @classmethod
    def text_then_image(cls, grid: tuple[int, ...], group: tuple[int, ...], mode: str, radius: int = 1, *,
                        text_len: int = 0, text_valid: int | None = None) -> SequenceLayout:
        """``[text | image]`` (diffusers Flux order); the text positions ``[text_valid, text_len)`` are padding."""
        n = math.prod(grid)
        valid = text_len if text_valid is None else text_valid
        pad = ((valid, text_len),) if valid < text_len else ()
        return cls(n + text_len, text_len, tuple(grid), tuple(group), mode, radius, pad)


@functools.lru_cache(maxsize=64)
def _token_groups(layout: SequenceLayout) -> Tensor:
    cls = torch.full((layout.seq_len,), layout.text_valid_id, dtype=torch.int32)
    for a, b in layout.text_pad:
        cls[a:b] = layout.text_pad_id
    g = layout.group_tokens
    ids = torch.arange(layout.num_image_tokens, dtype=torch.int32) // g
    if not layout.permuted:
        # raster position r holds the token that sits at permuted position inv[r]
        _, inv = group_permutation(layout.grid, layout.group)
        ids = ids[inv]
    cls[layout.image_start:layout.image_stop] = ids
    return cls


def token_groups(layout: SequenceLayout) -> Tensor:
    """int32 ``[S]``: the class of every position (image group id, ``G`` valid text, ``G+1`` padded text). Cached."""
    return _token_groups(layout)


@functools.lru_cache(maxsize=64)
def _group_adj(layout: SequenceLayout) -> Tensor:
    g = layout.num_groups
    adj = torch.zeros(g + 2, g + 2, dtype=torch.bool)
    adj[:g, :g] = group_adjacency(layout.grid, layout.group, layout.mode, layout.radius)
    adj[:, g] = True  # everyone sees valid text keys
    adj[g:, :g + 1] = True  # text queries (valid or padded) see every valid key
    # column g + 1 (padded text keys) stays False for every query
    return adj


def group_adj(layout: SequenceLayout) -> Tensor:
    """bool ``[G+2, G+2]``: the extended class adjacency (text rules of grat.md §2.4). Cached."""
    return _group_adj(layout)


def dense_mask(layout: SequenceLayout) -> Tensor:
    """bool ``[S, S]``: the element mask (query row, key column). For references and tests."""
    cls = token_groups(layout).long()
    return group_adj(layout)[cls][:, cls]


class BlockTables(NamedTuple):
    """FlexAttention BlockMask tables (int32, ``[1, 1, Qb]`` and ``[1, 1, Qb, Kb]``)."""

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    block_size: int


def _block_class_counts(cls: Tensor, num_classes: int, block_size: int) -> Tensor:
    """int64 ``[nb, num_classes]``: how many positions of each class every block holds."""
    s = cls.numel()
    nb = -(-s // block_size)
    flat = (torch.arange(s) // block_size) * num_classes + cls.long()
    return torch.bincount(flat, minlength=nb * num_classes).view(nb, num_classes)


def _tables_from_flags(full: Tensor, partial: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def enc(flags: Tensor) -> tuple[Tensor, Tensor]:
        num = flags.sum(-1).to(torch.int32)
        idx = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[None, None].contiguous(), idx[None, None].contiguous()

    kv_num, kv_idx = enc(partial)
    full_num, full_idx = enc(full)
    return kv_num, kv_idx, full_num, full_idx


# Above this many (query-block class, key-block class) pairs the dense product is cheaper than the sparse one.
_SPARSE_PAIRS_LIMIT = 1 << 22


def block_flags(cls_q: Tensor, cls_k: Tensor, adj: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Full and partial ``[Qb, Kb]`` block flags of the mask ``adj[cls_q[i], cls_k[j]]`` (vectorised, exact).

    A block is full when all ``block_size²`` elements (padding past the end counts as masked) are visible, partial
    when some are. visible[qb, kb] = Σ_{a,c} count_q[qb, a]·adj[a, c]·count_k[kb, c], summed over the few classes
    present in each block (integer arithmetic; no per-token Python loop).
    """
    cq = _block_class_counts(cls_q, adj.shape[0], block_size)
    ck = _block_class_counts(cls_k, adj.shape[1], block_size)
    qb, kb = cq.shape[0], ck.shape[0]
    nzq = cq.nonzero()
    nzk = ck.nonzero()
    if nzq.shape[0] * nzk.shape[0] <= _SPARSE_PAIRS_LIMIT:
        wq = cq[nzq[:, 0], nzq[:, 1]]
        wk = ck[nzk[:, 0], nzk[:, 1]]
        pair = adj[nzq[:, 1]][:, nzk[:, 1]].to(torch.int64) * wq[:, None] * wk[None, :]
        rows = torch.zeros(qb, pair.shape[1], dtype=torch.int64).index_add_(0, nzq[:, 0], pair)
        visible = torch.zeros(qb, kb, dtype=torch.int64).index_add_(1, nzk[:, 0], rows)
    else:  # many classes per block (e.g. a raster-order image span): dense product, exact in float64
        visible = (cq.double() @ adj.double() @ ck.double().T).round().to(torch.int64)
    total = block_size * block_size
    full = visible == total
    partial = (visible > 0) & ~full
    return full, partial


@functools.lru_cache(maxsize=32)
def _block_mask_tables(layout: SequenceLayout, block_size: int) -> BlockTables:
    cls = token_groups(layout)
    full, partial = block_flags(cls, cls, group_adj(layout), block_size)
    return BlockTables(*_tables_from_flags(full, partial), block_size)


def block_mask_tables(layout: SequenceLayout, block_size: int | None = None) -> BlockTables:
    """BlockMask tables for ``layout`` (cached per layout and block size; do not modify the tensors).

    Args:
        layout: the sequence layout.
        block_size: sparse block size (query and key); ``None`` → :func:`default_block_size` of the group.

    Returns:
        :class:`BlockTables` ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, block_size)``.
    """
    bs = default_block_size(layout.group) if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError(f"block_size={bs}; expected a positive integer")
    return _block_mask_tables(layout, bs)


@functools.lru_cache(maxsize=32)
def _block_mask_tables_qk(q_layout: SequenceLayout, kv_layout: SequenceLayout, block_size: int) -> BlockTables:
    full, partial = block_flags(token_groups(q_layout), token_groups(kv_layout), group_adj(kv_layout), block_size)
    return BlockTables(*_tables_from_flags(full, partial), block_size)


def block_mask_tables_qk(q_layout: SequenceLayout, kv_layout: SequenceLayout,
                         block_size: int | None = None) -> BlockTables:
    """BlockMask tables for queries laid out as ``q_layout`` over keys laid out as ``kv_layout`` (e.g. image
    queries over the joint image+text keys); both layouts hold the same grid and group. Cached.
    """
    if (q_layout.grid, q_layout.group, q_layout.mode, q_layout.radius) != (
            kv_layout.grid, kv_layout.group, kv_layout.mode, kv_layout.radius):
        raise ValueError("q_layout and kv_layout must share grid, group, mode and radius")
    bs = default_block_size(q_layout.group) if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError(f"block_size={bs}; expected a positive integer")
    return _block_mask_tables_qk(q_layout, kv_layout, bs)


def default_block_size(group: tuple[int, ...]) -> int:
    """The largest of 128/64/32/16 that divides the group's token count (16 when none does: partial blocks).

    cpu_measurements.md A: a block that does not divide the group makes partial blocks and costs ~4× at s=8/BS=128.
    """
    g = math.prod(group)
    for bs in (128, 64, 32, 16):
        if g % bs == 0:
            return bs
    return 16


def block_density(tables: BlockTables) -> float:
    """Fraction of ``Qb × Kb`` blocks that are computed (full + partial)."""
    qb, kb = tables.kv_indices.shape[-2], tables.kv_indices.shape[-1]
    n = int(tables.kv_num_blocks.sum()) + int(tables.full_kv_num_blocks.sum())
    return n / float(qb * kb)


def _mean_axis_count(n: int, radius: int) -> float:
    i = torch.arange(n)
    lo = (i - radius).clamp(min=0)
    hi = (i + radius).clamp(max=n - 1)
    return float((hi - lo + 1).double().mean())


def closed_form_density(grid: tuple[int, ...], group: tuple[int, ...], mode: str, radius: int = 1, *,
                        text_len: int = 0, text_valid: int | None = None) -> float:
    """Token-level attention density from grat.md §6 (no mask evaluated).

    Image→image: ρ = mean|A| / G, with GRAT-B's |A| the product of per-axis clipped counts, GRAT-X 2-D
    ``H'+W'-1`` and 3-D ``H'W' + T'W' + T'H' - T' - H' - W' + 1``. With text (``L = text_len``, ``Lv = text_valid``)
    the full-matrix density ``[N(ρN + Lv) + L(N + Lv)] / (N + L)²``.
    """
    (t, h, w), (gt, gh, gw) = normalize_grid(grid, group)
    ng = (t // gt, h // gh, w // gw)
    tp, hp, wp = ng
    gcount = tp * hp * wp
    mode = _mode(mode)
    if mode == "grat-b":
        mean_a = math.prod(_mean_axis_count(n, radius) for n in ng)
    elif len(grid) == 2:
        mean_a = float(hp + wp - 1)
    else:
        mean_a = float(hp * wp + tp * wp + tp * hp - tp - hp - wp + 1)
    rho = mean_a / gcount
    if text_len == 0:
        return rho
    n = t * h * w
    lv = text_len if text_valid is None else text_valid
    return (n * (rho * n + lv) + text_len * (n + lv)) / float((n + text_len) ** 2)


def ideal_speedup(density: float) -> float:
    """``1 / density`` (the speedup of a kernel whose cost is proportional to computed blocks)."""
    return math.inf if density <= 0 else 1.0 / density
