"""Pure-torch references for fxdit's kernels (test oracles, fake/CPU fallbacks).

Imports on CPU without Triton. Every function here is deliberately simple (dense, no tiling): it defines what
the fast kernels must compute.

Grouped attention semantics (``grouped_attention_ref``):

* ``q``: ``[B, Hq, Sq, D]``, ``k``/``v``: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` reads
  key/value head ``h // (Hq // Hkv)``).
* ``q_group``: int ``[Sq]`` row class of every query position; ``kv_group``: int ``[Sk]`` column class of every
  key position; ``group_adj``: bool ``[Gq, Gk]``. Query ``i`` may attend key ``j`` iff
  ``group_adj[q_group[i], kv_group[j]]`` and (when given) ``kv_valid[b, j]`` (bool ``[B, Sk]``).
* A query row that sees no key at all returns **zeros** (not NaN, unlike SDPA with an all-false mask). The Triton
  kernel and the FlexAttention lowering do the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["grouped_attention_ref", "grouped_dense_mask"]


def grouped_dense_mask(q_group: Tensor, kv_group: Tensor, group_adj: Tensor, kv_valid: Tensor | None = None) -> Tensor:
    """The dense boolean mask equivalent to a grouped adjacency.

    Args:
        q_group: int ``[Sq]`` class per query position.
        kv_group: int ``[Sk]`` class per key position.
        group_adj: bool ``[Gq, Gk]``.
        kv_valid: optional bool ``[B, Sk]`` key validity.

    Returns:
        bool ``[Sq, Sk]`` (no ``kv_valid``) or ``[B, 1, Sq, Sk]`` (with ``kv_valid``).
    """
    adj = group_adj.to(torch.bool)
    mask = adj[q_group.long()][:, kv_group.long()]
    if kv_valid is None:
        return mask
    return mask[None, None] & kv_valid.to(torch.bool)[:, None, None, :]


def grouped_attention_ref(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                          kv_valid: Tensor | None = None, *, scale: float | None = None,
                          compute_dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Dense masked attention with the grouped mask; the oracle for :func:`fxdit.kernels.grouped_attention`.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k: ``[B, Hkv, Sk, D]``.
        v: ``[B, Hkv, Sk, Dv]``.
        q_group: int ``[Sq]``.
        kv_group: int ``[Sk]``.
        group_adj: bool ``[Gq, Gk]``.
        kv_valid: optional bool ``[B, Sk]``.
        scale: softmax scale; ``None`` means ``1/sqrt(D)``.
        compute_dtype: dtype the attention is computed in (``None``: the input dtype). The result is cast back to
            ``q.dtype``.

    Returns:
        ``[B, Hq, Sq, Dv]`` contiguous, dtype of ``q``. Rows with no visible key are zero.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"grouped_attention_ref: expected 4-D BHSD q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"grouped_attention_ref: query heads {hq} not a multiple of key/value heads {hkv}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out_dtype = q.dtype
    dt = compute_dtype or q.dtype
    qc, kc, vc = q.to(dt), k.to(dt), v.to(dt)
    if hkv != hq:
        rep = hq // hkv
        kc = kc.repeat_interleave(rep, dim=1)
        vc = vc.repeat_interleave(rep, dim=1)
    mask = grouped_dense_mask(q_group, kv_group, group_adj, kv_valid)
    if mask.dim() == 2:
        mask = mask[None, None]
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p, vc)
    return out.to(out_dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# lowrank_increment_ref (ICC low-rank increment; owned by helper "calibration")
# ---------------------------------------------------------------------------------------------------------------

__all__.append("lowrank_increment_ref")


def lowrank_increment_ref(x: Tensor, x_cached: Tensor, y_cached: Tensor, B: Tensor, A: Tensor, *,
                          compute_dtype: torch.dtype | None = None) -> Tensor:
    """ICC's increment-calibrated output ``Y = Y_c + (X − X_c)·Bᵀ·Aᵀ`` (row-vector convention, no bias).

    The oracle for :func:`fxdit.kernels.lowrank_increment.lowrank_increment` and the CPU path of
    ``fxdit::lowrank_increment``.

    Args:
        x: current input ``[..., in]``.
        x_cached: input cached at the last full step, same shape as ``x``.
        y_cached: output (bias included) cached at the last full step, ``[..., out]`` (same leading dims).
        B: ``[r, in]`` right factor.
        A: ``[out, r]`` left factor (``A @ B ≈ W``).
        compute_dtype: dtype to compute in (``None``: the input dtype; pass ``torch.float64`` for a golden value).

    Returns:
        ``[..., out]`` contiguous, dtype of ``y_cached``.
    """
    if x.shape != x_cached.shape:
        raise ValueError(f"lowrank_increment_ref: x {tuple(x.shape)} and x_cached {tuple(x_cached.shape)} differ")
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != x.shape[-1] or A.shape[1] != B.shape[0]:
        raise ValueError(f"lowrank_increment_ref: expected B [r, {x.shape[-1]}] and A [out, r], got "
                         f"{tuple(B.shape)} and {tuple(A.shape)}")
    if tuple(y_cached.shape) != tuple(x.shape[:-1]) + (A.shape[0],):
        raise ValueError(f"lowrank_increment_ref: y_cached {tuple(y_cached.shape)}; expected "
                         f"{tuple(x.shape[:-1]) + (A.shape[0],)}")
    dt = compute_dtype or y_cached.dtype
    k, n = x.shape[-1], A.shape[0]
    diff = (x.to(dt) - x_cached.to(dt)).reshape(-1, k)
    z = diff @ B.to(dt).t()
    y = torch.addmm(y_cached.to(dt).reshape(-1, n), z, A.to(dt).t())
    return y.reshape(y_cached.shape).to(y_cached.dtype).contiguous()
