"""Real diffusers pipelines end to end: ``pipe.transformer = torch.compile(..., backend="fxdit")``.

Every pipeline is built offline from tiny random components (:mod:`fxdit.apps.models.pipelines`), saved with
``save_pretrained`` and loaded back with ``from_pretrained``. The default run uses the ``no_inductor`` fixture (the
real backend: passes, registry, ICC runtime; the rewritten graph runs as Python); the cases that compile whole
pipelines with inductor are ``slow`` (``pytest -m slow tests/test_pipelines.py``).

What the tests hold each family to:

* lossy options off → the pipeline output equals the eager pipeline's (same generator seed);
* ICC (plain SVD factors) + GRAT-B → the reports count what the tiny config says: grouped-attention sites
  rewritten, cross-attention and text-only sites skipped with their reason, every cacheable linear planned;
* classifier-free guidance: batched (one call per step), separate cond/uncond calls (the runtime keys caches by
  the call's position in its step, found from the timestep inputs) and guidance-distilled (a guidance input);
* shapes: a new resolution or batch size is one recompile with its own masks and caches; many steps, no
  recompiles and no graph breaks;
* token spans in each family's graph agree with the model config.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fxdit.kernels.ops  # noqa: E402,F401  (registers fxdit::grouped_attention)

import fxdit  # noqa: E402
from fxdit.apps.models import pipelines as P  # noqa: E402
from fxdit.config import CACHE_ROLES  # noqa: E402

FAMILIES = list(P.PIPELINES)

#: GRAT-B group per family: tiles the tiny token grid at both resolutions of ``PIPELINES[name].resize``.
GROUPS = {"diffusers-dit": (4, 4), "pixart-alpha": (4, 4), "sd3": (4, 4), "flux": (4, 4),
          "hunyuan-video": (1, 2, 3), "wan": (2, 2, 3)}

#: Rank of the plain-SVD ICC factors: below every cached weight's min(in, out) (hidden sizes 48-64), so the
#: increments are really low-rank (lossy).
RANK = 8


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved pipeline folder per family (built lazily, shared by the module's tests)."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = P.save(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="module")
def analyses(folders):
    """Per family: the analysis of the graph the pipeline's first transformer call traces, and that call."""
    from fxdit.analysis import analyze

    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            pipe = P.load(folders(name))
            guidance = next(iter(P.PIPELINES[name].cfg))
            args, kwargs = P.first_transformer_call(pipe, **P.call_kwargs(name, guidance=guidance))
            (graph,) = analyze(pipe.transformer, *args, **kwargs)
            made[name] = (graph, args, kwargs)
        return made[name]

    return get


def _run(pipe, name, **kw):
    with torch.no_grad():
        return P.output_array(pipe(**P.call_kwargs(name, **kw)))


def _lossy_options(name, pipe, analysis=None):
    """ICC (plain SVD, no data) + GRAT-B options; the cached linears come from ``analysis`` when given (saves a
    trace), else ``calibrate`` finds them on the pipeline's first transformer call."""
    with torch.no_grad():
        if analysis is not None:
            graph = analysis[0]
            modules = {lin.module: lin.role for b in graph.blocks for lin in b.linears if lin.role in CACHE_ROLES}
            factors = fxdit.calibrate(pipe.transformer, method="svd", rank=RANK, modules=modules, progress=False)
        else:
            ex = P.first_transformer_call(pipe, **P.call_kwargs(name))
            factors = fxdit.calibrate(pipe.transformer, method="svd", rank=RANK, example=ex, progress=False)
    return {"on_pass_error": "raise",
            "attention": {"mode": "grat-b", "group": GROUPS[name], "min_tokens": 0},
            "cache": {"factors": factors, "schedule": {"period": 2}}}


def _expected_counts(name, *, resized=False):
    """What the reports must show, from the tiny config's expectations."""
    exp = P.expected(name, resized=resized)
    kinds = Counter(exp.site_kinds)
    grouped = kinds["image"] + kinds["joint"]
    skipped = {}
    if kinds["cross"]:
        skipped["cross-attention stays dense"] = kinds["cross"]
    if kinds["text"]:
        skipped["no image tokens (text-only attention)"] = kinds["text"]
    cacheable = sum(c for b in range(exp.blocks) for r, c in exp.roles(b).items() if r in CACHE_ROLES)
    return exp, grouped, skipped, cacheable


