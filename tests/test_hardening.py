"""Hardening: bad input gets a clear FxditError, failing passes fall back, numerics are guarded, state
never leaks between runs, threads or models.

Everything here runs the real backend with inductor left out (``no_inductor``), except the ``slow`` cases. The
tables ``OPTION_CATALOGUE`` and ``FACTOR_CATALOGUE`` are also printed by ``tools/reliability_report.py``.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fxdit.kernels.ops  # noqa: F401  (registers the fxdit ops)
import pytest
import torch

import fxdit
from fxdit import backend
from fxdit.apps.models.dit import DiT, DiTConfig, block_linear_roles, set_lowrank_block_weights
from fxdit.calibration import Factors, calibrate
from fxdit.config import FxditConfig
from fxdit.errors import FxditError

FACTORS_PATH = "factors.safetensors"  # stands for a factor file in option rows that fail before loading it

# ---------------------------------------------------------------------------------------------------------------
# The bad-input catalogue: options → a fragment of the FxditError message
# ---------------------------------------------------------------------------------------------------------------

#: ``(id, options, expected message fragment)``; every row must raise FxditError naming the field.
OPTION_CATALOGUE: list[tuple[str, Any, str]] = [
    # unknown keys, with did-you-mean
    ("unknown top-level key", {"atention": {}}, "unknown option atention (did you mean 'attention'?)"),
    ("unknown top-level key, no close match", {"bogus": 1}, "valid keys are: attention, cache"),
    ("unknown attention key", {"attention": {"mdoe": "grat-b"}}, "unknown option attention.mdoe (did you mean 'mode'?)"),  # noqa: E501
    ("unknown cache key", {"cache": {"gaurd": "nonfinite"}}, "unknown option cache.gaurd (did you mean 'guard'?)"),
    ("unknown schedule key", {"cache": {"schedule": {"perod": 2}}},
     "unknown option cache.schedule.perod (did you mean 'period'?)"),
    ("misspelt policy key", {"on_pass_eror": "raise"}, "did you mean 'on_pass_error'?"),
    ("misspelt mode value", {"attention": {"mode": "grat_b"}}, "attention.mode='grat_b'; expected one of"),
    ("misspelt mode value hint", {"attention": {"mode": "grat_b"}}, "(did you mean 'grat-b'?)"),
    ("misspelt cache mode", {"cache": {"mode": "incremnt"}}, "(did you mean 'increment'?)"),
    ("misspelt role", {"cache": {"roles": ["q", "mlp_ni"]}}, "(did you mean 'mlp_in'?)"),
    # wrong types
    ("options not a mapping", "grat-b", "options='grat-b'; expected a mapping (dict)"),
    ("section not a mapping", {"attention": ["grat-b"]}, "attention=['grat-b']; expected a mapping (dict)"),
    ("cache section not a mapping", {"cache": 1}, "cache=1; expected a mapping (dict)"),
    ("group as a string", {"attention": {"group": "16x16"}}, "attention.group='16x16'; expected a tuple of integers"),
    ("group of floats", {"attention": {"group": (4.0, 4.0)}}, "attention.group=(4.0, 4.0); expected a tuple of integers"),  # noqa: E501
    ("radius as a float", {"attention": {"radius": 1.5}}, "attention.radius=1.5; expected an integer"),
    ("radius as a bool", {"attention": {"radius": True}}, "attention.radius=True; expected an integer"),
    ("min_tokens as a string", {"attention": {"min_tokens": "1k"}}, "attention.min_tokens='1k'; expected an integer"),
    ("allow_grad as a string", {"attention": {"allow_grad": "yes"}}, "attention.allow_grad='yes'; expected a bool"),
    ("layers as an int", {"attention": {"layers": 3}}, "attention.layers=3; expected a tuple of integers"),
    ("period as a string", {"cache": {"schedule": {"period": "2"}}}, "cache.schedule.period='2'; expected an integer"),
    ("roles as a string", {"cache": {"roles": "q"}}, "cache.roles='q'; expected a list of roles"),
    ("blocks with a string", {"cache": {"blocks": [0, "1"]}}, "cache.blocks=[0, '1']; expected a tuple of integers"),
    ("factors as a number", {"cache": {"factors": 42}}, "cache.factors=42; expected a path to a .safetensors"),
    ("dump_dir as a number", {"dump_dir": 3}, "dump_dir=3; expected a directory path or None"),
    ("inductor patches as a list", {"inductor": ["max_autotune"]}, "inductor=['max_autotune']; expected a mapping"),
    # grid / group geometry
    ("group does not tile the grid", {"attention": {"mode": "grat-b", "group": (5, 4), "grid": (16, 16)}},
     "attention.group=(5, 4); expected sizes that divide grid=(16, 16) on every axis"),
    ("video group does not tile the grid", {"attention": {"mode": "grat-x", "group": (2, 8, 8), "grid": (3, 16, 16)}},
     "expected sizes that divide grid=(3, 16, 16)"),
    ("group rank differs from grid", {"attention": {"group": (4, 4), "grid": (2, 16, 16)}},
     "attention.group=(4, 4); expected 3 sizes to match grid=(2, 16, 16)"),
    ("group of one size", {"attention": {"group": (16,)}}, "attention.group=(16,); expected a tuple of 2 or 3 integers"),  # noqa: E501
    ("group size zero", {"attention": {"group": (0, 4)}}, "attention.group=(0, 4); expected integers >= 1"),
    ("grid size zero", {"attention": {"grid": (16, 0)}}, "attention.grid=(16, 0); expected integers >= 1"),
    ("radius < 0", {"attention": {"radius": -1}}, "attention.radius=-1; expected an integer >= 0"),
    ("min_tokens < 0", {"attention": {"min_tokens": -5}}, "attention.min_tokens=-5; expected an integer >= 0"),
    ("negative layer", {"attention": {"layers": [-1]}}, "attention.layers=[-1]; expected integers >= 0"),
    ("block_size not a power of two", {"attention": {"block_size": 24}},
     "attention.block_size=24; expected a power of two >= 16"),
    ("block_size too small", {"attention": {"block_size": 8}}, "attention.block_size=8; expected an integer >= 16"),
    # schedules
    ("period 0", {"cache": {"schedule": {"period": 0}}}, "cache.schedule.period=0; expected an integer >= 1"),
    ("empty full_steps", {"cache": {"schedule": {"full_steps": []}}},
     "cache.schedule.full_steps=[]; expected a non-empty list of step indices"),
    ("full_steps without step 0", {"cache": {"schedule": {"full_steps": [1, 2]}}}, "a list that contains step 0"),
    ("full step beyond the run", {"cache": {"schedule": {"full_steps": [0, 9], "num_steps": 5}}},
     "cache.schedule.full_steps=(0, 9); expected indices < num_steps=5"),
    ("cooldown without num_steps", {"cache": {"schedule": {"cooldown": 2}}},
     "cache.schedule.cooldown=2; expected 0 unless num_steps is set"),
    ("num_steps 0", {"cache": {"schedule": {"num_steps": 0}}}, "cache.schedule.num_steps=0; expected an integer >= 1"),
    ("negative warmup", {"cache": {"schedule": {"warmup": -1}}}, "cache.schedule.warmup=-1; expected an integer >= 0"),
    ("schedule word", {"cache": {"schedule": "every"}}, "cache.schedule='every'; expected 'none' or a mapping"),
    # conflicting modes and missing companions
    ("increment without factors", {"cache": {"mode": "increment"}},
     "cache.factors=None; expected a factor file or Factors object when cache.mode='increment'"),
    ("reuse with factors", {"cache": {"mode": "reuse", "factors": FACTORS_PATH}},
     "cache.mode='reuse'; expected 'increment' (or no mode) when cache.factors is given"),
    ("off with factors", {"cache": {"mode": "off", "factors": FACTORS_PATH}},
     "cache.mode='off'; expected 'increment' (or no mode) when cache.factors is given"),
    # closed choices
    ("qkv factorisation", {"cache": {"qkv": "fused"}}, "cache.qkv='fused'; expected one of 'separate', 'joint'"),
    ("guard", {"cache": {"guard": "nan"}}, "cache.guard='nan'; expected one of 'none', 'nonfinite'"),
    ("pass-error policy", {"on_pass_error": "ignore"}, "on_pass_error='ignore'; expected one of 'raise', 'fallback'"),
]


@pytest.mark.parametrize("options, fragment", [r[1:] for r in OPTION_CATALOGUE], ids=[r[0] for r in OPTION_CATALOGUE])
def test_option_catalogue(options, fragment):
    with pytest.raises(FxditError) as info:
        FxditConfig.from_options(options)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_option_catalogue_ids_unique():
    ids = [r[0] for r in OPTION_CATALOGUE]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------------------------
# A tiny reference DiT with exactly low-rank cached weights (so rank-r ICC is exact in real arithmetic)
# ---------------------------------------------------------------------------------------------------------------


def lowrank_dit(seed: int = 0, rank: int = 4, depth: int = 2, **kw: Any) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig(depth=depth, hidden=32, heads=2, input_size=(8, 8), num_classes=4, **kw)).eval()
    set_lowrank_block_weights(model, rank)
    return model


def cached_modules(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {n: role for n, role in block_linear_roles(model).items() if n not in skip}


def svd_factors(model: torch.nn.Module, rank: int = 4, **kw: Any) -> Factors:
    skip = kw.pop("skip", ())
    return calibrate(model, method="svd", rank=rank, modules=cached_modules(model, skip), progress=False, **kw)


def trajectory(n: int, batch: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    y = torch.arange(batch) % 4
    return [(x + 0.05 * i * torch.randn(x.shape, generator=g), torch.full((batch,), 900.0 - 80.0 * i), y)
            for i in range(n)]


def compile_icc(model: torch.nn.Module, factors: Any, schedule: Any = None, **options: Any) -> Any:
    cache = {"factors": factors, "schedule": schedule or {"period": 2}, **options.pop("cache", {})}
    return torch.compile(model, backend="fxdit", options={"cache": cache, **options}, dynamic=False)


def run(fast: Any, steps: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [fast(x, t, y) for x, t, y in steps]


def eager(model: torch.nn.Module, steps: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x, t, y) for x, t, y in steps]


def runtime_of(fast: Any) -> Any:
    (record,) = fxdit.reports(fast)
    assert record.runtime is not None
    return record.runtime


# ---------------------------------------------------------------------------------------------------------------
# Factor files: each problem is an FxditError at the first call (compilation), before any step runs
# ---------------------------------------------------------------------------------------------------------------


def _saved(tmp: Path, model: torch.nn.Module, name: str = "f.safetensors", **kw: Any) -> str:
    path = str(tmp / name)
    svd_factors(model, **kw).save(path)
    return path


def _missing(tmp: Path, model: torch.nn.Module) -> Any:
    return str(tmp / "no_such_file.safetensors")


def _truncated(tmp: Path, model: torch.nn.Module) -> Any:
    path = _saved(tmp, model)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def _corrupt_header(tmp: Path, model: torch.nn.Module) -> Any:
    path = _saved(tmp, model)
    data = bytearray(Path(path).read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header
    Path(path).write_bytes(bytes(data))
    return path


def _corrupt_data(tmp: Path, model: torch.nn.Module) -> Any:
    path = _saved(tmp, model)
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's data: still a valid safetensors file
    Path(path).write_bytes(bytes(data))
    return path


def _not_safetensors(tmp: Path, model: torch.nn.Module) -> Any:
    path = tmp / "pickle.safetensors"
    torch.save({"a": torch.zeros(2)}, path)  # a pickle: never unpickled
    return str(path)


def _not_fxdit(tmp: Path, model: torch.nn.Module) -> Any:
    from safetensors.torch import save_file

    path = str(tmp / "plain.safetensors")
    save_file({"w": torch.zeros(2, 2)}, path)
    return path


def _wrong_model(tmp: Path, model: torch.nn.Module) -> Any:
    return _saved(tmp, lowrank_dit(seed=7))


def _fine_tuned(tmp: Path, model: torch.nn.Module) -> Any:
    other = lowrank_dit(seed=0)
    with torch.no_grad():
        other.blocks[1].mlp.fc2.weight.mul_(1.05)
    return _saved(tmp, other)


def _wrong_shape(tmp: Path, model: torch.nn.Module) -> Any:
    torch.manual_seed(0)
    wider = DiT(DiTConfig(depth=2, hidden=48, heads=2, input_size=(8, 8), num_classes=4)).eval()
    return _saved(tmp, wider)


def _int_dtype(tmp: Path, model: torch.nn.Module) -> Any:
    from safetensors.torch import save_file

    f = svd_factors(model)
    tensors = {}
    for key in f.keys():
        a, b = f.get(key)
        tensors[f"{key}.A"], tensors[f"{key}.B"] = a.to(torch.int32), b.to(torch.int32)
    meta = {"format": "fxdit-factors", "version": 1, "method": "svd", "keys": f.keys(), "ranks": f.ranks,
            "exact": [], "fingerprint": f.fingerprint, "info": f.info, "meta": {}}
    path = str(tmp / "int.safetensors")
    save_file(tensors, path, metadata={"format": "fxdit-factors", "fxdit": json.dumps(meta)})
    return path


def _meta_device(tmp: Path, model: torch.nn.Module) -> Any:
    f = svd_factors(model)
    return Factors({k: tuple(t.to("meta") for t in f.get(k)) for k in f.keys()}, fingerprint=f.fingerprint)


def _rank_too_high(tmp: Path, model: torch.nn.Module) -> Any:
    f = svd_factors(model)
    key = f.keys()[0]
    a, b = f.get(key)
    n = min(a.shape[0], b.shape[1]) + 1
    pairs = {k: f.get(k) for k in f.keys()}
    pairs[key] = (torch.randn(a.shape[0], n), torch.randn(n, b.shape[1]))
    return Factors(pairs, fingerprint=f.fingerprint)


def _missing_layer(tmp: Path, model: torch.nn.Module) -> Any:
    return _saved(tmp, model, skip=("blocks.1.mlp.fc2",))


def _other_qkv_form(tmp: Path, model: torch.nn.Module) -> Any:
    return _saved(tmp, model, qkv="joint")


#: ``(id, make(tmp_path, model) -> cache.factors value, expected message fragment)``.
FACTOR_CATALOGUE: list[tuple[str, Callable[[Path, torch.nn.Module], Any], str]] = [
    ("missing file", _missing, "expected an existing .safetensors factor file"),
    ("truncated file", _truncated, "is corrupt or truncated"),
    ("corrupt header bytes", _corrupt_header, "is corrupt"),
    ("corrupt tensor bytes", _corrupt_data, "does not match the checksum stored at save time"),
    ("a pickle, not safetensors", _not_safetensors, "is corrupt or truncated"),
    ("safetensors without fxdit metadata", _not_fxdit, "not an fxdit factor file"),
    ("wrong model (fingerprint)", _wrong_model, "recalibrate"),
    ("fine-tuned weights (fingerprint)", _fine_tuned, "changed since calibration (['blocks.1.mlp.fc2'])"),
    ("wrong model shapes", _wrong_shape, "expected A (32, r) and B (r, 32) for the weight of blocks.0.attn.qkv"),
    ("wrong dtype (int32 factors)", _int_dtype, "expected floating point"),
    ("wrong device (meta)", _meta_device, "factors on the meta device hold no values"),
    ("rank > min(out, in)", _rank_too_high, "> min(out, in)"),
    ("missing layer", _missing_layer, "no factors for ['blocks.1.mlp.fc2']"),
    ("calibrated with the other qkv form", _other_qkv_form, "calibrated with qkv='joint'; set cache.qkv='joint'"),
]


def factor_error(make: Callable[[Path, torch.nn.Module], Any], tmp: Path) -> str:
    """The FxditError message a bad factor source gives, at construction or at the compiled model's first call.

    Raises:
        AssertionError: when it gives none, or a step ran.
    """
    model = lowrank_dit()
    steps = trajectory(1)
    try:
        source = make(tmp, model)
        fast = compile_icc(model, source)
        run(fast, steps)
    except FxditError as exc:
        assert not fxdit.reports(model), "a graph was compiled although its factors are bad"
        return str(exc).split("\n")[0]
    raise AssertionError("no FxditError")


@pytest.mark.parametrize("make, fragment", [r[1:] for r in FACTOR_CATALOGUE], ids=[r[0] for r in FACTOR_CATALOGUE])
def test_factor_catalogue(make, fragment, tmp_path, no_inductor):
    assert fragment in factor_error(make, tmp_path)


def test_factor_file_roundtrip_runs_and_loading_never_unpickles(tmp_path, no_inductor, monkeypatch):
    model = lowrank_dit()
    path = _saved(tmp_path, model)
    import pickle

    def no_pickle(*a: Any, **k: Any) -> Any:
        raise AssertionError("a factor file was unpickled")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    steps = trajectory(4)
    fast = compile_icc(model, path)
    for out, ref in zip(run(fast, steps), eager(model, steps)):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert runtime_of(fast).stats.cached_calls == 2


def test_extra_layers_are_ignored_per_graph_but_caught_against_the_model(tmp_path, no_inductor):
    """Factors for modules the model lacks (a deeper model with the same first blocks) cannot change an output: each
    graph verifies the modules it holds, since a graph break legitimately splits a model's linears. The whole-model
    check names them."""
    deep = lowrank_dit(depth=3)
    model = lowrank_dit(depth=2)
    model.load_state_dict({k: v for k, v in deep.state_dict().items() if not k.startswith("blocks.2.")})
    factors = svd_factors(deep)
    with pytest.raises(FxditError, match="blocks.2"):
        factors.verify_model(model)
    steps = trajectory(4)
    fast = compile_icc(model, factors)
    for out, ref in zip(run(fast, steps), eager(model, steps)):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert runtime_of(fast).stats.cached_calls == 2


@pytest.mark.parametrize("options, fragment", [
    ({"atention": {"mode": "grat-b"}}, "did you mean 'attention'"),
    ({"attention": {"mode": "grat-b", "group": (3, 3), "grid": (4, 4)}}, "expected sizes that divide grid"),
    ({"cache": {"schedule": {"full_steps": []}}}, "non-empty list"),
], ids=["unknown key", "tiling", "empty schedule"])
def test_bad_options_surface_as_fxdit_error_through_torch_compile(options, fragment, no_inductor):
    model = lowrank_dit()
    fast = torch.compile(model, backend="fxdit", options=options)
    with pytest.raises(FxditError) as info:
        run(fast, trajectory(1))
    assert fragment in str(info.value) and isinstance(info.value, ValueError)
    assert not fxdit.reports(model)


def test_non_module_arguments_are_fxdit_errors():
    for fn in (fxdit.reset, fxdit.reports):
        with pytest.raises(FxditError, match="expected an nn.Module"):
            fn(42)
    with pytest.raises(FxditError, match="expected an nn.Module"):
        with fxdit.sampling("model"):
            pass
    with pytest.raises(FxditError, match="calls_per_step=0"):
        with fxdit.sampling(torch.nn.Linear(2, 2), calls_per_step=0):
            pass
    with pytest.raises(FxditError, match="rank=0; expected an integer >= 1"):
        svd_factors(lowrank_dit(), rank=0)


# ---------------------------------------------------------------------------------------------------------------
# Pass failure: fallback vs raise
# ---------------------------------------------------------------------------------------------------------------


class InternalBug(Exception):
    pass


def _broken(name: str) -> Callable[..., Any]:
    def broken(gm: Any, cfg: Any) -> Any:
        raise InternalBug(f"injected failure in {name}")

    broken.__name__ = name
    return broken


PIPELINE_NAMES = [p.__name__ for p in backend.PIPELINE]
VARIANT_PASSES = ["record_linear_caches", "insert_lowrank_increments"]


def _break_pass(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    if name in PIPELINE_NAMES:
        monkeypatch.setattr(backend, "PIPELINE", tuple(_broken(name) if p.__name__ == name else p
                                                       for p in backend.PIPELINE))
    else:  # an ICC variant pass: the runtime takes it from the pipeline's declared variants
        from fxdit.passes import pipeline

        (key,) = [k for k, p in pipeline.VARIANT_PASSES.items() if p.__name__ == name]
        monkeypatch.setitem(pipeline.VARIANT_PASSES, key, _broken(name))


def _lossy_options(factors: Any) -> dict[str, Any]:
    return {"attention": {"mode": "grat-b", "group": (2, 2), "radius": 0, "min_tokens": 0},
            "cache": {"factors": factors, "schedule": {"period": 2}}}


def _noop(name: str) -> Callable[..., Any]:
    from fxdit.passes._base import PassReport

    def noop(gm: Any, cfg: Any) -> Any:
        return PassReport(name)

    noop.__name__ = name
    return noop


@pytest.mark.parametrize("name", PIPELINE_NAMES + VARIANT_PASSES)
def test_failing_pass_falls_back_with_one_warning(name, monkeypatch, no_inductor):
    model = lowrank_dit()
    factors = svd_factors(model, rank=2)  # lossy caching and lossy GRAT: a wrong fallback would show
    steps = trajectory(3)
    _break_pass(monkeypatch, name)
    fast = torch.compile(model, backend="fxdit", options={**_lossy_options(factors), "on_pass_error": "fallback"},
                         dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = run(fast, steps)
    ours = [w for w in caught if "fxdit: pass" in str(w.message)]
    assert len(ours) == 1 and f"pass {name!r} failed (InternalBug: injected failure in {name})" in str(ours[0].message)
    (record,) = fxdit.reports(fast)
    assert any(r.name == name and "pass failed: InternalBug" in r.skipped for r in record.reports)
    # correct = what the graph computes without that pass: the pipeline with the pass left out (a variant pass
    # failing leaves the graph uncached)
    options = _lossy_options(factors)
    if name in PIPELINE_NAMES:
        monkeypatch.setattr(backend, "PIPELINE", tuple(_noop(name) if p.__name__ == name else p
                                                       for p in backend.PIPELINE))
    else:
        monkeypatch.undo()
        monkeypatch.setattr(backend, "lower", _no_inductor_lower())
        options.pop("cache")
    reference = torch.compile(lowrank_dit(), backend="fxdit", options={**options, "on_pass_error": "raise"},
                              dynamic=False)
    refs = run(reference, steps)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def _no_inductor_lower() -> Callable[..., Any]:
    def lower(gm: Any, example_inputs: Any, cfg: Any) -> Any:
        consts = backend.lifted_constants(gm)
        return lambda *args: gm(*args, *consts)

    return lower


@pytest.mark.parametrize("name", PIPELINE_NAMES + VARIANT_PASSES)
def test_failing_pass_raises_with_its_name(name, monkeypatch, no_inductor):
    model = lowrank_dit()
    _break_pass(monkeypatch, name)
    fast = torch.compile(model, backend="fxdit", options={**_lossy_options(svd_factors(model)),
                                                          "on_pass_error": "raise"}, dynamic=False)
    with pytest.raises(Exception) as info:
        run(fast, trajectory(1))
    assert f"error in pass {name!r}" in str(info.value) and "injected failure" in str(info.value)


def test_default_policy_is_fallback():
    assert FxditConfig().on_pass_error == "fallback"


# ---------------------------------------------------------------------------------------------------------------
# Numerics: the non-finite guard, fp32 accumulation of increments, bf16 within the fp32 error budget
# ---------------------------------------------------------------------------------------------------------------


def _overflowing_factors(model: torch.nn.Module) -> Factors:
    """Finite rank-2 factors so large that every cached step's increments overflow to inf."""
    good = svd_factors(model, rank=2)
    pairs = {}
    for key in good.keys():
        a, b = good.get(key)
        pairs[key] = (torch.full_like(a, 1e30), torch.full_like(b, 1e30))
    return Factors(pairs, fingerprint=good.fingerprint)


