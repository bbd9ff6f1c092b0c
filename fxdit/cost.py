"""A symbolic cost model for FX graphs: MACs and bytes moved per op class.

:func:`graph_cost` walks a graph's call nodes and, from FakeTensor metadata only (nothing runs), counts for each
op its multiply-accumulates (MACs) and the bytes it reads and writes (every distinct tensor input once, plus the
output, at its dtype size). The counts come both as numbers at the traced shapes and as sympy expressions over

* ``B``: the batch size (classifier-free guidance doubles it; the graph only knows the doubled one),
* ``N``: the image/video token count (from the token grid ``find_blocks`` found, else the self-attention length),
* ``L``: the text token count, when attention sites say where text tokens sit (joint or cross-attention).

How a traced shape becomes an expression (a heuristic: shapes are numbers, the graph does not say which number
is which). Weights are never symbolic: a tensor is *constant* when it is a parameter/buffer placeholder, a
``get_attr``, a constant fxdit lifted into an input (factors, mask tables), or computed only from constants; its
dims stay numbers. For every other (activation) tensor:

* graph inputs (the sources): dim 0 equal to the traced batch ``b0`` is ``B`` (``b0·n0`` is ``B·N``); dims equal
  to the token grid (``(H, W)``, or ``(H·p, W·p)`` with the patch) are ``N`` (``N·p²``); other dims equal to
  ``n0 + l0``, ``n0`` or ``l0`` are ``N + L``, ``N``, ``L``, except the last dim (a feature dim, a number);
* every op then carries its inputs' symbolic dims to its output: permutes permute them, reshapes regroup them
  (``(B, N, C) → (B·N, C)`` and back, ``(B, N, 3·C) → (B, N, 3, H, D)``), linear keeps all but the last dim,
  matmul and attention combine their operands' dims, a conv's spatial output is ``N`` when it has ``n0``
  positions, elementwise ops broadcast, cat adds along its dim. So a hidden size that happens to equal ``n0``
  stays a number: ``N`` is only what came from a token dim;
* a dim no rule explains falls back to the value rule (dim 0 equal to ``b0`` is ``B``, ``n0`` is ``N``...).

Where the fallback runs a size can still be mislabelled (a head count equal to ``b0``...); trace with a batch ≥ 2
and token counts unlike the channel sizes to make it unlikely. By construction every expression, evaluated at
``B=b0, N=n0, L=l0``, equals the number counted at the traced shapes.

Per op (``*`` = product of the output's dims, ``K`` = contracted size):

* linear ``x·Wᵀ``: ``numel(out)·in_features``; matmul/bmm/addmm/baddbmm/einsum: ``numel(out)·K`` (class
  ``linear`` when an operand is a weight, else ``matmul``);
* attention (SDPA): ``B·H·Sq·Skv·(D + Dv)``, i.e. ``2·B·H·N²·D`` for self-attention (dense count; a causal flag is
  not halved). ``fxdit::grouped_attention``: the dense count times the block density recorded by the GRAT pass in
  ``node.meta["fxdit"]["grat"]["density"]`` (1 when absent); bytes are q, k, v, out and the mask tables.
  Nodes that belong to an :class:`~fxdit.passes._records.AttentionSite` (the unfused matmul/softmax chain) are
  counted in the ``attention`` class;
* ``fxdit::lowrank_increment(x, x_cached, y_cached, B, A)``: ``tokens·(in + out)·rank``, with ``rank``, ``in``
  and ``out`` read from the factor shapes ``B: (r, in)`` and ``A: (out, r)``;
* convolution: ``numel(out)·C_in/groups·prod(kernel)``;
* elementwise ops: MACs = ``numel(out)``; reductions, norms, softmax (``other``): MACs = ``numel`` of the largest
  operand; copies (``memory``: cat, clone, dtype casts...): bytes only; views and metadata ops cost nothing.

Public API: :func:`graph_cost` → :class:`CostTable` (``rows``, ``total``, ``nodes``, ``to_markdown()``) and
:func:`macs` (the total MACs at the traced shapes, used by benchmarks for ICC's MAC ratio).
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxdit.kernels import torch_private
from fxdit.passes._fx_utils import fake_value, fxdit_meta

__all__ = ["B", "N", "L", "OP_CLASSES", "NodeCost", "CostRow", "TracedDims", "CostTable", "graph_cost", "macs"]

log = logging.getLogger(__name__)

#: Batch size, image/video tokens, text tokens.
B, N, L = sympy.symbols("B N L", positive=True, integer=True)

#: Op classes in the order the table lists them.
OP_CLASSES = ("linear", "attention", "matmul", "conv", "elementwise", "other", "memory")

_ZERO = sympy.Integer(0)

# --- op tables, keyed by the op's short name (function __name__, method name, or aten/fxdit op name) --------------

_LINEAR = {"linear"}
_MATMUL = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
_MATMUL_ADD = {"addmm", "baddbmm", "addbmm"}  # (input, a, b)
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_GROUPED = {"fxdit::grouped_attention"}
_LOWRANK = {"fxdit::lowrank_increment"}
_EINSUM = {"einsum"}
_VIEW = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "getitem", "squeeze",
    "unsqueeze", "expand", "expand_as", "size", "split", "split_with_sizes", "chunk", "unbind", "narrow", "select",
    "slice", "view_as", "movedim", "moveaxis", "swapaxes", "swapdims", "alias", "detach", "dim", "numel", "stride",
    "as_strided", "unfold", "tensor_split", "hsplit", "vsplit", "real", "imag", "view_as_real", "view_as_complex",
    "_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "requires_grad_", "set_grad_enabled",
}
_CAST = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "_to_copy", "contiguous", "bool", "int",
         "long", "short", "char", "byte"}
_MEMORY = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "clone", "copy", "copy_", "repeat",
           "repeat_interleave", "pad", "constant_pad_nd", "roll", "flip", "tile", "index_select", "gather", "scatter",
           "index", "index_put", "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
           "new_empty", "new_full", "zeros", "ones", "empty", "full", "arange", "linspace", "tril", "triu", "meshgrid"}
_ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "mod", "neg", "pow", "sqrt", "rsqrt", "exp", "expm1", "log",
    "log1p", "log2", "sin", "cos", "tanh", "sigmoid", "relu", "relu6", "gelu", "silu", "mish", "elu", "leaky_relu",
    "hardswish", "hardsigmoid", "softplus", "clamp", "clamp_min", "clamp_max", "clip", "where", "abs", "erf", "erfc",
    "sign", "square", "reciprocal", "maximum", "minimum", "lerp", "addcmul", "addcdiv", "masked_fill", "lt", "gt",
    "le", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not",
    "and_", "or_", "invert", "dropout", "rsub", "fmod", "remainder", "floor", "ceil", "round", "trunc", "frac",
    "isnan", "isinf", "isfinite", "nan_to_num", "atan2", "tan", "atan", "asin", "acos", "sinh", "cosh", "exp2",
    "iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_", "neg_", "clamp_", "silu_", "relu_", "gelu_",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
    "__pow__", "__rpow__", "outer", "ger", "baddcmul", "fma", "xlogy", "hypot", "sgn", "polar", "complex",
    "mul_scalar", "addcmul_",
}
_OTHER = {
    "layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm", "native_layer_norm", "native_group_norm",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "mean", "sum", "amax", "amin", "max", "min", "var", "std",
    "var_mean", "std_mean", "norm", "linalg_vector_norm", "vector_norm", "cumsum", "cumprod", "argmax", "argmin",
    "topk", "sort", "argsort", "logsumexp", "prod", "all", "any", "interpolate", "upsample_nearest2d",
    "upsample_bilinear2d", "normalize", "embedding", "one_hot", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d",
}

_WEIGHT_NAME = re.compile(r"(^|_)(parameters|buffers)_")


def _submodule(node: fx.Node) -> torch.nn.Module | None:
    """The module a ``call_module`` node calls (graphs from ``symbolic_trace`` or non-inlined Dynamo graphs)."""
    gm = node.graph.owning_module
    try:
        return gm.get_submodule(str(node.target)) if gm is not None else None
    except AttributeError:
        return None


_MODULE_ELEMENTWISE = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish,
                       torch.nn.Dropout, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Hardswish)
_MODULE_OTHER = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Softmax, torch.nn.modules.batchnorm._BatchNorm,
                 torch.nn.Embedding) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def _short_name(node: fx.Node) -> str:
    """``"linear"``, ``"add"``, ``"fxdit::grouped_attention"``... for a call node (aten/prims namespaces dropped)."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_module":
        return f"module:{type(_submodule(node)).__name__}"
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        qualified = target.name() if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        ns, _, rest = qualified.partition("::")
        rest = rest.split(".")[0]
        return f"{ns}::{rest}" if ns not in ("aten", "prims") else rest
    name = getattr(target, "_qualname", None) or getattr(target, "__name__", None) or str(target)
    if hasattr(target, "_name") and isinstance(getattr(target, "_name"), str) and "::" in target._name:
        return target._name  # torch.library CustomOpDef
    return name.rsplit(".", 1)[-1]


