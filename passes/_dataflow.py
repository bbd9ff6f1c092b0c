"""Dataflow facts shared by ``find_attention`` and ``find_blocks``.

Three things, all read from the graph structure and FakeTensor metadata (nothing runs):

* :func:`kind`: a canonical name for what a node computes (``"linear"``, ``"sdpa"``, ``"view"``, ...), from the
  data tables :data:`FUNCTION_KINDS` and :data:`METHOD_KINDS`. Every other predicate is written against kinds,
  so a new spelling of an op is one table row.
* :func:`token_streams`: where the image/video tokens and the text tokens enter the graph (the patch embedding
  and the ``encoder_hidden_states``-like inputs), the :class:`~fxdit.passes._records.TokenGrid`, and, for every
  tensor node, its :class:`Layout`: which dimension is the token sequence and which stream each run of
  tokens along it comes from (``[("text", 77), ("image", 4096)]`` after a joint ``torch.cat``). Layouts follow
  views, transposes, permutes, slices, splits, concatenations, elementwise ops, linears and attention.
* :func:`block_paths`: the transformer blocks, as the deepest ``X.N`` module-path prefixes (``N`` an integer,
  i.e. a child of a ``ModuleList``/``Sequential``) that contain attention sites.

No function here branches on a model's class or module names; the only name table is
:data:`INPUT_NAME_HINTS`, a documented tie-breaker between two inputs whose shapes cannot tell image from text.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxdit.passes._fx_utils import fake_value, fxdit_meta, module_stack
from fxdit.passes._records import CarriedTokens, TokenGrid

__all__ = [
    "FUNCTION_KINDS",
    "METHOD_KINDS",
    "INPUT_NAME_HINTS",
    "Layout",
    "Streams",
    "kind",
    "shape_of",
    "tensor_args",
    "is_param",
    "token_streams",
    "block_paths",
    "block_of",
    "block_index_map",
    "trace_back",
    "trace_forward",
    "record_position_ids",
    "output_tokens",
]

_aten = torch.ops.aten

#: ``call_function`` targets → kind.
FUNCTION_KINDS: dict[Any, str] = {
    torch._C._nn.linear: "linear",
    F.linear: "linear",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.scaled_dot_product_attention: "sdpa",
    _aten.scaled_dot_product_attention.default: "sdpa",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.baddbmm: "baddbmm",
    _aten.bmm.default: "matmul",
    _aten.matmul.default: "matmul",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.conv2d: "conv",
    torch.conv3d: "conv",
    F.conv2d: "conv",
    F.conv3d: "conv",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.permute: "permute",
    torch.reshape: "view",
    torch.flatten: "view",
    torch.unflatten: "view",
    torch.squeeze: "view",
    torch.unsqueeze: "view",
    operator.getitem: "getitem",
    torch.split: "split",
    torch.chunk: "split",
    torch.unbind: "split",
    torch.tensor_split: "split",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.stack: "stack",
    F.layer_norm: "norm",
    torch.layer_norm: "norm",
    F.group_norm: "group_norm",
    torch.group_norm: "group_norm",
    F.dropout: "dropout",
    torch.dropout: "dropout",
    F.gelu: "activation",
    F.silu: "activation",
    F.relu: "activation",
    F.mish: "activation",
    torch.relu: "activation",
    torch.tanh: "activation",
    torch.sigmoid: "elementwise",
    operator.add: "elementwise",
    operator.iadd: "elementwise",
    operator.sub: "elementwise",
    operator.mul: "elementwise",
    operator.imul: "elementwise",
    operator.truediv: "elementwise",
    operator.neg: "elementwise",
    torch.add: "elementwise",
    torch.sub: "elementwise",
    torch.mul: "elementwise",
    torch.div: "elementwise",
    torch.neg: "elementwise",
    torch.addcmul: "elementwise",
    torch.where: "elementwise",
    torch.cos: "elementwise",
    torch.sin: "elementwise",
    torch.exp: "elementwise",
    torch.rsqrt: "elementwise",
    torch.sqrt: "elementwise",
    torch.pow: "elementwise",
    torch.clone: "cast",
    torch.einsum: "einsum",
    torch.broadcast_to: "broadcast",
    torch.view_as_complex: "view",
    torch.view_as_real: "view",
}
for _name in ("rms_norm",):
    for _mod in (F, torch):
        if hasattr(_mod, _name):
            FUNCTION_KINDS[getattr(_mod, _name)] = "norm"
for _name in ("gelu", "silu", "relu"):
    if hasattr(torch._C._nn, _name):
        FUNCTION_KINDS[getattr(torch._C._nn, _name)] = "activation"

#: ``call_method`` names → kind.
METHOD_KINDS: dict[str, str] = {
    "view": "view", "reshape": "view", "flatten": "view", "unflatten": "view", "view_as": "view",
    "reshape_as": "view", "squeeze": "view", "unsqueeze": "view",
    "transpose": "transpose", "swapaxes": "transpose", "permute": "permute",
    "split": "split", "split_with_sizes": "split", "chunk": "split", "unbind": "split", "tensor_split": "split",
    "contiguous": "cast", "to": "cast", "float": "cast", "half": "cast", "bfloat16": "cast", "type": "cast",
    "type_as": "cast", "clone": "cast", "detach": "cast",
    "softmax": "softmax", "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul",
    "baddbmm": "baddbmm",
    "add": "elementwise", "sub": "elementwise", "mul": "elementwise", "div": "elementwise", "neg": "elementwise",
    "add_": "elementwise", "mul_": "elementwise", "addcmul": "elementwise", "sigmoid": "elementwise",
    "cos": "elementwise", "sin": "elementwise", "exp": "elementwise", "pow": "elementwise", "rsqrt": "elementwise",
    "gelu": "activation", "silu": "activation", "relu": "activation", "tanh": "activation",
    "expand": "broadcast", "expand_as": "broadcast", "repeat": "broadcast",
}

#: Name fragments of graph inputs, used only to break a tie between two token inputs whose shapes cannot tell
#: the image stream from the text stream (same token count and rank). Image hints are tried first.
INPUT_NAME_HINTS: dict[str, tuple[str, ...]] = {
    "image": ("hidden_states", "latent", "sample", "x_", "img"),
    "text": ("encoder", "context", "text", "txt", "prompt", "caption"),
}

#: Kinds through which a value keeps its meaning (q stays q): used to trace q/k/v back to projections and an
#: attention output forward to its output projection.
PASS_THROUGH = frozenset({"view", "transpose", "permute", "mT", "getitem", "split", "cat", "stack", "cast",
                          "norm", "elementwise", "dropout"})


def kind(node: Any) -> str | None:
    """The canonical kind of ``node`` (see the tables), ``"placeholder"``, ``"output"`` or ``None``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in ("mT", "mH"):
            return "mT"
        try:
            return FUNCTION_KINDS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target)
    if node.op == "call_module":
        return None
    return None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node arguments of ``node`` (positional, keyword, one level into lists/tuples), in order."""
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


_PARAM_NAME = re.compile(r"_(parameters|buffers)_")


def is_param(node: fx.Node) -> bool:
    """A placeholder that holds a module parameter or buffer (Dynamo lifts them to graph inputs)."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    if isinstance(fake_value(node), torch.nn.Parameter):
        return True
    return bool(_PARAM_NAME.search(str(node.target)))


