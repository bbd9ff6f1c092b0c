"""Mutation check: does the default test suite notice semantic bugs planted in fxdit's source?

Each mutant in :data:`MUTANTS` is data: an id, a one-line description, the file, an exact ``old`` snippet (it must
occur exactly once in that file), its ``new`` replacement, and the test selection from the default suite (tests
not marked slow) that should catch it. For each mutant the tool

1. copies the source tree (``git ls-files`` plus untracked files git does not ignore; ``--source head`` takes the
   tracked files as committed instead) into a fresh temporary directory,
2. applies the mutant there (an error when the snippet is not found exactly once),
3. checks that ``fxdit``, ``fxdit.kernels`` and ``fxdit.passes`` resolve to the copy from the copy's root (a run
   against the original tree would be a fake kill),
4. runs ``<python> -m pytest -q -x -p no:cacheprovider <selection>`` with the copy as working directory, a fresh
   ``TORCHINDUCTOR_CACHE_DIR`` and ``PYTHONDONTWRITEBYTECODE=1``, under a timeout.

Outcomes: *killed* (pytest exit 1: a test failed), *survived* (exit 0), *error* (collection or usage error, exit
2-5, or a timeout: not a kill; the mutant or its selection needs fixing). Every distinct selection is first run on
an unmutated copy and must pass; a mutant whose baseline failed is reported as *error*.

Usage::

    python tools/mutants.py --list
    python tools/mutants.py --only grat-x-no-column,icc-sign-ref
    python tools/mutants.py --out benchmarks/mutation.md

The exit status is non-zero when a mutant survived or errored (or a baseline failed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    Args:
        id: short stable name.
        what: one-line description of the behaviour it changes.
        file: path relative to the repository root.
        old: exact source snippet; must occur exactly once in ``file``.
        new: its replacement.
        tests: pytest arguments selecting the tests that should catch it (node ids or files, ``-k`` allowed).
    """

    id: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# Selections shared by several mutants (one baseline run each).
_ICC_PASSES = ("tests/passes/test_icc_passes.py", "-k", "not exact_for_exact")
_RUNTIME_UNIT = ("tests/test_icc_runtime.py", "-k", "not end_to_end and not schedule_none")
_ICC_ORACLE = ("tests/test_icc_oracle.py", "-k", "not inductor and not diffusers")
_LOWRANK_CPU = ("tests/kernels/test_lowrank_increment.py", "-k", "not triton")
_LOWRANK_TRITON = ("tests/kernels/test_lowrank_increment.py", "-k", "triton")
_GRAT_LAYOUT = ("tests/kernels/test_grat_layout.py",)
_GRAT_KERNEL_CPU = ("tests/kernels/test_grouped_attention.py", "-k", "not triton")
_GRAT_KERNEL_TRITON = ("tests/kernels/test_grouped_attention.py::test_triton_kernel_follows_block_tables",
                       "tests/kernels/test_grouped_attention.py::test_triton_kernel_matches_oracle")
_GRAT_PASS = ("tests/passes/test_rewrite_grouped_attention.py", "tests/test_grat_e2e.py")

MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------------- ICC: the low-rank increment itself
    Mutant(
        "icc-sign-ref",
        "CPU eager low-rank increment uses X_c − X instead of X − X_c (sign of the increment)",
        "kernels/reference.py",
        "    diff = (x.to(dt) - x_cached.to(dt)).reshape(-1, k)\n",
        "    diff = (x_cached.to(dt) - x.to(dt)).reshape(-1, k)\n",
        _ICC_ORACLE,
    ),
    Mutant(
        "icc-sign-decomp",
        "compiled CPU path (inductor decomposition of fxdit::lowrank_increment) subtracts X − X_c the wrong way",
        "kernels/ops.py",
        "    z = torch.mm((x.to(acc) - x_cached.to(acc)).reshape(-1, k), B.to(acc).t())\n",
        "    z = torch.mm((x_cached.to(acc) - x.to(acc)).reshape(-1, k), B.to(acc).t())\n",
        _LOWRANK_CPU,
    ),
    Mutant(
        "icc-sign-graph",
        "cached variant's GEMM chain (fused qkv, separate q/k/v factors) computes X_c − X",
        "passes/insert_lowrank_increments.py",
        "                    dx = graph.call_function(operator.sub, (x, x_c))\n",
        "                    dx = graph.call_function(operator.sub, (x_c, x))\n",
        _ICC_ORACLE,
    ),
    Mutant(
        "icc-transposed-ref",
        "CPU eager increment multiplies by (A·B) untransposed, i.e. Wᵀ instead of W (square layers; others fail "
        "on shapes)",
        "kernels/reference.py",
        "    z = diff @ B.to(dt).t()\n    y = torch.addmm(y_cached.to(dt).reshape(-1, n), z, A.to(dt).t())\n",
        "    y = torch.addmm(y_cached.to(dt).reshape(-1, n), diff, A.to(dt) @ B.to(dt))\n",
        _LOWRANK_CPU,
    ),
    Mutant(
        "icc-rank-pairing-reversed",
        "CPU eager increment pairs B's rank components with A's in reverse order (Z·J·Aᵀ, shape-valid everywhere)",
        "kernels/reference.py",
        "    z = diff @ B.to(dt).t()\n",
        "    z = (diff @ B.to(dt).t()).flip(-1)\n",
        _LOWRANK_CPU,
    ),
    Mutant(
        "icc-triton-sign",
        "Triton low-rank increment kernel subtracts X − X_c the wrong way",
        "kernels/lowrank_increment.py",
        "        d = x.to(tl.float32) - xc.to(tl.float32)\n",
        "        d = xc.to(tl.float32) - x.to(tl.float32)\n",
        _LOWRANK_TRITON,
    ),
    Mutant(
        "icc-bias-twice",
        "cached steps add the linear's bias again on top of Y_c (which already holds it)",
        "passes/insert_lowrank_increments.py",
        "        node_meta(y)[\"icc\"] = \"increment\"\n        node.replace_all_uses_with(y)\n",
        "        node_meta(y)[\"icc\"] = \"increment\"\n"
        "        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get(\"bias\")\n"
        "        if bias is not None:\n"
        "            with graph.inserting_after(y):\n"
        "                y = graph.call_function(operator.add, (y, bias))\n"
        "        node.replace_all_uses_with(y)\n",
        _ICC_ORACLE,
    ),
    Mutant(
        "icc-qkv-slices-swapped",
        "fused qkv with separate factors: the q and k increments are concatenated in the wrong row order",
        "passes/insert_lowrank_increments.py",
        "                    inc = graph.call_function(torch.cat, (parts,), {\"dim\": -1})\n",
        "                    inc = graph.call_function(torch.cat, ([parts[1], parts[0], *parts[2:]],),\n"
        "                                              {\"dim\": -1})\n",
        _ICC_ORACLE,
    ),
    Mutant(
        "icc-record-x-after",
        "full step records the square linears' output (X after the linear) as X_c instead of their input",
        "passes/record_linear_caches.py",
        "        if kind == \"x\":\n            extra.append(_linear_input(node))\n",
        "        if kind == \"x\":\n"
        "            from fxdit.passes._fx_utils import shape_of\n"
        "            x_in = _linear_input(node)\n"
        "            extra.append(node if shape_of(x_in) == shape_of(node) else x_in)\n",
        _ICC_ORACLE,
    ),
    # ---------------------------------------------------------------- ICC: runtime (which cache, which step)
    Mutant(
        "icc-stale-cache",
        "cached steps read the caches of the previous full step, not the latest one",
        "fxdit/runtime.py",
        "            self._caches[stream] = (signature, recorded)\n",
        "            self._caches[stream] = self._caches.get((\"prev\", stream), (signature, recorded))\n"
        "            self._caches[(\"prev\", stream)] = (signature, recorded)\n",
        _ICC_ORACLE,
    ),
    Mutant(
        "icc-cfg-stream-cache",
        "every stream reads stream 0's caches (two-call CFG: uncond uses the cond caches)",
        "fxdit/runtime.py",
        "            entry = self._caches.get(stream)\n",
        "            entry = self._caches.get(0)\n",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "icc-no-reset",
        "reset() / entering fxdit.sampling() keeps the step counter and the caches of the previous run",
        "fxdit/runtime.py",
        "        with self._lock:\n            self._clear()\n\n    @property\n",
        "        return\n\n    @property\n",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "icc-timestep-direction",
        "a falling timestep is taken for a new run (every call a step 0: caching never happens)",
        "fxdit/runtime.py",
        "any(a > b for a, b in zip(t, self._last_t))",
        "any(a < b for a, b in zip(t, self._last_t))",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "icc-triton-rank-chunks",
        "Triton low-rank increment: every rank chunk starts again from Y_c (earlier chunks' increments are lost)",
        "kernels/lowrank_increment.py",
        "        src = y\n",
        "        src = yc2\n",
        _LOWRANK_TRITON,
    ),
    Mutant(
        "icc-roles-ignored",
        "cache.roles is ignored: every cacheable role is cached",
        "passes/plan_cache.py",
        "            if lin.role not in cc.roles:\n",
        "            if False:\n",
        _ICC_PASSES,
    ),
    Mutant(
        "icc-blocks-ignored",
        "cache.blocks is ignored: the linears of every block are cached",
        "passes/plan_cache.py",
        "            if cc.blocks is not None and block.index not in cc.blocks:\n",
        "            if False:\n",
        _ICC_PASSES,
    ),
    Mutant(
        "icc-cfg-same-t-next-step",
        "a call with the same timestep as the previous one is taken for the next step (two-call CFG: uncond "
        "advances the schedule)",
        "fxdit/runtime.py",
        "                step, stream = self.step, self._stream + 1\n",
        "                step, stream = self.step + 1, 0\n",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "icc-num-steps-restart-late",
        "a run restarts one call after num_steps steps (step == num_steps is still taken as part of the run)",
        "fxdit/runtime.py",
        "and step >= self.schedule.num_steps:",
        "and step > self.schedule.num_steps:",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "icc-guard-ignored",
        "cache.guard 'nonfinite' never recomputes a non-finite cached step",
        "fxdit/runtime.py",
        "            if self.guard == \"nonfinite\" and not all(",
        "            if False and not all(",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "schedule-period-off-by-one",
        "period schedule fires one step late: full iff (step + 1) % period == 0",
        "fxdit/config.py",
        "        return step % self.period == 0\n",
        "        return (step + 1) % self.period == 0\n",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "schedule-warmup-off-by-one",
        "warmup keeps one step more in full (step <= warmup)",
        "fxdit/config.py",
        "        if step < self.warmup:\n",
        "        if step <= self.warmup:\n",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "schedule-cooldown-off-by-one",
        "cooldown keeps one step fewer in full (step > num_steps − cooldown)",
        "fxdit/config.py",
        "        if self.num_steps is not None and step >= self.num_steps - self.cooldown:\n",
        "        if self.num_steps is not None and step > self.num_steps - self.cooldown:\n",
        _RUNTIME_UNIT,
    ),
    Mutant(
        "lossless-schedule-none-caches",
        "cache.schedule 'none' (every step full, lossless) parses to period 2: the lossless pipeline silently caches",
        "fxdit/config.py",
        "            return cls(period=1)\n",
        "            return cls(period=2)\n",
        ("tests/test_icc_runtime.py::test_schedule_none_is_plain_inductor",),
    ),
    # ---------------------------------------------------------------- GRAT: layout
    Mutant(
        "grat-b-radius-off-by-one",
        "GRAT-B neighbourhood uses |i − j| < radius instead of <= radius",
        "kernels/grat_layout.py",
        "    return (i[:, None] - i[None, :]).abs() <= radius\n",
        "    return (i[:, None] - i[None, :]).abs() < radius\n",
        _GRAT_LAYOUT,
    ),
    Mutant(
        "grat-x-no-column",
        "2-D GRAT-X keeps only the group row (the column is lost)",
        "kernels/grat_layout.py",
        "            adj = et & (eh | ew)\n",
        "            adj = et & eh\n",
        _GRAT_LAYOUT,
    ),
    Mutant(
        "grat-text-queries-see-text-only",
        "text queries attend only text keys instead of every valid key",
        "kernels/grat_layout.py",
        "    adj[g:, :g + 1] = True  # text queries (valid or padded) see every valid key\n",
        "    adj[g:, g:g + 1] = True\n",
        _GRAT_LAYOUT,
    ),
    Mutant(
        "grat-padded-text-visible",
        "padded text keys are visible to every query",
        "kernels/grat_layout.py",
        "    adj[:, g] = True  # everyone sees valid text keys\n",
        "    adj[:, g] = True  # everyone sees valid text keys\n    adj[:, g + 1] = True\n",
        _GRAT_LAYOUT,
    ),
    Mutant(
        "grat-block-partial-as-full",
        "block flags mark blocks that are at least half visible as full (their masked elements become visible)",
        "kernels/grat_layout.py",
        "    full = visible == total\n",
        "    full = 2 * visible >= total\n",
        _GRAT_LAYOUT,
    ),
    Mutant(
        "grat-hw-swapped",
        "the inferred token grid is taken as (W, H) instead of (H, W)",
        "passes/rewrite_grouped_attention.py",
        "    return (h, w) if t == 1 else (t, h, w)\n",
        "    return (w, h) if t == 1 else (t, w, h)\n",
        _GRAT_PASS,
    ),
    Mutant(
        "grat-hw-swapped-image",
        "the inferred token grid of an image (2-D) is taken as (W, H); video grids stay right",
        "passes/rewrite_grouped_attention.py",
        "    return (h, w) if t == 1 else (t, h, w)\n",
        "    return (w, h) if t == 1 else (t, h, w)\n",
        _GRAT_PASS,
    ),
    Mutant(
        "grat-text-wrong-side",
        "hoisted GRAT: the layout puts the image span on the other side of the text tokens",
        "passes/rewrite_grouped_attention.py",
        "        image_start = start\n",
        "        image_start = seq - stop\n",
        _GRAT_PASS,
    ),
    Mutant(
        "grat-inverse-dropped",
        "hoisted GRAT: the inverse permutation is never applied where the token stream leaves (output stays in "
        "group order)",
        "passes/_grat_hoist.py",
        "        for user, _ in users:\n            user.replace_input_with(a, u)\n",
        "        for user, _ in users:\n            pass\n",
        _GRAT_PASS,
    ),
    Mutant(
        "grat-key-padding-ignored",
        "the rewrite drops a site's boolean key-padding mask (padded keys become visible)",
        "passes/rewrite_grouped_attention.py",
        "        if site.mask is not None:\n            kv_valid = _kv_valid(",
        "        if False:\n            kv_valid = _kv_valid(",
        _GRAT_PASS,
    ),
    Mutant(
        "grat-min-tokens-flipped",
        "attention.min_tokens comparison flipped: sites with more image tokens than min_tokens stay dense",
        "passes/rewrite_grouped_attention.py",
        "    if n_img < att.min_tokens:\n",
        "    if n_img > att.min_tokens:\n",
        _GRAT_PASS,
    ),
    Mutant(
        "grat-layers-ignored",
        "attention.layers is ignored: every block's attention is rewritten",
        "passes/rewrite_grouped_attention.py",
        "    if att.layers is not None and (site.block is None or site.block not in att.layers):\n",
        "    if False:\n",
        _GRAT_PASS,
    ),
    # ---------------------------------------------------------------- GRAT: the op's kernels
    Mutant(
        "grat-kernel-ignores-tables",
        "Triton launcher ignores the block tables: every key block is visited as a partial block (element mask)",
        "kernels/grouped_attention.py",
        "    f_idx = _check_table(\"full_kv_indices\", full_kv_indices, 4, b, hq, qb)\n",
        "    f_idx = _check_table(\"full_kv_indices\", full_kv_indices, 4, b, hq, qb)\n"
        "    kv_num = torch.full_like(kv_num, kb_total)\n"
        "    kv_idx = torch.arange(kb_total, dtype=torch.int32, device=q.device).expand(b, hq, qb, kb_total)"
        ".contiguous()\n"
        "    f_num = torch.zeros_like(f_num)\n",
        _GRAT_KERNEL_TRITON,
    ),
    Mutant(
        "grat-kernel-no-element-mask",
        "Triton kernel never applies the element mask: partial blocks are computed as if full",
        "kernels/grouped_attention.py",
        "    if not IS_FULL:\n",
        "    if False:\n",
        _GRAT_KERNEL_TRITON,
    ),
    Mutant(
        "grat-cpu-ignores-tables",
        "compiled CPU lowering builds its BlockMask with every key block partial (the tables are ignored)",
        "kernels/ops.py",
        "        tables = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)\n",
        "        nkb = -(-sk // block_size)\n"
        "        tables = (torch.full_like(kv_num_blocks, nkb),\n"
        "                  torch.arange(nkb, dtype=torch.int32, device=q.device).expand(*kv_num_blocks.shape, nkb)"
        ".contiguous(), None, None)\n",
        _GRAT_KERNEL_CPU,
    ),
    Mutant(
        "grat-cpu-padding-ignored",
        "CPU reference / eager op ignores kv_valid (key padding)",
        "kernels/reference.py",
        "    return mask[None, None] & kv_valid.to(torch.bool)[:, None, None, :]\n",
        "    return mask[None, None].expand(kv_valid.shape[0], 1, -1, -1)\n",
        _GRAT_KERNEL_CPU,
    ),
    Mutant(
        "grat-ref-gqa-heads",
        "CPU reference / eager op maps query head h to key/value head h % Hkv instead of h // (Hq / Hkv)",
        "kernels/reference.py",
        "        kc = kc.repeat_interleave(rep, dim=1)\n        vc = vc.repeat_interleave(rep, dim=1)\n",
        "        kc = kc.repeat(1, rep, 1, 1)\n        vc = vc.repeat(1, rep, 1, 1)\n",
        _GRAT_KERNEL_CPU,
    ),
    Mutant(
        "grat-triton-gqa-heads",
        "Triton kernel maps query head h to key/value head h % Hkv instead of h // (Hq / Hkv)",
        "kernels/grouped_attention.py",
        "    off_hk = off_h // kv_group_size\n",
        "    off_hk = off_h % (num_heads // kv_group_size)\n",
        _GRAT_KERNEL_TRITON,
    ),
    Mutant(
        "grat-scale-dropped",
        "compiled CPU grouped attention drops the softmax scale (uses 1.0)",
        "kernels/ops.py",
        "block_mask.as_tuple(), scale, kernel_options, (), buffers)",
        "block_mask.as_tuple(), 1.0, kernel_options, (), buffers)",
        _GRAT_KERNEL_CPU,
    ),
    Mutant(
        "grat-triton-scale-dropped",
        "Triton grouped attention drops the softmax scale (only the log2(e) factor is kept)",
        "kernels/grouped_attention.py",
        "    qk_scale = float(scale) * 1.4426950408889634",
        "    qk_scale = 1.4426950408889634",
        _GRAT_KERNEL_TRITON,
    ),
)

# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

KILLED, SURVIVED, ERROR = "killed", "survived", "error"

_CHECK_IMPORTS = r"""
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
import fxdit, fxdit.kernels, fxdit.passes
paths = [fxdit.__file__] + list(fxdit.kernels.__path__) + list(fxdit.passes.__path__)
paths += [importlib.util.find_spec(m).origin for m in sys.argv[2:]]
bad = [p for p in paths if not os.path.realpath(p).startswith(root + os.sep)]
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


def _git(*args: str) -> list[str]:
    out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]


def _head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def snapshot(dest: Path, source: str) -> list[str]:
    """Copy the tree into ``dest``: tracked files (working tree or HEAD) plus untracked, non-ignored files.

    Returns:
        The tracked files that differ from HEAD in the working tree (worth a warning).
    """
    modified = _git("diff", "--name-only", "-z", "HEAD")
    if source == "head":
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return modified
    files = _git("ls-files", "-z") + _git("ls-files", "-z", "--others", "--exclude-standard")
    for rel in files:
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return modified


def apply(tree: Path, m: Mutant) -> None:
    """Apply ``m`` in ``tree``; raises ``ValueError`` unless its snippet occurs exactly once."""
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"{m.id}: snippet found {count} times in {m.file} (expected exactly once)")
    path.write_text(text.replace(m.old, m.new))


def _module_of(file: str) -> str | None:
    parts = Path(file).with_suffix("").parts
    if parts[0] in ("kernels", "passes"):
        return ".".join(("fxdit",) + parts)
    if parts[0] == "fxdit":
        return ".".join(parts)
    return None


@dataclass
class Outcome:
    result: str
    seconds: float
    rc: int | None
    first_failure: str = ""
    detail: str = ""
    message: str = ""


_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.M)


def _first_failure(output: str) -> tuple[str, str]:
    """The node id and the message of the first ``FAILED``/``ERROR`` line of pytest's short summary."""
    m = _FAILED.search(output)
    if not m:
        return "", ""
    line = m.group(0)
    message = line.split(" - ", 1)[1].strip() if " - " in line else ""
    return m.group(1), message


