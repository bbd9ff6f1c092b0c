"""find_attention: every attention site of a graph, as :class:`~fxdit.passes._records.AttentionSite` records.

Analysis only: the graph is not changed. Two families of call forms are recognised, both as data:

* fused SDPA calls (:data:`SDPA_TARGETS`), whose arguments are normalised with one parameter table
  (:data:`SDPA_PARAMS`: name, position, default), so the positional form (DiT, PixArt, SD3) and the keyword
  form (Flux, Wan, HunyuanVideo) are the same code;
* the unfused chain ``softmax(q @ kᵀ · scale [+ mask]) @ v`` (:data:`UNFUSED_CHAIN`): one row per step, each
  listing the node kinds allowed there, optional steps and what the step records. ``@`` may be ``matmul``,
  ``torch.bmm`` or ``.matmul``; the scores may also be ``torch.baddbmm(mask_or_empty, q, kᵀ, beta=0|1,
  alpha=scale)`` (diffusers' classic ``AttnProcessor``); kᵀ may be ``transpose(-2, -1)``, ``transpose(-1, -2)``,
  a permute swapping the last two dims or ``.mT``; the scale may be ``*`` or ``/`` on the scores or on q
  (``"unfused_prescaled"``).

Spans come from the token :class:`~fxdit.passes._dataflow.Layout` of q and k (see :mod:`._dataflow`): a
joint sequence built by ``torch.cat`` of text and image tokens gives ``text_span``/``image_span``
(``span_source="cat"``); image-only queries with image keys are ``"self"``; image queries with keys of another
sequence are ``"cross"``; anything else is ``"unknown"`` (rewriting passes leave such sites dense).

Results: ``fxdit_meta(gm)["attention_sites"]`` (graph order), ``node.meta["fxdit"]["attention"]`` on each
site's output node, and ``fxdit_meta(gm)["block_paths"]`` (the block module paths the sites' ``block`` index
refers to).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.fx as fx
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._dataflow import Layout, Streams, block_index_map, block_paths, kind, shape_of, token_streams
from fxdit.passes._fx_utils import fake_value, fxdit_meta, node_meta
from fxdit.passes._records import AttentionSite
from fxdit.passes._unfused import UNFUSED_CHAIN, match_unfused, scalar

__all__ = ["find_attention", "SDPA_PARAMS", "UNFUSED_CHAIN", "normalise_sdpa", "match_unfused"]

log = logging.getLogger(__name__)

#: SDPA's parameters: (name, default) in positional order (``torch.nn.functional.scaled_dot_product_attention``).
SDPA_PARAMS: tuple[tuple[str, Any], ...] = (
    ("query", None),
    ("key", None),
    ("value", None),
    ("attn_mask", None),
    ("dropout_p", 0.0),
    ("is_causal", False),
    ("scale", None),
    ("enable_gqa", False),
)


def normalise_sdpa(node: fx.Node) -> tuple[dict[str, Any], str]:
    """The SDPA call's arguments by parameter name (defaults filled in) and its form.

    Returns:
        ``(params, form)`` with form ``"sdpa_positional"`` when q is passed positionally, else
        ``"sdpa_keyword"``.
    """
    params = {name: default for name, default in SDPA_PARAMS}
    for (name, _), value in zip(SDPA_PARAMS, node.args):
        params[name] = value
    for name, value in node.kwargs.items():
        if name in params:
            params[name] = value
    form = "sdpa_positional" if node.args else "sdpa_keyword"
    return params, form


def _mask_kind(mask: Any) -> str:
    if not isinstance(mask, fx.Node):
        return "none"
    val = fake_value(mask)
    if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
        return "bool"
    return "float"


def _spans(q_lay: Layout | None, k_lay: Layout | None, q_len: int, kv_len: int, q_dim: int) -> dict[str, Any]:
    """Spans, cross flag and span source of a site from the layouts of q and k."""
    unknown = {"span_source": "unknown", "cross": kv_len != q_len}
    if q_lay is None or q_lay.dim != q_dim:
        return unknown
    q_spans = q_lay.spans()
    same = k_lay is not None and k_lay.merged() == q_lay.merged()
    if not same:
        k_streams = k_lay.streams if k_lay is not None else frozenset()
        if q_lay.streams == {"image"} and k_lay is not None and k_lay.dim == q_lay.dim:
            k_spans = k_lay.spans()
            k_img = k_spans.get("image", [])
            others = sorted(r for st, runs in k_spans.items() if st != "image" for r in runs)
            if (len(k_img) == 1 and k_img[0][1] - k_img[0][0] == q_len and others
                    and "unknown" not in k_spans):
                # image queries over the joint sequence of the same image tokens and text (or learned) tokens
                return {"span_source": "joint_kv", "image_span": (0, q_len), "kv_image_span": k_img[0],
                        "global_spans": tuple(_join_runs(others))}
        if q_lay.streams == {"image"} and (kv_len != q_len or k_streams - {"image"}):
            return {"span_source": "cross", "cross": True, "image_span": (0, q_len)}
        return unknown
    if "ragged" in q_spans:
        return {"span_source": "ragged", "cross": False}
    if "unknown" in q_spans:
        return unknown
    img = q_spans.get("image", [])
    if len(img) > 1:
        return unknown
    # Every token that is not an image token (text, learned/register tokens) is a global token of the joint
    # sequence; its runs may lie on either side of the image tokens.
    others = sorted(r for s, runs in q_spans.items() if s != "image" for r in runs)
    joined = _join_runs(others)
    text = joined[0] if len(joined) == 1 else None
    if img and not others:
        return {"span_source": "self", "image_span": img[0]}
    if img:
        return {"span_source": "cat", "image_span": img[0], "text_span": text, "global_spans": tuple(joined)}
    if others:
        return {"span_source": "text", "text_span": text, "global_spans": tuple(joined)}
    return unknown


def _join_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``(start, stop)`` runs with touching runs joined."""
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _site(node: fx.Node, form: str, nodes: tuple[str, ...], q: fx.Node, k: fx.Node, v: fx.Node, *,
          mask: Any, scale: float | None, dropout: Any, causal: Any, gqa: Any, streams: Streams) -> AttentionSite | str:
    qs, ks = shape_of(q), shape_of(k)
    if qs is None or ks is None or len(qs) not in (3, 4) or len(ks) != len(qs):
        return "q/k shapes unknown or not 3-D/4-D"
    if len(qs) == 4:
        batch, heads, q_len, head_dim = qs
        kv_heads, kv_len = ks[1], ks[2]
        layout = "BHSD"
    else:
        # Heads folded into the batch (diffusers' classic processors): the batch is the latent input's.
        bh, q_len, head_dim = qs
        kv_len = ks[1]
        layout = "(BH)SD"
        img = next((n for n in node.graph.nodes if n.name == streams.image_input), None)
        b = (shape_of(img) or (0,))[0] if img is not None else 0
        if b and bh % b == 0 and ks[0] % b == 0:
            batch, heads, kv_heads = b, bh // b, ks[0] // b
        else:
            batch, heads, kv_heads = bh, 1, 1
    val = fake_value(q)
    dtype = str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else "float32"
    span = _spans(streams.layout(q), streams.layout(k), q_len, kv_len, len(qs) - 2)
    return AttentionSite(
        node=node.name, form=form, nodes=nodes, q=q.name, k=k.name, v=v.name,
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        scale=scale, mask=mask.name if isinstance(mask, fx.Node) else None, mask_kind=_mask_kind(mask),
        dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.0,
        causal=bool(causal) if isinstance(causal, bool) else False,
        enable_gqa=bool(gqa) if isinstance(gqa, bool) else False,
        dtype=dtype, layout=layout,
        image_span=span.get("image_span"), text_span=span.get("text_span"),
        global_spans=span.get("global_spans", ()), kv_image_span=span.get("kv_image_span"),
        cross=span.get("cross", False),
        span_source=span["span_source"],
    )