def _size(s: Any) -> int | None:
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)  # SymInt of a dynamic dim: its trace-time value
    return int(hint) if isinstance(hint, int) else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Shape of a tensor node at trace time; dynamic (symbolic) dims give their example value (hint).

    Unlike :func:`fxdit.passes._fx_utils.shape_of` this does not give up on graphs Dynamo traced with
    dynamic shapes; the analysis records shapes "at trace time" anyway.
    """
    val = fake_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    out = tuple(_size(s) for s in val.shape)
    return None if any(s is None for s in out) else out  # type: ignore[return-value]


def _ndim(node: Any) -> int | None:
    s = shape_of(node)
    return len(s) if s is not None else None


def _norm_dim(d: Any, nd: int) -> int | None:
    if not isinstance(d, int) or nd <= 0:
        return None
    d = d + nd if d < 0 else d
    return d if 0 <= d < nd else None


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


# ------------------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------------------


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
        return _norm_dim(_arg(node, 1, "dim", 0), in_nd)
    return _norm_dim(_arg(node, 2, "dim", 0), in_nd)


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


class _Propagator:
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
        if k == "getitem":
            src = node.args[0]
            if isinstance(src, fx.Node) and src in self.pieces:
                i = node.args[1]
                pieces = self.pieces[src]
                return pieces[i] if isinstance(i, int) and -len(pieces) <= i < len(pieces) else None
            lay = self.layouts.get(src) if isinstance(src, fx.Node) else None
            nd = _ndim(src)
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
            in_nd = _ndim(src)
            if in_nd is None:
                return None
            return lay.moved(lay.dim + out_nd - in_nd)
        if k == "transpose":
            src, lay = self._src(node)
            if lay is None:
                return None
            nd = _ndim(src) or 0
            d0 = _norm_dim(_arg(node, 1, "dim0"), nd)
            d1 = _norm_dim(_arg(node, 2, "dim1"), nd)
            if d0 is None or d1 is None:
                return None
            return lay.moved(d1 if lay.dim == d0 else d0 if lay.dim == d1 else lay.dim)
        if k == "mT":
            src, lay = self._src(node)
            if lay is None:
                return None
            nd = _ndim(src) or 0
            if lay.dim == nd - 1:
                return lay.moved(nd - 2)
            if lay.dim == nd - 2:
                return lay.moved(nd - 1)
            return lay
        if k == "permute":
            src, lay = self._src(node)
            if lay is None:
                return None
            dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = tuple(dims[0])
            if "dims" in node.kwargs:
                dims = tuple(node.kwargs["dims"])
            nd = _ndim(src) or 0
            norm = [_norm_dim(d, nd) for d in dims]
            if None in norm or lay.dim not in norm:
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
            d = _norm_dim(_arg(node, 1, "dim", 0), out_nd)
            if d is None:
                return None
            lay = hit[1]
            return lay.moved(lay.dim + 1 if d <= lay.dim else lay.dim)
        if k == "sdpa":
            q = _arg(node, 0, "query")
            lay = self.layouts.get(q)
            return lay
        if k == "matmul":
            a = node.args[0] if node.args else None
            lay = self.layouts.get(a)
            a_nd = _ndim(a)
            if lay is None or a_nd is None or lay.dim != a_nd - 2:
                return None
            return lay.moved(out_nd - 2)
        return None

    @staticmethod
    def step_dim(node: fx.Node, src: fx.Node, in_shape: Sequence[int], out_shape: Sequence[int],
                 dim: int) -> int | None:
        """Where token dim ``dim`` of ``src`` goes through the view/transpose/permute/cast ``node``."""
        p = _Propagator.__new__(_Propagator)
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
        in_nd = _ndim(src)
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
                n = (_size(v.shape[d]) or 0) if isinstance(v, torch.Tensor) else 0
                pieces.append(lay.slice(pos, pos + n))
                pos += n
        else:
            pieces = [lay] * len(vals)
        self.pieces[node] = pieces

    def _visit_cat(self, node: fx.Node, out_nd: int) -> Layout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        d = _norm_dim(_arg(node, 1, "dim", 0), out_nd)
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


# ------------------------------------------------------------------------------------------------------------
# Token streams: image input, text inputs, token grid
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Streams:
    """Where the token streams enter a graph, and every tensor node's :class:`Layout`.

    Attributes:
        image_input: the graph input holding the image/video latents (node name) or ``None``.
        text_inputs: graph inputs holding text tokens (node names).
        grid: the token grid, or ``None`` when the graph does not show it (pass ``attention.grid``).
        layouts: node → layout (by node object; valid for the graph it was computed on).
        reason: why the grid or the image stream could not be found (``""`` when found).
    """

    image_input: str | None
    text_inputs: list[str]
    grid: TokenGrid | None
    layouts: dict[fx.Node, Layout]
    reason: str = ""

    def layout(self, node: Any) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, fx.Node) else None


_CHAIN_KINDS = frozenset({"view", "transpose", "permute", "cast", "mT"})


def _through_chain_back(node: Any) -> Any:
    while isinstance(node, fx.Node) and kind(node) in _CHAIN_KINDS and node.args:
        node = node.args[0]
    return node


def _is_float_input(node: fx.Node) -> bool:
    val = fake_value(node)
    return isinstance(val, torch.Tensor) and val.is_floating_point() and not is_param(node)


_CHANNELS_LAST = -1  # _forward_to_tokens: the conv output permuted to (B, *grid, C), grid not yet merged


def _permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The normalized dims of a ``permute`` node (method or function form)."""
    nd = _ndim(node.args[0]) if node.args else None
    if nd is None:
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if "dims" in node.kwargs:
        dims = tuple(node.kwargs["dims"])
    norm = [_norm_dim(d, nd) for d in dims]
    return None if None in norm or len(norm) != nd else tuple(norm)  # type: ignore[arg-type]


