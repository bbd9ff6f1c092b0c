"""Graph dumps: the graph before and after each pass, the pass reports, and the analysis tables.

Layout, per graph Dynamo produced::

    DIR/graph_000/
        00_input.py                    # the graph as Dynamo traced it
        01_find_attention/before.py    # print_readable() before the pass
        01_find_attention/after.py     # ... and after it
        01_find_attention/report.txt   # the pass's PassReport
        01_find_attention/diff.txt     # names of the nodes the pass created and erased
        ...
        NN_<variant>/after.py          # graph variants built after the pipeline (ICC's full and cached steps)
        NN_<variant>/cost.md           # ... with their cost tables
        report.md                      # pass reports, attention sites, blocks and linears, token grid, costs
        cost.json                      # the cost tables (graph and variants) as data
        input.svg, final.svg           # only when pydot and graphviz's ``dot`` are installed

``report.md`` sections: *Pass reports* (matched/rewritten/created/erased/skipped per pass, plus each pass's
details), *Attention sites* (form, B/H/S/D, kv_len, scale, mask, causal, spans, cross, block, and GRAT's
layout/density/ideal speedup for rewritten sites), *Blocks and linear layers*, *Token grid*, *Cost* (the
:mod:`fxdit.cost` table: MACs and bytes per op class as sympy expressions over ``B``, ``N``, ``L`` and as
numbers), *Graph variants* (their MACs against the main graph's) and *Cache memory* when ICC recorded it.

A provisional ``report.md`` (without the cost table) is rewritten after every pass, so a dump is there even when
a later pass or inductor fails; :meth:`GraphDump.finish` writes the final one. Writing a dump never breaks
compilation: every step catches its own errors and logs them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch.fx as fx

from fxdit.config import FxditConfig
from fxdit.passes._base import PassReport

__all__ = ["GraphDump", "render_report"]

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

#: Graphs with more nodes than this get no .svg (graphviz takes minutes on big graphs).
SVG_MAX_NODES = 3000


def _never_raise(fn: _F) -> _F:
    """A dump step that fails logs a warning and returns ``None`` instead of breaking compilation."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a dump must never break compilation
            log.warning("fxdit dump: %s failed (%s: %s)", fn.__name__, type(exc).__name__, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            return None

    return wrapper  # type: ignore[return-value]


def _readable(gm: fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - a dump must never break compilation
        return str(gm.graph)


def _node_names(gm: fx.GraphModule) -> dict[str, str]:
    return {n.name: f"{n.op} {getattr(n.target, '__name__', n.target)}" for n in gm.graph.nodes}


class GraphDump:
    """Writes one graph's dump as the backend runs the pipeline.

    The backend calls :meth:`input` once, :meth:`before`/:meth:`after` around each pass, :meth:`variant` for
    each graph variant it builds after the pipeline, and :meth:`finish` last.

    Args:
        root: the dump directory (``options["dump_dir"]``); this graph goes to ``root/graph_NNN``.
        graph_id: the process-wide graph number.
        cfg: the configuration the graph is compiled with.
    """

    def __init__(self, root: str, graph_id: int, cfg: FxditConfig) -> None:
        self.path = os.path.join(root, f"graph_{graph_id:03d}")
        self.cfg = cfg
        self._step = 0
        self._before_names: dict[str, str] = {}
        self._variants: list[tuple[str, Any, PassReport | None]] = []
        self._reports: list[PassReport] = []
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            log.warning("fxdit dump: cannot create %s (%s)", self.path, exc)

    def _write(self, rel: str, text: str) -> None:
        full = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)

    @_never_raise
    def input(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
        """The graph as Dynamo traced it (``00_input.py``, and ``input.svg`` when graphviz is available)."""
        self._write("00_input.py", _readable(gm))
        _write_svg(gm, os.path.join(self.path, "input.svg"))

    @_never_raise
    def before(self, name: str, gm: fx.GraphModule) -> None:
        """The graph before pass ``name``."""
        self._step += 1
        self._before_names = _node_names(gm)
        self._write(f"{self._step:02d}_{name}/before.py", _readable(gm))

    @_never_raise
    def after(self, name: str, gm: fx.GraphModule, report: PassReport) -> None:
        """The graph after pass ``name``, its report and the nodes it created and erased."""
        self._write(f"{self._step:02d}_{name}/after.py", _readable(gm))
        self._write(f"{self._step:02d}_{name}/report.txt", report.summary() + "\n" + _details(report))
        now = _node_names(gm)
        created = [f"+ {k}: {v}" for k, v in now.items() if k not in self._before_names]
        erased = [f"- {k}: {v}" for k, v in self._before_names.items() if k not in now]
        self._write(f"{self._step:02d}_{name}/diff.txt",
                    f"# {name}: {len(created)} nodes created, {len(erased)} erased\n"
                    + "\n".join(created + erased) + "\n")
        # A provisional report.md (no cost table, which can take seconds on big graphs), so a dump exists even
        # when a later pass or inductor fails; finish() replaces it.
        self._reports.append(report)
        self._write("report.md", render_report(gm, self._reports, cost=False,
                                               note=f"Provisional: written after pass {name!r}; compilation has not "
                                                    "finished (if it failed, this is the last state fxdit reached)."))

    @_never_raise
    def variant(self, name: str, gm: fx.GraphModule, report: PassReport | None = None) -> None:
        """A graph variant built after the pipeline (e.g. ICC's full and cached steps), with its cost table."""
        self._step += 1
        self._write(f"{self._step:02d}_{name}/after.py", _readable(gm))
        if report is not None:
            self._write(f"{self._step:02d}_{name}/report.txt", report.summary() + "\n" + _details(report))
        table = _cost(gm)
        if table is not None:
            self._write(f"{self._step:02d}_{name}/cost.md", table.to_markdown())
        self._variants.append((name, table, report))

    @_never_raise
    def finish(self, gm: fx.GraphModule, reports: Sequence[PassReport], example_inputs: Sequence[Any]) -> None:
        """``report.md`` and ``cost.json`` for the graph as the pipeline left it (``final.svg`` with graphviz)."""
        table = _cost(gm)
        self._write("report.md", render_report(gm, reports, variants=self._variants, table=table))
        if table is not None:
            doc = {"graph": _cost_json(table),
                   "variants": {name: _cost_json(vt) for name, vt, _ in self._variants if vt is not None}}
            self._write("cost.json", json.dumps(doc, indent=1) + "\n")
        _write_svg(gm, os.path.join(self.path, "final.svg"))
        log.info("fxdit dump written to %s", self.path)


# --- report.md -------------------------------------------------------------------------------------------------------


def _cost(gm: fx.GraphModule) -> Any:
    try:
        from fxdit.cost import graph_cost

        return graph_cost(gm)
    except Exception as exc:  # noqa: BLE001 - a dump must never break compilation
        log.warning("fxdit dump: cost model failed (%s: %s)", type(exc).__name__, exc)
        return None


def _cost_json(table: Any) -> dict[str, Any]:
    """A :class:`~fxdit.cost.CostTable` as plain data (expressions as strings)."""
    def row(r: Any) -> dict[str, Any]:
        return {"op_class": r.op_class, "count": r.count, "macs_expr": str(r.macs_expr),
                "bytes_expr": str(r.bytes_expr), "macs": r.macs, "bytes": r.bytes}

    d = table.dims
    return {"dims": {"B": d.batch, "N": d.tokens, "L": d.text, "sources": dict(d.sources)},
            "rows": [row(r) for r in table.rows], "total": row(table.total), "unknown": dict(table.unknown)}


def _details(report: PassReport) -> str:
    if not report.details:
        return ""
    return "".join(f"  {k}: {v!r}\n" for k, v in report.details.items())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"  # pragma: no cover


def _grat_info(gm: fx.GraphModule, sites: Sequence[Any]) -> dict[str, Mapping[str, Any]]:
    """Site node name → ``node.meta["fxdit"]["grat"]`` of the op that replaced it.

    A rewritten node is matched to its site by, in order: an explicit ``grat["site"]`` or a carried
    ``meta["fxdit"]["attention"]`` record; the site's q/k/v node names as the op's first three arguments; else
    graph order among the sites whose node is gone from the graph.
    """
    rewritten = []
    for n in gm.graph.nodes:
        grat = (n.meta.get("fxdit") or {}).get("grat")
        if isinstance(grat, Mapping) and grat:
            rewritten.append((n, grat))
    out: dict[str, Mapping[str, Any]] = {}
    unmatched = []
    by_qkv = {(s.q, s.k, s.v): s.node for s in sites}
    for n, grat in rewritten:
        site = (n.meta.get("fxdit") or {}).get("attention")
        key = grat.get("site") or getattr(site, "node", None)
        if key is None and len(n.args) >= 3:
            names = tuple(getattr(a, "name", None) for a in n.args[:3])
            key = by_qkv.get(names)  # type: ignore[arg-type]
        if key is None:
            unmatched.append(grat)
        else:
            out[str(key)] = grat
    present = {n.name for n in gm.graph.nodes}
    gone = [s.node for s in sites if s.node not in out and s.node not in present]
    for name, grat in zip(gone, unmatched):
        out[name] = grat
    return out


def _attention_section(gm: fx.GraphModule, sites: Sequence[Any]) -> list[str]:
    lines = ["## Attention sites", ""]
    if not sites:
        return lines + ["None found.", ""]
    grat = _grat_info(gm, sites)
    rows = []
    for s in sites:
        g = grat.get(s.node)
        if g is not None:
            density = g.get("density")
            speedup = g.get("ideal_speedup", (1.0 / density) if density else None)
            layout = g.get("layout") or " ".join(
                str(x) for x in (g.get("mode", "grat"), f"group {_cell(g['group'])}" if g.get("group") else "") if x)
            rewrite = f"{layout}, density {_cell(density)}, ideal ×{_cell(speedup)}"
        else:
            rewrite = "-"
        mask = s.mask_kind if s.mask is None else f"{s.mask_kind} ({s.mask})"
        heads = str(s.heads) if s.kv_heads == s.heads else f"{s.heads}/{s.kv_heads}"
        rows.append((s.node, s.form, s.batch, heads, s.q_len, s.head_dim, s.kv_len,
                     "default" if s.scale is None else s.scale, mask, s.causal, s.image_span, s.text_span,
                     s.cross, s.block, rewrite))
    lines += _table(("node", "form", "B", "H", "S", "D", "kv_len", "scale", "mask", "causal", "image span",
                     "text span", "cross", "block", "GRAT"), rows)
    return lines + [""]


def _blocks_section(blocks: Sequence[Any]) -> list[str]:
    lines = ["## Blocks and linear layers", ""]
    if not blocks:
        return lines + ["None found.", ""]
    lines += _table(("block", "path", "tokens", "hidden", "linears"),
                    [(b.index, b.path, b.tokens, b.hidden, len(b.linears)) for b in blocks])
    lines += [""]
    rows = []
    for b in blocks:
        for lin in b.linears:
            rows.append((b.index, lin.module or "?", lin.role, lin.in_features, lin.out_features, lin.tokens,
                         lin.stream, lin.node))
    if rows:
        lines += _table(("block", "module", "role", "in", "out", "tokens", "stream", "node"), rows) + [""]
    return lines


def _grid_section(grid: Any) -> list[str]:
    lines = ["## Token grid", ""]
    if grid is None:
        return lines + ["None found.", ""]
    t, h, w = grid.shape
    lines += [f"- shape (T, H, W): ({t}, {h}, {w}) = {grid.tokens} tokens ({'video' if grid.is_video else 'image'})",
              f"- source: {grid.source}", f"- patch: {_cell(grid.patch)}",
              f"- patch node: {_cell(grid.patch_node)}; unpatchify node: {_cell(grid.unpatch_node)}", ""]
    return lines


def _cache_section(cache: Any) -> list[str]:
    lines = ["## Cache memory", ""]
    if isinstance(cache, Mapping):
        rows = [(k, f"{int(v):,}", _human_bytes(float(v))) if isinstance(v, (int, float)) else (k, _cell(v), "-")
                for k, v in cache.items()]
        lines += _table(("item", "bytes", ""), rows)
        numeric = [float(v) for v in cache.values() if isinstance(v, (int, float))]
        if numeric and "total" not in cache:
            lines.append(f"| **total** | {int(sum(numeric)):,} | {_human_bytes(sum(numeric))} |")
    elif isinstance(cache, (int, float)):
        lines.append(f"{int(cache):,} bytes ({_human_bytes(float(cache))}) held between steps.")
    else:
        lines.append(_cell(cache))
    return lines + [""]


def render_report(gm: fx.GraphModule, reports: Sequence[PassReport],
                  variants: Sequence[tuple[str, Any, PassReport | None]] = (), *, cost: bool = True,
                  note: str | None = None, table: Any = None) -> str:
    """The markdown report for ``gm`` after the pipeline (see the module docstring for its sections).

    Args:
        gm: the graph as the pipeline left it (its ``meta["fxdit"]`` holds the analysis records).
        reports: the pass reports, in pipeline order.
        variants: ``(name, CostTable | None, PassReport | None)`` for graph variants built after the pipeline.
        cost: include the cost table (the one slow section).
        note: a line printed under the title.
        table: the graph's :class:`~fxdit.cost.CostTable` when already computed.
    """
    from fxdit.passes._fx_utils import fxdit_meta

    state = fxdit_meta(gm)
    sites = list(state.get("attention_sites") or [])
    blocks = list(state.get("blocks") or [])
    calls = sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
    inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    lines = ["# fxdit graph report", ""] + ([f"> {note}", ""] if note else []) + [
             f"{calls} call nodes, {inputs} inputs; {len(sites)} attention sites, {len(blocks)} blocks, "
             f"{sum(len(b.linears) for b in blocks)} linear layers in blocks.", "", "## Pass reports", ""]
    rows = []
    for r in reports:
        skipped = "; ".join(f"{k}: {v}" for k, v in sorted(r.skipped.items())) or "-"
        rows.append((r.name, r.matched, r.rewritten, r.created, r.erased, skipped))
    lines += _table(("pass", "matched", "rewritten", "created", "erased", "skipped (reason: count)"), rows)
    details = [(r.name, k, v) for r in reports for k, v in r.details.items()]
    if details:
        lines += ["", "Details:", ""] + [f"- {name}: {k} = {_cell(v)}" for name, k, v in details]
    lines += [""]
    lines += _attention_section(gm, sites)
    lines += _blocks_section(blocks)
    lines += _grid_section(state.get("token_grid"))
    lines += ["## Cost", ""]
    if table is None and cost:
        table = _cost(gm)
    if not cost:
        lines += ["Written when compilation finishes.", ""]
    elif table is None:
        lines += ["The cost model failed on this graph (see the log).", ""]
    else:
        lines += [table.to_markdown()]
    if variants:
        lines += ["## Graph variants", ""]
        base = table.total.macs if table is not None else 0
        vrows = []
        for name, vt, _ in variants:
            if vt is None:
                vrows.append((name, "-", "-", "-", "-"))
                continue
            ratio = f"{vt.total.macs / base:.3f}" if base else "-"
            vrows.append((name, f"`{vt.total.macs_expr}`", f"{vt.total.macs:,}", f"{vt.total.bytes:,}", ratio))
        lines += _table(("variant", "MACs", "MACs at traced shape", "bytes", "MACs / main graph"), vrows) + [""]
    cache = state.get("cache_bytes", state.get("summary_cache_bytes"))
    if cache is not None:
        lines += _cache_section(cache)
    return "\n".join(lines).rstrip() + "\n"


# --- optional .svg ---------------------------------------------------------------------------------------------------


def _write_svg(gm: fx.GraphModule, path: str) -> bool:
    """Draw ``gm`` with FxGraphDrawer when pydot and graphviz's ``dot`` are available; never required."""
    try:
        import pydot  # noqa: F401
    except ImportError:
        return False
    if shutil.which("dot") is None or len(gm.graph.nodes) > SVG_MAX_NODES:
        return False
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer

        drawer = FxGraphDrawer(gm, os.path.basename(path).rsplit(".", 1)[0], ignore_getattr=True)
        drawer.get_dot_graph().write_svg(path)
        return True
    except Exception as exc:  # noqa: BLE001 - optional output
        log.debug("fxdit dump: no svg for %s (%s: %s)", path, type(exc).__name__, exc)
        return False
