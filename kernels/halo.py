"""Context parallelism building blocks: row sharding plans, halo exchange, LSE merge, Ulysses all-to-all.

Pure torch and python; knows nothing of graphs. The ``shard_tokens`` pass inserts calls to the ``*_attention``,
:func:`take_local` and :func:`gather_tokens` functions below as single graph nodes; everything they do is ordinary
aten ops plus ``torch.distributed``'s *functional* collectives (``torch.ops._c10d_functional.*`` followed by
``wait_tensor``), so the graph stays whole: run as Python (eager) or traced by AOT autograd and compiled by inductor
(which lowers functional collectives on CPU/gloo as well as on CUDA/NCCL). Every size is a static Python int fixed
at pass time for the calling rank; every rank calls the same collectives in the same order.

Layout: q/k/v are BHSD. The image tokens of a sequence occupy ``[image_start, image_start + n_local)`` on every rank
(the rank's band of group rows, in group order); all other positions are text/conditioning tokens, replicated on
every rank.

* **Sharding** (:func:`split_rows`): the image tokens are cut into whole *group rows* (``gt·gh·W`` tokens in group
  order: the ``W'`` groups of one ``(t', h')``); rank ``r`` owns a contiguous range of rows, the first ``R mod P``
  ranks one row more (uneven splits). Video: rows are indexed by ``(t', h')`` flattened, so a band may cross a
  frame-group boundary.
* **Halo** (:func:`halo_plan`): GRAT-B with radius ``b`` makes a query row need the key rows within ``b`` on the
  ``t'`` and ``h'`` axes; for a band that is the row range ``[min, max]`` of those rows (for images ``b`` rows each
  side; for video ``b·H' + b``). Each rank receives exactly the rows of that range owned by others, with one
  ``all_to_all_single`` whose split sizes are zero except for the owners (usually the two neighbours; more when a
  band is thinner than the halo), K and V packed together.
* **Text queries** attend every image key: each rank attends its own image keys (rank 0 also the text keys), and the
  partial results are merged exactly by a log-sum-exp all-reduce (max of the row maxima, then one sum of the
  rescaled numerators and denominators). No K/V is gathered.
* **Ulysses**: an all-to-all turns (all heads, local tokens) into (``H/P`` heads, all tokens), the attention runs on
  the whole sequence, and a second all-to-all turns it back; text tokens (replicated) are sliced by heads locally and
  their outputs all-gathered over heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fxdit.kernels import ops
from torch import Tensor

__all__ = [
    "split_rows",
    "halo_rows",
    "HaloPlan",
    "halo_plan",
    "take_local",
    "gather_tokens",
    "halo_grouped_attention",
    "ulysses_attention",
    "halo_bytes",
    "ulysses_bytes",
    "ring_bytes",
]


def _c10d() -> object:
    import torch.distributed._functional_collectives  # noqa: F401 - registers torch.ops._c10d_functional

    return torch.ops._c10d_functional


# ---------------------------------------------------------------------------------------------------------------
# Plans (pure python)
# ---------------------------------------------------------------------------------------------------------------


def split_rows(rows: int, world: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` row range of every rank; the first ``rows % world`` ranks get one row more.

    Raises:
        ValueError: when there are fewer rows than ranks.
    """
    if world < 1 or rows < world:
        raise ValueError(f"rows={rows}, world={world}; expected at least one row per rank")
    base, extra = divmod(rows, world)
    out, start = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0)
        out.append((start, start + n))
        start += n
    return tuple(out)


def halo_rows(own: tuple[int, int], row_grid: tuple[int, int], radius: int) -> tuple[int, int]:
    """Row range a band of rows needs for GRAT-B with ``radius`` (clipped at the border).

    Args:
        own: ``[start, stop)`` rows, rows numbered ``t'·H' + h'``.
        row_grid: ``(T', H')``.
        radius: GRAT-B radius in groups.
    """
    tp, hp = row_grid
    cand = []
    for r in range(own[0], own[1]):
        t, h = divmod(r, hp)
        cand.append(max(0, t - radius) * hp + max(0, h - radius))
        cand.append(min(tp - 1, t + radius) * hp + min(hp - 1, h + radius))
    first, last = min(cand), max(cand)
    return first, last + 1


