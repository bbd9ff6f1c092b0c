"""Token streams of a graph: where the image/video tokens and the text tokens enter, and the token grid.

The grid comes from the graph itself — a patch-embedding conv (also behind a norm, or per frame with the frames
folded into the batch), a reshape patchify, position ids, a position table broadcast over the grid (RoPE), the
unpatchify reshape of the output, or a layout carried from an earlier graph of the model — or from
``attention.grid``. Sources that show a grid must agree. :func:`token_streams` seeds the layouts and runs the
:class:`~fxdit.passes._layout.Propagator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from fxdit.passes._fx_utils import fake_value, fxdit_meta
from fxdit.passes._layout import Layout, Propagator
from fxdit.passes._ops import (
    INPUT_NAME_HINTS,
    arg_of,
    is_param,
    kind,
    ndim,
    permute_dims,
    shape_of,
    tensor_args,
)
from fxdit.passes._records import CarriedTokens, TokenGrid

__all__ = ["Streams", "token_streams", "record_position_ids", "output_tokens"]


@dataclass
class Streams:
    """Where the token streams enter a graph, and every tensor node's :class:`Layout`.

    Attributes:
        image_input: the graph input holding the image/video latents (node name) or ``None``.
        text_inputs: graph inputs holding text tokens (node names).
        grid: the token grid, or ``None`` when the graph does not show it (pass ``attention.grid``).
        layouts: node → layout (by node object; valid for the graph it was computed on).
        reason: why the grid or the image stream could not be found (``""`` when found).
    """

    image_input: str | None
    text_inputs: list[str]
    grid: TokenGrid | None
    layouts: dict[fx.Node, Layout]
    reason: str = ""

    def layout(self, node: Any) -> Layout | None:
        return self.layouts.get(node) if isinstance(node, fx.Node) else None


_CHAIN_KINDS = frozenset({"view", "transpose", "permute", "cast", "mT"})


def _through_chain_back(node: Any) -> Any:
    while isinstance(node, fx.Node) and kind(node) in _CHAIN_KINDS and node.args:
        node = node.args[0]
    return node


def _is_float_input(node: fx.Node) -> bool:
    val = fake_value(node)
    return isinstance(val, torch.Tensor) and val.is_floating_point() and not is_param(node)


_CHANNELS_LAST = -1  # _forward_to_tokens: the conv output permuted to (B, *grid, C), grid not yet merged


#: Ops between a latent input and its patch-embedding conv that keep the latent's spatial layout (a norm over
#: channel groups, a scale, a cast): the conv still shows the token grid.
_LATENT_THROUGH = frozenset({"view", "transpose", "permute", "cast", "mT", "norm", "group_norm", "elementwise",
                             "activation"})


def _latent_source(node: Any, limit: int = 16) -> fx.Node | None:
    """The float graph input a conv's input is computed from through :data:`_LATENT_THROUGH` ops (parameters
    aside), or ``None`` when it mixes in other inputs or other ops."""
    found: fx.Node | None = None
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        if is_param(n):
            continue
        if n.op == "placeholder":
            if not _is_float_input(n) or (found is not None and found is not n):
                return None
            found = n
            continue
        if kind(n) not in _LATENT_THROUGH:
            return None
        stack.extend(a for a in tensor_args(n) if isinstance(fake_value(a), torch.Tensor))
    return found


def _forward_to_tokens(conv: fx.Node, limit: int = 12) -> fx.Node | None:
    """The first node after a patch-embedding conv whose layout is ``(B, N, C)`` with the tokens on dim 1.

    The conv output ``(B, C, *grid)`` is followed through views (the one that merges the grid dims into one
    token dim), transposes, permutes and casts; the token dim is tracked, not guessed from sizes.
    """
    out = shape_of(conv)
    if out is None:
        return None
    n_tok = math.prod(out[2:])
    prefix = math.prod(out[:2])
    frontier: list[tuple[fx.Node, int | None]] = [(conv, None)]
    for _ in range(limit):
        nxt: list[tuple[fx.Node, int | None]] = []
        for n, dim in frontier:
            in_shape = shape_of(n)
            for u in n.users:
                k = kind(u)
                us = shape_of(u)
                if k not in _CHAIN_KINDS or us is None or in_shape is None:
                    continue
                d: int | None = None
                if dim == _CHANNELS_LAST:
                    # (B, *grid, C) from a channels-last permute: the view that merges the grid into one dim
                    if k == "view" and len(us) == 3 and us[1] == n_tok:
                        return u
                    if k != "cast":
                        continue
                    d = _CHANNELS_LAST
                elif dim is None:
                    if k == "permute":
                        dims = permute_dims(u)
                        nd = len(out)
                        if dims is None or list(dims) != [0, *range(2, nd), 1]:
                            continue
                        d = _CHANNELS_LAST
                    elif k == "view":
                        acc = 1
                        for i, size in enumerate(us):
                            if acc == prefix and size == n_tok:
                                d = i
                                break
                            acc *= size
                    elif k == "cast":
                        d = None
                    else:
                        continue
                else:
                    lay = Propagator.step_dim(u, n, in_shape, us, dim)
                    if lay is None:
                        continue
                    d = lay
                if d is not None and len(us) == 3 and d == 1:
                    return u
                nxt.append((u, d))
        frontier = nxt
        if not frontier:
            break
    return None


def _conv_grid(gm: fx.GraphModule) -> tuple[TokenGrid, fx.Node] | None:
    for node in gm.graph.nodes:
        if kind(node) != "conv":
            continue
        src = _latent_source(node.args[0] if node.args else node.kwargs.get("input"))
        if src is None:
            continue
        out = shape_of(node)
        if out is None or len(out) not in (4, 5):
            continue
        spatial = tuple(out[2:])
        frames = _frames_in_batch(src, out)
        shape = (frames or 1, *spatial) if len(spatial) == 2 else spatial
        stride = arg_of(node, 3, "stride", 1)
        if isinstance(stride, int):
            stride = (stride,) * len(spatial)
        patch_node = _forward_to_tokens(node)
        grid = TokenGrid(shape=tuple(int(s) for s in shape), source=f"conv{len(spatial)}d",
                         patch_node=patch_node.name if patch_node is not None else None,
                         patch=tuple(int(s) for s in stride) if isinstance(stride, (list, tuple)) else None,
                         frames_in_batch=frames)
        return grid, src
    return None


def _frames_in_batch(latent: fx.Node, conv_out: Sequence[int]) -> int | None:
    """``F`` when a 2-D patch conv runs on the frames of a 5-D video latent folded into its batch
    (``(B, C, F, H, W) -> (B·F, C, H, W)``), else ``None``."""
    s = shape_of(latent)
    if s is None or len(s) != 5 or len(conv_out) != 4 or conv_out[0] == s[0] or conv_out[0] % s[0]:
        return None
    frames = conv_out[0] // s[0]
    return frames if frames in (s[1], s[2]) and frames > 1 else None


def _einsum_permute(node: fx.Node) -> bool:
    """An ``einsum`` of one operand that only permutes its dims (``"nchpwq->nhwcpq"``)."""
    if kind(node) != "einsum" or len(node.args) != 2 or not isinstance(node.args[0], str):
        return False
    lhs, _, rhs = node.args[0].replace(" ", "").partition("->")
    return bool(rhs) and lhs.isalpha() and len(set(lhs)) == len(lhs) and sorted(lhs) == sorted(rhs)


def _non_overlapping(node: fx.Node) -> bool:
    """An im2col (``F.unfold``) whose patches tile the input: stride equal to the kernel, no padding or dilation."""
    kernel, stride = arg_of(node, 1, "kernel_size"), arg_of(node, 4, "stride", 1)
    dilation, padding = arg_of(node, 2, "dilation", 1), arg_of(node, 3, "padding", 0)
    return _pair(kernel) == _pair(stride) and _pair(dilation) == (1, 1) and _pair(padding) == (0, 0)


def _pair(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _unfold_grid(gm: fx.GraphModule) -> tuple[TokenGrid, fx.Node] | None:
    """Patchify by reshape/permute (or ``unfold``) of a 4-D/5-D latent input into ``(B, N, C·p·p)`` tokens."""
    for node in gm.graph.nodes:
        if node.op != "placeholder" or not _is_float_input(node):
            continue
        s = shape_of(node)
        if s is None or len(s) not in (4, 5):
            continue
        spatial = s[2:]
        frontier = [node]
        for _ in range(10):
            nxt = []
            for n in frontier:
                for u in n.users:
                    if kind(u) not in _CHAIN_KINDS and not (u.op == "call_method" and u.target == "unfold") and not (
                            kind(u) == "im2col" and _non_overlapping(u)) and not _einsum_permute(u):
                        continue
                    us = shape_of(u)
                    if us is not None and len(us) == 3 and us[0] == s[0] and any(
                            kind(w) in ("linear", "output") for w in u.users):
                        n_tok = us[1]
                        grid = _grid_from_tokens(tuple(spatial), n_tok)
                        if grid is not None:
                            shape, patch = grid
                            return TokenGrid(shape=shape, source="unfold", patch_node=u.name, patch=patch), node
                    nxt.append(u)
            frontier = nxt
    return None


def _grid_from_tokens(spatial: tuple[int, ...], n_tok: int) -> tuple[tuple[int, int, int], tuple[int, ...]] | None:
    total = math.prod(spatial)
    if n_tok <= 0 or total % n_tok:
        return None
    vol = total // n_tok
    if len(spatial) == 2:
        p = math.isqrt(vol)
        if p * p == vol and spatial[0] % p == 0 and spatial[1] % p == 0:
            return (1, spatial[0] // p, spatial[1] // p), (p, p)
        return None
    for pt in range(1, spatial[0] + 1):
        if vol % pt or spatial[0] % pt:
            continue
        p = math.isqrt(vol // pt)
        if p * p * pt == vol and spatial[1] % p == 0 and spatial[2] % p == 0:
            return (spatial[0] // pt, spatial[1] // p, spatial[2] // p), (pt, p, p)
    return None


def record_position_ids(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Keep the values of small integer position-id inputs (``(N, k)`` or ``(B, N, k)``, ``k`` of 2 to 4 axes, e.g.
    Flux's ``img_ids`` ``(N, 3)`` or Flux 2's ``(N, 4)``).

    Packed-latent models (Flux) show their token grid only in these values, which a pass cannot read from
    FakeTensor metadata. Callers that hold the real example inputs (``fxdit.analysis``, the backend) call this
    before the passes; ``find_blocks`` then reads the grid from the ids (``TokenGrid.source == "ids"``).
    """
    ids: dict[str, torch.Tensor] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter) or is_param(node):
            continue
        if value.dim() in (2, 3) and 2 <= value.shape[-1] <= 4 and value.numel() <= 4 * 2**20 and (
                not value.is_floating_point() or bool((value == value.round()).all())):
            try:
                ids[node.name] = value.detach().to("cpu", copy=True)
            except RuntimeError:  # fake or meta tensors: nothing to keep
                continue
    if ids:
        fxdit_meta(gm)["position_ids"] = ids


