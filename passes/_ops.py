"""The analysis layer's op vocabulary: what each node computes, as one canonical *kind*.

Every predicate of the analysis (layouts, grids, blocks, roles) is written against kinds, never against op
spellings: :data:`FUNCTION_KINDS` (``call_function`` targets) and :data:`METHOD_KINDS` (``call_method`` names) are
the only place an op spelling is written, so a new spelling is one row here. Also: argument access that works for
positional and keyword forms, and trace-time shapes (symbolic dims give their example value).
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxdit.passes._fx_utils import fake_value

__all__ = ["OP_TABLE", "TOKEN_RULES", "ARITH", "arith", "token_rule", "FUNCTION_KINDS", "METHOD_KINDS",
           "INPUT_NAME_HINTS", "PASS_THROUGH", "kind", "tensor_args", "is_param", "shape_of", "static_size", "ndim",
           "dim_index", "arg_of", "linear_input", "linear_weight", "linear_bias", "permute_dims"]

_aten = torch.ops.aten

def _optional(*names: str) -> tuple[Any, ...]:
    """``torch``/``F``/``torch._C._nn`` functions of these names that this torch build has."""
    return tuple(getattr(mod, n) for n in names for mod in (F, torch, torch._C._nn) if hasattr(mod, n))


#: Every op spelling the analysis knows, written once: ``(spellings, kind, token rule)``. A spelling is a
#: ``call_function`` target or a ``call_method`` name. The *kind* is what the node computes (what the analysis
#: reasons about); the *token rule* says how the op maps a token dimension through it, for the walker that must
#: prove an op keeps the token order (:mod:`fxdit.passes._token_flow`): ``None`` when it is not proven to.
OP_TABLE: tuple[tuple[tuple[Any, ...], str, str | None], ...] = (
    ((torch._C._nn.linear, F.linear), "linear", "trailing"),
    ((torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention,
      _aten.scaled_dot_product_attention.default), "sdpa", None),
    ((operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"), "matmul", "matmul"),
    ((_aten.bmm.default, _aten.matmul.default, "__matmul__"), "matmul", None),
    ((torch.baddbmm, "baddbmm"), "baddbmm", None),
    ((torch.softmax, F.softmax, "softmax"), "softmax", "dim_op"),
    ((torch.log_softmax, F.log_softmax, "log_softmax"), "log_softmax", "dim_op"),
    ((torch.conv2d, torch.conv3d, F.conv2d, F.conv3d), "conv", None),
    ((torch.transpose, torch.swapaxes, "transpose", "swapaxes"), "transpose", "transpose"),
    ((torch.permute, "permute"), "permute", "permute"),
    ((torch.movedim, "movedim"), "movedim", "movedim"),
    ((torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, "view", "reshape", "flatten",
      "unflatten", "squeeze", "unsqueeze"), "view", "reshape"),
    (("view_as", "reshape_as", torch.view_as_complex, torch.view_as_real), "view", None),
    ((operator.getitem,), "getitem", "getitem"),
    ((operator.setitem,), "setitem", "setitem"),
    ((torch.split, torch.chunk, torch.tensor_split, "split", "split_with_sizes", "chunk", "tensor_split"), "split",
     "split"),
    ((torch.unbind, "unbind"), "split", "unbind"),
    ((torch.cat, torch.concat, torch.concatenate), "cat", "cat"),
    ((torch.stack,), "stack", "stack"),
    ((F.layer_norm, torch.layer_norm, *_optional("rms_norm")), "norm", "trailing"),
    ((F.group_norm, torch.group_norm), "group_norm", None),
    ((F.dropout, torch.dropout, "dropout"), "dropout", "dropout"),
    ((F.gelu, F.silu, F.relu, F.mish, F.hardswish, F.tanh, torch.relu, torch.tanh, *_optional("gelu", "silu"),
      "gelu", "silu", "relu", "tanh"), "activation", "pointwise"),
    ((operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"), "elementwise:add", "pointwise"),
    ((operator.sub, torch.sub, "sub"), "elementwise:sub", "pointwise"),
    ((operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"), "elementwise:mul", "pointwise"),
    ((operator.truediv, torch.div, "div", "true_divide"), "elementwise:div", "pointwise"),
    ((torch.sin, "sin", _aten.sin.default), "elementwise:sin", "pointwise"),
    ((torch.cos, "cos", _aten.cos.default), "elementwise:cos", "pointwise"),
    ((operator.neg, operator.pow, torch.neg, torch.pow, torch.addcmul, torch.where, torch.exp, torch.rsqrt,
      torch.sqrt, torch.sigmoid, F.sigmoid, torch.erf, torch.abs, torch.clamp, torch.masked_fill, torch.square,
      torch.reciprocal, torch.lerp, torch.float_power, "neg", "pow", "sigmoid", "exp", "rsqrt", "sqrt", "abs",
      "clamp", "masked_fill", "square", "reciprocal", "addcmul"), "elementwise", "pointwise"),
    ((torch.clone, "contiguous", "float", "half", "bfloat16", "double", "type", "clone", "detach"), "cast",
     "pointwise"),
    (("to", "type_as"), "cast", "like_first"),
    ((torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like), "like", "like_first"),
    ((torch.mean, torch.sum, torch.amax, torch.amin, torch.var, "mean", "sum", "amax", "amin", "var", "std"),
     "reduce", "reduce"),
    (("expand", "expand_as"), "broadcast", "expand"),
    (("repeat", torch.broadcast_to), "broadcast", None),
    (("size", "dim", "numel", "get_device", getattr), "metadata", "metadata"),
    ((torch.einsum,), "einsum", None),
    ((F.unfold,), "im2col", None),
    (tuple(op for op in (getattr(torch.ops.higher_order, "flex_attention", None),) if op is not None),
     "flex_attention", None),
)

#: ``call_function`` targets → kind, and ``call_method`` names → kind (derived from :data:`OP_TABLE`; a kind
#: written ``"elementwise:add"`` there is kind ``"elementwise"`` with arithmetic ``"add"``, see :func:`arith`).
FUNCTION_KINDS: dict[Any, str] = {}
METHOD_KINDS: dict[str, str] = {}
#: spelling → token rule, and spelling → arithmetic of an elementwise op (derived from :data:`OP_TABLE`).
TOKEN_RULES: dict[Any, str] = {}
ARITH: dict[Any, str] = {}
for _spellings, _kind, _rule in OP_TABLE:
    _base, _, _op = _kind.partition(":")
    for _sp in _spellings:
        (METHOD_KINDS if isinstance(_sp, str) else FUNCTION_KINDS)[_sp] = _base
        if _rule is not None:
            TOKEN_RULES[_sp] = _rule
        if _op:
            ARITH[_sp] = _op


def arith(node: Any) -> str | None:
    """The arithmetic of an elementwise node (``"add"``, ``"sub"``, ``"mul"``, ``"div"``, ``"sin"``, ``"cos"``) or
    ``None``."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    try:
        return ARITH.get(node.target)
    except TypeError:  # unhashable target
        return None


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


