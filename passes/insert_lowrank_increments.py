"""insert_lowrank_increments: the ICC *cached-step* graph variant.

Each linear in the plan of :func:`~fxdit.passes.plan_cache.plan_cache` is replaced by its cached output plus a
low-rank correction of its input increment (ICC, arXiv 2505.05829)::

    form "x":          Y = Y_c + ((X − X_c)·Bᵀ)·Aᵀ
    form "projcache":  Y = Y_c + (X·Bᵀ − Z_c)·Aᵀ          (Z_c = X_c·Bᵀ recorded at the full step)
    mode "reuse":      Y = Y_c                           (FORA-style baseline)

``X_c``/``Z_c`` and ``Y_c`` become extra graph inputs (per-call: the runtime passes the tensors the last full
step recorded, in the order of :func:`~fxdit.passes.plan_cache.cache_slots`), inserted after the graph's own
inputs and before any lifted constant; ``A`` and ``B`` are lifted constants. A fused qkv linear with separate
q/k/v factors computes one GEMM against the concatenated ``B`` factors, then one per ``A`` factor, whose
outputs are concatenated in the weight's row order; with joint factors it is a single pair. The rest of the
graph (modulation, norms, attention, activations, residuals, embedders) still runs exactly on the approximate
tensors, as in the paper. Linears planned ``exact`` (full-rank factors) stay exact.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._fx_utils import fake_value, finish, fxdit_meta, lift_constant, node_meta, nodes_by_name
from fxdit.passes.plan_cache import cache_slots, entry_factors

from fxdit.config import FxditConfig

__all__ = ["insert_lowrank_increments"]

log = logging.getLogger(__name__)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _fp32(gm: fx.GraphModule, entry: dict, part: str, t: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of factor ``part`` of ``entry``, shared by every graph copy (like :func:`entry_factors`)."""
    holder = fxdit_meta(gm)["cache_factors"]
    key = ("fp32", entry["module"], part)
    if key not in holder.converted:
        holder.converted[key] = t.float().contiguous()
    return holder.converted[key]


def _linear_input(node: fx.Node) -> fx.Node:
    return node.args[0] if node.args else node.kwargs["input"]


