"""The comparison engine behind ``fxdit demo`` and ``fxdit eval``.

Every mode is ONE entry of :data:`MODES`: a name, how to build the callable (``eager``, plain ``inductor``,
``fxdit`` with options, or a peer cache) and its step schedule. :func:`compare` samples every requested
mode from the same noise and labels with DDIM (η = 0) + batched CFG, times the sampling run (compilation
excluded: each compiled mode is warmed up with a short run first), estimates its MACs, compares its images
with the full computation (eager) and, for the shipped digits model, scores them with the digit classifier.
A mode that cannot be built or run shows as ``unavailable: <reason>``; the comparison never stops on it.

MACs are estimated per step from the model's layer shapes at the run's batch shape (``nn.Linear`` hooks,
SDPA calls, ``FlopCounterMode`` for the rest) and per mode from what it skips: a cached (ICC) step pays
``r·(in + out)`` per token instead of ``in·out`` for each cached linear, a plain-reuse step pays nothing for
them, grouped attention pays the attention MACs times the block density of its group pattern.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fxdit.apps.sampler as sampling
from fxdit.apps.quality import DEFAULT_GATES, Gates, psnr, ssim
from fxdit.errors import FxditError, did_you_mean

__all__ = [
    "MODES",
    "DEFAULT_DEMO_MODES",
    "CompareSettings",
    "Mode",
    "ModeResult",
    "SvdFactors",
    "compare",
    "format_table",
    "write_outputs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SvdFactors:
    """Placeholder for ``cache.factors`` in a mode's options: computed on the fly with
    ``fxdit.calibrate(model, method="svd", rank=rank)`` (data-free) when the mode is built."""

    rank: int | None = None  # None: CompareSettings.rank


@dataclass(frozen=True)
class Mode:
    """One row of the comparison.

    Attributes:
        name: the row label.
        backend: ``"eager"``, ``"inductor"``, ``"fxdit"``, ``"diffusers-cache"`` or ``"cache-dit"``.
        options: fxdit options (``backend="fxdit"``) or the peer's settings; an :class:`SvdFactors` value
            anywhere in them is replaced by factors computed for the model.
        steps: ``None`` (the run's step count) or ``"equal-macs:<mode>"`` (DDIM with as many steps as fit in
            that mode's MACs, rounded to the nearest).
        description: one line for the report.
    """

    name: str
    backend: str
    options: Mapping[str, Any] | None = None
    steps: str | None = None
    description: str = ""


_CACHE_SCHEDULE = {"period": 2}
_GRAT = {"mode": "grat-b", "group": (4, 4), "min_tokens": 0}

#: Every mode the demo knows, in table order.
MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("eager", "eager", description="the model as written (the full computation; reference for PSNR/SSIM)"),
    Mode("inductor", "inductor", description="torch.compile(model) with the default inductor backend"),
    Mode("fxdit (lossless)", "fxdit", {}, description="fxdit backend, no lossy rewrite (must match inductor)"),
    Mode("plain reuse", "fxdit", {"cache": {"mode": "reuse", "schedule": _CACHE_SCHEDULE}},
         description="baseline: cached steps reuse each cached linear's output from the last full step"),
    Mode("fxdit ICC", "fxdit", {"cache": {"factors": SvdFactors(), "schedule": _CACHE_SCHEDULE}},
         description="increment-calibrated caching, SVD factors, full step every 2nd step"),
    Mode("fxdit GRAT", "fxdit", {"attention": _GRAT},
         description="grouped attention GRAT-B, 4x4-token groups, radius 1"),
    Mode("ICC+GRAT", "fxdit", {"cache": {"factors": SvdFactors(), "schedule": _CACHE_SCHEDULE}, "attention": _GRAT},
         description="both"),
    Mode("fewer-step DDIM (equal MACs)", "inductor", steps="equal-macs:fxdit ICC",
         description="baseline: plain DDIM with the step count whose MACs equal fxdit ICC's"),
    Mode("diffusers FirstBlockCache", "diffusers-cache", {"config": "FirstBlockCacheConfig", "threshold": 0.05},
         description="peer: diffusers enable_cache(FirstBlockCacheConfig(threshold=0.05))"),
    Mode("diffusers TaylorSeer", "diffusers-cache", {"config": "TaylorSeerCacheConfig", "cache_interval": 2,
                                                     "disable_cache_before_step": 2},
         description="peer: diffusers enable_cache(TaylorSeerCacheConfig(cache_interval=2))"),
    Mode("cache-dit", "cache-dit", description="peer: cache-dit DBCache (if installed)"),
]}

DEFAULT_DEMO_MODES: tuple[str, ...] = tuple(MODES)


@dataclass(frozen=True)
class CompareSettings:
    """What to sample.

    Attributes:
        steps: DDIM steps of a full run.
        classes: class labels to sample.
        per_class: samples per class.
        guidance_scale: CFG scale.
        seed: noise seed (sample i uses ``seed + i``).
        rank: SVD rank for :class:`SvdFactors` placeholders.
        gates: PSNR/SSIM gates against the full computation.
        progress: show tqdm bars.
    """

    steps: int = 50
    classes: tuple[int, ...] = tuple(range(10))
    per_class: int = 1
    guidance_scale: float = sampling.DEFAULT_GUIDANCE
    seed: int = 0
    rank: int = 64
    gates: Gates = DEFAULT_GATES
    progress: bool = True


@dataclass
class ModeResult:
    """One row's numbers (``status`` is ``"ok"`` or ``"unavailable: <reason>"``)."""

    name: str
    status: str
    description: str = ""
    steps: int = 0
    time_s: float | None = None
    compile_s: float | None = None
    macs: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    gate_pass: bool | None = None
    class_accuracy: float | None = None
    is_score: float | None = None
    fd: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_inductor: float | None = None
    rewrites: dict[str, Any] = field(default_factory=dict)
    images: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "images"}
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = str(v)
        return out


