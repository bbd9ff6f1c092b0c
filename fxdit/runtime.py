"""Step state for cached sampling (ICC): which call is a full step, and the caches between calls.

For each graph it caches, the backend compiles two variants of the same graph (see
:func:`build_cached_runtime`): a *full* step that also outputs every cached linear's input and output, and a
*cached* step that takes those tensors as extra inputs and replaces the linears by low-rank increments. A
:class:`CacheRuntime` sits between Dynamo and the two: per call it picks the variant from the schedule
(``cfg.cache.schedule.is_full(step)``), keeps the tensors the last full step recorded, and returns only the
user's outputs. No graph break, no recompilation, and no host synchronisation are added: the decision uses
Python state only (and the timestep's value only when it lives on the CPU).

**Steps and runs.** A *run* is one sampling loop; its step counter starts at 0 (always a full step). A new run
starts

* on :func:`reset` (or entering/leaving ``with fxdit.sampling(model):``),
* when ``schedule.num_steps`` steps have been taken,
* when the timestep input rises (samplers count timesteps down) — only when the timestep is a tensor on the CPU
  (read without a device sync); a timestep on an accelerator is never read,
* when a call's input shapes differ from those its caches were recorded with (new batch size or resolution).

**Calls and streams (the stream-keying rule).** Classifier-free guidance either batches cond and uncond into
one call per step, or makes two calls per step with the same timestep. Caches are kept per *stream* = the
position of the call within its step (0, 1, ...), so the cond and uncond calls of two-call CFG keep separate
caches, and batched CFG (one call) uses stream 0 only. The position within a step is found as follows:

1. with ``fxdit.sampling(model, calls_per_step=n)``: call ``i`` of the run is stream ``i % n`` of step ``i // n``;
2. else, when the timestep is a CPU tensor: a call whose timestep equals the previous call's is the next stream
   of the same step; a lower timestep starts the next step (stream 0); a higher one starts a new run. A graph
   with several timestep-like inputs (guidance-distilled models embed the guidance scale like the timestep) is
   read on all of them: the same step when all are equal, a new run when any rises, else the next step;
3. else (timestep on an accelerator, or specialised into the graph as a Python number): every call is one step.
   Two-call CFG on an accelerator therefore needs ``calls_per_step=2``.

A cached step with no cache for its stream (or caches of other shapes) runs in full instead.

Cache memory is reported per graph as ``summary_cache_bytes`` (one stream) and dropped at the end of a run,
on :func:`reset` and when ``sampling()`` exits.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxdit.config import FxditConfig, ScheduleConfig
from fxdit.errors import FxditError
from fxdit.passes._base import PassFailed

__all__ = ["CacheRuntime", "RuntimeStats", "reset", "sampling", "build_cached_runtime", "runtimes_for"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class RuntimeStats:
    """Counters of one :class:`CacheRuntime` (since it was built; ``reset`` does not clear them)."""

    full_calls: int = 0
    cached_calls: int = 0
    forced_full: int = 0
    runs: int = 0
    schedule: list[bool] = field(default_factory=list)

    def clear(self) -> None:
        self.full_calls = self.cached_calls = self.forced_full = self.runs = 0
        self.schedule.clear()


class CacheRuntime:
    """Step state and caches for one compiled graph; called by Dynamo in place of the compiled graph.

    Args:
        full: the compiled full-step variant (outputs: user outputs, then cache tensors).
        cached: the compiled cached-step variant (inputs: graph inputs, then cache tensors).
        schedule: which steps are full.
        user_outputs: how many of the full variant's outputs are the user's.
        timestep_index: input index of the timestep, a tuple of indices when several inputs are embedded like a
            timestep (timestep and guidance scale), or ``None``.
        guard: ``"nonfinite"`` recomputes a cached step in full when its outputs are not finite.
        cache_bytes: bytes of one stream's caches.
    """

    def __init__(self, full: Callable[..., Any], cached: Callable[..., Any], schedule: ScheduleConfig, *,
                 user_outputs: int, timestep_index: int | tuple[int, ...] | None, guard: str = "none",
                 cache_bytes: int = 0, param_ids: frozenset[int] = frozenset()) -> None:
        self._full = full
        self._cached = cached
        self.schedule = schedule
        self.user_outputs = user_outputs
        self.timestep_index = timestep_index
        self.guard = guard
        self.cache_bytes = cache_bytes
        self.stats = RuntimeStats()
        self._param_ids = param_ids
        self._lock = threading.Lock()
        self._settings_version = -1
        self.calls_per_step: int | None = None
        self._clear()

    # -- state -------------------------------------------------------------------------------------------
    def _clear(self) -> None:
        self.step = -1
        self._stream = 0
        self._calls = 0
        self._last_t: tuple[float, ...] | None = None
        self._caches: dict[int, tuple[tuple, list[torch.Tensor]]] = {}

    def reset(self) -> None:
        """Start a new sampling run: step 0 next, caches dropped."""
        with self._lock:
            self._clear()

    @property
    def live_cache_bytes(self) -> int:
        """Bytes of cache tensors held right now (all streams)."""
        with self._lock:
            return sum(t.numel() * t.element_size() for _, ts in self._caches.values() for t in ts)

    def _refresh_settings(self) -> None:
        if self._settings_version != _settings_version:
            self._settings_version = _settings_version
            self.calls_per_step = _calls_per_step_for(self._param_ids)

    def _timestep(self, args: Sequence[Any]) -> tuple[float, ...] | None:
        index = self.timestep_index
        if index is None:
            return None
        values = []
        for i in (index,) if isinstance(index, int) else index:
            t = args[i] if i < len(args) else None
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 0:
                values.append(float(t.detach().max()))
            elif isinstance(t, (int, float)) and not isinstance(t, bool):
                values.append(float(t))
            else:
                return None
        return tuple(values) or None

    def _advance(self, args: Sequence[Any]) -> tuple[int, int]:
        """Update the step state for one call (lock held); returns ``(step, stream)``."""
        self._refresh_settings()
        new_run = self.step < 0
        if not new_run and self.calls_per_step:
            self._calls += 1
            step, stream = divmod(self._calls, self.calls_per_step)
        else:
            t = self._timestep(args) if not self.calls_per_step else None
            if new_run:
                step, stream = 0, 0
            elif t is not None and self._last_t is not None and t == self._last_t:
                step, stream = self.step, self._stream + 1
            elif t is not None and self._last_t is not None and any(a > b for a, b in zip(t, self._last_t)):
                new_run, step, stream = True, 0, 0
            else:
                step, stream = self.step + 1, 0
            self._last_t = t
            if new_run:
                self._calls = 0
        if not new_run and self.schedule.num_steps is not None and step >= self.schedule.num_steps:
            new_run, step, stream = True, 0, 0
            self._calls = 0
            self._last_t = self._timestep(args) if not self.calls_per_step else None
        if new_run:
            self.stats.runs += 1
            self._caches.clear()
        self.step, self._stream = step, stream
        return step, stream

    # -- calls -------------------------------------------------------------------------------------------
    def __call__(self, *call_args: Any) -> Any:
        args = list(call_args)
        signature = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        with self._lock:
            step, stream = self._advance(args)
            want_full = self.schedule.is_full(step)
            entry = self._caches.get(stream)
            if entry is not None and entry[0] != signature:
                # Other shapes than the caches were recorded with: a new run.
                self._clear()
                self.stats.runs += 1
                self.step, self._stream = 0, 0
                step, stream, want_full, entry = 0, 0, True, None
            full = want_full or entry is None
            if full and not want_full:
                self.stats.forced_full += 1
            caches = None if full else entry[1]
            self.stats.schedule.append(full)
        if not full:
            out = self._cached(*args, *caches)
            if self.guard == "nonfinite" and not all(bool(torch.isfinite(o).all()) for o in out
                                                      if isinstance(o, torch.Tensor)):
                log.warning("fxdit cache: cached step %d gave non-finite values; recomputing it in full", step)
                full = True
                with self._lock:
                    self.stats.forced_full += 1
                    self.stats.schedule[-1] = True
            else:
                with self._lock:
                    self.stats.cached_calls += 1
                return out
        out = self._full(*args)
        n = self.user_outputs
        # The cached variant was compiled for contiguous cache inputs (inductor asserts input strides); a
        # recorded linear input can be a view of a wider buffer (SD3's text stream sliced off the joint sequence).
        user, recorded = out[:n], [t.contiguous() if isinstance(t, torch.Tensor) else t for t in out[n:]]
        with self._lock:
            self.stats.full_calls += 1
            self._caches[stream] = (signature, recorded)
            if (self.schedule.num_steps is not None and step == self.schedule.num_steps - 1
                    and self.calls_per_step and stream == self.calls_per_step - 1):
                self._caches.clear()  # end of the run: nothing will read these again
        return user


# -- which runtimes belong to which model ------------------------------------------------------------------
_settings_lock = threading.Lock()
_settings_version = 0
_active: list[tuple[weakref.ref, int | None]] = []


def _param_ids_of(model: Any) -> set[int]:
    mod = getattr(model, "_orig_mod", model)
    if not isinstance(mod, torch.nn.Module):
        raise FxditError(f"model={type(model).__name__}; expected an nn.Module or a torch.compile'd module")
    return {id(p) for p in mod.parameters()}


def _calls_per_step_for(param_ids: frozenset[int]) -> int | None:
    with _settings_lock:
        for ref, n in reversed(_active):
            mod = ref()
            if mod is not None and param_ids & _param_ids_of(mod):
                return n
    return None


def runtimes_for(model: Any) -> list[CacheRuntime]:
    """The cache runtimes of ``model``'s compiled graphs (a module or its ``torch.compile`` wrapper)."""
    from fxdit import registry

    out = []
    for record in registry.records_for(model):
        rt = record.runtime
        if rt is not None:
            out.append(rt)
    return out


