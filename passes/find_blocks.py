"""find_blocks: the transformer blocks, the role of each of their linear layers, and the token grid.

Analysis only: the graph is not changed. Runs after ``find_attention`` (it runs it itself when the sites are
missing).

* Blocks: the deepest ``X.N`` module-path prefixes (``N`` an integer: an element of a ``ModuleList`` or
  ``Sequential``) that contain attention sites (:func:`fxdit.passes._dataflow.block_paths`).
* Linear roles (:data:`ROLE_RULES`, tried in order) come from dataflow relative to the block's attention
  sites and activations, never from module names:

  ``q``/``k``/``v``: reached backwards from exactly one of a site's q, k, v through views, transposes,
  norms, rotary elementwise ops, splits and concatenations; ``qkv``: reached from more than one of them (a
  fused projection split into q, k, v); ``attn_out``: reached forwards from a site's output through views,
  casts, splits and concatenations; ``modulation``: input without a token dim (a conditioning vector), output
  a multiple ``k >= 2`` of the hidden size; ``mlp_in``: token input, output wider than its input, followed by
  an activation; ``mlp_out``: input reached backwards from an activation of an ``mlp_in``; a projection that
  reads both an attention output and an MLP activation (single-stream blocks' fused ``proj_out``) and
  everything else: ``other``. Module names are never consulted.
* Low-rank adapters (unfused PEFT LoRA: ``base(x) + lora_B(lora_A(dropout(x))) · scale``, matched by
  :func:`find_adapters` from the dataflow alone, the table :data:`ADAPTER_SCALE_KINDS`): the roles are computed on a
  copy of the graph where each adapter's sum is replaced by the base linear's output, so the base linear gets the
  role of the sum (``q``, ``mlp_in``...) and the adapter pair gets ``"other"`` (never cached). At an ICC cached step
  the base linear's output is the increment form and the adapter product still runs exactly on the current input,
  i.e. the increment applies to the effective weight ``W + scale·B·A`` with ``W``'s factors extended by the adapter's
  own (exact) low-rank pair.
* Streams: in a block whose linears read both image-only and text-only tokens (dual-stream blocks, image→text
  cross-attention), each linear gets ``"image"``, ``"text"`` or ``"joint"`` from the token layout of its
  input; in single-stream blocks every linear is ``"joint"``.
* Token grid: see :func:`fxdit.passes._dataflow.token_streams` (patch-embedding conv, reshape patchify,
  recorded position ids, or the unpatchify reshape; ``attention.grid`` overrides).

Results: ``fxdit_meta(gm)["blocks"]`` (list of :class:`BlockInfo`), ``fxdit_meta(gm)["token_grid"]``,
``node.meta["fxdit"]["linear"]`` (:class:`LinearInfo`) on each linear inside a block, and
``AttentionSite.block`` filled in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from fxdit.passes._adapters import Adapter, find_adapters, without_adapters
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._dataflow import (
    Streams,
    block_index_map,
    block_paths,
    kind,
    output_tokens,
    shape_of,
    token_streams,
    trace_back,
    trace_forward,
)
from fxdit.passes._fx_utils import fxdit_meta, module_path, node_meta
from fxdit.passes._ops import linear_bias, linear_input, linear_weight
from fxdit.passes._records import AttentionSite, BlockInfo, LinearInfo, TokenGrid

__all__ = ["find_blocks", "analyse_blocks", "find_adapters", "Adapter", "ROLE_RULES"]

log = logging.getLogger(__name__)

#: Kinds through which q/k/v are traced back to their projections.
QKV_THROUGH = frozenset({"view", "transpose", "permute", "mT", "getitem", "split", "cat", "stack", "cast", "norm",
                         "elementwise"})
#: Kinds through which an attention output is traced forward to its output projection.
OUT_THROUGH = frozenset({"view", "transpose", "permute", "mT", "getitem", "split", "cat", "cast", "dropout"})
#: Kinds between an MLP's first linear and its activation (GEGLU splits the projection first).
TO_ACT_THROUGH = frozenset({"view", "getitem", "split", "cast"})
#: Kinds between an activation and the MLP's second linear (GEGLU multiplies by the gate).
FROM_ACT_THROUGH = frozenset({"view", "getitem", "split", "cast", "dropout", "elementwise", "cat"})

@dataclass
class _BlockFacts:
    """What the role rules need to know about one block."""

    path: str
    sites: list[AttentionSite]
    qkv_roles: dict[fx.Node, set[str]]
    out_linears: set[fx.Node]
    hidden: int
    tokens: int


def _tokens(node: Any) -> int:
    s = shape_of(node)
    if s is None or len(s) < 3:
        return 1
    t = 1
    for x in s[1:-1]:
        t *= x
    return t





def _role_qkv(lin: fx.Node, facts: _BlockFacts) -> str | None:
    roles = facts.qkv_roles.get(lin)
    if not roles:
        return None
    return next(iter(roles)) if len(roles) == 1 else "qkv"


def _reads_mlp_activation(lin: fx.Node) -> bool:
    """The linear's input comes (also) from an activation of an ``mlp_in`` projection."""
    for act in trace_back(lin, through=FROM_ACT_THROUGH, stop=frozenset({"activation"}), limit=60):
        for producer in trace_back(act, through=TO_ACT_THROUGH, stop=frozenset({"linear"}), limit=30):
            if _is_mlp_in(producer):
                return True
    return False