def _record(model, index=-1):
    records = fxdit.reports(model)
    assert records, "no graph was compiled"
    return records[index]


# ---------------------------------------------------------------------------------------------------------------
# The pipelines themselves (eager)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_pipeline_builds_offline_and_is_deterministic(name, tmp_path):
    a = P.build(name, tmp_path / "a", seed=0)
    b = P.build(name, tmp_path / "b", seed=0)
    c = P.build(name, tmp_path / "c", seed=1)
    assert type(a).__name__ == P.PIPELINES[name].pipeline
    assert (tmp_path / "a" / "model_index.json").is_file()
    out_a, out_b, out_c = _run(a, name), _run(b, name), _run(c, name)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert not torch.equal(out_a, out_c)
    assert torch.isfinite(out_a).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_forms_make_the_documented_transformer_calls(name, folders):
    """Per guidance form: transformer calls per step, and the batch each call carries."""
    pipe = P.load(folders(name))
    for guidance, per_step in P.PIPELINES[name].calls_per_step.items():
        batches = []
        handle = pipe.transformer.register_forward_pre_hook(
            lambda m, args, kw: batches.append((args[0] if args else kw["hidden_states"]).shape[0]),
            with_kwargs=True)
        try:
            _run(pipe, name, steps=3, guidance=guidance)
        finally:
            handle.remove()
        assert len(batches) == 3 * per_step, guidance
        assert set(batches) == {2 if guidance == "batched" else 1}, guidance


# ---------------------------------------------------------------------------------------------------------------
# Token spans in each family's graph (analysis of the graph the pipeline's transformer call traces)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_token_spans_match_the_config(name, analyses):
    graph, args, kwargs = analyses(name)
    exp = P.expected(name)
    assert graph.token_grid is not None and tuple(graph.token_grid.shape) == exp.token_grid
    assert len(graph.attention_sites) == exp.attention_sites
    for site, kind in zip(graph.attention_sites, exp.site_kinds):
        if kind == "joint":
            assert site.span_source == "cat"
            assert site.image_span == exp.image_span and site.text_span == exp.text_span
        elif kind == "image":
            assert site.span_source == "self" and site.image_span == (0, exp.tokens)
        elif kind == "cross":
            assert site.cross and site.q_len == exp.tokens
            assert site.kv_len == P.PIPELINES[name].sizes["text_tokens"]
        else:
            assert site.span_source == "text" and site.image_span is None
    text_len = P.PIPELINES[name].sizes.get("text_tokens")
    if name == "flux":  # text first
        assert exp.text_span == (0, text_len) and exp.image_span[0] == text_len
    elif exp.text_span is not None:  # image first
        assert exp.image_span[0] == 0 and exp.text_span == (exp.tokens, exp.tokens + text_len)
    if P.PIPELINES[name].text_padded:
        # padded prompts: the text-bearing sites carry the pipeline's padding mask
        masked = [s for s, k in zip(graph.attention_sites, exp.site_kinds) if k in ("joint", "cross", "text")]
        assert masked and all(s.mask is not None for s in masked)
        padding = kwargs["encoder_attention_mask"]
        assert bool((padding == 0).any()), "the prompt should be shorter than max_sequence_length"


