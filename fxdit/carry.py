"""Token layouts carried across graph breaks.

When Dynamo splits a model into several graphs, the patch embedding (and with it the token grid) may sit in one
graph and the attention in the next. ``find_blocks`` records which outputs of a graph hold tokens it understands
(:class:`~fxdit.passes._records.CarriedTokens`); the backend wraps that graph's compiled callable so that its
output tensors are tagged when it runs (:func:`tag`), and before running the passes on a later graph it looks its
example inputs up (:func:`lookup`): an input that is a tagged tensor gets its layout in
``gm.meta["fxdit"]["carried_tokens"]``.

Tags are held per tensor object and weakly: a tag goes when its tensor is freed. Tagging costs one dictionary
insert per carried output per call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxdit.passes._records import CarriedTokens

__all__ = ["tag", "lookup", "tagging", "clear"]

_lock = threading.Lock()
_tags: dict[int, tuple[weakref.ref, CarriedTokens]] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def drop(ref: weakref.ref) -> None:
        with _lock:
            entry = _tags.get(key)
            if entry is not None and entry[0] is ref:
                del _tags[key]
    return drop


def tag(outputs: Any, facts: Mapping[int, CarriedTokens]) -> None:
    """Remember the layouts ``facts`` (output index → record) of the tensors in ``outputs``."""
    vals = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
    with _lock:
        for i, rec in facts.items():
            if i < len(vals) and isinstance(vals[i], torch.Tensor):
                t = vals[i]
                _tags[id(t)] = (weakref.ref(t, _forget(id(t))), rec)


def lookup(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, CarriedTokens]:
    """Placeholder name → carried layout, for the example inputs that are tagged tensors of the same shape."""
    found: dict[str, CarriedTokens] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with _lock:
        for node, value in zip(placeholders, example_inputs):
            if not isinstance(value, torch.Tensor):
                continue
            entry = _tags.get(id(value))
            if entry is None or entry[0]() is not value:
                continue
            rec = entry[1]
            if rec.dim < value.dim() and value.shape[rec.dim] == sum(n for _, n in rec.segments):
                found[node.name] = rec
    return found


def tagging(compiled: Callable[..., Any], facts: Mapping[int, CarriedTokens]) -> Callable[..., Any]:
    """``compiled`` that tags its outputs with ``facts`` on every call."""
    facts = dict(facts)

    def run(*args: Any) -> Any:
        out = compiled(*args)
        tag(out, facts)
        return out

    return run


def clear() -> None:
    """Forget every tag."""
    with _lock:
        _tags.clear()