@pytest.mark.parametrize("guard", ["none", "nonfinite"])
def test_nonfinite_guard_recomputes_the_step_in_full(guard, no_inductor):
    model = lowrank_dit()
    steps = trajectory(4)
    fast = compile_icc(model, _overflowing_factors(model), cache={"guard": guard})
    outs = run(fast, steps)
    rt = runtime_of(fast)
    assert rt.stats.schedule == [True, guard == "nonfinite", True, guard == "nonfinite"]
    if guard == "none":  # what the guard is for: the cached steps are not finite without it
        assert not torch.isfinite(outs[1]).all() and rt.stats.cached_calls == 2
        return
    assert rt.stats.cached_calls == 0 and rt.stats.forced_full == 2 and rt.stats.full_calls == 4
    for out, ref in zip(outs, eager(model, steps)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the recomputed step refreshed the cache: the caches now hold step 3's tensors
    assert rt.live_cache_bytes > 0


def test_lowrank_increment_accumulates_in_fp32_on_cpu():
    from fxdit.kernels import ops
    from fxdit.kernels.reference import lowrank_increment_ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g)
    args = [t.bfloat16() for t in (x, x + 0.1 * torch.randn(64, 48, generator=g), 4 * torch.randn(64, 40, generator=g),
                                   torch.randn(8, 48, generator=g) / 7, torch.randn(40, 8, generator=g) / 3)]
    fp32 = lowrank_increment_ref(*args, compute_dtype=torch.float32)  # one rounding, at the end
    for impl in (ops._lowrank_increment_decomp, torch.ops.fxdit.lowrank_increment):
        out = impl(*args)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, fp32, rtol=0, atol=0)
    assert not torch.equal(lowrank_increment_ref(*args), fp32)  # bf16 intermediates round differently


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("qkv", ["separate", "joint"])
def test_bf16_icc_within_fp32_error_budget(qkv, no_inductor):
    """ICC error of a bf16 model ≤ ICC error of the fp32 model + 2 × the plain bf16 rounding error."""
    model32 = lowrank_dit(rank=6)
    factors = svd_factors(model32, rank=3, qkv=qkv)  # lossy: the weights have rank 6
    steps = trajectory(6)
    ref = eager(model32, steps)
    icc32 = run(compile_icc(model32, factors, cache={"qkv": qkv}), steps)
    torch._dynamo.reset()
    model16 = lowrank_dit(rank=6).to(torch.bfloat16)
    steps16 = [(x.bfloat16(), t, y) for x, t, y in steps]
    plain16 = eager(model16, steps16)
    fast16 = compile_icc(model16, factors, cache={"qkv": qkv})
    icc16 = run(fast16, steps16)
    rt = runtime_of(fast16)
    assert rt.stats.cached_calls == 3
    cached = [i for i, full in enumerate(rt.stats.schedule) if not full]
    for i in cached:
        assert icc16[i].dtype == torch.bfloat16
        err32, err16, rounding = _rel(icc32[i], ref[i]), _rel(icc16[i], ref[i]), _rel(plain16[i], ref[i])
        assert err32 > 0 and rounding > 0
        assert err16 <= err32 + 2 * rounding, (i, err16, err32, rounding)
    # caches are kept in the model's dtype
    assert {t.dtype for _, ts in rt._caches.values() for t in ts} == {torch.bfloat16}