# ---------------------------------------------------------------------------------------------------------------
# Every family through the real backend (inductor left out): lossless, ICC + GRAT, CFG forms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_lossless_equals_eager_without_recompiles_or_graph_breaks(name, folders, no_inductor):
    pipe = P.load(folders(name))
    guidance = list(P.PIPELINES[name].cfg)[-1]
    ref = _run(pipe, name, steps=6, guidance=guidance)
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="fxdit", options={"on_pass_error": "raise"}, fullgraph=True)
    _run(pipe, name, steps=2, guidance=guidance)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = _run(pipe, name, steps=6, guidance=guidance)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(fxdit.reports(model)) == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    record = _record(model)
    assert record.runtime is None
    assert record.report("rewrite_grouped_attention").rewritten == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_icc_and_grat_report_what_they_did(name, folders, analyses, no_inductor):
    pipe = P.load(folders(name))
    guidance = list(P.PIPELINES[name].cfg)[-1]  # batched or separate CFG where the pipeline has it
    model = pipe.transformer
    options = _lossy_options(name, pipe, analyses(name))
    ref = _run(pipe, name, steps=4, guidance=guidance)
    pipe.transformer = torch.compile(model, backend="fxdit", options=options)
    out = _run(pipe, name, steps=4, guidance=guidance)

    exp, grouped, skipped, cacheable = _expected_counts(name)
    (record,) = fxdit.reports(model)
    grat = record.report("rewrite_grouped_attention")
    assert grat.matched == exp.attention_sites
    assert grat.rewritten == grouped and dict(grat.skipped) == skipped
    plan = record.report("plan_cache")
    assert plan.details["planned"] == cacheable and not plan.skipped
    assert record.report("insert_lowrank_increments").rewritten == cacheable
    assert record.summary["blocks"] == exp.blocks
    assert record.summary["token_grid"] == exp.token_grid

    # the run used the cached variant on the steps the schedule says, per stream
    per_step = P.PIPELINES[name].calls_per_step[guidance]
    stats = record.runtime.stats
    assert stats.schedule == [step % 2 == 0 for step in range(4) for _ in range(per_step)]
    assert stats.cached_calls == 2 * per_step
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # lossy: it did something
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1.0, rel  # and it is still the same sample (a wrong cache or mask gives O(1) errors)


@pytest.mark.parametrize("name", ["sd3", "flux", "hunyuan-video", pytest.param("diffusers-dit", marks=pytest.mark.slow),
                                  pytest.param("pixart-alpha", marks=pytest.mark.slow),
                                  pytest.param("wan", marks=pytest.mark.slow)])
def test_grat_alone_follows_the_oracle(name, folders, no_inductor):
    """GRAT on its own, where the test above has it beside ICC: the whole pipeline with fxdit GRAT-B equals the eager
    pipeline whose attention gets the dense grouped mask from the independent oracle (grid and text side from the
    model's config and inputs), and differs from dense attention (radius 0: each group sees itself and the text,
    so the mask drops blocks even on these tiny grids)."""
    from grat_oracle import grouped_sdpa

    pipe = P.load(folders(name))
    guidance = list(P.PIPELINES[name].cfg)[-1]
    model = pipe.transformer
    options = {"on_pass_error": "raise",
               "attention": {"mode": "grat-b", "group": GROUPS[name], "radius": 0, "min_tokens": 0}}
    dense = _run(pipe, name, steps=2, guidance=guidance)
    with grouped_sdpa(model, options) as counts:
        expected = _run(pipe, name, steps=2, guidance=guidance)
    assert counts["masked"] > 0 and counts["sparse"] == counts["masked"], counts
    pipe.transformer = torch.compile(model, backend="fxdit", options=options)
    out = _run(pipe, name, steps=2, guidance=guidance)
    _, grouped, _, _ = _expected_counts(name)
    assert _record(model).report("rewrite_grouped_attention").rewritten == grouped
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)
    assert float((out - dense).abs().max()) > 1e-2  # sparse for real: far from the dense pipeline


@pytest.mark.parametrize("name", ["sd3", "flux", pytest.param("hunyuan-video", marks=pytest.mark.slow),
                                  pytest.param("pixart-alpha", marks=pytest.mark.slow)])
