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

import torch
import torch.fx as fx
from fxdit.kernels import grat_layout as gl
from fxdit.kernels import ops as _ops  # registers torch.ops.fxdit.grouped_attention
from fxdit.kernels import torch_private
from fxdit.passes._base import PassReport, ReportBuilder, declares
from fxdit.passes._fake import FakeValues
from fxdit.passes._fx_utils import (
    fake_value,
    finish,
    fxdit_meta,
    nodes_by_name,
    shape_of,
)
from fxdit.passes._grat_hoist import (
    PER_SITE_PERMUTES,
    Constants,
    SitePlan,
    apply_hoisting,
    index_select,
    plan_hoisting,
    segment_perm,
    sites_device,
)
from fxdit.passes._ops import kind, token_rule
from fxdit.passes._records import AttentionSite, TokenGrid

from fxdit.config import FxditConfig
from fxdit.errors import FxditError

__all__ = ["rewrite_grouped_attention"]

log = logging.getLogger(__name__)

_NAME = "rewrite_grouped_attention"

#: Default group per grid rank (256 tokens, 2 × FlexAttention's 128-token block; grat.md §1).
DEFAULT_GROUPS = {2: (16, 16), 3: (4, 8, 8)}

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
R_FLEX = "flex_attention with the model's own score_mod / block mask stays as is"


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


def _non_unit(shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(x for x in shape if x != 1)


def key_padding_source(mask: fx.Node | None, batch: int, kv_len: int) -> fx.Node | None:
    """The node holding ``mask`` as a key-padding mask (broadcastable to ``[B, 1, 1, S_kv]``): ``mask`` itself, or
    the tensor it was broadcast from over heads and queries (``expand``/``broadcast_to``, views adding unit dims),
    since broadcasting repeats one row of key validity; ``None`` when it is not one."""
    node = mask
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if _key_padding_shape(shape_of(node), batch, kv_len):
            return node
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or shape_of(src) is None:
            return None
        if token_rule(node) == "expand" or getattr(node.target, "__name__", "") == "broadcast_to":
            node = src
        elif kind(node) in ("view", "cast") and _non_unit(shape_of(src)) == _non_unit(shape_of(node)):
            node = src  # a reshape that only adds or drops unit dims keeps the values in order
        else:
            return None
    return None


def _why_not(site: AttentionSite, grid: tuple[int, ...] | None, cfg: FxditConfig,
             nodes: dict[str, fx.Node]) -> str | None:
    """Why ``site`` stays dense (``None`` when it can be rewritten)."""
    att = cfg.attention
    if not att.enabled:
        return R_DENSE
    if att.layers is not None and (site.block is None or site.block not in att.layers):
        return R_LAYER
    if site.form == "flex_attention":
        return R_FLEX
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
        if key_padding_source(mask_node, site.batch, site.kv_len) is None:
            return R_BOOL_MASK
    q_val, v_val = fake_value(nodes.get(site.q)), fake_value(nodes.get(site.v))
    if isinstance(q_val, torch.Tensor) and isinstance(v_val, torch.Tensor):
        reason = _ops.grouped_attention_unsupported(q_val.device, q_val.dtype, q_val.shape[-1], v_val.shape[-1])
        if reason is not None:
            return f"kernel: {reason}"
    return None


def _dense_lowerings(plans: list[SitePlan], nodes: dict[str, fx.Node]) -> dict[str, str]:
    """Site → why its compiled lowering is the dense masked formula (the kernel layer's answer), for such sites."""
    out: dict[str, str] = {}
    for plan in plans:
        q, k, v = (fake_value(nodes.get(name)) for name in (plan.site.q, plan.site.k, plan.site.v))
        if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            reason = _ops.grouped_attention_dense_lowering(q.device, q.dtype, k.dtype, v.dtype)
            if reason is not None:
                out[plan.site.node] = reason
    return out


@declares(reads=("attention_sites", "token_grid", "token_grid_reason"),
          produces=("constants",))
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
    plans: list[SitePlan] = []
    for site, node in live:
        reason = _why_not(site, grid, cfg, nodes)
        if reason == R_NO_GRID and state.get("token_grid_reason"):
            reason = f"{R_NO_GRID}: {state['token_grid_reason']}"
        if reason is not None:
            rb.skip(reason, site.node)
            continue
        plans.append(SitePlan(site, node))
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
    consts = Constants(gm, sites_device(plans))
    meta = FakeValues(gm)

    flow, reason = plan_hoisting(gm, grid_rec, grid, sites, live, plans, nodes)
    hoisted = flow is not None
    if hoisted:
        cost = apply_hoisting(gm, flow, grid_rec, perm, inv, consts, meta)
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


def _rewrite_site(gm: fx.GraphModule, plan: SitePlan, cfg: FxditConfig, grid: tuple[int, ...], group: tuple[int, ...],
                  perm: torch.Tensor, consts: Constants, meta: FakeValues, hoisted: bool) -> fx.Node:
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
        order = consts.vector(("seg", seq, start, False), lambda: segment_perm(seq, start, perm))
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
            g = index_select(graph, x, 2, idx)  # type: ignore[arg-type]
            meta.stamp(g, old, {"grat_permute": "site"})
            return g

        qp = gather(q, order_n)
        kp = qp if k is q else gather(k, kv_order_n)
        vp = qp if v is q else kp if v is k else gather(v, kv_order_n)
        kv_valid = None
        if site.mask is not None:
            source = key_padding_source(nodes[site.mask], site.batch, site.kv_len)
            assert source is not None  # _why_not checked it
            kv_valid = _kv_valid(graph, source, site, consts, kv_order, meta, old)
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
            out = index_select(graph, new, 2, back_n)
            meta.stamp(out, old, {"grat_permute": "site"})
    old.replace_all_uses_with(out)
    graph.erase_node(old)
    return new


def _kv_valid(graph: fx.Graph, mask: fx.Node, site: AttentionSite, consts: Constants, order: torch.Tensor,
              meta: FakeValues, like: fx.Node) -> fx.Node:
    """bool ``[B, S_kv]`` key validity in the op's token order, from a ``[B|1, 1, 1, S_kv]`` key-padding mask."""
    shape = shape_of(mask)
    lead = (1,) * (4 - len(shape)) + tuple(shape)
    flat = graph.call_function(torch.reshape, (mask, (lead[0], site.kv_len)))
    meta.stamp(flat, like)
    if lead[0] != site.batch:
        flat = graph.call_method("expand", (flat, site.batch, site.kv_len))
        meta.stamp(flat, like)
    idx = consts.lift(f"grat_kvorder_{site.kv_len}", order)
    out = index_select(graph, flat, 1, idx)
    meta.stamp(out, like, {"grat_permute": "kv_valid"})
    return out
