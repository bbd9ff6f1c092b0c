"""``fxdit tune``: find the fastest fxdit configuration of a model that keeps its samples within a quality gate.

Given a model, sampler settings (DDIM steps, CFG scale) and a gate against the full computation from the same
noise (PSNR, SSIM), :func:`tune` searches ICC (method, rank, period / warm-up / cool-down), GRAT (mode, group,
radius, layers) and the DDIM step count, and returns the configuration with the shortest **measured** sampling
time that passes the gate on **held-out** seeds and class labels the search never saw.

How the search runs (every choice is seeded and every order fixed, so the same model gives the same answer):

1. **References.** The full computation (the model as written, eager) samples the *search* batch (seeds
   ``seed, seed + 1, ...``, labels cycling through the classes) and the *held-out* batches (seeds from
   ``seed + 1000``, the labels that follow) at the full step count.
2. **Factors.** Each ICC method is calibrated once, at the largest rank searched (``ca-svd``/``cd-svd`` on DDIM
   trajectories from their own seeds, ``seed + 10000``); a lower rank is the leading columns of that
   factorisation (:func:`truncate_factors`: the SVD's components are ordered, so this equals calibrating at the
   lower rank). An energy budget needs its own calibration (the per-layer rank depends on it).
3. **Quality screen** (cheap to rank, on the search batch): stages in a fixed order — the ICC *method* (each at
   the middle rank, period 2; the method does not change the cost, so the best-quality one goes on), then its
   *rank × period* grid, then *warm-up/cool-down* variants of the cheaper configurations that failed, then *GRAT*
   on its own, then the passing ICC and GRAT configurations *combined*. Within a stage candidates go in order of
   estimated MACs (cheapest first) and one whose MACs exceed the cheapest passing candidate's by more than
   ``slack`` is skipped (it could only win if the MAC estimate were badly wrong). Each compiled configuration is
   also sampled at fewer steps (descending; the first failing step count ends that configuration's list), from
   the same compiled function when its options do not depend on the step count. The screen's sampling run is
   also the first timing of each candidate (after the warm-up that compiles it).
4. **Timing** (successive halving): the ``finalists`` fastest candidates that passed the screen (by screen time,
   near-ties by MACs), plus plain inductor (the speed reference) and fxdit lossless (the fallback, always within
   the gate), are compiled again and timed ``reps`` times each (median); each finalist then samples the
   held-out batches.
5. **Choice.** Among the finalists that pass the gate on the held-out batches, the fastest median wins, except
   that every finalist within ``tie_tolerance`` (relative) of the fastest counts as a tie, and ties go to the
   fewest estimated MACs and then to the fixed candidate order. Timing noise below the tolerance therefore never
   flips the choice. A candidate failing the gate on the held-out batches is never returned; lossless fxdit at
   the full step count is always a finalist, and when even it fails (gates the full computation cannot meet),
   :func:`tune` raises.

``budget_s`` bounds the screen: once it is spent no new candidate is screened (the report says so, since the
answer then depends on how fast the machine was). Progress shows as a tqdm bar.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import fxdit.apps.sampler as sampling
from fxdit.apps.quality import Gates, psnr, ssim
from fxdit.config import AttentionConfig, FxditConfig
from fxdit.errors import FxditError

__all__ = [
    "Candidate",
    "Measured",
    "TuneResult",
    "TuneSettings",
    "TuneSpace",
    "QUICK_SPACE",
    "format_table",
    "truncate_factors",
    "tune",
    "write_outputs",
]

log = logging.getLogger(__name__)

#: ICC factorisations the tuner knows (``fxdit.calibration.METHODS``).
ICC_METHODS = ("svd", "ca-svd", "cd-svd")
LAYER_CHOICES = ("all", "inner")
#: Seed offsets of the held-out samples and of the calibration trajectories (disjoint from the search seeds).
HOLDOUT_SEED_OFFSET = 1000
CALIB_SEED_OFFSET = 10000


def _err(name: str, value: Any, expected: str) -> FxditError:
    return FxditError(f"{name}={value!r}; expected {expected}")


def _ints(name: str, value: Any, minimum: int, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _err(name, value, "a tuple of integers")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out) or any(v < minimum for v in out):
        raise _err(name, value, f"a tuple of integers >= {minimum}")
    if not out and not allow_empty:
        raise _err(name, value, "at least one value")
    return out


@dataclass(frozen=True)
class TuneSpace:
    """The configurations :func:`tune` may choose from.

    Args:
        methods: ICC factorisations (``"svd"``, ``"ca-svd"``, ``"cd-svd"``); empty: no caching searched.
        ranks: ICC ranks (every cached linear the same rank).
        energies: per-layer energy budgets in (0, 1] searched besides ``ranks`` (one calibration each).
        periods: full-step periods.
        warmups: leading full steps.
        cooldowns: trailing full steps.
        attention_modes: GRAT modes (``"grat-b"``, ``"grat-x"``); empty: dense attention only.
        groups: GRAT group shapes ``(gh, gw)`` in tokens; one that does not tile the token grid or that keeps every
            block (no saving) is left out.
        radii: GRAT-B radii.
        layers: ``"all"`` blocks or ``"inner"`` (all but the first and the last) for GRAT.
        step_fractions: DDIM step counts as fractions of the full count (1.0 is always included).
        combine_top: how many of the passing ICC and of the passing GRAT configurations are combined.
    """

    methods: tuple[str, ...] = ICC_METHODS
    ranks: tuple[int, ...] = (16, 32)
    energies: tuple[float, ...] = ()
    periods: tuple[int, ...] = (2, 3, 4)
    warmups: tuple[int, ...] = (0, 2)
    cooldowns: tuple[int, ...] = (0, 2)
    attention_modes: tuple[str, ...] = ("grat-b", "grat-x")
    groups: tuple[tuple[int, int], ...] = ((4, 4),)
    radii: tuple[int, ...] = (1,)
    layers: tuple[str, ...] = ("all",)
    step_fractions: tuple[float, ...] = (1.0, 0.8, 0.6)
    combine_top: int = 2

    def __post_init__(self) -> None:
        methods = tuple(self.methods)
        for m in methods:
            if m not in ICC_METHODS:
                raise _err("space.methods", self.methods, f"methods from {ICC_METHODS}")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "ranks", _ints("space.ranks", self.ranks, 1, allow_empty=bool(self.energies)))
        energies = tuple(self.energies)
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in energies):
            raise _err("space.energies", self.energies, "numbers in (0, 1]")
        object.__setattr__(self, "energies", tuple(float(e) for e in energies))
        object.__setattr__(self, "periods", _ints("space.periods", self.periods, 1))
        object.__setattr__(self, "warmups", _ints("space.warmups", self.warmups, 0))
        object.__setattr__(self, "cooldowns", _ints("space.cooldowns", self.cooldowns, 0))
        modes = tuple(self.attention_modes)
        for m in modes:
            if m not in ("grat-b", "grat-x"):
                raise _err("space.attention_modes", self.attention_modes, "modes from ('grat-b', 'grat-x')")
        object.__setattr__(self, "attention_modes", modes)
        groups = tuple(tuple(g) for g in self.groups)
        for g in groups:
            _ints("space.groups", g, 1)
            if len(g) != 2:
                raise _err("space.groups", self.groups, "(gh, gw) pairs")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "radii", _ints("space.radii", self.radii, 0))
        layers = tuple(self.layers)
        if not layers or any(v not in LAYER_CHOICES for v in layers):
            raise _err("space.layers", self.layers, f"choices from {LAYER_CHOICES}")
        object.__setattr__(self, "layers", layers)
        fr = tuple(self.step_fractions)
        if not fr or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fr):
            raise _err("space.step_fractions", self.step_fractions, "numbers in (0, 1]")
        object.__setattr__(self, "step_fractions", tuple(sorted({1.0, *map(float, fr)}, reverse=True)))
        if not isinstance(self.combine_top, int) or isinstance(self.combine_top, bool) or self.combine_top < 0:
            raise _err("space.combine_top", self.combine_top, "an integer >= 0")


#: A small space for ``--quick``: plain SVD, one rank, two periods, no GRAT, two step counts.
QUICK_SPACE = TuneSpace(methods=("svd",), ranks=(16,), periods=(2, 3), warmups=(0,), cooldowns=(0, 2),
                        attention_modes=(), step_fractions=(1.0, 0.8), combine_top=0)


@dataclass(frozen=True)
class TuneSettings:
    """How :func:`tune` samples, gates, times and budgets.

    Args:
        steps: DDIM steps of the full computation (the reference).
        guidance_scale: CFG scale.
        gates: PSNR/SSIM gates against the full computation from the same noise (both must be exceeded).
        search_samples: samples in the search batch (and in every held-out batch, so no shape recompiles).
        holdout_batches: held-out batches (other seeds, other labels).
        classes: class labels the samples cycle through (``None``: every class of a class-conditional model).
        seed: first noise seed of the search batch.
        search_margin_db: the search batch must clear the PSNR gate by this much (the held-out check is exact).
        finalists: candidates timed in full and checked on the held-out batches.
        reps: timed runs per finalist (median).
        tie_tolerance: relative time difference below which two finalists tie (then fewer MACs wins).
        slack: a candidate whose estimated MACs exceed the cheapest passing one's by more than this is skipped.
        calib_samples: trajectories for ``ca-svd``/``cd-svd`` calibration.
        budget_s: seconds the quality screen may take before it stops screening new candidates.
        baseline_backend: the ``torch.compile`` backend of the speed reference (``"inductor"``; ``"eager"`` or
            ``"aot_eager"`` to skip its compile, e.g. in tests).
        progress: show a tqdm bar.
    """

    steps: int = 50
    guidance_scale: float = sampling.DEFAULT_GUIDANCE
    gates: Gates = Gates(psnr_db=30.0, ssim=0.90)
    search_samples: int = 2
    holdout_batches: int = 2
    classes: tuple[int, ...] | None = None
    seed: int = 0
    search_margin_db: float = 1.0
    finalists: int = 3
    reps: int = 3
    tie_tolerance: float = 0.10
    slack: float = 0.15
    calib_samples: int = 16
    budget_s: float = 600.0
    baseline_backend: str = "inductor"
    progress: bool = True

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("search_samples", 1), ("holdout_batches", 1), ("finalists", 1),
                              ("reps", 1), ("calib_samples", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise _err(f"settings.{name}", v, f"an integer >= {minimum}")
        for name in ("guidance_scale", "search_margin_db", "tie_tolerance", "slack", "budget_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise _err(f"settings.{name}", v, "a finite number >= 0")
        if self.budget_s <= 0:
            raise _err("settings.budget_s", self.budget_s, "a number of seconds > 0")
        if not isinstance(self.gates, Gates):
            raise _err("settings.gates", self.gates, "a fxdit.apps.quality.Gates")
        if self.classes is not None:
            object.__setattr__(self, "classes", _ints("settings.classes", self.classes, 0))
        if self.baseline_backend not in ("inductor", "eager", "aot_eager"):
            raise _err("settings.baseline_backend", self.baseline_backend, "'inductor', 'eager' or 'aot_eager'")


@dataclass(frozen=True)
class Candidate:
    """One configuration: a DDIM step count, an ICC setting and a GRAT setting.

    Attributes:
        steps: DDIM steps.
        method: ICC factorisation, or ``None`` for no caching.
        rank: ICC rank (``None`` with ``energy``).
        energy: ICC energy budget, or ``None``.
        period, warmup, cooldown: the ICC schedule.
        attention: ``"dense"``, ``"grat-b"`` or ``"grat-x"``.
        group, radius, layers: the GRAT setting (``layers`` is ``"all"`` or ``"inner"``).
    """

    steps: int
    method: str | None = None
    rank: int | None = None
    energy: float | None = None
    period: int = 2
    warmup: int = 0
    cooldown: int = 0
    attention: str = "dense"
    group: tuple[int, int] | None = None
    radius: int = 1
    layers: str = "all"

    @property
    def cached(self) -> bool:
        return self.method is not None

    def label(self) -> str:
        parts = []
        if self.method is not None:
            size = f"e{self.energy:g}" if self.energy is not None else f"r{self.rank}"
            sched = f"p{self.period}" + (f" w{self.warmup}" if self.warmup else "") + (
                f" c{self.cooldown}" if self.cooldown else "")
            parts.append(f"ICC {self.method} {size} {sched}")
        if self.attention != "dense":
            g = "x".join(map(str, self.group or ()))
            parts.append(f"{self.attention.upper()} {g}" + (f" r{self.radius}" if self.attention == "grat-b" else "")
                         + ("" if self.layers == "all" else f" {self.layers}"))
        return (" + ".join(parts) or "lossless") + f" @ {self.steps} steps"

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def options(self, factors: Any, num_blocks: int | None) -> dict[str, Any]:
        """fxdit backend options (``factors``: a ``Factors`` object or a file path)."""
        opts: dict[str, Any] = {}
        if self.method is not None:
            schedule: dict[str, Any] = {"period": self.period}
            if self.warmup:
                schedule["warmup"] = self.warmup
            if self.cooldown:
                schedule["cooldown"] = self.cooldown
                schedule["num_steps"] = self.steps
            opts["cache"] = {"factors": factors, "schedule": schedule}
        if self.attention != "dense":
            att: dict[str, Any] = {"mode": self.attention, "group": list(self.group or ()), "min_tokens": 0}
            if self.attention == "grat-b":
                att["radius"] = self.radius
            if self.layers == "inner" and num_blocks is not None:
                att["layers"] = list(range(1, max(1, num_blocks - 1)))
            opts["attention"] = att
        return opts


@dataclass
class Measured:
    """What the tuner measured for one candidate."""

    candidate: Candidate
    stage: str
    macs: float
    status: str = "ok"
    search_psnr_db: float | None = None
    search_ssim: float | None = None
    search_pass: bool | None = None
    screen_time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    holdout_psnr_db: float | None = None
    holdout_ssim: float | None = None
    holdout_pass: bool | None = None

    @property
    def label(self) -> str:
        return self.candidate.label()

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "candidate"}
        out["candidate"] = dataclasses.asdict(self.candidate)
        out["label"] = self.label
        out["median_s"] = self.median_s
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = str(v)
        return out


@dataclass
class TuneResult:
    """The tuner's answer and everything it measured.

    Attributes:
        best: the chosen candidate (it passed the gate on the held-out batches; when no finalist does, not even
            lossless fxdit, :func:`tune` raises instead).
        options: fxdit options of ``best`` with the factors as an in-memory ``Factors`` (or ``{}``).
        factors: the ``Factors`` of ``best`` (``None`` without caching).
        inductor: plain inductor (``settings.baseline_backend``) at the full step count (the speed reference),
            timed like the finalists.
        candidates: every candidate screened or skipped, in the order they were considered.
        settings, space: what was searched.
        elapsed_s: wall time of the whole search; ``budget_exhausted``: the screen stopped on the budget.
        meta: model, machine load and thread count.
    """

    best: Measured
    options: dict[str, Any]
    factors: Any
    inductor: Measured
    candidates: list[Measured]
    settings: TuneSettings
    space: TuneSpace
    elapsed_s: float
    budget_exhausted: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup_vs_inductor(self) -> float | None:
        a, b = self.inductor.median_s, self.best.median_s
        return a / b if a and b else None


# --------------------------------------------------------------------------------------------------------------
# factors


def truncate_factors(factors: Any, rank: int) -> Any:
    """The rank-``rank`` factors contained in a higher-rank factorisation: ``A[:, :r]``, ``B[:r]`` per key.

    Both ``A = diag(l)⁻¹·U_r·S_r`` and ``B = V_rᵀ·diag(ρ)⁻¹`` keep the SVD's components in descending order, so the
    leading ``r`` columns/rows are exactly the rank-``r`` weighted-SVD factors. Exact keys (rank ≥ min(out, in))
    and keys already at or below ``rank`` are kept as they are.

    Raises:
        FxditError: for a rank < 1.
    """
    from fxdit.calibration import Factors

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _err("rank", rank, "an integer >= 1")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in factors.keys():
        A, B = factors.get(key)
        if key in factors.exact or B.shape[0] <= rank:
            out[key] = (A, B)
        else:
            out[key] = (A[:, :rank].contiguous(), B[:rank].contiguous())
    info = {k: {**v, "energy": None, "pca_energy": None} if k not in factors.exact else dict(v)
            for k, v in factors.info.items()}
    meta = {**factors.meta, "rank": rank, "truncated_from": factors.meta.get("rank")}
    return Factors(out, method=factors.method, exact=factors.exact, fingerprint=factors.fingerprint, info=info,
                   meta=meta)


class _FactorBank:
    """Calibrates each method once (at the largest rank searched) and hands out truncations; energies per call."""

    def __init__(self, loaded: sampling.LoadedModel, settings: TuneSettings, example: Any, top_rank: int) -> None:
        self.loaded, self.settings, self.example, self.top_rank = loaded, settings, example, top_rank
        self._full: dict[tuple[str, float | None], Any] = {}
        self.calibration_s: dict[str, float] = {}

    def _calib_data(self, method: str) -> Any:
        if method == "svd":
            return None
        model, s = self.loaded.transformer, self.settings
        shape = sampling.sample_shape(model)
        den = sampling.Denoiser.for_model(model, seed=s.seed)
        n_classes = max(1, den.null_class) if den.kind == "class" else 1
        batch = min(8, s.calib_samples)

        def run_trajectories(m: torch.nn.Module) -> None:
            from fxdit.calibration import new_trajectory

            d = sampling.Denoiser.for_model(m, seed=s.seed)
            done, i = 0, 0
            while done < s.calib_samples:
                n = min(batch, s.calib_samples - done)
                g = torch.Generator().manual_seed(s.seed + CALIB_SEED_OFFSET + i)
                labels = torch.randint(0, n_classes, (n,), generator=g)
                noise = torch.randn((n, *shape), generator=g)
                new_trajectory()
                sampling.ddim_sample(d, labels, noise, self.loaded.scheduler, steps=s.steps, guidance_scale=1.0,
                                     progress=False)
                done, i = done + n, i + 1

        return run_trajectories

    def get(self, method: str, rank: int | None, energy: float | None) -> Any:
        import fxdit

        key = (method, energy)
        if key not in self._full:
            t0 = time.perf_counter()
            self._full[key] = fxdit.calibrate(
                self.loaded.transformer, self._calib_data(method), method=method,
                rank=self.top_rank if energy is None else None, energy=energy, example=self.example,
                num_samples=self.settings.calib_samples, progress=False)
            self.calibration_s[f"{method}" + ("" if energy is None else f" e{energy:g}")] = time.perf_counter() - t0
            log.info("tune: calibrated %s%s in %.1f s", method, "" if energy is None else f" energy {energy}",
                     time.perf_counter() - t0)
        full = self._full[key]
        return full if energy is not None or rank is None or rank >= self.top_rank else truncate_factors(full, rank)


# --------------------------------------------------------------------------------------------------------------
# the search


def default_timer(candidate: Candidate, run: Callable[[], Any]) -> float:
    """Run one sampling run and return its wall time in seconds (``time.perf_counter``)."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