#: Ops between a latent input and its patch-embedding conv that keep the latent's spatial layout (a norm over
#: channel groups, a scale, a cast): the conv still shows the token grid.
_LATENT_THROUGH = frozenset({"view", "transpose", "permute", "cast", "mT", "norm", "group_norm", "elementwise",
                             "activation"})


def _latent_source(node: Any, limit: int = 16) -> fx.Node | None:
    """The float graph input a conv's input is computed from through :data:`_LATENT_THROUGH` ops (parameters
    aside), or ``None`` when it mixes in other inputs or other ops."""
    found: fx.Node | None = None
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        if is_param(n):
            continue
        if n.op == "placeholder":
            if not _is_float_input(n) or (found is not None and found is not n):
                return None
            found = n
            continue
        if kind(n) not in _LATENT_THROUGH:
            return None
        stack.extend(a for a in tensor_args(n) if isinstance(fake_value(a), torch.Tensor))
    return found


def _forward_to_tokens(conv: fx.Node, limit: int = 12) -> fx.Node | None:
    """The first node after a patch-embedding conv whose layout is ``(B, N, C)`` with the tokens on dim 1.

    The conv output ``(B, C, *grid)`` is followed through views (the one that merges the grid dims into one
    token dim), transposes, permutes and casts; the token dim is tracked, not guessed from sizes.
    """
    out = shape_of(conv)
    if out is None:
        return None
    n_tok = math.prod(out[2:])
    prefix = math.prod(out[:2])
    frontier: list[tuple[fx.Node, int | None]] = [(conv, None)]
    for _ in range(limit):
        nxt: list[tuple[fx.Node, int | None]] = []
        for n, dim in frontier:
            in_shape = shape_of(n)
            for u in n.users:
                k = kind(u)
                us = shape_of(u)
                if k not in _CHAIN_KINDS or us is None or in_shape is None:
                    continue
                d: int | None = None
                if dim == _CHANNELS_LAST:
                    # (B, *grid, C) from a channels-last permute: the view that merges the grid into one dim
                    if k == "view" and len(us) == 3 and us[1] == n_tok:
                        return u
                    if k != "cast":
                        continue
                    d = _CHANNELS_LAST
                elif dim is None:
                    if k == "permute":
                        dims = _permute_dims(u)
                        nd = len(out)
                        if dims is None or list(dims) != [0, *range(2, nd), 1]:
                            continue
                        d = _CHANNELS_LAST
                    elif k == "view":
                        acc = 1
                        for i, size in enumerate(us):
                            if acc == prefix and size == n_tok:
                                d = i
                                break
                            acc *= size
                    elif k == "cast":
                        d = None
                    else:
                        continue
                else:
                    lay = _Propagator.step_dim(u, n, in_shape, us, dim)
                    if lay is None:
                        continue
                    d = lay
                if d is not None and len(us) == 3 and d == 1:
                    return u
                nxt.append((u, d))
        frontier = nxt
        if not frontier:
            break
    return None


