"""shard_tokens: context parallelism — shard the image/video tokens over ``torch.distributed`` ranks.

With ``parallel.mode`` ``"halo"`` or ``"ulysses"`` and an initialised process group of more than one rank, the graph
of every rank is rewritten to hold only its band of image tokens between the patch embedding and the unpatchify:

* **Entry**: right after the patch embedding (after GRAT's hoisted permutation when there is one, so the tokens are in
  group order) the stream keeps the rank's contiguous token range: whole *group rows* in group order, or whole token
  rows (``W`` tokens) in raster order when no grouped attention was hoisted. Uneven splits give the first ranks one
  row more. Text/conditioning tokens are never sharded (replicated).
* **Token-wise ops** run on the local band. The token dimension is followed through the graph with the same
  data tables as GRAT's permutation hoisting (:class:`~fxdit.passes._token_flow.TokenFlow`); shape
  constants that mention the token count (``reshape``/``view``/``expand`` sizes, slice bounds and split sizes on the
  token dimension) are rewritten to the local count; tensors that vary over the tokens without coming from the
  stream (positional tables, permuted RoPE tables) are cut to the band where they meet it.
* **Attention**: a GRAT-B site (``fxdit::grouped_attention``, mode ``"grat-b"``) in ``"halo"`` mode becomes
  :func:`fxdit.kernels.halo.halo_grouped_attention` (halo exchange of the neighbouring rows' K/V, local grouped
  attention with a local block mask built from the global adjacency, text queries merged by a log-sum-exp
  all-reduce). GRAT-X, dense self-attention, and every site in ``"ulysses"`` mode become
  :func:`fxdit.kernels.halo.ulysses_attention` (all-to-all over heads). Cross-attention (image queries, keys from
  another sequence) is token-wise and stays as it is.
* **Exit**: where the stream meets an op that is not token-wise (the unpatchify reshape, the graph output) one
  all-gather restores every token on every rank.

Collectives are ``torch.distributed``'s functional collectives, called from plain functions inserted as graph nodes,
so the graph stays whole: no graph break, and inductor compiles them (also on CPU with gloo).

The pass is all-or-nothing per graph: anything it cannot shard (a masked or causal self-attention, a per-site GRAT
permutation, a read of the token count, a split that cuts the band...) leaves the graph replicated (every rank
computes everything), with the reason in the report. Every rank sees the same graph and takes the same decision, so
the collectives stay matched. Caches (ICC) are planned after this pass and therefore hold local tokens only.

Report details: ``rank``, ``world``, ``mode``, ``rows`` (rows and tokens per row), ``bands`` (token range per rank),
``halo_sites``, ``ulysses_sites``, ``exits``, ``sides`` and ``bytes_per_layer`` (what this rank hands to
collectives per attention site, by kind).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx
from fxdit.kernels import grat_layout as gl
from fxdit.kernels import halo, torch_private
from fxdit.kernels import ops as _ops  # noqa: F401 - registers torch.ops.fxdit.grouped_attention
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._fake import FakeValues
from fxdit.passes._fx_utils import fake_value, finish, fxdit_meta, lift_constant, nodes_by_name, shape_of
from fxdit.passes._ops import token_rule
from fxdit.passes._records import AttentionSite, TokenGrid
from fxdit.passes._shard_shapes import rewrite_shapes
from fxdit.passes._token_flow import (
    NotTokenWise,
    TokenFlow,
    op_key,
)

from fxdit.config import FxditConfig

__all__ = ["shard_tokens"]

log = logging.getLogger(__name__)

_NAME = "shard_tokens"

R_OFF = "parallel.mode is 'none'"
R_NO_DIST = "torch.distributed is not available or not initialised"
R_ONE_RANK = "process group has one rank"
R_DONE = "graph already sharded"
R_NO_GRID = "no token grid"
R_NO_ENTRY = "no patch-embedding node to shard after"
R_PER_SITE = "grouped attention permutes per site (not hoisted): no group-ordered stream to shard"
R_ROWS = "fewer rows than ranks"
R_MASK = "masked, causal or dropout self-attention cannot be sharded"
R_FLEX = "flex_attention sites: the model's block mask covers the whole sequence"
R_KV_VALID = "grouped attention with a key-padding mask (kv_valid) cannot be sharded"
R_HEADS = "heads not divisible by the number of ranks (Ulysses)"
R_SHAPES = "token count in a shape argument could not be rewritten"


def _grouped_op() -> Any:
    return torch.ops.fxdit.grouped_attention.default


class _ShardFlow(TokenFlow):
    """The GRAT token flow, extended to the nodes GRAT's rewrite added (contiguous copies and the grouped op)."""

    def _rule(self, node: fx.Node) -> Any:
        key = op_key(node)
        if key is torch.clone:
            t = self._t(node.args[0])
            if not isinstance(t, tuple):
                raise NotTokenWise("clone of a non-stream value")
            return t
        if key is _grouped_op():
            tq, tk, tv = (self._t(a) for a in node.args[:3])
            if tq is None or not (tq == tk == tv) or tq[0] != 2:
                raise NotTokenWise("grouped attention with q/k/v out of the stream")
            return tq
        if token_rule(node) == "metadata" and any(self._t(a) is not None for a in node.all_input_nodes):
            self.flow.failure = f"{node.name} reads the size of the token stream"
            return None
        return super()._rule(node)


