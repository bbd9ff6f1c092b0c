"""One rank of a context-parallel test run (gloo on CPU); started by tests/test_parallel.py and tools/bench_parallel.py.

``python tests/parallel_worker.py RANK WORLD STORE OUTDIR CASE[,CASE...] [--inductor] [--timeout S]``

``STORE`` is a file path, new for each run: the ranks meet through a ``FileStore`` there rather than a TCP port,
so two runs started at once (tests in parallel, a benchmark beside the tests) can never join each other.

Every case builds the same seeded tiny reference DiT and inputs (:func:`build`), compiles it with
``backend="fxdit"`` and the case's options plus ``{"parallel": {"mode": ...}}``, runs the case's steps and saves
``OUTDIR/CASE.rank{R}.pt`` = ``{"outputs": [...], "details": shard_tokens report details}``. A failure is written to
``OUTDIR/error.rank{R}.txt`` and the process exits with status 1. Without ``--inductor`` the backend's ``lower`` runs
the rewritten graph as Python (as the ``no_inductor`` test fixture does), which keeps a case to seconds.

The case table (:data:`CASES`) is shared with the test, which computes the single-process reference from it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

#: name -> model overrides, attention options, parallel mode, steps, cache (ICC) on, failing rank.
CASES: dict[str, dict[str, Any]] = {
    # GRAT-B, 8x8 tokens, 2x2 groups: 4 group rows; text before / after the image tokens.
    "b_before": {"model": {"text_tokens": 3, "text_position": "before"}, "mode": "halo",
                 "attention": {"mode": "grat-b", "group": (2, 2)}},
    "b_after": {"model": {"text_tokens": 3, "text_position": "after"}, "mode": "halo",
                "attention": {"mode": "grat-b", "group": (2, 2)}},
    # 10x8 tokens: 5 group rows (uneven over 2 and 4 ranks); radius 2 makes 1-row bands reach two ranks away.
    "b_odd": {"model": {"input_size": (20, 16), "text_tokens": 2, "text_position": "after"}, "mode": "halo",
              "attention": {"mode": "grat-b", "group": (2, 2), "radius": 2}},
    # ICC on top of sharded GRAT-B: 4 steps, full steps 0 and 2.
    "icc": {"model": {"text_tokens": 3, "text_position": "before"}, "mode": "halo",
            "attention": {"mode": "grat-b", "group": (2, 2)}, "steps": 4, "cache": True},
    # Dense attention by Ulysses (all-to-all over heads), with text.
    "ulysses": {"model": {"text_tokens": 3, "text_position": "before"}, "mode": "ulysses",
                "attention": {"mode": "dense"}},
    # GRAT-X in halo mode falls back to Ulysses; GRAT-B in ulysses mode too.
    "x_halo": {"model": {"text_tokens": 2, "text_position": "after"}, "mode": "halo",
               "attention": {"mode": "grat-x", "group": (2, 2)}},
    "b_ulysses": {"model": {}, "mode": "ulysses", "attention": {"mode": "grat-b", "group": (2, 2)}},
    # Video: 4x4x8 token grid, 2x2x2 groups: 2x2 group rows, halo b=1 reaches the next frame-group.
    "video": {"model": {"input_size": (4, 8, 16), "patch": (1, 2, 2), "hidden": 48}, "mode": "halo",
              "attention": {"mode": "grat-b", "group": (2, 2, 2)}},
    # Rank 1 raises before its second call; the others must fail, not hang.
    "fail": {"model": {}, "mode": "halo", "attention": {"mode": "grat-b", "group": (2, 2)}, "steps": 2,
             "fail_rank": 1},
}


def build(name: str) -> tuple[torch.nn.Module, list[tuple], dict[str, Any]]:
    """The case's model, its per-step inputs and its fxdit options (parallel section not included)."""
    from fxdit.apps.models.dit import DiT, DiTConfig

    case = CASES[name]
    model_kw = {"depth": 2, "hidden": 32, "heads": 4, "input_size": (16, 16), "num_classes": 4, **case["model"]}
    cfg = DiTConfig(**model_kw)
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    steps = case.get("steps", 1)
    text = torch.randn(2, cfg.text_tokens, cfg.hidden, generator=gen) if cfg.text_tokens else None
    calls = []
    for s in range(steps):
        x = torch.randn(2, cfg.in_channels, *cfg.input_size, generator=gen)
        t = torch.tensor([900.0 - 100 * s, 800.0 - 100 * s])
        y = torch.tensor([1, 2])
        calls.append((x, t, y) if text is None else (x, t, y, text))
    options: dict[str, Any] = {"attention": {"min_tokens": 0, **case["attention"]}, "on_pass_error": "raise"}
    if case.get("cache"):
        import fxdit

        factors = fxdit.calibrate(model, method="svd", rank=8, example=(calls[0], {}), progress=False)
        options["cache"] = {"factors": factors, "schedule": {"period": 2}}
    return model, calls, options


def python_lower() -> None:
    """Run rewritten graphs as Python (the ``no_inductor`` fixture's patch)."""
    from fxdit import backend

    def lower(gm, example_inputs, cfg):
        consts = backend.lifted_constants(gm)
        return lambda *args: gm(*args, *consts)

    backend.lower = lower


def run(name: str, parallel: dict[str, Any] | None, *, rank: int = 0) -> dict[str, Any]:
    """Compile and run one case in this process; ``parallel=None`` is the single-process reference."""
    import fxdit

    torch._dynamo.reset()
    model, calls, options = build(name)
    if parallel is not None:
        options["parallel"] = parallel
    fast = torch.compile(model, backend="fxdit", options=options)
    outputs = []
    case = CASES[name]
    with torch.no_grad(), fxdit.sampling(fast):
        for step, call in enumerate(calls):
            if case.get("fail_rank") == rank and step == 1 and parallel is not None:
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            outputs.append(fast(*call))
    details = {}
    for record in fxdit.reports(model):
        report = record.report("shard_tokens")
        if report is not None:
            details = dict(report.details)
            details["rewritten"] = report.rewritten
            details["skipped"] = dict(report.skipped)
    return {"outputs": outputs, "details": details}


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    rank, world, store, outdir, cases = int(argv[0]), int(argv[1]), argv[2], argv[3], argv[4].split(",")
    inductor = "--inductor" in argv
    timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 60.0
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.abspath(store)}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        if not inductor:
            python_lower()
        for name in cases:
            t0 = time.perf_counter()
            result = run(name, {"mode": CASES[name]["mode"]}, rank=rank)
            result["seconds"] = time.perf_counter() - t0
            torch.save(result, os.path.join(outdir, f"{name}.rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent through the file and the exit status
        with open(os.path.join(outdir, f"error.rank{rank}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        # leave without tearing down a process group whose peer is gone: gloo's destructor can abort (SIGABRT)
        # at interpreter exit, which would replace this rank's exit status 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