def _conv_grid(gm: fx.GraphModule) -> tuple[TokenGrid, fx.Node] | None:
    for node in gm.graph.nodes:
        if kind(node) != "conv":
            continue
        src = _latent_source(node.args[0] if node.args else node.kwargs.get("input"))
        if src is None:
            continue
        out = shape_of(node)
        if out is None or len(out) not in (4, 5):
            continue
        spatial = tuple(out[2:])
        frames = _frames_in_batch(src, out)
        shape = (frames or 1, *spatial) if len(spatial) == 2 else spatial
        stride = _arg(node, 3, "stride", 1)
        if isinstance(stride, int):
            stride = (stride,) * len(spatial)
        patch_node = _forward_to_tokens(node)
        grid = TokenGrid(shape=tuple(int(s) for s in shape), source=f"conv{len(spatial)}d",
                         patch_node=patch_node.name if patch_node is not None else None,
                         patch=tuple(int(s) for s in stride) if isinstance(stride, (list, tuple)) else None,
                         frames_in_batch=frames)
        return grid, src
    return None


def _frames_in_batch(latent: fx.Node, conv_out: Sequence[int]) -> int | None:
    """``F`` when a 2-D patch conv runs on the frames of a 5-D video latent folded into its batch
    (``(B, C, F, H, W) -> (B·F, C, H, W)``), else ``None``."""
    s = shape_of(latent)
    if s is None or len(s) != 5 or len(conv_out) != 4 or conv_out[0] == s[0] or conv_out[0] % s[0]:
        return None
    frames = conv_out[0] // s[0]
    return frames if frames in (s[1], s[2]) and frames > 1 else None


def _unfold_grid(gm: fx.GraphModule) -> tuple[TokenGrid, fx.Node] | None:
    """Patchify by reshape/permute (or ``unfold``) of a 4-D/5-D latent input into ``(B, N, C·p·p)`` tokens."""
    for node in gm.graph.nodes:
        if node.op != "placeholder" or not _is_float_input(node):
            continue
        s = shape_of(node)
        if s is None or len(s) not in (4, 5):
            continue
        spatial = s[2:]
        frontier = [node]
        for _ in range(10):
            nxt = []
            for n in frontier:
                for u in n.users:
                    if kind(u) not in _CHAIN_KINDS and not (u.op == "call_method" and u.target == "unfold"):
                        continue
                    us = shape_of(u)
                    if us is not None and len(us) == 3 and us[0] == s[0] and any(
                            kind(w) in ("linear", "output") for w in u.users):
                        n_tok = us[1]
                        grid = _grid_from_tokens(tuple(spatial), n_tok)
                        if grid is not None:
                            shape, patch = grid
                            return TokenGrid(shape=shape, source="unfold", patch_node=u.name, patch=patch), node
                    nxt.append(u)
            frontier = nxt
    return None