class _Tuner:
    def __init__(self, loaded: sampling.LoadedModel, settings: TuneSettings, space: TuneSpace,
                 timer: Callable[[Candidate, Callable[[], Any]], float]) -> None:
        from fxdit.apps.demo import measure_step_cost

        self.loaded, self.s, self.space, self.timer = loaded, settings, space, timer
        self.model = loaded.transformer
        model = self.model
        self.shape = sampling.sample_shape(model)
        den = sampling.Denoiser.for_model(model, seed=settings.seed)
        if den.kind == "class":
            classes = settings.classes if settings.classes is not None else tuple(range(max(1, den.null_class)))
        else:
            classes = settings.classes or (0,)
        n = settings.search_samples
        cycle = itertools.cycle(classes)
        self.search_labels = torch.tensor([next(cycle) for _ in range(n)], dtype=torch.long)
        self.holdout_labels = [torch.tensor([next(cycle) for _ in range(n)], dtype=torch.long)
                               for _ in range(settings.holdout_batches)]
        self.search_noise = sampling.initial_noise(n, self.shape, settings.seed)
        self.holdout_noise = [sampling.initial_noise(n, self.shape, settings.seed + HOLDOUT_SEED_OFFSET + b * n)
                              for b in range(settings.holdout_batches)]
        cfg_batch = 2 if settings.guidance_scale != 1.0 else 1
        xb = torch.cat([self.search_noise] * cfg_batch)
        yb = torch.cat([self.search_labels, torch.full_like(self.search_labels, den.null_class)])[: xb.shape[0]]
        tb = torch.full((xb.shape[0],), 999, dtype=torch.long)
        self.cost = measure_step_cost(model, den, xb, tb, yb)
        self.example = den.example_call(xb, tb, yb)
        self.num_blocks = _num_blocks(model)
        ranks = list(space.ranks)
        self.top_rank = max(ranks) if ranks else 1
        self.bank = _FactorBank(loaded, settings, self.example, self.top_rank)
        self.step_counts = sorted({max(1, round(settings.steps * f)) for f in space.step_fractions}, reverse=True)
        self.measured: list[Measured] = []
        self._seen: set[str] = set()
        self.t0 = time.perf_counter()
        self.budget_exhausted = False
        self.bar: Any = None

    # -- sampling -------------------------------------------------------------------------------------------

    def _sample(self, fn: Callable[..., Any], fxdit_mode: bool, labels: torch.Tensor, noise: torch.Tensor,
                steps: int) -> torch.Tensor:
        from fxdit.runtime import sampling as sampling_run

        den = sampling.Denoiser.for_model(self.model, fn, seed=self.s.seed)
        with torch.no_grad():
            if fxdit_mode:
                with sampling_run(fn):
                    x = sampling.ddim_sample(den, labels, noise, self.loaded.scheduler, steps=steps,
                                             guidance_scale=self.s.guidance_scale, progress=False)
            else:
                x = sampling.ddim_sample(den, labels, noise, self.loaded.scheduler, steps=steps,
                                         guidance_scale=self.s.guidance_scale, progress=False)
        return _decode(self.loaded, x)

    def references(self) -> None:
        steps = self.s.steps
        self.ref_search = self._sample(self.model, False, self.search_labels, self.search_noise, steps)
        self.ref_holdout = [self._sample(self.model, False, lab, noi, steps)
                            for lab, noi in zip(self.holdout_labels, self.holdout_noise)]

    def _compile(self, cand: Candidate | None) -> tuple[Callable[..., Any], bool]:
        """``(callable, is_fxdit)``; ``None`` means plain inductor."""
        import fxdit

        torch.compiler.reset()
        if cand is None:
            return torch.compile(self.model, backend=self.s.baseline_backend), False
        factors = self.bank.get(cand.method, cand.rank, cand.energy) if cand.cached else None
        return torch.compile(self.model, backend=fxdit.make_backend(cand.options(factors, self.num_blocks))), True

    def macs(self, cand: Candidate) -> float:
        from fxdit.apps.demo import grat_density, run_macs

        opts = cand.options("factors.safetensors", self.num_blocks)
        opts.pop("attention", None)
        rank = cand.rank if cand.rank is not None else self.top_rank
        total = run_macs(self.cost, opts, cand.steps, rank)
        if cand.attention != "dense" and self.cost.grid is not None and cand.group is not None:
            saving = self.cost.attention * (1.0 - grat_density(self.cost.grid, cand.group, cand.attention,
                                                               cand.radius))
            share = 1.0
            if cand.layers == "inner" and self.num_blocks:
                share = max(0, self.num_blocks - 2) / self.num_blocks
            total -= cand.steps * saving * share
        return total

    # -- screen ---------------------------------------------------------------------------------------------

    def _over_budget(self) -> bool:
        if time.perf_counter() - self.t0 > self.s.budget_s:
            if not self.budget_exhausted:
                log.warning("tune: the %.0f s budget is spent; no further candidates are screened (the answer now "
                            "depends on how fast this machine was)", self.s.budget_s)
            self.budget_exhausted = True
        return self.budget_exhausted

    def _quality(self, images: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        return psnr(images, ref), ssim(images, ref)

    def _search_passes(self, p: float, q: float) -> bool:
        g = self.s.gates
        return p > g.psnr_db + self.s.search_margin_db and q > g.ssim

    def screen(self, base: Candidate, stage: str) -> list[Measured]:
        """Compile ``base`` (at the full step count) and sample the search batch at each step count, most steps
        first, stopping at the first failure. Returns the measured rows (one per step count tried)."""
        rows: list[Measured] = []
        fn: Callable[..., Any] | None = None
        fx = True
        compiled_for: str | None = None
        for steps in self.step_counts:
            cand = dataclasses.replace(base, steps=steps)
            if cand.key() in self._seen:
                continue
            self._seen.add(cand.key())
            row = Measured(cand, stage, self.macs(cand))
            self.measured.append(row)
            rows.append(row)
            try:
                opts_key = json.dumps(cand.options("f", self.num_blocks), sort_keys=True)
                if fn is None or opts_key != compiled_for:
                    fn, fx = self._compile(cand)
                    compiled_for = opts_key
                    self._sample(fn, fx, self.search_labels, self.search_noise, min(steps, 3))  # compile, warm up
                holder: dict[str, torch.Tensor] = {}

                def run(fn: Callable[..., Any] = fn, fx: bool = fx, steps: int = steps) -> None:
                    holder["x"] = self._sample(fn, fx, self.search_labels, self.search_noise, steps)

                row.screen_time_s = float(self.timer(cand, run))
                images = holder["x"]
                if not torch.isfinite(images).all():
                    raise FxditError("the samples contain NaN/Inf")
                row.search_psnr_db, row.search_ssim = self._quality(images, self.ref_search)
                row.search_pass = self._search_passes(row.search_psnr_db, row.search_ssim)
            except Exception as exc:  # a configuration the model cannot take is a failed candidate, not an abort
                row.status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                row.search_pass = False
                log.warning("tune: %s: %s", cand.label(), row.status)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(f"{stage}: {cand.label()} "
                                         f"{_fmt(row.search_psnr_db, '.1f')} dB", refresh=False)
            if not row.search_pass:
                break
        return rows

    def _stage(self, bases: Sequence[Candidate], stage: str) -> list[Measured]:
        """Screen ``bases`` cheapest-first, skipping those dominated (MACs) by a passing candidate."""
        out: list[Measured] = []
        order = sorted(range(len(bases)), key=lambda i: (self.macs(bases[i]), i))
        for i in order:
            base = bases[i]
            best = self._cheapest_pass()
            if best is not None and self.macs(base) > best * (1.0 + self.s.slack):
                row = Measured(base, stage, self.macs(base), status="skipped: estimated MACs above the cheapest "
                               "passing candidate's by more than the slack")
                self.measured.append(row)
                continue
            if self._over_budget():
                self.measured.append(Measured(base, stage, self.macs(base), status="skipped: budget spent"))
                continue
            out += self.screen(base, stage)
        return out

    def _cheapest_pass(self) -> float | None:
        m = [r.macs for r in self.measured if r.search_pass and r.status == "ok"]
        return min(m) if m else None

    def search(self) -> None:
        sp, full = self.space, self.s.steps
        self.screen(Candidate(full), "lossless")
        icc_pass: list[Measured] = []
        if sp.methods:
            mid = sorted(sp.ranks)[(len(sp.ranks) - 1) // 2] if sp.ranks else None
            mid_energy = None if mid is not None else sp.energies[0]
            probe = [Candidate(full, m, mid, mid_energy, period=2) for m in sp.methods]
            rows = []
            for c in probe:  # the method stage compares quality only: no MAC pruning
                if self._over_budget():
                    self.measured.append(Measured(c, "method", self.macs(c), status="skipped: budget spent"))
                    continue
                rows += self.screen(c, "method")
            ok = [r for r in rows if r.status == "ok" and r.search_psnr_db is not None and r.candidate.steps == full]
            method = max(ok, key=lambda r: (r.search_psnr_db, -sp.methods.index(r.candidate.method))
                         ).candidate.method if ok else sp.methods[0]
            sizes = [(r, None) for r in sp.ranks] + [(None, e) for e in sp.energies]
            grid = [Candidate(full, method, r, e, period=p) for (r, e), p in itertools.product(sizes, sp.periods)]
            self._stage(grid, "icc")
            failed = [r.candidate for r in self.measured if r.stage in ("icc", "method") and r.candidate.cached
                      and r.candidate.steps == full and r.status == "ok" and not r.search_pass]
            cheapest = self._cheapest_pass()
            variants = []
            for c in failed:
                if cheapest is not None and self.macs(c) >= cheapest:
                    continue
                for w, cd in itertools.product(sp.warmups, sp.cooldowns):
                    if (w, cd) != (0, 0) and (w, cd) != (c.warmup, c.cooldown):
                        variants.append(dataclasses.replace(c, warmup=w, cooldown=cd))
            self._stage(list(dict.fromkeys(variants)), "warm-up/cool-down")
            icc_pass = [r for r in self.measured if r.candidate.cached and r.candidate.attention == "dense"
                        and r.search_pass and r.status == "ok" and r.candidate.steps == full]
        grat = []
        grid_shape = self.cost.grid
        for mode, g, rad, lay in itertools.product(sp.attention_modes, sp.groups, sp.radii, sp.layers):
            if mode == "grat-x" and rad != sp.radii[0]:
                continue
            try:
                AttentionConfig(mode=mode, group=g, radius=rad, grid=grid_shape)
            except FxditError:
                continue  # the group does not tile the grid
            if grid_shape is not None and _density(grid_shape, g, mode, rad) >= 1.0:
                continue  # keeps every block: no saving
            grat.append(Candidate(full, attention=mode, group=g, radius=rad, layers=lay))
        self._stage(grat, "grat")
        if sp.combine_top and icc_pass:
            grat_pass = [r for r in self.measured if r.stage == "grat" and r.search_pass and r.status == "ok"
                         and r.candidate.steps == full]
            top_icc = sorted(icc_pass, key=lambda r: (r.macs, r.label))[: sp.combine_top]
            top_grat = sorted(grat_pass, key=lambda r: (r.macs, r.label))[: sp.combine_top]
            combos = [dataclasses.replace(a.candidate, attention=b.candidate.attention, group=b.candidate.group,
                                          radius=b.candidate.radius, layers=b.candidate.layers)
                      for a, b in itertools.product(top_icc, top_grat)]
            self._stage(combos, "combined")

    # -- timing and the held-out check ----------------------------------------------------------------------

    def finalise(self, row: Measured | None) -> Measured:
        """Compile, warm up, time ``reps`` runs and (for candidates) check the held-out batches."""
        cand = row.candidate if row is not None else Candidate(self.s.steps)
        if row is None:
            row = Measured(cand, "reference", self.macs(cand))
        fn, fx = self._compile(None if row.stage == "reference" else cand)
        self._sample(fn, fx, self.search_labels, self.search_noise, min(cand.steps, 3))
        row.times_s = []
        for _ in range(self.s.reps):
            row.times_s.append(float(self.timer(cand, lambda: self._sample(
                fn, fx, self.search_labels, self.search_noise, cand.steps))))
        if row.stage != "reference":
            ps, ss = [], []
            for lab, noi, ref in zip(self.holdout_labels, self.holdout_noise, self.ref_holdout):
                p, q = self._quality(self._sample(fn, fx, lab, noi, cand.steps), ref)
                ps.append(p)
                ss.append(q)
            row.holdout_psnr_db, row.holdout_ssim = min(ps), min(ss)
            row.holdout_pass = self.s.gates.passed(row.holdout_psnr_db, row.holdout_ssim)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"timing: {cand.label()} {_fmt(row.median_s, '.2f')} s", refresh=False)
        return row


def _density(grid: tuple[int, int], group: Sequence[int], mode: str, radius: int) -> float:
    from fxdit.apps.demo import grat_density

    return grat_density(grid, group, mode, radius)


def _num_blocks(model: torch.nn.Module) -> int | None:
    n = getattr(getattr(model, "config", None), "num_layers", None)
    if isinstance(n, int):
        return n
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return len(blocks)
    return None


def _decode(loaded: sampling.LoadedModel, x: torch.Tensor) -> torch.Tensor:
    if loaded.vae is None:
        return x.clamp(-1.0, 1.0)
    scale = getattr(loaded.vae.config, "scaling_factor", 1.0) or 1.0
    with torch.no_grad():
        return loaded.vae.decode(x / scale).sample.clamp(-1.0, 1.0)


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:{spec}}"