@dataclass(frozen=True)
class HaloPlan:
    """What one rank sends and receives in the halo exchange (token counts; static).

    Attributes:
        rank, world: this rank and the group size.
        own: ``[start, stop)`` image tokens (group order) this rank holds.
        need: ``[start, stop)`` image tokens its queries may attend (``own`` plus the halo).
        send: per destination rank, ``(local start, length)`` of the tokens sent to it (length 0: nothing).
        recv: tokens received from each rank, in rank order (they concatenate to ``need`` minus ``own``).
    """

    rank: int
    world: int
    own: tuple[int, int]
    need: tuple[int, int]
    send: tuple[tuple[int, int], ...]
    recv: tuple[int, ...]

    @property
    def before(self) -> int:
        """Received tokens that come before ``own`` (from lower ranks)."""
        return self.own[0] - self.need[0]

    @property
    def sent_tokens(self) -> int:
        return sum(n for _, n in self.send)


def halo_plan(rank: int, bands: tuple[tuple[int, int], ...], needs: tuple[tuple[int, int], ...],
              row_tokens: int) -> HaloPlan:
    """The exchange of ``rank`` given every rank's own row band and needed row range."""
    a, b = bands[rank]
    c, d = needs[rank]
    send, recv = [], []
    for q, ((qa, qb), (qc, qd)) in enumerate(zip(bands, needs)):
        if q == rank:
            send.append((0, 0))
            recv.append(0)
            continue
        lo, hi = max(a, qc), min(b, qd)
        send.append(((lo - a) * row_tokens, max(0, hi - lo) * row_tokens))
        recv.append(max(0, min(qb, d) - max(qa, c)) * row_tokens)
    return HaloPlan(rank, len(bands), (a * row_tokens, b * row_tokens), (c * row_tokens, d * row_tokens),
                    tuple(send), tuple(recv))


# ---------------------------------------------------------------------------------------------------------------
# Token sharding and gathering
# ---------------------------------------------------------------------------------------------------------------


def take_local(x: Tensor, dim: int, offset: int, start: int, length: int, n_tokens: int) -> Tensor:
    """Keep the image tokens ``[offset + start, offset + start + length)`` of ``x`` along ``dim``; positions outside
    the image span ``[offset, offset + n_tokens)`` (text) are kept whole."""
    size = x.shape[dim]
    parts = []
    if offset > 0:
        parts.append(x.narrow(dim, 0, offset))
    parts.append(x.narrow(dim, offset + start, length))
    tail = size - offset - n_tokens
    if tail > 0:
        parts.append(x.narrow(dim, offset + n_tokens, tail))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def gather_tokens(x: Tensor, dim: int, offset: int, counts: tuple[int, ...], rank: int, group_name: str) -> Tensor:
    """The inverse of :func:`take_local` on every rank: all-gather the image tokens (rank order) along ``dim``."""
    c10d = _c10d()
    world = len(counts)
    n_local, n_max = counts[rank], max(counts)
    size = x.shape[dim]
    img = x.narrow(dim, offset, n_local).movedim(dim, 0)
    if n_max > n_local:
        img = torch.cat([img, img.new_zeros((n_max - n_local, *img.shape[1:]))], 0)
    out = c10d.all_gather_into_tensor(img.contiguous(), world, group_name)
    out = c10d.wait_tensor(out)
    full = torch.cat([out.narrow(0, r * n_max, counts[r]) for r in range(world)], 0).movedim(0, dim)
    parts = []
    if offset > 0:
        parts.append(x.narrow(dim, 0, offset))
    parts.append(full)
    tail = size - offset - n_local
    if tail > 0:
        parts.append(x.narrow(dim, offset + n_local, tail))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def _split_seq(x: Tensor, start: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    s = x.shape[2]
    return x.narrow(2, 0, start), x.narrow(2, start, n), x.narrow(2, start + n, s - start - n)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _lse_text_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, group_name: str) -> Tensor:
    """Text queries over keys spread across ranks: local partial softmax, exact merge by a log-sum-exp all-reduce."""
    c10d = _c10d()
    dt = _compute_dtype(q)
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    num = torch.matmul(p, v.to(dt))
    den = p.sum(-1, keepdim=True)
    m_all = c10d.wait_tensor(c10d.all_reduce(m.contiguous(), "max", group_name))
    w = torch.exp(m - m_all)
    packed = torch.cat([num * w, den * w], -1).contiguous()
    tot = c10d.wait_tensor(c10d.all_reduce(packed, "sum", group_name))
    dv = v.shape[-1]
    return (tot[..., :dv] / tot[..., dv:]).to(q.dtype)


