"""``fxdit tune``: search fxdit configurations of a model and keep the fastest that stays within a quality gate.

    fxdit tune --out tune_out                                   # the shipped demo model, PSNR > 30 dB
    fxdit tune --model path/to/dit --steps 30 --psnr-gate 28 --ssim-gate 0.9 --out tune_out
    fxdit tune --quick --out tune_out                           # a small space (plain SVD, no GRAT)

It samples the model (DDIM, classifier-free guidance) in full and under each candidate from the same noise,
screens candidates for quality on a few samples, times the fastest that pass (median of several runs after a
warm-up), checks them on held-out seeds and labels, and writes to ``--out``: ``options.json`` (for
``torch.compile(..., backend="fxdit", options=json.load(...))`` or ``fxdit eval --options "$(cat options.json)"``),
``factors.safetensors`` (when the choice caches), ``tune_report.json``, ``tune_report.md`` (every measured
candidate) and ``pareto.png`` (time vs quality). See ``fxdit.apps.tune`` for the search.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run", "settings_from", "space_from"]


def _list(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values; got {text!r}") from exc
    return parse


def _groups(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(x) for x in g.lower().split("x")) for g in text.split(",") if g.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected groups such as 4x4,8x8; got {text!r}") from exc


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fxdit tune``."""
    p = subparsers.add_parser("tune", help="find the fastest fxdit configuration within a quality gate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo-dit", help="shipped model name or local diffusers folder "
                   "(default %(default)s)")
    p.add_argument("--out", default="tune_out", help="output folder (default %(default)s)")
    g = p.add_argument_group("sampling and gate")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps of the full computation (default %(default)s)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default 1.5)")
    g.add_argument("--psnr-gate", type=float, default=30.0, help="PSNR (dB) to exceed vs full (default %(default)s)")
    g.add_argument("--ssim-gate", type=float, default=0.90, help="SSIM to exceed vs full (default %(default)s)")
    g.add_argument("--samples", type=int, default=2, help="samples per batch, search and held-out (default 2)")
    g.add_argument("--holdout-batches", type=int, default=2, help="held-out batches (default %(default)s)")
    g.add_argument("--classes", type=_list(int), default=None, help="class labels to cycle (default: all)")
    g.add_argument("--seed", type=int, default=0, help="first search seed (default %(default)s)")
    s = p.add_argument_group("search")
    s.add_argument("--quick", action="store_true", help="small space: svd rank 16, periods 2,3, no GRAT")
    s.add_argument("--budget", type=float, default=600.0, help="seconds for the quality screen (default 600)")
    s.add_argument("--methods", type=_list(str), default=None, help="ICC methods (default svd,ca-svd,cd-svd)")
    s.add_argument("--ranks", type=_list(int), default=None, help="ICC ranks (default 16,32)")
    s.add_argument("--energies", type=_list(float), default=None, help="ICC energy budgets (default none)")
    s.add_argument("--periods", type=_list(int), default=None, help="full-step periods (default 2,3,4)")
    s.add_argument("--warmups", type=_list(int), default=None, help="warm-up steps (default 0,2)")
    s.add_argument("--cooldowns", type=_list(int), default=None, help="cool-down steps (default 0,2)")
    s.add_argument("--attention", type=_list(str), default=None, help="GRAT modes (default grat-b,grat-x; "
                   "'none' for dense only)")
    s.add_argument("--groups", type=_groups, default=None, help="GRAT groups (default 4x4)")
    s.add_argument("--radii", type=_list(int), default=None, help="GRAT-B radii (default 1)")
    s.add_argument("--layers", type=_list(str), default=None, help="GRAT layers: all,inner (default all)")
    s.add_argument("--step-fractions", type=_list(float), default=None, help="step counts as fractions of --steps "
                   "(default 1,0.8,0.6)")
    s.add_argument("--finalists", type=int, default=3, help="candidates timed in full (default %(default)s)")
    s.add_argument("--reps", type=int, default=3, help="timed runs per finalist (default %(default)s)")
    s.add_argument("--tie-tolerance", type=float, default=0.10, help="relative time tie (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from(args: argparse.Namespace) -> Any:
    """``TuneSettings`` from parsed arguments (``FxditError`` naming the flag on a bad value)."""
    from fxdit.apps.quality import Gates
    from fxdit.apps.sampler import DEFAULT_GUIDANCE
    from fxdit.apps.tune import TuneSettings
    from fxdit.errors import FxditError

    flags = {"steps": "--steps", "search_samples": "--samples", "holdout_batches": "--holdout-batches",
             "finalists": "--finalists", "reps": "--reps", "tie_tolerance": "--tie-tolerance",
             "budget_s": "--budget", "classes": "--classes", "guidance_scale": "--guidance"}
    try:
        return TuneSettings(steps=args.steps, guidance_scale=DEFAULT_GUIDANCE if args.guidance is None
                            else args.guidance, gates=Gates(args.psnr_gate, args.ssim_gate),
                            search_samples=args.samples, holdout_batches=args.holdout_batches, classes=args.classes,
                            seed=args.seed, finalists=args.finalists, reps=args.reps,
                            tie_tolerance=args.tie_tolerance, budget_s=args.budget, progress=not args.no_progress)
    except FxditError as exc:
        raise FxditError(_flagged(str(exc), "settings.", flags)) from None


def space_from(args: argparse.Namespace) -> Any:
    """``TuneSpace`` from parsed arguments: ``--quick``'s space or the default, with the given lists replaced."""
    import dataclasses

    from fxdit.apps.tune import QUICK_SPACE, TuneSpace
    from fxdit.errors import FxditError

    base = QUICK_SPACE if args.quick else TuneSpace()
    changes: dict[str, Any] = {}
    for arg, name in (("methods", "methods"), ("ranks", "ranks"), ("energies", "energies"), ("periods", "periods"),
                      ("warmups", "warmups"), ("cooldowns", "cooldowns"), ("attention", "attention_modes"),
                      ("groups", "groups"), ("radii", "radii"), ("layers", "layers"),
                      ("step_fractions", "step_fractions")):
        value = getattr(args, arg)
        if value is not None:
            changes[name] = () if arg == "attention" and value == ("none",) else value
    flags = {name: "--" + arg.replace("_", "-") for arg, name in (
        ("methods", "methods"), ("ranks", "ranks"), ("energies", "energies"), ("periods", "periods"),
        ("warmups", "warmups"), ("cooldowns", "cooldowns"), ("attention", "attention_modes"), ("groups", "groups"),
        ("radii", "radii"), ("layers", "layers"), ("step_fractions", "step_fractions"))}
    try:
        return dataclasses.replace(base, **changes)
    except FxditError as exc:
        raise FxditError(_flagged(str(exc), "space.", flags)) from None


def _flagged(message: str, prefix: str, flags: dict[str, str]) -> str:
    """``"settings.steps=0; expected ..."`` → ``"--steps (settings.steps)=0; expected ..."``."""
    for name, flag in flags.items():
        if message.startswith(f"{prefix}{name}="):
            return f"{flag} ({prefix}{name})" + message[len(prefix + name):]
    return message


def run(args: argparse.Namespace) -> int:
    """Run ``fxdit tune``."""
    import os

    from fxdit.apps.tune import tune, write_outputs
    from fxdit.errors import FxditError

    settings = settings_from(args)
    space = space_from(args)
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise FxditError(f"--out {args.out!r}: directory {parent!r} does not exist")
    result = tune(args.model, settings, space)
    written = write_outputs(result, args.out)
    b = result.best
    sp = result.speedup_vs_inductor
    print(f"fxdit tune: {args.model}: chosen {b.label}")
    print(f"  median {b.median_s:.2f} s vs plain inductor {result.inductor.median_s:.2f} s"
          + (f" ({sp:.2f}x)" if sp else "")
          + f"; held-out {b.holdout_psnr_db:.1f} dB / SSIM {b.holdout_ssim:.3f} "
          f"(gate > {settings.gates.psnr_db} dB, > {settings.gates.ssim})")
    screened = sum(1 for r in result.candidates if r.status == "ok")
    print(f"  {screened} candidate runs screened, {len(result.candidates) - screened} skipped or failed; "
          f"{result.elapsed_s:.0f} s" + (" (budget spent)" if result.budget_exhausted else ""))
    print(f"  sample with --steps {b.candidate.steps}; wrote {', '.join(str(p) for p in written.values())}")
    return 0