def _process_group(cfg: FxditConfig) -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not dist.is_available() or not dist.is_initialized():
        return None
    return cfg.parallel.group if cfg.parallel.group is not None else dist.group.WORLD


def _entry(gm: fx.GraphModule, grid_rec: TokenGrid | None, nodes: dict[str, fx.Node], n: int,
           grouped: list[fx.Node]) -> tuple[fx.Node | None, int, str]:
    """The node after which the stream is sharded, its token dim, and whether it is in group order."""
    if grouped:
        entry = next((x for x in gm.graph.nodes
                      if x.meta.get("fxdit", {}).get("grat_permute") == "entry"), None)
        if entry is None:
            return None, 0, R_PER_SITE
        return entry, int(entry.args[1]), ""
    if grid_rec is None or grid_rec.patch_node is None or grid_rec.patch_node not in nodes:
        return None, 0, R_NO_ENTRY
    entry = nodes[grid_rec.patch_node]
    shape = shape_of(entry)
    if shape is None:
        return None, 0, R_NO_ENTRY
    dims = [i for i, s in enumerate(shape) if s == n]
    if not dims:
        return None, 0, R_NO_ENTRY
    return entry, (1 if (1 in dims and len(shape) == 3) else dims[0]), ""


def _encode_tables(full: torch.Tensor, partial: torch.Tensor) -> list[torch.Tensor]:
    """BlockMask tables (FlexAttention's format, int32 ``[1, 1, Qb(, Kb)]``) from block flags."""
    out = []
    for flags in (partial, full):
        num = flags.sum(-1).to(torch.int32)
        idx = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        out += [num[None, None].contiguous(), idx[None, None].contiguous()]
    return out


@declares(reads=("attention_sites", "token_grid"),
          produces=("sharded", "constants"))
