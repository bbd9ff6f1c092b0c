"""ICC runtime: schedule, stream keying, runs and resets (unit, with stand-in variants), and end to end."""

import os

import fxdit.kernels.ops  # noqa: F401
import pytest
import torch

import fxdit
import fxdit.apps.models
from fxdit.config import FxditConfig, ScheduleConfig
from fxdit.errors import FxditError
from fxdit.runtime import CacheRuntime

# ---------------------------------------------------------------------------------------------------------
# unit: CacheRuntime with stand-in variants (outputs record which variant ran and which cache it was given)
# ---------------------------------------------------------------------------------------------------------


class Variants:
    def __init__(self):
        self.log = []

    def full(self, x, t):
        self.log.append(("full", None))
        return [x + 1, x.clone()]  # one user output, one cache tensor (the input)

    def cached(self, x, t, cache):
        self.log.append(("cached", float(cache.flatten()[0])))
        return [cache + 1]


def make(schedule, **kw):
    v = Variants()
    rt = CacheRuntime(v.full, v.cached, schedule, user_outputs=1, timestep_index=1, **kw)
    return v, rt


def kinds(v):
    return [k == "full" for k, _ in v.log]


#: Schedules with their full steps written out by hand: (options, steps per run, full or not per step).
SCHEDULES = [
    ({"period": 1}, 3, [True, True, True]),
    ({"period": 2}, 6, [True, False, True, False, True, False]),
    ({"period": 3, "warmup": 2}, 7, [True, True, False, True, False, False, True]),
    ({"period": 3, "warmup": 1, "cooldown": 2}, 8, [True, False, False, True, False, False, True, True]),
    ({"period": 4, "cooldown": 1}, 5, [True, False, False, False, True]),
    ({"period": 5, "cooldown": 3}, 4, [True, True, True, True]),
    ({"period": 2, "warmup": 3, "cooldown": 1}, 7, [True, True, True, False, True, False, True]),
    ({"full_steps": (0, 2, 3), "cooldown": 1}, 6, [True, False, True, True, False, True]),
    ({"full_steps": (0, 4), "warmup": 2}, 6, [True, True, False, False, True, False]),
    ({"period": 3}, 5, [True, False, False, True, False]),
]


@pytest.mark.parametrize("options,n,expected", SCHEDULES)
def test_is_full_on_literal_schedules(options, n, expected):
    sched = ScheduleConfig(num_steps=n, **options)
    assert [sched.is_full(s) for s in range(n)] == expected


@pytest.mark.parametrize("options,n,expected", SCHEDULES)
def test_schedule_fires_on_configured_steps(options, n, expected):
    v, rt = make(ScheduleConfig(num_steps=n, **options))
    x = torch.zeros(1, 2)
    for step in range(2 * n):  # two runs back to back: num_steps restarts the count
        rt(x, torch.tensor([float(1000 - step)]))
    assert kinds(v) == expected * 2
    assert rt.stats.full_calls == 2 * sum(expected) and rt.stats.cached_calls == 2 * (n - sum(expected))
    assert rt.stats.runs == 2


def test_explicit_full_steps_and_no_timestep():
    sched = ScheduleConfig(full_steps=(0, 3, 4))
    v = Variants()
    rt = CacheRuntime(v.full, v.cached, sched, user_outputs=1, timestep_index=None)
    for _ in range(6):
        rt(torch.zeros(1), torch.tensor([5.0]))  # same timestep every call, but it is not tracked
    assert kinds(v) == [True, False, False, True, True, False]


def test_two_call_cfg_keeps_separate_streams_cpu_timestep():
    v, rt = make(ScheduleConfig(period=2))
    cond, uncond = torch.full((1,), 10.0), torch.full((1,), 20.0)
    outs = []
    for t in (900.0, 800.0, 700.0):
        tt = torch.tensor([t])
        outs.append((rt(cond + t, tt)[0], rt(uncond + t, tt)[0]))
    assert kinds(v) == [True, True, False, False, True, True]
    # step 1 (cached) of each stream reads the cache of its own stream from step 0
    assert v.log[2] == ("cached", 10.0 + 900.0) and v.log[3] == ("cached", 20.0 + 900.0)
    assert rt.step == 2