# --------------------------------------------------------------------------------------------------------------
# MACs


@dataclass
class StepCost:
    """MACs of one full model call at the run's batch shape, split the way the modes need."""

    total: float
    attention: float
    linears: dict[str, tuple[float, int, int, int]]  # module path → (MACs, in, out, rows)
    grid: tuple[int, int] | None


#: Linear layers a cached step replaces (diffusers naming: attention q/k/v/out, feed-forward in/out).
_CACHED_LINEAR = re.compile(r"\.attn\d*\.(to_q|to_k|to_v|to_out\.0)$|\.ff\.net\.(0\.proj|2)$")


def measure_step_cost(model: torch.nn.Module, denoiser: sampling.Denoiser, x: torch.Tensor, t: torch.Tensor,
                      y: torch.Tensor) -> StepCost:
    """Count MACs of one eager call (linears by hook, SDPA by interception, the rest by FlopCounterMode)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    linears: dict[str, tuple[float, int, int, int]] = {}
    attn = [0.0]

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            rows = inputs[0].numel() // mod.in_features
            linears[name] = (float(rows * mod.in_features * mod.out_features), mod.in_features, mod.out_features,
                             rows)
        return fn

    class _SDPA(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, k = args[0], args[1]
                v = args[2] if len(args) > 2 else kwargs["value"]
                b = q.numel() // (q.shape[-2] * q.shape[-1])
                attn[0] += float(b * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
            return func(*args, **(kwargs or {}))

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter, _SDPA():
            sampling.Denoiser(model, denoiser.kind, denoiser.in_channels, denoiser.null_class, denoiser.text_cond,
                              denoiser.extra)(x, t, y)
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts().get("Global", {})
    other = sum(v for k, v in counts.items() if "scaled_dot_product" not in str(k)) / 2.0
    cfg = getattr(model, "config", None)
    grid = None
    if cfg is not None and hasattr(cfg, "sample_size") and hasattr(cfg, "patch_size") and cfg.patch_size:
        s = cfg.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        grid = (h // cfg.patch_size, w // cfg.patch_size)
    return StepCost(total=other + attn[0], attention=attn[0], linears=linears, grid=grid)


def grat_density(grid: tuple[int, int], group: Sequence[int], mode: str, radius: int = 1) -> float:
    """Fraction of (query group, key group) pairs GRAT computes on a 2-D token grid."""
    gh, gw = math.ceil(grid[0] / group[0]), math.ceil(grid[1] / group[1])
    total = 0
    for i in range(gh):
        for j in range(gw):
            if mode == "grat-b":
                total += (min(gh, i + radius + 1) - max(0, i - radius)) * (min(gw, j + radius + 1) - max(0, j - radius))
            else:  # grat-x: same row or column
                total += gh + gw - 1
    return total / float((gh * gw) ** 2)


def run_macs(cost: StepCost, options: Mapping[str, Any] | None, steps: int, rank: int) -> float:
    """Estimated MACs of a whole sampling run of a mode with fxdit ``options`` (``None``: plain)."""
    from fxdit.config import FxditConfig

    opts = _strip_placeholders(options or {})
    cfg = FxditConfig.from_options(opts)
    full = cost.total
    if cfg.attention.enabled and cost.grid is not None:
        group = cfg.attention.group or (16, 16)
        full -= cost.attention * (1.0 - grat_density(cost.grid, group, cfg.attention.mode, cfg.attention.radius))
    if not cfg.cache.enabled:
        return full * steps
    cached = full
    for name, (macs, fin, fout, rows) in cost.linears.items():
        if not _CACHED_LINEAR.search("." + name):
            continue
        cached -= macs
        if cfg.cache.mode == "increment":
            cached += float(rows * min(rank, fin, fout) * (fin + fout))
    n_full = sum(1 for i in range(steps) if cfg.cache.schedule.is_full(i))
    return n_full * full + (steps - n_full) * cached


def _strip_placeholders(obj: Any, replacement: Any = "factors.safetensors") -> Any:
    if isinstance(obj, SvdFactors):
        return replacement
    if isinstance(obj, Mapping):
        return {k: _strip_placeholders(v, replacement) for k, v in obj.items()}
    return obj


def _mode_rank(options: Mapping[str, Any] | None, default: int) -> int:
    """The SVD rank of a mode's :class:`SvdFactors` placeholder (``default`` when it names none)."""
    cache = (options or {}).get("cache")
    factors = cache.get("factors") if isinstance(cache, Mapping) else None
    if isinstance(factors, SvdFactors) and factors.rank is not None:
        return factors.rank
    return default