def rank_finalists(rows: Sequence[Measured], tolerance: float, key: Callable[[Measured], float | None]
                   ) -> list[Measured]:
    """``rows`` ordered fastest first, where rows within ``tolerance`` (relative) of the fastest remaining one tie
    and ties go to fewer MACs, then to the earlier row. Rows without a time come last in their given order."""
    timed = [r for r in rows if key(r) is not None]
    rest = [r for r in rows if key(r) is None]
    index = {id(r): i for i, r in enumerate(rows)}
    out: list[Measured] = []
    while timed:
        fastest = min(key(r) for r in timed)  # type: ignore[type-var]
        tied = [r for r in timed if key(r) <= fastest * (1.0 + tolerance)]  # type: ignore[operator]
        pick = min(tied, key=lambda r: (r.macs, index[id(r)]))
        out.append(pick)
        timed.remove(pick)
    return out + rest


def tune(model: str | Path | sampling.LoadedModel, settings: TuneSettings | None = None,
         space: TuneSpace | None = None, *,
         timer: Callable[[Candidate, Callable[[], Any]], float] | None = None) -> TuneResult:
    """Search fxdit configurations of ``model`` and return the fastest that passes the gate on held-out samples.

    See the module docstring for the search. The model is sampled as :mod:`fxdit.apps.sampler` does (DDIM η = 0,
    batched CFG); the reference is the model as written at ``settings.steps``.

    Args:
        model: a shipped name (``"demo-dit"``), a diffusers transformer or pipeline folder, or a loaded model.
        settings: sampling, gates, timing and budget (:class:`TuneSettings`).
        space: the configurations to search (:class:`TuneSpace`).
        timer: ``timer(candidate, run) -> seconds`` runs ``run()`` (one sampling run) and returns its time;
            default :func:`default_timer` (wall time). Tests inject fixed times to check the choice.

    Returns:
        :class:`TuneResult`.

    Raises:
        FxditError: the model cannot be loaded or sampled.
    """
    from tqdm.auto import tqdm

    s = settings or TuneSettings()
    sp = space or TuneSpace()
    loaded = model if isinstance(model, sampling.LoadedModel) else sampling.load_dit(model)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    tuner = _Tuner(loaded, s, sp, timer or default_timer)
    bar = tqdm(desc="fxdit tune", unit="run", disable=not s.progress)
    tuner.bar = bar
    try:
        bar.set_postfix_str("references", refresh=True)
        tuner.references()
        tuner.search()
        passed = [r for r in tuner.measured if r.status == "ok" and r.search_pass]
        lossless = next(r for r in tuner.measured if r.stage == "lossless" and r.candidate.steps == s.steps)
        ranked = rank_finalists([r for r in passed if r is not lossless], s.tie_tolerance,
                                lambda r: r.screen_time_s)
        finalists = ranked[: s.finalists] + [lossless]
        inductor = tuner.finalise(None)
        for row in finalists:
            tuner.finalise(row)
        ok = [r for r in finalists if r.holdout_pass]
        if not ok:
            raise FxditError(f"settings.gates={s.gates}: no finalist passed the gate on the held-out samples, not "
                             f"even lossless fxdit ({_fmt(lossless.holdout_psnr_db, '.1f')} dB / SSIM "
                             f"{_fmt(lossless.holdout_ssim, '.3f')}); expected gates the full computation can meet")
        best = rank_finalists(ok, s.tie_tolerance, lambda r: r.median_s)[0]
    finally:
        bar.close()
        torch.compiler.reset()
    factors = tuner.bank.get(best.candidate.method, best.candidate.rank, best.candidate.energy) \
        if best.candidate.cached else None
    options = best.candidate.options(factors, tuner.num_blocks) if best.candidate.cached or \
        best.candidate.attention != "dense" else {}
    meta = {"model": str(model) if not isinstance(model, sampling.LoadedModel) else model.source,
            "class": type(loaded.transformer).__name__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": list(load_before) if load_before else None,
            "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "calibration_s": {k: round(v, 2) for k, v in tuner.bank.calibration_s.items()},
            "search_labels": tuner.search_labels.tolist(),
            "holdout_labels": [t.tolist() for t in tuner.holdout_labels],
            "step_counts": tuner.step_counts, "num_blocks": tuner.num_blocks}
    return TuneResult(best=best, options=options, factors=factors, inductor=inductor, candidates=tuner.measured,
                      settings=s, space=sp, elapsed_s=time.perf_counter() - tuner.t0,
                      budget_exhausted=tuner.budget_exhausted, meta=meta)