def collect_sites(gm: fx.GraphModule, cfg: Any, rb: ReportBuilder | None = None) -> tuple[list[AttentionSite], Streams]:
    """The attention sites of ``gm`` (graph order) and the token streams they were resolved against."""
    streams = token_streams(gm, cfg)
    sites: list[AttentionSite] = []
    claimed: set[str] = set()
    for node in gm.graph.nodes:
        k = kind(node)
        site: AttentionSite | str | None = None
        if k == "sdpa":
            params, form = normalise_sdpa(node)
            q, key, v = params["query"], params["key"], params["value"]
            if not all(isinstance(x, fx.Node) for x in (q, key, v)):
                site = "SDPA q/k/v are not graph values"
            else:
                scale = params["scale"]
                if scale is not None and scalar(scale) is None:
                    site = "SDPA scale is not a Python number"
                else:
                    site = _site(node, form, (node.name,), q, key, v, mask=params["attn_mask"],
                                 scale=scalar(scale), dropout=params["dropout_p"], causal=params["is_causal"],
                                 gqa=params["enable_gqa"], streams=streams)
        elif k == "flex_attention":
            out = next((u for u in node.users if kind(u) == "getitem" and len(u.args) > 1 and u.args[1] == 0), None)
            q, key, v = (node.args[i] if len(node.args) > i else None for i in range(3))
            if out is None or not all(isinstance(x, fx.Node) for x in (q, key, v)):
                site = "flex_attention output or q/k/v not graph values"
            else:
                site = _site(out, "flex_attention", (node.name, out.name), q, key, v, mask=None, scale=None,
                             dropout=0.0, causal=False, gqa=False, streams=streams)
                if isinstance(site, AttentionSite):
                    # the model's own score_mod and block mask decide what each query sees
                    site = dataclasses.replace(site, mask_kind="flex")
        elif k == "matmul" and node.name not in claimed:
            facts, reason = match_unfused(node)
            if facts is None:
                site = reason or None
            else:
                q, key, v = facts["q"], facts["k"], facts["v"]
                if not all(isinstance(x, fx.Node) for x in (q, key, v)):
                    site = "unfused attention: q/k/v are not graph values"
                else:
                    site = _site(node, facts["form"], facts["nodes"], q, key, v, mask=facts["mask"],
                                 scale=facts["scale"], dropout=0.0, causal=False, gqa=False, streams=streams)
                    if isinstance(site, AttentionSite) and site.layout == "BHSD" and site.heads != site.kv_heads:
                        site = "unfused attention with different q/k head counts"
        if site is None:
            continue
        if isinstance(site, str):
            if rb is not None:
                rb.skip(site, node.name)
            continue
        claimed.update(site.nodes)
        sites.append(site)
    # An unfused chain whose q @ kᵀ matmul was visited before its output matmul cannot double count: the
    # chain is matched from its output (pv) matmul only; drop sites whose output is inside another site.
    inner = {n for s in sites for n in s.nodes if n != s.node}
    sites = [s for s in sites if s.node not in inner]
    return sites, streams


