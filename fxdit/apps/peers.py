"""Peer step caches side by side with fxdit on a Flux model: diffusers' cache hooks, cache-dit and para-attn.

Peers (:data:`PEERS`, each at its documented settings):

- diffusers (``model.enable_cache(config)``, always installed with the ``diffusers`` extra): ``FirstBlockCache``,
  ``TaylorSeer``, ``MagCache`` (its ratios calibrated on the model first, the documented procedure for a model
  without published ratios), ``FasterCache`` and ``PyramidAttentionBroadcast``;
- cache-dit (``pip install fxdit[peers]``): DBCache, with and without its TaylorSeer calibrator, on the bare
  transformer (``cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...))``, refreshed between runs);
- para-attn (``pip install fxdit[peers]``): its first-block cache. para-attn 0.3.38's Flux adapter calls
  diffusers' single-stream blocks with the old signature (``block(hidden_states, temb=...)``); diffusers 0.42's
  blocks take ``(hidden_states, encoder_hidden_states, ...)`` and return both streams. :func:`_para_attn_blocks`
  subclasses para-attn's ``CachedTransformerBlocks`` and only changes that loop; the caching decision, buffers and
  residual reuse stay para-attn's. It is not in the ``peers`` extra: its sdist's ``dev`` extra names a direct-URL
  dependency, and pip 26.3 refuses the package for that even with ``--no-deps``. What worked here: download the
  sdist with an older pip (``pip==23.3.2``: ``pip download --no-deps para-attn==0.3.38``), build it with
  ``pip wheel --no-deps`` there, and install the wheel with ``pip install --no-deps``.

Every row is measured the same way (:func:`measure`): a private copy of the transformer gets the peer (eager, or
``torch.compile``-d after the peer is applied), one warm-up sampling run, then ``repeats`` timed runs from the same
noise (wall time: median and spread), PSNR/SSIM of the images against the full computation from the same noise,
class accuracy with the shipped digit classifier, Dynamo's graph breaks and recompiles over the runs (from Dynamo's
counters), and, for eager rows, the share of transformer blocks and of attention calls that really ran (counted
during the warm-up run). A peer that
cannot be built or run gets a row whose ``error`` is the exception it raised (type and message).

Example::

    from fxdit.apps import peers
    from fxdit.apps.models.flux import load_flux_demo
    demo = load_flux_demo()
    bench = peers.Bench.for_demo(demo, peers.BenchSettings(steps=28, per_class=1))
    ref = bench.reference()
    row = bench.measure(peers.PEERS["diffusers FirstBlockCache"], compiled=False)
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fxdit.apps import flow_sampler
from fxdit.apps.models.flux import FluxDemo
from fxdit.apps.quality import psnr, ssim
from fxdit.errors import FxditError

__all__ = [
    "FAMILIES",
    "METHODS",
    "MATCH_KNOBS",
    "PEERS",
    "Bench",
    "BenchSettings",
    "PeerSpec",
    "Row",
    "available",
    "format_markdown",
]

log = logging.getLogger(__name__)

#: Peer families and the package each needs (import name).
FAMILIES: dict[str, str] = {"diffusers": "diffusers", "cache-dit": "cache_dit", "para-attn": "para_attn"}

#: Methods per family.
METHODS: dict[str, tuple[str, ...]] = {
    "diffusers": ("FirstBlockCache", "TaylorSeer", "MagCache", "FasterCache", "PyramidAttentionBroadcast"),
    "cache-dit": ("DBCache", "DBCache+TaylorSeer"),
    "para-attn": ("FirstBlockCache",),
    "fxdit": ("plain", "inductor", "fxdit"),
}


@dataclass(frozen=True)
class PeerSpec:
    """One peer at one setting.

    Args:
        name: the row label.
        family: ``"diffusers"``, ``"cache-dit"``, ``"para-attn"`` (peers) or ``"fxdit"`` (plain, inductor and fxdit
            rows, so every row goes through the same measurement).
        method: one of :data:`METHODS` of the family.
        settings: the peer's config fields (diffusers: the ``*Config`` fields; cache-dit: ``DBCacheConfig`` fields
            plus ``taylorseer_order`` for the calibrator; para-attn: ``create_cache_context`` fields; fxdit: the
            backend options, where ``cache.factors`` may be ``{"svd_rank": r}`` for data-free SVD factors computed
            on the model).
        description: one line for the report.

    Raises:
        ValueError: for an unknown family or method, or settings that are not a mapping.
    """

    name: str
    family: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in METHODS:
            raise ValueError(f"family={self.family!r}; expected one of {', '.join(METHODS)}")
        if self.method not in METHODS[self.family]:
            raise ValueError(f"method={self.method!r}; expected one of {', '.join(METHODS[self.family])} for "
                             f"family {self.family!r}")
        if not isinstance(self.settings, Mapping):
            raise ValueError(f"settings={self.settings!r}; expected a mapping of config fields")

    def with_settings(self, name: str, **changes: Any) -> PeerSpec:
        """A copy named ``name`` with ``changes`` merged into the settings."""
        return dataclasses.replace(self, name=name, settings={**self.settings, **changes})


#: The peers at their documented settings (the defaults of each config, or the value its documentation gives for
#: Flux; cache-dit's DBCache default wants 8 leading compute blocks, more than the demo model has, so it runs F1B0,
#: the smallest configuration its documentation lists).
PEERS: dict[str, PeerSpec] = {p.name: p for p in [
    PeerSpec("diffusers FirstBlockCache", "diffusers", "FirstBlockCache", {"threshold": 0.05},
             "FirstBlockCacheConfig() defaults"),
    PeerSpec("diffusers TaylorSeer", "diffusers", "TaylorSeer", {},
             "TaylorSeerCacheConfig() defaults (cache_interval 5, disable_cache_before_step 3, order 1)"),
    PeerSpec("diffusers MagCache", "diffusers", "MagCache", {"threshold": 0.06, "max_skip_steps": 3,
                                                             "retention_ratio": 0.2},
             "MagCacheConfig() defaults, mag_ratios calibrated on the model (calibrate=True run)"),
    PeerSpec("diffusers FasterCache", "diffusers", "FasterCache",
             {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681),
              "unconditional_batch_skip_range": 5, "unconditional_batch_timestep_skip_range": (-1, 781),
              "attention_weight": 0.3, "tensor_format": "BFCHW",
              "_unconditional_conditional_input_kwargs_identifiers": (
                  "hidden_states", "encoder_hidden_states", "timestep", "pooled_projections")},
             "FasterCacheConfig as in diffusers' documentation example, with Flux's pooled_projections among the "
             "inputs split into the CFG halves"),
    PeerSpec("diffusers FasterCache (attention only)", "diffusers", "FasterCache",
             {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681),
              "attention_weight": 0.3, "is_guidance_distilled": True},
             "FasterCache's attention reuse alone (is_guidance_distilled=True: no unconditional-branch "
             "approximation)"),
    PeerSpec("diffusers PAB", "diffusers", "PyramidAttentionBroadcast",
             {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
             "PyramidAttentionBroadcastConfig as in diffusers' documentation example"),
    PeerSpec("cache-dit DBCache", "cache-dit", "DBCache",
             {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08},
             "DBCacheConfig F1B0, other fields default (residual_diff_threshold 0.08, 8 warm-up steps)"),
    PeerSpec("cache-dit DBCache+TaylorSeer", "cache-dit", "DBCache+TaylorSeer",
             {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
              "taylorseer_order": 1},
             "DBCache F1B0 with TaylorSeerCalibratorConfig(taylorseer_order=1)"),
    PeerSpec("para-attn FirstBlockCache", "para-attn", "FirstBlockCache", {"residual_diff_threshold": 0.08},
             "first-block cache, residual_diff_threshold 0.08 (its documented Flux value)"),
]}

#: The one knob per peer that trades time for quality, and the values tried (least to most skipping) when
#: matching a peer to a target wall time.
MATCH_KNOBS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "diffusers FirstBlockCache": ("threshold", (0.02, 0.05, 0.1, 0.2, 0.4)),
    "diffusers TaylorSeer": ("cache_interval", (2, 3, 5, 8)),
    "diffusers MagCache": ("threshold", (0.02, 0.06, 0.12, 0.24)),
    "diffusers FasterCache": ("spatial_attention_block_skip_range", (2, 3, 4)),
    "diffusers FasterCache (attention only)": ("spatial_attention_block_skip_range", (2, 3, 4)),
    "diffusers PAB": ("spatial_attention_block_skip_range", (2, 3, 4)),
    "cache-dit DBCache": ("residual_diff_threshold", (0.04, 0.08, 0.16, 0.32)),
    "cache-dit DBCache+TaylorSeer": ("residual_diff_threshold", (0.04, 0.08, 0.16, 0.32)),
    "para-attn FirstBlockCache": ("residual_diff_threshold", (0.04, 0.08, 0.16, 0.32)),
}


def available(spec: PeerSpec) -> bool:
    """Whether the package the peer needs is importable."""
    if spec.family == "fxdit":
        return True
    return importlib.util.find_spec(FAMILIES[spec.family]) is not None


@dataclass(frozen=True)
class BenchSettings:
    """What every row samples.

    Args:
        steps: Euler steps of a sampling run.
        classes: class labels to sample.
        per_class: samples per class.
        guidance_scale: CFG scale.
        seed: noise seed (sample i uses ``seed + i``).
        repeats: timed runs after the warm-up (the median is reported).
        progress: show tqdm bars.
        compile_backend: the ``torch.compile`` backend of compiled peer rows (``"inductor"``; ``"eager"`` traces
            with Dynamo only, for quick checks of graph breaks).

    Raises:
        ValueError: for a non-positive step, sample or repeat count.
    """

    steps: int = flow_sampler.DEFAULT_STEPS
    classes: tuple[int, ...] = tuple(range(10))
    per_class: int = 1
    guidance_scale: float = flow_sampler.DEFAULT_GUIDANCE
    seed: int = 0
    repeats: int = 3
    progress: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        for name in ("steps", "per_class", "repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected an integer >= 1")
        if not self.classes:
            raise ValueError("classes=(); expected at least one class")


@dataclass
class Row:
    """One measured row (``error`` is ``None`` when it ran).

    Attributes:
        name: the row label.
        family: see :class:`PeerSpec`.
        method: see :class:`PeerSpec`.
        settings: the settings it ran with (printable).
        compiled: whether it ran under ``torch.compile``.
        error: ``"<ExceptionType>: <message>"`` of what stopped it.
        times_s: wall time of each timed run.
        median_s: their median.
        spread_s: their max − min.
        psnr_db: PSNR against the full computation from the same noise.
        ssim: SSIM against it.
        class_accuracy: share of samples the digit classifier assigns to their class.
        graph_breaks: graph breaks Dynamo counted over warm-up and runs (compiled rows).
        recompiles: frames Dynamo compiled after the first model call (compiled rows).
        graphs: graphs Dynamo produced (compiled rows).
        blocks_run: share of transformer-block calls that ran (eager rows; 1.0 = no block skipped).
        attention_run: share of attention calls that ran (eager rows).
        load: ``os.getloadavg()`` 1-minute value before and after the timed runs.
        notes: extra facts (e.g. the calibrated MagCache ratios' length).
    """

    name: str
    family: str
    method: str
    settings: dict[str, Any]
    compiled: bool
    error: str | None = None
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    spread_s: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    class_accuracy: float | None = None
    graph_breaks: int | None = None
    recompiles: int | None = None
    graphs: int | None = None
    blocks_run: float | None = None
    attention_run: float | None = None
    load: tuple[float, float] | None = None
    notes: str = ""
    images: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "images"}
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = str(v)
        return out


def _error_text(exc: BaseException) -> str:
    """The exception as raised: its type and its message (first line)."""
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}".strip()


def _printable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), tuple, list)) else repr(v))
            for k, v in settings.items()}


# --------------------------------------------------------------------------------------------------------------
# Dynamo's counters (through fxdit's gate on private torch APIs)


def _dynamo_counts() -> dict[str, int]:
    from fxdit.kernels.torch_private import counters

    c = counters()
    return {"graph_breaks": int(sum(c["graph_break"].values())), "frames": int(c["frames"]["ok"]),
            "graphs": int(c["stats"]["unique_graphs"])}


# --------------------------------------------------------------------------------------------------------------
# block / attention accounting (eager rows)


@contextlib.contextmanager
def _count_calls(module: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count calls of each transformer block's first norm (it runs only when the block's own forward runs) and of
    each attention's query projection (it runs only when the attention is computed)."""
    counts = {"blocks": 0, "attention": 0}

    def bump(key: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counts[key] += 1
        return hook

    handles = []
    for name, mod in module.named_modules():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] in ("transformer_blocks", "single_transformer_blocks") \
                and parts[2] in ("norm1", "norm"):
            handles.append(mod.register_forward_pre_hook(bump("blocks")))
        if name.endswith("attn.to_q"):
            handles.append(mod.register_forward_pre_hook(bump("attention")))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _block_counts(module: torch.nn.Module) -> tuple[int, int]:
    blocks = len(getattr(module, "transformer_blocks", [])) + len(getattr(module, "single_transformer_blocks", []))
    attn = sum(1 for n, _ in module.named_modules() if n.endswith("attn.to_q"))
    return blocks, attn


# --------------------------------------------------------------------------------------------------------------
# para-attn: its first-block cache with the single-stream loop of diffusers >= 0.35


def _para_attn_blocks() -> type:
    """para-attn's ``CachedTransformerBlocks`` with the remaining-blocks loop calling diffusers' current Flux
    single-stream blocks (keyword arguments, both streams in and out)."""
    from para_attn.first_block_cache import utils

    class CachedFluxBlocks(utils.CachedTransformerBlocks):
        def call_remaining_transformer_blocks(self, hidden_states, encoder_hidden_states, *args, **kwargs):  # noqa: ANN001
            original_hidden_states = hidden_states
            original_encoder_hidden_states = encoder_hidden_states
            for block in self.transformer_blocks[1:]:
                encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, *args, **kwargs)
            for block in self.single_transformer_blocks:
                encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, *args, **kwargs)
            hidden_states = hidden_states.reshape(-1).contiguous().reshape(original_hidden_states.shape)
            encoder_hidden_states = (
                encoder_hidden_states.reshape(-1).contiguous().reshape(original_encoder_hidden_states.shape))
            hidden_states_residual = hidden_states - original_hidden_states
            encoder_hidden_states_residual = encoder_hidden_states - original_encoder_hidden_states
            return hidden_states, encoder_hidden_states, hidden_states_residual, encoder_hidden_states_residual

    return CachedFluxBlocks