@ops.calls_grouped_attention
def halo_grouped_attention(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                           kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                           full_kv_indices: Tensor, scale: float, block_size: int, image_start: int, n_local: int,
                           send: tuple[tuple[int, int], ...], recv: tuple[int, ...], before: int, rank: int,
                           group_name: str) -> Tensor:
    """GRAT-B on a band of rows: halo exchange of K/V, local grouped attention, LSE-merged text queries.

    ``q_group``/``kv_group`` and the block tables describe the *local* problem: the band's image queries against the
    keys ``[halo before | own | halo after | text]`` (built by the pass from the global adjacency ``group_adj``).
    Returns the attention output in the layout of ``q`` (local image tokens, replicated text tokens).
    """
    c10d = _c10d()
    q0, qi, q1 = _split_seq(q, image_start, n_local)
    k0, ki, k1 = _split_seq(k, image_start, n_local)
    v0, vi, v1 = _split_seq(v, image_start, n_local)
    dk = ki.shape[-1]
    kv = torch.cat([ki, vi], -1)  # one exchange for K and V
    if send:
        chunks = [kv.narrow(2, s, n) for s, n in send if n > 0]
        if chunks:
            out_send = torch.cat(chunks, 2).permute(2, 0, 1, 3).contiguous()
        else:
            out_send = kv.new_empty((0, kv.shape[0], kv.shape[1], kv.shape[3]))
        got = c10d.all_to_all_single(out_send, list(recv), [n for _, n in send], group_name)
        got = c10d.wait_tensor(got).permute(1, 2, 0, 3)
        n_recv = sum(recv)
        ext = torch.cat([got.narrow(2, 0, before), kv, got.narrow(2, before, n_recv - before)], 2)
    else:  # radius 0 on every rank: nothing to exchange
        ext = kv
    text_k = torch.cat([k0, k1], 2)
    text_v = torch.cat([v0, v1], 2)
    k_all = torch.cat([ext[..., :dk], text_k], 2).contiguous()
    v_all = torch.cat([ext[..., dk:], text_v], 2).contiguous()
    o_img = torch.ops.fxdit.grouped_attention.default(
        qi.contiguous(), k_all, v_all, q_group, kv_group, group_adj, kv_num_blocks, kv_indices, full_kv_num_blocks,
        full_kv_indices, None, scale, block_size)
    n_text = q0.shape[2] + q1.shape[2]
    if n_text == 0:
        return o_img
    qt = torch.cat([q0, q1], 2)
    if rank == 0:
        kt, vt = torch.cat([ki, text_k], 2), torch.cat([vi, text_v], 2)
    else:
        kt, vt = ki, vi
    o_txt = _lse_text_attention(qt, kt, vt, scale, group_name)
    return torch.cat([o_txt.narrow(2, 0, q0.shape[2]), o_img, o_txt.narrow(2, q0.shape[2], q1.shape[2])], 2)


