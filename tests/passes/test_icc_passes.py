"""ICC graph passes: plan_cache, record_linear_caches, insert_lowrank_increments (graph level, no inductor).

The full variant fills the caches at one input; the cached variant then runs at *another* input (new latents,
timesteps and labels) with those caches, so ``X − X_c ≠ 0`` at every cached linear. It is compared with

* the eager ICC oracle (tests/icc_oracle.py: the model with each cached linear hooked to return
  ``Y_c + (X − X_c)·Bᵀ·Aᵀ``), on ordinary random weights and low-rank factors, where a cached step is lossy
  (it must also differ from the full computation at the new input);
* the full computation at the new input, on weights of exactly rank r with rank-r factors (any correct
  increment is exact there).

Wrong factors (sign-flipped, q/k swapped, transposed) must fail these comparisons; at the input that filled the
caches they would not (``X − X_c = 0``).
"""

import fxdit.kernels.ops  # noqa: F401  (registers the fxdit ops)
import pytest
import torch
import torch.fx as fx
from fxdit.passes._fx_utils import fresh_copy, fxdit_meta, lifted_constants
from fxdit.passes.find_attention import find_attention
from fxdit.passes.find_blocks import find_blocks
from fxdit.passes.insert_lowrank_increments import insert_lowrank_increments
from fxdit.passes.plan_cache import cache_slots, plan_cache
from fxdit.passes.record_linear_caches import record_linear_caches
from hypothesis import given, settings
from hypothesis import strategies as st
from icc_oracle import IccOracle

from fxdit.apps.models.dit import DiT, DiTConfig
from fxdit.calibration import Factors, weight_fingerprint
from fxdit.config import FxditConfig
from fxdit.errors import FxditError

CACHED = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out")
#: The reference DiT's block linears by role (module path inside a block).
ROLE_MODULES = {"qkv": "attn.qkv", "attn_out": "attn.proj", "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"}
#: fp32 agreement of the cached variant with the oracle / the exact computation, relative to the output scale.
TOL = 1e-5


