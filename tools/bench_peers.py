"""Peers side by side with fxdit on the Flux demo model; writes ``benchmarks/peers.md``.

Rows, all from the same noise and labels (:mod:`fxdit.apps.peers` measures each the same way): plain eager (the full
computation, the reference of PSNR/SSIM), every peer of :data:`fxdit.apps.peers.PEERS` eager at its documented
settings, inductor, fxdit lossless / ICC (data-free SVD factors, full step every 2nd step) / GRAT (GRAT-B, 4x4-token
groups), every peer compiled, then each peer at the setting of its one time/quality knob whose eager run time is
closest to fxdit ICC's compiled time ("matched"). With ``--budget-min`` rows not started in time are listed as not
run; the file is rewritten after every row. A peer whose package is missing, or that raises, gets a row with the
exception it raised.

Usage::

    python tools/bench_peers.py                       # the shipped demo model, writes benchmarks/peers.md
    python tools/bench_peers.py --steps 8 --repeats 1 --out /tmp/peers.md --no-match   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fxdit.apps import flow_sampler, peers  # noqa: E402
from fxdit.apps.models import flux as demo_flux  # noqa: E402


def fxdit_rows(rank: int, group: tuple[int, int], grid: tuple[int, int]) -> list[peers.PeerSpec]:
    """plain, inductor and the three fxdit rows."""
    return [
        peers.PeerSpec("plain (eager)", "fxdit", "plain", {}, "the model as written: the full computation"),
        peers.PeerSpec("inductor", "fxdit", "inductor", {}, "torch.compile(model)"),
        peers.PeerSpec("fxdit lossless", "fxdit", "fxdit", {}, "fxdit backend, no lossy rewrite"),
        peers.PeerSpec("fxdit ICC", "fxdit", "fxdit",
                       {"cache": {"factors": {"svd_rank": rank}, "schedule": {"period": 2}}},
                       f"increment-calibrated caching, SVD rank {rank}, full step every 2nd step"),
        peers.PeerSpec("fxdit GRAT", "fxdit", "fxdit",
                       {"attention": {"mode": "grat-b", "group": group, "grid": grid, "min_tokens": 0}},
                       f"GRAT-B, {group[0]}x{group[1]}-token groups"),
    ]


def report(args: argparse.Namespace, demo: demo_flux.FluxDemo, bench: peers.Bench, rows: list[peers.Row],
           target: float | None, started: float, load_start: tuple[float, float, float], partial: bool) -> str:
    """The markdown of ``benchmarks/peers.md`` (rewritten after every row; ``partial`` while rows remain)."""
    load_end = os.getloadavg()
    info = demo.info
    lines = [
        "# Peers side by side on the Flux demo model",
        "",
        f"Written by `tools/bench_peers.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"after {(time.monotonic() - started) / 60:.1f} min" + (" (in progress: rows still to come)" if partial
                                                               else "") + ".",
        "",
        f"- model: `{Path(demo.source).name}` (FluxTransformer2DModel, {info.get('steps', '?')} training steps), "
        f"{len(bench.labels)} samples (classes 0-{args.classes - 1} x {args.per_class}), {args.steps} Euler steps, "
        f"CFG {args.guidance:g} batched ([uncond; cond], batch {2 * len(bench.labels)})",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s); load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/"
        f"{load_start[2]:.2f}, now {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} (a shared machine: "
        "other jobs ran beside this one, so compare rows by their medians and mind the spread)",
        f"- wall time: median of {args.repeats} sampling runs after one untimed warm-up run (compilation "
        "excluded); spread = max - min; speedup against plain eager",
        "- PSNR/SSIM against the full computation from the same noise; class accuracy by the shipped digit "
        "classifier; blocks run / attn run: share of transformer-block calls and attention calls that ran (eager "
        "rows, counted in the warm-up run); graph breaks and recompiles: Dynamo's counters over warm-up and timed "
        "runs (compiled rows; recompiles = frames compiled after the first model call)",
        f"- matched rows: the setting of the peer's knob (`fxdit.apps.peers.MATCH_KNOBS`) whose eager run time "
        f"(one probe run per setting, the probe times in the row's notes) was closest to fxdit ICC's compiled median "
        f"({target:.2f} s); {'eager and compiled' if args.compiled_matched else 'eager only'}" if target
        else "- matched rows: none (fxdit ICC did not run)",
        "",
        peers.format_markdown(rows, baseline="plain (eager)"),
        "",
        "Rows as JSON:",
        "",
        "```json",
        json.dumps([r.to_json() for r in rows], indent=None, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a folder written by tools/train_flux_demo.py "
                                                            "(default: the shipped demo model)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.md")
    p.add_argument("--steps", type=int, default=flow_sampler.DEFAULT_STEPS)
    p.add_argument("--per-class", type=int, default=1)
    p.add_argument("--classes", type=int, default=10, help="sample classes 0 .. N-1")
    p.add_argument("--guidance", type=float, default=flow_sampler.DEFAULT_GUIDANCE)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=32, help="SVD rank of the fxdit ICC row")
    p.add_argument("--only", nargs="*", default=None, help="peer names to run (default: all)")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled peer rows")
    p.add_argument("--no-match", action="store_true", help="skip the time-matched peer rows")
    p.add_argument("--compiled-matched", action="store_true", help="also run the time-matched rows compiled")
    p.add_argument("--budget-min", type=float, default=None,
                   help="stop starting rows after this many minutes (the rest are listed as not run)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    load_start = os.getloadavg()
    demo = demo_flux.load_flux_demo(args.model)
    settings = peers.BenchSettings(steps=args.steps, classes=tuple(range(args.classes)), per_class=args.per_class,
                                   guidance_scale=args.guidance, repeats=args.repeats)
    bench = peers.Bench.for_demo(demo, settings)
    grid = (demo.image_size[0] // demo_flux.PACK, demo.image_size[1] // demo_flux.PACK)
    print(f"settings: {settings}, model {demo.source}, threads {args.threads}", flush=True)

    rows: list[peers.Row] = []
    target: float | None = None

    def run(spec: peers.PeerSpec, compiled: bool) -> peers.Row:
        t0 = time.monotonic()
        if args.budget_min and (t0 - started) / 60.0 > args.budget_min:
            row = peers.Row(spec.name, spec.family, spec.method, dict(spec.settings), compiled,
                            notes=f"not run: the bench's time budget (--budget-min {args.budget_min:g}) ran out")
            rows.append(row)
            write(partial=True)
            return row
        row = bench.measure(spec, compiled=compiled)
        rows.append(row)
        write(partial=True)
        print(f"{spec.name} ({'compiled' if compiled else 'eager'}): "
              f"{'error ' + row.error if row.error else f'{row.median_s:.2f} s'} "
              f"[{time.monotonic() - t0:.0f} s]", flush=True)
        return row

    def write(partial: bool) -> None:
        text = report(args, demo, bench, rows, target, started, load_start, partial)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)

    # Order (most informative first, so a --budget-min cut keeps them): plain, every peer eager, the compiled
    # inductor/fxdit rows, every peer compiled, the time-matched rows.
    chosen = [peers.PEERS[n] for n in (args.only or list(peers.PEERS))]
    base = fxdit_rows(args.rank, (4, 4), grid)
    run(base[0], compiled=False)
    for spec in chosen:
        run(spec, compiled=False)
    for spec in base[1:]:
        run(spec, compiled=True)
    icc = next(r for r in rows if r.name == "fxdit ICC")
    target = icc.median_s
    if not args.no_compiled:
        for spec in chosen:
            run(spec, compiled=True)
    if not args.no_match and target is not None:
        for spec in chosen:
            if spec.name not in peers.MATCH_KNOBS or not peers.available(spec):
                continue
            if args.budget_min and (time.monotonic() - started) / 60.0 > args.budget_min:
                run(spec.with_settings(f"{spec.name} (matched)"), compiled=False)  # listed as not run
                continue
            matched, tried = bench.match(spec, target)
            print(f"{spec.name}: match probe times {tried}", flush=True)
            if matched is spec:
                continue
            row = run(matched, compiled=False)
            row.notes = (row.notes + "; " if row.notes else "") + "probe s: " + ", ".join(
                f"{k}={v:.1f}" for k, v in tried.items())
            if args.compiled_matched:
                run(matched, compiled=True)

    write(partial=False)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
