"""rewrite_grouped_attention: replace eligible attention sites by ``fxdit::grouped_attention`` (GRAT).

For every :class:`~fxdit.passes._records.AttentionSite` that ``find_attention`` recorded, :func:`_why_not` decides
whether it can use the grouped block-sparse pattern (``attention.mode`` ``"grat-b"``/``"grat-x"``): self-attention
over a sequence whose image span is the whole token grid, tiled exactly by the group, no causal flag, no dropout,
and at most a boolean *key-padding* mask. Ineligible sites stay dense and are counted under their reason.

The layout (group permutation, class vector, extended class adjacency, BlockMask tables) is computed once per
distinct (grid, group, mode, radius, sequence layout, block size) at pass time — shapes are static in the traced
graph — by :mod:`fxdit.kernels.grat_layout`, and lifted into extra graph inputs with
:func:`~fxdit.passes._fx_utils.lift_constant` (tensors cannot be graph constants; the backend appends them to every
call).

Two ways to put the image tokens in group-major order:

* **per site**: gather q, k, v along the sequence with one lifted index vector (image span in group order first, the
  text/conditioning tokens after it, whether the model puts text first or last), call the op, and gather the output
  back (4 gathers per site);
* **hoisted** (preferred): when the token order only matters to the attention sites, the hidden states are permuted
  once right after the patch embedding (``TokenGrid.patch_node``) and restored wherever the token stream meets an op
  that is not token-wise (the unpatchify reshape, the graph output, ...). Token-wise-ness is checked node by node
  against the data tables below (how each op maps the token dimension); tensors that vary along the tokens without
  coming from the stream (a positional table, RoPE cos/sin) are permuted on their own, once per source tensor.
  Joint text+image sequences (SD3/Flux/HunyuanVideo ``cat`` of text and image) are followed as a *segment* of the
  sequence dimension: concatenation shifts it, slicing/splitting the text part off drops it. Hoisting is used only
  when every rewritten site sees its q, k, v in permuted order and it needs fewer gathers than the per-site way;
  otherwise the pass falls back to per-site gathers and records why in ``details["hoist_reason"]``.

Report details: ``hoisted`` (bool), ``permutes_saved`` (per-site gathers avoided minus the gathers hoisting adds),
``hoist_reason`` (when not hoisted), ``hoist_exits`` (where the stream is restored to raster order) and ``layouts``
(distinct layouts built). Each new op node carries ``node.meta["fxdit"]["grat"]`` (mode, group, grid, block_size,
density, ideal_speedup, full_blocks, partial_blocks) for the dump.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxdit.kernels import grat_layout as gl
from fxdit.kernels import ops as _ops  # registers torch.ops.fxdit.grouped_attention
from fxdit.kernels import torch_private
from fxdit.passes._base import PassReport, ReportBuilder
from fxdit.passes._fx_utils import (
    fake_value,
    finish,
    fxdit_meta,
    lift_constant,
    node_meta,
    nodes_by_name,
    shape_of,
)
from fxdit.passes._records import AttentionSite, TokenGrid

from fxdit.config import FxditConfig
from fxdit.errors import FxditError

__all__ = ["rewrite_grouped_attention"]

log = logging.getLogger(__name__)

_NAME = "rewrite_grouped_attention"

#: Default group per grid rank (256 tokens, 2 × FlexAttention's 128-token block; grat.md §1).
DEFAULT_GROUPS = {2: (16, 16), 3: (4, 8, 8)}

#: Gathers one site costs when it permutes by itself: q, k, v and the output.
PER_SITE_PERMUTES = 4

# Skip reasons (stable strings: tests and the dump count them).
R_DENSE = "attention.mode is 'dense'"
R_LAYER = "block not in attention.layers"
R_CROSS = "cross-attention stays dense"
R_SPAN = "token span not understood"
R_RAGGED = "image tokens at other positions in each sample (per-sample text lengths)"
R_TEXT_ONLY = "no image tokens (text-only attention)"
R_MIN_TOKENS = "fewer image tokens than attention.min_tokens"
R_NO_GRID = "no token grid"
R_GRID_MISMATCH = "image span length differs from the token grid"
R_TILE = "group does not tile the token grid"
R_CAUSAL = "causal attention"
R_DROPOUT = "dropout > 0"
R_FLOAT_MASK = "additive (float) mask stays dense"
R_BOOL_MASK = "bool mask is not a key-padding mask"
R_LAYOUT = "layout not BHSD"
R_GONE = "site not in the graph (already rewritten)"


# ---------------------------------------------------------------------------------------------------------------
# Grid and group
# ---------------------------------------------------------------------------------------------------------------


def _resolve_grid(grid: TokenGrid | None, cfg: FxditConfig) -> tuple[int, ...] | None:
    """The token grid as ``(H, W)`` (images) or ``(T, H, W)`` (video): the option first, else the inferred one."""
    if cfg.attention.grid is not None:
        return tuple(cfg.attention.grid)
    if grid is None:
        return None
    t, h, w = grid.shape
    return (h, w) if t == 1 else (t, h, w)


def _resolve_group(grid: tuple[int, ...], cfg: FxditConfig) -> tuple[int, ...]:
    """``attention.group`` or the default for the grid's rank.

    Raises:
        FxditError: when a 2-D group is given for a video (3-D) grid, or a 3-D group with ``gt > 1`` for an image.
    """
    group = cfg.attention.group
    if group is None:
        return DEFAULT_GROUPS[len(grid)]
    if len(group) == len(grid):
        return tuple(group)
    if len(group) == 3 and len(grid) == 2 and group[0] == 1:
        return tuple(group[1:])
    raise FxditError(
        f"attention.group={tuple(group)}; expected {len(grid)} sizes for the token grid {tuple(grid)} "
        f"({'(gt, gh, gw) for video' if len(grid) == 3 else '(gh, gw) for images'})")


def _key_padding_shape(shape: tuple[int, ...] | None, batch: int, kv_len: int) -> bool:
    """``shape`` is broadcastable to ``[B, 1, 1, S_kv]`` and varies only over batch and keys."""
    if shape is None or len(shape) > 4 or len(shape) == 0:
        return False
    s = (1,) * (4 - len(shape)) + tuple(shape)
    return s[0] in (1, batch) and s[1] == 1 and s[2] == 1 and s[3] == kv_len and kv_len > 1


def _why_not(site: AttentionSite, grid: tuple[int, ...] | None, cfg: FxditConfig,
             nodes: dict[str, fx.Node]) -> str | None:
    """Why ``site`` stays dense (``None`` when it can be rewritten)."""
    att = cfg.attention
    if not att.enabled:
        return R_DENSE
    if att.layers is not None and (site.block is None or site.block not in att.layers):
        return R_LAYER
    if site.cross:
        return R_CROSS
    if site.layout != "BHSD":
        return R_LAYOUT
    if site.span_source == "text":
        return R_TEXT_ONLY
    if site.span_source == "ragged":
        return R_RAGGED
    if site.span_source == "unknown" or site.image_span is None:
        return R_SPAN
    if site.span_source == "joint_kv":
        kv = site.kv_image_span
        if kv is None or kv[1] - kv[0] != site.q_len or not (0 <= kv[0] < kv[1] <= site.kv_len):
            return R_SPAN
    elif site.q_len != site.kv_len:
        return R_SPAN
    start, stop = site.image_span
    if not (0 <= start < stop <= site.q_len):
        return R_SPAN
    n_img = stop - start
    if n_img < att.min_tokens:
        return R_MIN_TOKENS
    if grid is None:
        return R_NO_GRID
    if n_img != math.prod(grid):
        return R_GRID_MISMATCH
    if gl.why_not_layout(grid, _resolve_group(grid, cfg)) is not None:
        return R_TILE
    if site.causal:
        return R_CAUSAL
    if site.dropout and site.dropout > 0:
        return R_DROPOUT
    if site.mask is not None:
        if site.mask_kind == "float":
            return R_FLOAT_MASK
        if site.mask_kind != "bool":
            return R_FLOAT_MASK
        mask_node = nodes.get(site.mask)
        if not _key_padding_shape(shape_of(mask_node), site.batch, site.kv_len):
            return R_BOOL_MASK
    q_val, v_val = fake_value(nodes.get(site.q)), fake_value(nodes.get(site.v))
    if isinstance(q_val, torch.Tensor) and isinstance(v_val, torch.Tensor):
        reason = _ops.grouped_attention_unsupported(q_val.device, q_val.dtype, q_val.shape[-1], v_val.shape[-1])
        if reason is not None:
            return f"kernel: {reason}"
    return None


def _dense_lowerings(plans: list[_Plan], nodes: dict[str, fx.Node]) -> dict[str, str]:
    """Site → why its compiled lowering is the dense masked formula (the kernel layer's answer), for such sites."""
    out: dict[str, str] = {}
    for plan in plans:
        q, k, v = (fake_value(nodes.get(name)) for name in (plan.site.q, plan.site.k, plan.site.v))
        if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            reason = _ops.grouped_attention_dense_lowering(q.device, q.dtype, k.dtype, v.dtype)
            if reason is not None:
                out[plan.site.node] = reason
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fake values for new nodes (shapes from FakeTensor meta only; nothing runs the model)
# ---------------------------------------------------------------------------------------------------------------


class _Meta:
    """Computes FakeTensor values for new nodes under the graph's fake mode, and writes node meta."""

    def __init__(self, gm: fx.GraphModule) -> None:
        vals = [fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
        try:
            self.mode = torch_private.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        except Exception:  # noqa: BLE001 - mixed fake modes: leave the new nodes without values
            self.mode = None

    def _conv(self, a: Any) -> Any:
        v = fake_value(a) if isinstance(a, fx.Node) else a
        if isinstance(v, torch.Tensor) and self.mode is not None:
            if not isinstance(v, torch_private.fake_tensor_types()[0]):
                v = self.mode.from_tensor(v)
        return v

    def value(self, node: fx.Node) -> Any:
        if self.mode is None:
            return None
        args = fx.node.map_aggregate(node.args, self._conv)
        kwargs = fx.node.map_aggregate(node.kwargs, self._conv)
        if any(isinstance(a, fx.Node) and fake_value(a) is None for a in node.all_input_nodes):
            return None
        try:
            with self.mode:
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception as exc:  # noqa: BLE001 - meta is best effort; inductor re-traces anyway
            log.debug("%s: no fake value for %s: %s", _NAME, node.name, exc)
        return None

    def stamp(self, node: fx.Node, like: fx.Node | None, fxdit: dict[str, Any] | None = None) -> None:
        """Copy ``like``'s meta (module stack, source) onto ``node`` with ``node``'s own fake value."""
        if like is not None:
            for key, val in like.meta.items():
                if key in ("val", "example_value", "tensor_meta", "fxdit"):
                    continue
                node.meta[key] = val
        val = self.value(node)
        if val is not None:
            node.meta["example_value"] = val
            node.meta["val"] = val
        node.meta["fxdit"] = dict(fxdit or {})


def _insert_point(graph: fx.Graph, node: fx.Node):
    """A context inserting right after ``node`` (after the last placeholder when ``node`` is one)."""
    if node.op == "placeholder":
        first = next(n for n in graph.nodes if n.op != "placeholder")
        return graph.inserting_before(first)
    return graph.inserting_after(node)


# ---------------------------------------------------------------------------------------------------------------
# Token flow: which nodes carry the image tokens, on which dimension (data tables, no model classes)
# ---------------------------------------------------------------------------------------------------------------

Tok = tuple[int, int]  # (dim, offset): the N image tokens occupy [offset, offset + N) of dimension ``dim``


class _NotTokenWise(Exception):
    """The op is not known to keep the token order; the stream is restored before it."""


_POINTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.tanh, torch.sigmoid,
    torch.exp, torch.rsqrt, torch.sqrt, torch.cos, torch.sin, torch.erf, torch.abs, torch.clamp, torch.where,
    torch.masked_fill, torch.square, torch.reciprocal, torch.relu, torch.addcmul, torch.lerp, torch.float_power,
    F.gelu, F.silu, F.relu, F.mish, F.hardswish, F.sigmoid, F.tanh, torch._C._nn.gelu, torch._C._nn.silu,
    "add", "sub", "mul", "div", "neg", "pow", "tanh", "sigmoid", "exp", "rsqrt", "sqrt", "cos", "sin", "abs",
    "clamp", "float", "half", "bfloat16", "double", "type", "contiguous", "clone", "masked_fill",
    "square", "reciprocal", "relu", "detach", "add_", "mul_", "__add__", "__mul__", "__radd__", "__rmul__",
}
#: Ops acting on the trailing dims only: target → how many trailing dims (callable of the node for norms).
_TRAILING: dict[Any, Callable[[fx.Node], int]] = {
    torch._C._nn.linear: lambda n: 1,
    F.linear: lambda n: 1,
    F.layer_norm: lambda n: len(_arg(n, 1, "normalized_shape")),
    F.rms_norm: lambda n: len(_arg(n, 1, "normalized_shape")),
    torch.layer_norm: lambda n: len(_arg(n, 1, "normalized_shape")),
    torch.rms_norm: lambda n: len(_arg(n, 1, "normalized_shape")),
}
#: Ops whose value follows their first argument only (dtype/device conversions; creation "like" the input).
_LIKE_FIRST = {"to", "type_as", torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}
#: Dropout is token-wise only as the identity (``training=False`` or ``p=0``).
_DROPOUT = {F.dropout, torch.dropout, "dropout"}
_DIM_OPS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, "softmax", "log_softmax"}
_REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, "mean", "sum", "amax", "amin", "var", "std"}
_RESHAPE = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, "view", "reshape",
            "flatten", "unflatten", "squeeze", "unsqueeze"}