def _grid_from_tokens(spatial: tuple[int, ...], n_tok: int) -> tuple[tuple[int, int, int], tuple[int, ...]] | None:
    total = math.prod(spatial)
    if n_tok <= 0 or total % n_tok:
        return None
    vol = total // n_tok
    if len(spatial) == 2:
        p = math.isqrt(vol)
        if p * p == vol and spatial[0] % p == 0 and spatial[1] % p == 0:
            return (1, spatial[0] // p, spatial[1] // p), (p, p)
        return None
    for pt in range(1, spatial[0] + 1):
        if vol % pt or spatial[0] % pt:
            continue
        p = math.isqrt(vol // pt)
        if p * p * pt == vol and spatial[1] % p == 0 and spatial[2] % p == 0:
            return (spatial[0] // pt, spatial[1] // p, spatial[2] // p), (pt, p, p)
    return None


def record_position_ids(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Keep the values of small position-id inputs (``(N, 3)`` or ``(B, N, 3)``, e.g. Flux's ``img_ids``).

    Packed-latent models (Flux) show their token grid only in these values, which a pass cannot read from
    FakeTensor metadata. Callers that hold the real example inputs (``fxdit.analysis``, the backend) call this
    before the passes; ``find_blocks`` then reads the grid from the ids (``TokenGrid.source == "ids"``).
    """
    ids: dict[str, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or is_param(node):
            continue
        if value.dim() in (2, 3) and value.shape[-1] == 3 and value.numel() <= 3 * 2**20:
            try:
                ids[node.name] = value.detach().to("cpu", copy=True)
            except RuntimeError:  # fake or meta tensors: nothing to keep
                continue
    if ids:
        fxdit_meta(gm)["position_ids"] = ids


def _ids_grid(gm: fx.GraphModule, n_tok: int) -> TokenGrid | None:
    ids = fxdit_meta(gm).get("position_ids") or {}
    for value in ids.values():
        v = value[0] if value.dim() == 3 else value
        if v.shape[0] != n_tok:
            continue
        extent = tuple(int(torch.unique(v[:, i]).numel()) for i in range(3))
        if math.prod(extent) == n_tok:
            return TokenGrid(shape=extent, source="ids")  # type: ignore[arg-type]
    return None


def _carried_image(placeholders: list[fx.Node],
                   carried: dict[str, CarriedTokens]) -> tuple[fx.Node, CarriedTokens] | None:
    """The one input holding image tokens whose layout an earlier graph of the model found, if exactly one."""
    hits = [(n, carried[n.name]) for n in placeholders
            if n.name in carried and any(st == "image" for st, _ in carried[n.name].segments)]
    return hits[0] if len(hits) == 1 else None


def output_tokens(gm: fx.GraphModule, streams: Streams) -> dict[int, CarriedTokens]:
    """Graph outputs that carry image tokens of the known grid (to seed the next graph after a graph break)."""
    grid = streams.grid
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if grid is None or out is None or grid.source == "option":
        return {}
    vals = out.args[0] if isinstance(out.args[0], (list, tuple)) else (out.args[0],)
    found: dict[int, CarriedTokens] = {}
    for i, v in enumerate(vals):
        lay = streams.layout(v)
        if lay is None or "image" not in lay.streams:
            continue
        if sum(n for st, n in lay.segments if st == "image") != grid.tokens:
            continue
        found[i] = CarriedTokens(lay.dim, tuple(lay.merged()), tuple(grid.shape))  # type: ignore[arg-type]
    return found


def _table_grid(gm: fx.GraphModule, n_tok: int) -> TokenGrid | None:
    """The grid a position table shows: a table built over the grid, ``(T, H, W, d)`` or ``(H, W, d)`` (e.g. RoPE
    frequencies broadcast per axis and concatenated), flattened to ``(N, d)`` rows, one per packed image token.

    Only tables computed from parameters, buffers and constants count (their values are positions, not
    activations), built with at least one broadcast over the grid. Several tables must agree, else ``None``.
    """
    found: set[tuple[int, int, int]] = set()
    for node in gm.graph.nodes:
        if kind(node) != "view" or not node.args:
            continue
        src = node.args[0]
        ins, outs = shape_of(src), shape_of(node)
        if ins is None or outs is None or len(outs) != 2 or outs[0] != n_tok or len(ins) not in (3, 4):
            continue
        if ins[-1] != outs[1] or math.prod(ins[:-1]) != n_tok or min(ins[:-1]) < 1:
            continue
        if not _is_position_table(src):
            continue
        shape = tuple(int(x) for x in ins[:-1])
        found.add((1, *shape) if len(shape) == 2 else shape)  # type: ignore[arg-type]
    if len(found) != 1:
        return None
    return TokenGrid(shape=next(iter(found)), source="position table")


#: Ops a position table is built with: slices of frequency tables, per-axis views, broadcasts, concatenation.
_TABLE_THROUGH = frozenset({"view", "getitem", "split", "cat", "broadcast", "cast", "elementwise", "transpose",
                            "permute", "stack"})


def _is_position_table(node: fx.Node, limit: int = 64) -> bool:
    """``node`` is computed from parameters/buffers/constants only, through table ops, with at least one
    broadcast (each axis' table expanded over the grid)."""
    seen: set[fx.Node] = set()
    stack, broadcast = [node], False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return False
        if is_param(n) or n.op == "get_attr":
            continue
        k = kind(n)
        if n.op == "placeholder" or k not in _TABLE_THROUGH:
            if n.op == "call_function" and k is None and not any(
                    isinstance(fake_value(a), torch.Tensor) for a in tensor_args(n)):
                continue  # a factory (arange, ones): positions, not activations
            return False
        broadcast = broadcast or k == "broadcast"
        stack.extend(a for a in tensor_args(n) if isinstance(fake_value(a), torch.Tensor))
    return broadcast


def _agreed_grid(grids: Sequence[TokenGrid | None]) -> tuple[TokenGrid | None, str]:
    """The grid every source that shows one agrees on, or ``None`` with the disagreement as the reason."""
    shown = [g for g in grids if g is not None]
    shapes = {tuple(g.shape) for g in shown}
    if len(shapes) > 1:
        listed = ", ".join(f"{g.source} {tuple(g.shape)}" for g in shown)
        return None, f"token grid sources disagree ({listed}); set attention.grid"
    return (shown[0] if shown else None), ""


def _graph_output_tokens(gm: fx.GraphModule) -> tuple[int, ...] | None:
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    vals = out.args[0]
    first = vals[0] if isinstance(vals, (list, tuple)) and vals else vals
    return shape_of(first)


def _hint_score(node: fx.Node, stream: str) -> int:
    name = str(node.target).lower()
    return sum(1 for h in INPUT_NAME_HINTS[stream] if h in name)


def _packed_image_input(gm: fx.GraphModule, candidates: list[fx.Node]) -> fx.Node | None:
    """Among 3-D token inputs, the latents: the one whose token count the graph output has."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    out = _graph_output_tokens(gm)
    if out is not None and len(out) == 3:
        same = [c for c in candidates if shape_of(c)[1] == out[1]]  # type: ignore[index]
        if len(same) == 1:
            return same[0]
        if same:
            candidates = same
    ranked = sorted(candidates, key=lambda c: (-_hint_score(c, "image"), _hint_score(c, "text")))
    if _hint_score(ranked[0], "image") > _hint_score(ranked[0], "text"):
        return ranked[0]
    return None


def _unpatchify(gm: fx.GraphModule, layouts: dict[fx.Node, Layout], n_img: int | None) -> tuple[fx.Node, tuple] | None:
    """The reshape ``(B, N, C) -> (B, g1.., ...)`` that starts the unpatchify, and the grid it shows."""
    for node in gm.graph.nodes:
        if kind(node) != "view":
            continue
        src = node.args[0] if node.args else None
        lay = layouts.get(src)
        in_shape, out_shape = shape_of(src), shape_of(node)
        if lay is None or in_shape is None or out_shape is None or len(in_shape) != 3 or lay.dim != 1:
            continue
        if lay.streams != {"image"} or (n_img is not None and lay.length != n_img):
            continue
        n = lay.length
        for k in ((3, 2) if len(out_shape) >= 8 else (2,)):
            if len(out_shape) >= 2 * k + 2 and math.prod(out_shape[1:1 + k]) == n:
                g = tuple(int(x) for x in out_shape[1:1 + k])
                return node, ((1, *g) if k == 2 else g)
    return None


def token_streams(gm: fx.GraphModule, cfg: Any = None) -> Streams:
    """Find the image input, the text inputs, the token grid, and every node's token :class:`Layout`.

    The image stream starts at the patch embedding: a ``conv2d``/``conv3d`` on a graph input (grid = the
    conv's output spatial shape), a reshape/permute patchify of a 4-D/5-D input, or a packed ``(B, N, C)``
    token input feeding a linear (Flux), whose grid comes from recorded position ids or the unpatchify
    reshape at the end. Text streams start at the other 3-D float graph inputs. ``cfg.attention.grid``, when
    set, overrides the grid shape (``source="option"``).
    """
    reason = ""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and _is_float_input(n)]
    carried: dict[str, CarriedTokens] = dict(fxdit_meta(gm).get("carried_tokens") or {})
    image_input: fx.Node | None = None
    grid: TokenGrid | None = None
    seeds: dict[fx.Node, Layout] = {}

    found = _conv_grid(gm) or _unfold_grid(gm)
    if found is not None:
        grid, image_input = found
        if grid.patch_node is not None:
            patch = next(n for n in gm.graph.nodes if n.name == grid.patch_node)
            per_frame = grid.tokens // (grid.frames_in_batch or 1)
            seeds[patch] = Layout(1, (("image", per_frame),))
        else:
            reason = "patch embedding found but no (B, N, C) token node after it"
    elif (hit := _carried_image(placeholders, carried)) is not None:
        image_input, rec = hit
        seeds[image_input] = Layout(rec.dim, rec.segments)
        first_linear = next((u for u in image_input.users if kind(u) == "linear"), None)
        grid = TokenGrid(shape=rec.grid, source="carried",
                         patch_node=first_linear.name if first_linear is not None and rec.dim == 1 else None)
    else:
        three_d = [n for n in placeholders if _ndim(n) == 3]
        image_input = _packed_image_input(gm, [n for n in three_d if any(kind(u) == "linear" or
                                                                       kind(u) == "cast" for u in n.users)])
        if image_input is not None:
            n_tok = shape_of(image_input)[1]  # type: ignore[index]
            seeds[image_input] = Layout(1, (("image", n_tok),))
            first_linear = next((u for u in image_input.users if kind(u) == "linear"), None)
            grid, reason = _agreed_grid([_ids_grid(gm, n_tok), _table_grid(gm, n_tok)])
            if grid is not None and first_linear is not None:
                grid = TokenGrid(grid.shape, grid.source, patch_node=first_linear.name)
            elif grid is None and not reason:
                reason = ("packed token input without position ids, position tables or unpatchify; "
                          "set attention.grid")
        else:
            reason = "no patch embedding (conv/patchify) and no packed token input found"

    text_inputs = []
    for n in placeholders:
        if n is image_input:
            continue
        if n.name in carried:  # a layout an earlier graph of the model found
            rec = carried[n.name]
            seeds[n] = Layout(rec.dim, rec.segments)
            continue
        if _ndim(n) != 3:
            continue
        s = shape_of(n)
        seeds[n] = Layout(1, (("text", s[1]),))  # type: ignore[index]
        text_inputs.append(n.name)

    frames = grid.frames_in_batch if grid is not None else None
    layouts = _Propagator(gm, seeds, frames).run()

    n_img = grid.tokens if grid is not None else None
    un = _unpatchify(gm, layouts, n_img)
    if un is not None:
        node, shape = un
        if grid is None:
            grid = TokenGrid(shape=shape, source="unpatchify", unpatch_node=node.name,
                             patch_node=next(iter(seeds)).name if image_input is not None and seeds else None)
            reason = ""
        elif shape != grid.shape:
            reason = (f"token grid sources disagree: {grid.source} {tuple(grid.shape)} vs unpatchify "
                      f"{tuple(shape)}; set attention.grid")
            grid = None
        else:
            grid = TokenGrid(grid.shape, grid.source, grid.patch_node, node.name, grid.patch, grid.frames_in_batch)

    if frames:
        # the patch node holds one frame's tokens per batch row: GRAT permutes per site, not at the patch node
        grid = TokenGrid(grid.shape, grid.source, None, None, grid.patch, frames)  # type: ignore[union-attr]

    override = getattr(getattr(cfg, "attention", None), "grid", None)
    if override is not None:
        shape = tuple(override) if len(override) == 3 else (1, *override)
        grid = TokenGrid(shape=shape, source="option",  # type: ignore[arg-type]
                         patch_node=grid.patch_node if grid is not None else None,
                         unpatch_node=grid.unpatch_node if grid is not None else None,
                         patch=grid.patch if grid is not None else None)
        reason = ""
    return Streams(image_input.name if image_input is not None else None, text_inputs, grid, layouts, reason)


# ------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def _indexed_prefixes(path: str) -> list[str]:
    """``"a.0.b.1.attn"`` → ``["a.0", "a.0.b.1"]``: every prefix ending in an integer component."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i + 1]) for i, p in enumerate(parts) if p.isdigit() and i > 0]


def _node_paths(node: fx.Node) -> list[str]:
    return [p for p, _ in module_stack(node)]


def block_paths(gm: fx.GraphModule, site_nodes: Sequence[fx.Node],
                image_sites: Sequence[fx.Node] | None = None) -> list[str]:
    """The transformer blocks, as module paths in graph order.

    A block is the deepest ``X.N`` prefix (``N`` an integer: an element of a ``ModuleList``/``Sequential``) of
    an attention site's module path. Blocks are ordered by their first node in the graph. When
    ``image_sites`` (the sites whose queries carry image tokens) is non-empty, only blocks containing one of
    them count: text-only blocks (e.g. a text-encoder refiner) are not transformer blocks of the image stream.
    """
    if image_sites:
        site_nodes = list(image_sites)
    chosen: set[str] = set()
    for node in site_nodes:
        best = None
        for path in _node_paths(node):
            pre = _indexed_prefixes(path)
            if pre:
                best = pre[-1] if best is None or len(pre[-1]) > len(best) else best
        if best is not None:
            chosen.add(best)
    # Drop a block that contains another chosen block (a site directly in an outer list element).
    chosen = {p for p in chosen if not any(o != p and o.startswith(p + ".") for o in chosen)}
    order: list[str] = []
    for node in gm.graph.nodes:
        for path in _node_paths(node):
            if path in chosen and path not in order:
                order.append(path)
    return order


def _under(node: fx.Node, blocks: Sequence[str]) -> int | None:
    paths = _node_paths(node)
    for i, b in enumerate(blocks):
        for p in paths:
            if p == b or p.startswith(b + "."):
                return i
    return None


def block_of(node: fx.Node, blocks: Sequence[str]) -> int | None:
    """Index in ``blocks`` of the block ``node`` belongs to, or ``None``.

    A node belongs to block ``i`` when ``blocks[i]`` is on its module stack **and** it lies in the block's
    region of the graph: from the block's first node up to the first node of the next block (graph order).
    A module of a block called again from outside (diffusers' DiT re-runs block 0's timestep embedder for
    the final layer) is therefore not part of that block.
    """
    i = _under(node, blocks)
    if i is None:
        return None
    graph = node.graph
    starts = _block_starts(graph, blocks)
    pos = _positions(graph)
    me = pos.get(node)
    if me is None or i not in starts:
        return i
    if me < starts[i]:
        return None
    later = [s for j, s in starts.items() if s > starts[i]]
    if later and me >= min(later):
        return None
    return i


def block_index_map(gm: fx.GraphModule, blocks: Sequence[str]) -> dict[fx.Node, int]:
    """:func:`block_of` for every node of ``gm`` at once (nodes outside every block are absent)."""
    starts = _block_starts(gm.graph, blocks)
    order = sorted(starts.items(), key=lambda kv: kv[1])
    ends = {i: (order[j + 1][1] if j + 1 < len(order) else None) for j, (i, _) in enumerate(order)}
    out: dict[fx.Node, int] = {}
    for k, n in enumerate(gm.graph.nodes):
        i = _under(n, blocks)
        if i is None:
            continue
        if i in starts and (k < starts[i] or (ends[i] is not None and k >= ends[i])):
            continue
        out[n] = i
    return out


def _positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: k for k, n in enumerate(graph.nodes)}


def _block_starts(graph: fx.Graph, blocks: Sequence[str]) -> dict[int, int]:
    starts: dict[int, int] = {}
    for k, n in enumerate(graph.nodes):
        if n.op == "placeholder":
            continue  # Dynamo gives lifted parameters the module stack of their first use
        i = _under(n, blocks)
        if i is not None and i not in starts:
            starts[i] = k
    return starts


# ------------------------------------------------------------------------------------------------------------
# Tracing helpers
# ------------------------------------------------------------------------------------------------------------


def _walk(start: fx.Node, *, through: frozenset[str], stop: frozenset[str], limit: int,
          neighbours: Callable[[fx.Node], Iterable[fx.Node]]) -> list[fx.Node]:
    """Nodes of a kind in ``stop`` reached from ``start`` over ``neighbours``, walking on through nodes of a kind in
    ``through`` only (``start`` itself is always walked through); at most ``limit`` nodes are visited."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [start]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not start:
            k = kind(n)
            if k in stop:
                found.append(n)
                continue
            if k not in through:
                continue
        stack.extend(neighbours(n))
    return found


def trace_back(start: fx.Node, *, through: frozenset[str] = PASS_THROUGH, stop: frozenset[str] = frozenset({"linear"}),
               limit: int = 200) -> list[fx.Node]:
    """Nodes of a kind in ``stop`` reached from ``start`` backwards through nodes of a kind in ``through`` (never
    through another linear layer)."""

    def inputs(n: fx.Node) -> list[fx.Node]:
        if n is not start and kind(n) == "linear":
            return []
        return [a for a in tensor_args(n) if not is_param(a)]

    return _walk(start, through=through, stop=stop, limit=limit, neighbours=inputs)


def trace_forward(start: fx.Node, *, through: frozenset[str], stop: frozenset[str], limit: int = 200) -> list[fx.Node]:
    """Nodes of a kind in ``stop`` reached from ``start`` forwards through users of a kind in ``through``."""
    return _walk(start, through=through, stop=stop, limit=limit, neighbours=lambda n: n.users)