def _ids_grid(gm: fx.GraphModule, n_tok: int) -> TokenGrid | None:
    """The grid position ids show for ``n_tok`` tokens: the axes whose ids vary (at most three), when the tokens are
    in raster order of those axes (a permuted order gives no grid: GRAT would group the wrong tokens)."""
    ids = fxdit_meta(gm).get("position_ids") or {}
    for value in ids.values():
        v = value[0] if value.dim() == 3 else value
        if v.shape[0] != n_tok:
            continue
        ranks = []
        for i in range(v.shape[1]):
            uniq, inverse = torch.unique(v[:, i], return_inverse=True)
            if uniq.numel() > 1:
                ranks.append((int(uniq.numel()), inverse))
        if not 1 <= len(ranks) <= 3 or math.prod(e for e, _ in ranks) != n_tok:
            continue
        linear = torch.zeros(n_tok, dtype=torch.int64)
        for extent, inverse in ranks:
            linear = linear * extent + inverse
        if not torch.equal(linear, torch.arange(n_tok)):
            continue
        extent = (1,) * (3 - len(ranks)) + tuple(e for e, _ in ranks)
        return TokenGrid(shape=extent, source="ids")  # type: ignore[arg-type]
    return None


def _carried_image(placeholders: list[fx.Node],
                   carried: dict[str, CarriedTokens]) -> tuple[fx.Node, CarriedTokens] | None:
    """The one input holding image tokens whose layout an earlier graph of the model found, if exactly one."""
    hits = [(n, carried[n.name]) for n in placeholders
            if n.name in carried and any(st == "image" for st, _ in carried[n.name].segments)]
    return hits[0] if len(hits) == 1 else None