def _has_placeholder(obj: Any) -> bool:
    if isinstance(obj, SvdFactors):
        return True
    if isinstance(obj, Mapping):
        return any(_has_placeholder(v) for v in obj.values())
    return False


# --------------------------------------------------------------------------------------------------------------
# building a mode's callable


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, FxditError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}"[:300]


def _resolve_factors(model: torch.nn.Module, options: Mapping[str, Any], rank: int, memo: dict[int, Any],
                     example: tuple[tuple[Any, ...], dict[str, Any]] | None) -> Mapping[str, Any]:
    if not _has_placeholder(options):
        return options
    rank = _mode_rank(options, rank)
    if rank not in memo:
        import fxdit

        memo[rank] = fxdit.calibrate(model, method="svd", rank=rank, example=example, progress=False)
    return _strip_placeholders(options, memo[rank])


def build_callable(mode: Mode, model: torch.nn.Module, rank: int, memo: dict[int, Any],
                   example: tuple[tuple[Any, ...], dict[str, Any]] | None = None
                   ) -> tuple[Callable[..., Any], torch.nn.Module]:
    """The callable a mode samples with, and the module it wraps (for ``fxdit.sampling``).

    Raises:
        FxditError: when the mode cannot serve this model (the reason becomes the row's status).
    """
    if mode.backend == "eager":
        return model, model
    if mode.backend == "inductor":
        return torch.compile(model, backend="inductor"), model
    if mode.backend == "fxdit":
        import fxdit

        options = _resolve_factors(model, mode.options or {}, rank, memo, example)
        return torch.compile(model, backend=fxdit.make_backend(options)), model
    if mode.backend == "diffusers-cache":
        import diffusers

        if not hasattr(model, "enable_cache"):
            raise FxditError(f"not supported for {type(model).__name__} (diffusers enable_cache needs CacheMixin)")
        opts = dict(mode.options or {})
        cfg_cls = getattr(diffusers, opts.pop("config"))
        peer = copy.deepcopy(model)
        peer.enable_cache(cfg_cls(**opts))
        return peer, peer
    if mode.backend == "cache-dit":
        if importlib.util.find_spec("cache_dit") is None:
            raise FxditError("cache-dit is not installed (pip install cache-dit)")
        raise FxditError(f"cache-dit: not supported for {type(model).__name__} (it patches diffusers pipelines, "
                         "and this comparison drives the transformer directly)")
    raise FxditError(f"mode {mode.name!r}: backend={mode.backend!r}; expected eager, inductor, fxdit, "
                     "diffusers-cache or cache-dit")


# --------------------------------------------------------------------------------------------------------------
# the comparison