@pytest.mark.slow
def test_bf16_icc_within_fp32_error_budget_inductor():
    model32 = lowrank_dit(rank=6)
    factors = svd_factors(model32, rank=3)
    steps = trajectory(4)
    ref = eager(model32, steps)
    icc32 = run(compile_icc(model32, factors), steps)
    torch._dynamo.reset()
    model16 = lowrank_dit(rank=6).to(torch.bfloat16)
    steps16 = [(x.bfloat16(), t, y) for x, t, y in steps]
    plain16 = eager(model16, steps16)
    icc16 = run(compile_icc(model16, factors), steps16)
    for i in (1, 3):
        assert _rel(icc16[i], ref[i]) <= _rel(icc32[i], ref[i]) + 2 * _rel(plain16[i], ref[i])


# ---------------------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------------------


def _clean_run(model: torch.nn.Module, factors: Any, steps: list) -> list[torch.Tensor]:
    fast = compile_icc(model, factors)
    with fxdit.sampling(fast):
        return run(fast, steps)


def _assert_equal(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)


def test_two_models_interleaved(no_inductor):
    m1, m2 = lowrank_dit(seed=0), lowrank_dit(seed=1)
    f1, f2 = svd_factors(m1, rank=2), svd_factors(m2, rank=2)  # lossy, so a mixed-up cache would show
    steps = trajectory(6)
    fast1, fast2 = compile_icc(m1, f1), compile_icc(m2, f2)
    with fxdit.sampling(fast1):
        alone1 = run(fast1, steps)
    with fxdit.sampling(fast2):
        alone2 = run(fast2, steps)
    with fxdit.sampling(fast1), fxdit.sampling(fast2), torch.no_grad():
        mixed = [(fast1(x, t, y), fast2(x, t, y)) for x, t, y in steps]
    _assert_equal([a for a, _ in mixed], alone1)
    _assert_equal([b for _, b in mixed], alone2)
    assert runtime_of(fast1).stats.cached_calls == runtime_of(fast2).stats.cached_calls == 6
    assert not torch.equal(alone1[1], alone2[1])


