"""Shared predicates and helpers for fxdit's graph passes.

Everything here reads shapes and dtypes from FakeTensor metadata (``meta["val"]`` on post-grad graphs,
``meta["example_value"]`` on Dynamo graphs); nothing runs the model.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.fx as fx
from fxdit.passes._records import PassState

__all__ = [
    "fake_value",
    "shape_of",
    "fxdit_meta",
    "node_meta",
    "nodes_by_name",
    "module_path",
    "module_stack",
    "fresh_copy",
    "lift_constant",
    "lifted_constants",
    "is_call",
    "finish",
]

_FXDIT = "fxdit"


def fake_value(node: Any) -> Any:
    """The FakeTensor (or other value) recorded for ``node``, or ``None``."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta
    if "val" in meta:
        return meta["val"]
    return meta.get("example_value")


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a tensor node, or ``None`` when unknown or symbolic."""
    val = fake_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in val.shape)
    except (TypeError, ValueError):  # symbolic sizes that cannot be specialised
        return None


def fxdit_meta(gm: fx.GraphModule) -> PassState:
    """fxdit's typed per-graph state :class:`~fxdit.passes._records.PassState` in ``gm.meta["fxdit"]`` (created on
    first use)."""
    state = gm.meta.get(_FXDIT)
    if not isinstance(state, PassState):
        fresh = PassState()
        for key, value in dict(state or {}).items():
            fresh[key] = value
        state = gm.meta[_FXDIT] = fresh
    return state


def node_meta(node: fx.Node) -> dict[str, Any]:
    """fxdit's per-node state in ``node.meta["fxdit"]`` (created on first use)."""
    return node.meta.setdefault(_FXDIT, {})


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


_INDEX = re.compile(r"\[(?:'([^']*)'|(\d+))\]")


def _normalise_path(raw: str) -> str:
    """``"L['self'].blocks[0].attn"`` / ``"L['self']._modules['blocks']..."`` → ``"blocks.0.attn"``."""
    s = raw
    for prefix in ("L['self'].", "L['self']", "self.", "L__self__"):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    s = s.replace("__dict__['_modules']", "").replace("._modules", "").replace("_modules", "")
    s = _INDEX.sub(lambda m: "." + (m.group(1) if m.group(1) is not None else m.group(2)), s)
    return s.strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, type | str]]:
    """The ``nn_module_stack`` of a node as ``[(qualified_path, module_type), ...]``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, typ = value if isinstance(value, tuple) else (value, "")
        out.append((_normalise_path(str(path)), typ))
    return out


def module_path(node: fx.Node) -> str:
    """Qualified path of the innermost module that produced ``node`` (``""`` when unknown)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def is_call(node: Any, *targets: Any) -> bool:
    """``node`` is a ``call_function``/``call_method`` to one of ``targets`` (functions or method names)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a deep copy of ``gm``'s graph, with fxdit's meta copied and Dynamo's left behind.

    Passes that add placeholders must work on such a copy (Dynamo walks the placeholders of the graph it
    handed over after the backend returns).
    """
    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph)
    if gm.meta.get(_FXDIT) is not None:
        new.meta[_FXDIT] = fxdit_meta(gm).copy_for()
    return new


def lift_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """Add ``tensor`` as an extra graph input (placeholder after the existing ones) and return its node.

    Tensors cannot be graph constants in a graph handed to inductor (see ``inductor_notes.md``); the backend
    appends every lifted constant to each call instead. The same tensor lifted twice reuses one placeholder.
    """
    state = fxdit_meta(gm)
    if state.get("constants") is None:
        state["constants"] = {}
    consts: dict[str, torch.Tensor] = state["constants"]
    for existing, t in consts.items():
        if t is tensor:
            for n in gm.graph.nodes:
                if n.op == "placeholder" and n.name == existing:
                    return n
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    base = re.sub(r"\W", "_", name)
    taken = {n.name for n in gm.graph.nodes}
    unique, i = base, 1
    while unique in taken:
        unique, i = f"{base}_{i}", i + 1
    if anchor is None:
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            node = gm.graph.placeholder(unique)
    else:
        with gm.graph.inserting_after(anchor):
            node = gm.graph.placeholder(unique)
    node.meta["val"] = tensor
    node.meta["example_value"] = tensor
    node.meta[_FXDIT] = {"constant": True}
    consts[node.name] = tensor
    return node


def lifted_constants(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The lifted constants, in placeholder order (what the backend appends to every call)."""
    consts = fxdit_meta(gm).get("constants", {})
    return [consts[n.name] for n in gm.graph.nodes if n.op == "placeholder" and n.name in consts]


def finish(gm: fx.GraphModule, modified: bool) -> None:
    """End of a rewriting pass: dead-code elimination, lint and recompile, only when something changed."""
    if not modified:
        return
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def set_value(node: fx.Node, value: Any) -> None:
    """Give ``node`` its FakeTensor value (``meta["val"]`` and ``meta["example_value"]``)."""
    node.meta["val"] = value
    node.meta["example_value"] = value


def insert_after(graph: fx.Graph, node: fx.Node) -> Any:
    """A context inserting right after ``node`` (after the last placeholder when ``node`` is one)."""
    if node.op == "placeholder":
        first = next(n for n in graph.nodes if n.op != "placeholder")
        return graph.inserting_before(first)
    return graph.inserting_after(node)
