"""Test oracle for increment-calibrated caching (ICC): the paper's per-linear rule applied eagerly with module hooks.

The oracle knows nothing of fxdit's graphs, passes, schedule or runtime. It reads the factor file (plain
``safetensors``: tensors ``"<key>.A"`` ``[out, r]`` and ``"<key>.B"`` ``[r, in]``, ``A·B ≈ W``; a key is a module
path, or ``"<path>:q"``, ``"<path>:k"``, ``"<path>:v"`` for the separate factorisation of a fused qkv weight, whose
output rows are q, k, v in that order) and hooks every ``nn.Linear`` the file covers:

* at a **full** step each hooked linear runs as usual and records its input ``X_c`` and output ``Y_c`` (bias
  included);
* at a **cached** step it returns ``Y_c + (X − X_c)·Bᵀ·Aᵀ`` (no bias term; computed in fp64, cast to the output
  dtype), per q/k/v row block of a fused qkv weight with separate factors, or with the one pair of a joint one.

Everything else in the model (norms, modulation, attention, activations, residuals, embedders) runs unchanged on
the resulting tensors. Which steps are full is an explicit set of step indices given by the caller.

Caches are kept per *call slot* ``(stream, module, call)``: ``stream`` is the position of the model call within
its step (0 for one call per step, 0/1 for the cond/uncond calls of two-call classifier-free guidance), ``call`` the
position of this module's call within that forward (a module applied twice in one forward has two slots). A
cached step needs every slot it touches to have been recorded at an earlier full step, with the same input and
output shapes, else the oracle raises ``RuntimeError``: a test with such a schedule is wrong, not lossy.

API::

    oracle = IccOracle(model, "factors.safetensors", full_steps={0, 2, 4, 5})  # or a Factors / {key: (A, B)}
    for step in range(6):
        oracle.begin_step(step)          # steps must not decrease; a step below the previous one is an error
        eps = oracle(x, t, y)            # = model(x, t, y) with the hooks attached for this call only
        # or: with oracle: eps = model(x, t, y)

The hooks are attached only inside ``with oracle:`` (or during ``oracle(...)``) and removed on exit; the caches
and the step state live on in the oracle, so a test can run a ``torch.compile``'d wrapper of the same module
between oracle calls without Dynamo ever tracing the hooks (do not call a compiled wrapper inside ``with
oracle:``). ``oracle.reset()`` forgets the caches (a new sampling run); ``oracle.calls`` logs ``(step, stream,
"full" | "cached")`` per model call. ``modules=`` restricts the hooked linears to a subset of the file's. A module
reachable under several paths (a block applied twice) is hooked once, with the factors of its first path in the file;
its calls in one forward get one slot each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IccOracle", "read_factors"]

_PARTS = ("q", "k", "v")


def read_factors(source: Any) -> dict[str, tuple[Tensor, Tensor]]:
    """``{key: (A, B)}`` from a factor file path, an object with ``keys()`` and ``get(key) -> (A, B)`` (fxdit's
    ``Factors``), or a mapping ``{key: (A, B)}``."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors import safe_open

        with safe_open(os.fspath(source), framework="pt", device="cpu") as f:
            names = list(f.keys())
            header = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in names}
        keys = None
        if "fxdit" in header:
            keys = json.loads(header["fxdit"]).get("keys")
        if keys is None:
            keys = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith((".A", ".B"))})
        return {k: (tensors[f"{k}.A"], tensors[f"{k}.B"]) for k in keys}
    if isinstance(source, Mapping):
        return {k: (v[0], v[1]) for k, v in source.items()}
    return {k: tuple(source.get(k)) for k in source.keys()}


class _Linear:
    """One hooked linear: its factor pairs in output-row order."""

    def __init__(self, path: str, module: nn.Linear, pairs: list[tuple[Tensor, Tensor]]) -> None:
        self.path = path
        self.module = module
        self.pairs = [(a.detach().double(), b.detach().double()) for a, b in pairs]
        out, inp = module.weight.shape
        if sum(a.shape[0] for a, _ in self.pairs) != out or any(b.shape[1] != inp for _, b in self.pairs):
            shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in self.pairs]
            raise ValueError(f"factors of {path} {shapes} do not fit its weight {tuple(module.weight.shape)}")
        if any(a.shape[1] != b.shape[0] for a, b in self.pairs):
            raise ValueError(f"factors of {path}: A is [out, r] and B is [r, in] with the same r")

    def increment(self, dx: Tensor) -> Tensor:
        """``dx·Bᵀ·Aᵀ`` in fp64, the row blocks of every pair concatenated."""
        d = dx.double()
        return torch.cat([(d @ b.t()) @ a.t() for a, b in self.pairs], dim=-1)


