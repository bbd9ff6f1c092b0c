"""The unfused attention chain ``out = softmax(q @ kᵀ * scale + mask) @ v``, matched from its output backwards.

A data table (:data:`UNFUSED_CHAIN`) of steps over op kinds (:mod:`fxdit.passes._ops`); ``find_attention`` records a
matched chain as one attention site (form ``"unfused"`` / ``"unfused_prescaled"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from fxdit.passes._dataflow import kind, shape_of
from fxdit.passes._ops import arith

__all__ = ["ChainStep", "UNFUSED_CHAIN", "TRANSPOSE_KINDS", "match_unfused", "scalar"]


@dataclass(frozen=True)
class ChainStep:
    """One step of the unfused chain, walked from the output backwards.

    Attributes:
        name: what the step records (``"pv"``, ``"probs"``, ``"softmax"``, ``"mask"``, ``"scale"``, ``"qk"``).
        kinds: node kinds allowed at this step (see ``_dataflow.FUNCTION_KINDS``/``METHOD_KINDS``).
        optional: the step may be absent.
        repeat: the step may repeat (casts, dropout).
    """

    name: str
    kinds: frozenset[str]
    optional: bool = False
    repeat: bool = False


#: The unfused chain ``out = softmax(q @ kᵀ * scale + mask) @ v``, from the output backwards.
UNFUSED_CHAIN: tuple[ChainStep, ...] = (
    ChainStep("pv", frozenset({"matmul"})),
    ChainStep("probs", frozenset({"cast", "dropout"}), optional=True, repeat=True),
    ChainStep("softmax", frozenset({"softmax"})),
    ChainStep("cast", frozenset({"cast"}), optional=True, repeat=True),
    ChainStep("mask", frozenset({"elementwise:add"}), optional=True),
    ChainStep("scale", frozenset({"elementwise:mul", "elementwise:div"}), optional=True, repeat=True),
    ChainStep("qk", frozenset({"matmul", "baddbmm"})),
)

#: Kinds that make kᵀ out of k (checked to swap the last two dims).
TRANSPOSE_KINDS = frozenset({"transpose", "permute", "mT"})



def _fine_kind(node: Any) -> str | None:
    """``kind`` with elementwise ops split into ``elementwise:add|mul|div``."""
    k = kind(node)
    if k != "elementwise":
        return k
    op = arith(node)
    return f"elementwise:{op}" if op in ("add", "mul", "div") else k


def scalar(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _splitscalar(node: fx.Node) -> tuple[fx.Node | None, float | None]:
    """For ``x * c``, ``c * x`` or ``x / c`` with a Python number ``c``: ``(x, factor)``."""
    a = node.args[0] if node.args else None
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    fk = _fine_kind(node)
    if fk == "elementwise:mul":
        if isinstance(a, fx.Node) and scalar(b) is not None:
            return a, scalar(b)
        if isinstance(b, fx.Node) and scalar(a) is not None:
            return b, scalar(a)
    if fk == "elementwise:div" and isinstance(a, fx.Node) and scalar(b):
        return a, 1.0 / scalar(b)  # type: ignore[operator]
    return None, None


def _swaps_last_two(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    s = shape_of(src)
    if s is None:
        return False
    nd = len(s)
    k = kind(node)
    if k == "mT":
        return True
    if k == "transpose":
        dims = {d % nd for d in node.args[1:3] if isinstance(d, int)}
        return dims == {nd - 1, nd - 2}
    if k == "permute":
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        norm = [d % nd for d in dims if isinstance(d, int)]
        return norm == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _softmax_dim(node: fx.Node) -> Any:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("dim")


def match_unfused(node: fx.Node) -> tuple[dict[str, Any] | None, str]:
    """Match the unfused chain ending at ``node`` (the ``probs @ v`` matmul), walking :data:`UNFUSED_CHAIN`.

    Returns:
        ``(facts, "")`` on a match, with keys ``q, k, v, mask, scale, nodes, form``; ``(None, reason)`` for
        a near miss (a softmax was found, so this looked like attention), ``(None, "")`` otherwise.
    """
    nodes: list[fx.Node] = []
    cur: Any = node
    facts: dict[str, Any] = {"mask": None, "scale": 1.0}
    seen_softmax = False
    for step in UNFUSED_CHAIN:
        taken = 0
        while isinstance(cur, fx.Node) and _fine_kind(cur) in step.kinds:
            nxt, reason = _take(step.name, cur, facts, nodes)
            if reason:
                return None, reason
            if nxt is None:  # the node fits the kind but not the step (e.g. a non-constant scale)
                break
            nodes.append(cur)
            cur = nxt
            taken += 1
            if step.name == "softmax":
                seen_softmax = True
            if not step.repeat or step.name == "qk":
                break
        if taken == 0 and not step.optional:
            if seen_softmax:
                return None, f"unfused attention: no {'/'.join(sorted(step.kinds))} at step {step.name!r}"
            return None, ""
    if "q" not in facts or not isinstance(facts.get("v"), fx.Node):
        return None, ""
    facts["nodes"] = tuple(n.name for n in nodes)
    return facts, ""


def _take(step: str, cur: fx.Node, facts: dict[str, Any], nodes: list[fx.Node]) -> tuple[Any, str]:
    """Apply one chain step to ``cur``: ``(next node, "")``, ``(None, "")`` (no fit) or ``(None, reason)``."""
    if step == "pv":
        if len(cur.args) < 2:
            return None, ""
        facts["v"] = cur.args[1]
        return cur.args[0], ""
    if step in ("probs", "cast"):
        return (cur.args[0] if cur.args else None), ""
    if step == "softmax":
        src = cur.args[0] if cur.args else None
        nd = len(shape_of(src) or ())
        dim = _softmax_dim(cur)
        if not isinstance(dim, int) or nd == 0 or dim % nd != nd - 1:
            return None, "softmax not on the last dim"
        return src, ""
    if step == "mask":
        a = cur.args[0] if cur.args else None
        b = cur.args[1] if len(cur.args) > 1 else None
        if _reaches_scores(a) and isinstance(b, fx.Node):
            facts["mask"] = b
            return a, ""
        if _reaches_scores(b) and isinstance(a, fx.Node):
            facts["mask"] = a
            return b, ""
        return None, ""
    if step == "scale":
        x, factor = _splitscalar(cur)
        if x is None:
            return None, ""
        facts["scale"] *= factor
        return x, ""
    # "qk": q @ kᵀ, with an optional scale applied to q first; or baddbmm(mask, q, kᵀ, beta=, alpha=scale)
    if kind(cur) == "baddbmm":
        inp, q, kt = (list(cur.args) + [None, None, None])[:3]
        alpha = scalar(cur.kwargs.get("alpha", 1.0))
        beta = scalar(cur.kwargs.get("beta", 1.0))
        if alpha is None or beta is None:
            return None, "unfused attention: baddbmm alpha/beta are not Python numbers"
        facts["scale"] *= alpha
        if beta != 0 and isinstance(inp, fx.Node):
            if beta != 1:
                return None, "unfused attention: baddbmm adds a mask scaled by beta != 1"
            facts["mask"] = inp
    else:
        q = cur.args[0] if cur.args else None
        kt = cur.args[1] if len(cur.args) > 1 else None
    if not isinstance(kt, fx.Node) or kind(kt) not in TRANSPOSE_KINDS or not _swaps_last_two(kt):
        return None, "unfused attention: the scores matmul's second operand is not k transposed"
    nodes.append(kt)
    facts["k"] = kt.args[0]
    prescaled = False
    while isinstance(q, fx.Node) and _fine_kind(q) in ("elementwise:mul", "elementwise:div"):
        x, factor = _splitscalar(q)
        if x is None:
            break
        nodes.append(q)
        facts["scale"] *= factor
        q = x
        prescaled = True
    facts["q"] = q
    facts["form"] = "unfused_prescaled" if prescaled else "unfused"
    return q, ""


def _reaches_scores(n: Any, depth: int = 6) -> bool:
    while isinstance(n, fx.Node) and depth > 0:
        fk = _fine_kind(n)
        if fk in ("matmul", "baddbmm"):
            return True
        if fk in ("elementwise:mul", "elementwise:div", "cast"):
            x, _ = _splitscalar(n) if fk != "cast" else (n.args[0], None)
            n = x
            depth -= 1
            continue
        return False
    return False
