"""fxdit's custom ops (namespace ``fxdit``) and their inductor decompositions.

``fxdit::grouped_attention`` — grouped block-sparse attention (GRAT). Semantics are those of
:func:`fxdit.kernels.reference.grouped_attention_ref`: query ``i`` attends key ``j`` iff
``group_adj[q_group[i], kv_group[j]]`` and (when given) ``kv_valid[b, j]``; rows that see no key return zeros. The
BlockMask tables (``kv_num_blocks``, ``kv_indices``, ``full_kv_num_blocks``, ``full_kv_indices``, FlexAttention's
format, ``block_size`` tokens per block on both axes) say where visible elements can be: a *full* block asserts that
every element is visible under ``group_adj`` (``kv_valid`` is still applied to it), a *partial* block is masked
element-wise, an unlisted block is skipped. Build them with :func:`fxdit.kernels.grat_layout.block_mask_tables`.

* CUDA: the Triton kernel (:func:`fxdit.kernels.grouped_attention.grouped_attention`).
* CPU eager: the dense reference (fp32 compute).
* Under fxdit's backend on CPU: :func:`decompositions_for` lowers the op to ``flex_attention`` with a BlockMask built
  in-graph by ``BlockMask.from_kv_blocks``; inductor compiles it to its C++ flex template. That template rejects fused
  epilogues, so graphs containing the op also need :func:`inductor_patches_for` (``epilogue_fusion=False``; on CPU
  without max-autotune the flag only concerns templates, i.e. only this attention).

Importing this module registers the ops (``torch.library``); it has no other side effect.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from fxdit.kernels import torch_private
from fxdit.kernels.reference import grouped_attention_ref
from torch import Tensor

__all__ = ["grouped_attention", "grouped_attention_unsupported", "grouped_attention_dense_lowering", "materialize",
           "decompositions_for", "inductor_patches_for"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# fxdit::grouped_attention
# ---------------------------------------------------------------------------------------------------------------


#: Devices with an implementation of fxdit::grouped_attention ("meta": shapes only, for tracing).
GROUPED_ATTENTION_DEVICES = ("cpu", "cuda", "meta")


def grouped_attention_unsupported(device: torch.device | str, dtype: torch.dtype, head_dim: int,
                                  value_dim: int) -> str | None:
    """Why ``fxdit::grouped_attention`` cannot run attention of this kind (``None`` when it can).

    Ask before rewriting a site into the op, so that a site the kernel cannot take stays dense with this reason
    instead of failing at compile or launch time.

    Args:
        device: the device of q/k/v.
        dtype: their dtype.
        head_dim: the q/k head dimension; ``value_dim``: v's.
    """
    kind = torch.device(device).type
    if kind not in GROUPED_ATTENTION_DEVICES:
        return f"no grouped-attention kernel for device {kind!r}"
    if kind == "cuda":
        from fxdit.kernels.grouped_attention import _DTYPES, MAX_HEAD_DIM

        if dtype not in _DTYPES:
            return f"Triton kernel: dtype {dtype} not supported (fp16, bf16, fp32)"
        if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
            return f"Triton kernel: head dims {head_dim}/{value_dim} outside 1..{MAX_HEAD_DIM}"
    elif not dtype.is_floating_point:
        return f"dtype {dtype} is not a floating-point type"
    return None


@torch.library.custom_op("fxdit::grouped_attention", mutates_args=())
def grouped_attention(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                      kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                      full_kv_indices: Tensor, kv_valid: Optional[Tensor], scale: float, block_size: int) -> Tensor:
    """Grouped block-sparse attention; see the module docstring. Returns contiguous ``[B, Hq, Sq, Dv]``."""
    if q.is_cuda:
        from fxdit.kernels.grouped_attention import grouped_attention as _triton

        return _triton(q, k, v, q_group, kv_group, group_adj, kv_num_blocks, kv_indices, full_kv_num_blocks,
                       full_kv_indices, kv_valid, scale=scale, block_size=block_size)
    return grouped_attention_ref(q, k, v, q_group, kv_group, group_adj, kv_valid, scale=scale,
                                 compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@grouped_attention.register_fake
def _grouped_attention_fake(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                            kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                            full_kv_indices: Tensor, kv_valid: Optional[Tensor], scale: float,
                            block_size: int) -> Tensor:
    # Both real paths return a fresh contiguous [B, Hq, Sq, Dv] tensor.
    b, h, s, _ = q.shape
    return q.new_empty((b, h, s, v.shape[-1]))


@torch.library.custom_op("fxdit::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A contiguous copy of ``x`` that inductor cannot fuse away (an opaque op: its output is always a buffer)."""
    return x.contiguous().clone()


