"""The ``fxdit`` torch.compile backend.

Usage::

    fast = torch.compile(model, backend="fxdit", options={"attention": {"mode": "grat-b"}})

The backend validates ``options`` into a frozen :class:`~fxdit.config.FxditConfig`, runs the pass
``PIPELINE`` on a copy of the graph Dynamo traced (analysis: ``find_attention``, ``find_blocks``; rewrites:
grouped attention, caching), then hands the result to inductor through
``compile_fx(gm, example_inputs, config_patches=...)``. It never changes inductor's global config.

Registered through the ``torch_dynamo_backends`` entry point; importing this module has no side effects.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxdit import registry
from fxdit.config import FxditConfig
from fxdit.errors import FxditError
from fxdit.kernels import torch_private
from fxdit.passes._base import PassReport
from fxdit.passes._fx_utils import fresh_copy, lifted_constants
from fxdit.passes.pipeline import ANALYSIS_PASSES, PIPELINE, run_passes

__all__ = ["fxdit_backend", "make_backend", "compile_graph", "run_pipeline"]

log = logging.getLogger(__name__)

#: Passes that only analyse; they also run when lossy rewrites are disabled (training, gradients).

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)
        log.warning("%s", message)


def fxdit_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None,
                  **kwargs: Any) -> Callable[..., Any]:
    """The backend Dynamo calls for each graph it traced.

    Args:
        gm: the graph Dynamo traced (left untouched; fxdit works on a copy).
        example_inputs: the graph's example inputs (real tensors, the model's parameters among them).
        options: the ``options=`` mapping given to ``torch.compile``; see the README's options table.

    Returns:
        A callable with the same calling convention as the graph.

    Raises:
        FxditError: when ``options`` contains an unknown key or a bad value.
    """
    if kwargs:
        log.warning("fxdit backend ignores unexpected keyword arguments: %s", sorted(kwargs))
    try:
        cfg = FxditConfig.from_options(options)
        return compile_graph(gm, example_inputs, cfg)
    except FxditError as exc:
        raise _through_dynamo(exc) from None


def make_backend(config: FxditConfig | Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """A backend callable bound to a typed config: ``torch.compile(model, backend=fxdit.make_backend(cfg))``."""
    cfg = FxditConfig.from_options(config)

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
        if kwargs:
            log.warning("fxdit backend ignores unexpected keyword arguments: %s", sorted(kwargs))
        try:
            return compile_graph(gm, example_inputs, cfg)
        except FxditError as exc:
            raise _through_dynamo(exc) from None

    backend.config = cfg  # type: ignore[attr-defined]
    backend.__name__ = "fxdit"
    return backend


_SURFACED: dict[type, type] = {}


def _through_dynamo(exc: FxditError) -> FxditError:
    """``exc`` as an error Dynamo lets through to the caller unchanged.

    Dynamo wraps whatever a backend raises in ``BackendCompilerFailed`` (a ``RuntimeError``), except subclasses of
    its ``ShortenTraceback``; so the user of ``torch.compile(..., backend="fxdit")`` would not see an
    :class:`FxditError`. The returned error is an instance of ``type(exc)`` (so of ``FxditError`` and ``ValueError``)
    and of ``ShortenTraceback``, with the same message and traceback. Without that class (another torch) ``exc`` is
    returned as it is.
    """
    passthrough = torch_private.dynamo_passthrough_error()
    if passthrough is None or isinstance(exc, passthrough):
        return exc
    cls = _SURFACED.get(type(exc))
    if cls is None:
        def __init__(self: Any, message: str) -> None:
            Exception.__init__(self, message)
            self.first_useful_frame = None  # ShortenTraceback keeps every frame then
            self.frame_exec_strategy = None

        cls = type(type(exc).__name__, (type(exc), passthrough), {"__init__": __init__, "__module__": "fxdit"})
        _SURFACED[type(exc)] = cls
    return cls(str(exc)).with_traceback(exc.__traceback__)


def _needs_grad(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )


#: The skip reason of the rewriting passes left out of a graph that needs gradients.
GRAD_LEFT_OUT = "graph needs gradients: inference-only rewrite left out"


def _passes_under_grad(cfg: FxditConfig) -> tuple[tuple[Callable[..., PassReport], ...], tuple[str, ...]]:
    """The passes for a graph that needs gradients (analysis only) and the names of those left out.

    Raises:
        FxditError: ``attention.allow_grad=True`` with grouped attention on: GRAT's op has no backward, so the
            opt-in is refused rather than silently ignored.
    """
    if cfg.attention.enabled and cfg.attention.allow_grad:
        raise FxditError(
            f"attention.allow_grad=True with attention.mode={cfg.attention.mode!r}; expected allow_grad=False: "
            "grouped attention has no backward, so a graph that needs gradients (training, or requires_grad "
            "outside torch.no_grad()) cannot use it. Leave allow_grad off (such graphs then stay dense, as plain "
            "inductor compiles them, with one warning) or run under torch.no_grad()/torch.inference_mode()")
    _warn_once("grad", "fxdit: this graph needs gradients (training or requires_grad outside no_grad); "
                       "lossy rewrites (grouped attention, caching) are inference-only and are left out. "
                       "Run sampling under torch.no_grad()/torch.inference_mode() to enable them.")
    kept = tuple(p for p in PIPELINE if p.__name__ in ANALYSIS_PASSES)
    return kept, tuple(p.__name__ for p in PIPELINE if p not in kept)


def run_pipeline(gm: fx.GraphModule, cfg: FxditConfig, *, passes: Sequence[Callable[..., PassReport]] = PIPELINE,
                 dump: Any | None = None) -> tuple[fx.GraphModule, list[PassReport]]:
    """Run ``passes`` on ``gm`` under the fallback policy (:func:`fxdit.passes.pipeline.run_passes`)."""
    return run_passes(gm, cfg, passes=passes, dump=dump)


def _decompositions(gm: fx.GraphModule) -> dict[Any, Callable[..., Any]] | None:
    """Inductor decompositions for fxdit's own ops that lower to compiled code on CPU (``None`` if none)."""
    try:
        from fxdit.kernels import ops
    except ImportError:  # pragma: no cover - ops not built yet
        return None
    extra = ops.decompositions_for(gm) if hasattr(ops, "decompositions_for") else {}
    if not extra:
        return None
    return {**torch_private.inductor_decomposition_table(), **extra}