def test_calls_per_step_from_sampling_context():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    m = M()
    v = Variants()
    rt = CacheRuntime(v.full, v.cached, ScheduleConfig(period=2), user_outputs=1, timestep_index=None,
                      param_ids=frozenset({id(m.w)}))
    with fxdit.sampling(m, calls_per_step=2):
        for _ in range(3):
            rt(torch.zeros(1) + 1, None)
            rt(torch.zeros(1) + 2, None)
    assert kinds(v) == [True, True, False, False, True, True]
    assert v.log[2] == ("cached", 1.0) and v.log[3] == ("cached", 2.0)
    with pytest.raises(FxditError):
        with fxdit.sampling(m, calls_per_step=0):
            pass


def test_timestep_jump_shape_change_and_reset_start_new_runs():
    v, rt = make(ScheduleConfig(period=3))
    x = torch.zeros(2, 2)
    for t in (900.0, 800.0):
        rt(x, torch.tensor([t, t]))
    rt(x, torch.tensor([999.0, 999.0]))  # timestep rose: new run
    assert kinds(v) == [True, False, True]
    rt(torch.zeros(4, 2), torch.tensor([900.0] * 4))  # cached step by schedule, but other shapes: fresh run
    assert kinds(v)[-1] is True and rt.step == 0
    rt.reset()
    assert rt.live_cache_bytes == 0
    rt(x, torch.tensor([100.0, 100.0]))
    assert kinds(v)[-1] is True and rt.stats.runs == 4


def test_gpu_style_timestep_not_read():
    """A timestep that is not a CPU tensor is never read: every call is a step."""
    v = Variants()
    rt = CacheRuntime(v.full, v.cached, ScheduleConfig(period=2), user_outputs=1, timestep_index=1)
    meta_t = torch.empty(1, device="meta")
    for _ in range(4):
        rt(torch.zeros(1), meta_t)
    assert kinds(v) == [True, False, True, False]


def test_nonfinite_guard_recomputes_in_full():
    def cached(x, t, cache):
        return [cache * float("nan")]

    v = Variants()
    rt = CacheRuntime(v.full, cached, ScheduleConfig(period=2), user_outputs=1, timestep_index=None,
                      guard="nonfinite")
    rt(torch.zeros(1), None)
    out = rt(torch.ones(1), None)
    assert torch.isfinite(out[0]).all() and rt.stats.forced_full == 1


# ---------------------------------------------------------------------------------------------------------
# end to end: the reference DiT compiled with fxdit, weights exactly rank r, rank-r SVD factors: every cached
# step is exact here (any consistent cache is); tests/test_icc_oracle.py checks lossy steps against an oracle
# ---------------------------------------------------------------------------------------------------------


def _lowrank_dit(rank=4, seed=0, **kw):
    from fxdit.apps.models.dit import DiT, DiTConfig, block_linear_roles, set_lowrank_block_weights

    torch.manual_seed(seed)
    model = DiT(DiTConfig(depth=2, hidden=32, heads=2, input_size=(8, 8), num_classes=4, **kw)).eval()
    modules = block_linear_roles(model)
    set_lowrank_block_weights(model, rank)
    factors = fxdit.calibrate(model, method="svd", rank=rank, modules=modules,
                              example=((torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])), {}),
                              progress=False)
    return model, factors


def _compile(model, factors, schedule, **cache):
    cfg = FxditConfig.from_options({"cache": {"factors": factors, "schedule": schedule, **cache},
                                    "on_pass_error": "raise"})
    return torch.compile(model, backend=fxdit.make_backend(cfg), dynamic=False)


