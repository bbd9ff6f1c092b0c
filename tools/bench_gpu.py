"""GPU benchmarks of fxdit's Triton kernels; writes ``benchmarks/gpu.md`` (and prints it).

Grouped attention (GRAT-B and GRAT-X, bf16, B=1, 24 heads, head dim 128, token order = group order as the GRAT pass
produces it, no text) at 64×64 and 128×128 image tokens (16×16 groups) and 8×48×80 video tokens (4×8×8 groups):

* ``fxdit``: :func:`fxdit.kernels.grouped_attention.grouped_attention` (the Triton kernel, autotuned as shipped),
  BlockMask tables from :func:`fxdit.kernels.grat_layout.block_mask_tables`;
* ``sdpa-flash``: dense ``scaled_dot_product_attention`` restricted to the FlashAttention backend (and
  ``sdpa-cudnn``, the cuDNN backend, where this build has it);
* ``flex``: ``torch.compile(flex_attention)`` with the same BlockMask (``BlockMask.from_kv_blocks`` over the same
  tables and the group ``mask_mod``).

Ideal speed-up = 1 / block density ρ (a kernel whose time is proportional to the computed blocks); "frac of ideal"
= (speed-up over flash) × ρ.

Low-rank increment (ICC) at DiT-XL width (hidden 1152, rank 128, 2×4096 tokens, bf16) for the three cached linear
shapes (attention proj 1152→1152, mlp_in 1152→4608, mlp_out 4608→1152):

* ``fused``: :func:`fxdit.kernels.lowrank_increment.lowrank_increment` (one Triton kernel);
* ``unfused``: the eager GEMM chain ``addmm(y_c, (x − x_c)·Bᵀ, Aᵀ)``; ``unfused-compiled``: the same chain through
  ``torch.compile`` (inductor);
* ``dense linear``: ``F.linear(x, W, b)``, the full-step cost of the layer the increment replaces.

Timing: ``triton.testing.do_bench`` (warm-up included; medians). The whole run is kept under ``--budget-s`` seconds
(default 170): rows that would start after it are listed as skipped.

Usage::

    python tools/bench_gpu.py                       # everything, writes benchmarks/gpu.md
    python tools/bench_gpu.py --skip-flex --out /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "gpu.md"

ATTN_ROWS = [
    ((64, 64), (16, 16)),
    ((128, 128), (16, 16)),
    ((8, 48, 80), (4, 8, 8)),
]
MODES = ("grat-b", "grat-x")
LOWRANK_SHAPES = [("attn proj", 1152, 1152), ("mlp_in", 1152, 4608), ("mlp_out", 4608, 1152)]
#: Device of every tensor (module level so the row functions can be exercised elsewhere with small shapes).
DEVICE = "cuda"


def _bench(fn: Callable[[], Any], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _sync() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _sdpa_backend_fn(backend_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> Callable[[], torch.Tensor] | None:
    """Dense SDPA pinned to one backend, or ``None`` when this build/GPU does not run it for these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return None

    def fn() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    try:
        fn()
        _sync()
    except RuntimeError:
        return None
    return fn


_FLEX: list[Callable[..., Any]] = []


def _compiled_flex(flex_attention: Callable[..., Any]) -> Callable[..., Any]:
    """One ``torch.compile(flex_attention)`` for every row: rows of the same shape (GRAT-B, GRAT-X) share its
    compiled code (the mask tensors are graph inputs of equal shapes), other shapes add a specialisation."""
    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _FLEX[0]