def _op_patches(gm: fx.GraphModule) -> dict[str, Any]:
    """Inductor config patches the fxdit ops in ``gm`` need (``kernels.ops.inductor_patches_for``)."""
    try:
        from fxdit.kernels import ops
    except ImportError:  # pragma: no cover
        return {}
    return dict(ops.inductor_patches_for(gm)) if hasattr(ops, "inductor_patches_for") else {}


def lower(gm: fx.GraphModule, example_inputs: Sequence[Any], cfg: FxditConfig) -> Callable[..., Any]:
    """Compile one (rewritten) graph with inductor; lifted constants are appended to every call."""
    compile_fx = torch_private.inductor_compile_fx()
    consts = lifted_constants(gm)
    # Lifted constants enter as *static* fake tensors: real ones would be fakeified by aot_autograd with dynamic
    # sizes (they have no Dynamo source), and the C++ flex template then references undeclared size symbols.
    mode = torch_private.detect_fake_mode(list(example_inputs))
    fake_consts = [mode.from_tensor(c, static_shapes=True) for c in consts] if mode is not None else consts
    inputs = list(example_inputs) + fake_consts
    patches = {**_op_patches(gm), **cfg.inductor_patches}
    compiled = compile_fx(gm, inputs, config_patches=patches, decompositions=_decompositions(gm))
    if not consts:
        return compiled
    # Dynamo calls what compile_fx returns with positional arguments. (Its ``_boxed_call`` attribute is copied
    # from the inner boxed function by aot_autograd's ``simple_wraps`` and does not describe it: passing it one
    # list fails.)

    def with_constants(*args: Any) -> Any:
        return compiled(*args, *consts)

    return with_constants


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], cfg: FxditConfig) -> Callable[..., Any]:
    """Run the pipeline on a copy of ``gm``, compile the result and record it in :mod:`fxdit.registry`."""
    graph_id = registry.next_graph_id()
    dump = None
    if cfg.dump_dir:
        from fxdit.dump import GraphDump

        dump = GraphDump(cfg.dump_dir, graph_id, cfg)
        dump.input(gm, example_inputs)

    passes: Sequence[Callable[..., PassReport]] = PIPELINE
    left_out: tuple[str, ...] = ()
    if _needs_grad(example_inputs) and not cfg.lossless:
        passes, left_out = _passes_under_grad(cfg)

    lossy = not cfg.lossless and any(p.__name__ not in ANALYSIS_PASSES for p in passes)
    pinned = _pin_symbolic_sizes(gm) if lossy else 0
    work = fresh_copy(gm)
    from fxdit.passes._dataflow import record_position_ids

    record_position_ids(work, example_inputs)  # packed-latent models (Flux) show their token grid only in ids
    from fxdit import carry
    from fxdit.passes._fx_utils import fxdit_meta

    carried = carry.lookup(work, example_inputs)  # token layouts an earlier graph of the model handed over
    if carried:
        fxdit_meta(work)["carried_tokens"] = carried
    work, reports = run_pipeline(work, cfg, passes=passes, dump=dump)
    reports.extend(PassReport(name, skipped={GRAD_LEFT_OUT: 1}) for name in left_out)

    runtime = None
    state = fxdit_meta(work)
    compiled = None
    if state.get("cache_plan") is not None:
        from fxdit.runtime import VariantPassError, build_cached_runtime

        try:
            compiled, runtime, extra_reports = build_cached_runtime(work, example_inputs, cfg, lower=lower,
                                                                    dump=dump)
            reports.extend(extra_reports)
        except VariantPassError as exc:
            if cfg.on_pass_error != "fallback":
                raise
            # the same policy as run_pipeline: the graph as it was before the failing pass (no caching) goes on
            message = (f"fxdit: pass {exc.pass_name!r} failed ({type(exc.error).__name__}: {exc.error}); this graph "
                       "continues without caching")
            warnings.warn(message, stacklevel=2)
            log.warning("%s", message)
            reports.append(PassReport(exc.pass_name, skipped={f"pass failed: {type(exc.error).__name__}": 1},
                                      details={"error": f"{type(exc.error).__name__}: {exc.error}"}))
            runtime = None
    if compiled is None:
        compiled = lower(work, example_inputs, cfg)
    if state.get("output_tokens"):
        compiled = carry.tagging(compiled, state["output_tokens"])

    summary = _summary(work)
    if pinned:
        summary["pinned_symbolic_sizes"] = pinned
    record = registry.CompiledGraph(graph_id=graph_id, config=cfg, reports=tuple(reports), summary=summary,
                                    dump_dir=dump.path if dump is not None else None)
    registry.register(record, example_inputs, runtime)
    if dump is not None:
        dump.finish(work, reports, example_inputs)
    return compiled


