"""Graph dumps: the graph before and after each pass, the pass reports, and the analysis tables.

Layout, per graph Dynamo produced::

    DIR/graph_000/
        00_input.py                    # the graph as Dynamo traced it
        01_find_attention/before.py    # print_readable() before the pass
        01_find_attention/after.py     # ... and after it
        ...
        report.md                      # pass reports, attention sites, blocks and linears, token grid, costs
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch.fx as fx

from fxdit.config import FxditConfig
from fxdit.passes._base import PassReport

__all__ = ["GraphDump"]

log = logging.getLogger(__name__)


def _readable(gm: fx.GraphModule) -> str:
    try:
        return gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - a dump must never break compilation
        return str(gm.graph)


class GraphDump:
    """Writes one graph's dump as the backend runs the pipeline."""

    def __init__(self, root: str, graph_id: int, cfg: FxditConfig) -> None:
        self.path = os.path.join(root, f"graph_{graph_id:03d}")
        os.makedirs(self.path, exist_ok=True)
        self.cfg = cfg
        self._step = 0

    def _write(self, rel: str, text: str) -> None:
        full = os.path.join(self.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)

    def input(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
        self._write("00_input.py", _readable(gm))

    def before(self, name: str, gm: fx.GraphModule) -> None:
        self._step += 1
        self._write(f"{self._step:02d}_{name}/before.py", _readable(gm))

    def after(self, name: str, gm: fx.GraphModule, report: PassReport) -> None:
        self._write(f"{self._step:02d}_{name}/after.py", _readable(gm))
        self._write(f"{self._step:02d}_{name}/report.txt", report.summary() + "\n")

    def variant(self, name: str, gm: fx.GraphModule, report: PassReport | None = None) -> None:
        """A graph variant built after the pipeline (e.g. ICC's full and cached steps)."""
        self._step += 1
        self._write(f"{self._step:02d}_{name}/after.py", _readable(gm))
        if report is not None:
            self._write(f"{self._step:02d}_{name}/report.txt", report.summary() + "\n")

    def finish(self, gm: fx.GraphModule, reports: Sequence[PassReport], example_inputs: Sequence[Any]) -> None:
        lines = ["# fxdit graph report", "", "## Pass reports", "",
                 "| pass | matched | rewritten | created | erased | skipped |", "|---|---|---|---|---|---|"]
        for r in reports:
            skipped = "; ".join(f"{k}: {v}" for k, v in sorted(r.skipped.items())) or "-"
            lines.append(f"| {r.name} | {r.matched} | {r.rewritten} | {r.created} | {r.erased} | {skipped} |")
        self._write("report.md", "\n".join(lines) + "\n")
        log.info("fxdit dump written to %s", self.path)
