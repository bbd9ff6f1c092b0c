"""Fuzzing: random reference-DiT configurations × option dicts that are valid by construction, through the backend.

Every drawn case is a configuration fxdit accepts, so it must run: an :class:`fxdit.FxditError` (or any other
exception) fails the property, except in ``invalid``, which draws invalid options on purpose and fails unless each
one is refused with FxditError. Every compilation uses ``on_pass_error="raise"``.

* ``lossless``: nothing lossy switched on (dense attention, GRAT below ``min_tokens`` or on layers the model lacks,
  caching off or every step full) → the eager output.
* ``grat``: GRAT-B/X with a group that tiles the token grid, a radius small enough that the grouped mask drops key
  groups, existing layers, ``min_tokens`` ≤ the image tokens, given or inferred grids and any block size → the
  GRAT oracle (``tests/grat_oracle.py``: the eager model with the dense grouped mask, written from the method's
  definition), the report rewrites exactly the selected blocks' sites, and the output differs from dense attention.
* ``icc``: increment caching with factors of rank strictly below ``min(out, in)`` of every cached linear, inputs
  that change at every step, schedules with at least one cached step (period, warmup, cooldown or explicit full
  steps), roles, blocks, qkv form, guard, factor objects or files, one- or two-call classifier-free guidance → the
  ICC oracle (``tests/icc_oracle.py``: forward hooks on the factored ``nn.Linear`` layers, given the full steps as a
  set computed here from the drawn schedule), the runtime follows that schedule, the report inserts an increment in
  exactly the cached linears, and every cached step differs from the full computation.
* ``grat_inductor`` / ``icc_inductor``: the same checks through inductor (the compiled path: FlexAttention with the
  grouped block mask, the low-rank increment's decomposition), on a few tiny models whose compiled shapes repeat.
* ``invalid``: a valid GRAT or ICC option dict with one invalid option → FxditError from ``torch.compile``.
* ``options``: arbitrary option values → accepted or FxditError, never another exception.

Each ``check_*`` function is one case and returns its outcome (:data:`PASSED`, or :data:`RAISED` where a refusal is
the expected outcome) or raises; ``tools/reliability_report.py`` runs the same functions with counters. All but the
``*_inductor`` properties run the backend without inductor (``no_inductor``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import fxdit.kernels.ops  # noqa: F401  (registers the fxdit ops)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxdit
from fxdit.apps.models.dit import ATTENTION_FORMS, DiT, DiTConfig, block_linear_roles
from fxdit.calibration import calibrate
from fxdit.config import FxditConfig, valid_option_keys
from fxdit.errors import FxditError

FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large, HealthCheck.filter_too_much])
PASSED, RAISED = "passed", "FxditError"

#: Relative max error (× max |reference|) allowed against an oracle without inductor: fp32 reassociation of a
#: different but equivalent computation (grouped block-sparse attention vs masked SDPA; fused vs chained low-rank
#: GEMMs vs the oracle's fp64 increments; inductor's FlexAttention and fused kernels alike). Measured: ≤ 5.4e-7 over
#: 100 random grat and icc cases, ≤ 7.4e-7 over 11 inductor cases.
ORACLE_TOL = 5e-6
#: Relative max difference a lossy output must exceed against the exact (dense / full) computation: 10× the oracle
#: tolerance and 50× the lossless error bound (1e-6), so a rewrite that silently stays exact cannot pass. Measured:
#: ≥ 2.7e-3 (grat) and ≥ 6e-4 (icc, flat-spectrum weights) over the same cases.
DIFFERS = 5e-5
#: Roles the reference DiT's analysis gives its block linears (fused qkv, proj, fc1, fc2).
DIT_ROLES = ("qkv", "attn_out", "mlp_in", "mlp_out")

# ---------------------------------------------------------------------------------------------------------------
# Model strategies
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def dit_configs(draw: Any, *, mlp_ratios: tuple[float, ...] = (1.0, 2.0), video_grat_x: bool = False) -> DiTConfig:
    """Tiny reference DiTs: depth ≤ 2, width ≤ 64, ≤ 256 image tokens, 2-D or 3-D grids, optional joint text.

    Args:
        mlp_ratios: MLP widths to draw from (ICC needs > 1: the analysis recognises an MLP by its widening ``fc1``).
        video_grat_x: video grids with at least two tokens on every axis (GRAT-X drops key groups only then).
    """
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    hidden = heads * head_dim
    video = hidden >= 8 and draw(st.booleans())
    patch = draw(st.sampled_from([1, 2]))
    if video:
        grid = (draw(st.integers(2 if video_grat_x else 1, 3)), draw(st.sampled_from([2, 3, 4, 6])),
                draw(st.sampled_from([2, 4, 6, 8])))
        size = (grid[0], grid[1] * patch, grid[2] * patch)
    else:
        grid = (draw(st.sampled_from([2, 3, 4, 6, 8, 12, 16])), draw(st.sampled_from([2, 4, 6, 8, 16])))
        size = (grid[0] * patch, grid[1] * patch)
    if math.prod(grid) > 256:
        grid = grid[:-1] + (256 // math.prod(grid[:-1]),)
        size = size[:-1] + (grid[-1] * patch,)
    text = draw(st.sampled_from([0, 0, 3, 8]))
    return DiTConfig(depth=draw(st.integers(1, 2)), hidden=hidden, heads=heads, patch=patch, input_size=size,
                     in_channels=draw(st.sampled_from([1, 4])), num_classes=draw(st.sampled_from([0, 3])),
                     attention=draw(st.sampled_from(ATTENTION_FORMS)), mlp_ratio=draw(st.sampled_from(mlp_ratios)),
                     text_tokens=text, text_position=draw(st.sampled_from(["before", "after"])))


#: Tiny models for the inductor properties (few distinct shapes, so compiled graphs repeat across cases).
INDUCTOR_MODELS = (
    DiTConfig(depth=1, hidden=16, heads=2, patch=1, input_size=(8, 8), in_channels=1, num_classes=0, mlp_ratio=2.0),
    DiTConfig(depth=1, hidden=16, heads=2, patch=1, input_size=(2, 4, 4), in_channels=1, num_classes=3,
              mlp_ratio=2.0, text_tokens=3, text_position="after"),
)


def token_grid(cfg: DiTConfig) -> tuple[int, ...]:
    t, h, w = cfg.grid
    return (h, w) if len(cfg.input_size) == 2 else (t, h, w)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _subset(draw: Any, items: list[Any]) -> list[Any]:
    """A non-empty subset of ``items``, in their order."""
    picked = draw(st.sets(st.sampled_from(items), min_size=1))
    return [i for i in items if i in picked]


# ---------------------------------------------------------------------------------------------------------------
# Option strategies (valid by construction)
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def grat_cases(draw: Any, models: Any = None) -> tuple[DiTConfig, int, dict[str, Any]]:
    """``(model config, seed, options)``: GRAT that rewrites at least one site and drops key groups there."""
    cfg = draw(models if models is not None else dit_configs(video_grat_x=draw(st.booleans())))
    grid = token_grid(cfg)
    modes = ["grat-b"] + (["grat-x"] if all(n >= 2 for n in grid) else [])
    mode = draw(st.sampled_from(modes))
    attention: dict[str, Any] = {"mode": mode}
    if mode == "grat-x":  # at least two groups on every axis: groups differing on every axis are not attended
        group = [draw(st.sampled_from([d for d in _divisors(n) if n // d >= 2])) for n in grid]
        if draw(st.booleans()):
            attention["radius"] = draw(st.integers(0, 3))  # ignored by GRAT-X
    else:  # one axis with ≥ radius + 2 groups: groups farther apart than the radius exist
        axis = draw(st.sampled_from([i for i, n in enumerate(grid) if n >= 2]))
        group = [draw(st.sampled_from(_divisors(n))) for n in grid]
        group[axis] = draw(st.sampled_from([d for d in _divisors(grid[axis]) if grid[axis] // d >= 2]))
        most = max(n // g for n, g in zip(grid, group))
        attention["radius"] = draw(st.integers(0, most - 2))
    attention["group"] = tuple(group)
    attention["min_tokens"] = draw(st.sampled_from([0, 1, cfg.tokens // 2, cfg.tokens]))
    if draw(st.booleans()):
        attention["layers"] = _subset(draw, list(range(cfg.depth)))
    if draw(st.booleans()):
        attention["grid"] = grid
    block_size = draw(st.sampled_from([None, None, 16, 32, 64]))
    if block_size is not None:
        attention["block_size"] = block_size
    return cfg, draw(SEEDS), {"attention": attention, "on_pass_error": "raise"}


@st.composite
def icc_cases(draw: Any, models: Any = None) -> tuple[DiTConfig, int, dict[str, Any]]:
    """``(model config, seed, case)``: ICC with ranks below every cached linear's ``min(out, in)``, a schedule with
    at least one cached step, and a description of the factors and calls (``case["cache"]`` is the cache options
    without the factors, which need the model)."""
    cfg = draw(models if models is not None else dit_configs(mlp_ratios=(2.0, 4.0)))
    steps = draw(st.integers(3, 5))
    warmup = draw(st.integers(0, 1))
    cooldown = draw(st.integers(0, 1))
    num_steps = steps if cooldown or draw(st.booleans()) else None
    # one step that must stay cached: after the warmup, before the cooldown
    cached = draw(st.integers(max(1, warmup), steps - 1 - cooldown))
    schedule: dict[str, Any] = {}
    if draw(st.booleans()):
        schedule["period"] = draw(st.sampled_from([p for p in (2, 3, 4) if cached % p]))
    else:
        others = [s for s in range(1, steps) if s != cached]
        schedule["full_steps"] = [0] + [s for s in others if draw(st.booleans())]
    if warmup or draw(st.booleans()):
        schedule["warmup"] = warmup
    if num_steps is not None:
        schedule["num_steps"] = num_steps
    if cooldown:
        schedule["cooldown"] = cooldown
    cache: dict[str, Any] = {"schedule": schedule, "qkv": draw(st.sampled_from(["separate", "joint"]))}
    if draw(st.booleans()):
        cache["roles"] = _subset(draw, list(DIT_ROLES) + ["q", "k", "v"])
        if not set(cache["roles"]) & set(DIT_ROLES):
            cache["roles"].append(draw(st.sampled_from(DIT_ROLES)))
    if draw(st.booleans()):
        cache["blocks"] = _subset(draw, list(range(cfg.depth)))
    if draw(st.booleans()):
        cache["guard"] = draw(st.sampled_from(["none", "nonfinite"]))
    case = {
        "cache": cache, "steps": steps,
        # below min(out, in) of every block linear; the largest such rank (one singular direction left out) often
        "rank": draw(st.one_of(st.just(min(cfg.hidden, cfg.mlp_hidden) - 1),
                               st.integers(1, min(cfg.hidden, cfg.mlp_hidden) - 1))),
        "cover": draw(st.sampled_from(["all", "cached"])),  # factors for every block linear, or the cached only
        "source": draw(st.sampled_from(["object", "file"])),
        "calls_per_step": draw(st.sampled_from([1, 1, 2])),
        # the runtime finds a call's step from the timestep (equal: next stream, lower: next step) or is told
        "tell_calls_per_step": draw(st.booleans()),
    }
    return cfg, draw(SEEDS), case


SEEDS = st.integers(0, 2**16)

# ---------------------------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------------------------


def build(cfg: DiTConfig, seed: int, steps: int = 2, calls_per_step: int = 1) -> tuple[DiT, list[tuple[tuple, dict]]]:
    """The model (eval, seeded) and the calls of a denoising trajectory: latents and timestep change at every step;
    with two calls per step the second is the unconditional call of classifier-free guidance (same latents and
    timestep, null class, other text)."""
    torch.manual_seed(seed)
    model = DiT(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    batch = 2
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g)
    y = torch.arange(batch) % cfg.num_classes if cfg.num_classes else None
    text = torch.randn(batch, cfg.text_tokens, cfg.hidden, generator=g) if cfg.text_tokens else None
    calls = []
    for i in range(steps):
        t = torch.full((batch,), 900.0 - 70 * i)
        for stream in range(calls_per_step):
            yy = y if stream == 0 or y is None else torch.full_like(y, cfg.num_classes)
            kwargs = {"text": text if stream == 0 else -text} if text is not None else {}
            calls.append(((x, t, yy), kwargs))
        x = x + 0.1 * torch.randn(x.shape, generator=g)
    return model, calls


@torch.no_grad()
def flat_spectrum(model: torch.nn.Module, seed: int) -> None:
    """Give every cacheable block linear a weight whose singular values are all equal, with the Frobenius norm it
    had (each third of the fused qkv weight too; stacked, the fused weight is then flat as well). A factorisation of
    rank r < min(out, in) then leaves out a share ≥ 1/min(out, in) of every weight in every direction, so a cached
    step differs from the full one by far more than rounding, whichever ranks are drawn."""
    g = torch.Generator().manual_seed(seed)
    for name in block_linear_roles(model):
        weight = model.get_submodule(name).weight
        parts = 3 if name.split(".")[-1] == "qkv" else 1
        rows = weight.shape[0] // parts
        for p in range(parts):
            block = weight[p * rows:(p + 1) * rows]
            q = torch.linalg.qr(torch.randn(max(block.shape), min(block.shape), generator=g))[0]
            q = q if block.shape[0] >= block.shape[1] else q.T  # orthonormal columns (rows when wide)
            block.copy_(q * (block.norm() / q.norm()))


def compile_and_run(model: torch.nn.Module, options: Any, calls: list, *, sampling: bool = False,
                    calls_per_step: int | None = None) -> tuple[Any, list[torch.Tensor]]:
    """Compile with ``backend="fxdit"`` and run ``calls`` (inside ``fxdit.sampling`` when ``sampling``)."""
    torch._dynamo.reset()
    fast = torch.compile(model, backend="fxdit", dynamic=False, options=options)
    ctx = fxdit.sampling(fast, calls_per_step=calls_per_step) if sampling else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return fast, [fast(*a, **k) for a, k in calls]


def eager(model: torch.nn.Module, calls: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(*a, **k) for a, k in calls]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float((out - ref).abs().max()) / (float(ref.abs().max()) or 1.0)


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = _rel_err(out, ref)
    assert err <= tol, f"{what}: max error {err:.3g} × max|ref| > {tol}"


def _differs(out: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    diff = _rel_err(out, exact)
    assert diff > DIFFERS, f"{what}: differs from the exact computation by only {diff:.3g} × max|ref| ≤ {DIFFERS}"


def _pass_report(fast: Any, name: str) -> Any:
    (record,) = fxdit.reports(fast)  # the reference DiT traces to one graph
    return next(r for r in record.reports if r.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Properties (one case each)
# ---------------------------------------------------------------------------------------------------------------


def check_lossless(cfg: DiTConfig, seed: int, choice: dict[str, Any]) -> str:
    """Nothing lossy on: the compiled model gives the eager output (up to float reassociation: 1e-6)."""
    options: dict[str, Any] = {"on_pass_error": "raise"}
    if choice["attention"] == "min_tokens":
        options["attention"] = {"mode": choice["mode"], "group": (1,) * len(token_grid(cfg)),
                                "min_tokens": cfg.tokens + 1}
    elif choice["attention"] == "no_layers":
        options["attention"] = {"mode": choice["mode"], "layers": [cfg.depth + 5], "min_tokens": 0}
    if choice["cache"] == "every_step_full":
        options["cache"] = {"mode": "reuse", "schedule": "none"}
    elif choice["cache"] == "off":
        options["cache"] = {"mode": "off", "schedule": {"period": 3}}
    model, calls = build(cfg, seed)
    fast, outs = compile_and_run(model, options, calls)
    for i, (out, ref) in enumerate(zip(outs, eager(model, calls))):
        _close(out, ref, 1e-6, f"call {i}")
    assert not any(r.runtime is not None for r in fxdit.reports(fast))
    assert _pass_report(fast, "rewrite_grouped_attention").rewritten == 0
    return PASSED


def check_grat(cfg: DiTConfig, seed: int, options: dict[str, Any]) -> str:
    """GRAT equals the oracle (eager SDPA with the dense grouped mask on the selected blocks), rewrites exactly the
    selected blocks' sites, and differs from dense attention."""
    from grat_oracle import grouped_sdpa

    model, calls = build(cfg, seed, steps=1)
    fast, (out,) = compile_and_run(model, options, calls)
    layers = options["attention"].get("layers", range(cfg.depth))
    report = _pass_report(fast, "rewrite_grouped_attention")
    assert report.rewritten == len(layers), (report.rewritten, layers, dict(report.skipped))
    # the oracle runs the same weights with SDPA, the attention call it patches
    oracle_model = model
    if cfg.attention != "sdpa":
        oracle_model = DiT(dataclasses.replace(cfg, attention="sdpa")).eval()
        oracle_model.load_state_dict(model.state_dict())
    (args, kwargs), = calls
    with torch.no_grad(), grouped_sdpa(oracle_model, options) as counts:
        ref = oracle_model(*args, **kwargs)
    assert counts["calls"] == cfg.depth and counts["masked"] == len(layers) == counts["sparse"], counts
    _close(out, ref, ORACLE_TOL, "grouped attention vs oracle")
    (dense,) = eager(model, calls)
    _differs(out, dense, "grouped attention vs dense")
    return PASSED