def test_icc_alone_follows_the_oracle(name, folders, analyses, no_inductor):
    """ICC on its own, where the ICC+GRAT test has it beside GRAT: the pipeline with fxdit ICC (period 2) equals the
    eager pipeline under the hook-based ICC oracle with full steps written out ({0, 2} of 4), and differs from the
    full computation."""
    from icc_oracle import IccOracle

    pipe = P.load(folders(name))
    guidance = list(P.PIPELINES[name].cfg)[-1]
    model = pipe.transformer
    options = _lossy_options(name, pipe, analyses(name))
    del options["attention"]
    per_step = P.PIPELINES[name].calls_per_step[guidance]
    full = _run(pipe, name, steps=4, guidance=guidance)
    oracle = IccOracle(model, options["cache"]["factors"], full_steps={0, 2})
    calls = [0]

    def step_of_call(module, args, kwargs):
        if calls[0] % per_step == 0:  # the first call of a step; the others are its further streams
            oracle.begin_step(calls[0] // per_step)
        calls[0] += 1

    handle = model.register_forward_pre_hook(step_of_call, with_kwargs=True)
    try:
        with oracle:
            expected = _run(pipe, name, steps=4, guidance=guidance)
    finally:
        handle.remove()
    assert calls[0] == 4 * per_step and [c[2] for c in oracle.calls].count("cached") == 2 * per_step
    pipe.transformer = torch.compile(model, backend="fxdit", options=options)
    out = _run(pipe, name, steps=4, guidance=guidance)
    assert _record(model).runtime.stats.cached_calls == 2 * per_step
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)
    assert float((out - full).abs().max()) > 1e-3  # lossy: the cached steps are not the full computation


@pytest.mark.parametrize("name", ["flux", pytest.param("hunyuan-video", marks=pytest.mark.slow),
                                  pytest.param("wan", marks=pytest.mark.slow)])
def test_separate_cfg_streams_found_without_help(name, folders, analyses, no_inductor):
    """Two calls per step with the same timestep: the runtime keys the cond and uncond caches apart by itself,
    exactly as ``fxdit.sampling(model, calls_per_step=2)`` does. Flux and HunyuanVideo also embed the guidance
    scale like a timestep (two timestep-like inputs)."""
    pipe = P.load(folders(name))
    model = pipe.transformer
    options = _lossy_options(name, pipe, analyses(name))
    pipe.transformer = torch.compile(model, backend="fxdit", options=options)
    auto = _run(pipe, name, steps=4, guidance="separate")
    with fxdit.sampling(pipe.transformer, calls_per_step=2):
        told = _run(pipe, name, steps=4, guidance="separate")
    torch.testing.assert_close(auto, told, rtol=0, atol=0)
    runtime = _record(model).runtime
    assert runtime.stats.schedule == [True, True, False, False] * 2 * 2
    # one call per step: the cached variant reads the caches of stream 0 only
    one = P.PIPELINES[name].cfg
    single = next(g for g in one if P.PIPELINES[name].calls_per_step[g] == 1)
    runtime.stats.clear()
    _run(pipe, name, steps=4, guidance=single)
    assert runtime.stats.schedule == [True, False, True, False]


def test_guidance_distilled_input_is_a_graph_input(folders, no_inductor):
    """Flux's guidance scale reaches the graph as an input (no recompile when it changes)."""
    name = "flux"
    pipe = P.load(folders(name))
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="fxdit", options={"on_pass_error": "raise"})
    kw = P.call_kwargs(name, guidance="distilled")
    with torch.no_grad():
        a = P.output_array(pipe(**kw))
        with torch._dynamo.config.patch(error_on_recompile=True):
            b = P.output_array(pipe(**{**P.call_kwargs(name, guidance="distilled"), "guidance_scale": 7.0}))
    assert not torch.equal(a, b)
    assert len(fxdit.reports(model)) == 1


def test_runtime_reads_every_timestep_like_input():
    """Unit: with two timestep-like inputs (timestep, guidance) the runtime keys steps and streams on both."""
    from fxdit.config import ScheduleConfig
    from fxdit.runtime import CacheRuntime

    log = []

    def full(x, t, g):
        log.append("full")
        return [x + 1, x.clone()]

    def cached(x, t, g, c):
        log.append("cached")
        return [c + 1]

    rt = CacheRuntime(full, cached, ScheduleConfig(period=2), user_outputs=1, timestep_index=(1, 2))
    g = torch.tensor([3.5])
    for t in (1.0, 0.75, 0.5):
        rt(torch.zeros(1), torch.tensor([t]), g)
        rt(torch.ones(1), torch.tensor([t]), g)
    assert log == ["full", "full", "cached", "cached", "full", "full"]
    rt(torch.zeros(1), torch.tensor([1.0]), g)  # the timestep rose: a new run
    assert log[-1] == "full" and rt.step == 0


