"""Reliability report: the bad-input catalogue, fuzz counts, state tests, defects found and fixed.

    .venv/bin/python tools/reliability_report.py --profile slow          # 200 examples per property
    .venv/bin/python tools/reliability_report.py --profile ci --out -    # 25, print only

Sections of ``benchmarks/reliability.md``:

1. the bad-input catalogue: every row of ``tests/test_hardening.py``'s ``OPTION_CATALOGUE`` and ``FACTOR_CATALOGUE``
   with the exact FxditError message it gives (options through ``FxditConfig.from_options``; factor sources
   through ``torch.compile(..., backend="fxdit")`` and the compiled model's first call, inductor left out);
2. fuzz counts per property of ``tests/test_fuzz.py``: cases generated, passed, refused (FxditError), other
   errors by type, and the first message of each other error; the same ``check`` functions the tests run, under
   hypothesis, counting instead of failing. Every property but ``invalid`` and ``options`` draws valid
   configurations only, so a refusal there is a failure. The properties run the profile's example count, the
   inductor ones their share of it (as in the tests), with inductor; the others without it;
3. the state, pass-failure and numerics tests of ``tests/test_hardening.py`` and their results (pytest, junit xml);
4. the defects found and fixed on the way, with their commits.

The exit status is 1 when a catalogue row misses its message, or a fuzz case fails or is refused where a refusal is
not the expected outcome.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

#: (defect, how it was fixed, a fixed string of the fixing commit's subject). Hashes come from ``git log``.
FOUND_AND_FIXED = [
    ("An FxditError raised in the backend reached the torch.compile caller as Dynamo's BackendCompilerFailed "
     "(a RuntimeError), so `except FxditError` / `except ValueError` did not catch bad options or factor files.",
     "the backend re-raises it as an instance of the same FxditError class that Dynamo lets through unchanged",
     "backend: FxditError reaches the torch.compile caller"),
    ("`attention.group` that does not tile an explicitly given `attention.grid` was accepted (sites silently "
     "stayed dense); `cache.factors` with `cache.mode` 'off' or 'reuse' was silently ignored.",
     "config validation rejects both, naming the field", "config: attention.group must tile attention.grid"),
    ("A factor pair with rank > min(out, in) was accepted; factors on the meta device crashed with "
     "NotImplementedError in the finite check.", "Factors rejects both with FxditError",
     "Factors: reject rank > min(out, in)"),
    ("A cached linear the factor file does not cover (missing layer, or a file calibrated with the other qkv form) "
     "was silently left uncached.", "plan_cache raises FxditError naming the layers, with a qkv hint",
     "plan_cache: a cached linear the factor file does not cover"),
    ("A flipped byte in a factor file's tensor data loaded silently as a wrong factor (safetensors has no "
     "checksum); `device='meta'` was reported as a corrupt file.",
     "save stores a sha256 per tensor, load checks it; bad devices get their own FxditError",
     "Factors files: sha256 per tensor"),
    ("The reference DiT could not run in fp16/bf16 (fp32 timestep features fed to a bf16 Linear).",
     "cast the features to the MLP's dtype", "reference DiT: runs in fp16/bf16"),
    ("fp16/bf16 ICC increments were not accumulated in fp32 on CPU: the inductor decomposition and the eager CPU op "
     "computed the difference and both GEMMs in bf16, and the separate-qkv GEMM chain rounded every intermediate.",
     "fp32 difference, GEMMs and add, one rounding at the end; caches stay in the model's dtype",
     "ICC: fp16/bf16 increments accumulated in fp32"),
    ("An internal error in the passes that build ICC's two graph variants (record_linear_caches, "
     "insert_lowrank_increments) bypassed on_pass_error='fallback' and failed the compilation.",
     "the graph is compiled without caching, with one warning naming the pass",
     "on_pass_error covers the ICC variant passes"),
    ("fxdit.reset / fxdit.reports / fxdit.sampling on a non-module raised TypeError.",
     "FxditError naming the argument", "reset/reports/sampling: a non-module argument is an FxditError"),
]


def _import_tests() -> tuple[Any, Any]:
    sys.path[:0] = [str(TESTS), str(ROOT)]
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return importlib.import_module("test_hardening"), importlib.import_module("test_fuzz")


@contextlib.contextmanager
def _no_inductor() -> Iterator[None]:
    """The backend with inductor left out (the rewritten graph runs as Python), as ``tests/conftest.py``'s
    ``no_inductor`` fixture."""
    from fxdit import backend

    def lower(gm: Any, example_inputs: Any, cfg: Any) -> Any:
        consts = backend.lifted_constants(gm)
        return lambda *args: gm(*args, *consts)

    saved = backend.lower
    backend.lower = lower
    try:
        yield
    finally:
        backend.lower = saved


def _fresh() -> None:
    import torch

    from fxdit import registry

    torch.manual_seed(0)
    torch._dynamo.reset()
    registry.clear()


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def catalogue(th: Any) -> tuple[list[str], int, int]:
    from fxdit.config import FxditConfig
    from fxdit.errors import FxditError

    lines = ["| # | input | FxditError message | fragment found |", "|---|---|---|---|"]
    ok = total = 0
    for i, (name, options, fragment) in enumerate(th.OPTION_CATALOGUE, 1):
        total += 1
        try:
            FxditConfig.from_options(options)
            message, found = "(no error)", False
        except FxditError as exc:
            message, found = str(exc), fragment in str(exc)
        ok += found
        lines.append(f"| {i} | {_cell(name)}: `{_cell(repr(options))}` | {_cell(message)} | {'yes' if found else 'NO'} |")  # noqa: E501
    start = len(th.OPTION_CATALOGUE)
    with tempfile.TemporaryDirectory() as tmp:
        for j, (name, make, fragment) in enumerate(th.FACTOR_CATALOGUE, start + 1):
            total += 1
            _fresh()
            sub = Path(tmp) / f"case{j}"
            sub.mkdir()
            try:
                message = th.factor_error(make, sub)
                found = fragment in message
            except AssertionError as exc:
                message, found = f"(no FxditError: {exc})", False
            ok += found
            lines.append(f"| {j} | factor source: {_cell(name)} | {_cell(message.replace(str(sub), '<tmp>'))} | "
                         f"{'yes' if found else 'NO'} |")
    return lines, ok, total


def fuzz(tf: Any, profile: str, examples: int, only: list[str] | None,
         budget: float | None = None) -> tuple[list[str], dict[str, Any]]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    counts: dict[str, Any] = {}
    lines = ["| property | path | generated | passed | refused (FxditError) | other errors (by type) | wall |",
             "|---|---|---|---|---|---|---|"]
    details = []
    for name, prop in tf.PROPERTIES.items():
        if only and name not in only:
            continue
        n = max(1, round(examples * prop.share)) if prop.inductor else examples
        c = {"generated": 0, "passed": 0, "refused": 0, "other": collections.Counter(), "first": {},
             "over_budget": 0}

        def make_case(c: dict, prop: Any, n: int) -> Any:
            @settings(max_examples=n, deadline=None, derandomize=profile == "ci", database=None,
                      suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
            @given(st.tuples(*prop.strategies))
            def case(args: tuple) -> None:
                if budget is not None and time.perf_counter() - t0 > budget:
                    c["over_budget"] += 1  # drawn but not run: the property's time budget is spent
                    return
                _fresh()
                c["generated"] += 1
                try:
                    outcome = prop.check(*args)
                except tf.FxditError as exc:  # a valid case refused
                    c["refused"] += 1
                    c["other"]["FxditError (refused)"] += 1
                    c["first"].setdefault("FxditError (refused)", f"{exc}"[:300] + f" — case {args!r}"[:600])
                    return
                except Exception as exc:  # noqa: BLE001 - counted, by type
                    key = type(exc).__name__
                    if key == "AssertionError":
                        key = "AssertionError (mismatch)"
                    c["other"][key] += 1
                    c["first"].setdefault(key, f"{exc}"[:300] + f" — case {args!r}"[:600])
                    return
                if outcome == tf.RAISED:
                    c["refused"] += 1
                    c["passed"] += prop.refusals_expected
                else:
                    c["passed"] += 1

            return case

        t0 = time.perf_counter()
        with contextlib.nullcontext() if prop.inductor else _no_inductor():
            make_case(c, prop, n)()
        wall = time.perf_counter() - t0
        errors = {k: v for k, v in c["other"].items() if k != "FxditError (refused)"}
        other = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
        refused = f"{c['refused']}" + (" (expected)" if prop.refusals_expected else "")
        generated = f"{c['generated']}" + (f" (+{c['over_budget']} drawn after the time budget, not run)"
                                            if c["over_budget"] else "")
        path = "inductor" if prop.inductor else "no inductor"
        lines.append(f"| {name} | {path} | {generated} | {c['passed']} | {refused} | {_cell(other)} | {wall:.0f} s |")
        for k, msg in c["first"].items():
            details.append(f"- `{name}` / {k}: {_cell(msg)}")
        counts[name] = {"generated": c["generated"], "passed": c["passed"], "refused": c["refused"],
                        "refusals_expected": prop.refusals_expected, "other_errors": errors,
                        "drawn_not_run": c["over_budget"], "inductor": prop.inductor, "wall_s": round(wall, 1)}
        print(lines[-1], flush=True)
    if details:
        lines += ["", "First message of each failure:", "", *details]
    return lines, counts


def _slow_estimate(tf: Any, counts: dict[str, Any]) -> str:
    """One sentence: what the slow profile would cost, from this run's time per case."""
    minutes = 0.0
    for name, c in counts.items():
        prop = tf.PROPERTIES[name]
        n = max(1, round(200 * prop.share)) if prop.inductor else 200
        minutes += c["wall_s"] / max(1, c["generated"]) * n / 60
    return (f"The ci profile draws the same cases every run (derandomized). The slow profile (200 examples per "
            f"property, {max(1, round(200 * tf.PROPERTIES['icc_inductor'].share))} per inductor property) would take "
            f"about {minutes:.0f} min of fuzzing at this run's time per case.")