def attention_row(grid: tuple[int, ...], group: tuple[int, ...], mode: str, *, heads: int, head_dim: int,
                  rep_ms: int, with_flex: bool) -> dict[str, Any]:
    from fxdit.kernels import grat_layout as gl
    from fxdit.kernels.grouped_attention import grouped_attention

    dev = torch.device(DEVICE)
    layout = gl.SequenceLayout.image_then_text(grid, group, mode)
    tables = gl.block_mask_tables(layout)
    bs = tables.block_size
    cls = gl.token_groups(layout).to(dev)
    adj = gl.group_adj(layout).to(dev)
    tabs = [t.to(dev) for t in tables[:4]]
    s = layout.seq_len
    density = gl.block_density(tables)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, head_dim, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    row: dict[str, Any] = {"grid": "×".join(map(str, grid)), "group": "×".join(map(str, group)), "mode": mode,
                           "S": s, "BS": bs, "density": density, "ms": {}, "notes": []}

    def fxdit_fn() -> torch.Tensor:
        return grouped_attention(q, k, v, cls, cls, adj, *tabs, None, scale=scale, block_size=bs)

    t0 = time.perf_counter()
    out = fxdit_fn()  # first call autotunes (compiles every surviving config)
    _sync()
    row["tune_s"] = time.perf_counter() - t0
    row["ms"]["fxdit"] = _bench(fxdit_fn, rep_ms)
    from fxdit.kernels import grouped_attention as ga

    best = getattr(ga._grouped_attention_fwd_tuned, "best_config", None)
    if best is not None:
        row["config"] = (f"{best.kwargs.get('BLOCK_M')}×{best.kwargs.get('BLOCK_N')}, {best.num_warps}w, "
                         f"{best.num_stages}st")

    for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
        fn = _sdpa_backend_fn(backend, q, k, v, scale)
        if fn is None:
            row["notes"].append(f"{name} unavailable")
            continue
        row["ms"][name] = _bench(fn, rep_ms)

    if with_flex:
        try:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            def mask_mod(b, h, qi, ki):
                return adj[cls[qi], cls[ki]]

            try:
                block_mask = BlockMask.from_kv_blocks(*tabs, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(s, s))
            except TypeError:  # torch without seq_lengths
                block_mask = BlockMask.from_kv_blocks(*tabs, BLOCK_SIZE=bs, mask_mod=mask_mod)
            flex_c = _compiled_flex(flex_attention)

            def flex_fn() -> torch.Tensor:
                return flex_c(q, k, v, block_mask=block_mask, scale=scale)

            t0 = time.perf_counter()
            ref = flex_fn()
            _sync()
            row["flex_compile_s"] = time.perf_counter() - t0
            row["max_abs_diff_vs_flex"] = float((out.float() - ref.float()).abs().max())
            row["ms"]["flex"] = _bench(flex_fn, rep_ms)
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            row["notes"].append(f"flex failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    row["flops_dense"] = 4.0 * heads * s * s * head_dim
    return row


def lowrank_row(label: str, k: int, n: int, *, tokens: int, rank: int, rep_ms: int) -> dict[str, Any]:
    from fxdit.kernels.lowrank_increment import lowrank_increment

    dev = torch.device(DEVICE)
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, k, device=dev, dtype=dt, generator=g)
    xc = x + 0.1 * torch.randn(tokens, k, device=dev, dtype=dt, generator=g)
    yc = torch.randn(tokens, n, device=dev, dtype=dt, generator=g)
    B = torch.randn(rank, k, device=dev, dtype=dt, generator=g) / math.sqrt(k)
    A = torch.randn(n, rank, device=dev, dtype=dt, generator=g) / math.sqrt(rank)
    W = (A.float() @ B.float()).to(dt)
    bias = torch.zeros(n, device=dev, dtype=dt)

    def fused() -> torch.Tensor:
        return lowrank_increment(x, xc, yc, B, A)

    def chain(x_: torch.Tensor, xc_: torch.Tensor, yc_: torch.Tensor) -> torch.Tensor:
        return torch.addmm(yc_, (x_ - xc_) @ B.t(), A.t())

    chain_c = torch.compile(chain, dynamic=False)
    row: dict[str, Any] = {"shape": label, "K": k, "N": n, "M": tokens, "r": rank, "ms": {}}
    gold = yc.double() + ((x.double() - xc.double()) @ B.double().t()) @ A.double().t()
    out = fused()
    row["rel_err_fused"] = float((out.double() - gold).norm() / gold.norm())
    row["rel_err_unfused"] = float((chain(x, xc, yc).double() - gold).norm() / gold.norm())
    row["ms"]["fused"] = _bench(fused, rep_ms)
    row["ms"]["unfused"] = _bench(lambda: chain(x, xc, yc), rep_ms)
    chain_c(x, xc, yc)
    row["ms"]["unfused-compiled"] = _bench(lambda: chain_c(x, xc, yc), rep_ms)
    row["ms"]["dense linear"] = _bench(lambda: F.linear(x, W, bias), rep_ms)
    # bytes the fused kernel must move at least: x, x_c, y_c read, y written (factors are small and cached)
    row["bytes"] = 2 * (2 * tokens * k + 2 * tokens * n)
    return row


# ------------------------------------------------------------------------------------------------ report


def _ms(row: dict[str, Any], key: str) -> str:
    v = row["ms"].get(key)
    return "n/a" if v is None else f"{v:.3f}"


