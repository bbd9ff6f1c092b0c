"""Grouped block-sparse flash attention (GRAT) in Triton: a forward kernel and its validating launcher.

Algorithm: flash-attention forward (online softmax with ``exp2``, running max ``m_i`` and normaliser ``l_i``, fp32
accumulator) restricted to the key blocks a BlockMask lists. One program per (query tile of ``BLOCK_M`` rows,
batch·head). It first walks the *full* key blocks of its query block without an element mask, then the *partial*
ones with the element mask ``group_adj[q_group[i], kv_group[j]]`` (tutorial ``STAGE`` split, as constexpr
``IS_FULL``). ``kv_valid[b, j]`` (per-batch key validity) and the sequence end are applied in both loops. A row that
sees no key returns zeros (same as :func:`fxdit.kernels.reference.grouped_attention_ref`).

Layout: ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]``, ``v [B, Hkv, Sk, Dv]`` (BHSD, any strides; the last dimension
should be contiguous for speed), output contiguous ``[B, Hq, Sq, Dv]``. GQA: query head ``h`` reads key/value head
``h // (Hq // Hkv)``.

Block mask: exactly FlexAttention's BlockMask format — ``kv_num_blocks [Bm, Hm, Qb]``, ``kv_indices [Bm, Hm, Qb, n]``
(partial blocks) and ``full_kv_num_blocks``/``full_kv_indices`` (full blocks), int32, ``Bm ∈ {1, B}``,
``Hm ∈ {1, Hq}``, ``Qb = ceil(Sq / block_size)``, ``block_size`` tokens per block on both axes (FlexAttention's
default is 128; :func:`fxdit.kernels.grat_layout.default_block_size` picks one dividing the group). The kernel tiles
``BLOCK_M``/``BLOCK_N`` may be smaller than the mask block: a program covers ``BLOCK_M`` rows of one mask row and
iterates ``block_size // BLOCK_N`` key sub-tiles inside every listed key block (``block_size`` must be a multiple of
16; configs whose tiles do not divide it are pruned).

Limits: fp16, bf16, fp32 (fp32 dots in IEEE precision); head dims 1..128 (padded to a power of two ≥ 16 with masked
loads); any sequence lengths (masked loads/stores). Forward only (GRAT is training-free).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["grouped_attention", "MAX_HEAD_DIM"]

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tiles: BLOCK_M 64/128 × BLOCK_N 32/64 are the usual flash-attention shapes for head dims ≤ 128 on A100/H100
# (tutorial 06 and FlexAttention's defaults: BLOCK_M=128, BLOCK_N=64, 8 warps, 3 stages for bf16 d=128). The list is
# kept small so autotuning stays quick; it has not been tuned on a GPU yet.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bm in (64, 128)
    for bn in (32, 64)
    for s in (2, 3)
    for w in (4, 8)
]


def _keep(conf: triton.Config) -> bool:
    """Prune combinations known to be poor: 128-row tiles with 4 warps spill the fp32 accumulator."""
    return not (conf.kwargs["BLOCK_M"] == 128 and conf.num_warps == 4)


def _prune_for_block(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    bs = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    ok = [c for c in configs if bs % c.kwargs["BLOCK_M"] == 0 and bs % c.kwargs["BLOCK_N"] == 0]
    if ok:
        return ok
    m = min(bs, 64)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": min(bs, 32)}, num_stages=2, num_warps=4)]


@triton.jit
def _grouped_attention_inner(acc, l_i, m_i, q, qg, row_ok,
                             K, V, ADJ, KG, KVV,
                             start_n, seq_k, adj_stride, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvv_n,
                             qk_scale, offs_d, offs_dv, D, DV,
                             BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, HAS_VALID: tl.constexpr,
                             DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < seq_k
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    visible = row_ok[:, None] & col_ok[None, :]
    if not IS_FULL:
        kg = tl.load(KG + offs_n, mask=col_ok, other=0)
        adj = tl.load(ADJ + qg[:, None] * adj_stride + kg[None, :], mask=visible, other=0)
        visible = visible & (adj != 0)
    if HAS_VALID:
        kvv = tl.load(KVV + offs_n * stride_kvv_n, mask=col_ok, other=0)
        visible = visible & (kvv[None, :] != 0)
    qk = tl.where(visible, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DOT_FP32:
        pv = p
    else:
        pv = p.to(v.dtype)
    if IEEE:
        acc = tl.dot(pv, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(pv, v, acc)
    return acc, l_i, m_new


@triton.jit
def _grouped_attention_fwd_kernel(
    Q, K, V, Out, QG, KG, ADJ, KVV,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_in,
    stride_fnb, stride_fnh, stride_fnm,
    stride_fib, stride_fih, stride_fim, stride_fin,
    stride_kvv_b, stride_kvv_n,
    adj_stride, seq_q, seq_k, num_heads, kv_group_size, D, DV, qk_scale,
    BLOCK_SIZE: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_VALID: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_b = off_hz // num_heads
    off_h = off_hz % num_heads
    off_hk = off_h // kv_group_size
    q_blk = (start_m * BLOCK_M) // BLOCK_SIZE

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row_ok = offs_m < seq_q

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    kvv_base = KVV + off_b.to(tl.int64) * stride_kvv_b

    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qg = tl.load(QG + offs_m, mask=row_ok, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    # full blocks: every element visible under group_adj (no element mask)
    fn_ptr = FULL_NUM + off_b * stride_fnb + off_h * stride_fnh + q_blk * stride_fnm
    fi_ptr = FULL_IDX + off_b * stride_fib + off_h * stride_fih + q_blk * stride_fim
    n_full = tl.load(fn_ptr)
    for i in range(0, n_full):
        kb = tl.load(fi_ptr + i * stride_fin)
        for sub in range(0, BLOCK_SIZE // BLOCK_N):
            start_n = kb * BLOCK_SIZE + sub * BLOCK_N
            acc, l_i, m_i = _grouped_attention_inner(
                acc, l_i, m_i, q, qg, row_ok, k_base, v_base, ADJ, KG, kvv_base,
                start_n, seq_k, adj_stride, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvv_n,
                qk_scale, offs_d, offs_dv, D, DV,
                BLOCK_N, True, HAS_VALID, DOT_FP32, IEEE)

    # partial blocks: element mask group_adj[q_group[i], kv_group[j]]
    pn_ptr = KV_NUM + off_b * stride_nb + off_h * stride_nh + q_blk * stride_nm
    pi_ptr = KV_IDX + off_b * stride_ib + off_h * stride_ih + q_blk * stride_im
    n_part = tl.load(pn_ptr)
    for i in range(0, n_part):
        kb = tl.load(pi_ptr + i * stride_in)
        for sub in range(0, BLOCK_SIZE // BLOCK_N):
            start_n = kb * BLOCK_SIZE + sub * BLOCK_N
            acc, l_i, m_i = _grouped_attention_inner(
                acc, l_i, m_i, q, qg, row_ok, k_base, v_base, ADJ, KG, kvv_base,
                start_n, seq_k, adj_stride, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvv_n,
                qk_scale, offs_d, offs_dv, D, DV,
                BLOCK_N, False, HAS_VALID, DOT_FP32, IEEE)

    denom = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / denom[:, None]
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))


_grouped_attention_fwd_tuned = triton.autotune(
    configs=[c for c in _CONFIGS if _keep(c)],
    key=["seq_q", "seq_k", "D", "DV", "BLOCK_SIZE", "HAS_VALID"],
    prune_configs_by={"early_config_prune": _prune_for_block},
)(_grouped_attention_fwd_kernel)


def _pad_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _check_table(name: str, t: Tensor, ndim: int, b: int, h: int, qb: int) -> Tensor:
    if t.dim() != ndim:
        raise ValueError(f"grouped_attention: {name} must be {ndim}-D (FlexAttention BlockMask format), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_attention: {name} must be int32, got {t.dtype}")
    if t.shape[0] not in (1, b) or t.shape[1] not in (1, h) or t.shape[2] != qb:
        raise ValueError(f"grouped_attention: {name} has shape {tuple(t.shape)}; expected [1 or {b}, 1 or {h}, {qb}"
                         f"{', n' if ndim == 4 else ''}] for Sq={qb} query blocks")
    t = t.to(torch.int32)
    return t.expand(b, h, *t.shape[2:])


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                      kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor,
                      kv_valid: Tensor | None = None, *, scale: float | None = None, block_size: int = 128,
                      check_values: bool = False) -> Tensor:
    """Grouped block-sparse attention forward (Triton).

    Args:
        q: ``[B, Hq, Sq, D]`` fp16/bf16/fp32.
        k: ``[B, Hkv, Sk, D]``, same dtype, ``Hq % Hkv == 0``.
        v: ``[B, Hkv, Sk, Dv]``, same dtype.
        q_group: int ``[Sq]`` query classes (rows of ``group_adj``).
        kv_group: int ``[Sk]`` key classes (columns of ``group_adj``).
        group_adj: bool ``[Gq, Gk]``.
        kv_num_blocks, kv_indices: partial blocks (BlockMask format).
        full_kv_num_blocks, full_kv_indices: full blocks (BlockMask format).
        kv_valid: optional bool ``[B, Sk]`` key validity.
        scale: softmax scale (``None``: ``1/sqrt(D)``).
        block_size: BlockMask block size (both axes), a multiple of 16.
        check_values: also check class ids and block indices against their ranges (synchronises the device).

    Returns:
        Contiguous ``[B, Hq, Sq, Dv]`` in the dtype of ``q``.

    Raises:
        ValueError: a device, dtype, shape, stride or block-size mismatch (the message names the argument).
    """
    interp = _interpreting()
    tensors = {"q": q, "k": k, "v": v, "q_group": q_group, "kv_group": kv_group, "group_adj": group_adj,
               "kv_num_blocks": kv_num_blocks, "kv_indices": kv_indices, "full_kv_num_blocks": full_kv_num_blocks,
               "full_kv_indices": full_kv_indices}
    if kv_valid is not None:
        tensors["kv_valid"] = kv_valid
    if not interp and not q.is_cuda:
        raise ValueError(f"grouped_attention: q is on {q.device}; the Triton kernel needs CUDA tensors (use "
                         f"fxdit.kernels.reference.grouped_attention_ref on CPU)")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"grouped_attention: {name} is on {t.device}, q on {q.device}; expected one device")
    if q.dtype not in _DTYPES:
        raise ValueError(f"grouped_attention: q.dtype={q.dtype}; expected one of {_DTYPES}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"grouped_attention: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must match")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"grouped_attention: expected 4-D BHSD q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hq, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if bk != b or v.shape[0] != b or v.shape[1] != hkv or v.shape[2] != sk or dk != d:
        raise ValueError(f"grouped_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         f"expected k [B, Hkv, Sk, D] and v [B, Hkv, Sk, Dv] matching q [B, Hq, Sq, D]")
    dv = v.shape[3]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"grouped_attention: Hq={hq} is not a multiple of Hkv={hkv} (GQA)")
    if not (1 <= d <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM):
        raise ValueError(f"grouped_attention: head dims D={d}, Dv={dv}; supported 1..{MAX_HEAD_DIM}")
    if not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"grouped_attention: block_size={block_size!r}; expected a multiple of 16")
    if q_group.dim() != 1 or q_group.shape[0] != sq or q_group.is_floating_point() or q_group.dtype == torch.bool:
        raise ValueError(f"grouped_attention: q_group must be an integer [{sq}] tensor, got {q_group.dtype} "
                         f"{tuple(q_group.shape)}")
    if kv_group.dim() != 1 or kv_group.shape[0] != sk or kv_group.is_floating_point() or kv_group.dtype == torch.bool:
        raise ValueError(f"grouped_attention: kv_group must be an integer [{sk}] tensor, got {kv_group.dtype} "
                         f"{tuple(kv_group.shape)}")
    if group_adj.dim() != 2 or group_adj.dtype != torch.bool:
        raise ValueError(f"grouped_attention: group_adj must be a 2-D bool tensor, got {group_adj.dtype} "
                         f"{tuple(group_adj.shape)}")
    if kv_valid is not None and (kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (b, sk)):
        raise ValueError(f"grouped_attention: kv_valid must be bool [{b}, {sk}], got {kv_valid.dtype} "
                         f"{tuple(kv_valid.shape)}")
    qb, kb_total = -(-sq // block_size), -(-sk // block_size)
    kv_num = _check_table("kv_num_blocks", kv_num_blocks, 3, b, hq, qb)
    kv_idx = _check_table("kv_indices", kv_indices, 4, b, hq, qb)
    f_num = _check_table("full_kv_num_blocks", full_kv_num_blocks, 3, b, hq, qb)
    f_idx = _check_table("full_kv_indices", full_kv_indices, 4, b, hq, qb)
    if check_values:
        gq, gk = group_adj.shape
        if int(q_group.min()) < 0 or int(q_group.max()) >= gq:
            raise ValueError(f"grouped_attention: q_group values outside [0, {gq})")
        if int(kv_group.min()) < 0 or int(kv_group.max()) >= gk:
            raise ValueError(f"grouped_attention: kv_group values outside [0, {gk})")
        for nm, num, idx in (("kv", kv_num, kv_idx), ("full_kv", f_num, f_idx)):
            if int(num.max()) > idx.shape[-1] or int(num.min()) < 0:
                raise ValueError(f"grouped_attention: {nm}_num_blocks exceeds the width of {nm}_indices")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= kb_total):
                raise ValueError(f"grouped_attention: {nm}_indices outside [0, {kb_total})")

    qg = q_group.to(torch.int32).contiguous()
    kg = kv_group.to(torch.int32).contiguous()
    adj = group_adj.to(torch.int8).contiguous()
    kvv = kv_valid.to(torch.int8).contiguous() if kv_valid is not None else adj  # dummy pointer when absent
    out = torch.empty((b, hq, sq, dv), device=q.device, dtype=q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qk_scale = float(scale) * 1.4426950408889634  # log2(e): exp2-based softmax

    args = [
        q, k, v, out, qg, kg, adj, kvv, kv_num, kv_idx, f_num, f_idx,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *kv_num.stride(), *kv_idx.stride(), *f_num.stride(), *f_idx.stride(),
        kvv.stride(0) if kv_valid is not None else 0, kvv.stride(1) if kv_valid is not None else 0,
        adj.stride(0), sq, sk, hq, hq // hkv, d, dv, qk_scale,
    ]
    meta = dict(BLOCK_SIZE=block_size, D_PAD=_pad_dim(d), DV_PAD=_pad_dim(dv), HAS_VALID=kv_valid is not None,
                IEEE=q.dtype == torch.float32)
    if interp:
        # The interpreter runs one config; bf16/fp16 tl.dot is unreliable there, so dots run in fp32.
        grid = (triton.cdiv(sq, 16), b * hq)
        _grouped_attention_fwd_kernel[grid](*args, **meta, DOT_FP32=True, BLOCK_M=16, BLOCK_N=16)
    else:
        def grid(meta_: dict[str, Any]) -> tuple[int, int]:
            return (triton.cdiv(sq, meta_["BLOCK_M"]), b * hq)

        _grouped_attention_fwd_tuned[grid](*args, **meta, DOT_FP32=False)
    return out