def output_tokens(gm: fx.GraphModule, streams: Streams) -> dict[int, CarriedTokens]:
    """Graph outputs that carry image tokens of the known grid (to seed the next graph after a graph break)."""
    grid = streams.grid
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if grid is None or out is None or grid.source == "option":
        return {}
    vals = out.args[0] if isinstance(out.args[0], (list, tuple)) else (out.args[0],)
    found: dict[int, CarriedTokens] = {}
    for i, v in enumerate(vals):
        lay = streams.layout(v)
        if lay is None or "image" not in lay.streams:
            continue
        if sum(n for st, n in lay.segments if st == "image") != grid.tokens:
            continue
        found[i] = CarriedTokens(lay.dim, tuple(lay.merged()), tuple(grid.shape))  # type: ignore[arg-type]
    return found


def _table_grid(gm: fx.GraphModule, n_tok: int) -> TokenGrid | None:
    """The grid a position table shows: a table built over the grid, ``(T, H, W, d)`` or ``(H, W, d)`` (e.g. RoPE
    frequencies broadcast per axis and concatenated), flattened to ``(N, d)`` rows, one per packed image token.

    Only tables computed from parameters, buffers and constants count (their values are positions, not
    activations), built with at least one broadcast over the grid. Several tables must agree, else ``None``.
    """
    found: set[tuple[int, int, int]] = set()
    for node in gm.graph.nodes:
        if kind(node) != "view" or not node.args:
            continue
        src = node.args[0]
        ins, outs = shape_of(src), shape_of(node)
        if ins is None or outs is None or len(outs) != 2 or outs[0] != n_tok or len(ins) not in (3, 4):
            continue
        if ins[-1] != outs[1] or math.prod(ins[:-1]) != n_tok or min(ins[:-1]) < 1:
            continue
        if not _is_position_table(src):
            continue
        shape = tuple(int(x) for x in ins[:-1])
        found.add((1, *shape) if len(shape) == 2 else shape)  # type: ignore[arg-type]
    if len(found) != 1:
        return None
    return TokenGrid(shape=next(iter(found)), source="position table")


