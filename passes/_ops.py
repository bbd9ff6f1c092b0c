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

__all__ = ["FUNCTION_KINDS", "METHOD_KINDS", "INPUT_NAME_HINTS", "PASS_THROUGH", "kind", "tensor_args", "is_param",
           "shape_of", "static_size", "ndim", "dim_index", "arg_of"]

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
