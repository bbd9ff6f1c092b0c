"""The analysis layer's one entry point: the facts every pass reads about a graph (nothing runs the model).

* what a node computes — :func:`kind`, from the one op vocabulary of :mod:`fxdit.passes._ops`
  (:data:`FUNCTION_KINDS`, :data:`METHOD_KINDS`): every predicate is written against kinds, so a new spelling of
  an op is one table row;
* where the tokens are — :func:`token_streams` (:mod:`fxdit.passes._streams`): the image/video and text inputs,
  the :class:`~fxdit.passes._records.TokenGrid`, and for every tensor node its :class:`Layout`
  (:mod:`fxdit.passes._layout`): which dimension is the token sequence and which stream each run of tokens along
  it comes from (``[("text", 77), ("image", 4096)]`` after a joint ``torch.cat``);
* which transformer block a node belongs to — :func:`block_paths` (defined here): the deepest ``X.N`` module-path
  prefixes (``N`` an integer, i.e. a child of a ``ModuleList``/``Sequential``) that contain attention sites — and
  the walks :func:`trace_back` / :func:`trace_forward` over kinds.

No function here branches on a model's class or module names; the only name table is
:data:`INPUT_NAME_HINTS`, a documented tie-breaker between two inputs whose shapes cannot tell image from text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch.fx as fx
from fxdit.passes._fx_utils import module_stack
from fxdit.passes._layout import Layout, Propagator
from fxdit.passes._ops import (
    FUNCTION_KINDS,
    INPUT_NAME_HINTS,
    METHOD_KINDS,
    PASS_THROUGH,
    is_param,
    kind,
    shape_of,
    tensor_args,
)
from fxdit.passes._streams import Streams, output_tokens, record_position_ids, token_streams

__all__ = [
    "FUNCTION_KINDS",
    "METHOD_KINDS",
    "INPUT_NAME_HINTS",
    "PASS_THROUGH",
    "Layout",
    "Propagator",
    "Streams",
    "kind",
    "shape_of",
    "tensor_args",
    "is_param",
    "token_streams",
    "block_paths",
    "block_of",
    "block_index_map",
    "trace_back",
    "trace_forward",
    "record_position_ids",
    "output_tokens",
]

# ------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def _indexed_prefixes(path: str) -> list[str]:
    """``"a.0.b.1.attn"`` → ``["a.0", "a.0.b.1"]``: every prefix ending in an integer component."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i + 1]) for i, p in enumerate(parts) if p.isdigit() and i > 0]


def _node_paths(node: fx.Node) -> list[str]:
    return [p for p, _ in module_stack(node)]


def block_paths(gm: fx.GraphModule, site_nodes: Sequence[fx.Node],
                image_sites: Sequence[fx.Node] | None = None) -> list[str]:
    """The transformer blocks, as module paths in graph order.

    A block is the deepest ``X.N`` prefix (``N`` an integer: an element of a ``ModuleList``/``Sequential``) of
    an attention site's module path. Blocks are ordered by their first node in the graph. When
    ``image_sites`` (the sites whose queries carry image tokens) is non-empty, only blocks containing one of
    them count: text-only blocks (e.g. a text-encoder refiner) are not transformer blocks of the image stream.
    """
    if image_sites:
        site_nodes = list(image_sites)
    chosen: set[str] = set()
    for node in site_nodes:
        best = None
        for path in _node_paths(node):
            pre = _indexed_prefixes(path)
            if pre:
                best = pre[-1] if best is None or len(pre[-1]) > len(best) else best
        if best is not None:
            chosen.add(best)
    # Drop a block that contains another chosen block (a site directly in an outer list element).
    chosen = {p for p in chosen if not any(o != p and o.startswith(p + ".") for o in chosen)}
    order: list[str] = []
    for node in gm.graph.nodes:
        for path in _node_paths(node):
            if path in chosen and path not in order:
                order.append(path)
    return order


