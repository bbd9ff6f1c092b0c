"""Benchmark increment-calibrated caching (ICC): per-step cost, a DDIM run, and sample quality.

    python tools/bench_cache.py --part a        # cost per step at DiT-XL width (ranks 32..256)
    python tools/bench_cache.py --part b        # a DDIM run at period 2, r=128: ICC vs plain inductor
    python tools/bench_cache.py --part c        # quality on the shipped demo model (PSNR vs full computation)
    python tools/bench_cache.py --render        # write benchmarks/cache.md from benchmarks/cache_results.json

Timing technique (cpu_measurements.md): one process, round-robin interleaved calls after warm-up, and a call is
discarded when other processes used more than 5 % of the machine's CPU time during it (from /proc/stat and
/proc/self/stat); tables report medians of the clean calls and say how many were clean. MACs come from the
graphs (:func:`fxdit.cost.macs` on the full and cached variants), never from a formula.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cache_results.json")
MARKDOWN = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cache.md")


# -- timing --------------------------------------------------------------------------------------------------------
from _timing import CONTENDED, measure  # noqa: E402  (tools/ is on sys.path as a script)


class Timer:
    """Collects per-call times by label, with the other-process CPU share of each call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {}

    def __call__(self, label: str, fn: Callable[[], Any]) -> Any:
        out, sec, other = measure(fn)
        self.calls.setdefault(label, []).append((sec, other))
        return out

    def median(self, label: str) -> dict[str, Any]:
        rows = self.calls.get(label, [])
        clean = [s for s, o in rows if o <= CONTENDED]
        use = clean if len(clean) >= 3 else [s for s, _ in rows]
        return {"median_s": statistics.median(use) if use else float("nan"), "clean": len(clean), "calls": len(rows),
                "max_other": max((o for _, o in rows), default=0.0)}


# -- models ----------------------------------------------------------------------------------------------------


def dit_xl_width(depth: int = 4, batch: int = 2):
    from fxdit.apps.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    cfg = DiTConfig(depth=depth, hidden=1152, heads=16, patch=2, input_size=(32, 32), in_channels=4,
                    num_classes=1000)
    model = DiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 32, 32, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return model, x, y


class Probe:
    """A backend that compiles with fxdit and also records the MACs of the plain, full and cached graphs."""

    def __init__(self, options: dict[str, Any], form: str | None = None) -> None:
        from fxdit.config import FxditConfig

        self.cfg = FxditConfig.from_options(options)
        self.form = form
        self.macs: dict[str, int] = {}

    def __call__(self, gm, example_inputs, **kw):
        import importlib

        from fxdit.passes._fx_utils import fresh_copy, fxdit_meta
        from fxdit.passes.insert_lowrank_increments import insert_lowrank_increments
        from fxdit.passes.record_linear_caches import record_linear_caches

        from fxdit import backend as fb
        from fxdit.cost import macs

        plan_mod = importlib.import_module("fxdit.passes.plan_cache")  # the package re-exports the function
        old = plan_mod.DEFAULT_FORM
        if self.form:
            plan_mod.DEFAULT_FORM = self.form
        try:
            work, _ = fb.run_pipeline(fresh_copy(gm), self.cfg)
            self.macs["plain"] = macs(work)
            if fxdit_meta(work).get("cache_plan") is not None:
                full, cached = fresh_copy(work), fresh_copy(work)
                record_linear_caches(full, self.cfg)
                insert_lowrank_increments(cached, self.cfg)
                self.macs["full"], self.macs["cached"] = macs(full), macs(cached)
            return fb.compile_graph(gm, example_inputs, self.cfg)
        finally:
            plan_mod.DEFAULT_FORM = old


def _runtime(model) -> Any:
    import fxdit

    return fxdit.reports(model)[-1].runtime  # the latest compile of this model