def test_same_model_from_two_threads_one_after_the_other(no_inductor):
    model = lowrank_dit()
    factors = svd_factors(model, rank=2)
    steps = trajectory(5)
    fast = compile_icc(model, factors)
    results: dict[str, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with fxdit.sampling(fast):
                results[name] = run(fast, steps)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for name in ("a", "b"):
        th = threading.Thread(target=worker, args=(name,))
        th.start()
        th.join()
    assert not errors
    _assert_equal(results["b"], results["a"])
    rt = runtime_of(fast)
    assert rt.stats.schedule == [True, False, True, False, True] * 2 and rt.live_cache_bytes == 0


@pytest.mark.parametrize("inside_sampling", [True, False])
def test_interrupted_run_next_run_starts_clean(inside_sampling, no_inductor):
    model = lowrank_dit()
    factors = svd_factors(model, rank=2)
    steps = trajectory(5)
    fast = compile_icc(model, factors)
    with fxdit.sampling(fast):
        clean = run(fast, steps)

    class Interrupt(Exception):
        pass

    with pytest.raises(Interrupt):
        if inside_sampling:
            with fxdit.sampling(fast):
                run(fast, steps[:3])
                raise Interrupt
        else:
            run(fast, steps[:3])
            raise Interrupt
    rt = runtime_of(fast)
    if inside_sampling:
        assert rt.live_cache_bytes == 0 and rt.step == -1
    # without sampling(): the timestep rising back to the first step's starts a new run
    again = run(fast, steps)
    _assert_equal(again, clean)
    assert rt.stats.schedule[-5:] == [True, False, True, False, True]


def test_exception_inside_the_compiled_call_leaves_no_state(no_inductor):
    model = lowrank_dit()
    steps = trajectory(4)
    fast = compile_icc(model, svd_factors(model, rank=2))
    with fxdit.sampling(fast):
        clean = run(fast, steps)
    x, t, y = steps[1]
    with fxdit.sampling(fast):
        run(fast, steps[:1])
        with pytest.raises(Exception):
            with torch.no_grad():
                fast(x, t, torch.tensor([0, 99]))  # label out of range: the embedding raises inside the step
    _assert_equal(_with_sampling(fast, steps), clean)


def _with_sampling(fast: Any, steps: list) -> list[torch.Tensor]:
    with fxdit.sampling(fast):
        return run(fast, steps)


def test_ten_runs_no_growth(no_inductor):
    model = lowrank_dit()
    fast = compile_icc(model, svd_factors(model, rank=2))
    steps = trajectory(4)
    counters = torch._dynamo.utils.counters
    seen = []
    first = None
    for i in range(10):
        with fxdit.sampling(fast):
            outs = run(fast, steps)
            rt = runtime_of(fast)
            during = rt.live_cache_bytes
        first = first or outs
        _assert_equal(outs, first)
        seen.append((len(fxdit.reports(fast)), counters["stats"]["unique_graphs"], counters["frames"]["ok"],
                     len(backend._SURFACED), during, rt.live_cache_bytes))
    assert seen[0][4] > 0 and all(s == seen[0] for s in seen), seen
    assert seen[0][5] == 0 and seen[0][0] == seen[0][1] == 1
    assert rt.stats.runs == 10 and rt.stats.cached_calls == 20


def test_ten_runs_without_sampling_context_hold_one_run_of_caches(no_inductor):
    model = lowrank_dit()
    fast = compile_icc(model, svd_factors(model, rank=2))
    steps = trajectory(4)
    sizes = []
    for _ in range(10):
        run(fast, steps)
        sizes.append(runtime_of(fast).live_cache_bytes)
    assert sizes[0] == runtime_of(fast).cache_bytes > 0 and len(set(sizes)) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("at", range(5))
def test_reset_at_any_point(at, no_inductor):
    model = lowrank_dit()
    fast = compile_icc(model, svd_factors(model, rank=2))
    steps = trajectory(5)
    with fxdit.sampling(fast):
        clean = run(fast, steps)
    run(fast, steps[:at])
    fxdit.reset(fast)
    rt = runtime_of(fast)
    assert rt.step == -1 and rt.live_cache_bytes == 0
    # a new run from the step the previous one was reset at: step 0 of the new run, a full step
    _assert_equal(run(fast, steps), clean)
    fxdit.reset(model)  # the original module works too
    assert rt.step == -1