def failures(counts: dict[str, Any]) -> int:
    """Cases that failed: other errors, and refusals where a refusal is not the expected outcome."""
    return sum(sum(c["other_errors"].values()) + (0 if c["refusals_expected"] else c["refused"])
               for c in counts.values())


STATE_TESTS = ("two_models", "two_threads", "interrupted", "exception_inside", "ten_runs", "reset_at")
SECTIONS = {"state": STATE_TESTS, "pass failure": ("failing_pass", "default_policy"),
            "numerics": ("nonfinite", "fp32", "bf16")}


def pytest_results() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                        f"--junitxml={xml}", str(TESTS / "test_hardening.py"),
                        "-k", " or ".join(k for ks in SECTIONS.values() for k in ks)],
                       cwd=ROOT, check=False, capture_output=True)
        root = ET.parse(xml).getroot()
    results = []
    for tc in root.iter("testcase"):
        failed = tc.find("failure") is not None or tc.find("error") is not None
        skipped = tc.find("skipped") is not None
        results.append((tc.get("name"), "FAILED" if failed else "skipped" if skipped else "passed",
                        float(tc.get("time", 0))))
    lines = []
    for section, keys in SECTIONS.items():
        rows = [r for r in results if any(k in r[0] for k in keys)]
        lines += ["", f"**{section}** ({sum(r[1] == 'passed' for r in rows)}/{len(rows)} passed)", "",
                  "| test | result |", "|---|---|"]
        lines += [f"| `{_cell(name)}` | {res} |" for name, res, _ in rows]
    return lines


