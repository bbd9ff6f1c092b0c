"""End-to-end forward time of the reference DiT: fxdit GRAT (grouped attention) vs plain inductor, on CPU.

Default: 4 blocks, hidden 384, 6 heads (head dim 64), 256×256 latent with patch 2 → 128×128 = 16,384 tokens,
batch 1, fp32, GRAT-B with 16×16 groups (radius 1). Two copies of the model with the same weights are compiled in
one process — ``torch.compile(model)`` (inductor, dense SDPA) and ``torch.compile(model, backend="fxdit",
options={"attention": ...})`` — and timed interleaved round-robin under ``torch.no_grad()`` after warm-up calls.

Timing on a shared machine (cpu_measurements.md technique, the same accounting as ``tools/bench_attention.py``): a
call is *clean* when other processes used at most ``--max-other`` of the machine's CPU jiffies during it; the table
reports medians of the clean calls (of all calls when fewer than 3 are clean, and says so).

The table goes between ``<!-- e2e:begin -->`` and ``<!-- e2e:end -->`` of ``benchmarks/attention.md`` (the section
``tools/bench_attention.py`` keeps for it); ``--out`` writes elsewhere. Also reported: the output difference
between the two (GRAT is lossy: the number only shows the outputs are of the same scale), the attention density,
and the ideal end-to-end speedup from FLOP counts (linear layers + attention at that density).

Usage::

    python tools/bench_grat_e2e.py                       # the default above
    python tools/bench_grat_e2e.py --input 64 --iters 3  # a quick small run (32×32 tokens)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "attention.md"
E2E_BEGIN, E2E_END = "<!-- e2e:begin -->", "<!-- e2e:end -->"


from _timing import timed_call  # noqa: E402  (tools/ is on sys.path when run as a script)


def _flops(tokens: int, hidden: int, depth: int, mlp_ratio: float, density: float) -> tuple[float, float]:
    """(dense forward FLOPs, FLOPs with attention at ``density``) of the blocks (linears + attention)."""
    linear = 2 * tokens * hidden * hidden * (3 + 1 + 2 * mlp_ratio)
    attention = 4 * tokens * tokens * hidden
    return depth * (linear + attention), depth * (linear + density * attention)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--input", type=int, default=256, help="latent side (pixels); tokens = (input / patch)^2")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", default="grat-b", choices=("grat-b", "grat-x"))
    p.add_argument("--group", type=int, default=16, help="square group side in tokens")
    p.add_argument("--radius", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--max-other", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from fxdit.kernels import grat_layout as gl

    import fxdit
    from fxdit.apps.models.dit import DiT, DiTConfig

    cfg = DiTConfig(depth=args.depth, hidden=args.hidden, heads=args.heads, patch=args.patch,
                    input_size=(args.input, args.input), in_channels=4, num_classes=10)
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(args.batch, 4, args.input, args.input)
    t = torch.full((args.batch,), 500.0)
    y = torch.arange(args.batch) % 10
    grid = cfg.grid[1:]
    n = cfg.tokens
    group = (args.group, args.group)
    options = {"attention": {"mode": args.mode, "group": group, "radius": args.radius, "min_tokens": 0},
               "on_pass_error": "raise"}

    layout = gl.SequenceLayout(n, 0, grid, group, args.mode, args.radius)
    tables = gl.block_mask_tables(layout)
    density = gl.block_density(tables)
    dense_flops, sparse_flops = _flops(n, args.hidden, args.depth, cfg.mlp_ratio, density)

    providers = {
        "inductor": torch.compile(model),
        "fxdit": torch.compile(twin, backend="fxdit", options=options),
    }
    outputs: dict[str, torch.Tensor] = {}
    compile_s: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in providers.items():
            start = time.perf_counter()
            outputs[name] = fn(x, t, y)
            compile_s[name] = time.perf_counter() - start
            print(f"{name}: first call (compile) {compile_s[name]:.1f} s", flush=True)
        for _ in range(args.warmup - 1):
            for fn in providers.values():
                fn(x, t, y)
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in providers}
        for i in range(args.iters):
            for name, fn in providers.items():
                samples[name].append(timed_call(lambda fn=fn: fn(x, t, y)))
            print(f"iter {i}: " + ", ".join(f"{k} {v[-1][0] * 1e3:.0f} ms (other {v[-1][1]:.0%})"
                                             for k, v in samples.items()), flush=True)

    records = fxdit.reports(twin)
    rep = records[0].report("rewrite_grouped_attention") if records else None

    def median(name: str) -> tuple[float, int]:
        clean = [s for s, o in samples[name] if o <= args.max_other]
        use = clean if len(clean) >= 3 else [s for s, _ in samples[name]]
        return statistics.median(use), len(clean)

    (t_ind, c_ind), (t_fx, c_fx) = median("inductor"), median("fxdit")
    # Paired ratios (call i of each provider ran back to back) are robust to load that drifts between iterations.
    paired = sorted(a / b for (a, _), (b, _) in zip(samples["inductor"], samples["fxdit"]))
    speedup = statistics.median(paired)
    diff = (outputs["fxdit"] - outputs["inductor"]).abs().max().item()
    scale = outputs["inductor"].abs().max().item()
    side = int(math.isqrt(n))
    rewritten = rep.rewritten if rep is not None else 0
    hoisted = rep.details.get("hoisted") if rep is not None else None
    row = (f"| reference DiT, {args.depth} blocks, hidden {args.hidden}, {args.heads} heads, batch {args.batch} "
           f"| {side}×{side} | {args.mode.upper()} {args.group}×{args.group}, density {density:.3f} "
           f"| {t_fx * 1e3:.0f} ({c_fx}/{args.iters} clean) | {t_ind * 1e3:.0f} ({c_ind}/{args.iters} clean) "
           f"| **{speedup:.2f}×** paired median ({paired[0]:.2f}–{paired[-1]:.2f}; ratio of medians {t_ind / t_fx:.2f}×) "  # noqa: E501
           f"| {dense_flops / sparse_flops:.2f}× |")
    table = "\n".join([
        "| model | tokens | pattern | fxdit ms | plain inductor ms | speedup | ideal (FLOPs) |",
        "|---|---|---|---|---|---|---|",
        row,
        "",
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC with `tools/bench_grat_e2e.py` "
        f"({' '.join(sys.argv[1:]) or 'defaults'}): torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, fp32, `torch.no_grad()`, medians of interleaved calls after {args.warmup} warm-up "
        f"calls; a call is clean when other processes used ≤ {args.max_other:.0%} of the CPU during it. "
        f"First call (compile): fxdit {compile_s['fxdit']:.0f} s, inductor {compile_s['inductor']:.0f} s. "
        f"Sites rewritten: {rewritten}, permutation hoisted: {hoisted}. Max |fxdit − inductor| = {diff:.3g} "
        f"(output scale {scale:.3g}; GRAT is lossy by design). The ideal column is the FLOP ratio of the blocks "
        f"(linears + attention at the block density).",
    ])
    print(table)
    if not args.no_write:
        _write(args.out, table)
    return 0


def _write(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else ""
    section = f"{E2E_BEGIN}\n{table}\n{E2E_END}"
    if E2E_BEGIN in text and E2E_END in text:
        head, rest = text.split(E2E_BEGIN, 1)
        _, tail = rest.split(E2E_END, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n## End to end (reference DiT)\n\n" + section + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
