"""Benchmark fxdit's grouped attention (GRAT) on CPU against dense and FlexAttention baselines.

Writes ``benchmarks/attention.md`` (and prints the table). Providers, all fp32, ``B=1, H=2, D=64`` by default, token
order = group order (the layout the GRAT pass produces):

* ``fxdit``: ``fxdit::grouped_attention`` compiled through the backend's path (``backend._decompositions`` → the
  FlexAttention decomposition in ``fxdit.kernels.ops``, plus ``ops.inductor_patches_for``), BlockMask tables from
  :func:`fxdit.kernels.grat_layout.block_mask_tables` passed as graph inputs;
* ``dense``: inductor-compiled dense SDPA (``torch.compile(F.scaled_dot_product_attention, dynamic=False)``);
* ``flex``: ``torch.compile(flex_attention, dynamic=False)`` with the same BlockMask built straight from the tables
  (``BlockMask.from_kv_blocks`` + the group mask_mod);
* ``eager``: eager dense SDPA.

Timing (cpu_measurements.md technique for a shared machine): providers interleaved round-robin in one process after
warm-up calls; a call is discarded when other processes used more than ``--max-other`` of the CPU jiffies during it
(``/proc/stat`` minus this process's ``/proc/self/stat``); medians of the clean calls. When too few calls are clean
the row says so and uses all calls.

The end-to-end section of the output file (between ``<!-- e2e:begin -->`` and ``<!-- e2e:end -->``) belongs to the
end-to-end benchmark (`tools/bench_grat_e2e.py`) and is preserved when this tool rewrites the file.

Usage::

    python tools/bench_attention.py                       # 32², 64², 128² × groups 8², 16² × GRAT-B/X
    python tools/bench_attention.py --grids 192x192,8x48x80 --append
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "attention.md"
E2E_BEGIN, E2E_END = "<!-- e2e:begin -->", "<!-- e2e:end -->"
ROWS_JSON = "attention_rows.json"


# ------------------------------------------------------------------------------------------------ CPU accounting


from _timing import timed_call  # noqa: E402  (tools/ is on sys.path when run as a script)

# ------------------------------------------------------------------------------------------------ providers


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lower().split("x"))


def _group_for(grid: tuple[int, ...], group2d: tuple[int, int]) -> tuple[int, ...]:
    if len(grid) == 2:
        return group2d
    return (min(4, grid[0]), *group2d)  # video: 4×gh×gw (HunyuanVideo uses 4×8×8)


def build_providers(grid: tuple[int, ...], group: tuple[int, ...], mode: str, *, heads: int, head_dim: int,
                    dtype: torch.dtype) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    from fxdit.kernels import grat_layout as L
    from fxdit.kernels import ops
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from fxdit import backend
    from fxdit.config import FxditConfig

    layout = L.SequenceLayout.image_then_text(grid, group, mode)
    t0 = time.perf_counter()
    tables = L.block_mask_tables(layout)
    table_ms = (time.perf_counter() - t0) * 1e3
    cls, adj = L.token_groups(layout), L.group_adj(layout)
    s = layout.seq_len
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    bs = tables.block_size
    info: dict[str, Any] = {"block_size": bs, "table_ms": table_ms, "density": L.block_density(tables),
                            "closed_form": L.closed_form_density(grid, group, mode),
                            "partial_blocks": int(tables.kv_num_blocks.sum()),
                            "full_blocks": int(tables.full_kv_num_blocks.sum()), "seq_len": s}

    # fxdit: the op compiled the way fxdit's backend lowers it
    def op_fn(q, k, v, qg, kg, a, n1, i1, n2, i2):
        return torch.ops.fxdit.grouped_attention(q, k, v, qg, kg, a, n1, i1, n2, i2, None, scale, bs)

    op_args = [q, k, v, cls, cls, adj, *tables[:4]]
    gm = torch.fx.symbolic_trace(op_fn)
    FakeTensorProp(gm).propagate(*op_args)
    cfg = FxditConfig()
    t0 = time.perf_counter()
    fx_compiled = compile_fx(gm, op_args, config_patches={**cfg.inductor_patches, **ops.inductor_patches_for(gm)},
                             decompositions=backend._decompositions(gm))
    info["compile_fxdit_s"] = time.perf_counter() - t0

    def fxdit_call():
        out = fx_compiled(*op_args)
        return out[0] if isinstance(out, (list, tuple)) else out

    dense_c = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), dynamic=False)

    def mask_mod(b, h, qi, ki):
        return adj[cls[qi], cls[ki]]

    block_mask = BlockMask.from_kv_blocks(*tables[:4], BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(s, s))
    flex_c = torch.compile(flex_attention, dynamic=False)

    providers = {
        "fxdit": fxdit_call,
        "dense": lambda: dense_c(q, k, v),
        "flex": lambda: flex_c(q, k, v, block_mask=block_mask, scale=scale),
        "eager": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
    }
    t0 = time.perf_counter()
    a = fxdit_call()
    b = providers["flex"]()
    info["max_abs_diff_vs_flex"] = float((a - b).abs().max())
    if s <= 4096:
        from fxdit.kernels.reference import grouped_attention_ref

        ref = grouped_attention_ref(q, k, v, cls, cls, adj, scale=scale)
        info["max_abs_err_vs_ref"] = float((a - ref).abs().max())
    providers["dense"]()
    info["compile_others_s"] = time.perf_counter() - t0
    return providers, info


@dataclass
class Row:
    grid: str
    group: str
    mode: str
    info: dict[str, Any]
    ms: dict[str, float] = field(default_factory=dict)
    clean: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    other_cpu: float = 0.0
    contended: bool = False


def measure(providers: dict[str, Callable[[], Any]], *, calls: int, warmup: int, max_other: float,
            max_rounds: int) -> tuple[dict[str, float], dict[str, int], dict[str, int], float, bool]:
    reps: dict[str, int] = {}
    for _ in range(max(1, warmup)):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            # /proc/stat counts in 10 ms jiffies: repeat short calls so one timed call lasts >= ~0.3 s
            reps[name] = max(1, min(50, math.ceil(0.3 / max(time.perf_counter() - start, 1e-4))))
    clean: dict[str, list[float]] = {name: [] for name in providers}
    every: dict[str, list[float]] = {name: [] for name in providers}
    others: list[float] = []
    rounds = 0
    while rounds < max_rounds and min(len(v) for v in clean.values()) < calls:
        rounds += 1
        for name, fn in providers.items():
            if len(clean[name]) >= calls:
                continue
            dt, other = timed_call(fn, reps[name])
            every[name].append(dt)
            others.append(other)
            if other <= max_other:
                clean[name].append(dt)
    contended = any(len(v) < max(3, calls // 2) for v in clean.values())
    source = every if contended else clean
    ms = {name: statistics.median(v) * 1e3 for name, v in source.items()}
    return (ms, {n: len(v) for n, v in clean.items()}, {n: len(v) for n, v in every.items()},
            statistics.median(others) if others else 0.0, contended)


# ------------------------------------------------------------------------------------------------ report


def _fmt_row(r: Row) -> str:
    i = r.info
    ms = r.ms
    dens = i["density"]
    ideal = 1.0 / dens
    sp_dense = ms["dense"] / ms["fxdit"]
    sp_flex = ms["flex"] / ms["fxdit"]
    sp_eager = ms["eager"] / ms["fxdit"]
    frac = sp_dense * dens
    note = f"{min(r.clean.values())}/{max(r.calls.values())} clean"
    if r.contended:
        note += f", CONTENDED (median other CPU {r.other_cpu:.0%})"
    return (f"| {r.grid} | {r.group} | {r.mode} | {i['seq_len']} | {i['block_size']} | {dens:.4f} | {ideal:.2f}× | "
            f"{ms['fxdit']:.1f} | {ms['dense']:.1f} | {ms['flex']:.1f} | {ms['eager']:.1f} | "
            f"**{sp_dense:.2f}×** | {sp_flex:.2f}× | {sp_eager:.2f}× | {frac:.2f} | {i['partial_blocks']}/"
            f"{i['partial_blocks'] + i['full_blocks']} | {i['table_ms']:.1f} | {note} |")


HEADER = ("| grid | group | mode | S | BS | block density ρ | ideal 1/ρ | fxdit ms | dense-compiled ms | flex ms | "
          "eager SDPA ms | speedup vs dense-compiled | vs flex | vs eager | frac of ideal | partial/listed blocks | "
          "tables ms | calls |\n|" + "---|" * 18)


def render(rows: list[Row], meta: dict[str, Any], e2e: str) -> str:
    lines = [
        "# Grouped attention (GRAT) on CPU — op-level benchmark",
        "",
        f"Generated by `tools/bench_attention.py` on {meta['date']} (torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cpu']}). fp32, B=1, H={meta['heads']}, D={meta['head_dim']}; token order "
        "= group order; no text. Medians of clean calls (a call is clean when other processes used ≤ "
        f"{meta['max_other']:.0%} of the CPU during it), providers interleaved round-robin after warm-up.",
        "",
        "* **fxdit**: `fxdit::grouped_attention` compiled through fxdit's backend path (CPU decomposition to "
        "FlexAttention, BlockMask tables as graph inputs).",
        "* **dense-compiled**: inductor-compiled dense SDPA. **flex**: `torch.compile(flex_attention)` with the same "
        "BlockMask built from the tables. **eager SDPA**: dense, eager.",
        "* frac of ideal = (speedup vs dense-compiled) × ρ. Targets: 128², 16² groups: GRAT-B ≥ 7.6× "
        "(0.9 of ideal) and not slower than flex; GRAT-X ≥ 3.6× (0.85).",
        "",
        HEADER,
        *[_fmt_row(r) for r in rows],
        "",
        "GPU rows: N/A here (CPU machine; the Triton kernel is verified under `TRITON_INTERPRET=1`, GPU figures in "
        "`benchmarks/gpu.md` from `tools/gpu_check.sh`).",
        "",
        "## End-to-end",
        "",
        E2E_BEGIN,
        e2e.strip() if e2e.strip() else ("| model | tokens | fxdit GRAT-B ms | plain inductor ms | speedup |\n"
                                         "|---|---|---|---|---|\n"
                                         "| reference DiT, 4 blocks | 128×128 | N/A | N/A | N/A (to be added by the "
                                         "end-to-end benchmark, tools/bench_grat_e2e.py) |"),
        E2E_END,
        "",
    ]
    notes = meta.get("notes")
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


NOTES = [
    "* Quiet re-run (2026-11-23, about 18:10 UTC) of the 128² and 192² rows (every call clean; the 32² and 64² rows are still from the contended run): at 128² with 16×16 groups GRAT-B reaches **5.74×** over compiled dense SDPA, 0.68 of ideal, and GRAT-X **2.92×** (0.68): the targets (≥ 7.6× / 0.9 and ≥ 3.6× / 0.85) are **missed**. The 7.65× / 3.90× of the earlier run came from contended calls in which the dense baseline was slowed more than the sparse one (dense 3342 ms then, 920 ms now). fxdit is not slower than compiled flex_attention with the same mask (1.30× and 1.00×). Profile: compiled flex_attention over this BlockMask takes the same 156–160 ms with the group mask_mod, a no-op mask_mod, SKIP_MASK_SCORE, and PARTITION_SIZE 64 or 256, so the gap to ideal is inductor's CPU flex template (≈100 GFLOP/s on the listed blocks against ≈150 GFLOP/s for dense SDPA), not fxdit's mask or tables; the prototype's 103 ms for the same template (cpu_measurements.md) is not reproduced on today's machine (dense SDPA is 15 % slower than then, flex 55 %).",  # noqa: E501
    "* fxdit and flex run the same inductor C++ flex template over the same BlockMask, so their ratio should be "
    "≈1; fxdit builds the BlockMask in-graph from the tables (graph inputs) and has no extra work per call.",
    "* Block size = the largest of 128/64/32/16 dividing the group (8×8 groups → 64, 16×16 → 128), so every "
    "image block is full or empty (the `partial/listed blocks` column) and block density = token density (grat.md §6).",
    "* A row marked CONTENDED had too few clean calls (the 2-core machine was shared with other jobs); its medians "
    "use every call and its ratios are less reliable than those of clean rows (round-robin interleaving still "
    "exposes all providers to the same load).",
    "* `tables ms` is the first (uncached) `block_mask_tables` call of the row, measured in the same contended "
    "process; it is cached per layout afterwards.",
]


def _existing_e2e(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    if E2E_BEGIN in text and E2E_END in text:
        return text.split(E2E_BEGIN, 1)[1].split(E2E_END, 1)[0]
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", default="32x32,64x64,128x128")
    p.add_argument("--groups", default="8x8,16x16")
    p.add_argument("--modes", default="grat-b,grat-x")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--calls", type=int, default=7, help="clean calls per provider")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--max-other", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--append", action="store_true", help="keep the rows already measured (from the JSON sidecar)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    sidecar = args.out.parent / ROWS_JSON
    rows: list[Row] = []
    if args.append and sidecar.exists():
        rows = [Row(**r) for r in json.loads(sidecar.read_text())]
    meta: dict[str, Any] = {"notes": NOTES, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,  # noqa: E501
            "threads": torch.get_num_threads(), "heads": args.heads, "head_dim": args.head_dim,
            "max_other": args.max_other, "cpu": _cpu_name()}
    for grid_s in args.grids.split(","):
        grid = _parse_shape(grid_s)
        for group_s in args.groups.split(","):
            group = _group_for(grid, _parse_shape(group_s))  # type: ignore[arg-type]
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                providers, info = build_providers(grid, group, mode, heads=args.heads, head_dim=args.head_dim,
                                                  dtype=torch.float32)
                ms, clean, calls, other, contended = measure(providers, calls=args.calls, warmup=args.warmup,
                                                             max_other=args.max_other, max_rounds=args.max_rounds)
                row = Row("×".join(map(str, grid)), "×".join(map(str, group)), mode, info, ms, clean, calls, other,
                          contended)
                rows = [r for r in rows if (r.grid, r.group, r.mode) != (row.grid, row.group, row.mode)] + [row]
                print(_fmt_row(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                sidecar.write_text(json.dumps([asdict(r) for r in rows], indent=1))
                args.out.write_text(render(rows, meta, _existing_e2e(args.out)))
    print(HEADER)
    for r in rows:
        print(_fmt_row(r))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
