"""Low-rank adapters (LoRA) beside a linear: ``base(x) + scale · up(down(x))``, found from the dataflow alone.

``find_blocks`` computes the roles on the graph with the adapters' sums taken out, so a LoRA-patched model keeps
the roles of its base linears; the adapter pair itself gets the role ``"other"`` (never cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from fxdit.passes._dataflow import kind, shape_of
from fxdit.passes._fx_utils import fresh_copy
from fxdit.passes._ops import arith, linear_input, linear_weight

__all__ = ["Adapter", "ADAPTER_INPUT_THROUGH", "ADAPTER_SCALE_KINDS", "find_adapters", "without_adapters"]



#: Kinds allowed between an adapter's input and the base linear's input (PEFT's ``lora_dropout``, dtype casts).
ADAPTER_INPUT_THROUGH = frozenset({"dropout", "cast"})
#: Call targets that scale the adapter's output by a Python number (PEFT's ``* scaling``), and the add joining it
#: to the base output.
#: Arithmetic (``_ops.arith``) of the ops allowed between an adapter's up projection and its add: a scale.
ADAPTER_SCALE_KINDS = frozenset({"mul", "div"})


@dataclass(frozen=True)
class Adapter:
    """One unfused low-rank adapter ``out = base(x) + up(down(x')) · scale`` (``x'``: ``x`` after dropout/casts).

    Attributes:
        base, down, up: names of the base linear, the down projection (``lora_A``) and the up projection
            (``lora_B``).
        add: name of the add node whose value is the adapted output.
        rest: name of the add's other operand (the base output, or the sum of an earlier adapter of ``base``).
        rank: the adapter's rank (``down``'s output width).
    """

    base: str
    down: str
    up: str
    add: str
    rest: str
    rank: int


def _strip(node: Any, through: frozenset[str]) -> Any:
    while isinstance(node, fx.Node) and kind(node) in through and node.args:
        node = node.args[0]
    return node


def _weight_shape(lin: fx.Node) -> tuple[int, ...] | None:
    s = shape_of(linear_weight(lin))
    return tuple(s) if s is not None and len(s) == 2 else None


def _scaled_sum(up: fx.Node) -> tuple[fx.Node, Any] | None:
    """From the up projection forward through ``* number`` / casts to the add: ``(add, other operand)``."""
    cur = up
    for _ in range(4):
        if len(cur.users) != 1:
            return None
        user = next(iter(cur.users))
        if arith(user) == "add" and len(user.args) == 2:
            other = user.args[1] if user.args[0] is cur else user.args[0]
            return user, other
        if kind(user) == "cast" or (arith(user) in ADAPTER_SCALE_KINDS and len(user.args) == 2 and user.args[0] is cur
                                    and isinstance(user.args[1], (int, float)) and not isinstance(user.args[1], bool)):
            cur = user
            continue
        return None
    return None


def find_adapters(gm: fx.GraphModule) -> list[Adapter]:
    """The unfused low-rank adapters of ``gm``, matched from the dataflow (see the module docstring).

    An ``up(down(x'))`` pair qualifies when ``down``'s width ``r`` is below both the input and the output width,
    its scaled output is added to a linear whose weight has the shape ``(up.out, down.in)`` and whose input is
    ``x'`` before dropout/casts. Several adapters on one linear chain their adds (PEFT adds them one by one).
    """
    found: list[Adapter] = []
    for up in gm.graph.nodes:
        if kind(up) != "linear":
            continue
        down = _strip(linear_input(up), ADAPTER_INPUT_THROUGH)
        if not isinstance(down, fx.Node) or kind(down) != "linear":
            continue
        ws_up, ws_down = _weight_shape(up), _weight_shape(down)
        if ws_up is None or ws_down is None or ws_up[1] != ws_down[0]:
            continue
        rank, d_in, d_out = ws_down[0], ws_down[1], ws_up[0]
        if not rank < min(d_in, d_out):
            continue
        joined = _scaled_sum(up)
        if joined is None:
            continue
        add, other = joined
        base = other
        while isinstance(base, fx.Node) and (arith(base) == "add" or kind(base) == "cast") and base.args:
            base = base.args[0]  # earlier adapters of the same linear: result = result + ...
        if not isinstance(base, fx.Node) or kind(base) != "linear" or _weight_shape(base) != (d_out, d_in):
            continue
        x_base = _strip(linear_input(base), ADAPTER_INPUT_THROUGH)
        x_down = _strip(linear_input(down), ADAPTER_INPUT_THROUGH)
        if x_base is not x_down:
            continue
        if not isinstance(other, fx.Node):
            continue
        found.append(Adapter(base.name, down.name, up.name, add.name, other.name, rank))
    return found


def without_adapters(gm: fx.GraphModule, adapters: list[Adapter]) -> fx.GraphModule:
    """A copy of ``gm`` where each adapted output is the base linear's output (the adapter pairs dangle)."""
    view = fresh_copy(gm)
    nodes = {n.name: n for n in view.graph.nodes}
    rest = {a.add: a.rest for a in adapters}
    for a in adapters:
        target = a.rest
        while target in rest:  # an earlier adapter's sum of the same base: down to the base output
            target = rest[target]
        nodes[a.add].replace_all_uses_with(nodes[target])
    return view
