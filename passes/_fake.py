"""FakeTensor metadata for the nodes a pass adds or reshapes: one mechanism for every pass.

Passes never run the model; a new node gets its ``meta["val"]``/``meta["example_value"]`` by running its target on
FakeTensors (:class:`FakeValues`), under the graph's own fake mode (new nodes beside old ones) or, after a pass
changed shapes throughout (sharding), under one fresh mode for the whole graph (:meth:`FakeValues.refresh`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from fxdit.kernels import torch_private
from fxdit.passes._fx_utils import fake_value, set_value

__all__ = ["FakeValues"]

log = logging.getLogger(__name__)
_NAME = "fake values"


class FakeValues:
    """Computes FakeTensor values for new nodes under the graph's fake mode, and writes node meta."""

    def __init__(self, gm: fx.GraphModule) -> None:
        vals = [fake_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
        try:
            self.mode = torch_private.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        except Exception:  # noqa: BLE001 - mixed fake modes: leave the new nodes without values
            self.mode = None

    def _conv(self, a: Any) -> Any:
        v = fake_value(a) if isinstance(a, fx.Node) else a
        if isinstance(v, torch.Tensor) and self.mode is not None:
            if not isinstance(v, torch_private.fake_tensor_types()[0]):
                v = self.mode.from_tensor(v)
        return v

    def value(self, node: fx.Node) -> Any:
        if self.mode is None:
            return None
        args = fx.node.map_aggregate(node.args, self._conv)
        kwargs = fx.node.map_aggregate(node.kwargs, self._conv)
        if any(isinstance(a, fx.Node) and fake_value(a) is None for a in node.all_input_nodes):
            return None
        try:
            with self.mode:
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception as exc:  # noqa: BLE001 - meta is best effort; inductor re-traces anyway
            log.debug("%s: no fake value for %s: %s", _NAME, node.name, exc)
        return None

    def stamp(self, node: fx.Node, like: fx.Node | None, fxdit: dict[str, Any] | None = None) -> None:
        """Copy ``like``'s meta (module stack, source) onto ``node`` with ``node``'s own fake value."""
        if like is not None:
            for key, val in like.meta.items():
                if key in ("val", "example_value", "tensor_meta", "fxdit"):
                    continue
                node.meta[key] = val
        val = self.value(node)
        if val is not None:
            set_value(node, val)
        node.meta["fxdit"] = dict(fxdit or {})

    @staticmethod
    def refresh(gm: fx.GraphModule) -> None:
        """Recompute the value of every computed node under one fresh fake mode.

        For a pass that changed shapes throughout the graph (sharding); graph copies may also hold FakeTensors of
        several fake modes. Placeholders are re-created as fakes of their recorded shape, stride and dtype (their
        own meta is left alone); a node whose value cannot be computed keeps its old one.
        """
        mode = torch_private.fake_tensor_types()[1](allow_non_fake_inputs=True)
        env: dict[fx.Node, Any] = {}

        def fresh(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                with mode:
                    return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device)
            return v

        def conv(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a not in env:
                    env[a] = fx.node.map_aggregate(fake_value(a), fresh)
                return env[a]
            return a

        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            args = fx.node.map_aggregate(node.args, conv)
            kwargs = fx.node.map_aggregate(node.kwargs, conv)
            try:
                with mode:
                    if node.op == "call_function":
                        val = node.target(*args, **kwargs)
                    else:
                        val = getattr(args[0], node.target)(*args[1:], **kwargs)
            except Exception as exc:  # noqa: BLE001 - keep the old value; inductor re-traces anyway
                log.debug("%s: no fake value for %s: %s", _NAME, node.name, exc)
                continue
            env[node] = val
            set_value(node, val)
