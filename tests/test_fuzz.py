"""Fuzzing (issue 8): random reference-DiT configurations × random option dicts, through the real backend.

Every case either runs and gives what its options promise, or raises :class:`fxdit.FxditError`; any other
exception, or an output that differs from the promise, fails the property:

* ``lossless``: options with nothing lossy switched on (dense attention, GRAT on sites below ``min_tokens``, caching
  off or every step full, either pass-error policy) give the eager output.
* ``grat``: GRAT-B/X with random groups, radii, layers, grids and block sizes give eager attention with the grouped
  mask's dense equivalent on exactly the sites the pass rewrites (``tests/grat_oracle.py``); the report's rewritten
  count equals the oracle's.
* ``icc``: increment caching with factors of rank ≥ the weights' true rank (full-rank in effect), random schedules,
  roles, blocks, qkv form and guard, gives the eager output at every step, and the runtime follows the schedule.
* ``options``: arbitrary option dicts are either accepted or rejected with FxditError.

Each ``check_*`` function is one case; ``tools/reliability_report.py`` runs the same functions with counters.
The backend runs without inductor (``no_inductor``): an inductor compile per case would take 15–30 s.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import fxdit.kernels.ops  # noqa: F401  (registers the fxdit ops)
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxdit
from fxdit.calibration import calibrate
from fxdit.config import CACHE_ROLES, FxditConfig, valid_option_keys
from fxdit.errors import FxditError
from fxdit.models.dit import ATTENTION_FORMS, DiT, DiTConfig, block_linear_roles, set_lowrank_block_weights

FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large, HealthCheck.filter_too_much])
PASSED, RAISED = "passed", "FxditError"

# ---------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def dit_configs(draw: Any) -> DiTConfig:
    """Tiny reference DiTs: depth ≤ 2, width ≤ 64, ≤ 256 image tokens, 2-D or 3-D grids, optional text."""
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    hidden = heads * head_dim
    video = hidden >= 8 and draw(st.booleans())
    patch = draw(st.sampled_from([1, 2]))
    if video:
        grid = (draw(st.integers(1, 3)), draw(st.sampled_from([2, 3, 4, 6])), draw(st.sampled_from([2, 4, 6, 8])))
        size = (grid[0], grid[1] * patch, grid[2] * patch)
    else:
        grid = (draw(st.sampled_from([2, 3, 4, 6, 8, 12, 16])), draw(st.sampled_from([2, 4, 6, 8, 16])))
        size = (grid[0] * patch, grid[1] * patch)
    if math.prod(grid) > 256:
        grid = grid[:-1] + (max(1, 256 // math.prod(grid[:-1])),)
        size = size[:-1] + (grid[-1] * patch,)
    text = draw(st.sampled_from([0, 0, 3, 8]))
    return DiTConfig(depth=draw(st.integers(1, 2)), hidden=hidden, heads=heads, patch=patch, input_size=size,
                     in_channels=draw(st.sampled_from([1, 4])), num_classes=draw(st.sampled_from([0, 3])),
                     attention=draw(st.sampled_from(ATTENTION_FORMS)), mlp_ratio=draw(st.sampled_from([1.0, 2.0])),
                     text_tokens=text, text_position=draw(st.sampled_from(["before", "after"])))


def token_grid(cfg: DiTConfig) -> tuple[int, ...]:
    t, h, w = cfg.grid
    return (h, w) if len(cfg.input_size) == 2 else (t, h, w)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


#: One wrong thing to add to an otherwise valid option dict (``None``: leave it valid).
CORRUPTIONS: list[tuple[str, Any] | None] = [
    ("attention.mdoe", "grat-b"), ("cache.schedul", {"period": 2}), ("on_pass_error", "ignore"),
    ("attention.radius", -1), ("attention.group", "4x4"), ("attention.min_tokens", 1.5),
    ("cache.schedule", {"full_steps": []}), ("cache.schedule", {"full_steps": [2]}), ("cache.guard", "nan"),
    ("cache.schedule", {"cooldown": 1}), ("inductor", [1]), ("attention.block_size", 20), ("bogus", True),
]


def corrupt(options: dict[str, Any], corruption: tuple[str, Any] | None) -> dict[str, Any]:
    if corruption is None:
        return options
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in options.items()}
    key, value = corruption
    if "." in key:
        section, leaf = key.split(".", 1)
        out.setdefault(section, {})
        out[section] = {**out[section], leaf: value}
    else:
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------------------------


def build(cfg: DiTConfig, seed: int, lowrank: int | None = None) -> tuple[DiT, list[tuple[tuple, dict]]]:
    """The model (eval, seeded) and three calls of a denoising trajectory."""
    torch.manual_seed(seed)
    model = DiT(cfg).eval()
    if lowrank is not None:
        set_lowrank_block_weights(model, lowrank)
    g = torch.Generator().manual_seed(seed + 1)
    batch = 2
    x = torch.randn(batch, cfg.in_channels, *cfg.input_size, generator=g)
    y = torch.arange(batch) % cfg.num_classes if cfg.num_classes else None
    text = torch.randn(batch, cfg.text_tokens, cfg.hidden, generator=g) if cfg.text_tokens else None
    calls = []
    for i in range(4):
        kwargs = {"text": text} if text is not None else {}
        calls.append(((x + 0.05 * i * torch.randn(x.shape, generator=g), torch.full((batch,), 900.0 - 70 * i), y),
                      kwargs))
    return model, calls


def compile_and_run(model: torch.nn.Module, options: Any, calls: list, *, sampling: bool = False,
                    traced: list | None = None) -> tuple[Any, list[torch.Tensor]]:
    """Compile with ``backend="fxdit"`` and run ``calls``; ``traced`` receives the graphs Dynamo handed fxdit."""
    torch._dynamo.reset()
    backend: Any = "fxdit"
    kwargs = {"options": options}
    if traced is not None:
        from fxdit.backend import fxdit_backend

        def backend(gm: Any, example_inputs: Any) -> Any:
            traced.append(gm)  # fxdit works on a copy; this stays the graph as traced
            return fxdit_backend(gm, example_inputs, options=options)

        kwargs = {}
    fast = torch.compile(model, backend=backend, dynamic=False, **kwargs)
    ctx = fxdit.sampling(fast) if sampling else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return fast, [fast(*a, **k) for a, k in calls]


def eager(model: torch.nn.Module, calls: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(*a, **k) for a, k in calls]


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    scale = float(ref.abs().max()) or 1.0
    err = float((out - ref).abs().max())
    assert out.shape == ref.shape and err <= tol * scale, f"{what}: max error {err:.3g} > {tol} × {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Properties (one case each)
# ---------------------------------------------------------------------------------------------------------------


def check_lossless(cfg: DiTConfig, seed: int, choice: dict[str, Any], corruption: Any) -> str:
    """Nothing lossy on: the compiled model gives the eager output (up to float reassociation: 1e-6)."""
    options: dict[str, Any] = {"on_pass_error": choice["policy"]}
    if choice["attention"] == "min_tokens":
        options["attention"] = {"mode": choice["mode"], "group": (1,) * len(token_grid(cfg)),
                                "min_tokens": cfg.tokens + 1}
    elif choice["attention"] == "no_layers":
        options["attention"] = {"mode": choice["mode"], "layers": [cfg.depth + 5]}
    if choice["cache"] == "every_step_full":
        options["cache"] = {"mode": "reuse", "schedule": "none"}
    elif choice["cache"] == "off":
        options["cache"] = {"mode": "off", "schedule": {"period": 3}}
    options = corrupt(options, corruption)
    model, calls = build(cfg, seed)
    try:
        FxditConfig.from_options(options)
        fast, outs = compile_and_run(model, options, calls[:2])
    except FxditError:
        return RAISED
    for i, (out, ref) in enumerate(zip(outs, eager(model, calls[:2]))):
        _close(out, ref, 1e-6, f"call {i}")
    assert not any(r.runtime is not None for r in fxdit.reports(fast))
    return PASSED


def check_grat(cfg: DiTConfig, seed: int, choice: dict[str, Any], corruption: Any) -> str:
    """GRAT equals eager attention with the grouped mask's dense equivalent, on exactly the rewritten sites."""
    from fxdit.passes._fx_utils import fresh_copy
    from fxdit.passes.pipeline import find_attention, find_blocks
    from grat_oracle import grouped_sdpa, planned_sites

    grid = token_grid(cfg)
    group = tuple(choice["group_pick"][i] % len(_divisors(n)) for i, n in enumerate(grid))
    group = tuple(_divisors(n)[k] for n, k in zip(grid, group))
    if choice["ragged"]:  # a group that does not tile the grid (when the grid allows one)
        group = tuple(g + 1 if g < n else g for g, n in zip(group, grid))
    attention: dict[str, Any] = {"mode": choice["mode"], "group": group, "radius": choice["radius"],
                                 "min_tokens": choice["min_tokens"]}
    if choice["layers"] is not None:
        attention["layers"] = [i for i in range(cfg.depth) if choice["layers"] >> i & 1]
    if choice["grid"] == "given":
        attention["grid"] = grid
    elif choice["grid"] == "wrong":
        attention["grid"] = grid[:-1] + (grid[-1] * 2,)
    if choice["block_size"]:
        attention["block_size"] = choice["block_size"]
    options = corrupt({"attention": attention, "on_pass_error": "raise"}, corruption)
    model, calls = build(cfg, seed)
    calls = calls[:1]
    try:
        fxcfg = FxditConfig.from_options(options)
        traced: list = []
        fast, (out,) = compile_and_run(model, options, calls, traced=traced)
    except FxditError:
        return RAISED
    (record,) = fxdit.reports(fast)
    report = next(r for r in record.reports if r.name == "rewrite_grouped_attention")
    # the oracle: the same eager model (SDPA form, same weights) with the dense grouped mask on the planned sites
    (args, kwargs), = calls
    oracle_model = model
    if cfg.attention != "sdpa":
        import dataclasses

        oracle_model = DiT(dataclasses.replace(cfg, attention="sdpa")).eval()
        oracle_model.load_state_dict(model.state_dict())
    (gm,) = traced
    gm = fresh_copy(gm)
    find_attention(gm, fxcfg)
    find_blocks(gm, fxcfg)
    plans = planned_sites(gm, fxcfg)
    assert report.rewritten == sum(reason is None for _, reason in plans), (report, plans)
    with torch.no_grad():
        if plans:
            with grouped_sdpa(gm, fxcfg) as counts:
                ref = oracle_model(*args, **kwargs)
            assert counts["calls"] == counts["expected"]
        else:
            ref = oracle_model(*args, **kwargs)
    _close(out, ref, 2e-5, "grouped attention vs oracle")
    return PASSED


