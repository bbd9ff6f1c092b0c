"""Numeric core of the GPU kernel tests, device-parametrised.

Every check takes a ``device`` so the comparison logic (fp64 oracles, error rule, layouts) can also be exercised on
CPU under ``TRITON_INTERPRET=1`` with tiny shapes; ``tests/gpu/test_gpu_kernels.py`` calls it with ``"cuda"``.

Oracles are computed here, independently of :mod:`fxdit.kernels.reference`:

* grouped attention: a dense fp64 masked softmax whose mask is expanded from the BlockMask tables themselves
  (full blocks: every in-range element; partial blocks: ``group_adj[q_group[i], kv_group[j]]``), AND-ed with
  ``kv_valid``; rows that see no key are zero. The expanded mask is also checked against the element-wise grouped
  mask, so tables that disagree with ``group_adj`` fail here and not in the kernel comparison.
* low-rank increment: ``y_c + ((x − x_c)·Bᵀ)·Aᵀ`` in fp64.

Pass rule (flex_attention's ``_check_equal``): ``err(kernel) ≤ 2·err(same-dtype reference) + eps`` with ``err`` the
max-abs error against the fp64 oracle and ``eps`` two units in the last place of the dtype at the oracle's
magnitude.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fxdit.kernels import grat_layout as gl

# ---------------------------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 (no TF32) for the duration, restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Errors:
    """Max-abs errors against the fp64 oracle and the allowance of the pass rule."""

    kernel: float
    reference: float
    eps: float
    scale: float

    @property
    def bound(self) -> float:
        return 2.0 * self.reference + self.eps

    @property
    def ok(self) -> bool:
        return math.isfinite(self.kernel) and self.kernel <= self.bound

    def __str__(self) -> str:
        return (f"err(kernel)={self.kernel:.3e}, err(same-dtype ref)={self.reference:.3e}, eps={self.eps:.3e}, "
                f"bound={self.bound:.3e}, max|gold|={self.scale:.3e}")


def errors(out: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor) -> Errors:
    """Errors of ``out`` (kernel) and ``ref`` (same-dtype reference) against ``gold`` (fp64)."""
    scale = float(gold.abs().max()) if gold.numel() else 0.0
    eps = 2.0 * torch.finfo(out.dtype).eps * max(scale, 1e-30)
    k = float((out.double() - gold).abs().max()) if gold.numel() else 0.0
    r = float((ref.double() - gold).abs().max()) if gold.numel() else 0.0
    return Errors(k, r, eps, scale)


# ---------------------------------------------------------------------------------------------------------------
# grouped attention
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnCase:
    """One grouped-attention configuration.

    Args:
        name: test id.
        layout: ``(kind, grid, group, mode, text_len, text_valid)`` with kind ``"image_then_text"`` or
            ``"text_then_image"``.
        d: query/key head dim. dv: value head dim (``None``: ``d``).
        hq, hkv: query and key/value heads (GQA when they differ). b: batch.
        valid: with a per-batch key-validity mask ``kv_valid``.
        block_size: BlockMask block size (``None``: :func:`grat_layout.default_block_size` of the group).
        permuted: image tokens in group order (``False``: raster order, mostly partial blocks).
        empty_group: a query group whose adjacency row is cleared (those rows must come out zero).
    """

    name: str
    layout: tuple[Any, ...]
    d: int
    dv: int | None = None
    hq: int = 4
    hkv: int = 4
    b: int = 1
    valid: bool = False
    block_size: int | None = None
    permuted: bool = True
    empty_group: int | None = None

    def sequence_layout(self) -> gl.SequenceLayout:
        kind, grid, group, mode, text_len, text_valid = self.layout
        lay = getattr(gl.SequenceLayout, kind)(grid, group, mode, text_len=text_len, text_valid=text_valid)
        if not self.permuted:
            lay = gl.SequenceLayout(lay.seq_len, lay.image_start, lay.grid, lay.group, lay.mode, lay.radius,
                                    lay.text_pad, permuted=False)
        return lay


@dataclass
class AttnInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cls: torch.Tensor
    adj: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    block_size: int
    kv_valid: torch.Tensor | None
    scale: float
    extra: dict[str, Any] = field(default_factory=dict)


def attention_inputs(case: AttnCase, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> AttnInputs:
    """Random q/k/v and the case's class ids, adjacency and BlockMask tables, all on ``device``."""
    lay = case.sequence_layout()
    cls = gl.token_groups(lay)
    adj = gl.group_adj(lay).clone()
    if case.empty_group is not None:
        adj[case.empty_group] = False
    bs = case.block_size or gl.default_block_size(lay.group)
    full, partial = gl.block_flags(cls, cls, adj, bs)
    tables = gl._tables_from_flags(full, partial)
    s = lay.seq_len
    dv = case.dv or case.d
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.b, case.hq, s, case.d, generator=g)
    k = torch.randn(case.b, case.hkv, s, case.d, generator=g)
    v = torch.randn(case.b, case.hkv, s, dv, generator=g)
    kv_valid = (torch.rand(case.b, s, generator=g) > 0.2) if case.valid else None
    to = dict(device=device)
    return AttnInputs(
        q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to), cls.to(**to), adj.to(**to),
        tuple(t.to(**to) for t in tables), bs, None if kv_valid is None else kv_valid.to(**to),
        1.0 / math.sqrt(case.d), {"seq_len": s, "full_blocks": int(full.sum()), "partial_blocks": int(partial.sum())})