def test_runtime_hands_the_cached_variant_contiguous_caches():
    """Unit: a recorded linear input that is a view of a wider buffer (SD3's text stream sliced off the joint
    sequence) reaches the cached variant contiguous, as inductor compiled it (it asserts input strides)."""
    from fxdit.config import ScheduleConfig
    from fxdit.runtime import CacheRuntime

    seen = []

    def full(x, t):
        joint = torch.cat([x, x + 1], dim=1)  # (B, 2N, C): the view below has row stride 2N*C
        return [x + 1, joint[:, x.shape[1]:]]

    def cached(x, t, c):
        seen.append(c.is_contiguous())
        return [c + 1]

    rt = CacheRuntime(full, cached, ScheduleConfig(period=2), user_outputs=1, timestep_index=1)
    x = torch.zeros(2, 3, 4)
    rt(x, torch.tensor([1.0]))
    out = rt(x, torch.tensor([0.5]))
    assert seen == [True]
    torch.testing.assert_close(out[0], x + 2)


# ---------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [pytest.param(None, marks=pytest.mark.slow), True])
def test_new_resolution_and_batch_cost_one_recompile_each(folders, analyses, no_inductor, dynamic):
    """With lossy rewrites the graph is pinned to its traced shapes, also under ``dynamic=True``: each new shape is
    one recompile with its own layouts and caches, and gives what a static compile gives."""
    name = "flux"
    pipe = P.load(folders(name))
    model = pipe.transformer
    options = _lossy_options(name, pipe, analyses(name))
    pipe.transformer = torch.compile(model, backend="fxdit", options=options, dynamic=dynamic)
    shapes = [{}, {"resized": True}, {"batch": 2}]
    outs = []
    for i, shape in enumerate(shapes):
        outs.append(_run(pipe, name, steps=4, **shape))
        assert len(fxdit.reports(model)) == i + 1, shape
    if dynamic:
        assert fxdit.reports(model)[0].summary.get("pinned_symbolic_sizes", 0) > 0
    grids = [r.summary["token_grid"] for r in fxdit.reports(model)]
    assert grids == [P.expected(name).token_grid, P.expected(name, resized=True).token_grid,
                     P.expected(name).token_grid]
    # fresh grouped-attention layouts and caches per shape
    exp, grouped, _, cacheable = _expected_counts(name, resized=True)
    for record in fxdit.reports(model):
        assert record.report("rewrite_grouped_attention").rewritten == grouped
        assert record.report("plan_cache").details["planned"] == cacheable
        assert record.runtime.stats.schedule == [True, False, True, False]
    sizes = [r.summary["summary_cache_bytes"] for r in fxdit.reports(model)]
    assert sizes[1] > sizes[0] and sizes[2] > sizes[0] and len(set(sizes)) == 3  # caches sized per shape
    # back to a shape seen before: no recompile, same result as the first time
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _run(pipe, name, steps=4)
    torch.testing.assert_close(again, outs[0], rtol=0, atol=0)
    # the same options with static shapes give the same sample at the new resolution
    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="fxdit", options=options, dynamic=False)
    torch.testing.assert_close(_run(pipe, name, steps=4, **shapes[1]), outs[1], rtol=0, atol=0)


def test_lossless_dynamic_true_is_exact_and_not_pinned(folders, no_inductor):
    """Without lossy options fxdit pins nothing: ``dynamic=True`` graphs stay as Dynamo traced them (Dynamo itself
    may still specialise, e.g. Flux's duck-sized ids), each new shape costs at most one recompile, and the output
    equals eager."""
    name = "flux"
    pipe = P.load(folders(name))
    shapes = [{}, {"resized": True}, {"batch": 2}]
    refs = [_run(pipe, name, steps=2, **shape) for shape in shapes]
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="fxdit", options={"on_pass_error": "raise"}, dynamic=True)
    for i, (shape, ref) in enumerate(zip(shapes, refs)):
        torch.testing.assert_close(_run(pipe, name, steps=2, **shape), ref, rtol=0, atol=0)
        assert len(fxdit.reports(model)) <= i + 1
    assert not any("pinned_symbolic_sizes" in r.summary for r in fxdit.reports(model))