# --- results ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeCost:
    """The cost of one graph node.

    Attributes:
        node: node name.
        op: the op's short name (``"linear"``, ``"fxdit::grouped_attention"``...).
        op_class: one of :data:`OP_CLASSES`.
        macs_expr, bytes_expr: sympy expressions over ``B``, ``N``, ``L``.
        macs, bytes: the numbers at the traced shapes.
    """

    node: str
    op: str
    op_class: str
    macs_expr: sympy.Expr
    bytes_expr: sympy.Expr
    macs: int
    bytes: int


@dataclass(frozen=True)
class CostRow:
    """Sum over the nodes of one op class (or over all of them, for :attr:`CostTable.total`)."""

    op_class: str
    count: int
    macs_expr: sympy.Expr
    bytes_expr: sympy.Expr
    macs: int
    bytes: int


@dataclass(frozen=True)
class TracedDims:
    """The traced sizes the symbols stand for, and where each was read from.

    Attributes:
        batch: ``b0`` (``B``), or ``None`` when the graph has no batched input.
        tokens: ``n0`` (``N``), or ``None`` when neither a token grid nor a self-attention site was found.
        text: ``l0`` (``L``), or ``None`` without known text tokens.
        sources: symbol name → where its value came from.
    """

    batch: int | None
    tokens: int | None
    text: int | None
    sources: dict[str, str] = field(default_factory=dict)

    def subs(self) -> dict[sympy.Symbol, int]:
        """The substitution ``{B: b0, N: n0, L: l0}`` (only the known ones)."""
        out: dict[sympy.Symbol, int] = {}
        for sym, value in ((B, self.batch), (N, self.tokens), (L, self.text)):
            if value is not None:
                out[sym] = value
        return out