@materialize.register_fake
def _materialize_fake(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _merge_full_into_partial(kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                             full_kv_indices: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    """One partial list holding both lists (when ``kv_valid`` must be applied everywhere), in-graph, traceable."""
    ar = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    far = torch.arange(full_kv_indices.shape[-1], device=kv_indices.device)
    shape = (*kv_indices.shape[:-1], num_kv_blocks)
    flags = torch.zeros(shape, dtype=torch.int32, device=kv_indices.device)
    flags = flags.scatter_add(-1, kv_indices.long(), (ar < kv_num_blocks[..., None]).to(torch.int32))
    flags = flags.scatter_add(-1, full_kv_indices.long(), (far < full_kv_num_blocks[..., None]).to(torch.int32))
    visible = flags > 0
    num = visible.sum(-1).to(torch.int32)
    idx = torch.argsort(visible.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


_FLEX_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_attention_dense_lowering(device: torch.device | str, q_dtype: torch.dtype, k_dtype: torch.dtype,
                                     v_dtype: torch.dtype) -> str | None:
    """Why the compiled path of ``fxdit::grouped_attention`` would run the dense masked formula (``None``: sparse).

    On CUDA the op is the block-sparse Triton kernel (``None``). On CPU, under fxdit's backend, it lowers to
    inductor's C++ FlexAttention template, which needs fp32/bf16/fp16 q/k/v of one dtype and a CPU the template
    supports; otherwise inductor compiles the dense masked formula: correct, not faster than dense attention.
    """
    if torch.device(device).type != "cpu":
        return None
    if not (q_dtype == k_dtype == v_dtype):
        return f"CPU FlexAttention needs one dtype for q/k/v (got {q_dtype}/{k_dtype}/{v_dtype})"
    if q_dtype not in _FLEX_CPU_DTYPES:
        return f"CPU FlexAttention supports fp32/bf16/fp16, not {q_dtype}"
    if not torch_private.cpu_flex_supported():
        return "inductor's C++ FlexAttention template is not supported on this CPU"
    return None


def _flex_cpu_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return grouped_attention_dense_lowering(q.device, q.dtype, k.dtype, v.dtype) is None


def _grouped_attention_decomp(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor,
                              group_adj: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                              full_kv_num_blocks: Tensor, full_kv_indices: Tensor, kv_valid: Optional[Tensor],
                              scale: float, block_size: int) -> Tensor:
    """CPU lowering: FlexAttention over a BlockMask built in-graph from the tables (see the module docstring)."""
    if q.device.type != "cpu":
        return NotImplemented  # CUDA keeps the opaque op (Triton kernel)
    if not _flex_cpu_supported(q, k, v):
        # float64 / mixed dtypes / a CPU the template does not support: inductor compiles the dense masked formula
        # instead (the pass reports it: grouped_attention_dense_lowering).
        return grouped_attention_ref(q, k, v, q_group, kv_group, group_adj, kv_valid, scale=scale,
                                     compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return _flex_grouped_attention(q, k, v, q_group, kv_group, group_adj, kv_num_blocks, kv_indices,
                                   full_kv_num_blocks, full_kv_indices, kv_valid, scale, block_size)


def _mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, group_adj: Tensor, q_group: Tensor,
              kv_group: Tensor) -> Tensor:
    return group_adj[q_group[q_idx], kv_group[kv_idx]]


def _mask_mod_valid(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, group_adj: Tensor, q_group: Tensor,
                    kv_group: Tensor, kv_valid: Tensor) -> Tensor:
    return group_adj[q_group[q_idx], kv_group[kv_idx]] & kv_valid[b, kv_idx]


def _flex_grouped_attention(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                            kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                            full_kv_indices: Tensor, kv_valid: Optional[Tensor], scale: float,
                            block_size: int) -> Tensor:
    """The FlexAttention higher-order op over a BlockMask built from the tables.

    The HOP is called directly (not ``flex_attention()``): under AOT tracing the public function wraps the HOP in a
    nested ``torch.compile`` whose Dynamo cache entry is reused by later compilations in the same process, which then
    fail inductor's FakeTensorUpdater ("A subgraph argument other than striding has been modified") when a second
    graph uses a different mask. The mask tensors go in as explicit ``mask_mod_other_buffers`` (the form the HOP
    expects) instead of closures.
    """
    from torch.nn.attention.flex_attention import BlockMask

    flex = torch_private.flex_internals()

    sq, sk = q.shape[2], k.shape[2]
    if kv_valid is None:
        mask_mod: Callable[..., Tensor] = _mask_mod
        buffers: tuple[Tensor, ...] = (group_adj, q_group, kv_group)
        tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
    else:
        mask_mod = _mask_mod_valid
        buffers = (group_adj, q_group, kv_group, kv_valid)
        # a "full" block is full under group_adj only; with per-batch key validity every block is masked. The
        # validity goes in as its own buffer: inductor's C++ template reads mask buffers by name, which an unrealized
        # (fused) pointwise input has not (NotImplementedError: Pointwise, then NoValidChoicesError, torch 2.13).
        num, idx = _merge_full_into_partial(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                            -(-sk // block_size))
        tables = (num, idx, None, None)
        buffers = (group_adj, q_group, kv_group, torch.ops.fxdit.materialize(kv_valid))
    block_mask = BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=block_size, mask_mod=mask_mod,  # type: ignore[arg-type]
                                          seq_lengths=(sq, sk), compute_q_blocks=False)
    kernel_options = flex.apply_kernel_options(q, k, v, False, None)
    out, _, _ = flex.hop(q, k, v, flex.identity, block_mask.as_tuple(), scale, kernel_options, (), buffers)
    return out


#: Attribute that marks a plain function as one that calls ``fxdit::grouped_attention`` inside (the context-parallel
#: wrappers in :mod:`fxdit.kernels.halo`): a graph holding such a call needs the same CPU lowering as the op itself,
#: or AOT tracing leaves the op opaque and it runs its eager dense reference.
CALLS_GROUPED_ATTENTION = "__fxdit_calls_grouped_attention__"


def calls_grouped_attention(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as calling ``fxdit::grouped_attention`` (see :data:`CALLS_GROUPED_ATTENTION`)."""
    setattr(fn, CALLS_GROUPED_ATTENTION, True)
    return fn


def _has_grouped_attention_on_cpu(gm: fx.GraphModule) -> bool:
    op = torch.ops.fxdit.grouped_attention
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target in (op, op.default)
                                           or getattr(node.target, CALLS_GROUPED_ATTENTION, False)):
            val = node.meta.get("val", node.meta.get("example_value"))
            if not isinstance(val, Tensor) or val.device.type == "cpu":
                return True
    return False


def decompositions_for(gm: fx.GraphModule) -> dict[Any, Callable[..., Any]]:
    """Inductor decompositions for the fxdit ops present in ``gm`` (empty dict when none).

    ``fxdit::grouped_attention`` on CPU → FlexAttention (inductor's C++ flex template); CUDA calls stay opaque
    (Triton kernel). Pass the result, merged with inductor's default table, as ``compile_fx(decompositions=...)``.
    """
    table: dict[Any, Callable[..., Any]] = {}
    if _has_grouped_attention_on_cpu(gm):
        table[torch.ops.fxdit.grouped_attention.default] = _grouped_attention_decomp
    return table


def inductor_patches_for(gm: fx.GraphModule) -> dict[str, Any]:
    """Inductor ``config_patches`` the fxdit ops in ``gm`` need (empty when none).

    ``epilogue_fusion=False`` when the CPU grouped attention is present: inductor's C++ flex template raises
    ``NotImplementedError: Unsupported for epilogue_nodes`` when a same-index pointwise consumer is fused into it.
    ``epilogue_fusion`` only governs template epilogues (default CPU GEMMs are extern calls), so this is the
    narrowest switch available without patching inductor.
    """
    if _has_grouped_attention_on_cpu(gm):
        return {"epilogue_fusion": False}
    return {}


# ---------------------------------------------------------------------------------------------------------------
# fxdit::lowrank_increment (ICC; owned by helper "calibration" — keep this section at the end of the file)
# ---------------------------------------------------------------------------------------------------------------
#
# ``fxdit::lowrank_increment(x, x_cached, y_cached, B, A) = y_cached + (x − x_cached) @ B.T @ A.T``
# (:func:`fxdit.kernels.reference.lowrank_increment_ref`). CUDA: the fused Triton kernel
# (:mod:`fxdit.kernels.lowrank_increment`); CPU eager: the reference; under fxdit's backend on CPU the op is
# decomposed (below) so inductor compiles it with the rest of the graph.

from fxdit.kernels.reference import lowrank_increment_ref as _lowrank_increment_ref  # noqa: E402

__all__.append("lowrank_increment")


@torch.library.custom_op("fxdit::lowrank_increment", mutates_args=())
def lowrank_increment(x: Tensor, x_cached: Tensor, y_cached: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """``y_cached + (x − x_cached) @ B.T @ A.T``; returns a new contiguous ``[..., out]`` tensor."""
    if x.is_cuda:
        from fxdit.kernels.lowrank_increment import lowrank_increment as _triton

        return _triton(x, x_cached, y_cached, B, A)
    return _lowrank_increment_ref(x, x_cached, y_cached, B, A, compute_dtype=_accumulate_dtype(y_cached.dtype))


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 (increments are accumulated in fp32, as the Triton kernel does), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@lowrank_increment.register_fake
def _lowrank_increment_fake(x: Tensor, x_cached: Tensor, y_cached: Tensor, B: Tensor, A: Tensor) -> Tensor:
    # Both real paths return a fresh contiguous tensor shaped like y_cached.
    return torch.empty(y_cached.shape, dtype=y_cached.dtype, device=y_cached.device)


def _lowrank_increment_decomp(x: Tensor, x_cached: Tensor, y_cached: Tensor, B: Tensor, A: Tensor) -> Tensor:
    # Difference first, then two skinny GEMMs, the second fused with the Y_c add by addmm. Measured on the 2-core
    # CPU box (torch.compile dynamic=False, fp32, in=out=1152, r=128, 512 tokens; interleaved calls, medians of the
    # calls during which other processes used < 5% of the CPU, n = 26/5/18): this form 2.21 ms (min 1.93);
    # ``addmm(y_c, x@Bᵀ − x_c@Bᵀ, Aᵀ)`` 3.18 ms (min 2.92), as expected from its 1.5× MACs (two GEMMs over the
    # input width); "projcache" ``addmm(y_c, x@Bᵀ − Z_c, Aᵀ)`` with Z_c = X_c·Bᵀ precomputed 2.14 ms (min 1.93),
    # i.e. equal within noise at this width. Projcache needs a different cache (Z_c instead of X_c, filled at full
    # steps), so it is the cache pass's choice, not this op's; for the op's (x, x_cached, ...) signature the
    # difference-first form is the fastest.
    # fp16/bf16: the difference, both GEMMs and the add are computed in fp32, one rounding at the end (as the Triton
    # kernel; the caches themselves stay in the model's dtype). For fp32 the casts are no-ops.
    k, n = x.shape[-1], A.shape[0]
    acc = _accumulate_dtype(y_cached.dtype)
    z = torch.mm((x.to(acc) - x_cached.to(acc)).reshape(-1, k), B.to(acc).t())
    y = torch.addmm(y_cached.to(acc).reshape(-1, n), z, A.to(acc).t())
    return y.reshape(y_cached.shape).to(y_cached.dtype)


def _has_cpu_call(gm: fx.GraphModule, op: Any) -> bool:
    """Whether ``gm`` calls ``op`` on CPU tensors (CUDA calls keep the Triton kernel)."""
    targets = (op, op.default)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            val = node.meta.get("val", node.meta.get("example_value"))
            if not isinstance(val, Tensor) or val.device.type == "cpu":
                return True
    return False


_decompositions_for_base = decompositions_for


def decompositions_for(gm: fx.GraphModule) -> dict[Any, Callable[..., Any]]:  # noqa: F811
    """Inductor decompositions for the fxdit ops present in ``gm`` (empty dict when none)."""
    table = dict(_decompositions_for_base(gm))
    if _has_cpu_call(gm, torch.ops.fxdit.lowrank_increment):
        table[torch.ops.fxdit.lowrank_increment.default] = _lowrank_increment_decomp
    return table