def _apply_para_attn(module: torch.nn.Module) -> None:
    """para-attn's ``apply_cache_on_transformer`` for Flux, with :func:`_para_attn_blocks`."""
    import functools
    import unittest.mock

    cached = torch.nn.ModuleList([_para_attn_blocks()(module.transformer_blocks, module.single_transformer_blocks,
                                                      transformer=module, return_hidden_states_first=False)])
    empty = torch.nn.ModuleList()
    original_forward = module.forward

    @functools.wraps(original_forward)
    def new_forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN001
        with unittest.mock.patch.object(self, "transformer_blocks", cached), \
                unittest.mock.patch.object(self, "single_transformer_blocks", empty):
            return original_forward(*args, **kwargs)

    module.forward = new_forward.__get__(module)
    module._is_cached = True


# --------------------------------------------------------------------------------------------------------------
# building a row's callable


@dataclass
class _Built:
    """A row's callable and how to start a fresh sampling run with it."""

    fn: Callable[..., Any]
    module: torch.nn.Module
    run_context: Callable[[], contextlib.AbstractContextManager[Any]]
    notes: str = ""


class _Clock:
    """The current step's timestep (σ·1000), for peers that ask for it through a callback."""

    def __init__(self) -> None:
        self.timestep = 1000.0
        self.step = 0

    def __call__(self, step: int, timestep: float) -> None:
        self.step, self.timestep = step, timestep


