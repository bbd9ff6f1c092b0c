"""The image-token stream of a graph, followed node by node: which nodes carry the tokens, on which dimension.

:class:`TokenFlow` starts at the node that first holds the ``N`` image tokens (the patch embedding's output) and
follows its users, mapping the token dimension (and the token segment's offset along it) through every op it knows
to be token-wise from the data tables below (how each op spelling maps the token dimension; no model classes). It
records where the stream meets an op that is not token-wise (an *exit*) and the tensors that vary along the tokens
without coming from the stream (*sides*, e.g. a positional table or RoPE cos/sin). ``rewrite_grouped_attention``
uses it to hoist the group permutation to the patch embedding; ``shard_tokens`` to cut the stream into bands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from fxdit.passes._fx_utils import fake_value, shape_of
from fxdit.passes._ops import kind, token_rule
from fxdit.passes._records import AttentionSite

__all__ = ["Tok", "NotTokenWise", "Flow", "TokenFlow", "op_key", "op_arg", "norm_dim", "slice_ints", "reshape_map",
           "SIDE_VIEW_RULES", "is_side_view", "trailing_dims"]

log = logging.getLogger(__name__)


Tok = tuple[int, int]  # (dim, offset): the N image tokens occupy [offset, offset + N) of dimension ``dim``


class NotTokenWise(Exception):
    """The op is not known to keep the token order; the stream is restored before it."""


#: Token rules (see :data:`fxdit.passes._ops.OP_TABLE`) of the views a side tensor (positional table, RoPE
#: cos/sin) may be traced back through, to permute it once at its source; casts count too.
SIDE_VIEW_RULES = frozenset({"reshape", "expand", "transpose", "permute", "movedim", "getitem"})


def is_side_view(node: fx.Node) -> bool:
    """``node`` is a pure view or cast of its first argument (see :data:`SIDE_VIEW_RULES`)."""
    return token_rule(node) in SIDE_VIEW_RULES or kind(node) == "cast"


def trailing_dims(node: fx.Node) -> int:
    """How many trailing dims an op with the ``"trailing"`` rule acts on (a linear: 1; a norm: its shape's)."""
    if kind(node) == "linear":
        return 1
    return len(op_arg(node, 1, "normalized_shape"))


def op_key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def op_arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


@dataclass
class Flow:
    """Result of following the image-token stream from the patch embedding."""

    tok: dict[fx.Node, Any] = field(default_factory=dict)
    #: stream node → consumers that need it back in raster order, with the reason.
    exits: dict[fx.Node, list[tuple[fx.Node, str]]] = field(default_factory=dict)
    #: (consumer, side arg, dim, offset, size): tensors that vary over tokens without coming from the stream.
    sides: list[tuple[fx.Node, fx.Node, int, int, int]] = field(default_factory=list)
    failure: str | None = None
    entry: fx.Node | None = None


class TokenFlow:
    """Follows the token dimension from ``entry`` through the graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, entry: fx.Node, entry_dim: int, n_tokens: int,
                 sites: dict[fx.Node, AttentionSite], internal: set[fx.Node], rewrite: set[fx.Node],
                 nodes: dict[str, fx.Node]) -> None:
        self.gm = gm
        self.entry = entry
        self.n = n_tokens
        self.sites = sites
        self.internal = internal
        self.rewrite = rewrite
        self.nodes = nodes
        self.flow = Flow(entry=entry)
        self.flow.tok[entry] = (entry_dim, 0)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _t(self, a: Any) -> Any:
        return self.flow.tok.get(a) if isinstance(a, fx.Node) else None

    def _exit(self, node: fx.Node, reason: str) -> None:
        for a in node.all_input_nodes:
            if isinstance(self._t(a), tuple):
                self.flow.exits.setdefault(a, []).append((node, reason))

    def _side(self, node: fx.Node, arg: fx.Node, dim: int, offset: int) -> None:
        shape = shape_of(arg)
        if shape is None:
            raise NotTokenWise(f"no shape for {arg.name}")
        self.flow.sides.append((node, arg, dim, offset, shape[dim]))

    # -- the walk --------------------------------------------------------------------------------------------
    def run(self) -> Flow:
        started = False
        for node in self.gm.graph.nodes:
            if node is self.entry:
                started = True
                continue
            if not started or node.op in ("placeholder", "get_attr"):
                continue
            ins = [a for a in node.all_input_nodes if self._t(a) is not None]
            if not ins:
                continue
            if node.op == "output":
                self._exit(node, "graph output")
                continue
            if node in self.internal:
                continue
            try:
                if node in self.sites:
                    out = self._site(node, self.sites[node])
                else:
                    out = self._rule(node)
            except NotTokenWise as exc:
                self._exit(node, str(exc))
                out = None
            if self.flow.failure is not None:
                return self.flow
            if out is not None:
                self.flow.tok[node] = out
        for node in self.internal:
            for user in node.users:
                if user not in self.internal and user not in self.sites and any(
                        isinstance(self._t(a), tuple) for a in node.all_input_nodes):
                    self.flow.failure = f"attention intermediate {node.name} is used outside its site"
        return self.flow

    def _site(self, node: fx.Node, site: AttentionSite) -> Tok | None:
        q, k, v = (self.nodes.get(site.q), self.nodes.get(site.k), self.nodes.get(site.v))
        tq, tk, tv = self._t(q), self._t(k), self._t(v)
        if node in self.rewrite:
            want = (2, site.image_span[0]) if site.image_span else None
            if not (tq == tk == tv == want):
                self.flow.failure = (f"site {site.node}: q/k/v token order does not follow the stream "
                                     f"(q {tq}, k {tk}, v {tv}, expected {want})")
                return None
            return tq
        if tk != tv or any(t is not None and (not isinstance(t, tuple) or t[0] != 2) for t in (tq, tk, tv)):
            raise NotTokenWise("dense attention site with inconsistent token order")
        mask = self.nodes.get(site.mask) if site.mask else None
        if mask is not None:
            if self._t(mask) is not None:
                raise NotTokenWise("attention mask derived from the token stream")
            shape = shape_of(mask)
            if shape is None:
                raise NotTokenWise("attention mask without shape")
            r = len(shape)
            if tq is not None and r >= 2 and shape[r - 2] > 1:
                self._side(node, mask, r - 2, tq[1])
            if tk is not None and r >= 1 and shape[r - 1] > 1:
                self._side(node, mask, r - 1, tk[1])
        return tq

    def _rule(self, node: fx.Node) -> Any:
        key = op_key(node)
        rule = token_rule(node)
        out_shape = shape_of(node)
        val = fake_value(node)
        if rule == "metadata" or (val is not None and not isinstance(val, (torch.Tensor, tuple, list))):
            if rule == "metadata":
                return None
            raise NotTokenWise(f"{key} returns a non-tensor from the token stream")
        x = node.args[0] if node.args else None
        tx = self._t(x)
        if rule == "dropout":
            p, training = op_arg(node, 1, "p", 0.5), op_arg(node, 2, "training", True)
            if p and training:
                raise NotTokenWise("dropout in training mode")
            return self._pointwise(node, out_shape)
        if rule == "pointwise":
            return self._pointwise(node, out_shape)
        if rule == "like_first":
            if not isinstance(tx, tuple) or out_shape != shape_of(x):
                raise NotTokenWise(f"{key}: token stream not in the first argument")
            return tx
        if rule == "setitem":
            return self._setitem(node)
        if rule in ("trailing", "dim_op", "reduce"):
            for a in node.all_input_nodes:
                if a is not x and self._t(a) is not None:
                    raise NotTokenWise(f"{key}: token stream in a parameter argument")
            if not isinstance(tx, tuple):
                raise NotTokenWise(f"{key}: token stream not in the data argument")
            in_shape = shape_of(x)
            d, off = tx
            if rule == "trailing":
                if d >= len(in_shape) - trailing_dims(node):
                    raise NotTokenWise(f"{key} acts on the token dimension")
                return tx
            dim = op_arg(node, 1, "dim")
            if rule == "dim_op":
                if dim is None or norm_dim(dim, len(in_shape)) == d:
                    raise NotTokenWise(f"{key} over the token dimension")
                return tx
            dims = dim if isinstance(dim, (tuple, list)) else (dim,)
            if dim is None or any(not isinstance(v, int) for v in dims):
                raise NotTokenWise(f"{key} over every dimension")
            dims = {norm_dim(v, len(in_shape)) for v in dims}
            if d in dims:
                raise NotTokenWise(f"{key} over the token dimension")
            keep = bool(op_arg(node, 2, "keepdim", False))
            return (d if keep else d - sum(1 for v in dims if v < d), off)
        if not isinstance(tx, tuple) and rule not in ("cat", "stack"):
            if rule == "getitem" and isinstance(tx, list):
                return tx[node.args[1]]
            raise NotTokenWise(f"{key}: unsupported use of the token stream")
        if rule == "reshape":
            return self._reshape(x, tx, out_shape)
        if rule == "expand":
            in_shape = shape_of(x)
            d = tx[0] + len(out_shape) - len(in_shape)
            if out_shape[d] != in_shape[tx[0]]:
                raise NotTokenWise("expand over the token dimension")
            return (d, tx[1])
        if rule == "transpose":
            rank = len(out_shape)
            a, b = (norm_dim(int(v), rank) for v in node.args[1:3])
            d = tx[0]
            return (b if d == a else a if d == b else d, tx[1])
        if rule == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            dims = [norm_dim(int(v), len(out_shape)) for v in dims]
            return (dims.index(tx[0]), tx[1])
        if rule == "movedim":
            rank = len(out_shape)
            src, dst = node.args[1], node.args[2]
            order = [i for i in range(rank)]
            src_l = [norm_dim(s, rank) for s in (src if isinstance(src, (tuple, list)) else [src])]
            dst_l = [norm_dim(s, rank) for s in (dst if isinstance(dst, (tuple, list)) else [dst])]
            rest = [i for i in order if i not in src_l]
            perm = [None] * rank
            for s, t in zip(src_l, dst_l):
                perm[t] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
            return (perm.index(tx[0]), tx[1])
        if rule == "getitem":
            return self._getitem(node.args[1], x, tx)
        if rule == "cat":
            return self._cat(node, out_shape)
        if rule == "stack":
            return self._stack(node, out_shape)
        if rule == "split":
            return self._split(node, x, tx)
        if rule == "unbind":
            rank = len(shape_of(x))
            dim = norm_dim(int(op_arg(node, 1, "dim", 0)), rank)
            if dim == tx[0]:
                raise NotTokenWise("unbind over the token dimension")
            d = tx[0] - (1 if dim < tx[0] else 0)
            return [(d, tx[1])] * len(val)
        if rule == "matmul":
            a, b = node.args[0], node.args[1]
            if self._t(b) is not None or not isinstance(self._t(a), tuple):
                raise NotTokenWise("matmul mixes tokens")
            ra = len(shape_of(a))
            if tx[0] == ra - 1:
                raise NotTokenWise("matmul contracts the token dimension")
            return (tx[0] + len(out_shape) - ra, tx[1])
        raise NotTokenWise(f"{getattr(key, '__name__', key)} is not in the token-wise table")

    def _pointwise(self, node: fx.Node, out_shape: tuple[int, ...] | None) -> Tok:
        if out_shape is None:
            raise NotTokenWise("pointwise op without shape")
        rank = len(out_shape)
        out: Tok | None = None
        tensors = [a for a in node.all_input_nodes if isinstance(fake_value(a), torch.Tensor)]
        for a in tensors:
            t = self._t(a)
            if t is None:
                continue
            if not isinstance(t, tuple):
                raise NotTokenWise("pointwise op on a tuple")
            mapped = (t[0] + rank - len(shape_of(a)), t[1])
            if out is not None and mapped != out:
                raise NotTokenWise("pointwise op joins token streams of different layouts")
            out = mapped
        assert out is not None
        for a in tensors:
            if self._t(a) is not None:
                continue
            shape = shape_of(a)
            if shape is None:
                raise NotTokenWise("operand without shape")
            d = out[0] - (rank - len(shape))
            if d >= 0 and shape[d] != 1:
                self._side(node, a, d, out[1])
        return out

    def _reshape(self, x: fx.Node, tx: Tok, out_shape: tuple[int, ...] | None) -> Tok:
        in_shape = shape_of(x)
        if in_shape is None or out_shape is None:
            raise NotTokenWise("reshape without shapes")
        j = reshape_map(in_shape, tx[0], out_shape)
        if j is None:
            raise NotTokenWise("reshape merges or splits the token dimension")
        return (j, tx[1])

    def _setitem(self, node: fx.Node) -> None:
        """``target[idx] = value`` (in place): the written view and the value must share the token layout."""
        target, idx, value = node.args[:3]
        tt = self._t(target)
        if not isinstance(tt, tuple):
            raise NotTokenWise("in-place write of the token stream into another tensor")
        view = self._getitem(idx, target, tt)
        tv = self._t(value) if isinstance(value, fx.Node) else None
        vshape = shape_of(value) if isinstance(value, fx.Node) else None
        if view is None:
            raise NotTokenWise("in-place write outside the image tokens")
        if tv is not None:
            rank = len(shape_of(target)) - sum(1 for it in (idx if isinstance(idx, tuple) else (idx,))
                                               if isinstance(it, int))
            if not isinstance(tv, tuple) or (tv[0] + rank - len(vshape), tv[1]) != view:
                raise NotTokenWise("in-place write of a differently laid out token stream")
        elif vshape is not None:
            rank = len(shape_of(target)) - sum(1 for it in (idx if isinstance(idx, tuple) else (idx,))
                                               if isinstance(it, int))
            d = view[0] - (rank - len(vshape))
            if d >= 0 and vshape[d] != 1:
                self._side(node, value, d, view[1])
        return None

    def _getitem(self, idx: Any, x: fx.Node, tx: Tok) -> Tok | None:
        items = list(idx) if isinstance(idx, tuple) else [idx]
        in_shape = shape_of(x)
        rank = len(in_shape)
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        expanded: list[Any] = []
        for it in items:
            if it is Ellipsis:
                expanded.extend([slice(None)] * (rank - n_real))
            else:
                expanded.append(it)
        expanded.extend([slice(None)] * (rank - sum(1 for it in expanded if it is not None)))
        in_dim, out_dim = 0, 0
        result: Tok | None = None
        for it in expanded:
            if it is None:
                out_dim += 1
                continue
            if isinstance(it, fx.Node) or not isinstance(it, (int, slice)):
                raise NotTokenWise("advanced indexing of the token stream")
            if in_dim == tx[0]:
                if isinstance(it, int):
                    raise NotTokenWise("integer index into the token dimension")
                start, stop, step = slice_ints(it, in_shape[in_dim])
                if step != 1:
                    raise NotTokenWise("strided slice of the token dimension")
                lo, hi = tx[1], tx[1] + self.n
                if start <= lo and hi <= stop:
                    result = (out_dim, lo - start)
                elif stop <= lo or start >= hi:
                    result = None
                else:
                    raise NotTokenWise("slice cuts through the image tokens")
            if isinstance(it, slice):
                out_dim += 1
            in_dim += 1
        return result

    def _cat(self, node: fx.Node, out_shape: tuple[int, ...]) -> Tok:
        tensors = node.args[0]
        rank = len(out_shape)
        dim = norm_dim(int(op_arg(node, 1, "dim", 0)), rank)
        streams = [(i, a) for i, a in enumerate(tensors) if self._t(a) is not None]
        for _, a in streams:
            if not isinstance(self._t(a), tuple):
                raise NotTokenWise("cat of a tuple")
        toks = {self._t(a) for _, a in streams}
        if any(t[0] == dim for t in toks):
            if len(streams) != 1:
                raise NotTokenWise("cat joins several token streams")
            i, a = streams[0]
            offset = sum(shape_of(b)[dim] for b in tensors[:i]) + self._t(a)[1]
            return (dim, offset)
        if len(toks) != 1:
            raise NotTokenWise("cat of token streams with different layouts")
        out = next(iter(toks))
        for a in tensors:
            if self._t(a) is None:
                self._side(node, a, out[0], out[1])
        return out

    def _stack(self, node: fx.Node, out_shape: tuple[int, ...]) -> Tok:
        tensors = node.args[0]
        dim = norm_dim(int(op_arg(node, 1, "dim", 0)), len(out_shape))
        toks = {self._t(a) for a in tensors if self._t(a) is not None}
        if len(toks) != 1 or not isinstance(next(iter(toks)), tuple):
            raise NotTokenWise("stack of token streams with different layouts")
        d, off = next(iter(toks))
        out = (d if d < dim else d + 1, off)
        for a in tensors:
            if self._t(a) is None:
                self._side(node, a, d, off)
        return out

    def _split(self, node: fx.Node, x: fx.Node, tx: Tok) -> list[Tok | None]:
        val = fake_value(node)
        in_shape = shape_of(x)
        dim = norm_dim(int(op_arg(node, 2, "dim", 0)), len(in_shape))
        parts = [tuple(int(s) for s in t.shape) for t in val]
        if dim != tx[0]:
            return [tx] * len(parts)
        out: list[Tok | None] = []
        start = 0
        lo, hi = tx[1], tx[1] + self.n
        for p in parts:
            stop = start + p[dim]
            if start <= lo and hi <= stop:
                out.append((dim, lo - start))
            elif stop <= lo or start >= hi:
                out.append(None)
            else:
                raise NotTokenWise("split cuts through the image tokens")
            start = stop
        return out


def slice_ints(s: slice, size: int) -> tuple[int, int, int]:
    for v in (s.start, s.stop, s.step):
        if v is not None and not isinstance(v, int):
            raise NotTokenWise("symbolic slice of the token dimension")
    return s.indices(size)


def reshape_map(in_shape: Sequence[int], d: int, out_shape: Sequence[int]) -> int | None:
    """The output dim that holds input dim ``d`` unchanged (same size, same prefix product), or ``None``."""
    pre = math.prod(in_shape[:d])
    size = in_shape[d]
    acc = 1
    for j, s in enumerate(out_shape):
        if acc == pre and s == size:
            return j
        acc *= s
    return None