def _sample(fn: Callable[..., Any], wrapped: torch.nn.Module, model: torch.nn.Module, labels: torch.Tensor,
            noise: torch.Tensor, scheduler: Any, steps: int, s: CompareSettings, desc: str,
            fxdit_mode: bool) -> torch.Tensor:
    from fxdit.runtime import sampling as sampling_run

    den = sampling.Denoiser.for_model(model, fn, seed=s.seed)
    with torch.no_grad():
        if fxdit_mode:
            with sampling_run(fn):
                return sampling.ddim_sample(den, labels, noise, scheduler, steps=steps,
                                            guidance_scale=s.guidance_scale, progress=s.progress, desc=desc)
        if hasattr(wrapped, "_diffusers_hook"):
            _reset_diffusers_cache(wrapped)
        return sampling.ddim_sample(den, labels, noise, scheduler, steps=steps, guidance_scale=s.guidance_scale,
                                    progress=s.progress, desc=desc)


def _reset_diffusers_cache(module: torch.nn.Module) -> None:
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "reset_stateful_hooks"):
            registry.reset_stateful_hooks()


def _rewrite_summary(fn: Any, earlier: set[int]) -> dict[str, Any]:
    """Pass reports summed over the graphs compiled for this mode (records in ``earlier`` belong to others)."""
    import fxdit

    out: dict[str, Any] = {}
    try:
        records = [r for r in fxdit.reports(fn) if id(r) not in earlier]
    except Exception as exc:  # reports are informative only
        return {"error": _reason(exc)}
    for rec in records:
        for rep in rec.reports:
            entry = out.setdefault(rep.name, {"matched": 0, "rewritten": 0, "skipped": {}})
            entry["matched"] += rep.matched
            entry["rewritten"] += rep.rewritten
            for reason, n in rep.skipped.items():
                entry["skipped"][reason] = entry["skipped"].get(reason, 0) + n
    return out


def compare(loaded: sampling.LoadedModel, modes: Sequence[Mode], settings: CompareSettings,
            scorer: Any | None = None) -> list[ModeResult]:
    """Sample every mode from the same noise and labels and measure it (see the module docstring).

    ``eager`` is always run first (it is the reference), then the others in the given order.
    ``torch.compiler.reset()`` runs between compiled modes so each is compiled from scratch with its own backend.

    Args:
        loaded: the model (see :func:`fxdit.apps.sampler.load_dit`).
        modes: the rows.
        settings: what to sample.
        scorer: a :class:`fxdit.apps.quality.SampleScorer` for class accuracy / IS / FD, or ``None``.
    """
    model = loaded.transformer
    labels = sampling.class_labels(settings.classes, settings.per_class)
    shape = sampling.sample_shape(model)
    noise = sampling.initial_noise(len(labels), shape, settings.seed)
    den = sampling.Denoiser.for_model(model, seed=settings.seed)
    cfg_batch = 2 if settings.guidance_scale != 1.0 else 1
    xb = torch.cat([noise] * cfg_batch)
    yb = torch.cat([labels, torch.full_like(labels, den.null_class)])[: xb.shape[0]]
    tb = torch.full((xb.shape[0],), 999, dtype=torch.long)
    cost = measure_step_cost(model, den, xb, tb, yb)
    example = den.example_call(xb, tb, yb)
    memo: dict[int, Any] = {}
    order = [m for m in modes if m.name == "eager"] or [MODES["eager"]]
    order += [m for m in modes if m.name != "eager"]
    results: dict[str, ModeResult] = {}
    reference: torch.Tensor | None = None
    for mode in order:
        res = ModeResult(mode.name, "ok", mode.description)
        results[mode.name] = res
        try:
            steps = settings.steps
            if mode.steps is not None:
                steps = _equal_mac_steps(mode, cost, settings, {**MODES, **{m.name: m for m in modes}})
            res.steps = steps
            if mode.backend in ("eager", "inductor", "fxdit"):
                opts = mode.options if mode.backend == "fxdit" else None
                res.macs = run_macs(cost, opts, steps, _mode_rank(opts, settings.rank))
            torch.compiler.reset()
            from fxdit import registry

            earlier = {id(r) for r in registry.all_records()}
            t0 = time.perf_counter()
            fn, wrapped = build_callable(mode, model, settings.rank, memo, example)
            fxdit_mode = mode.backend == "fxdit"
            if mode.backend in ("inductor", "fxdit"):  # compile (and, for caches, both step kinds) outside timing
                _sample(fn, wrapped, model, labels, noise, loaded.scheduler, min(steps, 3), settings,
                        f"{mode.name} (warm-up)", fxdit_mode)
            res.compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            images = _sample(fn, wrapped, model, labels, noise, loaded.scheduler, steps, settings, mode.name,
                             fxdit_mode)
            res.time_s = time.perf_counter() - t0
            if fxdit_mode:
                res.rewrites = _rewrite_summary(fn, earlier)
            if not torch.isfinite(images).all():
                raise FxditError("the samples contain NaN/Inf")
        except Exception as exc:  # one mode failing must not stop the comparison
            log.warning("mode %r unavailable: %s", mode.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            res.status = f"unavailable: {_reason(exc)}"
            if mode.name == "eager":
                raise
            continue
        images = _decode(loaded, images)
        res.images = images
        if reference is None:
            reference = images
        res.psnr_db, res.ssim = psnr(images, reference), ssim(images, reference)
        res.gate_pass = settings.gates.passed(res.psnr_db, res.ssim)
        if scorer is not None:
            m = scorer.score(images, labels)
            res.class_accuracy, res.is_score, res.fd = m["class_accuracy"], m["is_score"], m["fd"]
    torch.compiler.reset()
    eager_t = results["eager"].time_s
    ind = results.get("inductor")
    ind_t = ind.time_s if ind is not None else None
    for res in results.values():
        if res.time_s:
            res.speedup_vs_eager = eager_t / res.time_s if eager_t else None
            res.speedup_vs_inductor = ind_t / res.time_s if ind_t else None
    return [results[m.name] for m in order]


def _equal_mac_steps(mode: Mode, cost: StepCost, s: CompareSettings, table: Mapping[str, Mode]) -> int:
    spec = mode.steps or ""
    if not spec.startswith("equal-macs:"):
        raise FxditError(f"mode {mode.name!r}: steps={spec!r}; expected None or 'equal-macs:<mode name>'")
    target = table.get(spec.split(":", 1)[1])
    if target is None:
        raise FxditError(f"mode {mode.name!r}: steps={spec!r} names no mode; expected one of {', '.join(table)}")
    target_macs = run_macs(cost, target.options, s.steps, _mode_rank(target.options, s.rank))
    return max(1, round(target_macs / cost.total))


def _decode(loaded: sampling.LoadedModel, x: torch.Tensor) -> torch.Tensor:
    if loaded.vae is None:
        return x.clamp(-1.0, 1.0)
    scale = getattr(loaded.vae.config, "scaling_factor", 1.0) or 1.0
    with torch.no_grad():
        return loaded.vae.decode(x / scale).sample.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# output


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:{spec}}{unit}"