def run_selection(python: str, base: Path, mutant: Mutant | None, tests: tuple[str, ...], timeout: float,
                  keep: bool = False) -> Outcome:
    """Copy the tree, apply ``mutant`` (none for a baseline), check the imports resolve to the copy, run pytest."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fxdit-mutant-"))
    tree = work / "tree"
    try:
        shutil.copytree(base, tree, symlinks=True)
        if mutant is not None:
            try:
                apply(tree, mutant)
            except ValueError as exc:
                return Outcome(ERROR, time.monotonic() - start, None, detail=str(exc))
        env = dict(os.environ)
        env.update({"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "PYTHONDONTWRITEBYTECODE": "1",
                    "TRITON_CACHE_DIR": str(work / "triton"), "COLUMNS": "400"})
        env.pop("PYTHONPATH", None)
        modules = [mod for mod in [_module_of(mutant.file) if mutant else None] if mod]
        check = subprocess.run([python, "-c", _CHECK_IMPORTS, str(tree), *modules], cwd=tree, env=env,
                               capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            return Outcome(ERROR, time.monotonic() - start, None,
                           detail="imports do not resolve to the copy: " + (check.stdout + check.stderr).strip())
        cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(ERROR, time.monotonic() - start, None, detail=f"timeout after {timeout:.0f} s")
        out = proc.stdout + proc.stderr
        secs = time.monotonic() - start
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        if proc.returncode == 0:
            return Outcome(SURVIVED, secs, 0, detail=tail)
        node, message = _first_failure(out)
        if proc.returncode == 1:
            return Outcome(KILLED, secs, 1, node, tail, message)
        return Outcome(ERROR, secs, proc.returncode, node, f"pytest exit {proc.returncode}: {tail}", message)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def canary(python: str, base: Path, timeout: float) -> Outcome:
    """A mutant that breaks the copy's ``fxdit.kernels.grat_layout`` on import: a run against the original tree
    would pass, so this must fail (proves the runs use the copy)."""
    m = Mutant("canary", "import error planted in the copy", "kernels/grat_layout.py", "import functools\n",
               "import functools\nraise ImportError('fxdit mutation canary')\n",
               ("tests/kernels/test_grat_layout.py::test_default_block_size",))
    return run_selection(python, base, m, m.tests, timeout)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _selection_text(tests: tuple[str, ...]) -> str:
    return " ".join(f"`{t}`" if not t.startswith("-") else t for t in tests)


def write_report(path: Path, rows: list[tuple[Mutant, Outcome]], baselines: dict[tuple[str, ...], Outcome],
                 header: dict[str, str], canary_outcome: Outcome | None) -> None:
    counts = {k: sum(o.result == k for _, o in rows) for k in (KILLED, SURVIVED, ERROR)}
    lines = [
        "# Mutation check of the default test suite",
        "",
        "Written by `tools/mutants.py`. Each mutant is one semantic bug planted in a fresh copy of the source tree; "
        "its selection of default-suite tests (no `slow` marker) runs with `pytest -x` in that copy, with a fresh "
        "inductor cache. *killed*: a test failed (pytest exit 1); *survived*: every selected test passed; *error*: "
        "collection/usage error, timeout or a failing baseline (not a kill).",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        f"- totals: {len(rows)} mutants, {counts[KILLED]} killed, {counts[SURVIVED]} survived, {counts[ERROR]} "
        "errors",
    ]
    if canary_outcome is not None:
        ok = canary_outcome.result != SURVIVED
        lines.append(f"- import check: every run first checks that `fxdit`, `fxdit.kernels`, `fxdit.passes` and the "
                     f"mutated module resolve inside the copy; a canary that breaks the copy's "
                     f"`kernels/grat_layout.py` on import made pytest fail ({canary_outcome.result}, exit "
                     f"{canary_outcome.rc}): {'runs use the copy' if ok else 'RUNS DO NOT USE THE COPY'}")
    lines += ["", "| id | file | what it changes | selection | result | time | first failing test | its failure |",
              "|---|---|---|---|---|---|---|---|"]
    for m, o in rows:
        result = o.result if o.result != ERROR else f"error ({_cell(o.detail)})"
        lines.append(f"| `{m.id}` | `{m.file}` | {_cell(m.what)} | {_selection_text(m.tests)} | {result} | "
                     f"{o.seconds:.0f} s | {f'`{_cell(o.first_failure)}`' if o.first_failure else ''} | "
                     f"{_cell(_short(o.message))} |")
    lines += ["", "Baselines (each distinct selection on the unmutated copy; must pass):", "",
              "| selection | result | time |", "|---|---|---|"]
    for tests, o in baselines.items():
        ok = "pass" if o.result == SURVIVED else f"FAIL ({_cell(o.detail)})"
        lines.append(f"| {_selection_text(tests)} | {ok} | {o.seconds:.0f} s |")
    survivors = [(m, o) for m, o in rows if o.result != KILLED]
    if survivors:
        lines += ["", "Not killed:", ""]
        for m, o in survivors:
            lines.append(f"- `{m.id}` ({o.result}): {_cell(o.detail)}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _torch_version(python: str) -> str:
    proc = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    return proc.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants, check their snippets, and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    ap.add_argument("--out", help="write the markdown table here (e.g. benchmarks/mutation.md)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    ap.add_argument("--source", choices=("worktree", "head"), default="worktree",
                    help="tracked files from the working tree (default) or as committed at HEAD")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="interpreter with pytest")
    ap.add_argument("--no-canary", action="store_true", help="skip the canary run that proves the copy is used")
    args = ap.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("duplicate mutant ids")
    chosen = list(MUTANTS)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in ids]
        if unknown:
            raise SystemExit(f"unknown mutant ids: {unknown}")
        chosen = [m for m in MUTANTS if m.id in wanted]

    base_dir = Path(tempfile.mkdtemp(prefix="fxdit-mutants-src-"))
    base = base_dir / "tree"
    base.mkdir()
    try:
        modified = snapshot(base, args.source)
        if modified:
            _log(f"warning: tracked files differ from HEAD in the working tree: {', '.join(modified)}"
                 + (" (copied as they are)" if args.source == "worktree" else " (ignored: --source head)"))
        bad = 0
        for m in chosen:
            text = (base / m.file).read_text() if (base / m.file).is_file() else ""
            n = text.count(m.old)
            if args.list:
                print(f"{m.id:34s} {m.file:38s} {'ok' if n == 1 else f'SNIPPET x{n}'}  {m.what}")
                print(f"{'':34s} tests: {' '.join(m.tests)}")
            bad += n != 1
        if args.list:
            print(f"{len(chosen)} mutants, {bad} with a snippet not found exactly once")
            return 1 if bad else 0

        python = args.python
        header = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "torch": _torch_version(python),
                  "source": ("working tree" if args.source == "worktree" else "HEAD")
                  + f" at {_head()}",
                  "command": "python tools/mutants.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        if modified:
            header["tracked files differing from HEAD"] = ", ".join(modified) + (
                " (copied as they are)" if args.source == "worktree" else " (not used)")
        t0 = time.monotonic()

        canary_outcome = None
        if not args.no_canary:
            canary_outcome = canary(python, base, args.timeout)
            _log(f"canary: {canary_outcome.result} (exit {canary_outcome.rc}) {canary_outcome.detail}")
            if canary_outcome.result == SURVIVED:
                _log("the canary survived: the runs do not use the copy; stopping")
                return 2

        selections: list[tuple[str, ...]] = []
        for m in chosen:
            if m.tests not in selections:
                selections.append(m.tests)
        baselines: dict[tuple[str, ...], Outcome] = {}
        rows: dict[str, Outcome] = {}

        def do_baseline(tests: tuple[str, ...]) -> tuple[tuple[str, ...], Outcome]:
            return tests, run_selection(python, base, None, tests, args.timeout)

        def do_mutant(m: Mutant) -> tuple[Mutant, Outcome]:
            return m, run_selection(python, base, m, m.tests, args.timeout)

        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for i, (tests, o) in enumerate(pool.map(do_baseline, selections), 1):
                baselines[tests] = o
                _log(f"baseline {i}/{len(selections)} {' '.join(tests)}: "
                     f"{'pass' if o.result == SURVIVED else 'FAIL'} ({o.seconds:.0f} s) {o.detail}")
            runnable = []
            for m in chosen:
                b = baselines[m.tests]
                if b.result != SURVIVED:
                    rows[m.id] = Outcome(ERROR, 0.0, None, detail=f"baseline of its selection failed: {b.detail}")
                else:
                    runnable.append(m)
            for i, (m, o) in enumerate(pool.map(do_mutant, runnable), 1):
                rows[m.id] = o
                _log(f"mutant {i}/{len(runnable)} {m.id}: {o.result} ({o.seconds:.0f} s) "
                     f"{o.first_failure or o.detail} {_short(o.message)}")

        ordered = [(m, rows[m.id]) for m in chosen]
        counts = {k: sum(o.result == k for _, o in ordered) for k in (KILLED, SURVIVED, ERROR)}
        header["wall time"] = f"{(time.monotonic() - t0) / 60:.1f} min (jobs={args.jobs})"
        _log(f"{len(ordered)} mutants: {counts[KILLED]} killed, {counts[SURVIVED]} survived, "
             f"{counts[ERROR]} errors")
        if args.out:
            out = Path(args.out)
            if not out.is_absolute():
                out = ROOT / out
            write_report(out, ordered, baselines, header, canary_outcome)
            _log(f"wrote {out}")
        return 0 if counts[SURVIVED] == counts[ERROR] == 0 else 1
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