def _trajectory(n, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    steps = []
    for i in range(n):
        t = torch.full((batch,), 900.0 - 80.0 * i)
        steps.append((x + 0.05 * i * torch.randn(x.shape, generator=g), t))
    return steps


def test_end_to_end_cached_steps_exact_no_recompile_and_cfg(tmp_path):
    model, factors = _lowrank_dit()
    y = torch.tensor([1, 3])
    fast = _compile(model, factors, {"period": 2})
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        # batched CFG: one call per step with [cond; uncond]
        yb = torch.cat([y, torch.full_like(y, 4)])
        for x, t in _trajectory(10, batch=2):
            xb, tb = torch.cat([x, x]), torch.cat([t, t])
            out = fast(xb, tb, yb)
            torch.testing.assert_close(out, model(xb, tb, yb), rtol=2e-5, atol=2e-5)
    (record,) = fxdit.reports(fast)
    rt = record.runtime
    assert rt.stats.schedule == [True, False] * 5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no graph break, no recompile
    assert record.summary["summary_cache_bytes"] > 0 and record.summary["summary_cache_linears"] == 8

    # two calls per step (cond, uncond) give the same result as the batched call
    fxdit.reset(fast)
    with torch.no_grad():
        for x, t in _trajectory(4, batch=2):
            xb, tb = torch.cat([x, x]), torch.cat([t, t])
            batched = model(xb, tb, yb)
            cond = fast(x, t, y)
            uncond = fast(x, t, torch.full_like(y, 4))
            torch.testing.assert_close(torch.cat([cond, uncond]), batched, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_end_to_end_two_models_interleaved_and_sampling_restart():
    m1, f1 = _lowrank_dit(seed=0)
    m2, f2 = _lowrank_dit(seed=1)
    fast1 = _compile(m1, f1, {"period": 3})
    fast2 = _compile(m2, f2, {"period": 3})
    y = torch.tensor([0, 2])
    with torch.no_grad():
        for x, t in _trajectory(4):
            o1, o2 = fast1(x, t, y), fast2(x, t, y)
            torch.testing.assert_close(o1, m1(x, t, y), rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(o2, m2(x, t, y), rtol=2e-5, atol=2e-5)
        (r1,) = fxdit.reports(fast1)
        assert r1.runtime.stats.schedule == [True, False, False, True]
        with fxdit.sampling(fast1):
            x, t = _trajectory(1)[0]
            fast1(x, t - 500.0, y)  # lower timestep, but a new run was started: step 0, full
        assert r1.runtime.stats.schedule[-1] is True and r1.runtime.live_cache_bytes == 0
        fxdit.reset(m2)  # works on the original module too
        (r2,) = fxdit.reports(m2)
        assert r2.runtime.step == -1


def test_schedule_none_is_plain_inductor():
    model, factors = _lowrank_dit()
    x, t = _trajectory(1)[0]
    y = torch.tensor([0, 1])
    with torch.no_grad():
        plain = torch.compile(model, backend="inductor", dynamic=False)(x, t, y)
        torch._dynamo.reset()
        fast = _compile(model, factors, "none")
        out = fast(x, t, y)
    assert torch.equal(out, plain)
    (record,) = fxdit.reports(fast)
    assert record.runtime is None


@pytest.mark.slow
def test_dump_shows_variants(tmp_path):
    model, factors = _lowrank_dit()
    cfg = FxditConfig.from_options({"cache": {"factors": factors}, "dump_dir": str(tmp_path)})
    fast = torch.compile(model, backend=fxdit.make_backend(cfg), dynamic=False)
    x, t = _trajectory(1)[0]
    with torch.no_grad():
        fast(x, t, torch.tensor([0, 1]))
    texts = {}
    for root, _, files in os.walk(tmp_path):
        for f in files:
            if f == "after.py":
                texts[os.path.basename(root)] = open(os.path.join(root, f)).read()
    cached = next(v for k, v in texts.items() if k.endswith("icc_cached"))
    full = next(v for k, v in texts.items() if k.endswith("icc_full"))
    assert cached.count("fxdit.lowrank_increment") == 6 and "icc_xc_" in cached
    assert "lowrank_increment" not in full


def _make_exact_lowrank(model, factors):
    """Set every factored weight to ``A @ B`` (rows of a fused qkv per part), so rank-r factors become exact."""
    with torch.no_grad():
        for key in factors.keys():
            path, _, part = key.partition(":")
            a, b = factors.get(key)
            w = model.get_submodule(path).weight
            if part:
                rows = w.shape[0] // 3
                i = "qkv".index(part)
                w[i * rows:(i + 1) * rows] = a @ b
            else:
                w.copy_(a @ b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers-dit", "pixart-alpha"])
def test_end_to_end_diffusers(name):
    spec = fxdit.apps.models.build(name, batch=2)
    model = spec.model
    example = (spec.args, spec.kwargs)
    _make_exact_lowrank(model, fxdit.calibrate(model, method="svd", rank=4, example=example, progress=False))
    factors = fxdit.calibrate(model, method="svd", rank=4, example=example, progress=False)
    fast = _compile(model, factors, {"period": 2})
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), fxdit.sampling(fast, calls_per_step=1):  # same inputs each call: one step per call
        for _ in range(4):
            torch.testing.assert_close(spec.sample(fast), spec.sample(), rtol=1e-4, atol=1e-4)
    records = fxdit.reports(fast)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(records)
    assert sum(r.report("plan_cache").details.get("planned", 0) for r in records) > 0
    assert any(r.runtime is not None and r.runtime.stats.cached_calls > 0 for r in records)