def full_steps_of(schedule: dict[str, Any], steps: int) -> set[int]:
    """The full steps of a drawn schedule, from the schedule's documented meaning (README, ``cache.schedule``):
    the first ``warmup`` and last ``cooldown`` steps, and the ``full_steps`` or every ``period``-th step."""
    full = set(range(schedule.get("warmup", 0)))
    full |= set(range(steps - schedule.get("cooldown", 0), steps))
    if "full_steps" in schedule:
        full |= set(schedule["full_steps"])
    else:
        full |= set(range(0, steps, schedule.get("period", 2)))
    return full


def check_icc(cfg: DiTConfig, seed: int, case: dict[str, Any]) -> str:
    """ICC equals the oracle (eager forward hooks on the cached linears: ``Y_c + (X − X_c)·Bᵀ·Aᵀ`` at cached steps)
    at every step, follows the schedule, caches exactly the selected linears, and differs from full computation
    at cached steps."""
    from icc_oracle import IccOracle

    steps, per_step = case["steps"], case["calls_per_step"]
    model, calls = build(cfg, seed, steps=steps, calls_per_step=per_step)
    flat_spectrum(model, seed)
    cache = dict(case["cache"])
    roles, blocks = cache.get("roles", DIT_ROLES), cache.get("blocks", range(cfg.depth))
    linears = block_linear_roles(model)
    cached = [m for m, role in linears.items() if role in roles and int(m.split(".")[1]) in blocks]
    assert cached, "the strategy draws at least one cached linear"
    covered = linears if case["cover"] == "all" else {m: linears[m] for m in cached}
    factors = calibrate(model, method="svd", rank=case["rank"], modules=covered, qkv=cache["qkv"], progress=False)
    for key, rank in factors.ranks.items():  # the case's own premise: every increment is truly low-rank
        weight = model.get_submodule(key.split(":")[0]).weight
        rows = weight.shape[0] // (3 if ":" in key else 1)
        assert rank < min(rows, weight.shape[1]), (key, rank, tuple(weight.shape))
    with tempfile.TemporaryDirectory() as tmp:
        source: Any = factors
        if case["source"] == "file":
            source = str(Path(tmp) / "factors.safetensors")
            factors.save(source)
        options = {"cache": {**cache, "factors": source}, "on_pass_error": "raise"}
        fast, outs = compile_and_run(model, options, calls, sampling=True,
                                     calls_per_step=per_step if case["tell_calls_per_step"] else None)
        full = full_steps_of(cache["schedule"], steps)
        oracle = IccOracle(model, source, full, modules=cached)
        refs = []
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(calls):
                if i % per_step == 0:
                    oracle.begin_step(i // per_step)
                refs.append(oracle(*args, **kwargs))
    exact = eager(model, calls)
    for i, (out, ref, ex) in enumerate(zip(outs, refs, exact)):
        step = i // per_step
        _close(out, ref, ORACLE_TOL, f"step {step} call {i} vs oracle")
        if step not in full:
            _differs(out, ex, f"cached step {step} call {i}")
    (record,) = fxdit.reports(fast)
    assert record.runtime is not None
    schedule = [i // per_step in full for i in range(len(calls))]
    assert record.runtime.stats.schedule == schedule, (record.runtime.stats.schedule, full)
    report = _pass_report(fast, "insert_lowrank_increments")
    assert report.rewritten == len(cached), (report.rewritten, cached, dict(report.skipped))
    return PASSED


def check_invalid(kind: str, case: tuple[DiTConfig, int, Any], corruption: tuple[str, Any]) -> str:
    """A valid GRAT or ICC option dict with one invalid option: ``torch.compile``'s first call raises FxditError
    (returns :data:`RAISED`); being accepted is an AssertionError, any other exception propagates."""
    cfg, seed, drawn = case
    model, calls = build(cfg, seed, steps=1)
    if kind == "grat":
        options = drawn
    else:
        factors = calibrate(model, method="svd", rank=drawn["rank"], modules=block_linear_roles(model),
                            qkv=drawn["cache"]["qkv"], progress=False)
        options = {"cache": {**drawn["cache"], "factors": factors}, "on_pass_error": "raise"}
    options = corrupt(options, corruption)
    try:
        compile_and_run(model, options, calls, sampling=kind == "icc")
    except FxditError:
        return RAISED
    raise AssertionError(f"invalid options accepted: {options!r}")


#: One wrong thing to add to an otherwise valid option dict.
CORRUPTIONS: list[tuple[str, Any]] = [
    ("attention.mdoe", "grat-b"), ("cache.schedul", {"period": 2}), ("on_pass_error", "ignore"),
    ("attention.radius", -1), ("attention.group", "4x4"), ("attention.min_tokens", 1.5),
    ("cache.schedule", {"full_steps": []}), ("cache.schedule", {"full_steps": [2]}), ("cache.guard", "nan"),
    ("cache.schedule", {"cooldown": 1}), ("inductor", [1]), ("attention.block_size", 20), ("bogus", True),
    ("attention.group", (0, 4)), ("attention.grid", (16, 0)), ("cache.qkv", "fused"), ("cache.mode", "incremnt"),
    ("cache.roles", ["q", "mlp_ni"]), ("cache.blocks", [0, "1"]), ("attention.layers", [-1]),
]


def corrupt(options: dict[str, Any], corruption: tuple[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in options.items()}
    key, value = corruption
    if "." in key:
        section, leaf = key.split(".", 1)
        out.setdefault(section, {})
        out[section] = {**out[section], leaf: value}
    else:
        out[key] = value
    return out


_KEYS = sorted({k for keys in valid_option_keys().values() for k in keys})
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.integers(-2, 20), max_size=4), st.tuples(st.integers(0, 20), st.integers(0, 20)),
    st.sampled_from(["grat-b", "grat-x", "dense", "none", "increment", "reuse", "off", "joint", "nonfinite",
                     "raise", "fallback", "q", "qkv"]),
)
_OPTION_KEYS = st.one_of(st.sampled_from(_KEYS), st.text(min_size=1, max_size=8))
_OPTIONS = st.recursive(_VALUES, lambda inner: st.dictionaries(_OPTION_KEYS, inner, max_size=4), max_leaves=12)


def check_options(options: Any) -> str:
    """Any options value is accepted or rejected with FxditError, never another exception."""
    try:
        FxditConfig.from_options(options)
    except FxditError:
        return RAISED
    return PASSED


# ---------------------------------------------------------------------------------------------------------------
# Choice strategies and the hypothesis tests
# ---------------------------------------------------------------------------------------------------------------

LOSSLESS_CHOICES = st.fixed_dictionaries({
    "attention": st.sampled_from(["dense", "min_tokens", "no_layers"]),
    "mode": st.sampled_from(["grat-b", "grat-x"]),
    "cache": st.sampled_from(["none", "off", "every_step_full"]),
})
INDUCTOR_MODEL = st.sampled_from(INDUCTOR_MODELS)

def grat_property(case: tuple) -> str:
    return check_grat(*case)


def icc_property(case: tuple) -> str:
    return check_icc(*case)


def invalid_property(drawn: tuple[str, tuple], corruption: tuple[str, Any]) -> str:
    return check_invalid(drawn[0], drawn[1], corruption)


INVALID_CASES = st.sampled_from(["grat", "icc"]).flatmap(
    lambda kind: st.tuples(st.just(kind), grat_cases() if kind == "grat" else icc_cases()))


@dataclasses.dataclass(frozen=True)
class Property:
    """One fuzz property.

    Args:
        check: runs one case; returns :data:`PASSED` or :data:`RAISED`, raises on a failure.
        strategies: the strategies of ``check``'s arguments.
        share: the share of the hypothesis profile's examples its test runs (each case compiles a model: the
            shares keep the ci profile's 25 within a few minutes on two CPU cores).
        inductor: whether it runs inductor (else the backend runs without it, ``no_inductor``).
        refusals_expected: whether FxditError is an expected outcome (a refusal fails every other property).
    """

    check: Any
    strategies: tuple[Any, ...]
    share: float = 1.0
    inductor: bool = False
    refusals_expected: bool = False

    @property
    def examples(self) -> int:
        """Examples for its test under the loaded profile (ci: 25 × share, slow: 200 × share)."""
        return max(1, round(settings.default.max_examples * self.share))


PROPERTIES: dict[str, Property] = {
    "lossless": Property(check_lossless, (dit_configs(), SEEDS, LOSSLESS_CHOICES), share=0.4),
    "grat": Property(grat_property, (grat_cases(),), share=0.5),
    "icc": Property(icc_property, (icc_cases(),), share=0.4),
    "grat_inductor": Property(grat_property, (grat_cases(INDUCTOR_MODEL),), share=0.08, inductor=True),
    "icc_inductor": Property(icc_property, (icc_cases(INDUCTOR_MODEL),), share=0.08, inductor=True),
    "invalid": Property(invalid_property, (INVALID_CASES, st.sampled_from(CORRUPTIONS)), share=0.4,
                        refusals_expected=True),
    "options": Property(check_options, (_OPTIONS,), refusals_expected=True),
}


@settings(FIXTURE_OK, max_examples=PROPERTIES["lossless"].examples)
@given(*PROPERTIES["lossless"].strategies)
def test_fuzz_lossless(no_inductor, cfg, seed, choice):
    assert check_lossless(cfg, seed, choice) == PASSED


@settings(FIXTURE_OK, max_examples=PROPERTIES["grat"].examples)
@given(*PROPERTIES["grat"].strategies)
def test_fuzz_grat(no_inductor, case):
    assert grat_property(case) == PASSED


@settings(FIXTURE_OK, max_examples=PROPERTIES["icc"].examples)
@given(*PROPERTIES["icc"].strategies)
def test_fuzz_icc(no_inductor, case):
    assert icc_property(case) == PASSED


@settings(max_examples=PROPERTIES["grat_inductor"].examples)
@given(*PROPERTIES["grat_inductor"].strategies)
def test_fuzz_grat_inductor(case):
    assert grat_property(case) == PASSED


@settings(max_examples=PROPERTIES["icc_inductor"].examples)
@given(*PROPERTIES["icc_inductor"].strategies)
def test_fuzz_icc_inductor(case):
    assert icc_property(case) == PASSED


@settings(FIXTURE_OK, max_examples=PROPERTIES["invalid"].examples)
@given(*PROPERTIES["invalid"].strategies)
def test_fuzz_invalid_options_are_refused(no_inductor, drawn, corruption):
    assert invalid_property(drawn, corruption) == RAISED


@given(*PROPERTIES["options"].strategies)
def test_fuzz_options(options):
    assert check_options(options) in (PASSED, RAISED)


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=str)
def test_every_corruption_is_rejected(corruption):
    """The corruptions ``invalid`` mixes in are all invalid by themselves."""
    with pytest.raises(FxditError):
        FxditConfig.from_options(corrupt({"cache": {"mode": "reuse"}}, corruption))