def format_table(results: Sequence[ModeResult]) -> str:
    """The markdown table ``| mode | time | speedup vs eager | vs inductor | MACs | PSNR / SSIM vs full |
    class accuracy | FD |``."""
    lines = ["| mode | time | speedup vs eager | vs inductor | MACs | PSNR / SSIM vs full | class accuracy | FD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.name} | {r.status} | | | | | | |")
            continue
        name = r.name if r.steps == 0 else f"{r.name} ({r.steps} steps)"
        gate = "" if r.gate_pass is None else (" pass" if r.gate_pass else " FAIL")
        fid = f"{_fmt(r.psnr_db, '.1f', ' dB')} / {_fmt(r.ssim, '.3f')}{gate}"
        macs = _fmt(r.macs / 1e9 if r.macs is not None else None, ".0f", " G")
        acc = _fmt(r.class_accuracy * 100 if r.class_accuracy is not None else None, ".0f", " %")
        lines.append(f"| {name} | {_fmt(r.time_s, '.1f', ' s')} | {_fmt(r.speedup_vs_eager, '.2f', '×')} | "
                     f"{_fmt(r.speedup_vs_inductor, '.2f', '×')} | {macs} | {fid} | {acc} | {_fmt(r.fd, '.2f')} |")
    return "\n".join(lines)


def _to_uint8(img: torch.Tensor) -> Any:
    import numpy as np

    a = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if a.shape[0] == 1:
        return np.repeat(a.numpy(), 3, axis=0).transpose(1, 2, 0)
    return a[:3].numpy().transpose(1, 2, 0)


