"""``fxdit demo``: compare eager, inductor and fxdit modes on the shipped digits DiT.

Prints the comparison table and writes labelled PNG grids, ``report.md`` and ``report.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["add_parser", "run"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2; got {text!r}") from exc


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_common(p: argparse.ArgumentParser, *, steps: int, per_class: int) -> None:
    """Sampling and output options shared by ``demo`` and ``eval``."""
    p.add_argument("--out", default="demo_out", help="output folder (PNG grids, report.md, report.json)")
    p.add_argument("--steps", type=int, default=steps, help="DDIM steps of a full run (default %(default)s)")
    p.add_argument("--classes", type=_int_list, default=tuple(range(10)),
                   help="comma-separated class labels (default 0..9)")
    p.add_argument("--per-class", type=int, default=per_class, help="samples per class (default %(default)s)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: fxdit.apps.sampler.DEFAULT_GUIDANCE, 1.5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--rank", type=int, default=64, help="SVD rank of the ICC factors computed on the fly (default 64)")
    p.add_argument("--psnr-gate", type=float, default=25.0, help="PSNR gate in dB vs full computation (default 25)")
    p.add_argument("--ssim-gate", type=float, default=0.90, help="SSIM gate vs full computation (default 0.90)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fxdit demo``."""
    from fxdit.apps.demo import MODES

    p = subparsers.add_parser("demo", help="compare eager / inductor / fxdit modes on the shipped digits DiT",
                              description=__doc__)
    add_common(p, steps=50, per_class=1)
    p.add_argument("--model", default="demo-dit", help="shipped model name or folder (default demo-dit)")
    p.add_argument("--modes", type=_name_list, default=None,
                   help="comma-separated modes (default all): " + ", ".join(MODES))
    return p


def settings_from(args: argparse.Namespace) -> Any:
    """CompareSettings from parsed arguments."""
    from fxdit.apps.demo import CompareSettings
    from fxdit.apps.quality import Gates
    from fxdit.apps.sampler import DEFAULT_GUIDANCE
    from fxdit.errors import FxditError

    if args.steps < 1 or args.per_class < 1 or not args.classes:
        raise FxditError(f"--steps={args.steps}, --per-class={args.per_class}, --classes={args.classes}; expected "
                         "steps >= 1, per-class >= 1 and at least one class")
    return CompareSettings(steps=args.steps, classes=tuple(args.classes), per_class=args.per_class,
                           guidance_scale=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
                           seed=args.seed, rank=args.rank,
                           gates=Gates(args.psnr_gate, args.ssim_gate), progress=not args.no_progress)


def execute(args: argparse.Namespace, modes: list[Any], model: str) -> int:
    """Load, compare, print and write; shared by ``demo`` and ``eval``."""
    import os

    import torch

    import fxdit.apps.sampler as sampling
    from fxdit.apps.demo import compare, format_table, write_outputs

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    settings = settings_from(args)
    loaded = sampling.load_dit(model)
    scorer = None
    if _is_digits_model(loaded):
        from fxdit.apps.quality import SampleScorer

        scorer = SampleScorer()
    results = compare(loaded, modes, settings, scorer)
    meta = {"model": model, "source": loaded.source, "class": type(loaded.transformer).__name__,
            "params": sum(p.numel() for p in loaded.transformer.parameters()),
            "training_steps": loaded.info.get("training", {}).get("steps"),
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min_before_after": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]}
    written = write_outputs(results, args.out, settings=settings, meta=meta)
    print(format_table(results))
    print(f"\nwrote {', '.join(str(p) for p in written.values())} ({meta['wall_s']:.0f} s)")
    return 0


def _is_digits_model(loaded: Any) -> bool:
    cfg = loaded.transformer.config
    return (loaded.vae is None and getattr(cfg, "in_channels", None) == 1 and getattr(cfg, "sample_size", None) == 32
            and getattr(cfg, "num_embeds_ada_norm", None) == 10)


def run(args: argparse.Namespace) -> int:
    """Run ``fxdit demo``."""
    from fxdit.apps.demo import select_modes

    return execute(args, select_modes(args.modes), args.model)