# -- part a ----------------------------------------------------------------------------------------------------
def part_a(rounds: int, ranks: list[int], out: dict[str, Any]) -> None:
    import fxdit
    from fxdit.apps.models.dit import block_linear_roles

    model, x, y = dit_xl_width()
    mods = block_linear_roles(model)
    t_hi = torch.full((x.shape[0],), 999.0)
    variants: dict[str, Any] = {}
    plain = torch.compile(copy.deepcopy(model), backend="inductor", dynamic=False)
    probes: dict[str, Probe] = {}
    with torch.no_grad():
        plain(x, t_hi, y)
        for r in ranks:
            fac = fxdit.calibrate(model, method="svd", rank=r, modules=mods, progress=False,
                                  example=((x, t_hi, y), {}))
            for form in (["x", "projcache", "joint"] if r == 128 else ["x"]):
                key = f"r{r}" + ("" if form == "x" else f"-{form}")
                cache: dict[str, Any] = {"factors": fac, "schedule": {"period": 2}}
                if form == "joint":  # one factor pair for the fused qkv linear (fewer MACs at the same rank)
                    cache.update(qkv="joint", factors=fxdit.calibrate(
                        model, method="svd", rank=r, qkv="joint", modules=mods, progress=False,
                        example=((x, t_hi, y), {})))
                probes[key] = Probe({"cache": cache}, form=None if form == "joint" else form)
                m = copy.deepcopy(model)
                variants[key] = torch.compile(m, backend=probes[key], dynamic=False)
                t0 = time.perf_counter()
                variants[key](x, t_hi, y)
                variants[key](x, t_hi - 1, y)
                print(f"compiled {key} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        timer = Timer()
        for i in range(rounds):
            t = torch.full((x.shape[0],), 990.0 - 2 * i)
            timer("plain", lambda: plain(x, t, y))
            for key, fast in variants.items():
                fxdit.reset(fast)
                timer(f"{key}/full", lambda: fast(x, t, y))
                timer(f"{key}/cached", lambda: fast(x, t - 1, y))
                assert _runtime(fast).stats.schedule[-2:] == [True, False]
    rows = {"plain": timer.median("plain")}
    for key in variants:
        rows[key] = {"full": timer.median(f"{key}/full"), "cached": timer.median(f"{key}/cached"),
                     "macs": probes[key].macs}
    out["a"] = {"rounds": rounds, "rows": rows, "torch_threads": torch.get_num_threads()}


# -- part b ----------------------------------------------------------------------------------------------------
def part_b(steps: int, repeats: int, out: dict[str, Any]) -> None:
    import fxdit
    from fxdit.apps.models.dit import block_linear_roles
    from fxdit.apps.sampler import make_scheduler

    model, x0, y = dit_xl_width()
    mods = block_linear_roles(model)
    sched = make_scheduler()
    sched.set_timesteps(steps)
    timesteps = [t.reshape(1).expand(x0.shape[0]).contiguous().float() for t in sched.timesteps]
    fac = fxdit.calibrate(model, method="svd", rank=128, modules=mods, progress=False,
                          example=((x0, timesteps[0], y), {}))
    probe = Probe({"cache": {"factors": fac, "schedule": {"period": 2}}})
    icc = torch.compile(copy.deepcopy(model), backend=probe, dynamic=False)
    plain = torch.compile(copy.deepcopy(model), backend="inductor", dynamic=False)

    def run(fn):
        x = x0.clone()
        for t in timesteps:
            eps = fn(x, t, y)[:, :4]
            x = x - 0.01 * eps  # a cheap stand-in update; the model cost is what is measured
        return x

    timer = Timer()
    with torch.no_grad():
        icc(x0, timesteps[0], y), icc(x0, timesteps[1], y), plain(x0, timesteps[0], y)
        for _ in range(repeats):
            timer("plain", lambda: run(plain))
            with fxdit.sampling(icc):
                timer("icc", lambda: run(icc))
    rt = _runtime(icc)
    sch = rt.stats.schedule[-steps:]
    m = probe.macs
    mac_ratio = (sum(sch) * m["full"] + (len(sch) - sum(sch)) * m["cached"]) / (len(sch) * m["plain"])
    out["b"] = {"steps": steps, "repeats": repeats, "plain": timer.median("plain"), "icc": timer.median("icc"),
                "raw": {k: v for k, v in timer.calls.items()}, "mac_ratio": mac_ratio, "full_steps": sum(sch)}


# -- part c ----------------------------------------------------------------------------------------------------
def part_c(steps: int, n: int, ranks: list[int], out: dict[str, Any]) -> None:
    import fxdit
    from fxdit.apps.quality import psnr
    from fxdit.apps.sampler import DEFAULT_GUIDANCE, Denoiser, class_labels, ddim_sample, initial_noise, load_dit

    loaded = load_dit("demo-dit")
    model, sched = loaded.transformer, loaded.scheduler
    labels = class_labels(range(10), max(1, n // 10))[:n]
    noise = initial_noise(labels.shape[0], (1, 32, 32), seed=0)
    scale = DEFAULT_GUIDANCE

    def sample(fn, k=steps):
        return ddim_sample(Denoiser.for_model(model, fn), labels, noise, sched, steps=k, guidance_scale=scale,
                           progress=False)

    with torch.no_grad():
        ref = sample(model)
        rows = []
        example = Denoiser.for_model(model).example_call(torch.cat([noise, noise]),
                                                         torch.full((2 * noise.shape[0],), 999),
                                                         torch.cat([labels, labels]))
        full_macs = None
        calib_labels = class_labels(range(10), 1)
        calib_noise = initial_noise(10, (1, 32, 32), seed=1000)  # other noise than the evaluation

        def calib_run(m):
            from fxdit.calibration import new_trajectory

            new_trajectory()
            ddim_sample(Denoiser.for_model(model, m), calib_labels, calib_noise, sched, steps=steps,
                        guidance_scale=scale, progress=False)

        for label, options in _quality_configs(model, example, ranks, calib_run):
            torch._dynamo.reset()
            probe = Probe(options)
            fast = torch.compile(model, backend=probe, dynamic=False)
            with fxdit.sampling(fast):
                got = sample(fast)
            rt = _runtime(fast)
            sch = rt.stats.schedule[-steps:]
            m = probe.macs
            full_macs = m["plain"]
            ratio = (sum(sch) * m["full"] + (len(sch) - sum(sch)) * m["cached"]) / (len(sch) * m["plain"])
            rows.append({"config": label, "psnr": psnr(got, ref), "mac_ratio": ratio})
            print(rows[-1], file=sys.stderr)
        for k in sorted({max(1, round(steps * r["mac_ratio"])) for r in rows}):
            rows.append({"config": f"DDIM {k} steps (full)", "psnr": psnr(sample(model, k), ref),
                         "mac_ratio": k / steps})
    out["c"] = {"model": "demo-dit (diffusers DiT, 6 layers, hidden 192, 256 tokens)", "steps": steps,
                "samples": int(labels.shape[0]), "cfg_scale": scale, "rows": rows, "full_macs": full_macs}


def _quality_configs(model, example, ranks, calib_run):
    import fxdit

    yield "reuse, period 2", {"cache": {"mode": "reuse", "schedule": {"period": 2}}}
    for r in ranks:
        fac = fxdit.calibrate(model, method="svd", rank=r, example=example, progress=False)
        yield f"ICC svd r={r}, period 2", {"cache": {"factors": fac, "schedule": {"period": 2}}}
    for method in ("ca-svd", "cd-svd"):
        try:
            fac = fxdit.calibrate(model, calib_run, method=method, rank=ranks[0], example=example, progress=False)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{method} calibration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        yield f"ICC {method} r={ranks[0]}, period 2", {"cache": {"factors": fac, "schedule": {"period": 2}}}


# -- part d ----------------------------------------------------------------------------------------------------
def part_d(ranks: list[int], out: dict[str, Any]) -> None:
    """Separate vs joint factorisation of the fused qkv weight: one cached step's error against its MACs.

    Reference DiT (hidden 384, 6 heads, depth 2, 256 tokens, batch 2, random weights), only the qkv linears cached;
    the graph variants run eagerly (no inductor). Error: relative L2 of the model output of a cached step (caches
    from the previous step of a 2-step DDIM-like move) against the full computation of that step.
    """
    from fxdit.passes._fx_utils import fresh_copy, fxdit_meta, lifted_constants
    from fxdit.passes.find_attention import find_attention
    from fxdit.passes.find_blocks import find_blocks
    from fxdit.passes.insert_lowrank_increments import insert_lowrank_increments
    from fxdit.passes.plan_cache import plan_cache
    from fxdit.passes.record_linear_caches import record_linear_caches

    import fxdit
    from fxdit.apps.models.dit import DiT, DiTConfig
    from fxdit.config import FxditConfig
    from fxdit.cost import macs

    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden=384, heads=6, input_size=(32, 32), num_classes=10)).eval()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 32, 32, generator=g)
    x1 = x0 + 0.05 * torch.randn(x0.shape, generator=g)
    t0, t1 = torch.full((2,), 500.0), torch.full((2,), 480.0)
    y = torch.tensor([1, 2])
    rows = []
    for qkv in ("separate", "joint"):
        for r in ranks:
            rank = r if qkv == "separate" else int(r * 1.5)  # equal MACs: 3·(d+d)·r = (d+3d)·1.5r
            fac = fxdit.calibrate(model, method="svd", rank=rank, qkv=qkv, progress=False,
                                  modules={n: "qkv" for n, _ in model.named_modules() if n.endswith("attn.qkv")},
                                  example=((x0, t0, y), {}))
            cfg = FxditConfig.from_options({"cache": {"factors": fac, "qkv": qkv, "roles": ["qkv"]}})
            got = {}

            def backend(gm, example_inputs):
                work = fresh_copy(gm)
                find_attention(work, cfg)
                find_blocks(work, cfg)
                plan_cache(work, cfg)
                full, cached = fresh_copy(work), fresh_copy(work)
                n = record_linear_caches(full, cfg).details["user_outputs"]
                insert_lowrank_increments(cached, cfg)
                got.update(work=work, full=full, cached=cached, n=n, inputs=list(example_inputs))
                return gm.forward

            torch._dynamo.reset()
            with torch.no_grad():
                torch.compile(model, backend=backend, dynamic=False)(x0, t0, y)
                ins = got["inputs"]
                xi, ti = [i for i, v in enumerate(ins) if v is x0 or v is t0]
                full_out = got["full"](*ins, *lifted_constants(got["full"]))
                caches = list(full_out[got["n"]:])
                ins1 = list(ins)
                ins1[xi], ins1[ti] = x1, t1
                exact = got["work"](*ins1)[0]
                approx = got["cached"](*ins1, *caches, *lifted_constants(got["cached"]))[0]
            rel = float((approx - exact).norm() / exact.norm())
            rows.append({"qkv": qkv, "rank": rank, "rel_err": rel, "macs_cached": macs(got["cached"]),
                         "macs_full": macs(got["work"]),
                         "planned": len(fxdit_meta(got["work"])["cache_plan"]["entries"])})
            print(rows[-1], file=sys.stderr)
    out["d"] = {"rows": rows}