def _role_attn_out(lin: fx.Node, facts: _BlockFacts) -> str | None:
    if lin not in facts.out_linears:
        return None
    # One matmul over cat([attention output, MLP hidden]) (single-stream blocks) is neither: "other".
    return "other" if _reads_mlp_activation(lin) else "attn_out"


def _role_modulation(lin: fx.Node, facts: _BlockFacts) -> str | None:
    if _tokens(linear_input(lin)) != 1:
        return None
    out = shape_of(lin)
    if out is None or not facts.hidden:
        return None
    if out[-1] % facts.hidden == 0 and out[-1] // facts.hidden >= 2:
        return "modulation"
    return None


def _is_mlp_in(lin: fx.Node) -> bool:
    if _tokens(linear_input(lin)) == 1:
        return False
    s_in, s_out = shape_of(linear_input(lin)), shape_of(lin)
    if s_in is None or s_out is None or s_out[-1] <= s_in[-1]:
        return False
    return bool(trace_forward(lin, through=TO_ACT_THROUGH, stop=frozenset({"activation"}), limit=30))


def _role_mlp_in(lin: fx.Node, facts: _BlockFacts) -> str | None:
    return "mlp_in" if _is_mlp_in(lin) else None


def _role_mlp_out(lin: fx.Node, facts: _BlockFacts) -> str | None:
    if _tokens(linear_input(lin)) == 1:
        return None
    return "mlp_out" if _reads_mlp_activation(lin) else None


#: The role rules, tried in order; the first that returns a role wins.
ROLE_RULES: tuple[tuple[str, Callable[[fx.Node, _BlockFacts], str | None]], ...] = (
    ("q/k/v/qkv", _role_qkv),
    ("attn_out", _role_attn_out),
    ("modulation", _role_modulation),
    ("mlp_in", _role_mlp_in),
    ("mlp_out", _role_mlp_out),
)


def _block_facts(path: str, sites: list[AttentionSite], by_name: dict[str, fx.Node],
                 grid: TokenGrid | None) -> _BlockFacts:
    qkv_roles: dict[fx.Node, set[str]] = {}
    out_linears: set[fx.Node] = set()
    hidden = 0
    for site in sites:
        for role in ("q", "k", "v"):
            start = by_name[getattr(site, role)]
            for lin in trace_back(start, through=QKV_THROUGH, stop=frozenset({"linear"})):
                qkv_roles.setdefault(lin, set()).add(role)
                s_in = shape_of(linear_input(lin))
                if role == "q" and s_in is not None and not hidden:
                    hidden = s_in[-1]
        out = by_name[site.node]
        found = trace_forward(out, through=OUT_THROUGH, stop=frozenset({"linear"}))
        out_linears.update(found)
        if not hidden:
            for lin in found:
                s = shape_of(lin)
                if s is not None:
                    hidden = s[-1]
    tokens = 0
    for site in sites:
        if site.image_span is not None:
            tokens = max(tokens, site.image_span[1] - site.image_span[0])
    if not tokens and grid is not None:
        tokens = grid.tokens
    if not tokens and sites:
        tokens = sites[0].q_len
    return _BlockFacts(path, sites, qkv_roles, out_linears, hidden, tokens)


def _stream(node: fx.Node, streams: Streams) -> str:
    lay = streams.layout(linear_input(node))
    if lay is None:
        return "joint"
    s = lay.streams
    if s == {"image"}:
        return "image"
    if s == {"text"}:
        return "text"
    return "joint"


def analyse_blocks(gm: fx.GraphModule, cfg: Any,
                   rb: ReportBuilder | None = None) -> tuple[list[BlockInfo], TokenGrid | None]:
    """Blocks with their linears, and the token grid; fills ``AttentionSite.block``. Does not store anything.

    With unfused low-rank adapters in the graph the roles come from a copy without them (module docstring).
    """
    adapters = find_adapters(gm)
    if not adapters:
        return _analyse_blocks(gm, cfg, rb)
    state = fxdit_meta(gm)
    if "attention_sites" not in state:
        from fxdit.passes.find_attention import find_attention

        find_attention(gm, cfg)
    view = without_adapters(gm, adapters)
    blocks, grid = _analyse_blocks(view, cfg, rb)
    fxdit_meta(gm)["output_tokens"] = fxdit_meta(view).get("output_tokens")  # same outputs as ``gm``
    where = {s.node: s.block for s in (fxdit_meta(view).get("attention_sites") or [])}
    for site in state.get("attention_sites") or []:
        if site.node in where:
            site.block = where[site.node]
    by_base: dict[str, list[Adapter]] = {}
    for a in adapters:
        by_base.setdefault(a.base, []).append(a)
    owner = {n: a.base for a in adapters for n in (a.down, a.up)}
    for b in blocks:
        for info in b.linears:
            if info.node in owner:
                info.role = "other"
                info.adapter_of = owner[info.node]
            elif info.node in by_base:
                info.adapters = tuple(n for a in by_base[info.node] for n in (a.down, a.up))
    if rb is not None:
        rb.details["adapters"] = len(adapters)
    return blocks, grid


