"""fxdit's ICC against an independent eager oracle (tests/icc_oracle.py), step by step, on changing inputs.

The models have ordinary random weights and the factors a rank well below every weight's, so a cached step is
lossy: fxdit must equal the oracle's ``Y_c + (X − X_c)·Bᵀ·Aᵀ`` per linear (to fp32 rounding) and differ from the
full computation, while full steps equal the full computation. The inputs follow a denoising-like trajectory
(``x ← x − 0.1·eps`` with a lower timestep every step), so ``X − X_c`` is never zero, and the full steps of every
schedule are written out by hand.
"""

import fxdit.kernels.ops  # noqa: F401  (registers the fxdit ops)
import pytest
import torch
from icc_oracle import IccOracle

import fxdit
import fxdit.apps.models
from fxdit.apps.models.dit import DiT, DiTConfig, block_linear_roles

GUIDANCE = 1.5
#: fp32 agreement of fxdit with the oracle, relative to the output scale (max |out|, at least 1).
TOL = 1e-5
#: A cached step must differ from the full computation by at least this many tolerances.
LOSSY = 100


def _dit(rank=4, qkv="separate", seed=0):
    torch.manual_seed(seed)
    model = DiT(DiTConfig(depth=2, hidden=32, heads=2, input_size=(8, 8), num_classes=4)).eval()
    example = ((torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])), {})
    factors = fxdit.calibrate(model, method="svd", rank=rank, qkv=qkv, modules=block_linear_roles(model),
                              example=example, progress=False)
    assert all(r < 32 // 2 for r in factors.ranks.values())  # well below min(out, in) of every factored weight
    return model, factors


def _compile(model, factors, schedule, qkv="separate"):
    options = {"cache": {"factors": factors, "schedule": schedule, "qkv": qkv}, "on_pass_error": "raise"}
    return torch.compile(model, backend="fxdit", options=options, dynamic=False)


def _check_step(step, got, want, exact, full):
    """fxdit vs oracle to fp32 rounding; vs the full computation: equal at full steps, clearly not at cached ones."""
    scale = max(1.0, float(exact.abs().max()))
    tol = TOL * scale
    err = float((got - want).abs().max())
    assert err <= tol, f"step {step}: fxdit differs from the ICC oracle by {err:.3g} (tolerance {tol:.3g})"
    loss = float((got - exact).abs().max())
    if full:
        assert loss <= tol, f"full step {step}: fxdit differs from the full computation by {loss:.3g}"
    else:
        assert loss > LOSSY * tol, f"cached step {step}: fxdit equals the full computation ({loss:.3g}); not lossy"


def _dit_call(f, x, t, y):
    return f(x, t, y)


def _diffusers_call(f, x, t, y):
    return f(x, timestep=t, class_labels=y, return_dict=False)[0]


def _run(model, fast, oracle, steps, *, two_call, null, shape=(4, 8, 8), call=_dit_call, runs=1):
    """Sample ``runs`` runs of ``steps`` steps with CFG (label 2 and ``null``) through fxdit, the oracle and the
    model, checking every call; the trajectory follows the oracle's guided prediction."""
    y, null = torch.tensor([2]), torch.tensor([null])
    for run in range(runs):
        x = torch.randn((1,) + shape, generator=torch.Generator().manual_seed(100 + run))
        oracle.reset()
        for step in range(steps):
            t = torch.tensor([900.0 - 50.0 * (run * steps + step)])  # falls across runs too
            oracle.begin_step(step)
            full = step in oracle.full_steps
            if two_call:
                outs = []
                for label in (y, null):
                    got, want, exact = (call(f, x, t, label) for f in (fast, oracle, model))
                    _check_step(step, got, want, exact, full)
                    outs.append(want)
                cond, uncond = outs
            else:
                xb, tb, yb = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
                got, want, exact = (call(f, xb, tb, yb) for f in (fast, oracle, model))
                _check_step(step, got, want, exact, full)
                cond, uncond = want[:1], want[1:]
            eps = uncond + GUIDANCE * (cond - uncond)
            x = x - 0.1 * eps[:, : x.shape[1]]


def _schedule_of(fast):
    (record,) = fxdit.reports(fast)
    return record.runtime.stats.schedule


def test_batched_cfg_period_2(no_inductor, tmp_path):
    """Cond and uncond batched in one call; fxdit and the oracle both read the factors from the saved file."""
    model, factors = _dit()
    path = str(tmp_path / "factors.safetensors")
    factors.save(path)
    fast = _compile(model, path, {"period": 2})
    oracle = IccOracle(model, path, {0, 2, 4, 6})
    assert [lin.path for lin in oracle.linears] == list(block_linear_roles(model))
    with torch.no_grad(), fxdit.sampling(fast):
        _run(model, fast, oracle, 7, two_call=False, null=4)
    assert _schedule_of(fast) == [True, False, True, False, True, False, True]
    assert [kind for _, _, kind in oracle.calls] == ["full", "cached"] * 3 + ["full"]


def test_two_call_cfg_warmup_period_cooldown_two_runs(no_inductor):
    """Cond and uncond in separate calls (streams found from the equal timesteps); warmup 2, period 4, cooldown 2
    over 8 steps; two runs back to back, the timestep still falling (the run restarts after num_steps)."""
    model, factors = _dit()
    fast = _compile(model, factors, {"period": 4, "warmup": 2, "cooldown": 2, "num_steps": 8})
    full_steps = {0, 1, 4, 6, 7}
    oracle = IccOracle(model, factors, full_steps)
    with torch.no_grad(), fxdit.sampling(fast):
        _run(model, fast, oracle, 8, two_call=True, null=4, runs=2)
    per_step = [True, True, False, False, True, False, True, True]
    assert _schedule_of(fast) == [f for f in per_step for _ in range(2)] * 2


def test_two_call_cfg_calls_per_step_joint_qkv_explicit_steps(no_inductor):
    model, factors = _dit(rank=5, qkv="joint")
    fast = _compile(model, factors, {"full_steps": [0, 3, 4]}, qkv="joint")
    oracle = IccOracle(model, factors, {0, 3, 4})
    with torch.no_grad(), fxdit.sampling(fast, calls_per_step=2):
        _run(model, fast, oracle, 7, two_call=True, null=4)
    assert _schedule_of(fast) == [f for f in (True, False, False, True, True, False, False) for _ in range(2)]


def test_shared_block_one_cache_per_call(no_inductor):
    """One block applied twice per forward: each of its linears runs twice, and each call has its own cache."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden=32, heads=2, input_size=(8, 8), num_classes=4)).eval()
    model.blocks[1] = model.blocks[0]
    example = ((torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])), {})
    factors = fxdit.calibrate(model, method="svd", rank=4, example=example, progress=False)
    assert {k.split(".")[1] for k in factors.keys()} == {"0", "1"}  # the graph names the second use blocks.1
    fast = _compile(model, factors, {"period": 2})
    oracle = IccOracle(model, factors, {0, 2})
    assert len(oracle.linears) == 4
    with torch.no_grad(), fxdit.sampling(fast):
        _run(model, fast, oracle, 4, two_call=False, null=4)
    assert _schedule_of(fast) == [True, False, True, False]


def test_the_comparison_sees_wrong_factors_and_wrong_schedule(no_inductor):
    """The oracle with sign-flipped A factors, or with the full steps shifted by one, disagrees with fxdit at the
    cached steps: the agreement above is not a property of any consistent cache. (Flipping every A partly cancels
    along the chain of increments, so the model output moves less than per layer; still far beyond TOL.)"""
    model, factors = _dit()
    flipped = {k: (-factors.get(k)[0], factors.get(k)[1]) for k in factors.keys()}
    fast = _compile(model, factors, {"period": 2})
    wrong_sign = IccOracle(model, flipped, {0, 2})
    shifted = IccOracle(model, factors, {0, 1, 3})
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 4])
    with torch.no_grad(), fxdit.sampling(fast):
        for step in range(4):
            t = torch.full((2,), 900.0 - 70.0 * step)
            x = x - 0.1 * torch.randn(x.shape)
            got = fast(x, t, y)
            tol = TOL * max(1.0, float(got.abs().max()))
            for oracle, differ in ((wrong_sign, {1, 3}), (shifted, {1, 2, 3})):
                oracle.begin_step(step)
                err = float((oracle(x, t, y) - got).abs().max())
                if step in differ:
                    assert err > 10 * tol, (step, err)
                else:
                    assert err <= tol, (step, err)


@pytest.mark.slow  # builds a diffusers model (~20 s with the import on the shared CPU)
def test_diffusers_dit_batched_cfg(no_inductor):
    spec = fxdit.apps.models.build("diffusers-dit", batch=2)
    model = spec.model
    factors = fxdit.calibrate(model, method="svd", rank=8, example=(spec.args, spec.kwargs), progress=False)
    assert len(factors) == 12 and set(factors.ranks.values()) == {8}  # q, k, v, out, ff in/out of 2 blocks (64 wide)
    fast = _compile(model, factors, {"period": 2})
    oracle = IccOracle(model, factors, {0, 2, 4})
    with torch.no_grad(), fxdit.sampling(fast):
        _run(model, fast, oracle, 5, two_call=False, null=1000, shape=(4, 16, 16), call=_diffusers_call)
    assert _schedule_of(fast) == [True, False, True, False, True]


def test_inductor_batched_cfg():
    """The real compiled path (inductor, the op's CPU decomposition) against the oracle."""
    model, factors = _dit()
    fast = _compile(model, factors, {"period": 2})
    oracle = IccOracle(model, factors, {0, 2})
    with torch.no_grad(), fxdit.sampling(fast):
        _run(model, fast, oracle, 4, two_call=False, null=4)
    assert _schedule_of(fast) == [True, False, True, False]


def test_oracle_rule_on_a_linear_used_twice():
    """The oracle itself, against a hand computation: one cache per call slot of a linear applied twice per
    forward, the bias in Y_c and not in the increment."""
    torch.manual_seed(0)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    m = Twice().eval()
    A, B = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    oracle = IccOracle(m, {"lin": (A, B)}, full_steps={0})
    x0, x1 = torch.randn(3, 5), torch.randn(3, 5)
    W, b = m.lin.weight.double(), m.lin.bias.double()
    with torch.no_grad():
        oracle.begin_step(0)
        assert torch.equal(oracle(x0), m(x0))
        oracle.begin_step(1)
        got = oracle(x1).double()
        h0 = x0.double() @ W.t() + b
        y0 = torch.tanh(h0) @ W.t() + b
        h1 = h0 + (x1.double() - x0.double()) @ B.t() @ A.t()
        want = y0 + (torch.tanh(h1) - torch.tanh(h0)) @ B.t() @ A.t()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert oracle.calls == [(0, 0, "full"), (1, 0, "cached")]
        assert not m._forward_pre_hooks and not m.lin._forward_hooks  # hooks only while the oracle runs
        fresh = IccOracle(m, {"lin": (A, B)}, full_steps={0})
        fresh.begin_step(1)
        with pytest.raises(RuntimeError, match="has no cache"):
            fresh(x1)