def test_fifty_steps_no_recompile_no_graph_break(folders, analyses, no_inductor):
    name = "diffusers-dit"
    pipe = P.load(folders(name))
    model = pipe.transformer
    options = _lossy_options(name, pipe, analyses(name))
    pipe.transformer = torch.compile(model, backend="fxdit", options=options, fullgraph=True)
    _run(pipe, name, steps=1, guidance="batched")  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run(pipe, name, steps=50, guidance="batched")
    assert len(fxdit.reports(model)) == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    runtime = _record(model).runtime
    assert runtime.stats.schedule[1:] == [step % 2 == 0 for step in range(50)]
    args, kwargs = P.first_transformer_call(pipe, **P.call_kwargs(name, guidance="batched"))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


# ---------------------------------------------------------------------------------------------------------------
# Whole pipelines with inductor (slow)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_inductor_lossless_and_lossy(name, folders):
    """Inductor: lossless equals eager to float reassociation; ICC + GRAT runs with the documented reports and
    equals the same options run without inductor (the rewritten graph as Python)."""
    from fxdit import backend, registry

    pipe = P.load(folders(name))
    guidance = list(P.PIPELINES[name].cfg)[-1]
    model = pipe.transformer
    ref = _run(pipe, name, steps=3, guidance=guidance)
    pipe.transformer = torch.compile(model, backend="fxdit", options={"on_pass_error": "raise"})
    out = _run(pipe, name, steps=3, guidance=guidance)
    scale = float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)

    options = _lossy_options(name, pipe)
    torch._dynamo.reset()
    registry.clear()
    pipe.transformer = torch.compile(model, backend="fxdit", options=options)
    lossy = _run(pipe, name, steps=3, guidance=guidance)
    exp, grouped, skipped, cacheable = _expected_counts(name)
    record = _record(model)
    assert record.report("rewrite_grouped_attention").rewritten == grouped
    assert dict(record.report("rewrite_grouped_attention").skipped) == skipped
    assert record.report("insert_lowrank_increments").rewritten == cacheable

    real_lower = backend.lower

    def python_lower(gm, example_inputs, cfg):
        consts = backend.lifted_constants(gm)
        return lambda *args: gm(*args, *consts)

    torch._dynamo.reset()
    backend.lower = python_lower
    try:
        pipe.transformer = torch.compile(model, backend="fxdit", options=options)
        as_python = _run(pipe, name, steps=3, guidance=guidance)
    finally:
        backend.lower = real_lower
    torch.testing.assert_close(lossy, as_python, rtol=1e-4, atol=1e-4 * float(as_python.abs().max()))


@pytest.mark.slow
def test_inductor_fifty_steps_and_new_batch():
    """Inductor, DiT: 50 steps of ICC with 0 recompiles after the first step; a new batch size is one recompile."""
    import tempfile

    name = "diffusers-dit"
    with tempfile.TemporaryDirectory() as tmp:
        pipe = P.build(name, tmp)
        model = pipe.transformer
        options = _lossy_options(name, pipe)
        pipe.transformer = torch.compile(model, backend="fxdit", options=options, fullgraph=True)
        _run(pipe, name, steps=1, guidance="batched")
        with torch._dynamo.config.patch(error_on_recompile=True):
            _run(pipe, name, steps=50, guidance="batched")
        assert len(fxdit.reports(model)) == 1 and not torch._dynamo.utils.counters["graph_break"]
        _run(pipe, name, steps=2, guidance="batched", batch=2)
        assert len(fxdit.reports(model)) == 2
        assert fxdit.reports(model)[1].runtime.stats.schedule == [True, False]
