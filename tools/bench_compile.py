"""First-compile time of fxdit vs plain inductor on the reference DiT.

Each measurement runs in a fresh subprocess with a fresh TORCHINDUCTOR_CACHE_DIR, so nothing is cached; the
backends are interleaved round-robin and the table reports medians and the fxdit/inductor ratio.

    python tools/bench_compile.py [--reps 3] [--out benchmarks/compile.md] [--baseline REV]

With ``--baseline REV`` every fxdit case also runs on the source tree of git revision ``REV`` (a temporary
worktree), interleaved with the current tree, and the table adds the ratio current / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time, torch
from fxdit.apps import models
name, backend, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spec = models.build(name)
kw = {"options": options} if backend == "fxdit" else {}
with torch.no_grad():
    fast = torch.compile(spec.model, backend=backend, **kw)
    t0 = time.perf_counter(); spec.run(fast); first = time.perf_counter() - t0
    t0 = time.perf_counter(); spec.run(fast); second = time.perf_counter() - t0
print(json.dumps({"first": first, "second": second}))
"""

CASES = [
    ("inductor", "inductor", {}),
    ("fxdit (lossless)", "fxdit", {"on_pass_error": "raise"}),
    ("fxdit GRAT-B", "fxdit", {"on_pass_error": "raise",
                               "attention": {"mode": "grat-b", "group": [4, 4], "min_tokens": 0}}),
]


def _run(model: str, backend: str, options: dict, tree: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        if tree is not None:  # the baseline's sources first on the path (the child runs in that tree)
            env["PYTHONPATH"] = tree
        out = subprocess.run([sys.executable, "-c", _CHILD, model, backend, json.dumps(options)],
                             capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dit-tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/compile.md")
    ap.add_argument("--baseline", default=None, help="git revision to compare the fxdit cases with")
    args = ap.parse_args(argv)
    tree = None
    if args.baseline:
        tree = tempfile.mkdtemp(prefix="fxdit-baseline-")
        subprocess.run(["git", "worktree", "add", "--detach", tree, args.baseline], check=True,
                       capture_output=True)
    results: dict[str, list[dict]] = {label: [] for label, _, _ in CASES}
    baseline: dict[str, list[dict]] = {label: [] for label, _, _ in CASES}
    try:
        for rep in range(args.reps):
            for label, backend, options in CASES:
                r = _run(args.model, backend, options)
                results[label].append(r)
                print(f"rep {rep} {label}: {r}", flush=True)
                if tree is not None and backend == "fxdit":
                    b = _run(args.model, backend, options, tree)
                    baseline[label].append(b)
                    print(f"rep {rep} {label} @ {args.baseline}: {b}", flush=True)
    finally:
        if tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", tree], capture_output=True)
    base = [r["first"] for r in results["inductor"] if "first" in r]
    base_med = statistics.median(base) if base else float("nan")
    cmp = f" | at {args.baseline} s | current / {args.baseline}" if tree is not None else ""
    lines = [f"# First-compile time, {args.model} (fresh inductor cache per run, {args.reps} runs each, medians)", "",
             f"| backend | first call (compile) s | second call ms | ratio to inductor{cmp} |",
             "|---|---|---|---|" + ("---|---|" if tree is not None else "")]
    for label, _, _ in CASES:
        ok = [r for r in results[label] if "first" in r]
        if not ok:
            lines.append(f"| {label} | failed: {results[label][0].get('error', '?')} | | |")
            continue
        first = statistics.median(r["first"] for r in ok)
        second = statistics.median(r["second"] for r in ok) * 1e3
        row = f"| {label} | {first:.1f} | {second:.2f} | {first / base_med:.2f}"
        if tree is not None:
            old_ok = [r for r in baseline[label] if "first" in r]
            if old_ok:
                old_first = statistics.median(r["first"] for r in old_ok)
                row += f" | {old_first:.1f} | {first / old_first:.2f}"
            else:
                row += " | | " if label == "inductor" else f" | failed: {baseline[label][0].get('error', '?')} | "
        lines.append(row + " |")
    lines += ["", f"torch {__import__('torch').__version__}, {os.cpu_count()} CPUs; the machine is shared, so "
              "absolute times are noisy; the ratio is measured side by side."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
