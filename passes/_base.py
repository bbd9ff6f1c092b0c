"""What every fxdit pass returns, and the small shared machinery around it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch.fx as fx

__all__ = ["PassReport", "ReportBuilder", "GraphPass", "PassFailed", "declares", "undeclared"]


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


class PassFailed(RuntimeError):
    """An internal error in pass ``pass_name`` (``error`` is the exception it raised)."""

    def __init__(self, pass_name: str, exc: BaseException) -> None:
        super().__init__(f"fxdit: error in pass {pass_name!r}: {type(exc).__name__}: {exc}")
        self.pass_name = pass_name
        self.error = exc


def declares(*, reads: tuple[str, ...] = (), produces: tuple[str, ...] = ()) -> Callable[[PassFn], PassFn]:
    """Declare the :class:`~fxdit.passes._records.PassState` fields a pass reads and those it produces.

    The pipeline checks every run against the declaration (:func:`undeclared`): a pass that reads or writes a field
    it does not declare fails like any other pass error.
    """

    def wrap(fn: PassFn) -> PassFn:
        fn.reads = tuple(reads)  # type: ignore[attr-defined]
        fn.produces = tuple(produces)  # type: ignore[attr-defined]
        return fn

    return wrap


def undeclared(fn: Any, reads: set[str], writes: set[str]) -> str | None:
    """What pass ``fn`` read or wrote beyond its declaration (``None`` when nothing)."""
    declared_reads = set(getattr(fn, "reads", ())) | set(getattr(fn, "produces", ()))
    declared_writes = set(getattr(fn, "produces", ()))
    extra_reads, extra_writes = sorted(reads - declared_reads), sorted(writes - declared_writes)
    if not extra_reads and not extra_writes:
        return None
    return (f"pass {getattr(fn, '__name__', fn)!r} used undeclared state: reads {extra_reads or 'none'}, "
            f"writes {extra_writes or 'none'} (declare them with fxdit.passes._base.declares)")