def _expand_blocks(num: torch.Tensor, idx: torch.Tensor, kb: int) -> torch.Tensor:
    """bool ``[Bm, Hm, Qb, Kb]``: block ``j`` is listed among the first ``num`` entries of ``idx``."""
    width = idx.shape[-1]
    listed = torch.arange(width, device=idx.device) < num[..., None].long()
    flags = torch.zeros(*idx.shape[:-1], kb + 1, dtype=torch.bool, device=idx.device)
    # unlisted entries are routed to a spare column kb, dropped below
    target = torch.where(listed, idx.long(), torch.full_like(idx.long(), kb))
    flags.scatter_(-1, target, True)
    return flags[..., :kb]


def mask_from_tables(cls_q: torch.Tensor, cls_k: torch.Tensor, adj: torch.Tensor,
                     tables: tuple[torch.Tensor, ...], block_size: int,
                     kv_valid: torch.Tensor | None) -> torch.Tensor:
    """bool ``[B or 1, Hm, Sq, Sk]``: the visibility the BlockMask tables encode (see the module docstring)."""
    kv_num, kv_idx, full_num, full_idx = tables
    sq, sk = cls_q.numel(), cls_k.numel()
    kb = -(-sk // block_size)
    partial = _expand_blocks(kv_num, kv_idx, kb)
    full = _expand_blocks(full_num, full_idx, kb)

    def elements(flags: torch.Tensor) -> torch.Tensor:
        e = flags.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
        return e[..., :sq, :sk]

    elem = adj.bool()[cls_q.long()][:, cls_k.long()]
    mask = elements(full) | (elements(partial) & elem)
    if kv_valid is not None:
        mask = mask & kv_valid.bool()[:, None, None, :]
    return mask


def attention_gold(x: AttnInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gold, empty)``: fp64 masked softmax attention from the tables, and bool ``[.., Sq, 1]`` empty rows."""
    mask = mask_from_tables(x.cls, x.cls, x.adj, x.tables, x.block_size, x.kv_valid)
    elem = x.adj.bool()[x.cls.long()][:, x.cls.long()]
    want = elem[None, None] if x.kv_valid is None else elem[None, None] & x.kv_valid.bool()[:, None, None, :]
    if not torch.equal(mask, want.expand_as(mask)):
        bad = int((mask != want.expand_as(mask)).sum())
        raise AssertionError(f"BlockMask tables disagree with group_adj on {bad} elements")
    rep = x.q.shape[1] // x.k.shape[1]
    q = x.q.double()
    k = x.k.double().repeat_interleave(rep, dim=1)
    v = x.v.double().repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * x.scale
    scores = scores.masked_fill(~mask, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    empty = ~torch.isfinite(m)
    p = torch.exp(scores - torch.where(empty, torch.zeros_like(m), m))
    denom = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(empty, torch.ones_like(denom), denom)
    return out.masked_fill(empty, 0.0), empty


def run_attention(x: AttnInputs, via: str) -> torch.Tensor:
    """The kernel under test: ``"kernel"`` (the Triton launcher) or ``"op"`` (``torch.ops.fxdit``)."""
    if via == "kernel":
        from fxdit.kernels.grouped_attention import grouped_attention

        return grouped_attention(x.q, x.k, x.v, x.cls, x.cls, x.adj, *x.tables, x.kv_valid, scale=x.scale,
                                 block_size=x.block_size, check_values=True)
    if via == "op":
        import fxdit.kernels.ops  # noqa: F401  (registers torch.ops.fxdit.*)

        return torch.ops.fxdit.grouped_attention(x.q, x.k, x.v, x.cls, x.cls, x.adj, *x.tables, x.kv_valid, x.scale,
                                                 x.block_size)
    raise ValueError(f"via={via!r}; expected 'kernel' or 'op'")


def check_attention(case: AttnCase, dtype: torch.dtype, device: str | torch.device, *, via: str = "kernel",
                    seed: int = 0) -> Errors:
    """Run the case, compare with the fp64 oracle and the same-dtype reference; raise AssertionError on failure."""
    from fxdit.kernels.reference import grouped_attention_ref

    x = attention_inputs(case, dtype, device, seed)
    out = run_attention(x, via)
    assert out.shape == (case.b, case.hq, x.q.shape[2], case.dv or case.d), out.shape
    assert out.dtype == dtype and out.device == x.q.device and out.is_contiguous()
    gold, empty = attention_gold(x)
    ref = grouped_attention_ref(x.q, x.k, x.v, x.cls, x.cls, x.adj, x.kv_valid, scale=x.scale, compute_dtype=None)
    err = errors(out, ref, gold)
    assert torch.isfinite(out).all(), f"{case.name} {dtype}: non-finite output"
    if bool(empty.any()):
        rows = empty.expand(*out.shape[:-1], 1).expand_as(out)
        assert float(out[rows].abs().max()) == 0.0, f"{case.name} {dtype}: a row that sees no key is not zero"
    assert err.ok, f"{case.name} {dtype} via {via}: {err}"
    return err


# Cases for the GPU run: ragged sequence lengths (text spans that do not fill a block), padded text, video, GQA,
# key-validity masks, raster (partial-block) layouts, empty rows, value head dim != key head dim, every block size
# the layouts produce (128, 64, 32, 16), head dims 40..128.
ATTN_CASES = {
    "img64_b_text77": AttnCase("img64_b_text77", ("image_then_text", (64, 64), (16, 16), "grat-b", 77, 60), d=128,
                               hq=8, hkv=8),
    "img32x48_x_text40_gqa": AttnCase("img32x48_x_text40_gqa", ("text_then_image", (32, 48), (16, 16), "grat-x",
                                                                40, 29), d=72, hq=8, hkv=2),
    "video_b_valid": AttnCase("video_b_valid", ("image_then_text", (8, 16, 24), (4, 8, 8), "grat-b", 0, None), d=96,
                              hq=4, hkv=4, b=2, valid=True),
    "img32_b_text5_valid_gqa": AttnCase("img32_b_text5_valid_gqa", ("image_then_text", (32, 32), (16, 16), "grat-b",
                                                                    5, 3), d=128, hq=2, hkv=1, valid=True),
    "img24_x_bs64_gqa": AttnCase("img24_x_bs64_gqa", ("image_then_text", (24, 24), (8, 8), "grat-x", 13, 13), d=40,
                                 hq=3, hkv=1),
    "img16_b_bs16": AttnCase("img16_b_bs16", ("text_then_image", (16, 16), (4, 4), "grat-b", 9, 5), d=80, hq=2,
                             hkv=2, b=2),
    "img16x32_b_bs32_dv": AttnCase("img16x32_b_bs32_dv", ("image_then_text", (16, 32), (4, 8), "grat-b", 21, 21),
                                   d=64, dv=40, hq=4, hkv=2),
    "raster_empty_rows": AttnCase("raster_empty_rows", ("image_then_text", (32, 32), (8, 8), "grat-b", 30, 20), d=64,
                                  hq=2, hkv=2, permuted=False, empty_group=5),
    # the attention of the end-to-end test (77 text tokens then 64x64 image tokens, 16x16 groups, head dim 72,
    # fp32): one autotuning serves both
    "img64_b_e2e": AttnCase("img64_b_e2e", ("text_then_image", (64, 64), (16, 16), "grat-b", 77, 77), d=72, hq=4,
                            hkv=4, b=2),
}

#: (case, dtype) pairs run on the GPU. Every distinct (sequence length, head dims, block size, kv_valid, dtype) is
#: one autotuning run of the attention kernel: up to 12 configurations compiled at block size 128, 8 at 64, one at
#: 32 and 16; fp32 (IEEE dots) compiles slowest. So the list covers each dtype, head dim and block size without the
#: full product, and fp32 at block size 128 only at the end-to-end shape.
ATTN_GPU_MATRIX = [
    ("img64_b_text77", torch.bfloat16),
    ("img32x48_x_text40_gqa", torch.bfloat16),
    ("video_b_valid", torch.bfloat16),
    ("img32_b_text5_valid_gqa", torch.float16),
    ("img24_x_bs64_gqa", torch.float16),
    ("img16_b_bs16", torch.bfloat16),
    ("img16_b_bs16", torch.float32),
    ("img16x32_b_bs32_dv", torch.float16),
    ("img16x32_b_bs32_dv", torch.float32),
    ("raster_empty_rows", torch.bfloat16),
    ("img64_b_e2e", torch.float32),
]

#: Tiny cases for a CPU dry run of the comparison logic under the Triton interpreter.
ATTN_TINY_CASES = [
    AttnCase("tiny_b_text", ("image_then_text", (8, 8), (4, 4), "grat-b", 7, 5), d=24, hq=2, hkv=1, b=2, valid=True),
    AttnCase("tiny_x_text_first", ("text_then_image", (8, 8), (4, 4), "grat-x", 5, 5), d=40, dv=16, hq=2, hkv=2),
    AttnCase("tiny_raster_empty", ("image_then_text", (8, 8), (4, 4), "grat-b", 3, 2), d=16, hq=1, hkv=1,
             permuted=False, empty_group=2),
    AttnCase("tiny_video", ("image_then_text", (2, 8, 8), (2, 4, 4), "grat-x", 0, None), d=16, hq=2, hkv=2,
             block_size=32),
]


# ---------------------------------------------------------------------------------------------------------------
# low-rank increment
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankCase:
    """``lead`` leading dims of x, ``k`` input width, ``n`` output width, ``r`` rank; ``strided``: x is a column
    slice of a wider buffer and y_c is column-major."""

    name: str
    lead: tuple[int, ...]
    k: int
    n: int
    r: int
    strided: bool = False


@dataclass
class LowRankInputs:
    x: torch.Tensor
    x_cached: torch.Tensor
    y_cached: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor


def lowrank_inputs(case: LowRankCase, dtype: torch.dtype, device: str | torch.device,
                   seed: int = 0) -> LowRankInputs:
    """ICC-like inputs: ``x_c = x + 0.1·noise`` (a small increment), factors scaled like an SVD of a unit-gain W."""
    g = torch.Generator().manual_seed(seed)
    m = math.prod(case.lead)
    if case.strided:
        wide = torch.randn(m, case.k + 24, generator=g)
        x = wide[:, 8:8 + case.k]
        yc = torch.randn(case.n, m, generator=g).t()
    else:
        x = torch.randn(m, case.k, generator=g)
        yc = torch.randn(m, case.n, generator=g)
    xc = x + 0.1 * torch.randn(m, case.k, generator=g)
    B = torch.randn(case.r, case.k, generator=g) / math.sqrt(case.k)
    A = torch.randn(case.n, case.r, generator=g) / math.sqrt(case.r)

    def put(t: torch.Tensor, width: int) -> torch.Tensor:
        if case.strided:
            # keep the strides: move the whole base buffer, then take the same view
            base = t._base if t._base is not None else t
            moved = base.to(device=device, dtype=dtype)
            out = moved.as_strided(t.shape, t.stride(), t.storage_offset())
        else:
            out = t.to(device=device, dtype=dtype)
        return out if len(case.lead) == 1 else out.reshape(*case.lead, width) if out.is_contiguous() else out

    return LowRankInputs(put(x, case.k), put(xc, case.k), put(yc, case.n), B.to(device=device, dtype=dtype),
                         A.to(device=device, dtype=dtype))


def lowrank_gold(x: LowRankInputs) -> torch.Tensor:
    d = x.x.double() - x.x_cached.double()
    return x.y_cached.double() + (d @ x.B.double().t()) @ x.A.double().t()


def run_lowrank(x: LowRankInputs, via: str) -> torch.Tensor:
    if via == "kernel":
        from fxdit.kernels.lowrank_increment import lowrank_increment

        return lowrank_increment(x.x, x.x_cached, x.y_cached, x.B, x.A)
    if via == "op":
        import fxdit.kernels.ops  # noqa: F401

        return torch.ops.fxdit.lowrank_increment(x.x, x.x_cached, x.y_cached, x.B, x.A)
    raise ValueError(f"via={via!r}; expected 'kernel' or 'op'")


def check_lowrank(case: LowRankCase, dtype: torch.dtype, device: str | torch.device, *, via: str = "kernel",
                  seed: int = 0) -> Errors:
    from fxdit.kernels.reference import lowrank_increment_ref

    x = lowrank_inputs(case, dtype, device, seed)
    if case.strided:
        assert not x.x.is_contiguous() and not x.y_cached.is_contiguous()
    out = run_lowrank(x, via)
    assert out.shape == x.y_cached.shape and out.dtype == dtype and out.device == x.x.device
    gold = lowrank_gold(x)
    ref = lowrank_increment_ref(x.x, x.x_cached, x.y_cached, x.B, x.A, compute_dtype=dtype)
    err = errors(out, ref, gold)
    assert torch.isfinite(out).all(), f"{case.name} {dtype}: non-finite output"
    assert err.ok, f"{case.name} {dtype} via {via}: {err}"
    return err


LOWRANK_CASES = {
    # DiT-XL width, two 4096-token samples, rank 128 (the benchmark shape)
    "ditxl_r128": LowRankCase("ditxl_r128", (2, 4096), 1152, 1152, 128),
    # mlp_in shape, ragged row count (77 text tokens x 3), odd rank
    "mlp_in_r37": LowRankCase("mlp_in_r37", (3, 77), 1152, 4608, 37),
    # rank above the register tile: processed in rank chunks (256 + 44)
    "chunked_r300": LowRankCase("chunked_r300", (1000,), 72, 200, 300),
    # rank 1, widths not multiples of any tile
    "r1_ragged": LowRankCase("r1_ragged", (129,), 100, 33, 1),
    # non-contiguous x (a column slice of a wider buffer) and column-major y_c
    "strided_r64": LowRankCase("strided_r64", (515,), 288, 320, 64, strided=True),
}

LOWRANK_TINY_CASES = [
    LowRankCase("tiny", (2, 9), 40, 24, 5),
    LowRankCase("tiny_chunked", (17,), 20, 12, 260),
    LowRankCase("tiny_strided", (13,), 24, 20, 8, strided=True),
]


# ---------------------------------------------------------------------------------------------------------------
# end to end: the reference DiT with GRAT-B and ICC through torch.compile(backend="fxdit")
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def grat_b_sdpa(grid: tuple[int, ...], group: tuple[int, ...], radius: int, text_tokens: int = 0,
                text_first: bool = True) -> Iterator[dict[str, int]]:
    """Patch SDPA so that self-attention over the model's joint sequence applies the dense GRAT-B mask.

    Image token ``(h, w)`` in raster order (``(t, h, w)`` for video) belongs to group ``(h // gh, w // gw)``; an
    image query sees an image key when every group coordinate differs by at most ``radius``; text queries see
    every key and every query sees every text key. Yields counters (``calls``, ``masked``).
    """
    import torch.nn.functional as F

    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, len(grid))
    gcoords = coords // torch.tensor(group)
    image = ((gcoords[:, None, :] - gcoords[None, :, :]).abs() <= radius).all(-1)
    n = image.shape[0]
    s = n + text_tokens
    start = text_tokens if text_first else 0
    mask = torch.ones(s, s, dtype=torch.bool)
    mask[start:start + n, start:start + n] = image
    orig = F.scaled_dot_product_attention
    counts = {"calls": 0, "masked": 0}

    def wrapper(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        counts["calls"] += 1
        if attn_mask is None and query.shape[-2] == s and key.shape[-2] == s:
            attn_mask = mask.to(query.device)
            counts["masked"] += 1
        return orig(query, key, value, attn_mask, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = wrapper
    try:
        yield counts
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


@dataclass
class E2EResult:
    rel_err: list[float]
    psnr_db: list[float]
    rel_dense: list[float]
    schedule: list[bool]
    triton_calls: dict[str, int]
    rewritten: int
    planned: int
    dumped_ops: dict[str, int]


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's peak-to-peak range as the signal range."""
    mse = float(((out.double() - ref.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def count_triton_launches() -> Iterator[dict[str, int]]:
    """Count calls of the two Triton launchers (the CUDA path of ``torch.ops.fxdit.*`` imports them per call)."""
    import fxdit.kernels.grouped_attention as ga
    import fxdit.kernels.lowrank_increment as lr

    counts = {"grouped_attention": 0, "lowrank_increment": 0}
    orig_ga, orig_lr = ga.grouped_attention, lr.lowrank_increment

    def wrap(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def inner(*args: Any, **kwargs: Any) -> torch.Tensor:
            counts[name] += 1
            return fn(*args, **kwargs)
        return inner

    ga.grouped_attention = wrap("grouped_attention", orig_ga)
    lr.lowrank_increment = wrap("lowrank_increment", orig_lr)
    try:
        yield counts
    finally:
        ga.grouped_attention, lr.lowrank_increment = orig_ga, orig_lr


def dit_end_to_end(device: str | torch.device, *, grat: bool = True, icc: bool = True,
                   input_size: tuple[int, ...] = (128, 128), hidden: int = 288, heads: int = 4, depth: int = 2,
                   group: tuple[int, ...] = (16, 16), rank: int = 16, steps: int = 4, text_tokens: int = 0,
                   dump_dir: str | None = None) -> E2EResult:
    """Compile the reference DiT with fxdit (GRAT-B and/or ICC, period 2) and compare every step with an oracle.

    Oracle: the *eager* model with every SDPA call given the dense GRAT-B mask (:func:`grat_b_sdpa`, written from
    the method's definition in the model's raster token order; no fxdit code, no permutation). The block weights are
    exactly rank ``rank`` and the factors are their rank-``rank`` SVD, so ICC's cached steps equal full steps in
    real arithmetic: every step of the compiled model must match the oracle to fp32 rounding. Returns the errors per
    step, the schedule the runtime followed, how often each Triton launcher ran, and what the passes reported.
    """
    import fxdit
    from fxdit.apps.models.dit import DiT, DiTConfig, block_linear_roles, set_lowrank_block_weights

    torch.manual_seed(0)
    cfg_m = DiTConfig(depth=depth, hidden=hidden, heads=heads, input_size=input_size, num_classes=10,
                      text_tokens=text_tokens)
    model = DiT(cfg_m).eval()
    options: dict[str, Any] = {"on_pass_error": "raise"}
    if grat:
        options["attention"] = {"mode": "grat-b", "group": group, "min_tokens": 0}
    if icc:
        set_lowrank_block_weights(model, rank)
        g0 = torch.Generator().manual_seed(3)
        example = ((torch.randn(2, cfg_m.in_channels, *input_size, generator=g0), torch.full((2,), 500.0),
                    torch.tensor([0, 1])), {"text": torch.randn(2, text_tokens, hidden, generator=g0)}
                   if text_tokens else {})
        factors = fxdit.calibrate(model, method="svd", rank=rank, modules=block_linear_roles(model), example=example,
                                  progress=False)
        options["cache"] = {"factors": factors, "schedule": {"period": 2}}
    if dump_dir is not None:
        options["dump_dir"] = dump_dir
    model = model.to(device)

    g = torch.Generator().manual_seed(1)
    batch = 2
    x0 = torch.randn(batch, cfg_m.in_channels, *input_size, generator=g)
    calls = []
    for i in range(steps):
        x = (x0 + 0.05 * i * torch.randn(x0.shape, generator=g)).to(device)
        t = torch.full((batch,), 900.0 - 80.0 * i, device=device)
        kwargs = {"text": torch.randn(batch, text_tokens, hidden, generator=g).to(device)} if text_tokens else {}
        calls.append(((x, t, torch.tensor([1, 7], device=device)), kwargs))

    with torch.no_grad():
        dense = [model(*a, **kw) for a, kw in calls]
        if grat:
            grid = tuple(s // p for s, p in zip(input_size, cfg_m.patch_size))
            with grat_b_sdpa(grid, group, 1, text_tokens) as counts:
                oracle = [model(*a, **kw) for a, kw in calls]
            assert counts["masked"] == depth * steps, counts
        else:
            oracle = dense
        torch._dynamo.reset()
        fast = torch.compile(model, backend="fxdit", options=options, dynamic=False)
        with count_triton_launches() as launches, fxdit.sampling(fast, calls_per_step=1):
            outs = [fast(*a, **kw) for a, kw in calls]

    records = fxdit.reports(fast)
    rewritten = sum((r.report("rewrite_grouped_attention").rewritten if r.report("rewrite_grouped_attention")
                     else 0) for r in records)
    planned = sum((r.report("plan_cache").details.get("planned", 0) if r.report("plan_cache") else 0)
                  for r in records)
    schedule: list[bool] = []
    for r in records:
        if r.runtime is not None:
            schedule = list(r.runtime.stats.schedule)
    # op calls per ICC variant, from the graph dump (one ``torch.ops.fxdit.<op>.default(`` per call site)
    dumped = {f"{op}@{variant}": 0 for op in ("grouped_attention", "lowrank_increment")
              for variant in ("icc_full", "icc_cached")}
    if dump_dir is not None:
        for root, _, files in os.walk(dump_dir):
            variant = next((v for v in ("icc_full", "icc_cached") if os.path.basename(root).endswith(v)), None)
            if variant is None or "after.py" not in files:
                continue
            with open(os.path.join(root, "after.py")) as fh:
                text = fh.read()
            for op in ("grouped_attention", "lowrank_increment"):
                dumped[f"{op}@{variant}"] += text.count(f"torch.ops.fxdit.{op}.default(")
    return E2EResult([rel_l2(o, e) for o, e in zip(outs, oracle)], [psnr(o, e) for o, e in zip(outs, oracle)],
                     [rel_l2(d, e) for d, e in zip(dense, oracle)], schedule, dict(launches), rewritten, planned,
                     dumped)