# --------------------------------------------------------------------------------------------------------------
# output


def format_table(result: TuneResult) -> str:
    """Markdown table of every candidate that was sampled (screened or timed), in the order considered."""
    lines = ["| candidate | stage | MACs | search PSNR / SSIM | screen time | median time (runs) | held-out PSNR / "
             "SSIM | speed-up vs inductor | chosen |", "|---|---|---|---|---|---|---|---|---|"]
    ind = result.inductor.median_s
    for r in [result.inductor, *result.candidates]:
        if r.status.startswith("skipped"):
            continue
        if r.status != "ok":
            lines.append(f"| {r.label} | {r.stage} | {r.macs / 1e9:.0f} G | {r.status} | | | | | |")
            continue
        gate = "" if r.search_pass is None else (" pass" if r.search_pass else " FAIL")
        hgate = "" if r.holdout_pass is None else (" pass" if r.holdout_pass else " FAIL")
        med = r.median_s
        spread = f" ({len(r.times_s)}: {min(r.times_s):.2f}–{max(r.times_s):.2f})" if r.times_s else ""
        name = "plain inductor @ %d steps" % r.candidate.steps if r is result.inductor else r.label
        lines.append(
            f"| {name} | {r.stage} | {r.macs / 1e9:.0f} G | "
            + (f"{_fmt(r.search_psnr_db, '.1f')} dB / {_fmt(r.search_ssim, '.3f')}{gate}"
               if r.search_psnr_db is not None else "—")
            + f" | {_fmt(r.screen_time_s, '.2f')} s | {_fmt(med, '.2f')} s{spread} | "
            + (f"{_fmt(r.holdout_psnr_db, '.1f')} dB / {_fmt(r.holdout_ssim, '.3f')}{hgate}"
               if r.holdout_psnr_db is not None else "—")
            + f" | {_fmt(ind / med if ind and med else None, '.2f')}× | {'**yes**' if r is result.best else ''} |")
    return "\n".join(lines)