def reset(model: Any) -> None:
    """Start a new sampling run for ``model``: the next call is step 0 (a full step) and caches are dropped.

    Args:
        model: the module, or its ``torch.compile`` wrapper, compiled with ``backend="fxdit"``.
    """
    for rt in runtimes_for(model):
        rt.reset()


@contextmanager
def sampling(model: Any, *, calls_per_step: int | None = None) -> Iterator[None]:
    """One sampling run of ``model``: fresh caches on entry, caches freed on exit.

    Args:
        model: the module, or its ``torch.compile`` wrapper.
        calls_per_step: model calls per sampling step (2 for classifier-free guidance with separate cond and
            uncond calls); ``None`` infers it from the timestep input where it can (see the module docstring).

    Raises:
        FxditError: when ``calls_per_step`` is not a positive integer.
    """
    global _settings_version
    if calls_per_step is not None and (not isinstance(calls_per_step, int) or calls_per_step < 1):
        raise FxditError(f"sampling(calls_per_step={calls_per_step!r}); expected a positive integer or None")
    mod = getattr(model, "_orig_mod", model)
    _param_ids_of(mod)
    token = (weakref.ref(mod), calls_per_step)
    with _settings_lock:
        _active.append(token)
        _settings_version += 1
    reset(model)
    try:
        yield
    finally:
        with _settings_lock:
            if token in _active:
                _active.remove(token)
            _settings_version += 1
        reset(model)