@dataclass(frozen=True)
class CostTable:
    """MACs and bytes of a graph, per op class.

    Attributes:
        rows: one :class:`CostRow` per op class present, in :data:`OP_CLASSES` order.
        total: the sum of all rows.
        nodes: the per-node costs, in graph order (views and metadata ops are left out).
        dims: what ``B``, ``N`` and ``L`` stand for.
        unknown: short names of ops the model does not know (counted as ``other``) → count.
    """

    rows: tuple[CostRow, ...]
    total: CostRow
    nodes: tuple[NodeCost, ...]
    dims: TracedDims
    unknown: dict[str, int] = field(default_factory=dict)

    def row(self, op_class: str) -> CostRow | None:
        """The row of ``op_class``, or ``None`` when the graph has no op of that class."""
        for r in self.rows:
            if r.op_class == op_class:
                return r
        return None

    def to_markdown(self) -> str:
        """The table as markdown: a symbols line, then one line per op class and the total."""
        d = self.dims
        syms = []
        for name, value in (("B", d.batch), ("N", d.tokens), ("L", d.text)):
            if value is not None:
                syms.append(f"`{name}` = {value} ({d.sources.get(name, '?')})")
        lines = ["Symbols at the traced shapes: " + ("; ".join(syms) if syms else "none found (numbers only)") + ".",
                 "", "| op class | ops | MACs | bytes | MACs at traced shape | bytes at traced shape | MAC share |",
                 "|---|---:|---|---|---:|---:|---:|"]
        for r in (*self.rows, self.total):
            share = f"{100.0 * r.macs / self.total.macs:.1f}%" if self.total.macs else "-"
            name = f"**{r.op_class}**" if r is self.total else r.op_class
            lines.append(f"| {name} | {r.count} | `{_fmt_expr(r.macs_expr)}` | `{_fmt_expr(r.bytes_expr)}` | "
                         f"{r.macs:,} | {r.bytes:,} | {share} |")
        if self.unknown:
            lines += ["", "Ops without a cost rule (counted as `other`, MACs = output elements): "
                      + ", ".join(f"`{k}` ×{v}" for k, v in sorted(self.unknown.items())) + "."]
        return "\n".join(lines) + "\n"


def _fmt_expr(expr: sympy.Expr) -> str:
    return str(sympy.expand(expr))


# --- the walk --------------------------------------------------------------------------------------------------------

#: Values computed by fake propagation for nodes a pass left without ``meta["val"]`` (see :func:`_fill_missing`).
_FILLED: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("fxdit_cost_filled", default={})


def _fake(node: Any) -> Any:
    value = fake_value(node)
    if value is None and isinstance(node, fx.Node):
        value = _FILLED.get().get(node.name)
    return value


def _fill_missing(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> dict[str, Any]:
    """Fake values for call nodes that carry none (a pass built them without meta), by fake propagation.

    Runs the graph under a fresh ``FakeTensorMode`` on fake inputs of the recorded shapes; the graph's own
    metadata is left untouched. Returns ``{}`` when nothing is missing or propagation fails.
    """
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    if all(fake_value(n) is not None for n in calls):
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    given = list(example_inputs) if example_inputs is not None else []
    values: dict[str, Any] = {}
    mode = torch_private.fake_tensor_types()[1](allow_non_fake_inputs=True)
    inputs = []
    for i, n in enumerate(placeholders):
        v = fake_value(n)
        if v is None and i < len(given):
            v = given[i]
        if isinstance(v, torch.Tensor):
            with mode:  # a fake tensor of the recorded shape, stride, dtype and device; nothing is allocated
                inputs.append(torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device))
        else:
            inputs.append(v)

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    try:
        with mode:
            _Record(gm).run(*inputs)
    except Exception as exc:  # noqa: BLE001 - costs stay partial, the table says how many nodes
        log.debug("cost: fake propagation failed (%s: %s)", type(exc).__name__, exc)
    return values


def _tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _static_shape(t: torch.Tensor) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in t.shape)
    except (TypeError, ValueError):
        return None


def _is_weight_placeholder(node: fx.Node) -> bool:
    if _WEIGHT_NAME.search(node.name) or _WEIGHT_NAME.search(str(node.target)):
        return True
    source = str(getattr(node, "_dynamo_source", ""))
    if "_parameters" in source or "_buffers" in source:
        return True
    # Lifted fxdit constants (factor matrices, BlockMask tables) are weights; ICC's cache inputs are not lifted
    # constants, so they count as activations.
    return bool((node.meta.get("fxdit") or {}).get("constant"))


def _constant_nodes(gm: fx.GraphModule) -> set[str]:
    const: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n.name)
        elif n.op == "placeholder":
            if _is_weight_placeholder(n):
                const.add(n.name)
        elif n.op in ("call_function", "call_method", "call_module"):
            if all(i.name in const for i in n.all_input_nodes):
                const.add(n.name)
    return const