def _heads_to_tokens(x: Tensor, counts: tuple[int, ...], group_name: str) -> Tensor:
    """``[B, H, n_local, D]`` (local tokens, all heads) → ``[B, H/P, N, D]`` (all tokens, this rank's heads)."""
    c10d = _c10d()
    world = len(counts)
    b, h, n, d = x.shape
    send = x.reshape(b, world, h // world, n, d).permute(1, 3, 0, 2, 4).reshape(world * n, b, h // world, d)
    got = c10d.wait_tensor(c10d.all_to_all_single(send.contiguous(), list(counts), [n] * world, group_name))
    return got.permute(1, 2, 0, 3)


def _tokens_to_heads(y: Tensor, counts: tuple[int, ...], rank: int, group_name: str) -> Tensor:
    """The inverse of :func:`_heads_to_tokens`."""
    c10d = _c10d()
    world = len(counts)
    b, hp, _, d = y.shape
    n = counts[rank]
    send = y.permute(2, 0, 1, 3).contiguous()
    got = c10d.wait_tensor(c10d.all_to_all_single(send, [n] * world, list(counts), group_name))
    return got.reshape(world, n, b, hp, d).permute(2, 0, 3, 1, 4).reshape(b, world * hp, n, d)


@ops.calls_grouped_attention
def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, tables: list[Tensor], scale: float | None, block_size: int,
                      image_start: int, counts: tuple[int, ...], rank: int, group_name: str) -> Tensor:
    """Attention over the whole sequence by an all-to-all over heads (Ulysses).

    ``tables`` empty: dense SDPA (``scale``; ``None`` = default). Otherwise the seven tensors of
    ``fxdit::grouped_attention`` for the *whole* sequence (``q_group, kv_group, group_adj`` and the block tables).
    """
    c10d = _c10d()
    world = len(counts)
    n_local = counts[rank]
    q0, qi, q1 = _split_seq(q, image_start, n_local)
    k0, ki, k1 = _split_seq(k, image_start, n_local)
    v0, vi, v1 = _split_seq(v, image_start, n_local)

    def heads(x: Tensor) -> Tensor:
        hp = x.shape[1] // world
        return x.narrow(1, rank * hp, hp)

    def full(x0: Tensor, xi: Tensor, x1: Tensor) -> Tensor:
        return torch.cat([heads(x0), _heads_to_tokens(xi, counts, group_name), heads(x1)], 2).contiguous()

    qf, kf, vf = full(q0, qi, q1), full(k0, ki, k1), full(v0, vi, v1)
    if tables:
        out = torch.ops.fxdit.grouped_attention.default(qf, kf, vf, *tables, None, float(scale), block_size)
    else:
        gqa = qf.shape[1] != kf.shape[1]
        out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale, enable_gqa=gqa)
    n_img = sum(counts)
    o0, oi, o1 = _split_seq(out, image_start, n_img)
    o_img = _tokens_to_heads(oi.contiguous(), counts, rank, group_name)
    n_text = o0.shape[2] + o1.shape[2]
    if n_text == 0:
        return o_img
    ot = torch.cat([o0, o1], 2).permute(1, 0, 2, 3).contiguous()
    ot = c10d.wait_tensor(c10d.all_gather_into_tensor(ot, world, group_name)).permute(1, 0, 2, 3)
    return torch.cat([ot.narrow(2, 0, o0.shape[2]), o_img, ot.narrow(2, o0.shape[2], o1.shape[2])], 2)


# ---------------------------------------------------------------------------------------------------------------
# Communication volume (closed forms and counts; bytes handed to collectives per rank and attention layer)
# ---------------------------------------------------------------------------------------------------------------


def halo_bytes(plan: HaloPlan, batch: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Bytes this rank sends in one GRAT-B halo exchange (K and V), image tokens only."""
    return plan.sent_tokens * batch * kv_heads * 2 * head_dim * elem


def ulysses_bytes(n_local: int, world: int, batch: int, heads: int, head_dim: int, elem: int) -> int:
    """Bytes this rank sends to other ranks in Ulysses: q, k, v in and the output back, ``(P−1)/P`` of each."""
    per = n_local * batch * heads * head_dim * elem
    return int(round(4 * per * (world - 1) / world))


def ring_bytes(n_tokens: int, world: int, batch: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Bytes one rank sends in ring attention: K and V of ``(P−1)/P·N`` tokens pass through it."""
    return int(round(2 * (world - 1) / world * n_tokens * batch * kv_heads * head_dim * elem))