@declares(reads=("position_ids", "carried_tokens"),
          produces=("attention_sites", "block_paths"))
def find_attention(gm: fx.GraphModule, cfg: Any = None) -> PassReport:
    """Record every attention site of ``gm``; the graph itself is left unchanged.

    Args:
        gm: a Dynamo graph (``example_value`` meta) or an aten graph (``val`` meta).
        cfg: the :class:`~fxdit.config.FxditConfig` (only ``attention.grid`` is read, through the token grid).

    Returns:
        A report: ``matched`` = sites found, ``skipped`` = near misses by reason, ``details`` = counts by form
        and span source.
    """
    rb = ReportBuilder("find_attention", gm, log)
    sites, streams = collect_sites(gm, cfg, rb)
    by_name = {n.name: n for n in gm.graph.nodes}
    blocks = block_paths(gm, [by_name[s.node] for s in sites],
                         [by_name[s.node] for s in sites if s.image_span is not None])
    where = block_index_map(gm, blocks)
    for site in sites:
        site.block = where.get(by_name[site.node])
        node_meta(by_name[site.node])["attention"] = site
    state = fxdit_meta(gm)
    state["attention_sites"] = sites
    state["block_paths"] = blocks
    rb.matched = len(sites)
    forms: dict[str, int] = {}
    sources: dict[str, int] = {}
    for s in sites:
        forms[s.form] = forms.get(s.form, 0) + 1
        sources[s.span_source] = sources.get(s.span_source, 0) + 1
    rb.details.update({"forms": forms, "span_sources": sources, "cross": sum(s.cross for s in sites),
                       "blocks": len(blocks)})
    if streams.reason:
        rb.details["streams"] = streams.reason
    return rb.build()