def _panel(images: torch.Tensor, per_class: int, title: str, scale: int) -> Any:
    """A labelled grid: one column per class, ``per_class`` rows (samples are ordered class by class)."""
    from PIL import Image, ImageDraw

    n, _c, h, w = images.shape
    cols = max(1, n // per_class)
    pad, head = 2, 14
    width = max(cols * (w * scale + pad) + pad, 8 * len(title))
    panel = Image.new("RGB", (width, head + per_class * (h * scale + pad) + pad), "white")
    for i in range(n):
        c, r = i // per_class, i % per_class
        tile = Image.fromarray(_to_uint8(images[i])).resize((w * scale, h * scale), Image.NEAREST)
        panel.paste(tile, (pad + c * (w * scale + pad), head + pad + r * (h * scale + pad)))
    ImageDraw.Draw(panel).text((pad, 1), title, fill="black")
    return panel


def _stack(panels: Sequence[Any]) -> Any:
    from PIL import Image

    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels) + 4 * (len(panels) - 1)),
                    "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height + 4
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_outputs(results: Sequence[ModeResult], out: str | Path, *, settings: CompareSettings,
                  meta: Mapping[str, Any]) -> dict[str, Path]:
    """Write labelled PNG grids (``compare_<mode>.png``: full, mode and 4×|difference| stacked; ``all_modes.png``:
    every mode stacked; one column per class), ``report.md`` and ``report.json`` to ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ref = next((r.images for r in results if r.name == "eager" and r.images is not None), None)
    scale = max(1, 64 // max(1, ref.shape[-1])) if ref is not None else 1
    written: dict[str, Path] = {}
    panels = []
    for r in results:
        if r.images is None:
            continue
        label = f"{r.name} ({r.steps} steps)"
        pc = settings.per_class
        panels.append(_panel(r.images, pc, label, scale))
        if ref is not None and r.name != "eager":
            diff = ((r.images - ref).abs() * 4 - 1).clamp(-1, 1)  # 4x |difference| in [-1, 1] units
            img = _stack([_panel(ref, pc, "full computation (eager)", scale), _panel(r.images, pc, label, scale),
                          _panel(diff, pc, "4 x |difference|", scale)])
            path = out / f"compare_{_slug(r.name)}.png"
            img.save(path)
            written[f"compare_{_slug(r.name)}"] = path
    if panels:
        path = out / "all_modes.png"
        _stack(panels).save(path)
        written["all_modes"] = path
    table = format_table(results)
    md = ["# fxdit comparison", "", table, "",
          f"Settings: DDIM (eta 0) {settings.steps} steps, CFG scale {settings.guidance_scale}, classes "
          f"{list(settings.classes)}, {settings.per_class} per class, seed {settings.seed}, SVD rank {settings.rank}. "
          f"Gates vs the full computation (eager, same noise): PSNR > {settings.gates.psnr_db} dB and SSIM > "
          f"{settings.gates.ssim}. Time: one sampling run after a warm-up run (compilation excluded). "
          "MACs: estimated per run from layer shapes (see fxdit/apps/demo.py). Class accuracy, the IS-like score and "
          "FD (Fréchet distance in the digit classifier's feature space vs all real digits) use the shipped "
          "classifier; with few samples FD is noisy and only comparable between rows. Timings are wall clock on a "
          "shared machine: see the load average below.", ""]
    md += ["| mode | what it is | IS-like | compile+warm-up | rewrites |", "|---|---|---|---|---|"]
    for r in results:
        rw = "; ".join(f"{k}: {v['rewritten']}/{v['matched']}" for k, v in r.rewrites.items()
                       if isinstance(v, dict) and v.get("rewritten")) or "—"
        md.append(f"| {r.name} | {r.description} | {_fmt(r.is_score, '.2f')} | {_fmt(r.compile_s, '.1f', ' s')} | "
                  f"{rw} |")
    md += ["", "Model: " + json.dumps(dict(meta), default=str), ""]
    (out / "report.md").write_text("\n".join(md))
    written["report.md"] = out / "report.md"
    payload = {"settings": {**dataclasses.asdict(settings), "gates": dataclasses.asdict(settings.gates)},
               "meta": dict(meta), "modes": [r.to_json() for r in results], "table": table}
    (out / "report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    written["report.json"] = out / "report.json"
    return written


def select_modes(names: Sequence[str] | None) -> list[Mode]:
    """Modes by name (``None``: all); raises :class:`FxditError` naming an unknown one."""
    if not names:
        return [MODES[n] for n in DEFAULT_DEMO_MODES]
    out = []
    for n in names:
        if n not in MODES:
            raise FxditError(f"--modes: unknown mode {n!r}{did_you_mean(n, MODES)}; expected some of "
                             f"{', '.join(MODES)}")
        out.append(MODES[n])
    return out