def _ratio(row: dict[str, Any], num: str, den: str) -> str:
    a, b = row["ms"].get(num), row["ms"].get(den)
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def render(meta: dict[str, Any], attn: list[dict[str, Any]], lowrank: list[dict[str, Any]],
           skipped: list[str]) -> str:
    lines = [
        "# fxdit kernels on GPU",
        "",
        f"Generated by `tools/bench_gpu.py` on {meta['date']}: {meta['gpu']} ({meta['sms']} SMs), torch "
        f"{meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, Python {meta['python']}. Medians of "
        f"`triton.testing.do_bench` (warm-up {25} ms, rep {meta['rep_ms']} ms).",
        "",
        f"## Grouped attention (bf16, B=1, H={meta['heads']}, D={meta['head_dim']}, group-ordered tokens, no text)",
        "",
        "Speed-up columns are the baseline's time over fxdit's. Ideal = 1/ρ with ρ the block density. fxdit TFLOP/s "
        "counts only the computed blocks (ρ × dense FLOPs); flash TFLOP/s counts the dense FLOPs.",
        "",
        "| tokens | group | mode | S | BS | ρ | ideal 1/ρ | fxdit ms | flash ms | cudnn ms | flex ms | "
        "vs flash | frac of ideal | vs cudnn | vs flex | fxdit TFLOP/s | flash TFLOP/s | fxdit config | "
        "tune s | max abs diff vs flex |",
        "|" + "---|" * 20,
    ]
    for r in attn:
        d = r["density"]
        fx, fl = r["ms"].get("fxdit"), r["ms"].get("sdpa-flash")
        frac = "n/a" if fx is None or fl is None else f"{fl / fx * d:.2f}"
        tf_fx = "n/a" if fx is None else f"{r['flops_dense'] * d / fx / 1e9:.0f}"
        tf_fl = "n/a" if fl is None else f"{r['flops_dense'] / fl / 1e9:.0f}"
        diff = r.get("max_abs_diff_vs_flex")
        lines.append(
            f"| {r['grid']} | {r['group']} | {r['mode']} | {r['S']} | {r['BS']} | {d:.4f} | {1 / d:.2f}× | "
            f"{_ms(r, 'fxdit')} | {_ms(r, 'sdpa-flash')} | {_ms(r, 'sdpa-cudnn')} | {_ms(r, 'flex')} | "
            f"**{_ratio(r, 'sdpa-flash', 'fxdit')}** | {frac} | {_ratio(r, 'sdpa-cudnn', 'fxdit')} | "
            f"{_ratio(r, 'flex', 'fxdit')} | {tf_fx} | {tf_fl} | {r.get('config', '?')} | {r['tune_s']:.1f} | "
            f"{'n/a' if diff is None else f'{diff:.2e}'} |")
    notes = [f"* {r['grid']} {r['mode']}: {'; '.join(r['notes'])}" for r in attn if r["notes"]]
    lines += ["", *notes] if notes else []
    lines += [
        "",
        f"## Low-rank increment (ICC; bf16, {meta['tokens']} tokens, rank {meta['rank']})",
        "",
        "`fused` is fxdit's Triton kernel; `unfused` the eager chain `addmm(y_c, (x − x_c)·Bᵀ, Aᵀ)`; `dense linear` "
        "the full layer the increment stands in for. GB/s counts the bytes the step must move (x, x_c, y_c read, y "
        "written).",
        "",
        "| layer | K→N | fused ms | unfused ms | unfused-compiled ms | dense linear ms | fused vs unfused | "
        "fused vs compiled | fused / dense linear | fused GB/s | rel err fused | rel err unfused |",
        "|" + "---|" * 12,
    ]
    for r in lowrank:
        fused = r["ms"].get("fused")
        gbs = "n/a" if not fused else f"{r['bytes'] / fused / 1e6:.0f}"
        lines.append(
            f"| {r['shape']} | {r['K']}→{r['N']} | {_ms(r, 'fused')} | {_ms(r, 'unfused')} | "
            f"{_ms(r, 'unfused-compiled')} | {_ms(r, 'dense linear')} | **{_ratio(r, 'unfused', 'fused')}** | "
            f"{_ratio(r, 'unfused-compiled', 'fused')} | {_ratio(r, 'fused', 'dense linear').rstrip('×')} | {gbs} | "
            f"{r['rel_err_fused']:.2e} | {r['rel_err_unfused']:.2e} |")
    if skipped:
        lines += ["", "Skipped (time budget or failure):", "", *[f"* {s}" for s in skipped]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2 * 4096)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per provider")
    p.add_argument("--budget-s", type=float, default=170.0, help="start no new row after this many seconds")
    p.add_argument("--skip-flex", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available", file=sys.stderr)
        return 2
    import triton

    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "gpu": props.name,
            "sms": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": sys.version.split()[0], "rep_ms": args.rep_ms,
            "heads": args.heads, "head_dim": args.head_dim, "tokens": args.tokens, "rank": args.rank}
    attn: list[dict[str, Any]] = []
    lowrank: list[dict[str, Any]] = []
    skipped: list[str] = []

    def over() -> bool:
        return time.perf_counter() - start > args.budget_s

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(meta, attn, lowrank, skipped))

    # low-rank first: it is quick, so a slow attention row cannot crowd it out
    for label, k, n in LOWRANK_SHAPES:
        if over():
            skipped.append(f"low-rank {label}: time budget")
            continue
        try:
            lowrank.append(lowrank_row(label, k, n, tokens=args.tokens, rank=args.rank, rep_ms=args.rep_ms))
        except Exception as exc:  # noqa: BLE001
            skipped.append(f"low-rank {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        print(f"[{time.perf_counter() - start:6.1f} s] low-rank {label} done", flush=True)
        write()
    for grid, group in ATTN_ROWS:
        for mode in MODES:
            name = f"attention {'×'.join(map(str, grid))} {mode}"
            if over():
                skipped.append(f"{name}: time budget")
                continue
            try:
                attn.append(attention_row(grid, group, mode, heads=args.heads, head_dim=args.head_dim,
                                          rep_ms=args.rep_ms, with_flex=not args.skip_flex))
            except Exception as exc:  # noqa: BLE001
                skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            print(f"[{time.perf_counter() - start:6.1f} s] {name} done", flush=True)
            write()
    write()
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