def capture(model, *args, inside=None):
    """The Dynamo graph of ``model(*args)`` and its example inputs (one graph); ``inside(gm)`` runs in the backend
    (where placeholders still carry their example tensors) and its result is returned instead."""
    got = []

    def backend(gm, example_inputs):
        got.append(inside(gm) if inside is not None else (gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*args)
    assert len(got) == 1
    return got[0]


def analysed(gm):
    work = fresh_copy(gm)
    cfg = FxditConfig()
    find_attention(work, cfg)
    find_blocks(work, cfg)
    return work


def lowrank_model(cfg: DiTConfig, rank: int, seed: int = 0):
    """A reference DiT whose cached linear weights (each q/k/v third of a fused qkv) are exactly rank ``rank``."""
    torch.manual_seed(seed)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not (isinstance(mod, torch.nn.Linear) and name.startswith("blocks.")):
                continue
            if name.split(".")[-1] not in ("qkv", "proj", "fc1", "fc2"):
                continue
            out, inp = mod.weight.shape
            parts = 3 if name.endswith("qkv") else 1
            rows = out // parts
            for p in range(parts):
                w = torch.randn(rows, rank) @ torch.randn(rank, inp) / (rank * inp) ** 0.5
                mod.weight[p * rows:(p + 1) * rows] = w
    return model


def svd_factors(model, work, rank=None, qkv="separate", skip=()):
    """Factors for every cacheable linear find_blocks found in ``work`` (module paths from the graph)."""
    facs, weights = {}, {}
    base = model
    for block in fxdit_meta(work)["blocks"]:
        for lin in block.linears:
            if lin.role not in CACHED or lin.module in skip:
                continue
            W = base.get_submodule(lin.module).weight.detach()
            weights[lin.module] = W
            parts = {lin.module: W}
            if lin.role == "qkv" and qkv == "separate":
                d = W.shape[0] // 3
                parts = {f"{lin.module}:{c}": W[i * d:(i + 1) * d] for i, c in enumerate("qkv")}
            for key, Wp in parts.items():
                U, S, Vh = torch.linalg.svd(Wp.double(), full_matrices=False)
                r = min(rank or S.numel(), S.numel())
                facs[key] = ((U[:, :r] * S[:r]).float().contiguous(), Vh[:r].float().contiguous())
    return Factors(facs, fingerprint=weight_fingerprint(weights))


def cfg_for(factors, **cache):
    return FxditConfig.from_options({"cache": {"factors": factors, "schedule": {"period": 2}, **cache},
                                     "on_pass_error": "raise"})


def inputs_for(seed, batch=2, size=(8, 8), classes=4):
    """``(x, t, y)`` for the reference DiT: latents, one timestep per row, labels (the null class included)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = 100.0 + 800.0 * torch.rand(batch, generator=g)
    y = torch.randint(0, classes + 1, (batch,), generator=g)
    return x, t, y


def substitute(example_inputs, old, new):
    """The graph's example inputs with the user inputs ``old`` (by identity) replaced by ``new``."""
    swap = {id(o): n for o, n in zip(old, new)}
    assert len([t for t in example_inputs if id(t) in swap]) == len(old)
    return [swap.get(id(t), t) for t in example_inputs]


def run_variants(work, example_inputs, cfg, new_inputs):
    """Run the ICC variants of ``work``: the full variant at ``example_inputs`` (it fills the caches), the cached
    variant at ``new_inputs`` with those caches.

    Returns:
        dict: ``ref`` / ``ref_new`` (the original graph at both inputs), ``full`` (the full variant's user
        outputs), ``cached`` (the cached variant at the new inputs), ``cached_same`` (at the filling inputs),
        the reports and graph modules of both variants.
    """
    plan = fxdit_meta(work)["cache_plan"]
    full = fresh_copy(work)
    rep_full = record_linear_caches(full, cfg)
    cached = fresh_copy(work)
    rep_cached = insert_lowrank_increments(cached, cfg)
    with torch.no_grad():
        ref = work(*example_inputs)
        ref_new = work(*new_inputs)
        out_full = full(*example_inputs, *lifted_constants(full))
        n = rep_full.details["user_outputs"]
        caches = list(out_full[n:])
        assert len(caches) == len(cache_slots(plan))
        out_cached = cached(*new_inputs, *caches, *lifted_constants(cached))
        out_same = cached(*example_inputs, *caches, *lifted_constants(cached))
    return {"ref": ref, "ref_new": ref_new, "full": out_full[:n], "cached": out_cached, "cached_same": out_same,
            "rep_full": rep_full, "rep_cached": rep_cached, "full_gm": full, "cached_gm": cached}


def oracle_output(model, factors, modules, old, new):
    """The eager ICC oracle: a full step at ``old`` (fills the caches), then a cached step at ``new``."""
    oracle = IccOracle(model, factors, full_steps={0}, modules=modules)
    with torch.no_grad():
        oracle.begin_step(0)
        oracle(*old)
        oracle.begin_step(1)
        return oracle(*new)


def max_err(a, b):
    return float((a - b).abs().max())


@settings(max_examples=10)  # each example captures a Dynamo graph (~1-3 s on the shared CPU)
@given(depth=st.integers(1, 2), hidden=st.sampled_from([32, 48]), heads=st.sampled_from([2, 4]),
       rank=st.integers(2, 6), qkv=st.sampled_from(["separate", "joint"]),
       roles=st.sets(st.sampled_from(["qkv", "attn_out", "mlp_in", "mlp_out"]), min_size=1),
       form=st.sampled_from(["x", "projcache"]))
def test_increment_exact_for_exact_lowrank_weights(depth, hidden, heads, rank, qkv, roles, form):
    cfg_model = DiTConfig(depth=depth, hidden=hidden, heads=heads, input_size=(8, 8), num_classes=4)
    model = lowrank_model(cfg_model, rank)
    old, new = inputs_for(1), inputs_for(2)
    gm, inputs = capture(model, *old)
    work = analysed(gm)
    factors = svd_factors(model, work, rank=None, qkv=qkv)
    # Truncate to the weights' exact rank (full-rank factors would be planned "exact", leaving the graph alone);
    # a joint factorisation of the fused qkv weight needs 3·rank.
    facs = {}
    for k in factors.keys():
        r = 3 * rank if (qkv == "joint" and k.endswith(".qkv")) else rank
        a, b = factors.get(k)
        facs[k] = (a[:, :r].contiguous(), b[:r].contiguous())
    factors = Factors(facs, fingerprint=factors.fingerprint)
    cfg = cfg_for(factors, roles=sorted(roles), qkv=qkv)
    report = plan_cache(work, cfg)
    plan = fxdit_meta(work)["cache_plan"]
    assert report.details["planned"] == depth * len(roles)
    assert {e["role"] for e in plan["entries"]} == set(roles)
    assert not any(e["exact"] for e in plan["entries"])
    plan["form"] = form
    out = run_variants(work, inputs, cfg, substitute(inputs, old, new))
    torch.testing.assert_close(out["full"][0], out["ref"][0], rtol=0, atol=0)
    ref_new = out["ref_new"][0]
    scale = max(1.0, float(ref_new.abs().max()))
    assert max_err(ref_new, out["ref"][0]) > 0.1 * scale  # the cached step sees another input
    assert max_err(out["cached"][0], ref_new) <= 2 * TOL * scale
    assert out["rep_full"].rewritten == out["rep_cached"].rewritten == len(plan["entries"])
    out["full_gm"].graph.lint()
    out["cached_gm"].graph.lint()


@pytest.fixture(scope="module")
def tiny_random():
    """A reference DiT with ordinary random weights (no low-rank structure), captured once."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden=32, heads=2, input_size=(8, 8), num_classes=4)).eval()
    old = inputs_for(1)
    gm, inputs = capture(model, *old)
    return model, gm, inputs, old, {}


def planned_random(tiny_random, qkv="separate", roles=tuple(ROLE_MODULES), form="x", rank=4, bad=None):
    """Plan ICC on ``tiny_random`` with rank-``rank`` SVD factors (``bad(factors) -> Factors`` spoils the ones the
    graph gets) and run the variants; returns ``(variant outputs, oracle output, scale)``."""
    model, gm, inputs, old, memo = tiny_random
    new = inputs_for(2)
    work = analysed(gm)
    if (rank, qkv) not in memo:
        memo[rank, qkv] = svd_factors(model, work, rank=rank, qkv=qkv)
    factors = memo[rank, qkv]
    cfg = cfg_for(bad(factors) if bad else factors, roles=list(roles), qkv=qkv)
    plan_cache(work, cfg)
    plan = fxdit_meta(work)["cache_plan"]
    modules = {f"blocks.{b}.{ROLE_MODULES[r]}" for b in range(2) for r in roles}
    assert {e["module"] for e in plan["entries"]} == modules and not any(e["exact"] for e in plan["entries"])
    plan["form"] = form
    out = run_variants(work, inputs, cfg, substitute(inputs, old, new))
    want = oracle_output(model, factors, modules, old, new)
    return out, want, max(1.0, float(out["ref_new"][0].abs().max()))


@pytest.mark.parametrize("qkv,roles,form", [
    ("separate", tuple(ROLE_MODULES), "x"),
    ("joint", tuple(ROLE_MODULES), "projcache"),
    ("separate", ("qkv", "mlp_out"), "projcache"),
    ("joint", ("attn_out", "mlp_in"), "x"),
])
def test_cached_variant_matches_oracle_and_is_lossy(tiny_random, qkv, roles, form):
    out, want, scale = planned_random(tiny_random, qkv=qkv, roles=roles, form=form)
    torch.testing.assert_close(out["full"][0], out["ref"][0], rtol=0, atol=0)
    assert max_err(out["cached"][0], want) <= TOL * scale
    assert max_err(out["cached"][0], out["ref_new"][0]) > 100 * TOL * scale  # rank 4 of 32: lossy


def _flip_a(factors):
    return Factors({k: (-factors.get(k)[0], factors.get(k)[1]) for k in factors.keys()},
                   fingerprint=factors.fingerprint)


def _swap_qk(factors):
    facs = {k: factors.get(k) for k in factors.keys()}
    for block in range(2):
        q, k = f"blocks.{block}.attn.qkv:q", f"blocks.{block}.attn.qkv:k"
        facs[q], facs[k] = facs[k], facs[q]
    return Factors(facs, fingerprint=factors.fingerprint)


def _transpose_square(factors):
    """Factors of Wᵀ instead of W for every square weight (q/k/v thirds and proj): ``(Bᵀ, Aᵀ)``."""
    facs = {}
    for k in factors.keys():
        a, b = factors.get(k)
        facs[k] = (b.t().contiguous(), a.t().contiguous()) if a.shape[0] == b.shape[1] else (a, b)
    return Factors(facs, fingerprint=factors.fingerprint)


@pytest.mark.parametrize("bad", [_flip_a, _swap_qk, _transpose_square], ids=["sign", "qk_swapped", "transposed"])
def test_wrong_factors_fail_the_comparison(tiny_random, bad):
    """The comparison has teeth: the graph built from spoiled factors disagrees with the oracle at the new input,
    though at the input that filled the caches it still reproduces the original graph."""
    out, want, scale = planned_random(tiny_random, bad=bad)
    assert max_err(out["cached_same"][0], out["ref"][0]) <= TOL * scale  # X − X_c = 0 hides any factors
    assert max_err(out["cached"][0], want) > 10 * TOL * scale


@pytest.fixture(scope="module")
def tiny():
    cfg_model = DiTConfig(depth=2, hidden=32, heads=2, input_size=(8, 8), num_classes=4)
    model = lowrank_model(cfg_model, 4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 700.0]), torch.tensor([0, 3])
    gm, inputs = capture(model, x, t, y)
    return model, gm, inputs


def test_plan_counts_skips_and_timestep(tiny):
    model, gm, _ = tiny
    work = analysed(gm)
    missing = "blocks.1.mlp.fc2"
    with pytest.raises(FxditError, match=f"no factors for \\['{missing}'\\]"):  # a layer the file lacks
        plan_cache(analysed(gm), cfg_for(svd_factors(model, work, rank=4, skip=(missing,)), blocks=[1]))
    factors = svd_factors(model, work, rank=4, skip=(missing,))
    report = plan_cache(work, cfg_for(factors, blocks=[1], roles=["qkv", "attn_out", "mlp_in"]))
    plan = fxdit_meta(work)["cache_plan"]
    assert report.matched == 8
    assert report.skipped == {"block not in cache.blocks": 3, "role mlp_out not in cache.roles": 2}
    assert [e["module"] for e in plan["entries"]] == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]
    assert plan["entries"][0]["keys"] == tuple(f"blocks.1.attn.qkv:{p}" for p in "qkv")
    assert plan["timestep"] is not None and plan["timestep"][0] == "l_t_"
    assert plan["weight_index"]["blocks.1.attn.qkv"] >= 0
    # roles filter
    work2 = analysed(gm)
    report2 = plan_cache(work2, cfg_for(factors, roles=["mlp_in"]))
    assert report2.details["planned"] == 2 and report2.skipped["role qkv not in cache.roles"] == 2


def test_full_rank_factors_are_exact_and_untouched(tiny):
    model, gm, inputs = tiny
    work = analysed(gm)
    cfg = cfg_for(svd_factors(model, work, rank=None))
    plan_cache(work, cfg)
    plan = fxdit_meta(work)["cache_plan"]
    assert plan["entries"] and all(e["exact"] for e in plan["entries"])
    cached = fresh_copy(work)
    report = insert_lowrank_increments(cached, cfg)
    assert report.rewritten == 0 and report.skipped == {"full-rank factors: exact at cached steps": 8}
    assert not cache_slots(plan)


def test_passes_idempotent_and_mark_nodes(tiny):
    model, gm, inputs = tiny
    work = analysed(gm)
    cfg = cfg_for(svd_factors(model, work, rank=4))
    plan_cache(work, cfg)
    again = plan_cache(work, cfg)
    assert again.rewritten == 0 and again.details["planned"] == 8
    full, cached = fresh_copy(work), fresh_copy(work)
    r1 = record_linear_caches(full, cfg)
    n_full = len(full.graph.nodes)
    r2 = record_linear_caches(full, cfg)
    assert r1.rewritten == 8 and r2.rewritten == 0 and len(full.graph.nodes) == n_full
    out = full.graph.output_node().args[0]
    assert len(out) == 1 + 16
    c1 = insert_lowrank_increments(cached, cfg)
    n_cached = len(cached.graph.nodes)
    c2 = insert_lowrank_increments(cached, cfg)
    assert c1.rewritten == 8 and c2.rewritten == 0 and len(cached.graph.nodes) == n_cached
    ops = [n for n in cached.graph.nodes if n.target is torch.ops.fxdit.lowrank_increment.default]
    assert len(ops) == 6  # proj, fc1, fc2 per block; the fused qkv with separate factors uses one B GEMM + 3 A
    linears = [n for n in cached.graph.nodes if n.target is torch._C._nn.linear]
    cache_inputs = [n for n in cached.graph.nodes if n.op == "placeholder"
                    and (n.meta.get("fxdit") or {}).get("icc") == "cache_input"]
    assert len(cache_inputs) == 16
    # remaining exact linears: embedders, modulation, final layer; plus 4 per qkv (B and three A)
    assert sum((n.meta.get("fxdit") or {}).get("icc") == "increment" for n in linears) == 8
    # cache inputs sit before the lifted constants
    phs = [n for n in cached.graph.nodes if n.op == "placeholder"]
    kinds = [(n.meta.get("fxdit") or {}).get("constant", False) for n in phs]
    assert kinds == sorted(kinds)


def test_reuse_mode_outputs_cached_y(tiny_random):
    """Reuse mode returns Y_c: the oracle with zero factors, at an input other than the one that filled the caches."""
    model, gm, inputs, old, _ = tiny_random
    new = inputs_for(2)
    work = analysed(gm)
    cfg = FxditConfig.from_options({"cache": {"mode": "reuse", "schedule": {"period": 2}}, "on_pass_error": "raise"})
    plan_cache(work, cfg)
    out = run_variants(work, inputs, cfg, substitute(inputs, old, new))
    assert out["rep_full"].details["cache_outputs"] == 8
    modules = {f"blocks.{b}.{m}" for b in range(2) for m in ROLE_MODULES.values()}
    zero = {m: (torch.zeros(model.get_submodule(m).weight.shape[0], 1),
                torch.zeros(1, model.get_submodule(m).weight.shape[1])) for m in modules}
    want = oracle_output(model, zero, modules, old, new)
    scale = max(1.0, float(out["ref_new"][0].abs().max()))
    assert max_err(out["cached"][0], want) <= TOL * scale
    assert max_err(out["cached"][0], out["ref_new"][0]) > 100 * TOL * scale
    cached_gm = out["cached_gm"]
    assert sum(n.target is torch._C._nn.linear for n in cached_gm.graph.nodes) == (
        sum(n.target is torch._C._nn.linear for n in work.graph.nodes) - 8)


def test_fingerprint_mismatch_raises(tiny):
    model, gm, _ = tiny
    other = lowrank_model(DiTConfig(depth=2, hidden=32, heads=2, input_size=(8, 8), num_classes=4), 4, seed=1)
    factors_other = svd_factors(other, analysed(gm), rank=4)
    factors = svd_factors(model, analysed(gm), rank=4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 700.0]), torch.tensor([0, 3])

    def plan_with(factors):
        def inside(g):
            work = analysed(g)
            plan_cache(work, cfg_for(factors))
            return fxdit_meta(work)["cache_plan"]
        return inside

    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        capture(model, x, t, y, inside=plan_with(factors_other))
    assert isinstance(info.value.inner_exception, FxditError) and "recalibrate" in str(info.value.inner_exception)
    assert capture(model, x, t, y, inside=plan_with(factors))["verified"]  # checked inside the backend


def test_cache_off_plans_nothing(tiny):
    _, gm, _ = tiny
    work = analysed(gm)
    report = plan_cache(work, FxditConfig.from_options({"cache": {"mode": "reuse", "schedule": "none"}}))
    assert fxdit_meta(work)["cache_plan"] is None and report.matched == 0
    assert isinstance(work, fx.GraphModule)


def test_graph_running_vmap_inline_is_not_cached():
    """A forward that runs ``torch.vmap`` inline (as FlexAttention's block-mask construction does) gets no cache
    plan, with the reason, instead of cache tensors that could be batched tensors of the transform."""
    from fxdit.passes.plan_cache import R_VMAP

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            w = torch.vmap(lambda r: r * 2)(x)
            return self.lin(w)

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(M(), backend=record, fullgraph=True)(torch.randn(3, 8))
    torch._dynamo.reset()
    (gm,) = graphs
    report = plan_cache(gm, FxditConfig.from_options({"cache": {"mode": "reuse", "schedule": {"period": 2}}}))
    assert report.skipped == {R_VMAP: 1} and fxdit_meta(gm)["cache_plan"] is None
