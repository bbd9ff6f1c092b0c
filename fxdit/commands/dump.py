"""``fxdit dump``: compile a model with the fxdit backend once and write the graph dump.

    fxdit dump --model dit-tiny --out fxdit_dump
    fxdit dump --model dit-tiny --shape 32x32 --batch 4 --options '{"attention": {"mode": "grat-b"}}'
    fxdit dump --model mypkg.models:make_model --out dump

For each graph Dynamo produces, ``OUT/graph_NNN/`` gets the graph as traced, the graph before and after each
pass, and ``report.md`` (pass reports, attention sites, blocks and linear layers, token grid, cost table); see
:mod:`fxdit.dump`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["add_parser", "run", "parse_shape", "merge_options"]

_EPILOG = """\
examples:
  fxdit dump --model dit-tiny --out fxdit_dump
  fxdit dump --model dit-video-tiny --shape 8x16x16
  fxdit dump --model dit-tiny --shape 64x64 --options '{"attention": {"mode": "grat-b", "group": [8, 8]}}'
  fxdit dump --model my_package.models:make_spec   # factory() returns a ModelSpec or (model, args, kwargs)
  fxdit dump --list-models
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fxdit dump``."""
    p = subparsers.add_parser(
        "dump",
        help="compile a model once with the fxdit backend and write graphs, pass reports and cost tables",
        description="Compile a model with torch.compile(backend='fxdit') with a dump directory, run it once "
                    "under torch.no_grad(), and write, for every graph Dynamo produced, OUT/graph_NNN/: the "
                    "graph as traced (00_input.py), the graph before and after each pass, and report.md (what "
                    "each pass matched, rewrote and skipped; attention sites; blocks and linear layers with "
                    "roles; the token grid; MACs and bytes per op class as sympy expressions over batch B and "
                    "tokens N and as numbers). Passes run with on_pass_error='raise', so a failing pass is "
                    "reported instead of silently skipped.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="NAME|module:factory",
                   help="a shipped model name (see --list-models) or 'package.module:factory', where factory() "
                        "returns an fxdit.apps.models.ModelSpec or a (model, args, kwargs) tuple")
    p.add_argument("--out", metavar="DIR", default="fxdit_dump",
                   help="dump directory (default: %(default)s); graphs go to DIR/graph_NNN/")
    p.add_argument("--shape", metavar="HxW|TxHxW", type=parse_shape,
                   help="input size of a shipped model, in latent pixels: '32x32' for an image latent, '8x16x16' "
                        "for a video latent (T x H x W); the token grid is this size divided by the patch. Sets "
                        "DiTConfig.input_size for the reference DiTs, [frames,] height, width for SD3/Hunyuan "
                        "Video/Wan, the packed token grid (grid_h x grid_w) for Flux, and a square sample_size "
                        "for diffusers DiT/PixArt")
    p.add_argument("--batch", type=int, default=2,
                   help="batch size of the example inputs of a shipped model (default: %(default)s, so the batch "
                        "dim is told apart from size-1 dims in the cost table)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and inputs (default: 0)")
    p.add_argument("--options", metavar="JSON",
                   help="fxdit backend options as a JSON object, or a path to a .json file; merged over "
                        "{\"dump_dir\": OUT, \"on_pass_error\": \"raise\"} (nested keys merge)")
    p.add_argument("--list-models", action="store_true", help="list the shipped model names and exit")
    return p


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x32"`` → ``(32, 32)``, ``"8x16x16"`` → ``(8, 16, 16)`` (for ``--shape``)."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected HxW or TxHxW with positive integers, "
                                         "e.g. 32x32 or 8x16x16")
    return shape


def merge_options(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested mappings merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_options(out[key], value)
        else:
            out[key] = value
    return out


def _user_options(text: str | None) -> dict[str, Any]:
    from fxdit.errors import FxditError

    if not text:
        return {}
    source = "--options"
    if not text.lstrip().startswith("{") and os.path.isfile(text):
        source = f"--options file {text!r}"
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FxditError(f"{source}: not valid JSON ({exc}); expected an object such as "
                         "'{\"attention\": {\"mode\": \"grat-b\"}}'") from exc
    if not isinstance(value, dict):
        raise FxditError(f"{source}={value!r}; expected a JSON object of backend options")
    return value


def _shape_overrides(shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Candidate build overrides for ``--shape``, tried in order until the model's builder accepts one.

    The shipped builders name their input size differently (the reference DiT: ``input_size``; SD3, Hunyuan
    Video, Wan: ``[frames,] height, width``; Flux: the packed token grid ``grid_h, grid_w``; diffusers DiT and
    PixArt: a square ``sample_size``); the first set whose keys a builder accepts is used.
    """
    out: list[dict[str, Any]] = [{"input_size": tuple(shape)}]
    if len(shape) == 3:
        out.append(dict(zip(("frames", "height", "width"), shape)))
    else:
        out.append(dict(zip(("height", "width"), shape)))
        out.append({"grid_h": shape[0], "grid_w": shape[1]})
        if shape[0] == shape[1]:
            out.append({"sample_size": shape[0]})
    return out


