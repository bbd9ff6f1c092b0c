"""``fxdit calibrate``: low-rank factors for increment-calibrated caching (ICC), written to a safetensors file.

    fxdit calibrate --model dit-tiny --method svd --rank 32 --out dit_tiny_r32.safetensors
    fxdit calibrate --model demo-dit --method cd-svd --rank 64 --samples 64 --out demo_cd64.safetensors
    fxdit calibrate --model mypkg.models:make_spec --method ca-svd --energy 0.99 --out f.safetensors

Calibration data for ``ca-svd``/``cd-svd``:

* Models with a sampler (the shipped ``demo-dit`` or a diffusers DiT/PixArt ``save_pretrained`` folder, loaded
  with :func:`fxdit.apps.sampler.load_dit`): DDIM (η = 0) trajectories from seeded noise and random class labels, no
  classifier-free guidance (as ICC calibrates). ``ca-svd`` records every call; ``cd-svd`` differences consecutive
  calls of each trajectory. ``--samples`` is the number of trajectories.
* Other models (the shipped ``fxdit.apps.models`` names, ``module:factory``): no sampler is known, so random calls are
  drawn by :func:`fxdit.calibration.diffusion_calls`: the example call's latent is replaced by
  ``√ᾱ_t·x0 + √(1−ᾱ_t)·ε`` with ``x0, ε ~ N(0, I)`` and ``t`` drawn per sample from a 50-step grid of the DDPM
  linear-β schedule; ``cd-svd`` pairs each call with the same ``x0, ε`` at the previous grid timestep. The latent
  is the ``hidden_states``/``x``/``sample`` keyword or the first argument; the timestep the
  ``timestep``/``timesteps``/``t`` keyword or the second argument when it is a 0-/1-D tensor. ``--samples`` is
  the number of batch rows.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

__all__ = ["add_parser", "run"]

_EPILOG = """\
examples:
  fxdit calibrate --model dit-tiny --rank 32 --out dit_tiny_r32.safetensors
  fxdit calibrate --model dit-tiny --method cd-svd --energy 0.99 --samples 64 --out dit_tiny_cd.safetensors
  fxdit calibrate --model demo-dit --method cd-svd --rank 64 --samples 32 --steps 50 --out demo_cd64.safetensors
  fxdit calibrate --model my_package.models:make_spec --method ca-svd --out f.safetensors
"""

_LATENT_NAMES = ("hidden_states", "x", "sample")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fxdit calibrate``."""
    p = subparsers.add_parser(
        "calibrate",
        help="compute ICC low-rank factors (svd, ca-svd, cd-svd) for a model's cached linears",
        description="Find the cached linear layers of a model (q/k/v/qkv, attention output, MLP in/out of every "
                    "transformer block) by graph analysis and factorise each weight W ≈ A·B with a plain, "
                    "channel-aware (ca-svd) or channel-delta (cd-svd) weighted SVD. The factors, their ranks and a "
                    "fingerprint of the weights go to a safetensors file for cache.factors. "
                    "See the module docstring (fxdit.commands.calibrate) for the calibration data used.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="NAME|module:factory|FOLDER",
                   help="a shipped model name (fxdit.apps.models names, or demo-dit), 'package.module:factory' "
                        "returning a ModelSpec or (model, args, kwargs), or a diffusers save_pretrained folder")
    p.add_argument("--method", default="svd", choices=("svd", "ca-svd", "cd-svd"),
                   help="factorisation (default: %(default)s; ca-/cd-svd need calibration calls, see above)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, default=None,
                      help="rank of every factor pair (default 128 unless --energy is given)")
    size.add_argument("--energy", type=float, default=None,
                      help="per-layer energy budget in (0, 1]: smallest rank keeping this share of sum(sigma^2)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    p.add_argument("--samples", type=int, default=256,
                   help="calibration samples: batch rows of random calls, or trajectories for models with a "
                        "sampler (default: %(default)s, as ICC)")
    p.add_argument("--batch", type=int, default=16, help="batch size of calibration calls (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50,
                   help="timestep grid / DDIM steps used for calibration calls (default: %(default)s, as ICC)")
    p.add_argument("--qkv", default="separate", choices=("separate", "joint"),
                   help="fused qkv weights: one factor pair per q, k, v (default) or one for the fused weight")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="SVD dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the model (shipped names) and calibration noise")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _find(call: Any, names: tuple[str, ...], position: int, max_dim: int | None = None) -> int | str | None:
    import torch

    args, kwargs = call
    for name in names:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name
    if position < len(args) and isinstance(args[position], torch.Tensor):
        if max_dim is None or args[position].dim() <= max_dim:
            return position
    return None