def token_rule(node: Any) -> str | None:
    """How ``node`` maps a token dimension (see :data:`OP_TABLE`), or ``None`` when it is not proven to keep it."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    if node.target is getattr and len(node.args) > 1 and node.args[1] in ("mT", "mH"):
        return None
    try:
        return TOKEN_RULES.get(node.target)
    except TypeError:  # unhashable target
        return None


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


def static_size(s: Any) -> int | None:
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
    out = tuple(static_size(s) for s in val.shape)
    return None if any(s is None for s in out) else out  # type: ignore[return-value]


def ndim(node: Any) -> int | None:
    s = shape_of(node)
    return len(s) if s is not None else None


def dim_index(d: Any, nd: int) -> int | None:
    if not isinstance(d, int) or nd <= 0:
        return None
    d = d + nd if d < 0 else d
    return d if 0 <= d < nd else None


def arg_of(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def linear_input(node: fx.Node) -> Any:
    """The input argument of a linear node (positional or keyword)."""
    return node.args[0] if node.args else node.kwargs.get("input")


def linear_weight(node: fx.Node) -> Any:
    """The weight argument of a linear node."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def linear_bias(node: fx.Node) -> Any:
    """The bias argument of a linear node (``None`` when absent)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The normalized dims of a ``permute`` node (method or function form)."""
    nd = ndim(node.args[0]) if node.args else None
    if nd is None:
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if "dims" in node.kwargs:
        dims = tuple(node.kwargs["dims"])
    norm = [dim_index(d, nd) for d in dims]
    return None if None in norm or len(norm) != nd else tuple(norm)  # type: ignore[arg-type]
