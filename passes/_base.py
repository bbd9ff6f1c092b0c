"""What every fxdit pass returns, and the small shared machinery around it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch.fx as fx

__all__ = ["PassReport", "ReportBuilder", "GraphPass"]


@dataclass(frozen=True)
class PassReport:
    """What one pass did to one graph.

    Args:
        name: the pass's function name.
        matched: sites the pass recognised.
        rewritten: sites it changed (0 for analysis passes).
        skipped: reason → count for sites it recognised but left alone.
        created: graph nodes added.
        erased: graph nodes removed.
        details: pass-specific facts (e.g. ``{"permutes_saved": 10}``), plain data only.
    """

    name: str
    matched: int = 0
    rewritten: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)
    created: int = 0
    erased: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", dict(self.skipped))
        object.__setattr__(self, "details", dict(self.details))

    def summary(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.name}: matched {self.matched}, rewritten {self.rewritten}, created {self.created}, "
                f"erased {self.erased}, skipped {{{skipped}}}")


class ReportBuilder:
    """Accumulates a :class:`PassReport` while a pass runs; counts created/erased nodes by diffing the graph."""

    def __init__(self, name: str, gm: fx.GraphModule, log: logging.Logger | None = None) -> None:
        self.name = name
        self.matched = 0
        self.rewritten = 0
        self.skipped: Counter[str] = Counter()
        self.details: dict[str, Any] = {}
        self._log = log or logging.getLogger(__name__)
        self._before = {id(n) for n in gm.graph.nodes}
        self._gm = gm

    def skip(self, reason: str, node_name: str = "") -> None:
        self.skipped[reason] += 1
        self._log.debug("%s: skipped %s: %s", self.name, node_name or "site", reason)

    def build(self) -> PassReport:
        after = {id(n) for n in self._gm.graph.nodes}
        report = PassReport(
            name=self.name,
            matched=self.matched,
            rewritten=self.rewritten,
            skipped=dict(self.skipped),
            created=len(after - self._before),
            erased=len(self._before - after),
            details=self.details,
        )
        self._log.info("%s", report.summary())
        return report


class GraphPass(Protocol):
    """The shape of every pass: ``verb_object(gm, cfg) -> PassReport``, mutating ``gm`` in place."""

    __name__: str

    def __call__(self, gm: fx.GraphModule, cfg: Any) -> PassReport: ...


PassFn = Callable[[fx.GraphModule, Any], PassReport]