def _spec_data(spec: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(example, calib_inputs)`` for a ModelSpec-style model: random diffusion calls."""
    import torch

    from fxdit import calibration
    from fxdit.errors import FxditError

    example = (tuple(spec.args), dict(spec.kwargs))
    if args.method == "svd":
        return example, None
    latent = _find(example, _LATENT_NAMES, 0)
    if latent is None:
        raise FxditError(f"--model {args.model}: cannot find the latent input (a 'hidden_states'/'x'/'sample' "
                         "keyword or a first positional tensor) to draw calibration noise for")
    timestep = _find(example, _TIMESTEP_NAMES, 1, max_dim=1)
    lat = calibration._locate(example, latent, "latent")
    if lat.shape[0] != args.batch:  # re-batch the example: repeat/cut every batch-first tensor
        n0 = lat.shape[0]

        def rebatch(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n0:
                reps = math.ceil(args.batch / n0)
                return v.repeat(reps, *([1] * (v.dim() - 1)))[: args.batch]
            return v

        example = (tuple(rebatch(a) for a in example[0]), {k: rebatch(v) for k, v in example[1].items()})
    data = calibration.diffusion_calls(example, args.samples, pairs=args.method == "cd-svd", latent=latent,
                                       timestep=timestep, steps=args.steps, seed=args.seed)
    return example, data


def _sampler_data(loaded: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(example, run_trajectories)`` for a diffusers model with a sampler: DDIM trajectories without CFG."""
    import importlib

    import torch

    from fxdit import calibration

    sampling = importlib.import_module("fxdit.apps.sampler")
    model = loaded.transformer
    shape = sampling.sample_shape(model)
    den = sampling.Denoiser.for_model(model, seed=args.seed)
    n_classes = max(1, den.null_class) if den.kind == "class" else 1
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn((args.batch, *shape), generator=gen)
    labels0 = torch.randint(0, n_classes, (args.batch,), generator=gen)
    t0 = torch.full((args.batch,), 999, dtype=torch.long)
    example = den.example_call(x0, t0, labels0)
    if args.method == "svd":
        return example, None

    def run_trajectories(m: Any) -> None:
        d = sampling.Denoiser.for_model(m, seed=args.seed)
        done, run_index = 0, 0
        while done < args.samples:
            n = min(args.batch, args.samples - done)
            g = torch.Generator().manual_seed(args.seed + 1 + run_index)
            labels = torch.randint(0, n_classes, (n,), generator=g)
            noise = torch.randn((n, *shape), generator=g)
            calibration.new_trajectory()
            sampling.ddim_sample(d, labels, noise, loaded.scheduler, steps=args.steps, guidance_scale=1.0,
                                 progress=False)
            done += n
            run_index += 1

    return example, run_trajectories


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(model, example, calib_inputs)``."""
    from fxdit.apps import models

    if args.model in models.names():
        spec = models.build(args.model, batch=args.batch, seed=args.seed)
        return (spec.model, *_spec_data(spec, args))
    import importlib

    sampling = importlib.import_module("fxdit.apps.sampler")
    if os.path.isdir(args.model) or args.model in sampling.SHIPPED_MODELS:
        loaded = sampling.load_dit(args.model)
        return (loaded.transformer, *_sampler_data(loaded, args))
    spec = models.resolve(args.model)
    return (spec.model, *_spec_data(spec, args))


def run(args: argparse.Namespace) -> int:
    """Calibrate and save; prints a summary. Raises ``FxditError`` on bad input (the CLI prints it)."""
    from fxdit.errors import FxditError

    for name in ("samples", "batch", "steps"):
        if getattr(args, name) < 1:
            raise FxditError(f"--{name}={getattr(args, name)}; expected an integer >= 1")
    if args.method == "cd-svd" and args.steps < 2:
        raise FxditError(f"--steps={args.steps}; cd-svd needs at least 2 steps")
    rank = args.rank if args.rank is not None or args.energy is not None else 128
    if rank is not None and rank < 1:
        raise FxditError(f"--rank={rank}; expected an integer >= 1")
    if args.energy is not None and not 0.0 < args.energy <= 1.0:
        raise FxditError(f"--energy={args.energy}; expected a number in (0, 1]")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FxditError(f"--out {args.out!r}: directory {out_dir!r} does not exist")

    import torch

    from fxdit.calibration import calibrate

    model, example, data = _load(args)
    factors = calibrate(model, data, method=args.method, rank=rank, energy=args.energy, qkv=args.qkv,
                        example=example, num_samples=args.samples, progress=not args.no_progress,
                        dtype=getattr(torch, args.dtype))
    factors.save(args.out)
    ranks = sorted(factors.ranks.values())
    params = sum(a.numel() + b.numel() for a, b in (factors.get(k) for k in factors.keys()))
    print(f"fxdit calibrate: {args.model}: {args.method}, {len(factors.modules())} linears, {len(factors)} factor "
          f"pairs, rank {ranks[0]}..{ranks[-1]} (median {ranks[len(ranks) // 2]}), {len(factors.exact)} exact, "
          f"{params / 1e6:.2f} M factor parameters")
    print(f"  wrote {os.path.abspath(args.out)}")
    return 0