def found_and_fixed() -> list[str]:
    lines = ["| defect | fix | commit |", "|---|---|---|"]
    for defect, fix, subject in FOUND_AND_FIXED:
        out = subprocess.run(["git", "log", "--format=%h", "-F", f"--grep={subject}"], cwd=ROOT, text=True,
                             capture_output=True).stdout.split()
        lines.append(f"| {_cell(defect)} | {_cell(fix)} | {', '.join(out) or '(uncommitted)'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=("ci", "slow"), default="slow")
    ap.add_argument("--examples", type=int, default=None, help="examples per property (default: the profile's)")
    ap.add_argument("--properties", default=None, help="comma-separated subset of the fuzz properties")
    ap.add_argument("--skip-pytest", action="store_true", help="leave out section 3")
    ap.add_argument("--skip-catalogue", action="store_true", help="leave out section 1")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget per fuzz property; cases drawn after it are counted as not run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reliability.md"), help="'-' prints only")
    args = ap.parse_args(argv)
    examples = args.examples or (25 if args.profile == "ci" else 200)

    th, tf = _import_tests()
    import torch

    t0 = time.perf_counter()
    with _no_inductor():
        cat_lines, cat_ok, cat_total = ([], 0, 0) if args.skip_catalogue else catalogue(th)
    print(f"catalogue: {cat_ok}/{cat_total} rows give the expected FxditError", flush=True)
    fuzz_lines, counts = fuzz(tf, args.profile, examples, args.properties.split(",") if args.properties else None,
                              args.budget_s)
    fuzz_wall = sum(c["wall_s"] for c in counts.values())
    state_lines = [] if args.skip_pytest else pytest_results()
    wall = time.perf_counter() - t0
    inductor_examples = sorted({c["generated"] for c in counts.values() if c["inductor"]})

    md = [
        "# Reliability",
        "",
        f"Generated by `tools/reliability_report.py --profile {args.profile}"
        f"{f' --examples {args.examples}' if args.examples else ''}` (torch {torch.__version__}, CPU, "
        f"{os.cpu_count()} cores; {wall / 60:.1f} min in all, of which the fuzzing {fuzz_wall / 60:.1f} min).",
        "",
        f"## 1. Bad-input catalogue ({cat_total} inputs, {cat_ok} give the expected FxditError)",
        "",
        "Every input is rejected with `fxdit.FxditError` (a `ValueError`) before any pass runs (options) or before "
        "any sampling step runs (factor sources: the compiled model's first call raises, no graph is registered). "
        "Through `torch.compile` the caller receives the FxditError itself, not Dynamo's `BackendCompilerFailed`.",
        "",
        *cat_lines,
        "",
        "Extra layers (a factor file covering modules the model lacks, e.g. calibrated on a deeper model with the "
        "same first blocks) are not an error in the backend: each Dynamo graph verifies the modules it holds, "
        "because a graph break legitimately splits a model's linears over several graphs, and factors for absent "
        "modules cannot change any output. `Factors.verify_model(model)` names them "
        "(`test_extra_layers_are_ignored_per_graph_but_caught_against_the_model`). Factors on another real device "
        "than the model (CUDA vs CPU) are moved at compile time; only the meta device, which holds no values, is "
        "an error (this report runs on CPU: a CUDA factor file on a CPU model is not exercised here).",
        "",
        f"## 2. Fuzzing ({args.profile} profile: {examples} examples per property, "
        f"{'/'.join(map(str, inductor_examples)) or '-'} per inductor property)",
        "",
        *([_slow_estimate(tf, counts), ""] if args.profile == "ci" and counts else []),
        "Properties (`tests/test_fuzz.py`). Every case of `lossless`, `grat`, `icc` and the inductor properties is "
        "a configuration fxdit accepts, drawn valid by construction, compiled with `on_pass_error='raise'`: a "
        "refusal (FxditError) is a failure there.",
        "",
        "- **lossless**: nothing lossy on (dense attention, GRAT below `min_tokens` or on layers the model lacks, "
        "caching off or every step full) → the eager output (max error ≤ 1e-6 × max |ref|).",
        "- **grat**: GRAT-B/X with a group that tiles the token grid, a radius that leaves key groups out, existing "
        "layers, `min_tokens` ≤ the image tokens, given or inferred grid, any block size, on reference DiTs with "
        "2-D/3-D grids, joint text before/after the image and three attention call forms → the GRAT oracle "
        "(`tests/grat_oracle.py`: the eager model with the dense grouped mask, written from the method's "
        f"definition; ≤ {tf.ORACLE_TOL:g} × max |ref|), the pass rewrites exactly the selected blocks' sites, and "
        f"the output differs from dense attention (> {tf.DIFFERS:g} × max |ref|).",
        "- **icc**: increment caching with SVD factors of rank < min(out, in) of every cached linear (the block "
        "linears get weights with equal singular values, so that any such rank leaves out a real share of the "
        "weight; MLP ratio 2 or 4, as `find_blocks` recognises an MLP by its widening `fc1`), 3–5 steps "
        "whose latents and timestep change at every step, schedules with at least one cached step (period, "
        "warmup, cooldown with num_steps, or explicit full steps), roles, blocks, qkv form, guard, factor objects "
        "or files covering all or only the cached linears, one- or two-call classifier-free guidance → the ICC "
        "oracle (`tests/icc_oracle.py`: forward hooks on the factored `nn.Linear` layers, full steps given as a set "
        f"computed in the test from the drawn schedule; ≤ {tf.ORACLE_TOL:g} × max |ref| at every call), the "
        "runtime's per-call schedule equals that set, an increment is inserted in exactly the cached linears, and "
        f"every cached-step output differs from the full computation (> {tf.DIFFERS:g} × max |ref|).",
        "- **grat_inductor** / **icc_inductor**: the grat / icc checks through inductor (CPU FlexAttention with "
        "the grouped block mask; the low-rank increment's decomposition) on two tiny models whose shapes repeat "
        f"(the same ≤ {tf.ORACLE_TOL:g} × max |ref| against the oracles).",
        "- **invalid**: a valid grat or icc option dict with one invalid option → FxditError from `torch.compile` "
        "(its expected outcome: each case passes by being refused).",
        "- **options**: arbitrary option values → accepted or FxditError by `FxditConfig.from_options`, never "
        "another exception (refusals expected).",
        "",
        *fuzz_lines,
        "",
        "```json",
        json.dumps(counts, indent=1),
        "```",
    ]
    if state_lines:
        md += ["", "## 3. State, pass-failure and numerics tests (`tests/test_hardening.py`)", *state_lines]
    md += ["", "## 4. Found and fixed", "", *found_and_fixed(), ""]
    text = "\n".join(md)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    bad = failures(counts) + (cat_total - cat_ok)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