def shard_tokens(gm: fx.GraphModule, cfg: FxditConfig) -> PassReport:
    """Shard the image tokens of ``gm`` over the ranks of ``cfg.parallel.group`` (see the module docstring).

    Args:
        gm: the graph (mutated in place), after ``rewrite_grouped_attention``.
        cfg: the backend configuration; ``cfg.parallel`` and ``cfg.attention.radius`` are read.

    Returns:
        The report: attention sites matched/rewritten, skip reasons, and ``details``.
    """
    rb = ReportBuilder(_NAME, gm, log)
    state = fxdit_meta(gm)
    par = cfg.parallel
    if not par.enabled:
        return rb.build()
    if state.get("sharded"):
        rb.skip(R_DONE)
        return rb.build()
    pg = _process_group(cfg)
    if pg is None:
        rb.skip(R_NO_DIST)
        return rb.build()
    import torch.distributed as dist

    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if world < 2:
        rb.skip(R_ONE_RANK)
        return rb.build()
    group_name = pg.group_name
    FakeValues.refresh(gm)  # nodes added by earlier rewrites may lack FakeTensor values

    nodes = nodes_by_name(gm)
    grid_rec: TokenGrid | None = state.get("token_grid")
    grid = tuple(cfg.attention.grid) if cfg.attention.grid is not None else (grid_rec.shape if grid_rec else None)
    if grid is None:
        rb.skip(R_NO_GRID)
        return rb.build()
    grid3 = grid if len(grid) == 3 else (1, *grid)
    n = math.prod(grid3)
    grouped = [x for x in gm.graph.nodes if x.op == "call_function" and x.target is _grouped_op()]
    entry, entry_dim, why = _entry(gm, grid_rec, nodes, n, grouped)
    if entry is None:
        rb.skip(why)
        return rb.build()
    if (shape_of(entry) or (0,) * (entry_dim + 1))[entry_dim] != n:
        rb.skip(R_NO_ENTRY)
        return rb.build()

    # Rows: whole group rows in group order (hoisted GRAT), else whole token rows in raster order.
    if grouped:
        info = grouped[0].meta["fxdit"]["grat"]
        group = tuple(info["group"])
        group3 = group if len(group) == 3 else (1, *group)
        row_grid = (grid3[0] // group3[0], grid3[1] // group3[1])
        row_tokens = group3[0] * group3[1] * grid3[2]
    else:
        group3 = None
        row_grid = (grid3[0], grid3[1])
        row_tokens = grid3[2]
    rows = row_grid[0] * row_grid[1]
    if rows < world:
        rb.skip(R_ROWS)
        return rb.build()
    bands = halo.split_rows(rows, world)
    counts = tuple((b - a) * row_tokens for a, b in bands)
    a_tok, n_loc = bands[rank][0] * row_tokens, counts[rank]
    delta = n - n_loc

    if any(s.form == "flex_attention" for s in (state.get("attention_sites") or [])):
        rb.skip(R_FLEX)
        return rb.build()
    sites = {nodes[s.node]: s for s in (state.get("attention_sites") or []) if s.node in nodes}
    internal = {nodes[m] for s in sites.values() for m in s.nodes if m in nodes and m != s.node}
    flow = _ShardFlow(gm, entry, entry_dim, n, sites, internal, set(), nodes).run()
    if flow.failure is not None:
        rb.skip(f"token stream: {flow.failure}")
        return rb.build()

    # Attention sites in the stream: what each becomes.
    plans: list[tuple[str, fx.Node, Any]] = []
    for node, tok in flow.tok.items():
        if node.op != "call_function":
            continue
        if node.target is _grouped_op():
            rb.matched += 1
            if node.args[10] is not None:
                rb.skip(R_KV_VALID, node.name)
                return rb.build()
            mode = node.meta["fxdit"]["grat"]["mode"]
            # halo exchange needs queries and keys of one sequence; image queries over joint keys use Ulysses
            same_seq = node.args[3] is node.args[4]
            kind = "halo" if (par.mode == "halo" and mode == "grat-b" and same_seq) else "ulysses"
            plans.append((kind, node, None))
        elif node in sites:
            site = sites[node]
            k = nodes.get(site.k)
            if not isinstance(flow.tok.get(k), tuple):
                continue  # cross-attention: keys from another sequence, queries token-wise
            rb.matched += 1
            if site.mask is not None or site.causal or (site.dropout or 0) > 0:
                rb.skip(R_MASK, node.name)
                return rb.build()
            plans.append(("ulysses", node, site))
    for kind, node, site in plans:
        if kind != "ulysses":
            continue
        hq = shape_of(node.args[0] if site is None else nodes[site.q])[1]
        hk = shape_of(node.args[1] if site is None else nodes[site.k])[1]
        if hq % world or hk % world:
            rb.skip(R_HEADS, node.name)
            return rb.build()

    graph = gm.graph
    try:
        rewrite_shapes(flow, delta, n)
    except NotTokenWise as exc:
        rb.skip(f"{R_SHAPES}: {exc}")
        return rb.build()

    # Entry: keep the band.
    with graph.inserting_after(entry):
        local = graph.call_function(halo.take_local, (entry, entry_dim, 0, a_tok, n_loc, n))
    entry.replace_all_uses_with(local, delete_user_cb=lambda u: u is not local)

    # Side tensors: cut to the band where they meet the stream.
    cut: dict[tuple, fx.Node] = {}
    for user, arg, dim, off, _size in flow.sides:
        key = (arg, dim, off)
        if key not in cut:
            with graph.inserting_before(user):
                cut[key] = graph.call_function(halo.take_local, (arg, dim, off, a_tok, n_loc, n))
        user.replace_input_with(arg, cut[key])

    # Attention.
    consts = state.get("constants", {})
    bytes_per_layer: dict[str, int] = {}
    halo_sites = ulysses_sites = 0
    needs = None
    replaced: dict[fx.Node, fx.Node] = {}
    for kind, node, site in plans:
        if kind == "halo":
            if needs is None:
                needs = tuple(halo.halo_rows(b, row_grid, cfg.attention.radius) for b in bands)
                hplans = [halo.halo_plan(r, bands, needs, row_tokens) for r in range(world)]
                exchange = any(p.sent_tokens for p in hplans)
            new = _halo_site(gm, node, flow.tok[node], consts, hplans[rank], exchange, n, rank, group_name)
            k_shape = shape_of(node.args[1])
            bytes_per_layer["halo"] = halo.halo_bytes(hplans[rank], k_shape[0], k_shape[1], k_shape[3],
                                                       fake_value(node.args[1]).element_size())
            halo_sites += 1
        else:
            new = _ulysses_site(gm, node, site, flow.tok[node], nodes, counts, rank, group_name)
            q_shape = shape_of(node.args[0] if site is None else nodes[site.q])
            bytes_per_layer["ulysses"] = halo.ulysses_bytes(n_loc, world, q_shape[0], q_shape[1], q_shape[3],
                                                            fake_value(node).element_size())
            ulysses_sites += 1
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        replaced[node] = new
        rb.rewritten += 1

    # Exits: all-gather the tokens.
    exits = []
    for a0, users in flow.exits.items():
        d, off = flow.tok[a0]
        a = replaced.get(a0, a0)
        with graph.inserting_after(a):
            g = graph.call_function(halo.gather_tokens, (a, d, off, counts, rank, group_name))
        for user, why in users:
            user.replace_input_with(a, g)
            exits.append(f"{a.name} -> {user.name}: {why}")

    finish(gm, True)
    FakeValues.refresh(gm)
    state["sharded"] = True
    rb.details.update({
        "rank": rank, "world": world, "mode": par.mode, "rows": (rows, row_tokens),
        "bands": tuple((b[0] * row_tokens, b[1] * row_tokens) for b in bands), "halo_sites": halo_sites,
        "ulysses_sites": ulysses_sites, "exits": sorted(set(exits)), "sides": len(cut),
        "bytes_per_layer": bytes_per_layer, "collectives": "functional (torch.ops._c10d_functional), in graph",
    })
    torch_private.counters()["fxdit"]["sharded_attention_sites"] += rb.rewritten
    return rb.build()


# ---------------------------------------------------------------------------------------------------------------


def _halo_site(gm: fx.GraphModule, node: fx.Node, tok: tuple[int, int], consts: dict[str, torch.Tensor],
               plan: halo.HaloPlan, exchange: bool, n: int, rank: int, group_name: str) -> fx.Node:
    q, k, v, qg, _kg, adj_n = node.args[:6]
    scale, block_size = float(node.args[11]), int(node.args[12])
    start = tok[1]
    cls = consts[qg.name]
    adj = consts[adj_n.name]
    a, b = plan.own
    c, d = plan.need
    q_cls = cls[start + a:start + b].contiguous()
    text = torch.cat([cls[:start], cls[start + n:]])
    kv_cls = torch.cat([cls[start + c:start + d], text]).contiguous()
    full, partial = gl.block_flags(q_cls, kv_cls, adj, block_size)
    tables = _encode_tables(full, partial)
    tag = f"halo_{node.name}_r{rank}"
    qn = lift_constant(gm, f"{tag}_qcls", q_cls)
    kn = lift_constant(gm, f"{tag}_kvcls", kv_cls)
    tn = [lift_constant(gm, f"{tag}_{nm}", t) for nm, t in zip(
        ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"), tables)]
    send = plan.send if exchange else ()
    recv = plan.recv if exchange else ()
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(halo.halo_grouped_attention, (
            q, k, v, qn, kn, adj_n, *tn, scale, block_size, start, b - a, send, recv, plan.before if exchange else 0,
            rank, group_name))
    new.meta["fxdit"] = {"parallel": {"kind": "halo", "own": plan.own, "need": plan.need,
                                      "sent_tokens": plan.sent_tokens}, **node.meta.get("fxdit", {})}
    return new


def _ulysses_site(gm: fx.GraphModule, node: fx.Node, site: AttentionSite | None, tok: tuple[int, int],
                  nodes: dict[str, fx.Node], counts: tuple[int, ...], rank: int, group_name: str) -> fx.Node:
    if site is None:  # fxdit::grouped_attention over the whole sequence (GRAT-X, or any GRAT in ulysses mode)
        q, k, v = node.args[:3]
        tables = list(node.args[3:10])
        scale, block_size = float(node.args[11]), int(node.args[12])
    else:
        q, k, v = nodes[site.q], nodes[site.k], nodes[site.v]
        tables, scale, block_size = [], site.scale, 0
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(halo.ulysses_attention, (
            q, k, v, tables, scale, block_size, tok[1], counts, rank, group_name))
    new.meta["fxdit"] = {"parallel": {"kind": "ulysses"}, **node.meta.get("fxdit", {})}
    return new


# ---------------------------------------------------------------------------------------------------------------
# FakeTensor meta after the rewrite
# ---------------------------------------------------------------------------------------------------------------


