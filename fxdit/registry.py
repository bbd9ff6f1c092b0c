"""Which compiled graphs belong to which model: the backend records each graph it compiles here.

Dynamo hands the backend the model's real parameters among the example inputs, so a model is recognised by
the identity of its parameters (weakly referenced: the registry never keeps a model alive). This is what
:func:`fxdit.reports`, :func:`fxdit.reset` and :func:`fxdit.sampling` use to find a model's graphs.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fxdit.config import FxditConfig
from fxdit.errors import FxditError
from fxdit.passes._base import PassReport

__all__ = ["CompiledGraph", "register", "records_for", "all_records", "next_graph_id", "clear"]

_lock = threading.Lock()
_records: list[CompiledGraph] = []
_ids = itertools.count()


def next_graph_id() -> int:
    with _lock:
        return next(_ids)


@dataclass
class CompiledGraph:
    """One graph Dynamo handed to fxdit, and what fxdit did with it.

    Attributes:
        graph_id: process-wide number of the graph (also its folder name in a dump).
        config: the configuration it was compiled with.
        reports: the pass reports, in pipeline order.
        summary: plain-data facts about the graph (attention sites, blocks, token grid, cache memory...).
        dump_dir: where its dump was written, if anywhere.
    """

    graph_id: int
    config: FxditConfig
    reports: tuple[PassReport, ...]
    summary: dict[str, Any] = field(default_factory=dict)
    dump_dir: str | None = None
    _params: list[weakref.ref] = field(default_factory=list, repr=False)
    _runtime: weakref.ref | None = field(default=None, repr=False)

    @property
    def runtime(self) -> Any | None:
        """The step-state runtime (ICC) behind this graph, or ``None`` when it has none or was freed."""
        return self._runtime() if self._runtime is not None else None

    def belongs_to(self, param_ids: set[int]) -> bool:
        for ref in self._params:
            p = ref()
            if p is not None and id(p) in param_ids:
                return True
        return False

    def alive(self) -> bool:
        return not self._params or any(ref() is not None for ref in self._params)

    def report(self, name: str) -> PassReport | None:
        for r in self.reports:
            if r.name == name:
                return r
        return None


def register(record: CompiledGraph, example_inputs: Iterable[Any], runtime: Any | None = None) -> None:
    """Record a compiled graph; parameters among ``example_inputs`` tie it to its model."""
    refs = []
    for t in example_inputs:
        if isinstance(t, torch.nn.Parameter):
            refs.append(weakref.ref(t))
    record._params = refs
    if runtime is not None:
        record._runtime = weakref.ref(runtime)
    with _lock:
        _records[:] = [r for r in _records if r.alive()]
        _records.append(record)


def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)


def records_for(model: Any) -> list[CompiledGraph]:
    """The compiled graphs of ``model`` (a module or the ``torch.compile`` wrapper of one), oldest first."""
    mod = _unwrap(model)
    if not isinstance(mod, torch.nn.Module):
        raise FxditError(f"model={type(model).__name__}; expected an nn.Module or a torch.compile'd module")
    ids = {id(p) for p in mod.parameters()}
    with _lock:
        return [r for r in _records if r.belongs_to(ids)]


def all_records() -> list[CompiledGraph]:
    with _lock:
        return [r for r in _records if r.alive()]


def clear() -> None:
    """Forget every record (tests)."""
    with _lock:
        _records.clear()