def _traced_dims(gm: fx.GraphModule, batch: int | None, tokens: int | None, text: int | None) -> TracedDims:
    state = fxdit_meta(gm)
    sites = list(state.get("attention_sites") or [])
    grid = state.get("token_grid")
    sources: dict[str, str] = {}
    if tokens is not None:
        sources["N"] = "given"
    elif grid is not None:
        tokens = int(grid.tokens)
        sources["N"] = f"token grid {tuple(grid.shape)}"
    else:
        spans = Counter(s.image_span[1] - s.image_span[0] for s in sites if s.image_span is not None)
        lens = Counter(s.q_len for s in sites if not s.cross and s.text_span is None)
        if spans:
            tokens = spans.most_common(1)[0][0]
            sources["N"] = "attention image span"
        elif lens:
            tokens = lens.most_common(1)[0][0]
            sources["N"] = "attention q_len"
    if text is not None:
        sources["L"] = "given"
    else:
        for s in sites:
            if s.text_span is not None:
                text = int(s.text_span[1] - s.text_span[0])
                sources["L"] = f"text span of {s.node}"
                break
        else:
            for s in sites:
                if s.cross and s.kv_len != tokens:
                    text = int(s.kv_len)
                    sources["L"] = f"cross-attention kv_len of {s.node}"
                    break
    if text is not None and text == tokens:
        text, _ = None, sources.pop("L", None)
    if batch is not None:
        sources["B"] = "given"
    elif sites:
        batch = int(sites[0].batch)
        sources["B"] = f"attention batch of {sites[0].node}"
    else:
        patch = getattr(grid, "patch_node", None) if grid is not None else None
        by_name = {n.name: n for n in gm.graph.nodes}
        t = _tensor(_fake(by_name.get(patch))) if patch else None
        shape = _static_shape(t) if t is not None else None
        if shape:
            batch = shape[0]
            sources["B"] = f"dim 0 of {patch}"
        else:
            for n in gm.graph.nodes:
                if n.op != "placeholder" or _is_weight_placeholder(n):
                    continue
                t = _tensor(_fake(n))
                shape = _static_shape(t) if t is not None else None
                if shape:
                    batch = shape[0]
                    sources["B"] = f"dim 0 of input {n.name}"
                    break
    return TracedDims(batch=batch, tokens=tokens, text=text, sources=sources)