def _analyse_blocks(gm: fx.GraphModule, cfg: Any,
                    rb: ReportBuilder | None = None) -> tuple[list[BlockInfo], TokenGrid | None]:
    state = fxdit_meta(gm)
    if "attention_sites" not in state:
        from fxdit.passes.find_attention import find_attention

        find_attention(gm, cfg)
    sites: list[AttentionSite] = state.get("attention_sites") or []
    by_name = {n.name: n for n in gm.graph.nodes}
    sites = [s for s in sites if s.node in by_name]
    streams = token_streams(gm, cfg)
    paths = block_paths(gm, [by_name[s.node] for s in sites],
                        [by_name[s.node] for s in sites if s.image_span is not None])
    where = block_index_map(gm, paths)
    for s in sites:
        s.block = where.get(by_name[s.node])
    blocks: list[BlockInfo] = []
    linears_by_block: dict[int, list[fx.Node]] = {i: [] for i in range(len(paths))}
    for node in gm.graph.nodes:
        if kind(node) == "linear" and node in where:
            linears_by_block[where[node]].append(node)
    for index, path in enumerate(paths):
        facts = _block_facts(path, [s for s in sites if s.block == index], by_name, streams.grid)
        infos: list[LinearInfo] = []
        for lin in linears_by_block[index]:
            role = "other"
            for _, rule in ROLE_RULES:
                r = rule(lin, facts)
                if r is not None:
                    role = r
                    break
            w = linear_weight(lin)
            b_ = linear_bias(lin)
            ws = shape_of(w)
            if ws is None or len(ws) != 2:
                if rb is not None:
                    rb.skip("linear weight shape unknown", lin.name)
                continue
            infos.append(LinearInfo(
                node=lin.name, module=module_path(lin), role=role, block=index,
                in_features=ws[1], out_features=ws[0],
                weight=w.name if isinstance(w, fx.Node) else "", bias=b_.name if isinstance(b_, fx.Node) else None,
                tokens=_tokens(linear_input(lin)), stream=_stream(lin, streams),
            ))
        kinds = {i.stream for i in infos if i.tokens > 1}
        if not ({"image", "text"} <= kinds):
            for i in infos:
                i.stream = "joint"
        blocks.append(BlockInfo(index=index, path=path, linears=infos, tokens=facts.tokens, hidden=facts.hidden))
    if rb is not None and streams.reason:
        rb.details["grid_reason"] = streams.reason
    fxdit_meta(gm)["output_tokens"] = output_tokens(gm, streams)
    return blocks, streams.grid


@declares(reads=("attention_sites", "position_ids", "carried_tokens"),
          produces=("attention_sites", "block_paths", "blocks", "token_grid", "token_grid_reason", "output_tokens"))
def find_blocks(gm: fx.GraphModule, cfg: Any = None) -> PassReport:
    """Record the transformer blocks, their linears' roles and the token grid; the graph is left unchanged.

    Args:
        gm: a Dynamo graph.
        cfg: the :class:`~fxdit.config.FxditConfig` (``attention.grid`` overrides the inferred grid).

    Returns:
        A report: ``matched`` = blocks found; ``details`` = linears per role, the grid and its source.
    """
    rb = ReportBuilder("find_blocks", gm, log)
    blocks, grid = analyse_blocks(gm, cfg, rb)
    by_name = {n.name: n for n in gm.graph.nodes}
    for b in blocks:
        for info in b.linears:
            node_meta(by_name[info.node])["linear"] = info
    state = fxdit_meta(gm)
    state["blocks"] = blocks
    state["token_grid"] = grid
    state["token_grid_reason"] = rb.details.get("grid_reason", "") if grid is None else ""
    rb.matched = len(blocks)
    roles: dict[str, int] = {}
    for b in blocks:
        for info in b.linears:
            roles[info.role] = roles.get(info.role, 0) + 1
    rb.details.update({"roles": roles, "token_grid": tuple(grid.shape) if grid is not None else None,
                       "grid_source": grid.source if grid is not None else None})
    if not blocks and state.get("attention_sites"):
        rb.skip("attention sites outside any indexed module list")
    return rb.build()