class IccOracle:
    """Eager ICC on ``model`` with factors ``factors`` and the full steps ``full_steps``; see the module docstring.

    Args:
        model: the module whose linears are hooked (its weights are not changed).
        factors: a factor file path, fxdit ``Factors``, or ``{key: (A, B)}``.
        full_steps: the step indices computed in full (every other step is cached).
        modules: hook only these module paths (default: every module the factors cover).
    """

    def __init__(self, model: nn.Module, factors: Any, full_steps: Iterable[int], *,
                 modules: Iterable[str] | None = None) -> None:
        self.model = model
        self.full_steps = frozenset(int(s) for s in full_steps)
        table = read_factors(factors)
        grouped: dict[str, dict[str | None, tuple[Tensor, Tensor]]] = {}
        for key, pair in table.items():
            path, sep, part = key.rpartition(":")
            if not (sep and part in _PARTS):
                path, part = key, None
            grouped.setdefault(path, {})[part] = pair
        wanted = None if modules is None else set(modules)
        self.linears: list[_Linear] = []
        hooked: set[int] = set()
        for path, parts in grouped.items():
            if wanted is not None and path not in wanted:
                continue
            module = model.get_submodule(path)
            if id(module) in hooked:  # a shared module reached under several paths: hooked once
                continue
            hooked.add(id(module))
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{path} is a {type(module).__name__}, not an nn.Linear")
            if None in parts:
                if len(parts) != 1:
                    raise ValueError(f"{path} has both joint and per-q/k/v factors")
                pairs = [parts[None]]
            else:
                if set(parts) != set(_PARTS):
                    raise ValueError(f"{path} has factors for {sorted(parts)} only; expected q, k and v")
                pairs = [parts[p] for p in _PARTS]
            self.linears.append(_Linear(path, module, pairs))
        if wanted is not None and wanted - {lin.path for lin in self.linears}:
            raise ValueError(f"no factors for {sorted(wanted - {lin.path for lin in self.linears})}")
        self.step: int | None = None
        self.calls: list[tuple[int, int, str]] = []
        self._stream = -1
        self._counts: dict[str, int] = {}
        self._caches: dict[tuple[int, str, int], tuple[Tensor, Tensor]] = {}
        self._handles: list[Any] = []

    # -- steps ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cache and the step (a new sampling run)."""
        self._caches.clear()
        self.step = None
        self._stream = -1

    def begin_step(self, step: int) -> None:
        """Start sampling step ``step``: the next model call is stream 0 of it."""
        if self.step is not None and step < self.step:
            raise ValueError(f"begin_step({step}) after step {self.step}; call reset() to start a new run")
        self.step = int(step)
        self._stream = -1

    @property
    def is_full(self) -> bool:
        """Whether the current step is a full step."""
        return self.step in self.full_steps

    # -- hooks ----------------------------------------------------------------------------------------------
    def __enter__(self) -> IccOracle:
        if self._handles:
            raise RuntimeError("IccOracle: hooks are already attached")
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call))
        for lin in self.linears:
            self._handles.append(lin.module.register_forward_hook(self._hook(lin), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the hooks attached."""
        with self:
            return self.model(*args, **kwargs)

    def _on_model_call(self, module: nn.Module, args: Any) -> None:
        if self.step is None:
            raise RuntimeError("IccOracle: call begin_step(step) before calling the model")
        self._stream += 1
        self._counts = {}
        self.calls.append((self.step, self._stream, "full" if self.is_full else "cached"))

    def _hook(self, lin: _Linear) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
            x = args[0] if args else kwargs["input"]
            call = self._counts.get(lin.path, 0)
            self._counts[lin.path] = call + 1
            slot = (self._stream, lin.path, call)
            if self.is_full:
                self._caches[slot] = (x.detach().clone(), output.detach().clone())
                return None
            if slot not in self._caches:
                raise RuntimeError(f"IccOracle: step {self.step} is cached but {lin.path} (stream {self._stream}, "
                                   f"call {call}) has no cache from a full step")
            x_c, y_c = self._caches[slot]
            if x.shape != x_c.shape or output.shape != y_c.shape:
                raise RuntimeError(f"IccOracle: {lin.path} input {tuple(x.shape)} at cached step {self.step}, "
                                   f"cached {tuple(x_c.shape)}")
            y = y_c.double() + lin.increment(x.double() - x_c.double())
            return y.to(output.dtype)

        return hook