def pareto_front(rows: Sequence[Measured]) -> list[Measured]:
    """Rows not beaten in both screen time and search PSNR by another row (time ascending)."""
    pts = [r for r in rows if r.status == "ok" and r.screen_time_s is not None and r.search_psnr_db is not None]
    front = [r for r in pts if not any(o is not r and o.screen_time_s <= r.screen_time_s
                                       and o.search_psnr_db >= r.search_psnr_db
                                       and (o.screen_time_s < r.screen_time_s or o.search_psnr_db > r.search_psnr_db)
                                       for o in pts)]
    return sorted(front, key=lambda r: r.screen_time_s)


def _plot(result: TuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.candidates if r.status == "ok" and r.screen_time_s is not None
            and r.search_psnr_db is not None]
    cap = 60.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for passed, colour, label in ((True, "tab:green", "passes the search gate"), (False, "tab:red", "fails")):
        pts = [r for r in rows if bool(r.search_pass) == passed]
        ax.scatter([r.screen_time_s for r in pts], [min(r.search_psnr_db, cap) for r in pts], c=colour, s=18,
                   label=label, alpha=0.7)
    front = pareto_front(rows)
    ax.plot([r.screen_time_s for r in front], [min(r.search_psnr_db, cap) for r in front], "k--", lw=1,
            label="Pareto front")
    b = result.best
    if b.screen_time_s is not None and b.search_psnr_db is not None:
        ax.scatter([b.screen_time_s], [min(b.search_psnr_db, cap)], marker="*", s=160, c="gold", edgecolors="k",
                   label=f"chosen: {b.label}", zorder=5)
    ax.axhline(result.settings.gates.psnr_db, color="grey", lw=0.8, ls=":", label="PSNR gate")
    ax.set_xlabel("sampling time of the search batch, one run (s)")
    ax.set_ylabel(f"PSNR vs full computation (dB, capped at {cap:.0f})")
    ax.set_title("fxdit tune: candidates (time vs quality)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def options_json(result: TuneResult, factors_path: str | Path | None) -> dict[str, Any]:
    """The chosen options as JSON (the factors as a file path)."""
    c = result.best.candidate
    if not c.cached and c.attention == "dense":
        return {}
    return c.options(None if factors_path is None else str(factors_path), result.meta.get("num_blocks"))


def write_outputs(result: TuneResult, out: str | Path) -> dict[str, Path]:
    """Write ``options.json``, ``factors.safetensors`` (with caching), ``tune_report.json``, ``tune_report.md`` and
    ``pareto.png`` to ``out``; returns the paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    fpath = None
    if result.factors is not None:
        fpath = (out / "factors.safetensors").resolve()
        result.factors.save(fpath)
        written["factors"] = fpath
    opts = options_json(result, fpath)
    (out / "options.json").write_text(json.dumps(opts, indent=2) + "\n")
    written["options"] = out / "options.json"
    b = result.best
    summary = {
        "chosen": b.label, "steps": b.candidate.steps, "options": opts,
        "median_s": b.median_s, "inductor_median_s": result.inductor.median_s,
        "speedup_vs_inductor": result.speedup_vs_inductor,
        "holdout_psnr_db": b.holdout_psnr_db, "holdout_ssim": b.holdout_ssim, "holdout_pass": b.holdout_pass,
        "elapsed_s": round(result.elapsed_s, 1), "budget_exhausted": result.budget_exhausted,
    }
    payload = {"summary": summary,
               "settings": {**dataclasses.asdict(result.settings), "gates": dataclasses.asdict(result.settings.gates)},
               "space": dataclasses.asdict(result.space), "meta": result.meta,
               "inductor": result.inductor.to_json(), "candidates": [r.to_json() for r in result.candidates]}
    (out / "tune_report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    written["report.json"] = out / "tune_report.json"
    s = result.settings
    md = ["# fxdit tune", "",
          f"Chosen: **{b.label}** — median {_fmt(b.median_s, '.2f')} s vs plain inductor "
          f"{_fmt(result.inductor.median_s, '.2f')} s ({_fmt(result.speedup_vs_inductor, '.2f')}×); held-out "
          f"{_fmt(b.holdout_psnr_db, '.1f')} dB / SSIM {_fmt(b.holdout_ssim, '.3f')} (gate: PSNR > "
          f"{s.gates.psnr_db} dB, SSIM > {s.gates.ssim}).", "",
          f"Options: `{json.dumps(opts)}`; sample with {b.candidate.steps} DDIM steps.", "",
          format_table(result), "",
          f"Search batch: {s.search_samples} samples (seeds {s.seed}…, labels {result.meta.get('search_labels')}); "
          f"held-out: {s.holdout_batches} batches (seeds from {s.seed + HOLDOUT_SEED_OFFSET}, labels "
          f"{result.meta.get('holdout_labels')}). Screen: one timed run after a warm-up; search gate PSNR > "
          f"{s.gates.psnr_db + s.search_margin_db} dB. Finalists: median of {s.reps} runs; ties within "
          f"{s.tie_tolerance:.0%} go to fewer MACs. Tuning took {result.elapsed_s:.0f} s"
          f"{' (budget spent: screen cut short)' if result.budget_exhausted else ''}; load average before/after "
          f"{result.meta.get('loadavg_before')} / {result.meta.get('loadavg_after')}.", ""]
    skipped = sum(1 for r in result.candidates if r.status.startswith("skipped"))
    if skipped:
        md.append(f"{skipped} candidates were skipped (estimated MACs above a passing one's, or budget); see "
                  "tune_report.json.")
    (out / "tune_report.md").write_text("\n".join(md) + "\n")
    written["report.md"] = out / "tune_report.md"
    try:
        _plot(result, out / "pareto.png")
        written["pareto"] = out / "pareto.png"
    except Exception as exc:  # the plot is informative only
        log.warning("tune: could not draw pareto.png: %s", exc)
    return written


def load_options(path: str | Path) -> dict[str, Any]:
    """Read an ``options.json`` written by :func:`write_outputs` (for ``torch.compile(..., options=...)``)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FxditError(f"options file {str(path)!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise FxditError(f"options file {str(path)!r}: expected a JSON object")
    FxditConfig.from_options(value)
    return value