def _under(node: fx.Node, blocks: Sequence[str]) -> int | None:
    paths = _node_paths(node)
    for i, b in enumerate(blocks):
        for p in paths:
            if p == b or p.startswith(b + "."):
                return i
    return None


def block_of(node: fx.Node, blocks: Sequence[str]) -> int | None:
    """Index in ``blocks`` of the block ``node`` belongs to, or ``None``.

    A node belongs to block ``i`` when ``blocks[i]`` is on its module stack **and** it lies in the block's
    region of the graph: from the block's first node up to the first node of the next block (graph order).
    A module of a block called again from outside (diffusers' DiT re-runs block 0's timestep embedder for
    the final layer) is therefore not part of that block.
    """
    i = _under(node, blocks)
    if i is None:
        return None
    graph = node.graph
    starts = _block_starts(graph, blocks)
    pos = _positions(graph)
    me = pos.get(node)
    if me is None or i not in starts:
        return i
    if me < starts[i]:
        return None
    later = [s for j, s in starts.items() if s > starts[i]]
    if later and me >= min(later):
        return None
    return i


def block_index_map(gm: fx.GraphModule, blocks: Sequence[str]) -> dict[fx.Node, int]:
    """:func:`block_of` for every node of ``gm`` at once (nodes outside every block are absent)."""
    starts = _block_starts(gm.graph, blocks)
    order = sorted(starts.items(), key=lambda kv: kv[1])
    ends = {i: (order[j + 1][1] if j + 1 < len(order) else None) for j, (i, _) in enumerate(order)}
    out: dict[fx.Node, int] = {}
    for k, n in enumerate(gm.graph.nodes):
        i = _under(n, blocks)
        if i is None:
            continue
        if i in starts and (k < starts[i] or (ends[i] is not None and k >= ends[i])):
            continue
        out[n] = i
    return out


def _positions(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: k for k, n in enumerate(graph.nodes)}


def _block_starts(graph: fx.Graph, blocks: Sequence[str]) -> dict[int, int]:
    starts: dict[int, int] = {}
    for k, n in enumerate(graph.nodes):
        if n.op == "placeholder":
            continue  # Dynamo gives lifted parameters the module stack of their first use
        i = _under(n, blocks)
        if i is not None and i not in starts:
            starts[i] = k
    return starts


# ------------------------------------------------------------------------------------------------------------
# Tracing helpers
# ------------------------------------------------------------------------------------------------------------


def _walk(start: fx.Node, *, through: frozenset[str], stop: frozenset[str], limit: int,
          neighbours: Callable[[fx.Node], Iterable[fx.Node]]) -> list[fx.Node]:
    """Nodes of a kind in ``stop`` reached from ``start`` over ``neighbours``, walking on through nodes of a kind in
    ``through`` only (``start`` itself is always walked through); at most ``limit`` nodes are visited."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [start]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not start:
            k = kind(n)
            if k in stop:
                found.append(n)
                continue
            if k not in through:
                continue
        stack.extend(neighbours(n))
    return found


def trace_back(start: fx.Node, *, through: frozenset[str] = PASS_THROUGH, stop: frozenset[str] = frozenset({"linear"}),
               limit: int = 200) -> list[fx.Node]:
    """Nodes of a kind in ``stop`` reached from ``start`` backwards through nodes of a kind in ``through`` (never
    through another linear layer)."""

    def inputs(n: fx.Node) -> list[fx.Node]:
        if n is not start and kind(n) == "linear":
            return []
        return [a for a in tensor_args(n) if not is_param(a)]

    return _walk(start, through=through, stop=stop, limit=limit, neighbours=inputs)


def trace_forward(start: fx.Node, *, through: frozenset[str], stop: frozenset[str], limit: int = 200) -> list[fx.Node]:
    """Nodes of a kind in ``stop`` reached from ``start`` forwards through users of a kind in ``through``."""
    return _walk(start, through=through, stop=stop, limit=limit, neighbours=lambda n: n.users)
