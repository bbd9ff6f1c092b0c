"""Context parallelism (``parallel`` option, ``shard_tokens`` pass, ``fxdit.kernels.halo``) with gloo on CPU.

Multi-process cases start 2 or 4 processes of ``tests/parallel_worker.py`` (one per rank, meeting through a rendezvous
file of their own, gloo with ``timeout=`` set, a bounded wait here) and compare what every rank returns with the
single-process compiled output of the same case computed in this process. The workers run the real backend with
inductor left out (the ``no_inductor`` patch); one case compiles with inductor. All of them run in the default suite
(about 2 minutes together), so CI runs the 2- and 4-process cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fxdit.kernels import halo

import fxdit
from fxdit import registry
from fxdit.config import FxditConfig
from fxdit.errors import FxditError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import parallel_worker as pw  # noqa: E402

#: Bounded wait for a whole multi-process run (startup, compiles and every case), in seconds.
RUN_TIMEOUT = 900


def _launch(tmp_path: Path, world: int, cases: list[str], *extra: str) -> tuple[list[int], dict[int, str], float]:
    """Run the workers; return exit codes, error texts by rank, and the wall time of the run."""
    store = Path(tempfile.mkdtemp(prefix="fxdit_rdzv_", dir=tmp_path)) / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    # One inductor cache per rank: ranks compiling the same kernel at once into one cache load each other's
    # half-written .so ("file too short").
    cache = Path(tempfile.gettempdir()) / "fxdit_parallel_inductor"
    procs = [subprocess.Popen([sys.executable, str(HERE / "parallel_worker.py"), str(r), str(world), str(store),
                               str(tmp_path), ",".join(cases), *extra],
                              env={**env, "TORCHINDUCTOR_CACHE_DIR": str(cache / f"rank{r}")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(world)]
    codes = []
    try:
        for p in procs:
            p.wait(timeout=max(1.0, RUN_TIMEOUT - (time.perf_counter() - t0)))
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = {}
    for r in range(world):
        f = tmp_path / f"error.rank{r}.txt"
        if f.exists():
            errors[r] = f.read_text()
    return codes, errors, time.perf_counter() - t0


def _check(tmp_path: Path, world: int, cases: list[str], *extra: str, tol: float | None = None) -> None:
    codes, errors, _ = _launch(tmp_path, world, cases, *extra)
    assert codes == [0] * world, errors
    for name in cases:
        ref = pw.run(name, None)
        dense = None
        for r in range(world):
            got = torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=False)
            details = got["details"]
            # the graph really was sharded: every attention site rewritten, one band per rank
            assert details["world"] == world and details["rank"] == r, details
            assert details["rewritten"] == 2 and not details["skipped"], details
            assert len(details["bands"]) == world
            assert len(got["outputs"]) == len(ref["outputs"])
            for out, expected in zip(got["outputs"], ref["outputs"]):
                # fp32 tolerances: only the summation order differs (inductor also reassociates: ``tol``)
                torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
            if dense is None and pw.CASES[name]["attention"]["mode"] != "dense":
                dense = _dense_output(name)
                assert (got["outputs"][0] - dense).abs().max() > 1e-3  # GRAT is active: the check has teeth


def _dense_output(name: str) -> torch.Tensor:
    model, calls, _ = pw.build(name)
    with torch.no_grad():
        return model(*calls[0])


# ---------------------------------------------------------------------------------------------------------------
# Plans, volumes, config (no processes)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, world", [(4, 2), (5, 2), (5, 4), (32, 8), (7, 7)])
def test_split_rows_cover_every_row_once(rows, world):
    bands = halo.split_rows(rows, world)
    assert bands[0][0] == 0 and bands[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    sizes = [b - a for a, b in bands]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_split_rows_needs_a_row_per_rank():
    with pytest.raises(ValueError, match="at least one row per rank"):
        halo.split_rows(3, 4)


@pytest.mark.parametrize("row_grid, radius", [((1, 5), 1), ((1, 8), 2), ((3, 4), 1), ((2, 3), 0)])
@pytest.mark.parametrize("world", [2, 3])
def test_halo_plan_sends_what_the_others_need(row_grid, radius, world):
    rows = row_grid[0] * row_grid[1]
    bands = halo.split_rows(rows, world)
    needs = tuple(halo.halo_rows(b, row_grid, radius) for b in bands)
    plans = [halo.halo_plan(r, bands, needs, 3) for r in range(world)]
    for p in plans:
        # what p receives from q is what q sends to p, and it fills the halo exactly
        assert [plans[q].send[p.rank][1] for q in range(world)] == list(p.recv)
        assert sum(p.recv) == (p.need[1] - p.need[0]) - (p.own[1] - p.own[0])
        assert p.before == p.own[0] - p.need[0]
    # every row a band's queries can see (within radius on both axes) lies in its needed range
    tp, hp = row_grid
    for (a, b), (c, d) in zip(bands, needs):
        for r in range(a, b):
            t, h = divmod(r, hp)
            for t2 in range(max(0, t - radius), min(tp, t + radius + 1)):
                for h2 in range(max(0, h - radius), min(hp, h + radius + 1)):
                    assert c <= t2 * hp + h2 < d


def test_halo_bytes_match_closed_form_for_interior_ranks():
    # 64x64 tokens, 8x8 groups: 8 group rows of 8*64 tokens; P=4, b=1: an interior rank sends one row each side
    bands = halo.split_rows(8, 4)
    needs = tuple(halo.halo_rows(b, (1, 8), 1) for b in bands)
    plan = halo.halo_plan(1, bands, needs, 8 * 64)
    batch, heads, d, elem = 2, 4, 16, 4
    assert halo.halo_bytes(plan, batch, heads, d, elem) == 2 * 1 * (8 * 64) * batch * heads * (2 * d) * elem
    assert halo.ring_bytes(4096, 4, batch, heads, d, elem) == 2 * 3 * 1024 * batch * heads * d * elem
    assert halo.ulysses_bytes(1024, 4, batch, heads, d, elem) == 4 * 1024 * batch * heads * d * elem * 3 // 4


def test_parallel_option_validation():
    assert FxditConfig.from_options(None).parallel.mode == "none"
    assert not FxditConfig.from_options(None).parallel.enabled
    assert FxditConfig.from_options({"parallel": {"mode": "halo"}}).parallel.enabled
    with pytest.raises(FxditError, match="parallel.mode"):
        FxditConfig.from_options({"parallel": {"mode": "ring"}})
    with pytest.raises(FxditError, match="parallel.group"):
        FxditConfig.from_options({"parallel": {"group": "world"}})
    with pytest.raises(FxditError, match="unknown option parallel.grp"):
        FxditConfig.from_options({"parallel": {"grp": None}})


def test_without_process_group_the_pass_skips_and_changes_nothing(no_inductor):
    model, calls, options = pw.build("b_before")
    with torch.no_grad():
        ref = torch.compile(model, backend="fxdit", options=options)(*calls[0])
        torch._dynamo.reset()
        registry.clear()
        out = torch.compile(model, backend="fxdit", options={**options, "parallel": {"mode": "halo"}})(*calls[0])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    report = fxdit.reports(model)[0].report("shard_tokens")
    assert report.rewritten == 0 and report.skipped == {"torch.distributed is not available or not initialised": 1}


# ---------------------------------------------------------------------------------------------------------------
# Multi-process runs (gloo, CPU)
# ---------------------------------------------------------------------------------------------------------------


def test_two_ranks_grat_b_text_before_after_and_odd_split(tmp_path, no_inductor):
    _check(tmp_path, 2, ["b_before", "b_after", "b_odd"])


def test_failing_rank_makes_the_others_fail_fast(tmp_path):
    codes, errors, seconds = _launch(tmp_path, 2, ["fail"], "--timeout", "30")
    assert codes == [1, 1], errors
    assert "injected failure on rank 1" in errors[1]
    # rank 0 does not hang in the collective: gloo reports the lost peer (or its timeout) as an error
    assert "injected" not in errors[0] and ("Error" in errors[0].splitlines()[0])
    assert not (tmp_path / "fail.rank0.pt").exists()


def test_four_ranks_grat_b_odd_split_and_ulysses(tmp_path, no_inductor):
    _check(tmp_path, 4, ["b_before", "b_after", "b_odd", "ulysses"])


def test_two_ranks_icc_on(tmp_path, no_inductor):
    _check(tmp_path, 2, ["icc"])


def test_two_ranks_ulysses_grat_x_and_video(tmp_path, no_inductor):
    _check(tmp_path, 2, ["ulysses", "x_halo", "b_ulysses", "video"])


def test_four_ranks_icc_on(tmp_path, no_inductor):
    _check(tmp_path, 4, ["icc"])


def test_two_ranks_inductor_compiled(tmp_path, no_inductor):
    """The workers compile with inductor (functional collectives lowered in the graph); the reference runs as Python.

    Inductor reassociates fp32 sums through two blocks: errors reach ~1e-5; a wrong halo or mask errs by O(0.1).
    """
    _check(tmp_path, 2, ["b_before"], "--inductor", tol=1e-4)


def test_context_parallel_wrappers_get_the_cpu_grouped_attention_lowering():
    """The halo/Ulysses wrappers call ``fxdit::grouped_attention`` inside; a graph holding them must get the same
    inductor decomposition as the op itself (else the op stays opaque and runs its dense eager reference)."""
    from fxdit.kernels import ops

    for fn in (halo.halo_grouped_attention, halo.ulysses_attention):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.call_function(fn, (x,)))
        gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        assert torch.ops.fxdit.grouped_attention.default in ops.decompositions_for(gm), fn.__name__
        assert ops.inductor_patches_for(gm) == {"epilogue_fusion": False}
    plain = torch.fx.Graph()
    plain.output(plain.call_function(torch.relu, (plain.placeholder("x"),)))
    assert ops.decompositions_for(torch.fx.GraphModule(torch.nn.Module(), plain)) == {}