_EXPAND = {"expand", "expand_as"}
_TRANSPOSE = {torch.transpose, torch.swapaxes, "transpose", "swapaxes"}
_PERMUTE = {torch.permute, "permute"}
_MOVEDIM = {torch.movedim, "movedim"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_STACK = {torch.stack}
_SPLIT = {torch.split, torch.chunk, torch.tensor_split, "split", "split_with_sizes", "chunk", "tensor_split"}
_UNBIND = {torch.unbind, "unbind"}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"}
_METADATA = {"size", "dim", "numel", getattr, "get_device"}
#: Views a side tensor (positional table, RoPE cos/sin) may be traced back through, to permute it once at its source.
_SIDE_VIEWS = _RESHAPE | _EXPAND | _TRANSPOSE | _PERMUTE | _MOVEDIM | {operator.getitem, "to", "float", "type_as",
                                                                        "contiguous"}


def _key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


@dataclass
class _Flow:
    """Result of following the image-token stream from the patch embedding."""

    tok: dict[fx.Node, Any] = field(default_factory=dict)
    #: stream node → consumers that need it back in raster order, with the reason.
    exits: dict[fx.Node, list[tuple[fx.Node, str]]] = field(default_factory=dict)
    #: (consumer, side arg, dim, offset, size): tensors that vary over tokens without coming from the stream.
    sides: list[tuple[fx.Node, fx.Node, int, int, int]] = field(default_factory=list)
    failure: str | None = None
    entry: fx.Node | None = None


class _TokenFlow:
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
        self.flow = _Flow(entry=entry)
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
            raise _NotTokenWise(f"no shape for {arg.name}")
        self.flow.sides.append((node, arg, dim, offset, shape[dim]))

    # -- the walk --------------------------------------------------------------------------------------------
    def run(self) -> _Flow:
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
            except _NotTokenWise as exc:
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
            raise _NotTokenWise("dense attention site with inconsistent token order")
        mask = self.nodes.get(site.mask) if site.mask else None
        if mask is not None:
            if self._t(mask) is not None:
                raise _NotTokenWise("attention mask derived from the token stream")
            shape = shape_of(mask)
            if shape is None:
                raise _NotTokenWise("attention mask without shape")
            r = len(shape)
            if tq is not None and r >= 2 and shape[r - 2] > 1:
                self._side(node, mask, r - 2, tq[1])
            if tk is not None and r >= 1 and shape[r - 1] > 1:
                self._side(node, mask, r - 1, tk[1])
        return tq

    def _rule(self, node: fx.Node) -> Any:
        key = _key(node)
        out_shape = shape_of(node)
        val = fake_value(node)
        if key in _METADATA or (val is not None and not isinstance(val, (torch.Tensor, tuple, list))):
            if key in _METADATA:
                return None
            raise _NotTokenWise(f"{key} returns a non-tensor from the token stream")
        x = node.args[0] if node.args else None
        tx = self._t(x)
        if key in _DROPOUT:
            p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
            if p and training:
                raise _NotTokenWise("dropout in training mode")
            return self._pointwise(node, out_shape)
        if key in _POINTWISE:
            return self._pointwise(node, out_shape)
        if key in _LIKE_FIRST:
            if not isinstance(tx, tuple) or out_shape != shape_of(x):
                raise _NotTokenWise(f"{key}: token stream not in the first argument")
            return tx
        if key == operator.setitem:
            return self._setitem(node)
        if key in _TRAILING or key in _DIM_OPS or key in _REDUCE:
            for a in node.all_input_nodes:
                if a is not x and self._t(a) is not None:
                    raise _NotTokenWise(f"{key}: token stream in a parameter argument")
            if not isinstance(tx, tuple):
                raise _NotTokenWise(f"{key}: token stream not in the data argument")
            in_shape = shape_of(x)
            d, off = tx
            if key in _TRAILING:
                if d >= len(in_shape) - _TRAILING[key](node):
                    raise _NotTokenWise(f"{key} acts on the token dimension")
                return tx
            dim = _arg(node, 1, "dim")
            if key in _DIM_OPS:
                if dim is None or _norm_dim(dim, len(in_shape)) == d:
                    raise _NotTokenWise(f"{key} over the token dimension")
                return tx
            dims = dim if isinstance(dim, (tuple, list)) else (dim,)
            if dim is None or any(not isinstance(v, int) for v in dims):
                raise _NotTokenWise(f"{key} over every dimension")
            dims = {_norm_dim(v, len(in_shape)) for v in dims}
            if d in dims:
                raise _NotTokenWise(f"{key} over the token dimension")
            keep = bool(_arg(node, 2, "keepdim", False))
            return (d if keep else d - sum(1 for v in dims if v < d), off)
        if not isinstance(tx, tuple) and key not in _CAT and key not in _STACK:
            if key == operator.getitem and isinstance(tx, list):
                return tx[node.args[1]]
            raise _NotTokenWise(f"{key}: unsupported use of the token stream")
        if key in _RESHAPE:
            return self._reshape(x, tx, out_shape)
        if key in _EXPAND:
            in_shape = shape_of(x)
            d = tx[0] + len(out_shape) - len(in_shape)
            if out_shape[d] != in_shape[tx[0]]:
                raise _NotTokenWise("expand over the token dimension")
            return (d, tx[1])
        if key in _TRANSPOSE:
            rank = len(out_shape)
            a, b = (_norm_dim(int(v), rank) for v in node.args[1:3])
            d = tx[0]
            return (b if d == a else a if d == b else d, tx[1])
        if key in _PERMUTE:
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            dims = [_norm_dim(int(v), len(out_shape)) for v in dims]
            return (dims.index(tx[0]), tx[1])
        if key in _MOVEDIM:
            rank = len(out_shape)
            src, dst = node.args[1], node.args[2]
            order = [i for i in range(rank)]
            src_l = [_norm_dim(s, rank) for s in (src if isinstance(src, (tuple, list)) else [src])]
            dst_l = [_norm_dim(s, rank) for s in (dst if isinstance(dst, (tuple, list)) else [dst])]
            rest = [i for i in order if i not in src_l]
            perm = [None] * rank
            for s, t in zip(src_l, dst_l):
                perm[t] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
            return (perm.index(tx[0]), tx[1])
        if key == operator.getitem:
            return self._getitem(node.args[1], x, tx)
        if key in _CAT:
            return self._cat(node, out_shape)
        if key in _STACK:
            return self._stack(node, out_shape)
        if key in _SPLIT:
            return self._split(node, x, tx)
        if key in _UNBIND:
            rank = len(shape_of(x))
            dim = _norm_dim(int(_arg(node, 1, "dim", 0)), rank)
            if dim == tx[0]:
                raise _NotTokenWise("unbind over the token dimension")
            d = tx[0] - (1 if dim < tx[0] else 0)
            return [(d, tx[1])] * len(val)
        if key in _MATMUL:
            a, b = node.args[0], node.args[1]
            if self._t(b) is not None or not isinstance(self._t(a), tuple):
                raise _NotTokenWise("matmul mixes tokens")
            ra = len(shape_of(a))
            if tx[0] == ra - 1:
                raise _NotTokenWise("matmul contracts the token dimension")
            return (tx[0] + len(out_shape) - ra, tx[1])
        raise _NotTokenWise(f"{getattr(key, '__name__', key)} is not in the token-wise table")

    def _pointwise(self, node: fx.Node, out_shape: tuple[int, ...] | None) -> Tok:
        if out_shape is None:
            raise _NotTokenWise("pointwise op without shape")
        rank = len(out_shape)
        out: Tok | None = None
        tensors = [a for a in node.all_input_nodes if isinstance(fake_value(a), torch.Tensor)]
        for a in tensors:
            t = self._t(a)
            if t is None:
                continue
            if not isinstance(t, tuple):
                raise _NotTokenWise("pointwise op on a tuple")
            mapped = (t[0] + rank - len(shape_of(a)), t[1])
            if out is not None and mapped != out:
                raise _NotTokenWise("pointwise op joins token streams of different layouts")
            out = mapped
        assert out is not None
        for a in tensors:
            if self._t(a) is not None:
                continue
            shape = shape_of(a)
            if shape is None:
                raise _NotTokenWise("operand without shape")
            d = out[0] - (rank - len(shape))
            if d >= 0 and shape[d] != 1:
                self._side(node, a, d, out[1])
        return out

    def _reshape(self, x: fx.Node, tx: Tok, out_shape: tuple[int, ...] | None) -> Tok:
        in_shape = shape_of(x)
        if in_shape is None or out_shape is None:
            raise _NotTokenWise("reshape without shapes")
        j = _reshape_map(in_shape, tx[0], out_shape)
        if j is None:
            raise _NotTokenWise("reshape merges or splits the token dimension")
        return (j, tx[1])

    def _setitem(self, node: fx.Node) -> None:
        """``target[idx] = value`` (in place): the written view and the value must share the token layout."""
        target, idx, value = node.args[:3]
        tt = self._t(target)
        if not isinstance(tt, tuple):
            raise _NotTokenWise("in-place write of the token stream into another tensor")
        view = self._getitem(idx, target, tt)
        tv = self._t(value) if isinstance(value, fx.Node) else None
        vshape = shape_of(value) if isinstance(value, fx.Node) else None
        if view is None:
            raise _NotTokenWise("in-place write outside the image tokens")
        if tv is not None:
            rank = len(shape_of(target)) - sum(1 for it in (idx if isinstance(idx, tuple) else (idx,))
                                               if isinstance(it, int))
            if not isinstance(tv, tuple) or (tv[0] + rank - len(vshape), tv[1]) != view:
                raise _NotTokenWise("in-place write of a differently laid out token stream")
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
                raise _NotTokenWise("advanced indexing of the token stream")
            if in_dim == tx[0]:
                if isinstance(it, int):
                    raise _NotTokenWise("integer index into the token dimension")
                start, stop, step = _slice_ints(it, in_shape[in_dim])
                if step != 1:
                    raise _NotTokenWise("strided slice of the token dimension")
                lo, hi = tx[1], tx[1] + self.n
                if start <= lo and hi <= stop:
                    result = (out_dim, lo - start)
                elif stop <= lo or start >= hi:
                    result = None
                else:
                    raise _NotTokenWise("slice cuts through the image tokens")
            if isinstance(it, slice):
                out_dim += 1
            in_dim += 1
        return result

    def _cat(self, node: fx.Node, out_shape: tuple[int, ...]) -> Tok:
        tensors = node.args[0]
        rank = len(out_shape)
        dim = _norm_dim(int(_arg(node, 1, "dim", 0)), rank)
        streams = [(i, a) for i, a in enumerate(tensors) if self._t(a) is not None]
        for _, a in streams:
            if not isinstance(self._t(a), tuple):
                raise _NotTokenWise("cat of a tuple")
        toks = {self._t(a) for _, a in streams}
        if any(t[0] == dim for t in toks):
            if len(streams) != 1:
                raise _NotTokenWise("cat joins several token streams")
            i, a = streams[0]
            offset = sum(shape_of(b)[dim] for b in tensors[:i]) + self._t(a)[1]
            return (dim, offset)
        if len(toks) != 1:
            raise _NotTokenWise("cat of token streams with different layouts")
        out = next(iter(toks))
        for a in tensors:
            if self._t(a) is None:
                self._side(node, a, out[0], out[1])
        return out

    def _stack(self, node: fx.Node, out_shape: tuple[int, ...]) -> Tok:
        tensors = node.args[0]
        dim = _norm_dim(int(_arg(node, 1, "dim", 0)), len(out_shape))
        toks = {self._t(a) for a in tensors if self._t(a) is not None}
        if len(toks) != 1 or not isinstance(next(iter(toks)), tuple):
            raise _NotTokenWise("stack of token streams with different layouts")
        d, off = next(iter(toks))
        out = (d if d < dim else d + 1, off)
        for a in tensors:
            if self._t(a) is None:
                self._side(node, a, d, off)
        return out

    def _split(self, node: fx.Node, x: fx.Node, tx: Tok) -> list[Tok | None]:
        val = fake_value(node)
        in_shape = shape_of(x)
        dim = _norm_dim(int(_arg(node, 2, "dim", 0)), len(in_shape))
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
                raise _NotTokenWise("split cuts through the image tokens")
            start = stop
        return out


def _slice_ints(s: slice, size: int) -> tuple[int, int, int]:
    for v in (s.start, s.stop, s.step):
        if v is not None and not isinstance(v, int):
            raise _NotTokenWise("symbolic slice of the token dimension")
    return s.indices(size)


def _reshape_map(in_shape: Sequence[int], d: int, out_shape: Sequence[int]) -> int | None:
    """The output dim that holds input dim ``d`` unchanged (same size, same prefix product), or ``None``."""
    pre = math.prod(in_shape[:d])
    size = in_shape[d]
    acc = 1
    for j, s in enumerate(out_shape):
        if acc == pre and s == size:
            return j
        acc *= s
    return None


# ---------------------------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    site: AttentionSite
    node: fx.Node


class _Constants:
    """Index vectors and layouts, built once per distinct key and lifted once per tensor.

    Tables are built on the CPU and lifted on ``device``, the device of the attention sites' tensors: an index
    vector or a block table on another device than the activations fails at compile or launch time.
    """

    def __init__(self, gm: fx.GraphModule, device: torch.device) -> None:
        self.gm = gm
        self.device = device
        self._vec: dict[tuple, torch.Tensor] = {}
        self._moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layouts: set[tuple] = set()

    def vector(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._vec:
            self._vec[key] = build()
        return self._vec[key]

    def lift(self, name: str, t: torch.Tensor) -> fx.Node:
        if t.device != self.device:
            key = id(t)
            if key not in self._moved:
                self._moved[key] = (t, t.to(self.device))  # keeps t alive, so id(t) stays unique
            t = self._moved[key][1]
        return lift_constant(self.gm, name, t)


def _sites_device(plans: list[_Plan]) -> torch.device:
    """The device of the first rewritten site's query (every site of one graph runs on one device)."""
    for plan in plans:
        for arg in (*plan.node.args, *plan.node.kwargs.values()):
            val = arg.meta.get("val", arg.meta.get("example_value")) if isinstance(arg, fx.Node) else None
            if isinstance(val, torch.Tensor):
                return val.device
    return torch.device("cpu")


def _segment_perm(size: int, offset: int, perm: torch.Tensor) -> torch.Tensor:
    """int64 ``[size]``: identity outside ``[offset, offset + N)``, ``offset + perm`` inside."""
    out = torch.arange(size, dtype=torch.int64)
    out[offset:offset + perm.numel()] = offset + perm
    return out


def rewrite_grouped_attention(gm: fx.GraphModule, cfg: FxditConfig) -> PassReport:
    """Replace eligible attention sites by ``torch.ops.fxdit.grouped_attention`` (GRAT-B / GRAT-X).

    Reads the records of ``find_attention`` and ``find_blocks`` from ``gm.meta["fxdit"]``; see the module docstring
    for eligibility, the layouts and permutation hoisting.

    Args:
        gm: the graph (mutated in place).
        cfg: the backend configuration; only ``cfg.attention`` is read.

    Returns:
        The report: sites matched/rewritten, skip reasons, and ``details`` (``hoisted``, ``permutes_saved``...).

    Raises:
        FxditError: when ``attention.group`` does not fit the token grid's rank.
    """
    rb = ReportBuilder(_NAME, gm, log)
    state = fxdit_meta(gm)
    sites: list[AttentionSite] = list(state.get("attention_sites") or [])
    grid_rec: TokenGrid | None = state.get("token_grid")
    nodes = nodes_by_name(gm)
    rb.details.update({"hoisted": False, "permutes_saved": 0})

    live: list[tuple[AttentionSite, fx.Node]] = []
    for site in sites:
        node = nodes.get(site.node)
        if node is None or node.op != "call_function" or node.target is torch.ops.fxdit.grouped_attention.default:
            log.debug("%s: %s: %s", _NAME, site.node, R_GONE)
            continue
        live.append((site, node))
    rb.matched = len(live)
    if not live:
        return rb.build()

    grid = _resolve_grid(grid_rec, cfg) if cfg.attention.enabled else None
    group = _resolve_group(grid, cfg) if grid is not None else None
    plans: list[_Plan] = []
    for site, node in live:
        reason = _why_not(site, grid, cfg, nodes)
        if reason == R_NO_GRID and state.get("token_grid_reason"):
            reason = f"{R_NO_GRID}: {state['token_grid_reason']}"
        if reason is not None:
            rb.skip(reason, site.node)
            continue
        plans.append(_Plan(site, node))
    if not plans:
        return rb.build()
    dense = _dense_lowerings(plans, nodes)
    if dense:
        # rewritten (the result is the grouped pattern) but compiled as the dense masked formula: say so
        rb.details["dense_lowering"] = dense
        log.warning("%s: %d grouped attention site(s) will run the dense masked formula, not block-sparse: %s",
                    _NAME, len(dense), "; ".join(sorted(set(dense.values()))))

    assert grid is not None and group is not None
    perm, inv = gl.group_permutation(grid, group)
    consts = _Constants(gm, _sites_device(plans))
    meta = _Meta(gm)

    flow, reason = _plan_hoisting(gm, grid_rec, grid, sites, live, plans, nodes)
    hoisted = flow is not None
    if hoisted:
        cost = _apply_hoisting(gm, flow, grid_rec, perm, inv, consts, meta)
        rb.details["hoist_exits"] = sorted({f"{a.name} -> {u.name}: {why}" for a, lst in flow.exits.items()
                                            for u, why in lst})
    else:
        cost = 0
        rb.details["hoist_reason"] = reason
    for plan in plans:
        _rewrite_site(gm, plan, cfg, grid, group, perm, consts, meta, hoisted)
        rb.rewritten += 1
    rb.details["hoisted"] = hoisted
    rb.details["permutes_saved"] = (PER_SITE_PERMUTES * len(plans) - cost) if hoisted else 0
    rb.details["layouts"] = len(consts.layouts)
    finish(gm, True)
    torch_private.counters()["fxdit"]["grouped_attention_sites"] += rb.rewritten
    return rb.build()


def _plan_hoisting(gm: fx.GraphModule, grid_rec: TokenGrid | None, grid: tuple[int, ...],
                   sites: list[AttentionSite], live: list[tuple[AttentionSite, fx.Node]], plans: list[_Plan],
                   nodes: dict[str, fx.Node]) -> tuple[_Flow | None, str]:
    """Follow the token stream; return the flow when hoisting is valid and saves gathers, else the reason."""
    n = math.prod(grid)
    if any(p.site.span_source == "joint_kv" for p in plans):
        return None, "image queries over joint image+text keys: permuted per site"
    if grid_rec is not None and grid_rec.patch_node is not None:
        entry = nodes.get(grid_rec.patch_node)
    else:
        entry = _token_input(gm, n, {p.site.batch for p in plans})
        if entry is None:
            return None, "no patch-embedding node recorded and no single (B, N, C) token input"
    shape = shape_of(entry)
    if entry is None or shape is None:
        return None, "patch-embedding node not in the graph"
    dims = [i for i, s in enumerate(shape) if s == n]
    if not dims:
        return None, f"patch-embedding node {entry.name} has no dimension of {n} tokens"
    entry_dim = 1 if (1 in dims and len(shape) == 3) else dims[0]
    site_nodes = {node: site for site, node in live}
    internal: set[fx.Node] = set()
    for site, node in live:
        for name in site.nodes:
            m = nodes.get(name)
            if m is not None and m is not node:
                internal.add(m)
    rewrite = {p.node for p in plans}
    flow = _TokenFlow(gm, entry, entry_dim, n, site_nodes, internal, rewrite, nodes).run()
    if flow.failure is not None:
        return None, flow.failure
    cost = _hoist_cost(flow)
    if cost >= PER_SITE_PERMUTES * len(plans):
        return None, (f"hoisting needs {cost} gathers (entry, {len(flow.exits)} exits, sides), per-site needs "
                      f"{PER_SITE_PERMUTES * len(plans)}")
    return flow, ""


def _token_input(gm: fx.GraphModule, n: int, batches: set[int]) -> fx.Node | None:
    """The graph input that already is the token sequence ``(B, N, C)`` (packed latents, e.g. Flux), if unique."""
    found = [p for p in gm.graph.nodes if p.op == "placeholder" and not node_meta(p).get("constant")
             and (s := shape_of(p)) is not None and len(s) == 3 and s[1] == n and s[0] in batches]
    return found[0] if len(found) == 1 else None


def _side_root(arg: fx.Node, dim: int) -> tuple[fx.Node, int, list[fx.Node]]:
    """Trace a side tensor back through pure views to the tensor that first carries the token dim."""
    chain: list[fx.Node] = []
    node, d = arg, dim
    while _key(node) in _SIDE_VIEWS and node.args and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        src_shape, shape = shape_of(src), shape_of(node)
        if src_shape is None or shape is None or not isinstance(fake_value(src), torch.Tensor):
            break
        if any(isinstance(a, fx.Node) and a is not src for a in node.all_input_nodes):
            break
        found = None
        for c in range(len(src_shape)):
            if src_shape[c] != shape[d]:
                continue
            probe = _TokenFlow.__new__(_TokenFlow)
            probe.flow = _Flow(tok={src: (c, 0)})
            probe.n = shape[d]
            probe.nodes = {}
            try:
                got = probe._rule(node)
            except (_NotTokenWise, Exception):  # noqa: BLE001 - any failure stops the walk
                got = None
            if got == (d, 0) and not probe.flow.sides:
                found = c
                break
        if found is None:
            break
        chain.append(node)
        node, d = src, found
    return node, d, list(reversed(chain))


def _hoist_cost(flow: _Flow) -> int:
    roots = {(_side_root(arg, dim)[0], _side_root(arg, dim)[1], off) for _, arg, dim, off, _ in flow.sides}
    return 1 + len(flow.exits) + len(roots)


def _index_select(graph: fx.Graph, x: fx.Node, dim: int, idx: fx.Node) -> fx.Node:
    return graph.call_function(torch.index_select, (x, dim, idx))


def _apply_hoisting(gm: fx.GraphModule, flow: _Flow, grid_rec: TokenGrid, perm: torch.Tensor, inv: torch.Tensor,
                    consts: _Constants, meta: _Meta) -> int:
    """Insert the entry gather, the side gathers and the exit gathers; return how many were inserted."""
    graph = gm.graph
    entry = flow.entry
    d0 = flow.tok[entry][0]
    count = 0

    def seg(size: int, offset: int, inverse: bool) -> fx.Node:
        key = ("seg", size, offset, inverse)
        t = consts.vector(key, lambda: _segment_perm(size, offset, inv if inverse else perm))
        return consts.lift(f"grat_{'inv' if inverse else 'perm'}_{size}_{offset}", t)

    # Exits first (they refer to stream nodes, whose values are permuted once the entry is in place).
    for a, users in flow.exits.items():
        d, off = flow.tok[a]
        size = shape_of(a)[d]
        idx = seg(size, off, True)
        with _insert_point(graph, a):
            u = _index_select(graph, a, d, idx)
        meta.stamp(u, a, {"grat_permute": "exit"})
        count += 1
        for user, _ in users:
            user.replace_input_with(a, u)

    # Side tensors: permute each source once, re-issue the views on the permuted copy.
    side_done: dict[tuple, fx.Node] = {}
    chain_done: dict[tuple, fx.Node] = {}
    for user, arg, dim, off, size in flow.sides:
        root, rdim, chain = _side_root(arg, dim)
        rkey = (root, rdim, off)
        if rkey not in side_done:
            rsize = shape_of(root)[rdim]
            idx = seg(rsize, off, False)
            with _insert_point(graph, root):
                p = _index_select(graph, root, rdim, idx)
            meta.stamp(p, root, {"grat_permute": "side"})
            side_done[rkey] = p
            count += 1
        cur = side_done[rkey]
        for c in chain:
            ckey = (rkey, c)
            if ckey not in chain_done:
                with graph.inserting_after(cur):
                    copy = graph.node_copy(c, lambda a, c=c, cur=cur: cur if a is c.args[0] else a)
                meta.stamp(copy, c, {"grat_permute": "side-view"})
                chain_done[ckey] = copy
            cur = chain_done[ckey]
        user.replace_input_with(arg, cur)

    # Entry: everything downstream of the patch embedding now sees group-major tokens.
    size = shape_of(entry)[d0]
    idx = seg(size, 0, False)
    with _insert_point(graph, entry):
        p = _index_select(graph, entry, d0, idx)
    meta.stamp(p, entry, {"grat_permute": "entry"})
    entry.replace_all_uses_with(p, delete_user_cb=lambda u: u is not p)
    count += 1
    return count


def _rewrite_site(gm: fx.GraphModule, plan: _Plan, cfg: FxditConfig, grid: tuple[int, ...], group: tuple[int, ...],
                  perm: torch.Tensor, consts: _Constants, meta: _Meta, hoisted: bool) -> fx.Node:
    """Replace one site by the op (with per-site gathers unless the stream is already permuted)."""
    graph = gm.graph
    site, old = plan.site, plan.node
    nodes = nodes_by_name(gm)
    q, k, v = nodes[site.q], nodes[site.k], nodes[site.v]
    seq = site.q_len
    start, stop = site.image_span
    att = cfg.attention
    block_size = att.block_size or gl.default_block_size(group)
    if hoisted:
        image_start = start
        order = consts.vector(("seg", seq, start, False), lambda: _segment_perm(seq, start, perm))
    else:
        image_start = 0

        def build() -> torch.Tensor:
            others = [i for i in range(seq) if not (start <= i < stop)]
            return torch.cat([start + perm, torch.tensor(others, dtype=torch.int64)])

        order = consts.vector(("order", seq, start), build)
    layout = gl.SequenceLayout(seq, image_start, grid, group, att.mode, att.radius)
    consts.layouts.add((layout, block_size))
    tag = f"grat_{seq}_{image_start}"
    kv_order = order
    if site.span_source == "joint_kv":
        # queries: the image tokens alone; keys: the same image tokens (group order first) and the global tokens
        assert site.kv_image_span is not None
        kv_len, (kv_start, kv_stop) = site.kv_len, site.kv_image_span

        def build_kv() -> torch.Tensor:
            others = [i for i in range(kv_len) if not (kv_start <= i < kv_stop)]
            return torch.cat([kv_start + perm, torch.tensor(others, dtype=torch.int64)])

        kv_order = consts.vector(("order", kv_len, kv_start), build_kv)
        kv_layout = gl.SequenceLayout(kv_len, 0, grid, group, att.mode, att.radius)
        consts.layouts.add((kv_layout, block_size))
        tables = gl.block_mask_tables_qk(layout, kv_layout, block_size)
        tag_kv = f"grat_{kv_len}_0"
        groups_n = consts.lift(f"{tag}_groups", gl.token_groups(layout))
        kv_groups_n = consts.lift(f"{tag_kv}_groups", gl.token_groups(kv_layout))
        tag = f"grat_{seq}x{kv_len}"
    else:
        tables = gl.block_mask_tables(layout, block_size)
        groups_n = kv_groups_n = consts.lift(f"{tag}_groups", gl.token_groups(layout))
    adj = gl.group_adj(layout)
    scale = float(site.scale) if site.scale is not None else 1.0 / math.sqrt(site.head_dim)

    adj_n = consts.lift(f"{tag}_adj", adj)
    tab = [consts.lift(f"{tag}_{name}", t) for name, t in zip(
        ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), tables[:4])]
    order_n = None if hoisted else consts.lift(f"grat_order_{seq}_{start}", order)
    kv_order_n = order_n if kv_order is order else consts.lift(
        f"grat_order_{site.kv_len}_{site.kv_image_span[0]}", kv_order)  # type: ignore[index]

    with graph.inserting_before(old):
        def gather(x: fx.Node, idx: fx.Node | None) -> fx.Node:
            if hoisted:
                # A fresh contiguous BHSD buffer, as the per-site gather gives: inductor's CPU flex template reads
                # the *base* buffer's layout of its q/k/v and fails on views of buffers of another rank.
                c = graph.call_function(torch.clone, (x,), {"memory_format": torch.contiguous_format})
                meta.stamp(c, old, {"grat_permute": "none (contiguous copy)"})
                return c
            g = _index_select(graph, x, 2, idx)  # type: ignore[arg-type]
            meta.stamp(g, old, {"grat_permute": "site"})
            return g

        qp = gather(q, order_n)
        kp = qp if k is q else gather(k, kv_order_n)
        vp = qp if v is q else kp if v is k else gather(v, kv_order_n)
        kv_valid = None
        if site.mask is not None:
            kv_valid = _kv_valid(graph, nodes[site.mask], site, consts, kv_order, meta, old)
        new = graph.call_function(torch.ops.fxdit.grouped_attention.default, (
            qp, kp, vp, groups_n, kv_groups_n, adj_n, *tab, kv_valid, scale, int(block_size)))
        density = gl.block_density(tables)
        info = {
            "mode": att.mode, "group": tuple(group), "grid": tuple(grid), "block_size": int(block_size),
            "density": density, "ideal_speedup": gl.ideal_speedup(density),
            "full_blocks": int(tables.full_kv_num_blocks.sum()), "partial_blocks": int(tables.kv_num_blocks.sum()),
            "hoisted": hoisted, "replaces": site.node,
        }
        meta.stamp(new, old, {"grat": info})
        out = new
        if not hoisted:
            back = consts.vector(("inv_order", seq, start), lambda: torch.argsort(order))
            back_n = consts.lift(f"grat_unorder_{seq}_{start}", back)
            out = _index_select(graph, new, 2, back_n)
            meta.stamp(out, old, {"grat_permute": "site"})
    old.replace_all_uses_with(out)
    graph.erase_node(old)
    return new


def _kv_valid(graph: fx.Graph, mask: fx.Node, site: AttentionSite, consts: _Constants, order: torch.Tensor,
              meta: _Meta, like: fx.Node) -> fx.Node:
    """bool ``[B, S_kv]`` key validity in the op's token order, from a ``[B|1, 1, 1, S_kv]`` key-padding mask."""
    shape = shape_of(mask)
    lead = (1,) * (4 - len(shape)) + tuple(shape)
    flat = graph.call_function(torch.reshape, (mask, (lead[0], site.kv_len)))
    meta.stamp(flat, like)
    if lead[0] != site.batch:
        flat = graph.call_method("expand", (flat, site.batch, site.kv_len))
        meta.stamp(flat, like)
    idx = consts.lift(f"grat_kvorder_{site.kv_len}", order)
    out = _index_select(graph, flat, 1, idx)
    meta.stamp(out, like, {"grat_permute": "kv_valid"})
    return out