def check_icc(cfg: DiTConfig, seed: int, choice: dict[str, Any], corruption: Any) -> str:
    """ICC with factors of rank ≥ the weights' rank is exact at every step and follows the schedule."""
    true_rank = choice["true_rank"]
    model, calls = build(cfg, seed, lowrank=true_rank)
    qkv = choice["qkv"]
    rank = true_rank * (3 if qkv == "joint" else 1) + choice["extra_rank"]
    modules = block_linear_roles(model)
    if choice["missing_layer"]:
        modules.pop(sorted(modules)[choice["missing_layer"] % len(modules)])
    factors = calibrate(model, method="svd", rank=rank, modules=modules, qkv=choice["calib_qkv"] or qkv,
                        progress=False)
    schedule: dict[str, Any] = {"period": choice["period"], "warmup": choice["warmup"]}
    if choice["full_steps"]:
        schedule = {"full_steps": [0] + [s for s in range(1, 4) if choice["full_steps"] >> s & 1]}
    cache: dict[str, Any] = {"factors": factors, "schedule": schedule, "qkv": qkv, "guard": choice["guard"]}
    if choice["roles"]:
        cache["roles"] = [r for i, r in enumerate(CACHE_ROLES) if choice["roles"] >> i & 1]
    if choice["blocks"] is not None:
        cache["blocks"] = [i for i in range(cfg.depth) if choice["blocks"] >> i & 1]
    options = corrupt({"cache": cache, "on_pass_error": "raise"}, corruption)
    try:
        fxcfg = FxditConfig.from_options(options)
        fast, outs = compile_and_run(model, options, calls, sampling=True)
    except FxditError:
        return RAISED
    # it ran: the layer without factors was not planned (outside cache.roles/blocks, every step full, or not a
    # linear the analysis labels cacheable); a cached layer without factors could not give the eager output below
    for i, (out, ref) in enumerate(zip(outs, eager(model, calls))):
        _close(out, ref, 1e-4, f"step {i}")
    runtimes = [r.runtime for r in fxdit.reports(fast) if r.runtime is not None]
    for rt in runtimes:
        assert rt.stats.schedule == [fxcfg.cache.schedule.is_full(s) for s in range(len(calls))], rt.stats.schedule
    return PASSED


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
    "policy": st.sampled_from(["raise", "fallback"]),
    "attention": st.sampled_from(["dense", "min_tokens", "no_layers"]),
    "mode": st.sampled_from(["grat-b", "grat-x"]),
    "cache": st.sampled_from(["none", "off", "every_step_full"]),
})
GRAT_CHOICES = st.fixed_dictionaries({
    "mode": st.sampled_from(["grat-b", "grat-x"]),
    "group_pick": st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(0, 7)),
    "ragged": st.sampled_from([False, False, False, True]),
    "radius": st.integers(0, 2),
    "min_tokens": st.sampled_from([0, 0, 16, 64]),
    "layers": st.one_of(st.none(), st.integers(0, 3)),
    "grid": st.sampled_from(["inferred", "inferred", "given", "wrong"]),
    "block_size": st.sampled_from([None, None, 16, 32]),
})
ICC_CHOICES = st.fixed_dictionaries({
    "true_rank": st.integers(1, 3),
    "extra_rank": st.integers(0, 64),
    "qkv": st.sampled_from(["separate", "joint"]),
    "calib_qkv": st.sampled_from([None, None, None, "separate", "joint"]),
    "missing_layer": st.sampled_from([0, 0, 0, 0, 1, 2, 3]),
    "period": st.integers(1, 3),
    "warmup": st.integers(0, 2),
    "full_steps": st.sampled_from([0, 0, 2, 4, 6, 8, 14]),
    "roles": st.sampled_from([0, 0, 0, 0b1000, 0b1110000, 0b0101000, 0b1111111]),
    "blocks": st.one_of(st.none(), st.integers(0, 3)),
    "guard": st.sampled_from(["none", "nonfinite"]),
})
#: Two cases in three valid, one with one invalid option.
CORRUPTION = st.one_of(st.none(), st.none(), st.sampled_from(CORRUPTIONS))
SEEDS = st.integers(0, 2**16)