class _Walker:
    """Maps traced shapes to symbolic ones and computes per-node costs."""

    def __init__(self, gm: fx.GraphModule, dims: TracedDims) -> None:
        self.gm = gm
        self.dims = dims
        self.const = _constant_nodes(gm)
        self.grid_runs: list[tuple[tuple[int, ...], sympy.Expr]] = []
        grid = fxdit_meta(gm).get("token_grid")
        if grid is not None and dims.tokens == grid.tokens:
            shape = tuple(int(x) for x in grid.shape)
            spatial = [shape, shape[1:]] if shape[0] == 1 else [shape]
            patch = tuple(grid.patch) if getattr(grid, "patch", None) else None
            for run in spatial:
                if len(run) >= 2:
                    self.grid_runs.append((run, N))
                if patch and len(run) >= 2 and len(patch) >= len(run):
                    scaled = tuple(g * p for g, p in zip(run, patch[-len(run):]))
                    area = 1
                    for p in patch[-len(run):]:
                        area *= p
                    self.grid_runs.append((scaled, N * area))
        self._memo: dict[str, list[sympy.Expr] | None] = {}
        self.site_nodes: set[str] = set()
        for s in fxdit_meta(gm).get("attention_sites") or []:
            self.site_nodes.update(s.nodes)
            self.site_nodes.add(s.node)

    # symbolic shapes
    def _tok(self, d: int) -> sympy.Expr:
        """The value rule for a token-like dim: ``n0 + l0`` → ``N + L``, ``n0`` → ``N``, ``l0`` → ``L``."""
        n0, l0 = self.dims.tokens, self.dims.text
        if n0 is not None and l0 is not None and d == n0 + l0:
            return N + L
        if n0 is not None and d == n0:
            return N
        if l0 is not None and d == l0:
            return L
        return sympy.Integer(d)

    def _value_rule(self, shape: tuple[int, ...]) -> list[sympy.Expr]:
        """Symbolic dims of a source tensor (a graph input): grid runs, batch at dim 0, tokens elsewhere.

        The last dim of a tensor with 2+ dims is a feature dim and stays a number.
        """
        b0 = self.dims.batch
        out: list[sympy.Expr] = []
        i = 0
        while i < len(shape):
            d = shape[i]
            run = self._grid_run(shape, i)
            if run is not None:
                width, expr = run
                out.append(expr)
                out.extend(sympy.Integer(1) for _ in range(width - 1))
                i += width
                continue
            i += 1
            if i == 1 and b0 is not None:
                if d == b0:
                    out.append(B)
                    continue
                if b0 > 1 and d % b0 == 0 and len(shape) >= 2 and not self._tok(d // b0).is_number:
                    out.append(B * self._tok(d // b0))
                    continue
            if i == len(shape) and len(shape) >= 2:
                out.append(sympy.Integer(d))
                continue
            out.append(self._tok(d))
        return out

    def sym_shape(self, node: Any) -> list[sympy.Expr] | None:
        """Symbolic dims of a tensor node (numbers for constants), propagated from the graph inputs.

        Sources (graph inputs that are not weights) get :meth:`_value_rule`; every op then carries its inputs'
        symbolic dims to its output (permutes permute them, reshapes regroup them, linear keeps all but the
        last, matmul/attention combine them, elementwise ops broadcast them), so a number that happens to equal
        ``n0`` is only called ``N`` where it came from a token dim. A dim no rule explains gets the value rule
        for tokens (and dim 0 equal to ``b0`` is ``B``).
        """
        if not isinstance(node, fx.Node):
            return None
        if node.name in self._memo:
            return self._memo[node.name]
        shape = _static_shape_of(node)
        if shape is None:
            result = None
        elif node.name in self.const:
            result = [sympy.Integer(d) for d in shape]
        elif node.op == "placeholder":
            result = self._value_rule(shape)
        else:
            try:
                result = self._propagate(node, shape)
            except Exception as exc:  # noqa: BLE001 - fall back to the value rule
                log.debug("cost: shape propagation failed at %s (%s: %s)", node.name, type(exc).__name__, exc)
                result = None
            if result is None or len(result) != len(shape):
                result = self._align(shape, [])
        self._memo[node.name] = result
        return result

    def _grid_run(self, shape: tuple[int, ...], i: int) -> tuple[int, sympy.Expr] | None:
        """Consecutive dims from ``i`` (≥ 1) equal to the token grid (→ ``N``) or grid × patch (→ ``N·p…``)."""
        if i == 0 or not self.grid_runs:
            return None
        for run, expr in self.grid_runs:
            if tuple(shape[i:i + len(run)]) == run:
                return len(run), expr
        return None

    def _align(self, shape: tuple[int, ...], sources: Sequence[list[sympy.Expr] | None],
               source_shapes: Sequence[tuple[int, ...] | None] = ()) -> list[sympy.Expr]:
        """Dims of ``shape`` taken from ``sources`` where sizes match (broadcast from the right, else in order)."""
        out: list[sympy.Expr | None] = [None] * len(shape)
        # Whether a number may be read as a token count where no source explains the dim: not where a source
        # had a plain number at that (right-aligned) position, e.g. a head dim that equals ``l0``.
        may_tok = [True] * len(shape)
        pairs = [(e, s) for e, s in zip(sources, source_shapes) if e is not None and s is not None and len(e) == len(s)]
        if pairs and all(len(s) <= len(shape) for _, s in pairs):
            for exprs, sshape in pairs:  # right-aligned broadcast
                off = len(shape) - len(sshape)
                for j, (e, d) in enumerate(zip(exprs, sshape)):
                    if d == shape[off + j] and out[off + j] is None and not e.is_number:
                        out[off + j] = e
                    if d == shape[off + j] and e.is_number and d != 1:
                        may_tok[off + j] = False
        else:
            for exprs, sshape in pairs:  # in-order subsequence (reductions, unbind, indexing)
                j = 0
                for k, d in enumerate(shape):
                    while j < len(sshape) and sshape[j] != d:
                        j += 1
                    if j < len(sshape):
                        if out[k] is None and not exprs[j].is_number:
                            out[k] = exprs[j]
                        j += 1
        b0 = self.dims.batch
        result: list[sympy.Expr] = []
        for k, d in enumerate(shape):
            got = out[k]
            if got is not None:
                result.append(got)
            elif k == 0 and b0 is not None and d == b0:
                result.append(B)
            elif (k == len(shape) - 1 and len(shape) >= 2) or not may_tok[k]:
                result.append(sympy.Integer(d))
            else:
                result.append(self._tok(d))
        return result

    def _reshape(self, in_shape: tuple[int, ...], exprs: list[sympy.Expr],
                 out_shape: tuple[int, ...]) -> list[sympy.Expr] | None:
        """Carry symbolic dims through a reshape: group dims with equal products, merge and split symbols."""
        if _prod(in_shape) != _prod(out_shape) or 0 in in_shape:
            return None
        subs = self.dims.subs()
        out: list[sympy.Expr] = []
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
                out.append(sympy.Integer(1))
                j += 1
                continue
            if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
                i += 1
                continue
            if i >= len(in_shape) or j >= len(out_shape):
                return None
            gi, gj = [i], [j]
            pi, pj = in_shape[i], out_shape[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    gi.append(i)
                    pi *= in_shape[i]
                    i += 1
                else:
                    gj.append(j)
                    pj *= out_shape[j]
                    j += 1
            expr = sympy.Mul(*(exprs[k] for k in gi))
            sizes = [out_shape[k] for k in gj]
            if len(sizes) == 1:
                out.append(expr)
                continue
            out.extend(self._split(expr, sizes, subs))
        return out

    def _split(self, expr: sympy.Expr, sizes: list[int], subs: dict[sympy.Symbol, int]) -> list[sympy.Expr]:
        """Split ``expr`` over dims of ``sizes`` (product preserved): symbol factors go to dims of their size."""
        if expr.is_number:
            return [sympy.Integer(d) for d in sizes]
        factors = list(sympy.Mul.make_args(expr))
        out: list[sympy.Expr | None] = [None] * len(sizes)
        for k, d in enumerate(sizes):
            for f in factors:
                if not f.is_number and int(f.subs(subs)) == d:
                    out[k] = f
                    factors.remove(f)
                    break
        rest = sympy.Mul(*factors)
        free = [k for k in range(len(sizes)) if out[k] is None]
        if not free:
            return [e for e in out if e is not None] if rest == 1 else [sympy.Integer(d) for d in sizes]
        if rest.is_number:
            for k in free:
                out[k] = sympy.Integer(sizes[k])
            return [e for e in out if e is not None]
        # A symbolic remainder spread over several dims (N split into the grid): the first free dim carries
        # it, the others become 1, so the product stays exact.
        if int(rest.subs(subs)) != _prod([sizes[k] for k in free]):
            return [sympy.Integer(d) for d in sizes]
        for n, k in enumerate(free):
            out[k] = rest if n == 0 else sympy.Integer(1)
        return [e for e in out if e is not None]

    def _propagate(self, node: fx.Node, shape: tuple[int, ...]) -> list[sympy.Expr] | None:
        op = _short_name(node)
        tins = _tensor_inputs(node)
        first = tins[0] if tins else None
        fshape = _static_shape_of(first) if first is not None else None
        fexpr = self.sym_shape(first) if first is not None else None
        if op in ("permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims") and fexpr:
            perm = _permutation(node, op, len(fexpr))
            if perm is not None:
                return [fexpr[p] for p in perm]
        if op in ("view", "_unsafe_view", "reshape", "flatten", "unflatten", "view_as", "squeeze", "unsqueeze",
                  "contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "_to_copy", "detach",
                  "alias", "expand", "expand_as") and fexpr and fshape is not None:
            if op in ("expand", "expand_as"):
                return self._align(shape, [fexpr], [fshape])
            got = self._reshape(fshape, fexpr, shape)
            if got is not None:
                return got
        if (op in _LINEAR or op == "module:Linear") and fexpr:
            return fexpr[:-1] + [sympy.Integer(shape[-1])]
        if (op in _MATMUL or op in _MATMUL_ADD) and len(shape) >= 2:
            off = 1 if op in _MATMUL_ADD else 0
            a, b = _arg(node, off, "input"), _arg(node, off + 1, "other")
            ea, eb = self.sym_shape(a), self.sym_shape(b)
            sa, sb = _static_shape_of(a), _static_shape_of(b)
            if ea and eb and sa and sb and len(ea) >= 2 and len(eb) >= 2:
                lead = self._align(shape[:-2], [ea[:-2], eb[:-2]], [sa[:-2], sb[:-2]]) if len(shape) > 2 else []
                return lead + [ea[-2], eb[-1]]
        if (op in _SDPA or op in _GROUPED) and len(shape) >= 2:
            eq, ev = self.sym_shape(_arg(node, 0, "query")), self.sym_shape(_arg(node, 2, "value"))
            if eq and ev and len(eq) == len(shape):
                return eq[:-1] + [ev[-1]]
        if (op in _CONV or op in _CONV_T or op.startswith("module:Conv")) and fexpr and len(shape) >= 3:
            spatial = shape[2:]
            n0 = self.dims.tokens
            if n0 is not None and _prod(spatial) == n0:
                tail = [N] + [sympy.Integer(1)] * (len(spatial) - 1)
            else:
                tail = [sympy.Integer(d) for d in spatial]
            return [fexpr[0], sympy.Integer(shape[1])] + tail
        if op in ("cat", "concat", "concatenate") and tins:
            dim = _arg(node, 1, "dim")
            dim = 0 if dim is None else int(dim)
            dim = dim % len(shape)
            parts = [self.sym_shape(t) for t in tins]
            if all(p is not None and len(p) == len(shape) for p in parts):
                base = list(parts[0])  # type: ignore[arg-type]
                base[dim] = sympy.Add(*(p[dim] for p in parts))  # type: ignore[index]
                return base
        if op == "stack" and tins:
            dim = _arg(node, 1, "dim")
            dim = (0 if dim is None else int(dim)) % len(shape)
            part = self.sym_shape(tins[0])
            if part is not None and len(part) == len(shape) - 1:
                return part[:dim] + [sympy.Integer(shape[dim])] + part[dim:]
        if op == "getitem" and isinstance(node.args[0], fx.Node) \
                and not isinstance(_fake(node.args[0]), torch.Tensor):
            pins = _tensor_inputs(node.args[0])  # an element of a tuple (split/chunk/unbind): align with its input
            if pins:
                return self._align(shape, [self.sym_shape(pins[0])], [_static_shape_of(pins[0])])
        return self._align(shape, [self.sym_shape(t) for t in tins], [_static_shape_of(t) for t in tins])

    def numel(self, node: Any) -> sympy.Expr:
        shape = self.sym_shape(node)
        if shape is None:
            return _ZERO
        return sympy.Mul(*shape) if shape else sympy.Integer(1)

    def nbytes(self, node: Any) -> sympy.Expr:
        t = _tensor(_fake(node))
        if t is None:
            return _ZERO
        return self.numel(node) * t.element_size()

    def is_const(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.name in self.const

    # cost of one node
    def cost(self, node: fx.Node) -> tuple[str, sympy.Expr, sympy.Expr] | None:
        op = _short_name(node)
        inputs = _tensor_inputs(node)
        io_bytes = sum((self.nbytes(i) for i in inputs), _ZERO) + self.nbytes(node)
        if op in _VIEW:
            return None
        if _tensor(_fake(node)) is None:
            return None
        if node.op == "call_module":
            return self._module_cost(node, op, inputs, io_bytes)
        if op in _LINEAR:
            x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
            ws = self.sym_shape(w)
            k = ws[-1] if ws else sympy.Integer(1)
            return "linear", self.numel(node) * k, io_bytes
        if op in _MATMUL or op in _MATMUL_ADD:
            off = 1 if op in _MATMUL_ADD else 0
            a, b = _arg(node, off, "mat1" if off else "input"), _arg(node, off + 1, "mat2" if off else "other")
            as_ = self.sym_shape(a)
            k = as_[-1] if as_ else sympy.Integer(1)
            cls = "linear" if self.is_const(a) or self.is_const(b) else "matmul"
            return cls, self.numel(node) * k, io_bytes
        if op in _EINSUM:
            if len([a for a in node.args[1:] if isinstance(a, fx.Node)]) == 1:  # one operand: a permutation
                return "memory", _ZERO, io_bytes
            return self._einsum(node, io_bytes)
        if op in _SDPA or op in _GROUPED:
            q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
            qs, ks, vs = self.sym_shape(q), self.sym_shape(k), self.sym_shape(v)
            if not (qs and ks and vs) or len(qs) < 2:
                return "attention", _ZERO, io_bytes
            lead = sympy.Mul(*qs[:-2]) if len(qs) > 2 else sympy.Integer(1)
            dense = lead * qs[-2] * ks[-2] * (qs[-1] + vs[-1])
            if op in _GROUPED:
                density = ((node.meta.get("fxdit") or {}).get("grat") or {}).get("density")
                if density is not None:
                    dense = dense * sympy.Rational(float(density)).limit_denominator(10**6)
            return "attention", dense, io_bytes
        if op in _LOWRANK:
            return self._lowrank(node, inputs, io_bytes)
        if op in _CONV or op in _CONV_T:
            x, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
            ws = self.sym_shape(w)
            per = sympy.Mul(*ws[1:]) if ws and len(ws) > 1 else sympy.Integer(1)
            transposed = op in _CONV_T or (op in ("convolution", "_convolution") and bool(_arg(node, 6, "transposed")))
            return "conv", (self.numel(x) if transposed else self.numel(node)) * per, io_bytes
        if op in _CAST:
            t_in, t_out = _tensor(_fake(inputs[0])) if inputs else None, _tensor(_fake(node))
            if t_in is not None and t_out is not None and t_in.dtype == t_out.dtype and (
                    op != "contiguous" or t_in.is_contiguous()) and op != "_to_copy":
                return None
            return "memory", _ZERO, io_bytes
        if op in _MEMORY:
            return "memory", _ZERO, io_bytes
        if op in _ELEMENTWISE:
            return "elementwise", self.numel(node), io_bytes
        if op in _OTHER:
            return "other", self._largest(node, inputs), io_bytes
        self._unknown[op] += 1
        return "other", self.numel(node), io_bytes

    def _module_cost(self, node: fx.Node, op: str, inputs: Sequence[fx.Node],
                     io_bytes: sympy.Expr) -> tuple[str, sympy.Expr, sympy.Expr] | None:
        """A ``call_module`` node: nn.Linear / conv / norms / activations; its own parameters count as read."""
        mod = _submodule(node)
        if mod is None or isinstance(mod, torch.nn.Identity):
            return None
        io_bytes = io_bytes + sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
        if isinstance(mod, torch.nn.Linear):
            return "linear", self.numel(node) * mod.in_features, io_bytes
        if isinstance(mod, torch.nn.modules.conv._ConvNd):
            per = _prod(mod.weight.shape[1:])
            base = self.numel(inputs[0]) if mod.transposed and inputs else self.numel(node)
            return "conv", base * per, io_bytes
        if isinstance(mod, _MODULE_ELEMENTWISE):
            return "elementwise", self.numel(node), io_bytes
        if isinstance(mod, _MODULE_OTHER):
            return "other", self._largest(node, inputs), io_bytes
        self._unknown[op] += 1
        return "other", self.numel(node), io_bytes

    def _largest(self, node: fx.Node, inputs: Sequence[fx.Node]) -> sympy.Expr:
        best, best_n = self.numel(node), _numel_int(node)
        for i in inputs:
            n = _numel_int(i)
            if n > best_n:
                best, best_n = self.numel(i), n
        return best

    def _einsum(self, node: fx.Node, io_bytes: sympy.Expr) -> tuple[str, sympy.Expr, sympy.Expr]:
        eq = _arg(node, 0, "equation")
        operands = list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if not isinstance(eq, str):
            return "matmul", self.numel(node), io_bytes
        lhs = eq.replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, sympy.Expr] = {}
        for spec, operand in zip(lhs, operands):
            shape = self.sym_shape(operand)
            if shape is None or "." in spec or len(spec) != len(shape):
                return "matmul", self.numel(node), io_bytes
            for letter, size in zip(spec, shape):
                sizes.setdefault(letter, size)
        cls = "linear" if any(self.is_const(o) for o in operands) else "matmul"
        return cls, sympy.Mul(*sizes.values()), io_bytes

    def _lowrank(self, node: fx.Node, inputs: Sequence[fx.Node],
                 io_bytes: sympy.Expr) -> tuple[str, sympy.Expr, sympy.Expr]:
        """``fxdit::lowrank_increment(x, x_cached, y_cached, B, A)``: ``tokens·(in + out)·rank``."""
        out_shape = self.sym_shape(node)
        b_shape, a_shape = _static_shape_of(_arg(node, 3, "B")), _static_shape_of(_arg(node, 4, "A"))
        if not out_shape or not b_shape or not a_shape or len(b_shape) != 2 or len(a_shape) != 2:
            return "linear", _ZERO, io_bytes
        rank, in_f = b_shape
        out_f = a_shape[0]
        tokens = sympy.Mul(*out_shape[:-1]) if len(out_shape) > 1 else sympy.Integer(1)
        return "linear", tokens * (in_f + out_f) * rank, io_bytes

    def walk(self) -> tuple[list[NodeCost], dict[str, int]]:
        self._unknown: Counter[str] = Counter()
        subs = self.dims.subs()
        out: list[NodeCost] = []
        for node in self.gm.graph.nodes:  # in graph order, so the shape propagation never recurses deeply
            self.sym_shape(node)
        for node in self.gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            try:
                res = self.cost(node)
            except Exception as exc:  # noqa: BLE001 - an odd node must not sink the whole table
                log.debug("cost: cannot cost %s (%s: %s)", node.name, type(exc).__name__, exc)
                continue
            if res is None:
                continue
            cls, m, b = res
            if node.name in self.site_nodes:
                cls = "attention"
            m, b = sympy.expand(m), sympy.expand(b)
            out.append(NodeCost(node.name, _short_name(node), cls, m, b, int(m.subs(subs)), int(b.subs(subs))))
        return out, dict(self._unknown)


def _static_shape_of(node: Any) -> tuple[int, ...] | None:
    t = _tensor(_fake(node))
    return _static_shape(t) if t is not None else None


def _prod(xs: Iterable[int]) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def _permutation(node: fx.Node, op: str, ndim: int) -> list[int] | None:
    """The output→input dim map of a permute/transpose node, or ``None`` when its arguments are not plain ints."""
    args = list(node.args[1:])
    if op == "t":
        return [1, 0] if ndim == 2 else list(range(ndim))
    if op == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or node.kwargs.get("dims")
        if not dims or not all(isinstance(d, int) for d in dims):
            return None
        return [d % ndim for d in dims]
    if op in ("transpose", "swapaxes", "swapdims"):
        if len(args) < 2:
            args = [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        d0, d1 = args[0], args[1]
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        perm = list(range(ndim))
        perm[d0 % ndim], perm[d1 % ndim] = perm[d1 % ndim], perm[d0 % ndim]
        return perm
    if op in ("movedim", "moveaxis"):
        src, dst = (args + [None, None])[:2]
        if not isinstance(src, int) or not isinstance(dst, int):
            return None
        order = [d for d in range(ndim) if d != src % ndim]
        order.insert(dst % ndim, src % ndim)
        return order
    return None


def _numel_int(node: Any) -> int:
    s = _static_shape_of(node)
    if s is None:
        return 0
    n = 1
    for d in s:
        n *= d
    return n


def _arg(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Distinct input nodes that hold tensors, in first-use order."""
    seen: dict[str, fx.Node] = {}
    for i in node.all_input_nodes:
        if i.name not in seen and _tensor(_fake(i)) is not None:
            seen[i.name] = i
    return list(seen.values())


def _sum_rows(op_class: str, items: Iterable[NodeCost]) -> CostRow:
    items = list(items)
    return CostRow(op_class, len(items), sympy.expand(sympy.Add(*(c.macs_expr for c in items))),
                   sympy.expand(sympy.Add(*(c.bytes_expr for c in items))), sum(c.macs for c in items),
                   sum(c.bytes for c in items))


def graph_cost(gm: fx.GraphModule, *, batch: int | None = None, tokens: int | None = None,
               text: int | None = None, example_inputs: Sequence[Any] | None = None) -> CostTable:
    """MACs and bytes of ``gm`` per op class, symbolic in ``B``/``N``/``L`` and at the traced shapes.

    Args:
        gm: a graph with FakeTensor metadata (a Dynamo graph, or a copy of one that fxdit's passes rewrote).
            The attention sites and token grid that ``find_attention``/``find_blocks`` left in
            ``gm.meta["fxdit"]`` tell which sizes are ``N`` and ``L``; without them, ``N`` is unknown.
        batch, tokens, text: override the traced ``b0``, ``n0``, ``l0`` the symbols stand for.
        example_inputs: tensors (or fake tensors) for the placeholders, in order, for graphs without shape
            metadata (e.g. from ``torch.fx.symbolic_trace``); only their shapes, strides and dtypes are used.
            Nodes without metadata get it by fake propagation (the graph itself is not changed).

    Returns:
        A :class:`CostTable`.
    """
    token = _FILLED.set(_fill_missing(gm, example_inputs))
    try:
        dims = _traced_dims(gm, batch, tokens, text)
        nodes, unknown = _Walker(gm, dims).walk()
        unshaped = [n.name for n in gm.graph.nodes
                    if n.op in ("call_function", "call_method", "call_module") and _fake(n) is None]
    finally:
        _FILLED.reset(token)
    if unshaped:
        unknown = {**unknown, "<no shape metadata>": len(unshaped)}
    rows = tuple(_sum_rows(c, [n for n in nodes if n.op_class == c]) for c in OP_CLASSES
                 if any(n.op_class == c for n in nodes))
    return CostTable(rows=rows, total=_sum_rows("total", nodes), nodes=tuple(nodes), dims=dims, unknown=unknown)


def macs(gm: fx.GraphModule) -> int:
    """Total MACs of ``gm`` at its traced shapes (see :func:`graph_cost`)."""
    return graph_cost(gm).total.macs

