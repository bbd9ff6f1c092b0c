"""Fused ICC low-rank increment: ``Y = Y_c + (X − X_c)·Bᵀ·Aᵀ`` in one Triton kernel.

Algorithm (one program per tile of ``BLOCK_M`` rows):

1. ``Z = (X − X_c)·Bᵀ``: loop over the input dimension in ``BLOCK_K`` tiles, load the X and X_c tiles, subtract in
   fp32 and accumulate ``[BLOCK_M, BLOCK_R]`` in an fp32 register accumulator. The difference is never written to
   memory.
2. For every ``BLOCK_N`` tile of the output dimension: ``Y = Y_c + Z·Aᵀ`` (fp32 accumulate), stored in the
   output dtype.

So X, X_c and Y_c are read once and Y written once; B and A are re-read per row tile (they are small: ``r × in``
and ``out × r``).

Layout: X, X_c ``[..., in]``, Y_c ``[..., out]`` (any strides; leading dims are flattened), B ``[r, in]``, A
``[out, r]`` (any strides). The rank ``r`` need not be a power of two: it is padded to ``BLOCK_R`` (≥ 16, a power
of two) with masked loads. Ranks above ``_MAX_BLOCK_R`` are processed in rank chunks, one launch per chunk, each
chunk's output becoming the next chunk's ``Y_c`` (exact in real arithmetic: the increment is linear in the rank
dimension).

Dtypes: fp32, fp16, bf16 (all five tensors the same dtype). Accumulation is fp32; fp32 inputs use IEEE fp32 dots
(not TF32) so the kernel is as accurate as the fp32 torch reference. Under ``TRITON_INTERPRET=1`` everything is
computed in fp32 (bf16 ``tl.dot`` is wrong in the interpreter).

Limits: CUDA tensors (CPU tensors only under the interpreter). Not autotuned: one configuration chosen from the
rank (the interpreter runs one config only, and no GPU was available when this was written, so the block sizes
below are unmeasured defaults; see the comments).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["lowrank_increment"]

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest rank tile held in registers: a [BLOCK_M, 256] fp32 accumulator at BLOCK_M=32 is 32 KiB per program,
# the same register footprint as a 64x128 GEMM tile. Unmeasured on a GPU (none was available); a conservative
# default.
_MAX_BLOCK_R = 256
_BLOCK_K = 64
_BLOCK_N = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _lowrank_increment_kernel(
    Y, X, XC, YC, Bm, Am,
    M, K, N, R,
    stride_xm, stride_xk, stride_xcm, stride_xck,
    stride_ycm, stride_ycn, stride_ym, stride_yn,
    stride_br, stride_bk, stride_an, stride_ar,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R

    # Phase 1: Z = (X - X_c) @ B^T, fp32 accumulator [BLOCK_M, BLOCK_R].
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_mk = mask_m[:, None] & mask_k[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_mk, other=0.0)
        xc = tl.load(XC + rows[:, None] * stride_xcm + offs_k[None, :] * stride_xck, mask=mask_mk, other=0.0)
        d = x.to(tl.float32) - xc.to(tl.float32)
        # B^T tile [BLOCK_K, BLOCK_R]
        bt = tl.load(Bm + offs_k[:, None] * stride_bk + offs_r[None, :] * stride_br,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if FP32_DOT:
            z = tl.dot(d, bt.to(tl.float32), z, input_precision="ieee")
        else:
            z = tl.dot(d.to(bt.dtype), bt, z)

    # Phase 2: Y = Y_c + Z @ A^T, one output tile at a time.
    if not FP32_DOT:
        zq = z.to(Am.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_mn = mask_m[:, None] & mask_n[None, :]
        # A^T tile [BLOCK_R, BLOCK_N]
        at = tl.load(Am + offs_r[:, None] * stride_ar + offs_n[None, :] * stride_an,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        yc = tl.load(YC + rows[:, None] * stride_ycm + offs_n[None, :] * stride_ycn, mask=mask_mn, other=0.0)
        if FP32_DOT:
            acc = tl.dot(z, at.to(tl.float32), yc.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(zq, at, yc.to(tl.float32))
        tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(Y.dtype.element_ty), mask=mask_mn)


def _validate(x: Tensor, x_cached: Tensor, y_cached: Tensor, B: Tensor, A: Tensor) -> None:
    names = ("x", "x_cached", "y_cached", "B", "A")
    tensors = (x, x_cached, y_cached, B, A)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"lowrank_increment: {name} must be a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"lowrank_increment: {name} must be a dense strided tensor, got layout {t.layout}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"lowrank_increment: {name} has dtype {t.dtype}; expected one of fp32, fp16, bf16")
        if any(s < 0 for s in t.stride()):
            raise ValueError(f"lowrank_increment: {name} has negative strides {t.stride()}")
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError("lowrank_increment: all inputs must share one dtype, got "
                         + ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors)))
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"lowrank_increment: inputs on different devices {sorted(map(str, devices))}")
    dev = x.device
    if dev.type != "cuda" and not (_interpreting() and dev.type == "cpu"):
        raise ValueError(f"lowrank_increment: tensors on {dev}; the Triton kernel needs CUDA tensors "
                         "(CPU only with TRITON_INTERPRET=1); use fxdit::lowrank_increment for the CPU path")
    if x.dim() < 1 or x.shape != x_cached.shape:
        raise ValueError(f"lowrank_increment: x {tuple(x.shape)} and x_cached {tuple(x_cached.shape)} must have "
                         "the same shape [..., in]")
    if B.dim() != 2 or B.shape[1] != x.shape[-1] or B.shape[0] < 1:
        raise ValueError(f"lowrank_increment: B {tuple(B.shape)}; expected [r, {x.shape[-1]}] with r >= 1")
    if A.dim() != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"lowrank_increment: A {tuple(A.shape)}; expected [out, {B.shape[0]}]")
    if tuple(y_cached.shape) != tuple(x.shape[:-1]) + (A.shape[0],):
        raise ValueError(f"lowrank_increment: y_cached {tuple(y_cached.shape)}; expected "
                         f"{tuple(x.shape[:-1]) + (A.shape[0],)}")


def _as_rows(t: Tensor) -> Tensor:
    """``[..., C]`` → ``[M, C]`` (a view when the strides allow it)."""
    return t.reshape(-1, t.shape[-1])


def lowrank_increment(x: Tensor, x_cached: Tensor, y_cached: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """``y_cached + (x − x_cached) @ B.T @ A.T`` with one fused Triton kernel per rank chunk.

    Args:
        x: ``[..., in]`` current input.
        x_cached: ``[..., in]`` input cached at the last full step.
        y_cached: ``[..., out]`` output cached at the last full step (bias included).
        B: ``[r, in]``.
        A: ``[out, r]``.

    Returns:
        ``[..., out]``, contiguous, dtype of the inputs.

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, non-strided tensors, or CPU tensors outside the
            Triton interpreter.
    """
    _validate(x, x_cached, y_cached, B, A)
    k, n, r = x.shape[-1], A.shape[0], B.shape[0]
    out_shape = tuple(y_cached.shape)
    x2, xc2, yc2 = _as_rows(x), _as_rows(x_cached), _as_rows(y_cached)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=y_cached.dtype, device=y_cached.device)
    if m == 0 or n == 0:
        return y.reshape(out_shape)
    if k == 0:
        y.copy_(yc2)
        return y.reshape(out_shape)
    fp32_dot = _interpreting() or x.dtype == torch.float32
    src = yc2
    for r0 in range(0, r, _MAX_BLOCK_R):
        r1 = min(r, r0 + _MAX_BLOCK_R)
        bc, ac = B[r0:r1], A[:, r0:r1]
        rc = r1 - r0
        block_r = max(16, triton.next_power_of_2(rc))
        # Keep BLOCK_M * BLOCK_R <= 8192 fp32 accumulators per program (see _MAX_BLOCK_R).
        block_m = 64 if block_r <= 128 else 32
        grid = (triton.cdiv(m, block_m),)
        _lowrank_increment_kernel[grid](
            y, x2, xc2, src, bc, ac,
            m, k, n, rc,
            x2.stride(0), x2.stride(1), xc2.stride(0), xc2.stride(1),
            src.stride(0), src.stride(1), y.stride(0), y.stride(1),
            bc.stride(0), bc.stride(1), ac.stride(0), ac.stride(1),
            BLOCK_M=block_m, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, BLOCK_R=block_r,
            FP32_DOT=fp32_dot,
            num_warps=4,
        )
        src = y
    return y.reshape(out_shape)
