"""record_linear_caches: the ICC *full-step* graph variant, which also outputs what cached steps need.

Reads the plan of :func:`~fxdit.passes.plan_cache.plan_cache` and extends the graph's output tuple, after the
user outputs, with one tensor per cache slot (:func:`~fxdit.passes.plan_cache.cache_slots`): per cached linear
its input ``X`` (form ``"x"``) or ``Z = X·Bᵀ`` (form ``"projcache"``, one new low-rank product per linear,
``B`` lifted as a constant) and its output ``Y`` (bias included); only ``Y`` in ``"reuse"`` mode. Nothing else
changes: the user outputs are computed exactly as before. Linears whose factors are full rank (``exact`` in the
plan) record nothing; they stay exact at cached steps.

The runtime (:mod:`fxdit.runtime`) keeps those extra outputs between calls and returns only the user outputs.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._fx_utils import finish, fxdit_meta, lift_constant, node_meta, nodes_by_name
from fxdit.passes.plan_cache import cache_slots, entry_factors

from fxdit.config import FxditConfig

__all__ = ["record_linear_caches"]

log = logging.getLogger(__name__)


def _linear_input(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


@declares(reads=("cache_plan",),
          produces=("cache_recorded", "constants"))
def record_linear_caches(gm: fx.GraphModule, cfg: FxditConfig) -> PassReport:
    """Make ``gm`` the full-step variant: append each cached linear's cache tensors to the outputs.

    Args:
        gm: a copy of the planned graph (``fxdit_meta(gm)["cache_plan"]``); mutated in place.
        cfg: the fxdit config.

    Returns:
        The report: ``matched`` planned linears, ``rewritten`` those that record caches, ``details`` with
        ``user_outputs`` (how many outputs are the user's) and ``cache_outputs``.
    """
    rb = ReportBuilder("record_linear_caches", gm, log)
    state = fxdit_meta(gm)
    plan = state.get("cache_plan")
    if plan is None:
        rb.skip("no cache plan")
        return rb.build()
    rb.matched = len(plan["entries"])
    if state.get("cache_recorded"):
        rb.details.update(state["cache_recorded"])
        return rb.build()
    nodes = nodes_by_name(gm)
    output = gm.graph.output_node()
    user = output.args[0]
    as_tuple = isinstance(user, (tuple, list))
    user_outputs = tuple(user) if as_tuple else (user,)
    extra: list[fx.Node] = []
    slots = cache_slots(plan)
    done: set[int] = set()
    z_nodes: dict[int, fx.Node] = {}
    for index, kind, _shape, _dtype in slots:
        entry = plan["entries"][index]
        node = nodes[entry["node"]]
        if kind == "x":
            extra.append(_linear_input(node))
        elif kind == "y":
            extra.append(node)
        else:  # "z": X·Bᵀ with the concatenated B factors
            if index not in z_nodes:
                bs, _ = entry_factors(gm, entry)
                b_cat = bs[0] if len(bs) == 1 else torch.cat(bs, dim=0).contiguous()
                b_node = lift_constant(gm, f"icc_B_{entry['module']}", b_cat)
                with gm.graph.inserting_after(node):
                    z = gm.graph.call_function(torch._C._nn.linear, (_linear_input(node), b_node))
                node_meta(z)["icc"] = "record_z"
                z_nodes[index] = z
            extra.append(z_nodes[index])
        if index not in done:
            done.add(index)
            node_meta(node)["icc"] = "recorded"
            rb.rewritten += 1
    for e in plan["entries"]:
        if e["exact"]:
            rb.skip("full-rank factors: exact at cached steps", e["node"])
    output.args = (tuple(user_outputs) + tuple(extra),)
    info = {"user_outputs": len(user_outputs), "cache_outputs": len(extra), "user_as_tuple": as_tuple}
    state["cache_recorded"] = info
    rb.details.update(info)
    finish(gm, bool(extra))
    return rb.build()