def _add_cache_inputs(gm: fx.GraphModule, plan: dict) -> dict[tuple[int, str], fx.Node]:
    """One placeholder per cache slot, after the graph's own inputs and before lifted constants."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    own = [n for n in placeholders if not (n.meta.get("fxdit") or {}).get("constant")]
    nodes = nodes_by_name(gm)
    anchor = own[-1] if own else None
    out: dict[tuple[int, str], fx.Node] = {}
    taken = {n.name for n in gm.graph.nodes}
    for index, kind, shape, _dtype in cache_slots(plan):
        entry = plan["entries"][index]
        like = fake_value(nodes[entry["node"]])
        base = f"icc_{kind}c_{entry['node']}"
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        if anchor is None:
            with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
                ph = gm.graph.placeholder(name)
        else:
            with gm.graph.inserting_after(anchor):
                ph = gm.graph.placeholder(name)
        val = like.new_empty(shape)
        ph.meta["val"] = val
        ph.meta["example_value"] = val
        node_meta(ph)["icc"] = "cache_input"
        out[(index, kind)] = ph
        anchor = ph
    return out


@declares(reads=("cache_plan", "cache_factors"),
          produces=("cache_inserted", "constants"))
def insert_lowrank_increments(gm: fx.GraphModule, cfg: FxditConfig) -> PassReport:
    """Make ``gm`` the cached-step variant; see the module docstring.

    Args:
        gm: a copy of the planned graph (``fxdit_meta(gm)["cache_plan"]``); mutated in place.
        cfg: the fxdit config.

    Returns:
        The report: ``matched`` planned linears, ``rewritten`` linears replaced, ``skipped`` the full-rank ones,
        ``details`` with ``cache_inputs`` (extra inputs per call) and the form.
    """
    rb = ReportBuilder("insert_lowrank_increments", gm, log)
    state = fxdit_meta(gm)
    plan = state.get("cache_plan")
    if plan is None:
        rb.skip("no cache plan")
        return rb.build()
    rb.matched = len(plan["entries"])
    if state.get("cache_inserted"):
        rb.details.update(state["cache_inserted"])
        return rb.build()
    nodes = nodes_by_name(gm)
    inputs = _add_cache_inputs(gm, plan)
    graph = gm.graph
    reuse = plan["mode"] == "reuse"
    for index, entry in enumerate(plan["entries"]):
        node = nodes[entry["node"]]
        if entry["exact"]:
            rb.skip("full-rank factors: exact at cached steps", entry["node"])
            continue
        y_c = inputs[(index, "y")]
        if reuse:
            node.replace_all_uses_with(y_c)
            rb.rewritten += 1
            continue
        bs, as_ = entry_factors(gm, entry)
        b_cat = bs[0] if len(bs) == 1 else torch.cat(bs, dim=0).contiguous()
        fused = plan["form"] == "x" and len(as_) == 1
        # fp16/bf16 models: caches stay in the model's dtype, the increment is accumulated in fp32 (the fused op
        # does so itself; the GEMM chain below gets fp32 factors and fp32 operands, and one cast back at the end).
        low = b_cat.dtype in _LOW_PRECISION and not fused
        if low:
            b_cat, as_ = _fp32(gm, entry, "B", b_cat), [_fp32(gm, entry, f"A{j}", a) for j, a in enumerate(as_)]
        tag = entry["module"]
        b_node = lift_constant(gm, f"icc_B_{tag}", b_cat)
        a_nodes = [lift_constant(gm, f"icc_A{j}_{tag}", a) for j, a in enumerate(as_)]
        x = _linear_input(node)
        created: list[fx.Node] = []
        with graph.inserting_before(node):
            if low:
                x = graph.call_method("float", (x,))
                created.append(x)
            if fused:
                # One factor pair on the input increment: fxdit's op (fused Triton kernel on CUDA; on CPU
                # inductor compiles its decomposition ``addmm(Y_c, (X − X_c)·Bᵀ, Aᵀ)``).
                from fxdit.kernels import ops as _ops  # noqa: F401  (registers fxdit::lowrank_increment)

                y = graph.call_function(torch.ops.fxdit.lowrank_increment.default,
                                        (x, inputs[(index, "x")], y_c, b_node, a_nodes[0]))
                created.append(y)
            else:
                x_c, z_c = inputs.get((index, "x")), inputs.get((index, "z"))
                if low:
                    x_c = x_c if x_c is None else graph.call_method("float", (x_c,))
                    z_c = z_c if z_c is None else graph.call_method("float", (z_c,))
                    created += [n for n in (x_c, z_c) if n is not None]
                if plan["form"] == "projcache":
                    z = graph.call_function(torch._C._nn.linear, (x, b_node))
                    dz = graph.call_function(operator.sub, (z, z_c))
                else:
                    dx = graph.call_function(operator.sub, (x, x_c))
                    z = graph.call_function(torch._C._nn.linear, (dx, b_node))
                    dz = z
                    created.append(dx)
                created += [z, dz] if dz is not z else [z]
                if len(a_nodes) == 1:
                    inc = graph.call_function(torch._C._nn.linear, (dz, a_nodes[0]))
                    created.append(inc)
                else:
                    parts, start = [], 0
                    for a_node, rank in zip(a_nodes, entry["ranks"]):
                        piece = graph.call_function(operator.getitem, (dz, (Ellipsis, slice(start, start + rank))))
                        part = graph.call_function(torch._C._nn.linear, (piece, a_node))
                        parts += [part]
                        created += [piece, part]
                        start += rank
                    inc = graph.call_function(torch.cat, (parts,), {"dim": -1})
                    created.append(inc)
                if low:
                    y32 = graph.call_function(operator.add, (graph.call_method("float", (y_c,)), inc))
                    y = graph.call_method("to", (y32, fake_value(node).dtype))
                    created += [y32.args[0], y32, y]
                else:
                    y = graph.call_function(operator.add, (y_c, inc))
                    created.append(y)
        for n in created:
            node_meta(n)["icc"] = "increment"
        y.meta.update({k: v for k, v in node.meta.items() if k in ("val", "example_value", "nn_module_stack",
                                                                     "stack_trace")})
        node_meta(y)["icc"] = "increment"
        node.replace_all_uses_with(y)
        rb.rewritten += 1
    info = {"cache_inputs": len(inputs), "form": "reuse" if reuse else plan["form"]}
    state["cache_inserted"] = info
    rb.details.update(info)
    finish(gm, bool(inputs))
    return rb.build()
