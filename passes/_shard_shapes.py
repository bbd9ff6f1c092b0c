"""Shape arguments of the token stream rewritten for a band of tokens (``shard_tokens``): reshapes, expands, slices
and splits whose arguments name the token count are given the local count (their argument forms are read here)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from fxdit.passes._fx_utils import shape_of
from fxdit.passes._ops import token_rule
from fxdit.passes._token_flow import NotTokenWise, norm_dim, op_arg, op_key, slice_ints

__all__ = ["rewrite_shapes"]




def rewrite_shapes(flow: Any, delta: int, n: int) -> None:
    """Rewrite the token count in shape arguments of the stream's nodes (raises ``NotTokenWise`` when it cannot)."""
    for node, tok in list(flow.tok.items()):
        if node is flow.entry or node.op not in ("call_function", "call_method"):
            continue
        key = op_key(node)
        x = node.args[0] if node.args else None
        tx = flow.tok.get(x) if isinstance(x, fx.Node) else None
        rule = token_rule(node)
        if rule in ("reshape", "expand"):
            if key not in ("view", "reshape", torch.reshape, "expand"):
                continue  # flatten/unflatten/squeeze/unsqueeze: no token-sized argument (the flow checked)
            out_shape = shape_of(node)
            j = tok[0]
            sizes_tuple = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            sizes = list(node.args[1] if sizes_tuple else node.args[1:])
            if "shape" in node.kwargs or "size" in node.kwargs:
                raise NotTokenWise(f"{node.name}: keyword shape")
            if len(sizes) != len(out_shape):
                raise NotTokenWise(f"{node.name}: shape arguments do not match the output rank")
            if sizes[j] == -1:
                continue
            if not isinstance(sizes[j], int) or sizes[j] != out_shape[j]:
                raise NotTokenWise(f"{node.name}: token size {sizes[j]!r} is not a constant")
            sizes[j] = out_shape[j] - delta
            node.args = (x, tuple(sizes)) if sizes_tuple else (x, *sizes)
        elif key == operator.getitem and isinstance(tx, tuple):
            node.args = (x, _rewrite_index(node.args[1], shape_of(x), tx, delta, n))
        elif rule == "split" and isinstance(tx, tuple):
            _rewrite_split(node, key, tx, delta, n)


def _map_pos(p: int, off: int, n: int, delta: int) -> int:
    if p <= off:
        return p
    if p >= off + n:
        return p - delta
    raise NotTokenWise("slice bound inside the image tokens")


def _rewrite_index(idx: Any, in_shape: tuple[int, ...], tx: tuple[int, int], delta: int, n: int) -> Any:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    rank = len(in_shape)
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    out, in_dim = [], 0
    for it in items:
        if it is Ellipsis:
            out.append(it)
            in_dim += rank - n_real
            continue
        if it is None:
            out.append(it)
            continue
        if in_dim == tx[0] and isinstance(it, slice):
            if it == slice(None):
                out.append(it)
            else:
                start, stop, _ = slice_ints(it, in_shape[in_dim])
                off = tx[1]
                out.append(slice(_map_pos(start, off, n, delta), _map_pos(stop, off, n, delta), it.step))
        else:
            out.append(it)
        in_dim += 1
    return tuple(out) if isinstance(idx, tuple) else out[0]


def _rewrite_split(node: fx.Node, key: Any, tx: tuple[int, int], delta: int, n: int) -> None:
    in_shape = shape_of(node.args[0])
    dim = norm_dim(int(op_arg(node, 2, "dim", 0)), len(in_shape))
    if dim != tx[0]:
        return
    sizes = op_arg(node, 1, "split_size_or_sections" if key is torch.split else "split_size")
    if key in ("split", torch.split, "split_with_sizes") and isinstance(sizes, (list, tuple)):
        new, start = [], 0
        for s in sizes:
            if start <= tx[1] and tx[1] + n <= start + s:
                new.append(s - delta)
            else:
                new.append(s)
            start += s
        node.args = (node.args[0], type(sizes)(new), *node.args[2:])
        return
    raise NotTokenWise(f"{node.name}: {key} of the token dimension by count")


# ---------------------------------------------------------------------------------------------------------------
# Attention sites
