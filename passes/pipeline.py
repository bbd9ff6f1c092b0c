"""The pass pipeline: fxdit's graph passes, one per module, each ``verb_object(gm, cfg) -> PassReport``.

``PIPELINE`` is the order the backend runs them in on every graph Dynamo hands it. Analysis passes (``find_*``)
rewrite nothing; they leave typed records (:class:`~fxdit.passes._records.PassState`) for the rewriting passes
that follow. When ``plan_cache`` plans increment-calibrated caching, the graph is compiled as two variants, each
built by the pass named in ``VARIANT_PASSES`` on its own copy. :func:`run_passes` runs passes under the one
fallback policy (``on_pass_error``) and checks each against the state it declares (see ``passes/README.md``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from fxdit.kernels import torch_private
from fxdit.passes._base import PassFailed, PassReport, undeclared
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta
from fxdit.passes.find_attention import find_attention
from fxdit.passes.find_blocks import find_blocks
from fxdit.passes.insert_lowrank_increments import insert_lowrank_increments
from fxdit.passes.plan_cache import plan_cache
from fxdit.passes.record_linear_caches import record_linear_caches
from fxdit.passes.rewrite_grouped_attention import rewrite_grouped_attention
from fxdit.passes.shard_tokens import shard_tokens

from fxdit.config import FxditConfig
from fxdit.errors import FxditError

__all__ = ["PIPELINE", "VARIANT_PASSES", "ANALYSIS_PASSES", "PassReport", "find_attention", "find_blocks",
           "rewrite_grouped_attention", "shard_tokens", "plan_cache", "record_linear_caches",
           "insert_lowrank_increments", "run_passes", "run_variant"]

log = logging.getLogger(__name__)

#: The passes the backend runs, in order, on every graph Dynamo hands it.
PIPELINE = (find_attention, find_blocks, rewrite_grouped_attention, shard_tokens, plan_cache)

#: The passes that build ICC's two graph variants from the planned graph (each on its own copy).
VARIANT_PASSES = {"icc_full": record_linear_caches, "icc_cached": insert_lowrank_increments}

#: Passes that only analyse (the only ones kept for graphs that need gradients).
ANALYSIS_PASSES = frozenset({"find_attention", "find_blocks"})


def _run_one(p: Callable[..., PassReport], gm: fx.GraphModule, cfg: FxditConfig) -> PassReport:
    """Run pass ``p`` on ``gm`` and check the state it read and wrote against its declaration."""
    state = fxdit_meta(gm)
    state.reads.clear()  # type: ignore[attr-defined]
    state.writes.clear()  # type: ignore[attr-defined]
    report = p(gm, cfg)
    extra = undeclared(p, set(state.reads), set(state.writes))  # type: ignore[attr-defined]
    if extra is not None:
        raise RuntimeError(extra)
    return report


def run_passes(gm: fx.GraphModule, cfg: FxditConfig, *, passes: Sequence[Callable[..., PassReport]] = PIPELINE,
               dump: Any | None = None) -> tuple[fx.GraphModule, list[PassReport]]:
    """Run ``passes`` in order on ``gm`` (which it may mutate) and return the resulting module and reports.

    The fallback policy: with ``on_pass_error="fallback"`` each pass runs on a copy; when it raises, the copy is
    dropped, one warning names the pass, and the graph as it was before that pass goes on. With ``"raise"`` the
    error propagates as a ``RuntimeError`` naming the pass and those that ran before it. ``FxditError`` (about the
    user's input) always propagates unchanged.
    """
    reports: list[PassReport] = []
    ran: list[str] = []
    work = gm
    for p in passes:
        name = p.__name__
        if dump is not None:
            dump.before(name, work)
        if cfg.on_pass_error == "fallback":
            trial = fresh_copy(work)
            try:
                report = _run_one(p, trial, cfg)
            except FxditError:
                raise
            except Exception as exc:  # noqa: BLE001 - the documented fallback policy
                message = (f"fxdit: pass {name!r} failed ({type(exc).__name__}: {exc}); this graph continues "
                           f"without it (passes before it: {ran or 'none'})")
                warnings.warn(message, stacklevel=2)
                log.warning("%s", message, exc_info=log.isEnabledFor(logging.DEBUG))
                report = PassReport(name, skipped={f"pass failed: {type(exc).__name__}": 1},
                                    details={"error": f"{type(exc).__name__}: {exc}"})
                trial = work
            work = trial
        else:
            try:
                report = _run_one(p, work, cfg)
            except FxditError:
                raise
            except Exception as exc:
                raise RuntimeError(
                    f"fxdit: error in pass {name!r} (after passes {ran or 'none'}): {type(exc).__name__}: {exc}"
                ) from exc
        reports.append(report)
        ran.append(name)
        torch_private.counters()["fxdit"][name] += report.rewritten
        torch_private.counters()["fxdit"][f"{name}.matched"] += report.matched
        if dump is not None:
            dump.after(name, work, report)
    return work, reports


def run_variant(name: str, gm: fx.GraphModule, cfg: FxditConfig) -> tuple[fx.GraphModule, PassReport]:
    """Build ICC variant ``name`` (a key of :data:`VARIANT_PASSES`) on a copy of the planned graph ``gm``.

    Raises:
        PassFailed: the variant pass raised; under the fallback policy the caller compiles ``gm`` without caching
            (the graph as it was before caching was planned).
    """
    p = VARIANT_PASSES[name]
    work = fresh_copy(gm)
    try:
        report = _run_one(p, work, cfg)
    except FxditError:
        raise
    except Exception as exc:
        raise PassFailed(p.__name__, exc) from exc
    torch_private.counters()["fxdit"][p.__name__] += report.rewritten
    return work, report