#: Ops a position table is built with: slices of frequency tables, per-axis views, broadcasts, concatenation.
_TABLE_THROUGH = frozenset({"view", "getitem", "split", "cat", "broadcast", "cast", "elementwise", "transpose",
                            "permute", "stack"})


def _is_position_table(node: fx.Node, limit: int = 64) -> bool:
    """``node`` is computed from parameters/buffers/constants only, through table ops, with at least one
    broadcast (each axis' table expanded over the grid)."""
    seen: set[fx.Node] = set()
    stack, broadcast = [node], False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return False
        if is_param(n) or n.op == "get_attr":
            continue
        k = kind(n)
        if n.op == "placeholder" or k not in _TABLE_THROUGH:
            if n.op == "call_function" and k is None and not any(
                    isinstance(fake_value(a), torch.Tensor) for a in tensor_args(n)):
                continue  # a factory (arange, ones): positions, not activations
            return False
        broadcast = broadcast or k == "broadcast"
        stack.extend(a for a in tensor_args(n) if isinstance(fake_value(a), torch.Tensor))
    return broadcast


def _agreed_grid(grids: Sequence[TokenGrid | None]) -> tuple[TokenGrid | None, str]:
    """The grid every source that shows one agrees on, or ``None`` with the disagreement as the reason."""
    shown = [g for g in grids if g is not None]
    shapes = {tuple(g.shape) for g in shown}
    if len(shapes) > 1:
        listed = ", ".join(f"{g.source} {tuple(g.shape)}" for g in shown)
        return None, f"token grid sources disagree ({listed}); set attention.grid"
    return (shown[0] if shown else None), ""


