"""Token layouts: which dimension of a tensor is the token sequence, and which stream each run of tokens is.

:class:`Layout` is the fact; :class:`Propagator` computes it for every node of a graph, forward from seed nodes
(the image tokens after the patch embedding, the text inputs, layouts carried from an earlier graph), through the
kinds of :mod:`fxdit.passes._ops`: views, transposes, permutes, slices, splits, concatenations (pieces of other
origin become ``"learned"`` or ``"unknown"`` runs), row-by-row buffer assembly, broadcasts, elementwise ops,
linears, norms and attention.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxdit.passes._fx_utils import fake_value
from fxdit.passes._ops import arg_of, dim_index, is_param, kind, ndim, permute_dims, shape_of, static_size, tensor_args

__all__ = ["Layout", "Propagator"]


@dataclass(frozen=True)
class Layout:
    """Which dimension of a tensor is the token sequence, and where each stream's tokens lie along it.

    Attributes:
        dim: the sequence dimension (non-negative).
        segments: ``((stream, length), ...)`` in sequence order; stream is ``"image"``, ``"text"``, ``"learned"``
            (tokens computed from parameters only: register / learned tokens), ``"pad"`` (positions of a buffer no
            token was written to), ``"ragged"`` (a buffer whose rows hold their tokens at different positions) or
            ``"unknown"`` (tokens of an origin the graph does not show).
    """

    dim: int
    segments: tuple[tuple[str, int], ...]

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def streams(self) -> frozenset[str]:
        return frozenset(s for s, n in self.segments if n > 0)

    def moved(self, dim: int) -> Layout:
        return Layout(dim, self.segments)

    def merged(self) -> tuple[tuple[str, int], ...]:
        """Segments with adjacent runs of one stream joined and empty runs dropped."""
        out: list[list[Any]] = []
        for s, n in self.segments:
            if n <= 0:
                continue
            if out and out[-1][0] == s:
                out[-1][1] += n
            else:
                out.append([s, n])
        return tuple((s, n) for s, n in out)

    def spans(self) -> dict[str, list[tuple[int, int]]]:
        """stream → list of ``(start, stop)`` runs."""
        res: dict[str, list[tuple[int, int]]] = {}
        pos = 0
        for s, n in self.merged():
            res.setdefault(s, []).append((pos, pos + n))
            pos += n
        return res

    def slice(self, start: int, stop: int) -> Layout:
        segs: list[tuple[str, int]] = []
        pos = 0
        for s, n in self.segments:
            lo, hi = max(pos, start), min(pos + n, stop)
            if hi > lo:
                segs.append((s, hi - lo))
            pos += n
        return Layout(self.dim, tuple(segs))


def _map_view_dim(in_shape: Sequence[int], out_shape: Sequence[int], dim: int) -> int | None:
    """Where dimension ``dim`` of ``in_shape`` lands after a view to ``out_shape`` (``None`` when merged/split)."""
    prefix = math.prod(in_shape[:dim])
    size = in_shape[dim]
    acc = 1
    for d, s in enumerate(out_shape):
        if acc == prefix and s == size:
            return d
        acc *= s
        if acc > prefix and size > 1:
            break
    return None


def _merge_frames(lay: Layout, in_shape: Sequence[int], out_shape: Sequence[int], frames: int) -> Layout | None:
    """``(.., F, N, ..) -> (.., F·N, ..)``: per-frame image tokens merged with the frame dim before them."""
    d = lay.dim
    if d == 0 or in_shape[d - 1] != frames or lay.streams != {"image"}:
        return None
    merged = (*in_shape[:d - 1], frames * in_shape[d], *in_shape[d + 1:])
    if tuple(out_shape) != merged:
        return None
    return Layout(d - 1, (("image", frames * lay.length),))


def _getitem_layout(lay: Layout, index: Any, in_nd: int, out_shape: Sequence[int] | None) -> Layout | None:
    idx = index if isinstance(index, tuple) else (index,)
    n_consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
    i = o = 0
    new_lay: Layout | None = None
    for item in idx:
        if item is None:
            o += 1
            continue
        if item is Ellipsis:
            skip = in_nd - n_consuming
            if i <= lay.dim < i + skip:
                new_lay = lay.moved(o + (lay.dim - i))
            i += skip
            o += skip
            continue
        if isinstance(item, fx.Node) or not isinstance(item, (int, slice)):
            return None
        if isinstance(item, int):
            if i == lay.dim:
                return None
            i += 1
            continue
        if i == lay.dim:
            start, stop, step = item.indices(lay.length)
            if step != 1:
                return None
            new_lay = Layout(o, lay.slice(start, stop).segments)
        i += 1
        o += 1
    if new_lay is None and lay.dim >= i:
        new_lay = lay.moved(o + (lay.dim - i))
    if new_lay is not None and out_shape is not None:
        if new_lay.dim >= len(out_shape) or out_shape[new_lay.dim] != new_lay.length:
            return None
    return new_lay


def _split_pieces(node: fx.Node) -> list[int] | None:
    """Sizes of the pieces a split-kind node produces along its split dim (from its tuple meta)."""
    val = fake_value(node)
    if not isinstance(val, (list, tuple)):
        return None
    return [v for v in val]  # type: ignore[return-value]


def _split_dim(node: fx.Node, in_nd: int) -> int | None:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "unbind":
        return dim_index(arg_of(node, 1, "dim", 0), in_nd)
    return dim_index(arg_of(node, 2, "dim", 0), in_nd)


#: Ops a learned-token piece may pass through between its parameter and the ``cat`` that joins it to a sequence.
_LEARNED_THROUGH = frozenset({"view", "transpose", "permute", "cast", "elementwise", "broadcast", "getitem",
                              "norm", "linear"})


def _piece_stream(piece: Any, limit: int = 32) -> str:
    """Stream of a ``cat`` piece that carries no token layout: ``"learned"`` when every value it is computed from is
    a parameter, a buffer or a constant (register / learned tokens, e.g. ``register_tokens.repeat(B, 1, 1)``), else
    ``"unknown"`` (tokens of an origin the graph does not show)."""
    if not isinstance(piece, fx.Node):
        return "unknown"
    seen: set[fx.Node] = set()
    stack = [piece]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return "unknown"
        if is_param(n):
            continue
        if n.op == "placeholder" or kind(n) not in _LEARNED_THROUGH and n.op != "get_attr":
            return "unknown"
        stack.extend(a for a in tensor_args(n) if isinstance(fake_value(a), torch.Tensor))
    return "learned"


class Propagator:
    """Forward propagation of :class:`Layout` over a graph, from seed nodes."""

    def __init__(self, gm: fx.GraphModule, seeds: dict[fx.Node, Layout], frames: int | None = None) -> None:
        self.gm = gm
        self.seeds = seeds
        # frames folded into the batch before a per-frame patch embedding: a view merging a dim of this size
        # with an image-token dim right after it gives the video's (t, h, w) raster order
        self.frames = frames
        self.layouts: dict[fx.Node, Layout] = {}
        # split nodes: list of per-piece layouts (or None)
        self.pieces: dict[fx.Node, list[Layout | None]] = {}
        # buffers written row by row: row -> [(start, stop, segments)], or None when written otherwise
        self.rows: dict[fx.Node, dict[int, list[tuple[int, int, tuple[tuple[str, int], ...]]]] | None] = {}

    def run(self) -> dict[fx.Node, Layout]:
        for node in self.gm.graph.nodes:
            if node in self.seeds:
                self.layouts[node] = self.seeds[node]
                continue
            try:
                lay = self._visit(node)
            except (TypeError, ValueError, IndexError):  # odd argument forms: unknown layout
                lay = None
            if lay is not None:
                shape = shape_of(node)
                if shape is None or lay.dim >= len(shape) or shape[lay.dim] != lay.length:
                    lay = None
            if lay is not None:
                self.layouts[node] = lay
        return self.layouts

    def _first(self, nodes: Iterable[fx.Node]) -> tuple[fx.Node, Layout] | None:
        for a in nodes:
            lay = self.layouts.get(a)
            if lay is not None:
                return a, lay
        return None

    def _visit(self, node: fx.Node) -> Layout | None:
        if node.op == "call_function" and node.target is operator.setitem:
            self._visit_setitem(node)
            return None
        k = kind(node)
        if k is None or k in ("placeholder", "output", "get_attr", "conv", "einsum"):
            return None
        out_shape = shape_of(node)
        if k == "split":
            self._visit_split(node)
            return None
        if k == "flex_attention":  # (out, logsumexp): the output keeps the query's layout
            q = node.args[0] if node.args else None
            self.pieces[node] = [self.layouts.get(q) if isinstance(q, fx.Node) else None, None]
            return None
        if k == "getitem":
            src = node.args[0]
            if isinstance(src, fx.Node) and src in self.pieces:
                i = node.args[1]
                pieces = self.pieces[src]
                return pieces[i] if isinstance(i, int) and -len(pieces) <= i < len(pieces) else None
            lay = self.layouts.get(src) if isinstance(src, fx.Node) else None
            nd = ndim(src)
            if lay is None or nd is None:
                return None
            return _getitem_layout(lay, node.args[1], nd, out_shape)
        if out_shape is None:
            return None
        out_nd = len(out_shape)
        if k in ("linear", "norm"):
            src = node.args[0] if node.args else node.kwargs.get("input")
            lay = self.layouts.get(src)
            if lay is None or lay.dim == out_nd - 1:
                return None
            return lay
        if k in ("elementwise", "activation", "dropout", "cast", "softmax"):
            hit = self._first(tensor_args(node))
            if hit is None:
                return None
            src, lay = hit
            in_nd = ndim(src)
            if in_nd is None:
                return None
            return lay.moved(lay.dim + out_nd - in_nd)
        if k == "transpose":
            src, lay = self._src(node)
            if lay is None:
                return None
            nd = ndim(src) or 0
            d0 = dim_index(arg_of(node, 1, "dim0"), nd)
            d1 = dim_index(arg_of(node, 2, "dim1"), nd)
            if d0 is None or d1 is None:
                return None
            return lay.moved(d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim)
        if k == "mT":
            src, lay = self._src(node)
            if lay is None:
                return None
            nd = ndim(src) or 0
            if lay.dim == nd - 1:
                return lay.moved(nd - 2)
            if lay.dim == nd - 2:
                return lay.moved(nd - 1)
            return lay
        if k == "permute":
            src, lay = self._src(node)
            norm = permute_dims(node)
            if lay is None or norm is None or lay.dim not in norm:
                return None
            return lay.moved(norm.index(lay.dim))
        if k == "view":
            src, lay = self._src(node)
            in_shape = shape_of(src)
            if lay is None or in_shape is None:
                return None
            d = _map_view_dim(in_shape, out_shape, lay.dim)
            if d is None and self.frames:
                return _merge_frames(lay, in_shape, out_shape, self.frames)
            return lay.moved(d) if d is not None else None
        if k == "broadcast":  # expand / repeat: the token dim keeps its place (from the right) and its size
            src, lay = self._src(node)
            in_shape = shape_of(src)
            if lay is None or in_shape is None:
                return None
            d = lay.dim + out_nd - len(in_shape)
            return lay.moved(d) if 0 <= d < out_nd and out_shape[d] == in_shape[lay.dim] else None
        if k == "cat":
            return self._visit_cat(node, out_nd)
        if k == "stack":
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            hit = self._first(t for t in tensors if isinstance(t, fx.Node))
            if hit is None:
                return None
            d = dim_index(arg_of(node, 1, "dim", 0), out_nd)
            if d is None:
                return None
            lay = hit[1]
            return lay.moved(lay.dim + 1 if d <= lay.dim else lay.dim)
        if k == "sdpa":
            q = arg_of(node, 0, "query")
            lay = self.layouts.get(q)
            return lay
        if k == "matmul":
            a = node.args[0] if node.args else None
            lay = self.layouts.get(a)
            a_nd = ndim(a)
            if lay is None or a_nd is None or lay.dim != a_nd - 2:
                return None
            return lay.moved(out_nd - 2)
        return None

    @staticmethod
    def step_dim(node: fx.Node, src: fx.Node, in_shape: Sequence[int], out_shape: Sequence[int],
                 dim: int) -> int | None:
        """Where token dim ``dim`` of ``src`` goes through the view/transpose/permute/cast ``node``."""
        p = Propagator.__new__(Propagator)
        p.layouts = {src: Layout(dim, (("image", in_shape[dim]),))}
        p.pieces = {}
        p.rows = {}
        p.seeds = {}
        try:
            lay = p._visit(node)
        except (TypeError, ValueError, IndexError):
            return None
        return lay.dim if lay is not None else None

    def _src(self, node: fx.Node) -> tuple[Any, Layout | None]:
        src = node.args[0] if node.args else node.kwargs.get("input")
        return src, self.layouts.get(src) if isinstance(src, fx.Node) else None

    def _visit_setitem(self, node: fx.Node) -> None:
        """``buf[i, a:b] = tokens``: a sequence assembled row by row in a ``(B, S, C)`` buffer (per-sample
        joining of text and image tokens). Once every row is written, the buffer gets the rows' layout when all
        rows agree (unwritten positions are ``"pad"`` tokens); rows that differ leave it without a layout."""
        if len(node.args) != 3 or not isinstance(node.args[0], fx.Node):
            return
        buf, idx, val = node.args
        shape = shape_of(buf)
        if shape is None or len(shape) != 3 or not isinstance(idx, tuple) or len(idx) != 2:
            return
        row, sl = idx
        if not isinstance(row, int) or not isinstance(sl, slice) or sl.step not in (None, 1) or any(
                isinstance(x, fx.Node) for x in (sl.start, sl.stop)):
            self.rows[buf] = None  # written in a way the rows cannot be told: no layout
            self.layouts.pop(buf, None)
            return
        if buf in self.rows and self.rows[buf] is None:
            return
        a, b, _ = sl.indices(shape[1])
        lay = self.layouts.get(val) if isinstance(val, fx.Node) else None
        segs = lay.segments if lay is not None and lay.dim == 0 and lay.length == b - a else (("unknown", b - a),)
        rows = self.rows.setdefault(buf, {})
        rows.setdefault(row % shape[0], []).append((a, b, tuple(segs)))  # type: ignore[union-attr]
        if len(rows) != shape[0]:  # type: ignore[arg-type]
            return
        laid: set[tuple[tuple[str, int], ...]] = set()
        for pieces in rows.values():  # type: ignore[union-attr]
            out: list[tuple[str, int]] = []
            pos = 0
            for a, b, segs in sorted(pieces):
                if a < pos:
                    laid.add((("unknown", shape[1]),))  # overlapping writes
                    break
                if a > pos:
                    out.append(("pad", a - pos))
                out.extend(segs)
                pos = b
            if pos < shape[1]:
                out.append(("pad", shape[1] - pos))
            laid.add(Layout(1, tuple(out)).merged())
        if any(st == "unknown" for segs in laid for st, _ in segs):
            self.layouts.pop(buf, None)
        elif len(laid) == 1:
            self.layouts[buf] = Layout(1, next(iter(laid)))
        else:  # the rows place their tokens differently (e.g. captions of different lengths before the image)
            self.layouts[buf] = Layout(1, (("ragged", shape[1]),))

    def _visit_split(self, node: fx.Node) -> None:
        src, lay = self._src(node)
        vals = _split_pieces(node)
        in_nd = ndim(src)
        if lay is None or vals is None or in_nd is None:
            return
        d = _split_dim(node, in_nd)
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if d is None:
            return
        pieces: list[Layout | None] = []
        if name == "unbind":
            if d == lay.dim:
                pieces = [None] * len(vals)
            else:
                pieces = [lay.moved(lay.dim - 1 if d < lay.dim else lay.dim)] * len(vals)
        elif d == lay.dim:
            pos = 0
            for v in vals:
                n = (static_size(v.shape[d]) or 0) if isinstance(v, torch.Tensor) else 0
                pieces.append(lay.slice(pos, pos + n))
                pos += n
        else:
            pieces = [lay] * len(vals)
        self.pieces[node] = pieces

    def _visit_cat(self, node: fx.Node, out_nd: int) -> Layout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        d = dim_index(arg_of(node, 1, "dim", 0), out_nd)
        if d is None or not isinstance(tensors, (list, tuple)):
            return None
        lays = [self.layouts.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if any(lay is not None and lay.dim == d for lay in lays):
            segs: list[tuple[str, int]] = []
            for t, lay in zip(tensors, lays):
                s = shape_of(t)
                if s is None:
                    return None
                if lay is not None and lay.dim == d:
                    segs.extend(lay.segments)
                else:
                    segs.append((_piece_stream(t), s[d]))
            return Layout(d, tuple(segs))
        for lay in lays:
            if lay is not None:
                return lay
        return None