# -- building -------------------------------------------------------------------------------------------------
#: An internal error in one of the passes that build ICC's two graph variants (``pass_name`` says which). The
#: backend treats it like a failing pipeline pass: with ``on_pass_error="fallback"`` the graph is compiled without
#: caching (one warning); with ``"raise"`` it surfaces.
VariantPassError = PassFailed


def build_cached_runtime(work: fx.GraphModule, example_inputs: Sequence[Any], cfg: FxditConfig, *,
                         lower: Callable[[fx.GraphModule, Sequence[Any], FxditConfig], Callable[..., Any]],
                         dump: Any | None = None) -> tuple[Callable[..., Any], CacheRuntime, list[Any]]:
    """Build and compile ICC's two graph variants of ``work`` and the runtime that alternates them.

    Args:
        work: the graph after the pass pipeline, with ``fxdit_meta(work)["cache_plan"]`` set.
        example_inputs: the graph's example inputs (real tensors).
        cfg: the fxdit config.
        lower: compiles one graph (``fxdit.backend.lower``).
        dump: the graph dump, if any (receives both variants).

    Returns:
        ``(callable for Dynamo, runtime, [report of the full variant, report of the cached variant])``.

    Raises:
        FxditError: when the factors' fingerprint does not match the weights.
    """
    from fxdit.passes._fx_utils import fxdit_meta
    from fxdit.passes.pipeline import run_variant
    from fxdit.passes.plan_cache import cache_slots, verify_factors

    state = fxdit_meta(work)
    plan = state["cache_plan"]
    if plan["mode"] == "increment" and not plan["verified"]:
        factors = state["cache_factors"].obj
        weights = {m: example_inputs[i] for m, i in plan["weight_index"].items() if i < len(example_inputs)}
        verify_factors(factors, weights)
        plan["verified"] = True

    full_gm, full_report = run_variant("icc_full", work, cfg)
    cached_gm, cached_report = run_variant("icc_cached", work, cfg)
    if dump is not None:
        dump.variant("icc_full", full_gm, full_report)
        dump.variant("icc_cached", cached_gm, cached_report)

    slots = cache_slots(plan)
    like = next((t for t in example_inputs if isinstance(t, torch.Tensor)), None)
    device = like.device if like is not None else torch.device("cpu")
    cache_examples = [torch.zeros(shape, dtype=_DTYPES.get(dt, torch.float32), device=device)
                      for _, _, shape, dt in slots]
    cache_bytes = sum(t.numel() * t.element_size() for t in cache_examples)

    full_fn = lower(full_gm, example_inputs, cfg)
    cached_fn = lower(cached_gm, list(example_inputs) + cache_examples, cfg)
    timesteps = plan.get("timesteps") or ((plan["timestep"],) if plan.get("timestep") else ())
    params = frozenset(id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter))
    runtime = CacheRuntime(
        full_fn, cached_fn, cfg.cache.schedule,
        user_outputs=full_report.details["user_outputs"],
        timestep_index=tuple(i for _, i in timesteps) or None,
        guard=cfg.cache.guard, cache_bytes=cache_bytes, param_ids=params,
    )
    state["summary_cache_bytes"] = cache_bytes
    state["summary_cache_linears"] = sum(not e["exact"] for e in plan["entries"])
    state["summary_cache_mode"] = plan["mode"]

    def call(*args: Any) -> Any:
        return runtime(*args)

    call.runtime = runtime  # type: ignore[attr-defined]  # keeps the runtime alive as long as Dynamo's code
    return call, runtime, [full_report, cached_report]