def _graph_output_tokens(gm: fx.GraphModule) -> tuple[int, ...] | None:
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    vals = out.args[0]
    first = vals[0] if isinstance(vals, (list, tuple)) and vals else vals
    return shape_of(first)


def _hint_score(node: fx.Node, stream: str) -> int:
    name = str(node.target).lower()
    return sum(1 for h in INPUT_NAME_HINTS[stream] if h in name)


def _packed_image_input(gm: fx.GraphModule, candidates: list[fx.Node]) -> fx.Node | None:
    """Among 3-D token inputs, the latents: the one whose token count the graph output has."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    out = _graph_output_tokens(gm)
    if out is not None and len(out) == 3:
        same = [c for c in candidates if shape_of(c)[1] == out[1]]  # type: ignore[index]
        if len(same) == 1:
            return same[0]
        if same:
            candidates = same
    ranked = sorted(candidates, key=lambda c: (-_hint_score(c, "image"), _hint_score(c, "text")))
    if _hint_score(ranked[0], "image") > _hint_score(ranked[0], "text"):
        return ranked[0]
    return None


def _unpatchify(gm: fx.GraphModule, layouts: dict[fx.Node, Layout], n_img: int | None) -> tuple[fx.Node, tuple] | None:
    """The reshape ``(B, N, C) -> (B, g1.., ...)`` that starts the unpatchify, and the grid it shows."""
    for node in gm.graph.nodes:
        if kind(node) != "view":
            continue
        src = node.args[0] if node.args else None
        lay = layouts.get(src)
        in_shape, out_shape = shape_of(src), shape_of(node)
        if lay is None or in_shape is None or out_shape is None or len(in_shape) != 3 or lay.dim != 1:
            continue
        if lay.streams != {"image"} or (n_img is not None and lay.length != n_img):
            continue
        n = lay.length
        for k in ((3, 2) if len(out_shape) >= 8 else (2,)):
            if len(out_shape) >= 2 * k + 2 and math.prod(out_shape[1:1 + k]) == n:
                g = tuple(int(x) for x in out_shape[1:1 + k])
                return node, ((1, *g) if k == 2 else g)
    return None


def token_streams(gm: fx.GraphModule, cfg: Any = None) -> Streams:
    """Find the image input, the text inputs, the token grid, and every node's token :class:`Layout`.

    The image stream starts at the patch embedding: a ``conv2d``/``conv3d`` on a graph input (grid = the
    conv's output spatial shape), a reshape/permute patchify of a 4-D/5-D input, or a packed ``(B, N, C)``
    token input feeding a linear (Flux), whose grid comes from recorded position ids or the unpatchify
    reshape at the end. Text streams start at the other 3-D float graph inputs. ``cfg.attention.grid``, when
    set, overrides the grid shape (``source="option"``).
    """
    reason = ""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and _is_float_input(n)]
    carried: dict[str, CarriedTokens] = dict(fxdit_meta(gm).get("carried_tokens") or {})
    image_input: fx.Node | None = None
    grid: TokenGrid | None = None
    seeds: dict[fx.Node, Layout] = {}

    found = _conv_grid(gm) or _unfold_grid(gm)
    if found is not None:
        grid, image_input = found
        if grid.patch_node is not None:
            patch = next(n for n in gm.graph.nodes if n.name == grid.patch_node)
            per_frame = grid.tokens // (grid.frames_in_batch or 1)
            seeds[patch] = Layout(1, (("image", per_frame),))
        else:
            reason = "patch embedding found but no (B, N, C) token node after it"
    elif (hit := _carried_image(placeholders, carried)) is not None:
        image_input, rec = hit
        seeds[image_input] = Layout(rec.dim, rec.segments)
        first_linear = next((u for u in image_input.users if kind(u) == "linear"), None)
        grid = TokenGrid(shape=rec.grid, source="carried",
                         patch_node=first_linear.name if first_linear is not None and rec.dim == 1 else None)
    else:
        three_d = [n for n in placeholders if ndim(n) == 3]
        image_input = _packed_image_input(gm, [n for n in three_d if any(kind(u) == "linear" or
                                                                       kind(u) == "cast" for u in n.users)])
        if image_input is not None:
            n_tok = shape_of(image_input)[1]  # type: ignore[index]
            seeds[image_input] = Layout(1, (("image", n_tok),))
            first_linear = next((u for u in image_input.users if kind(u) == "linear"), None)
            grid, reason = _agreed_grid([_ids_grid(gm, n_tok), _table_grid(gm, n_tok)])
            if grid is not None and first_linear is not None:
                grid = TokenGrid(grid.shape, grid.source, patch_node=first_linear.name)
            elif grid is None and not reason:
                reason = ("packed token input without position ids, position tables or unpatchify; "
                          "set attention.grid")
        else:
            reason = "no patch embedding (conv/patchify) and no packed token input found"

    text_inputs = []
    for n in placeholders:
        if n is image_input:
            continue
        if n.name in carried:  # a layout an earlier graph of the model found
            rec = carried[n.name]
            seeds[n] = Layout(rec.dim, rec.segments)
            continue
        if ndim(n) != 3:
            continue
        s = shape_of(n)
        seeds[n] = Layout(1, (("text", s[1]),))  # type: ignore[index]
        text_inputs.append(n.name)

    frames = grid.frames_in_batch if grid is not None else None
    layouts = Propagator(gm, seeds, frames).run()

    n_img = grid.tokens if grid is not None else None
    un = _unpatchify(gm, layouts, n_img)
    if un is not None:
        node, shape = un
        if grid is None:
            grid = TokenGrid(shape=shape, source="unpatchify", unpatch_node=node.name,
                             patch_node=next(iter(seeds)).name if image_input is not None and seeds else None)
            reason = ""
        elif shape != grid.shape:
            reason = (f"token grid sources disagree: {grid.source} {tuple(grid.shape)} vs unpatchify "
                      f"{tuple(shape)}; set attention.grid")
            grid = None
        else:
            grid = TokenGrid(grid.shape, grid.source, grid.patch_node, node.name, grid.patch, grid.frames_in_batch)

    if frames:
        # the patch node holds one frame's tokens per batch row: GRAT permutes per site, not at the patch node
        grid = TokenGrid(grid.shape, grid.source, None, None, grid.patch, frames)  # type: ignore[union-attr]

    override = getattr(getattr(cfg, "attention", None), "grid", None)
    if override is not None:
        shape = tuple(override) if len(override) == 3 else (1, *override)
        grid = TokenGrid(shape=shape, source="option",  # type: ignore[arg-type]
                         patch_node=grid.patch_node if grid is not None else None,
                         unpatch_node=grid.unpatch_node if grid is not None else None,
                         patch=grid.patch if grid is not None else None)
        reason = ""
    return Streams(image_input.name if image_input is not None else None, text_inputs, grid, layouts, reason)
