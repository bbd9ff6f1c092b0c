"""Plumbing of the GRAT rewrite: lifted constants, per-site plans and the hoisted group permutation.

Hoisting puts the image tokens in group-major order once, right after the patch embedding, and restores raster
order where the stream meets an op that is not token-wise (see :mod:`fxdit.passes._token_flow`); it is used only
when every rewritten site sees its q, k, v in permuted order and it needs fewer gathers than permuting per site.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from fxdit.passes._fake import FakeValues
from fxdit.passes._fx_utils import fake_value, insert_after, lift_constant, node_meta, shape_of
from fxdit.passes._records import AttentionSite, TokenGrid
from fxdit.passes._token_flow import Flow, NotTokenWise, TokenFlow, is_side_view

__all__ = ["PER_SITE_PERMUTES", "SitePlan", "Constants", "sites_device", "segment_perm", "index_select",
           "plan_hoisting", "apply_hoisting"]

#: Gathers one site costs when it permutes by itself: q, k, v and the output.
PER_SITE_PERMUTES = 4


@dataclass
class SitePlan:
    site: AttentionSite
    node: fx.Node


class Constants:
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


def sites_device(plans: list[SitePlan]) -> torch.device:
    """The device of the first rewritten site's query (every site of one graph runs on one device)."""
    for plan in plans:
        for arg in (*plan.node.args, *plan.node.kwargs.values()):
            val = arg.meta.get("val", arg.meta.get("example_value")) if isinstance(arg, fx.Node) else None
            if isinstance(val, torch.Tensor):
                return val.device
    return torch.device("cpu")


def segment_perm(size: int, offset: int, perm: torch.Tensor) -> torch.Tensor:
    """int64 ``[size]``: identity outside ``[offset, offset + N)``, ``offset + perm`` inside."""
    out = torch.arange(size, dtype=torch.int64)
    out[offset:offset + perm.numel()] = offset + perm
    return out


def plan_hoisting(gm: fx.GraphModule, grid_rec: TokenGrid | None, grid: tuple[int, ...],
                   sites: list[AttentionSite], live: list[tuple[AttentionSite, fx.Node]], plans: list[SitePlan],
                   nodes: dict[str, fx.Node]) -> tuple[Flow | None, str]:
    """Follow the token stream; return the flow when hoisting is valid and saves gathers, else the reason."""
    n = math.prod(grid)
    if any(p.site.span_source == "joint_kv" for p in plans):
        return None, "image queries over joint image+text keys: permuted per site"
    if grid_rec is not None and grid_rec.patch_node is not None:
        entry = nodes.get(grid_rec.patch_node)
    else:
        entry = token_input(gm, n, {p.site.batch for p in plans})
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
    flow = TokenFlow(gm, entry, entry_dim, n, site_nodes, internal, rewrite, nodes).run()
    if flow.failure is not None:
        return None, flow.failure
    for p in plans:
        # every rewritten site must see the permuted stream: a site fed from elsewhere (e.g. a buffer the stream
        # was written into after leaving it in raster order) keeps per-site permutes
        if p.node not in flow.tok:
            return None, f"site {p.site.node} does not read the permuted token stream"
    cost = hoist_cost(flow)
    if cost >= PER_SITE_PERMUTES * len(plans):
        return None, (f"hoisting needs {cost} gathers (entry, {len(flow.exits)} exits, sides), per-site needs "
                      f"{PER_SITE_PERMUTES * len(plans)}")
    return flow, ""


def token_input(gm: fx.GraphModule, n: int, batches: set[int]) -> fx.Node | None:
    """The graph input that already is the token sequence ``(B, N, C)`` (packed latents, e.g. Flux), if unique."""
    found = [p for p in gm.graph.nodes if p.op == "placeholder" and not node_meta(p).get("constant")
             and (s := shape_of(p)) is not None and len(s) == 3 and s[1] == n and s[0] in batches]
    return found[0] if len(found) == 1 else None


def side_root(arg: fx.Node, dim: int) -> tuple[fx.Node, int, list[fx.Node]]:
    """Trace a side tensor back through pure views to the tensor that first carries the token dim."""
    chain: list[fx.Node] = []
    node, d = arg, dim
    while is_side_view(node) and node.args and isinstance(node.args[0], fx.Node):
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
            probe = TokenFlow.__new__(TokenFlow)
            probe.flow = Flow(tok={src: (c, 0)})
            probe.n = shape[d]
            probe.nodes = {}
            try:
                got = probe._rule(node)
            except (NotTokenWise, Exception):  # noqa: BLE001 - any failure stops the walk
                got = None
            if got == (d, 0) and not probe.flow.sides:
                found = c
                break
        if found is None:
            break
        chain.append(node)
        node, d = src, found
    return node, d, list(reversed(chain))


def hoist_cost(flow: Flow) -> int:
    roots = {(side_root(arg, dim)[0], side_root(arg, dim)[1], off) for _, arg, dim, off, _ in flow.sides}
    return 1 + len(flow.exits) + len(roots)


def index_select(graph: fx.Graph, x: fx.Node, dim: int, idx: fx.Node) -> fx.Node:
    return graph.call_function(torch.index_select, (x, dim, idx))


def apply_hoisting(gm: fx.GraphModule, flow: Flow, grid_rec: TokenGrid, perm: torch.Tensor, inv: torch.Tensor,
                    consts: Constants, meta: FakeValues) -> int:
    """Insert the entry gather, the side gathers and the exit gathers; return how many were inserted."""
    graph = gm.graph
    entry = flow.entry
    d0 = flow.tok[entry][0]
    count = 0

    def seg(size: int, offset: int, inverse: bool) -> fx.Node:
        key = ("seg", size, offset, inverse)
        t = consts.vector(key, lambda: segment_perm(size, offset, inv if inverse else perm))
        return consts.lift(f"grat_{'inv' if inverse else 'perm'}_{size}_{offset}", t)

    # Exits first (they refer to stream nodes, whose values are permuted once the entry is in place).
    for a, users in flow.exits.items():
        d, off = flow.tok[a]
        size = shape_of(a)[d]
        idx = seg(size, off, True)
        with insert_after(graph, a):
            u = index_select(graph, a, d, idx)
        meta.stamp(u, a, {"grat_permute": "exit"})
        count += 1
        for user, _ in users:
            user.replace_input_with(a, u)

    # Side tensors: permute each source once, re-issue the views on the permuted copy.
    side_done: dict[tuple, fx.Node] = {}
    chain_done: dict[tuple, fx.Node] = {}
    for user, arg, dim, off, size in flow.sides:
        root, rdim, chain = side_root(arg, dim)
        rkey = (root, rdim, off)
        if rkey not in side_done:
            rsize = shape_of(root)[rdim]
            idx = seg(rsize, off, False)
            with insert_after(graph, root):
                p = index_select(graph, root, rdim, idx)
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
    with insert_after(graph, entry):
        p = index_select(graph, entry, d0, idx)
    meta.stamp(p, entry, {"grat_permute": "entry"})
    entry.replace_all_uses_with(p, delete_user_cb=lambda u: u is not p)
    count += 1
    return count