# -- report ----------------------------------------------------------------------------------------------------
def render(res: dict[str, Any]) -> str:
    lines = ["# ICC benchmark (tools/bench_cache.py)", ""]
    lines.append(f"Machine: {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, fp32, "
                 "inductor default config. Medians of clean calls (other processes < 5 % of CPU during the call; "
                 "when fewer than 3 calls were clean, the median of all calls, marked *contended*).")
    lines.append("")
    a = res.get("a")
    if a:
        plain = a["rows"]["plain"]
        lines += ["## (a) Cost per step: reference DiT at DiT-XL/2 width (hidden 1152, 16 heads, 256 tokens, batch 2, "
                  "depth 4, random weights)", "",
                  f"Plain inductor full step: {plain['median_s'] * 1e3:.1f} ms ({plain['clean']}/{plain['calls']} "
                  "clean calls).", "",
                  "| variant | MACs full / plain | MACs cached / plain | full+record ms | full+record / plain | "
                  "cached ms | cached / plain | clean calls (full, cached) |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, row in a["rows"].items():
            if key == "plain":
                continue
            m = row["macs"]
            f, c = row["full"], row["cached"]
            flag = "" if min(f["clean"], c["clean"]) >= 3 else " *contended*"
            lines.append(f"| {key} | {m['full'] / m['plain']:.3f} | {m['cached'] / m['plain']:.3f} | "
                         f"{f['median_s'] * 1e3:.1f} | {f['median_s'] / plain['median_s']:.3f} | "
                         f"{c['median_s'] * 1e3:.1f} | {c['median_s'] / plain['median_s']:.3f} | "
                         f"{f['clean']}/{f['calls']}, {c['clean']}/{c['calls']}{flag} |")
        lines.append("")
    b = res.get("b")
    if b:
        p, i = b["plain"], b["icc"]
        lines += [f"## (b) Sampling run: {b['steps']} DDIM steps, period 2, r=128 (same model as (a))", "",
                  "| | total s (median) | clean runs | ratio |", "|---|---|---|---|",
                  f"| plain inductor | {p['median_s']:.2f} | {p['clean']}/{p['calls']} | 1 |",
                  f"| ICC | {i['median_s']:.2f} | {i['clean']}/{i['calls']} | {i['median_s'] / p['median_s']:.3f} |",
                  "", f"MAC ratio of the run (from the graphs): {b['mac_ratio']:.3f} ({b['full_steps']} full steps).",
                  ""]
    c = res.get("c")
    if c:
        lines += [f"## (c) Quality: {c['model']}", "",
                  f"{c['samples']} samples, DDIM {c['steps']} steps, CFG {c['cfg_scale']}; PSNR of the final sample "
                  "against the full computation from the same noise (higher is better).", "",
                  "| configuration | MAC ratio | PSNR dB |", "|---|---|---|"]
        for row in sorted(c["rows"], key=lambda r: r["mac_ratio"]):
            lines.append(f"| {row['config']} | {row['mac_ratio']:.3f} | {row['psnr']:.2f} |")
        lines.append("")
    d = res.get("d")
    if d:
        lines += ["## (d) Fused qkv: separate vs joint factorisation at equal increment MACs", "",
                  "Reference DiT, hidden 384, depth 2, 256 tokens, batch 2, random weights; only qkv cached. Relative "
                  "L2 error of one cached step's output against the full step (caches from the previous step).", "",
                  "| qkv factors | rank | cached-step MACs / full | rel. error |", "|---|---|---|---|"]
        for row in d["rows"]:
            lines.append(f"| {row['qkv']} | {row['rank']} | {row['macs_cached'] / row['macs_full']:.3f} | "
                         f"{row['rel_err']:.4f} |")
        lines.append("")
    extra = res.get("notes")
    if extra:
        lines += ["## Notes", "", *extra, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["a", "b", "c", "d"], action="append", default=[])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quality-steps", type=int, default=50)
    ap.add_argument("--quality-samples", type=int, default=20)
    ap.add_argument("--quality-ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    res: dict[str, Any] = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            res = json.load(f)
    for part in args.part:
        if part == "a":
            part_a(args.rounds, args.ranks, res)
        elif part == "b":
            part_b(args.steps, args.repeats, res)
        elif part == "c":
            part_c(args.quality_steps, args.quality_samples, args.quality_ranks, res)
        else:
            part_d([16, 32, 64], res)
        merged: dict[str, Any] = {}
        if os.path.exists(RESULTS):  # another part may have finished meanwhile
            with open(RESULTS) as f:
                merged = json.load(f)
        merged[part] = res[part]
        res = merged
        with open(RESULTS, "w") as f:
            json.dump(res, f, indent=1, default=float)
    if args.render or args.part:
        with open(MARKDOWN, "w") as f:
            f.write(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
