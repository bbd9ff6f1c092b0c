"""``fxdit eval``: the demo's comparison for any model and any fxdit options.

``--model`` takes a shipped name (``demo-dit``) or a local diffusers folder: a transformer folder
(DiTTransformer2DModel, PixArtTransformer2DModel, ... written by ``save_pretrained``) or a pipeline folder
(``model_index.json`` with ``transformer/``, ``scheduler/`` and optionally ``vae/``, whose decoder then
turns latents into the compared images). ``--options`` is the JSON of the fxdit options to evaluate; in it,
``"cache": {"factors": "svd"}`` (or ``"svd:<rank>"``) means "compute SVD factors for this model now".
The table always holds eager, inductor, the evaluated config, plain reuse at the same schedule, fewer-step
DDIM at equal MACs and the peer caches (or why they do not apply).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fxdit.commands.demo import add_common, execute

__all__ = ["add_parser", "run", "modes_for"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fxdit eval``."""
    p = subparsers.add_parser("eval", help="compare a fxdit config with eager, inductor and baselines on any DiT",
                              description=__doc__)
    p.add_argument("--model", required=True, help="shipped model name or local diffusers folder")
    p.add_argument("--options", default="{}", help="fxdit options as JSON (default {})")
    add_common(p, steps=20, per_class=1)
    return p


def modes_for(options: dict[str, Any]) -> list[Any]:
    """The rows of an evaluation of ``options`` (parsed JSON)."""
    from fxdit.apps.demo import MODES, Mode, SvdFactors
    from fxdit.config import FxditConfig

    options = json.loads(json.dumps(options))
    cache = options.get("cache")
    if isinstance(cache, dict) and isinstance(cache.get("factors"), str) and cache["factors"].startswith("svd"):
        rank = cache["factors"].partition(":")[2]
        cache["factors"] = SvdFactors(int(rank) if rank else None)
    FxditConfig.from_options({k: v for k, v in options.items() if k != "cache"})  # validate early
    evaluated = Mode("fxdit (evaluated)", "fxdit", options, description="fxdit with --options " + json.dumps(
        options, default=lambda v: f"svd rank {v.rank}" if isinstance(v, SvdFactors) else str(v)))
    schedule = cache.get("schedule", {"period": 2}) if isinstance(cache, dict) else {"period": 2}
    reuse = Mode("plain reuse", "fxdit", {"cache": {"mode": "reuse", "schedule": schedule}},
                 description="baseline: plain reuse at the evaluated schedule")
    fewer = Mode("fewer-step DDIM (equal MACs)", "inductor", steps="equal-macs:" + evaluated.name,
                 description="baseline: plain DDIM with the step count whose MACs equal the evaluated config's")
    rows = [MODES["eager"], MODES["inductor"], evaluated, reuse, fewer]
    rows += [m for m in MODES.values() if m.backend in ("diffusers-cache", "cache-dit")]
    return rows


def run(args: argparse.Namespace) -> int:
    """Run ``fxdit eval``."""
    from fxdit.errors import FxditError

    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        raise FxditError(f"--options={args.options!r} is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise FxditError(f"--options={args.options!r}; expected a JSON object")
    return execute(args, modes_for(options), args.model)