def _model_spec(args: argparse.Namespace) -> Any:
    from fxdit.apps import models
    from fxdit.errors import FxditError

    spec = args.model
    if spec in models.names():
        if args.shape is None:
            return models.build(spec, batch=args.batch, seed=args.seed)
        tried = []
        for overrides in _shape_overrides(tuple(args.shape)):
            try:
                return models.build(spec, batch=args.batch, seed=args.seed, **overrides)
            except FxditError as exc:
                if f"override {next(iter(overrides))!r}" not in str(exc):
                    raise  # the builder took the keys but rejected the values: that message is the useful one
                tried.append(", ".join(overrides))
        raise FxditError(f"--shape {'x'.join(map(str, args.shape))}: model {spec!r} takes no input size override "
                         f"(tried: {'; '.join(tried)})")
    if ":" in spec and args.shape is not None:
        raise FxditError(f"--shape applies to shipped model names only; {spec!r} is a module:factory model, "
                         "whose factory makes its own inputs")
    return models.resolve(spec)


def _shapes(spec: Any) -> str:
    import torch

    parts = []
    for i, a in enumerate(spec.args):
        if isinstance(a, torch.Tensor):
            parts.append(f"arg{i} {tuple(a.shape)}")
    for k, a in spec.kwargs.items():
        if isinstance(a, torch.Tensor):
            parts.append(f"{k} {tuple(a.shape)}")
    return ", ".join(parts) or "no tensor inputs"


def _total_cost(dump_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(dump_dir, "cost.json"), encoding="utf-8") as f:
            return json.load(f)["graph"]["total"]
    except (OSError, ValueError, KeyError):
        return None


def run(args: argparse.Namespace) -> int:
    """Compile, run once, print a summary. Raises ``FxditError`` on bad input (the CLI prints it)."""
    from fxdit.errors import FxditError

    if args.list_models:
        from fxdit.apps import models

        for name in models.names():
            print(name)
        return 0
    if not args.model:
        raise FxditError("--model is required: a shipped name (fxdit dump --list-models) or 'module:factory'")
    if args.batch < 1:
        raise FxditError(f"--batch={args.batch}; expected an integer >= 1")

    import torch

    import fxdit
    from fxdit.config import FxditConfig

    options = merge_options({"dump_dir": args.out, "on_pass_error": "raise"}, _user_options(args.options))
    FxditConfig.from_options(options)  # validate before building the model
    spec = _model_spec(args)
    os.makedirs(args.out, exist_ok=True)
    compiled = torch.compile(spec.model, backend="fxdit", options=options)
    with torch.no_grad():
        spec.run(compiled)
    records = fxdit.reports(spec.model)

    print(f"fxdit dump: {spec.name}" + (f" ({spec.description})" if spec.description else ""))
    print(f"  inputs: {_shapes(spec)}")
    print(f"  {len(records)} graph(s) compiled; dump in {os.path.abspath(args.out)}")
    for rec in records:
        s = rec.summary
        grid = s.get("token_grid")
        print(f"  graph_{rec.graph_id:03d}: {s.get('attention_sites', 0)} attention sites, {s.get('blocks', 0)} "
              f"blocks, {s.get('linears', 0)} linears in blocks, token grid {grid if grid is not None else '-'}")
        for r in rec.reports:
            print(f"    {r.summary()}")
        if rec.dump_dir:
            total = _total_cost(rec.dump_dir)
            if total:
                print(f"    MACs: {total['macs_expr']} = {total['macs']:,} at the traced shape")
            print(f"    report: {os.path.join(rec.dump_dir, 'report.md')}")
    exp = getattr(spec, "expected", None)
    if exp is not None:
        print(f"  expected for this model: {exp.attention_sites} attention sites, {exp.blocks} blocks, "
              f"token grid {exp.token_grid}")
    return 0