def _diffusers_config(spec: PeerSpec, steps: int, clock: _Clock, mag_ratios: Sequence[float] | None) -> Any:
    import diffusers

    s = dict(spec.settings)
    if spec.method == "FirstBlockCache":
        return diffusers.FirstBlockCacheConfig(**s)
    if spec.method == "TaylorSeer":
        return diffusers.TaylorSeerCacheConfig(**s)
    if spec.method == "MagCache":
        return diffusers.MagCacheConfig(num_inference_steps=steps, mag_ratios=mag_ratios,
                                        calibrate=mag_ratios is None, **s)
    if spec.method == "FasterCache":
        weight = s.pop("attention_weight", 0.3)
        return diffusers.FasterCacheConfig(current_timestep_callback=lambda: clock.timestep,
                                           attention_weight_callback=lambda _: weight, **s)
    return diffusers.PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: clock.timestep, **s)


class _MagRatioCapture(logging.Handler):
    """Collects the ratios diffusers' MagCache logs at the end of a ``calibrate=True`` run."""

    PREFIX = "MagCache Calibration Results:"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ratios: list[float] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(self.PREFIX):
            self.ratios = [float(v) for v in ast.literal_eval(msg[len(self.PREFIX):].strip())]


class Bench:
    """Runs rows on one model from one noise (see the module docstring).

    Args:
        demo: the Flux demo model (or any :class:`~fxdit.apps.models.flux.FluxDemo`).
        settings: what every row samples.
        scorer: a :class:`fxdit.apps.quality.SampleScorer` for class accuracy, or ``None``.
    """

    def __init__(self, demo: FluxDemo, settings: BenchSettings, scorer: Any | None = None) -> None:
        self.demo = demo
        self.settings = settings
        self.scorer = scorer
        self.labels = flow_sampler.class_labels(settings.classes, settings.per_class)
        self.noise = flow_sampler.initial_noise(len(self.labels), (demo.channels, *demo.image_size), settings.seed)
        self.clock = _Clock()
        self.reference_images: torch.Tensor | None = None
        self._factors: dict[int, Any] = {}
        self._mag: dict[int, list[float]] = {}  # steps → MagCache ratios calibrated on the model

    @classmethod
    def for_demo(cls, demo: FluxDemo, settings: BenchSettings | None = None, *, score: bool = True) -> Bench:
        """A bench with the shipped digit classifier as scorer (``score=False``: no class accuracy)."""
        scorer = None
        if score:
            from fxdit.apps.quality import SampleScorer

            scorer = SampleScorer()
        return cls(demo, settings or BenchSettings(), scorer)

    # -- sampling ---------------------------------------------------------------------------------------------

    def _sample(self, fn: Callable[..., Any], run_context: Callable[[], contextlib.AbstractContextManager[Any]],
                desc: str) -> torch.Tensor:
        s = self.settings
        den = flow_sampler.FlowDenoiser.for_demo(self.demo, fn)
        with torch.no_grad(), run_context():
            return flow_sampler.flow_sample(den, self.labels, self.noise, self.demo.scheduler, steps=s.steps,
                                            guidance_scale=s.guidance_scale, progress=s.progress, desc=desc,
                                            on_step=self.clock)

    def example_call(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """One model call at the bench's batch shape (for calibration and analysis)."""
        x = torch.cat([self.noise] * (2 if self.settings.guidance_scale != 1.0 else 1))
        labels = torch.cat([torch.full_like(self.labels, self.demo.text_encoder.num_classes), self.labels])
        den = flow_sampler.FlowDenoiser.for_demo(self.demo)
        return (), den.example_call(x, torch.ones(x.shape[0]), labels[: x.shape[0]])

    # -- building -----------------------------------------------------------------------------------------------

    def _fxdit_options(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        import fxdit

        opts = copy.deepcopy(dict(settings))
        cache = opts.get("cache")
        if isinstance(cache, Mapping) and isinstance(cache.get("factors"), Mapping):
            rank = int(cache["factors"]["svd_rank"])
            if rank not in self._factors:
                self._factors[rank] = fxdit.calibrate(self.demo.transformer, method="svd", rank=rank,
                                                      example=self.example_call(), progress=False)
            opts["cache"] = {**cache, "factors": self._factors[rank]}
        return opts

    def build(self, spec: PeerSpec, *, compiled: bool) -> _Built:
        """Apply ``spec`` to a private copy of the transformer.

        Raises:
            Exception: whatever the peer raises while being applied (the caller records it).
        """
        module = copy.deepcopy(self.demo.transformer)
        null = contextlib.nullcontext
        if spec.family == "fxdit":
            if spec.method == "plain":
                return _Built(module, module, null)
            if spec.method == "inductor":
                return _Built(torch.compile(module, backend="inductor"), module, null)
            import fxdit

            fn = torch.compile(module, backend=fxdit.make_backend(self._fxdit_options(spec.settings)))
            return _Built(fn, module, lambda: fxdit.sampling(fn, calls_per_step=1))
        importlib.import_module(FAMILIES[spec.family])
        if spec.family == "diffusers":
            return self._build_diffusers(spec, module, compiled)
        if spec.family == "cache-dit":
            return self._build_cache_dit(spec, module, compiled)
        return self._build_para_attn(spec, module, compiled)

    def _build_diffusers(self, spec: PeerSpec, module: torch.nn.Module, compiled: bool) -> _Built:
        notes = ""
        ratios = None
        if spec.method == "MagCache":
            if self.settings.steps not in self._mag:
                self._mag[self.settings.steps] = self._mag_ratios(spec, module)
            ratios = self._mag[self.settings.steps]
            notes = f"mag_ratios: {len(ratios)} calibrated"
        module.enable_cache(_diffusers_config(spec, self.settings.steps, self.clock, ratios))
        fn = torch.compile(module, backend=self.settings.compile_backend) if compiled else module

        def call(**kwargs: Any) -> Any:
            with module.cache_context("cond"):
                return fn(**kwargs)

        @contextlib.contextmanager
        def run() -> Iterator[None]:
            module._reset_stateful_cache()
            yield

        return _Built(call, module, run, notes)

    def _mag_ratios(self, spec: PeerSpec, module: torch.nn.Module) -> list[float]:
        """Run diffusers' MagCache calibration (one full sampling run) on a copy and return its ratios (they do not
        depend on the skipping settings, so a bench calibrates once per step count)."""
        probe = copy.deepcopy(module)
        probe.enable_cache(_diffusers_config(spec, self.settings.steps, self.clock, None))
        capture = _MagRatioCapture()
        mag_log = logging.getLogger("diffusers.hooks.mag_cache")
        old_level = mag_log.level
        mag_log.addHandler(capture)
        mag_log.setLevel(logging.INFO)
        try:
            def call(**kwargs: Any) -> Any:
                with probe.cache_context("cond"):
                    return probe(**kwargs)

            with contextlib.redirect_stdout(_Sink()):
                self._sample(call, contextlib.nullcontext, "MagCache calibration")
        finally:
            mag_log.removeHandler(capture)
            mag_log.setLevel(old_level)
        if capture.ratios is None:
            raise FxditError("MagCache calibration run logged no ratios")
        return capture.ratios

    def _build_cache_dit(self, spec: PeerSpec, module: torch.nn.Module, compiled: bool) -> _Built:
        import cache_dit

        s = dict(spec.settings)
        order = s.pop("taylorseer_order", None)

        def configs() -> dict[str, Any]:
            out: dict[str, Any] = {"cache_config": cache_dit.DBCacheConfig(num_inference_steps=self.settings.steps,
                                                                            **s)}
            if spec.method == "DBCache+TaylorSeer":
                out["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order or 1)
            return out

        cache_dit.enable_cache(module, **configs())
        fn = torch.compile(module, backend=self.settings.compile_backend) if compiled else module

        @contextlib.contextmanager
        def run() -> Iterator[None]:
            cache_dit.refresh_context(module, **configs())
            yield

        return _Built(fn, module, run)

    def _build_para_attn(self, spec: PeerSpec, module: torch.nn.Module, compiled: bool) -> _Built:
        from para_attn.first_block_cache import utils

        _apply_para_attn(module)
        fn = torch.compile(module, backend=self.settings.compile_backend) if compiled else module

        def run() -> contextlib.AbstractContextManager[Any]:
            return utils.cache_context(utils.create_cache_context(**dict(spec.settings)))

        return _Built(fn, module, run)

    # -- measuring ----------------------------------------------------------------------------------------------

    def reference(self) -> torch.Tensor:
        """The full computation (the eager model) from the bench's noise: the images every row is compared with."""
        if self.reference_images is None:
            self.reference_images = self._sample(self.demo.transformer, contextlib.nullcontext, "reference")
        return self.reference_images

    def measure(self, spec: PeerSpec, *, compiled: bool, repeats: int | None = None, shares: bool = True) -> Row:
        """Build, warm up, time and score one row; an exception becomes the row's ``error``.

        Args:
            spec: the row.
            compiled: run it under ``torch.compile`` (fxdit rows: under their own backend).
            repeats: timed runs (default: the settings').
            shares: for eager rows, count the block and attention calls that ran (one more sampling run).
        """
        import os

        row = Row(spec.name, spec.family, spec.method, _printable(spec.settings), compiled)
        reps = repeats if repeats is not None else self.settings.repeats
        try:
            reference = self.reference()
            torch.compiler.reset()
            before = _dynamo_counts()
            built = self.build(spec, compiled=compiled)
            row.notes = built.notes
            first: dict[str, int] = {}

            def fn(**kwargs: Any) -> Any:
                out = built.fn(**kwargs)
                if not first:
                    first.update(_dynamo_counts())
                return out

            if not compiled and shares:  # eager: the warm-up run (untimed) also counts what ran
                row.blocks_run, row.attention_run = self._run_shares(built)
            else:
                self._sample(fn, built.run_context, f"{spec.name} (warm-up)")
            load0 = os.getloadavg()[0]
            images = None
            for i in range(reps):
                t0 = time.perf_counter()
                images = self._sample(fn, built.run_context, spec.name)
                row.times_s.append(time.perf_counter() - t0)
            row.load = (load0, os.getloadavg()[0])
            after = _dynamo_counts()
            if compiled:
                row.graph_breaks = after["graph_breaks"] - before["graph_breaks"]
                row.graphs = after["graphs"] - before["graphs"]
                row.recompiles = after["frames"] - first.get("frames", before["frames"])
            assert images is not None
            if not torch.isfinite(images).all():
                raise FxditError("the samples contain NaN/Inf")
        except Exception as exc:  # one row failing must not stop the comparison
            log.warning("%s (%s) failed: %s", spec.name, "compiled" if compiled else "eager", exc,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            row.error = _error_text(exc)
            return row
        finally:
            torch.compiler.reset()
        row.median_s = statistics.median(row.times_s)
        row.spread_s = max(row.times_s) - min(row.times_s)
        row.images = images
        row.psnr_db, row.ssim = psnr(images, reference), ssim(images, reference)
        if self.scorer is not None:
            row.class_accuracy = float(self.scorer.score(images, self.labels)["class_accuracy"])
        return row

    def _run_shares(self, built: _Built) -> tuple[float, float]:
        """Share of block calls and attention calls that ran over one sampling run (the warm-up of eager rows)."""
        with _count_calls(built.module) as counts:
            self._sample(built.fn, built.run_context, "counting")
        n_blocks, n_attn = _block_counts(built.module)
        calls = self.settings.steps
        return counts["blocks"] / max(1, n_blocks * calls), counts["attention"] / max(1, n_attn * calls)

    def time_once(self, spec: PeerSpec) -> float:
        """Wall time of one eager sampling run of ``spec`` (no warm-up, no scoring): the cheap probe of
        :meth:`match`.

        Raises:
            Exception: whatever the peer raises.
        """
        built = self.build(spec, compiled=False)
        t0 = time.perf_counter()
        self._sample(built.fn, built.run_context, spec.name)
        return time.perf_counter() - t0

    def match(self, spec: PeerSpec, target_s: float) -> tuple[PeerSpec, dict[Any, float]]:
        """The setting of ``spec``'s :data:`MATCH_KNOBS` knob whose eager run (one, timed by :meth:`time_once`)
        is closest to ``target_s``, and the time of every setting tried (a setting that raised is left out).
        ``spec`` itself when it has no knob or every setting raised."""
        if spec.name not in MATCH_KNOBS:
            return spec, {}
        knob, values = MATCH_KNOBS[spec.name]
        tried: dict[Any, float] = {}
        best: tuple[float, PeerSpec] | None = None
        for value in values:
            cand = spec.with_settings(f"{spec.name} (matched)", **{knob: value})
            try:
                tried[value] = self.time_once(cand)
            except Exception as exc:  # a setting the peer rejects is skipped
                log.warning("%s=%r: %s", knob, value, _error_text(exc))
                continue
            gap = abs(tried[value] - target_s)
            if best is None or gap < best[0]:
                best = (gap, cand)
        return (best[1] if best is not None else spec), tried


class _Sink:
    """A write-only text sink (MagCache calibration prints its ratios as well as logging them)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    return format(v, spec)


def format_markdown(rows: Sequence[Row], baseline: str | None = None) -> str:
    """A markdown table of rows (errors in their own column); ``baseline``: the row name speedups refer to."""
    base = next((r.median_s for r in rows if r.name == baseline and r.median_s), None)
    head = ("| row | compiled | median s | spread s | speedup | PSNR dB | SSIM | class acc | blocks run | attn run "
            "| graph breaks | recompiles | settings | error | notes |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        speed = base / r.median_s if base and r.median_s else None
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items() if k != "cache") or "–"
        if "cache" in r.settings:
            settings = f"cache={r.settings['cache']}" + (", " + settings if settings != "–" else "")
        err = (r.error or "").replace("|", "\\|")
        lines.append(
            f"| {r.name} | {'yes' if r.compiled else 'no'} | {_fmt(r.median_s, '.2f')} | {_fmt(r.spread_s, '.2f')} "
            f"| {_fmt(speed, '.2f')}x | {_fmt(r.psnr_db, '.1f')} | {_fmt(r.ssim, '.3f')} "
            f"| {_fmt(r.class_accuracy, '.2f')} | {_fmt(r.blocks_run, '.2f')} | {_fmt(r.attention_run, '.2f')} "
            f"| {_fmt(r.graph_breaks, 'd')} | {_fmt(r.recompiles, 'd')} | {settings.replace('|', '/')} | {err} "
            f"| {r.notes.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
