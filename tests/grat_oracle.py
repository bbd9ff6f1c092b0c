"""Test oracle for grouped attention: eager SDPA with the dense grouped mask, built from ``grat_layout`` alone.

``capture`` records the Dynamo graph of a model (no inductor) and runs the analysis passes; ``planned_sites`` says,
per attention call in graph (= eager call) order, whether the rewrite pass takes it; ``grouped_sdpa`` patches
``torch.nn.functional.scaled_dot_product_attention`` so that exactly those calls apply the dense boolean mask of
the grouped pattern, in the model's own token order (raster image tokens, text where the model puts it), AND-ed
with the model's key-padding mask. Nothing here permutes tokens or calls the fxdit op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from fxdit.kernels import grat_layout as gl
from fxdit.passes._fx_utils import fxdit_meta, nodes_by_name
from fxdit.passes.pipeline import find_attention, find_blocks
from fxdit.passes.rewrite_grouped_attention import _resolve_grid, _resolve_group, _why_not

from fxdit.config import FxditConfig


def capture(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
            cfg: FxditConfig | None = None) -> tuple[fx.GraphModule, list[Any]]:
    """The single Dynamo graph of ``model(*args, **kwargs)`` with its real example inputs, analysed."""
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def record(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(*args, **(kwargs or {}))
    torch._dynamo.reset()
    assert len(graphs) == 1
    gm, inputs = graphs[0]
    cfg = cfg or FxditConfig()
    find_attention(gm, cfg)
    find_blocks(gm, cfg)
    return gm, inputs


def planned_sites(gm: fx.GraphModule, cfg: FxditConfig) -> list[tuple[Any, str | None]]:
    """``(site, reason)`` per attention site in graph order; ``reason is None`` when the pass rewrites it."""
    state = fxdit_meta(gm)
    grid = _resolve_grid(state.get("token_grid"), cfg)
    nodes = nodes_by_name(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    sites = sorted(state.get("attention_sites") or [], key=lambda s: order[s.node])
    return [(s, _why_not(s, grid, cfg, nodes)) for s in sites]


def site_mask(site: Any, grid: tuple[int, ...], cfg: FxditConfig) -> torch.Tensor:
    """bool ``[S, S]``: the grouped pattern of ``site`` in the model's own token order."""
    group = _resolve_group(grid, cfg)
    layout = gl.SequenceLayout(site.q_len, site.image_span[0], grid, group, cfg.attention.mode,
                               cfg.attention.radius, permuted=False)
    return gl.dense_mask(layout)


@contextlib.contextmanager
def grouped_sdpa(gm: fx.GraphModule, cfg: FxditConfig) -> Iterator[dict[str, int]]:
    """Patch SDPA so the calls the pass rewrites use the dense grouped mask; yields call counters."""
    plans = planned_sites(gm, cfg)
    grid = _resolve_grid(fxdit_meta(gm).get("token_grid"), cfg)
    orig = F.scaled_dot_product_attention
    counts = {"calls": 0, "masked": 0, "expected": len(plans)}

    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = {**dict(zip(names, args)), **kwargs}
        q, k = bound["query"], bound["key"]
        attn_mask = bound.get("attn_mask")
        i = counts["calls"]
        counts["calls"] += 1
        site, reason = plans[i % len(plans)]
        if reason is None:
            assert q.shape[-2] == site.q_len and k.shape[-2] == site.kv_len
            mask = site_mask(site, grid, cfg).to(q.device)
            if attn_mask is not None:
                assert attn_mask.dtype == torch.bool
                mask = mask & attn_mask
            attn_mask = mask
            counts["masked"] += 1
        bound["attn_mask"] = attn_mask
        return orig(**bound)

    torch.nn.functional.scaled_dot_product_attention = wrapper
    try:
        yield counts
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