#: property name → (check function, strategies for its arguments).
PROPERTIES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "lossless": (check_lossless, (dit_configs(), SEEDS, LOSSLESS_CHOICES, CORRUPTION)),
    "grat": (check_grat, (dit_configs(), SEEDS, GRAT_CHOICES, CORRUPTION)),
    "icc": (check_icc, (dit_configs(), SEEDS, ICC_CHOICES, CORRUPTION)),
    "options": (check_options, (_OPTIONS,)),
}


@FIXTURE_OK
@given(*PROPERTIES["lossless"][1])
def test_fuzz_lossless(no_inductor, cfg, seed, choice, corruption):
    assert check_lossless(cfg, seed, choice, corruption) in (PASSED, RAISED)


@FIXTURE_OK
@given(*PROPERTIES["grat"][1])
def test_fuzz_grat(no_inductor, cfg, seed, choice, corruption):
    assert check_grat(cfg, seed, choice, corruption) in (PASSED, RAISED)


@FIXTURE_OK
@given(*PROPERTIES["icc"][1])
def test_fuzz_icc(no_inductor, cfg, seed, choice, corruption):
    assert check_icc(cfg, seed, choice, corruption) in (PASSED, RAISED)


@given(*PROPERTIES["options"][1])
def test_fuzz_options(options):
    assert check_options(options) in (PASSED, RAISED)


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=str)
def test_every_corruption_is_rejected(corruption):
    """The corruptions the properties mix in are all invalid (so a 'passed' case with one would be a bug)."""
    with pytest.raises(FxditError):
        FxditConfig.from_options(corrupt({"cache": {"mode": "reuse"}}, corruption))