def _pin_symbolic_sizes(gm: fx.GraphModule) -> int:
    """Specialise every symbolic size of the graph's inputs to its traced value; returns how many were symbolic.

    Lossy rewrites are built for the traced shapes (grouped-attention permutations and block masks, cache
    tensors), so a graph traced with symbolic sizes (``dynamic=True``, or Dynamo's automatic dynamic shapes on the
    second shape it sees) must not run at other sizes. ``int()`` of a ``SymInt`` records a guard in Dynamo's shape
    environment: the graph is compiled static, and a call at another shape is one recompile (with its own masks and
    caches) instead of a wrong result.
    """
    pinned = 0
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("example_value", node.meta.get("val"))
        sizes = []
        if isinstance(val, torch.SymInt):
            sizes = [val]
        elif isinstance(val, torch.Tensor):
            sizes = [s for s in (*val.shape, *val.stride(), val.storage_offset()) if isinstance(s, torch.SymInt)]
        for s in sizes:
            int(s)
            pinned += 1
    if pinned:
        log.info("fxdit: pinned %d symbolic input sizes to their traced values (lossy rewrites are per shape)",
                 pinned)
    return pinned


def _summary(gm: fx.GraphModule) -> dict[str, Any]:
    from fxdit.passes._fx_utils import fxdit_meta

    state = fxdit_meta(gm)
    sites = state.get("attention_sites") or []
    blocks = state.get("blocks") or []
    grid = state.get("token_grid")
    return {
        "attention_sites": len(sites),
        "blocks": len(blocks),
        "linears": sum(len(b.linears) for b in blocks),
        "token_grid": tuple(grid.shape) if grid is not None else None,
        **{k: v for k, v in state.items() if k.startswith("summary_")},
    }
