"""Coverage: every ``*Transformer*Model`` class of the installed diffusers, built tiny and compiled with fxdit.

For each class exported by ``diffusers`` whose name matches ``Transformer.*Model``:

1. **Build** it from the config of its case in ``tools/coverage_cases.py`` (the small configuration of the
   class's diffusers model test), else from a tiny config derived generically from its ``__init__`` defaults
   (:func:`tiny_config`): size-like arguments are shrunk by rules keyed by the argument *name* and by how their
   default relates to the default hidden size and head dim (:data:`SHRINK`), never by class. Every parameter is
   re-drawn from a seeded normal (diffusers zero-initialises some output layers, which would hide errors).
2. **Inputs** come from the case's input builder (the dummy inputs of the diffusers test, at an 8×8 token grid),
   else from ``forward``'s signature through one table keyed by argument name (:data:`INPUTS`); the latent input
   is then tried in the layouts of :data:`LATENT_LAYOUTS` (image, video, packed tokens) until the eager model runs.
   A required argument without a rule, or a model no layout runs, is listed with the reason.
3. **Lossless**: ``torch.compile(backend="fxdit")`` with every lossy option off; the max ``|compiled − eager|``
   is recorded, with the attention sites and blocks fxdit found and the reasons for sites it left alone.
4. **Lossy** (informative): GRAT-B with 1×2×2 groups (``min_tokens=0``, :data:`GRAT_OPTIONS`) and ICC with rank-4
   plain-SVD factors, one full and one cached call under ``fxdit.sampling``; records sites rewritten,
   linears/blocks cached and skip reasons (fxdit's own). Its error against eager is lossy by design and only
   reported.
5. **GRAT oracle**: where GRAT rewrote sites, GRAT alone is compared with ``tests/grat_oracle.py``: the eager model
   whose attention calls (those the oracle's own rule selects) run dense SDPA under the grouped mask built from the
   case's token grid and text side, not from anything fxdit inferred (:func:`_oracle_run`).

fxdit must never raise on a model, never change a result in lossless mode, and a GRAT rewrite must equal the
oracle: a class where fxdit raises (and the eager model runs), where the lossless output differs from eager, or
where GRAT differs from the oracle is a defect, flagged in the table.

Usage::

    python tools/coverage.py                          # every class, inductor, writes benchmarks/coverage.md
    python tools/coverage.py --no-inductor            # the rewritten graphs run as Python (no C++ compile)
    python tools/coverage.py --classes DiTTransformer2DModel,FluxTransformer2DModel --no-lossy
    python tools/coverage.py --no-inductor --only CogVideoXTransformer3DModel --out /tmp/c.md --json /tmp/c.json
    python tools/coverage.py --no-inductor --resume --rerun FluxTransformer2DModel   # refresh rows of the json
    python tools/coverage.py --no-inductor --inductor-subset DiTTransformer2DModel,SanaTransformer2DModel

``tests/test_coverage.py`` runs a subset by default and the whole sweep under ``-m slow``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

log = logging.getLogger("tools.coverage")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, path: str) -> Any:
    """Import the file ``path`` as module ``name`` (``tools/`` and ``tests/`` are folders, not packages)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: The per-class cases (``tools/coverage_cases.py``): configs, inputs and token layouts from diffusers' tests.
cases = _load("fxdit_tools_coverage_cases", os.path.join(_ROOT, "tools", "coverage_cases.py"))


def grat_oracle() -> Any:
    """``tests/grat_oracle.py``: the eager model with the dense grouped mask (no fxdit GRAT code)."""
    return _load("grat_oracle", os.path.join(_ROOT, "tests", "grat_oracle.py"))

#: Sizes of the tiny models and their inputs.
HEADS = 2
HEAD_DIM = 32
HIDDEN = HEADS * HEAD_DIM
TEXT_DIM = 32  # text-encoder / pooled widths (any size-like default above BIG)
BIG = 256
SAMPLE = 16  # latent height/width
FRAMES = 2  # latent frames of video models
TEXT_TOKENS = 8
TEXT_PAD = 2  # padded text tokens in encoder_attention_mask
BATCH = 2

# ---------------------------------------------------------------------------------------------------------------
# Tiny configs
# ---------------------------------------------------------------------------------------------------------------


class Unbuildable(Exception):
    """The class cannot be built tinily (the message is the reason)."""


#: Argument-name rules, tried in order: (regex on the argument name, new value or function of the default).
#: Only int defaults are touched by the numeric rules; everything not matched keeps its default.
SHRINK: tuple[tuple[str, Any], ...] = (
    (r"^num_layers$|^depth$|^n_layers$|^num_blocks$", 2),
    (r"^num_.*layers$|^.*_depth$|^num_.*blocks$", 1),
    (r"(^|_)num_attention_heads$|(^|_)num_heads$|^heads$|^n_heads$", HEADS),
    (r"(^|_)num_(key_value|kv)_heads$|^n_kv_heads$", None),  # set with the heads (ratio kept)
    (r"^attention_head_dim$|^head_dim$", HEAD_DIM),
    (r"^sample_size$|^input_size$", SAMPLE),
    (r"^sample_height$|^sample_width$|^height$|^width$", SAMPLE),
    (r"^num_frames$|^sample_frames$", FRAMES),
)

#: Values for arguments whose default is ``None`` but which the constructor needs (by argument name).
NONE_DEFAULTS: dict[str, Any] = {"in_channels": HIDDEN}

#: Names of the hidden-size argument for classes that have no head-dim argument.
HIDDEN_NAMES = ("hidden_size", "dim", "inner_dim", "model_dim", "d_model", "hidden_dim")


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rule(name: str) -> tuple[bool, Any]:
    for pattern, value in SHRINK:
        if re.search(pattern, name):
            return True, value
    return False, None


def _scale_axes(axes: tuple[int, ...], old: int, new: int) -> tuple[int, ...] | None:
    """Rope axes that sum to the old head dim, rescaled to sum to the new one with even parts."""
    if old <= 0 or new % 2:
        return None
    scaled = [max(2, 2 * round(a * new / old / 2)) for a in axes]
    scaled[-1] += new - sum(scaled)
    return tuple(scaled) if all(a >= 2 and a % 2 == 0 for a in scaled) else None


def tiny_config(cls: type) -> dict[str, Any]:
    """A tiny config for ``cls`` from its ``__init__`` defaults, shrunk by argument name (see :data:`SHRINK`).

    Raises:
        Unbuildable: a required ``__init__`` argument has no default.
    """
    params = _init_params(cls)
    required = [k for k, p in params.items() if p.default is inspect.Parameter.empty]
    if required:
        raise Unbuildable(f"__init__ needs {required} (no defaults)")
    defaults = {k: p.default for k, p in params.items()}
    heads0 = next((defaults[k] for k in ("num_attention_heads", "num_heads", "heads", "n_heads")
                   if _is_int(defaults.get(k))), None)
    hd0 = next((defaults[k] for k in ("attention_head_dim", "head_dim") if _is_int(defaults.get(k))), None)
    hidden_name = next((k for k in HIDDEN_NAMES if _is_int(defaults.get(k))), None)
    if heads0 and hd0:
        hidden0, head_dim0 = heads0 * hd0, hd0
    elif heads0 and hidden_name:
        hidden0 = defaults[hidden_name]
        head_dim0 = hidden0 // heads0
    else:
        hidden0, head_dim0 = None, None
    cfg: dict[str, Any] = {}
    for name, default in defaults.items():
        if default is None and name in NONE_DEFAULTS:
            cfg[name] = NONE_DEFAULTS[name]
            continue
        matched, value = _rule(name)
        if matched:
            if value is None:  # kv heads: keep the ratio to the query heads
                if _is_int(default) and heads0:
                    cfg[name] = max(1, HEADS * default // heads0)
                continue
            if _is_int(default) or default is None:
                if _is_int(default) and value > default and name not in ("sample_size", "input_size"):
                    value = default
                cfg[name] = value
            elif isinstance(default, (tuple, list)) and all(_is_int(x) for x in default) and "size" in name:
                cfg[name] = type(default)([SAMPLE] * len(default))
            continue
        if name == hidden_name and hidden0:
            cfg[name] = HIDDEN
            continue
        if _is_int(default) and default > 0:
            if hidden0 and default == hidden0 and re.search(r"dim|size|channels", name):
                cfg[name] = HIDDEN
            elif hidden0 and default % hidden0 == 0 and 2 <= default // hidden0 <= 8 and re.search(r"dim|size", name):
                cfg[name] = HIDDEN * (default // hidden0)
            elif head_dim0 and default == head_dim0 and re.search(r"dim", name) and "rope" not in name:
                cfg[name] = HEAD_DIM
            elif default > BIG and re.search(r"_dim$|_channels$|_size$|_dims$|^dim_", name) \
                    and not re.search(r"max|len|vocab|num_", name):
                cfg[name] = TEXT_DIM
        elif isinstance(default, (tuple, list)) and default and all(_is_int(x) for x in default) and head_dim0:
            if sum(default) == head_dim0 and len(default) >= 2:
                axes = _scale_axes(tuple(default), head_dim0, HEAD_DIM)
                if axes is not None:
                    cfg[name] = type(default)(axes)
            elif sum(default) * 2 == head_dim0 and len(default) >= 2:  # rope axes over half the head dim
                axes = _scale_axes(tuple(2 * a for a in default), head_dim0, HEAD_DIM)
                if axes is not None:
                    cfg[name] = type(default)(a // 2 for a in axes)
    return cfg


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter (zero-initialised output layers would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif pname.endswith("weight"):
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny model of the diffusers class ``name`` (eval, float32, seeded) and the config it was built with:
    the config of its case in ``tools/coverage_cases.py`` when it has one, else :func:`tiny_config`.

    Raises:
        Unbuildable: with the reason.
    """
    import diffusers

    cls = getattr(diffusers, name)
    case = cases.CASES.get(name)
    cfg = dict(case.init) if case is not None and case.init is not None else tiny_config(cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = cls(**cfg)
        except Exception as exc:  # noqa: BLE001 - the model's own constructor
            raise Unbuildable(f"constructor: {type(exc).__name__}: {_short(exc)}") from exc
    model = model.eval().float()
    _redraw(model, seed)
    return model, cfg


# ---------------------------------------------------------------------------------------------------------------
# Example inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What an input rule sees: the model config, the batch, the latent layout being tried and its grid."""

    config: Any
    batch: int
    layout: str
    grid: tuple[int, int, int]

    def get(self, *names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(self.config, n, None) if not isinstance(self.config, dict) else self.config.get(n)
            if v is not None:
                return v
        return default

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


def _channels(c: Ctx) -> int:
    v = c.get("in_channels", "in_dim", "num_channels_latents", "latent_channels", "in_chans", "patch_dim",
              default=4)
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _patch(c: Ctx) -> int:
    p = c.get("patch_size", default=1)
    return int(p[-1] if isinstance(p, (tuple, list)) else p)


def _latent(c: Ctx) -> torch.Tensor:
    ch, b = _channels(c), c.batch
    t, h, w = c.grid
    if c.layout == "image":
        return torch.randn(b, ch, h, w)
    if c.layout == "video":
        return torch.randn(b, ch, t, h, w)
    if c.layout == "video_tc":  # (B, T, C, H, W)
        return torch.randn(b, t, ch, h, w)
    return torch.randn(b, t * h * w, ch)  # "packed": tokens already patchified


def _text_dim(c: Ctx) -> int:
    v = c.get("joint_attention_dim", "caption_channels", "text_dim", "text_embed_dim", "cross_attention_dim",
              "encoder_hidden_dim", "text_hidden_dim", "context_dim", "text_in_dim", "caption_dim", "cap_feat_dim",
              "encoder_dim", "text_states_dim", default=TEXT_DIM)
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _text(c: Ctx) -> torch.Tensor:
    return torch.randn(c.batch, TEXT_TOKENS, _text_dim(c))


def _text_mask(c: Ctx) -> torch.Tensor:
    m = torch.ones(c.batch, TEXT_TOKENS, dtype=torch.long)
    m[:, TEXT_TOKENS - TEXT_PAD:] = 0
    return m


def _pooled(c: Ctx) -> torch.Tensor:
    return torch.randn(c.batch, int(c.get("pooled_projection_dim", "pooled_dim", default=TEXT_DIM)))


def _timestep(c: Ctx) -> torch.Tensor:
    return torch.full((c.batch,), 500.0)


def _labels(c: Ctx) -> torch.Tensor:
    n = int(c.get("num_embeds_ada_norm", "num_classes", "class_dropout_prob", default=10))
    return torch.randint(0, max(1, n), (c.batch,))


def _img_ids(c: Ctx) -> torch.Tensor:
    _, h, w = c.grid
    p = _patch(c) if c.layout != "packed" else 1
    gh, gw = h // p, w // p
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :]
    return ids.reshape(gh * gw, 3)


def _txt_ids(c: Ctx) -> torch.Tensor:
    return torch.zeros(TEXT_TOKENS, 3)


def _guidance(c: Ctx) -> torch.Tensor | None:
    return torch.full((c.batch,), 3.5) if c.get("guidance_embeds") else None


def _added_cond(c: Ctx) -> dict[str, Any]:
    if c.get("use_additional_conditions"):
        px = float(SAMPLE * 8)
        return {"resolution": torch.tensor([[px, px]] * c.batch), "aspect_ratio": torch.tensor([[1.0]] * c.batch)}
    return {"resolution": None, "aspect_ratio": None}


def _size_cond(c: Ctx) -> torch.Tensor:
    return torch.tensor([[float(SAMPLE * 8)] * 2] * c.batch)


def _img_shapes(c: Ctx) -> list[list[tuple[int, int, int]]]:
    t, h, w = c.grid
    p = _patch(c) if c.layout != "packed" else 1
    return [[(t, h // p, w // p)]] * c.batch


#: forward argument name -> (rule making the value, pass it even when the argument is optional).
INPUTS: dict[str, tuple[Callable[[Ctx], Any], bool]] = {
    "hidden_states": (_latent, True),
    "x": (_latent, True),
    "sample": (_latent, True),
    "latents": (_latent, True),
    "encoder_hidden_states": (_text, True),
    "context": (_text, True),
    "timestep": (_timestep, True),
    "timesteps": (_timestep, True),
    "t": (_timestep, True),
    "class_labels": (_labels, True),
    "pooled_projections": (_pooled, True),
    "encoder_attention_mask": (_text_mask, True),
    "img_ids": (_img_ids, True),
    "txt_ids": (_txt_ids, True),
    "guidance": (_guidance, True),
    "added_cond_kwargs": (_added_cond, False),
    "encoder_hidden_states_mask": (_text_mask, True),
    "timestep_r": (_timestep, False),
    "r_timestep": (_timestep, False),
    "original_size": (_size_cond, True),
    "target_size": (_size_cond, True),
    "crop_coords": (lambda c: torch.zeros(c.batch, 2), True),
    "img_shapes": (_img_shapes, True),
    "return_dict": (lambda c: False, True),
}

#: Latent layouts tried in order, with the token grid (T, H, W) of the latent.
LATENT_LAYOUTS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("image", (1, SAMPLE, SAMPLE)),
    ("video", (FRAMES, SAMPLE, SAMPLE)),
    ("video_tc", (FRAMES, SAMPLE, SAMPLE)),
    ("packed", (1, 8, 8)),
)


def make_inputs(model: torch.nn.Module, layout: str, grid: tuple[int, int, int], batch: int = BATCH,
                seed: int = 1) -> tuple[tuple, dict[str, Any]]:
    """Keyword inputs for ``model.forward`` from :data:`INPUTS`.

    Raises:
        Unbuildable: a required argument has no rule.
    """
    params = {k: p for k, p in inspect.signature(model.forward).parameters.items()
              if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    ctx = Ctx(model.config, batch, layout, grid)
    kwargs: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, p in params.items():
            required = p.default is inspect.Parameter.empty
            rule = INPUTS.get(name)
            if rule is None:
                if required:
                    raise Unbuildable(f"forward needs {name!r} (no input rule)")
                continue
            make, always = rule
            if not (always or required):
                continue
            value = make(ctx)
            if value is None and not required:
                continue
            kwargs[name] = value
    return (), kwargs


def output_tensor(out: Any) -> torch.Tensor:
    from fxdit.apps.models import output_tensor as _out

    return _out(out)


def find_inputs(model: torch.nn.Module) -> tuple[str, tuple[int, int, int], tuple, dict[str, Any], torch.Tensor]:
    """The inputs of the model's case (layout ``"case"``, its token grid), else the first latent layout the eager
    model runs on: ``(layout, grid, args, kwargs, eager output)``.

    Raises:
        Unbuildable: no layout ran (the reason of each attempt).
    """
    case = cases.CASES.get(type(model).__name__)
    if case is not None and case.inputs is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            kwargs = case.inputs(model)
        try:
            with torch.no_grad():
                out = output_tensor(model(**kwargs))
        except Exception as exc:  # noqa: BLE001 - the model's own forward
            raise Unbuildable(f"eager forward failed on the case inputs: {type(exc).__name__}: {_short(exc)}") \
                from exc
        if not torch.isfinite(out).all():
            raise Unbuildable("non-finite eager output on the case inputs")
        return "case", case.grid, (), kwargs, out
    reasons = []
    for layout, grid in LATENT_LAYOUTS:
        args, kwargs = make_inputs(model, layout, grid)
        try:
            with torch.no_grad():
                out = output_tensor(model(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the model's own forward
            reasons.append(f"{layout}: {type(exc).__name__}: {_short(exc)}")
            continue
        if not torch.isfinite(out).all():
            reasons.append(f"{layout}: non-finite eager output")
            continue
        return layout, grid, args, kwargs, out
    raise Unbuildable("eager forward failed on every latent layout (" + "; ".join(reasons) + ")")


def _short(exc: BaseException, n: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Compiling and checking one class
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """What happened to one class.

    Attributes:
        cls: the diffusers class name.
        status: ``"ok"``; ``"not built"`` (cannot be built tinily, or its eager forward fails on our inputs);
            ``"torch.compile fails"`` (the same compile fails without fxdit: not fxdit's doing); ``"fxdit error"``,
            ``"wrong result"`` or ``"oracle mismatch"`` (defects of fxdit: GRAT rewrote sites whose result is not
            the oracle's).
        reason: why it is not ``"ok"``.
        layout, grid: the latent layout that ran and its latent grid ``(T, H, W)``.
        graphs: graphs Dynamo handed to fxdit (1 + graph breaks).
        sites: attention sites found; ``site_skips``: near misses of ``find_attention`` by reason.
        blocks, linears: transformer blocks found and their linear layers; ``roles``: linears per role.
        token_grid: the token grid fxdit inferred (first graph that has one).
        err, scale: max ``|compiled − eager|`` with lossy options off, and max ``|eager|``.
        lossy: the GRAT-B + ICC run (``grat_rewritten``, ``grat_skipped``, ``cached_linears``,
            ``cached_blocks``, ``plan_skipped``, ``err_full``, ``err_cached``, ``error``).
        oracle: GRAT alone against the oracle, when GRAT rewrote sites (see :func:`_oracle_run`).
        seconds: wall time for the class.
        commit: the checkout's HEAD when the class ran (``+dirty``: uncommitted changes under the fxdit sources).
    """

    cls: str
    status: str = "ok"
    reason: str = ""
    layout: str = ""
    grid: tuple[int, ...] | None = None
    graphs: int = 0
    sites: int = 0
    site_skips: dict[str, int] = field(default_factory=dict)
    blocks: int = 0
    linears: int = 0
    roles: dict[str, int] = field(default_factory=dict)
    token_grid: tuple[int, ...] | None = None
    err: float | None = None
    scale: float | None = None
    lossy: dict[str, Any] = field(default_factory=dict)
    oracle: dict[str, Any] = field(default_factory=dict)
    inductor: bool = True
    seconds: float = 0.0
    commit: str = ""


def _fresh() -> None:
    from fxdit import registry

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    registry.clear()


@contextlib.contextmanager
def without_inductor() -> Iterator[None]:
    """fxdit's backend with inductor left out: the rewritten graphs run as Python (``tests/conftest.py``)."""
    from fxdit import backend

    saved = backend.lower

    def lower(gm: Any, example_inputs: Any, cfg: Any) -> Any:
        consts = backend.lifted_constants(gm)
        return lambda *args: gm(*args, *consts)

    backend.lower = lower
    try:
        yield
    finally:
        backend.lower = saved


def _records(compiled: Any) -> list[Any]:
    import fxdit

    return fxdit.reports(compiled)


def _report(rec: Any, name: str) -> Any:
    return next((r for r in rec.reports if r.name == name), None)


def _merge(into: dict[str, int], more: Any) -> None:
    for k, v in dict(more or {}).items():
        into[k] = into.get(k, 0) + int(v)


def _plain_compile_fails(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], backend: str) -> str | None:
    """The error of the same ``torch.compile`` with ``backend`` instead of fxdit, or ``None`` if it works."""
    _fresh()
    try:
        with torch.no_grad():
            output_tensor(torch.compile(model, backend=backend)(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - attributing a failure
        return f"{type(exc).__name__}: {_short(exc)}"
    finally:
        _fresh()
    return None


def _fxdit_error(exc: BaseException) -> str:
    """A one-line description of an exception raised through torch.compile, with the innermost fxdit frame."""
    inner: BaseException = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    frames = [f for f in traceback.extract_tb(inner.__traceback__)
              if "/fxdit/" in f.filename or "/passes/" in f.filename or "/kernels/" in f.filename]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(inner).__name__}: {_short(inner)}{where}"


def checkout() -> str:
    """The short HEAD of the checkout, ``+dirty`` when ``fxdit/``, ``passes/`` or ``kernels/`` have uncommitted
    changes ("" outside a git checkout)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxdit", "passes", "kernels"], cwd=_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def wrong_tolerance(scale: float, inductor: bool) -> float:
    """The largest lossless ``|compiled − eager|`` that is rounding, not a wrong result.

    Inductor reorders float32 reductions (a few ulps of the largest activations through every layer); without
    inductor the rewritten graph runs the same ATen ops as eager.
    """
    return (1e-3 if inductor else 1e-4) * max(1.0, scale)


def check_class(name: str, *, inductor: bool = True, lossy: bool = True, lossy_inductor: bool = False,
                seed: int = 0) -> Row:
    """Build ``name`` tinily, run it eager, compile it with fxdit lossless (and lossy), and return its row.

    Args:
        name: a diffusers class name.
        inductor: compile the lossless run with inductor (else the rewritten graph runs as Python).
        lossy: also run GRAT-B + ICC.
        lossy_inductor: compile the lossy run with inductor too (ICC compiles two graph variants).
        seed: seed of the weights.
    """
    import fxdit

    start = time.perf_counter()
    row = Row(name, inductor=inductor, commit=checkout())
    try:
        model, _ = build_model(name, seed)
        row.layout, row.grid, args, kwargs, eager = find_inputs(model)
    except Unbuildable as exc:
        row.status, row.reason = "not built", str(exc)
        row.seconds = time.perf_counter() - start
        return row
    row.scale = float(eager.abs().max())
    ctx = contextlib.nullcontext() if inductor else without_inductor()
    with ctx:
        _fresh()
        try:
            compiled = torch.compile(model, backend="fxdit", options={"on_pass_error": "raise"})
            with torch.no_grad():
                out = output_tensor(compiled(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - recorded
            plain = _plain_compile_fails(model, args, kwargs, "inductor" if inductor else "eager")
            if plain is not None:
                row.status, row.reason = "torch.compile fails", f"also without fxdit: {plain}"
            else:
                row.status, row.reason = "fxdit error", _fxdit_error(exc)
            row.seconds = time.perf_counter() - start
            _fresh()
            return row
        row.err = float((out - eager).abs().max()) if out.shape == eager.shape else math.inf
        recs = _records(compiled)
        row.graphs = len(recs)
        for rec in recs:
            s = rec.summary
            row.sites += int(s.get("attention_sites", 0))
            row.blocks += int(s.get("blocks", 0))
            row.linears += int(s.get("linears", 0))
            if row.token_grid is None and s.get("token_grid") is not None:
                row.token_grid = tuple(s["token_grid"])
            fa = _report(rec, "find_attention")
            if fa is not None:
                _merge(row.site_skips, fa.skipped)
            fb = _report(rec, "find_blocks")
            if fb is not None:
                _merge(row.roles, fb.details.get("roles"))
        if not (row.err <= wrong_tolerance(row.scale, inductor)):
            row.status = "wrong result"
            row.reason = f"lossless output differs from eager by {row.err:.3g} (max |eager| {row.scale:.3g})"
        if lossy:
            with contextlib.nullcontext() if (lossy_inductor or not inductor) else without_inductor():
                lo = row.lossy = _lossy_run(model, args, kwargs, eager, row.token_grid, fxdit)
                if lo.get("grat_rewritten", 0) > 0 or lo.get("fxdit_error"):
                    tol = wrong_tolerance(row.scale, lossy_inductor and inductor)
                    o = _oracle_run(model, args, kwargs, oracle_layout(name), tol, fxdit)
                    if lo.get("fxdit_error") and not o["error"].startswith("fxdit"):
                        # the GRAT+ICC run raised: what GRAT alone does stands in the GRAT column
                        lo["grat_rewritten"], lo["grat_skipped"] = o["rewritten"], o["skipped"]
                        lo["grat_alone"] = True
                    if o["rewritten"] > 0 or lo.get("grat_rewritten", 0) > 0 or o["error"].startswith("fxdit"):
                        row.oracle = o
            if row.lossy.get("fxdit_error") and row.status == "ok":
                row.status, row.reason = "fxdit error", f"GRAT+ICC: {row.lossy['error']}"
            if row.oracle and not row.oracle.get("ok") and row.status == "ok":
                row.status = "oracle mismatch"
                row.reason = f"GRAT differs from the oracle: {_oracle_cell(row.oracle)}"
        _fresh()
    row.seconds = time.perf_counter() - start
    return row


def oracle_layout(name: str) -> Any:
    """The GRAT oracle's :class:`ModelLayout` of class ``name`` from its case (token grid, where the non-image
    tokens sit), or ``None`` when the case table gives no token grid for it."""
    case = cases.CASES.get(name)
    if case is None or case.grid is None:
        return None
    t, h, w = case.grid
    return grat_oracle().ModelLayout((h, w) if t == 1 else (t, h, w), text_first=case.text == "before",
                                     image_start=case.image_start, joint_kv=case.joint_kv)


def _oracle_run(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], layout: Any, tolerance: float,
                fxdit: Any) -> dict[str, Any]:
    """fxdit with GRAT alone (:data:`GRAT_OPTIONS`) against the oracle: the eager model whose attention calls the
    oracle's rule selects use dense SDPA with the grouped mask of ``layout`` (``tests/grat_oracle.py``).

    Returns ``masked`` (calls the oracle masked), ``sparse`` (of them, calls whose mask drops something),
    ``rewritten`` / ``skipped`` (sites fxdit rewrote / left dense by reason), ``err`` (max |fxdit − oracle|),
    ``tolerance`` and ``ok`` (same number of sites and ``err <= tolerance``), or ``error`` when a run raised or
    ``layout`` is ``None`` (then only fxdit runs).
    """
    oracle = grat_oracle()
    options = {"on_pass_error": "raise", "attention": dict(GRAT_OPTIONS)}
    info: dict[str, Any] = {"masked": 0, "sparse": 0, "rewritten": 0, "skipped": {}, "err": None,
                            "tolerance": tolerance, "ok": False, "error": ""}
    expected = None
    if layout is not None:
        try:
            with torch.no_grad(), oracle.grouped_sdpa(model, options, layout=layout) as counts:
                expected = output_tensor(model(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - recorded
            info["error"] = f"oracle: {type(exc).__name__}: {_short(exc)}"
            return info
        info["masked"], info["sparse"] = counts["masked"], counts["sparse"]
    _fresh()
    try:
        compiled = torch.compile(model, backend="fxdit", options=options)
        with torch.no_grad():
            out = output_tensor(compiled(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - recorded
        info["error"] = f"fxdit: {_fxdit_error(exc)}"
        _fresh()
        return info
    for rec in _records(compiled):
        g = _report(rec, "rewrite_grouped_attention")
        if g is not None:
            info["rewritten"] += g.rewritten
            _merge(info["skipped"], g.skipped)
    _fresh()
    if expected is None:
        info["error"] = "no token grid in the case table"
        return info
    info["err"] = float((out - expected).abs().max()) if out.shape == expected.shape else math.inf
    info["ok"] = info["masked"] == info["rewritten"] and info["err"] <= tolerance
    if 0 < info["rewritten"] < info["masked"]:
        # fxdit left some of the oracle's calls dense (a coverage gap, with fxdit's reason): check the rewritten
        # ones by finding which choice of that many oracle calls, the rest dense, fxdit's result equals
        calls = [i for i, r in enumerate(counts["reasons"]) if r is None]
        choices = list(itertools.combinations(calls, info["rewritten"]))
        if len(choices) <= ORACLE_SUBSETS:
            best = (math.inf, ())
            for chosen in choices:
                with torch.no_grad(), oracle.grouped_sdpa(model, options, layout=layout, only=set(chosen)):
                    sub = output_tensor(model(*args, **kwargs))
                best = min(best, (float((out - sub).abs().max()), chosen))
            info["subset_err"], info["subset"] = best[0], list(best[1])
            info["dense_calls"] = [i for i in calls if i not in best[1]]
            info["ok"] = best[0] <= tolerance
    return info


def _next_step(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any], Any]:
    """The inputs with the latent moved by 5 % noise (the next step of a sampler), and the eager output on them."""
    g = torch.Generator().manual_seed(7)
    case = cases.CASES.get(type(model).__name__)
    if case is not None and case.inputs is not None:
        latent = case.latent
    else:
        latent = next(k for k in kwargs if INPUTS.get(k, (None,))[0] is _latent)

    def move(x: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * x.std() * torch.randn(x.shape, generator=g)

    x = kwargs[latent]
    kwargs2 = {**kwargs, latent: [move(t) for t in x] if isinstance(x, (list, tuple)) else move(x)}
    with torch.no_grad():
        eager2 = output_tensor(model(*args, **kwargs2))
    return args, kwargs2, eager2


#: Largest number of choices of oracle calls tried when fxdit rewrote fewer sites than the oracle masks.
ORACLE_SUBSETS = 16

#: The GRAT options of the lossy and oracle runs: GRAT-B over 1×2×2 groups (2×2 on an image grid), every site.
GRAT_OPTIONS = {"mode": "grat-b", "group": (1, 2, 2), "radius": 1, "min_tokens": 0}


def _lossy_run(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], eager: torch.Tensor,
               grid: tuple[int, ...] | None, fxdit: Any) -> dict[str, Any]:
    """GRAT-B (:data:`GRAT_OPTIONS`, always asked for, so a site left dense carries fxdit's reason) + ICC (rank-4
    SVD factors, period 2): one full, one cached call."""
    info: dict[str, Any] = {"grat_rewritten": 0, "grat_skipped": {}, "cached_linears": 0, "cached_blocks": 0,
                            "plan_skipped": {}, "err_full": None, "err_cached": None, "error": "",
                            "fxdit_error": False, "factors": ""}
    options: dict[str, Any] = {"on_pass_error": "raise", "attention": dict(GRAT_OPTIONS)}
    try:
        factors = fxdit.calibrate(model, method="svd", rank=4, example=(args, kwargs), progress=False)
        options["cache"] = {"factors": factors, "schedule": {"period": 2}}
        info["factors"] = f"{len(factors)} keys"
    except fxdit.FxditError as exc:
        info["factors"] = f"none: {_short(exc, 100)}"
    except Exception as exc:  # noqa: BLE001 - calibration traces the model with Dynamo
        info["factors"] = f"calibration failed: {type(exc).__name__}: {_short(exc, 100)}"
        info["fxdit_error"] = True
        info["error"] = info["factors"]
    # The cached call sees a slightly moved latent (as the next denoising step would), so the increment is not 0.
    args2, kwargs2, eager2 = _next_step(model, args, kwargs)
    _fresh()
    try:
        compiled = torch.compile(model, backend="fxdit", options=options)
        with torch.no_grad(), fxdit.sampling(compiled, calls_per_step=1):
            full = output_tensor(compiled(*args, **kwargs))
            cached = output_tensor(compiled(*args2, **kwargs2))
    except Exception as exc:  # noqa: BLE001 - recorded
        info["error"] = _fxdit_error(exc)
        info["fxdit_error"] = True
        _fresh()
        return info
    info["err_full"] = float((full - eager).abs().max())
    info["err_cached"] = float((cached - eager2).abs().max())
    blocks: set[tuple[int, int]] = set()
    for rec in _records(compiled):
        g = _report(rec, "rewrite_grouped_attention")
        if g is not None:
            info["grat_rewritten"] += g.rewritten
            _merge(info["grat_skipped"], g.skipped)
        p = _report(rec, "plan_cache")
        if p is not None:
            info["cached_linears"] += int(p.details.get("planned", 0)) - int(p.details.get("exact", 0))
            _merge(info["plan_skipped"], p.skipped)
            blocks.update((rec.graph_id, b) for b in p.details.get("blocks", ()))
    info["cached_blocks"] = len(blocks)
    _fresh()
    return info


# ---------------------------------------------------------------------------------------------------------------
# The sweep and the table
# ---------------------------------------------------------------------------------------------------------------


def transformer_classes() -> list[str]:
    """Every ``*Transformer*Model`` name the installed diffusers exports, sorted (names only: diffusers imports
    its model modules lazily, and importing all of them costs more than the check of one class)."""
    import diffusers

    return sorted(n for n in dir(diffusers) if re.search(r"Transformer.*Model", n))


def _fmt_err(v: float | None) -> str:
    return "" if v is None else ("inf" if math.isinf(v) else f"{v:.1e}")


def _oracle_cell(o: dict[str, Any]) -> str:
    """``err ok|FAIL (sites)``: max |fxdit GRAT − oracle| against the tolerance, and the sites each side masked."""
    if not o:
        return ""
    if o.get("error"):
        return f"not checked: {o['error']}"
    verdict = "ok" if o.get("ok") else "FAIL"
    sites = f"{o['rewritten']} sites" if o["masked"] == o["rewritten"] else \
        f"oracle masked {o['masked']}, fxdit rewrote {o['rewritten']}"
    if o.get("subset") is not None:
        return (f"{_fmt_err(o['subset_err'])} {verdict} on the {o['rewritten']} rewritten sites (the oracle masks "
                f"{o['masked']}: with its call(s) {o['dense_calls']} left dense; all {o['masked']} masked: "
                f"{_fmt_err(o.get('err'))}; tol {o['tolerance']:.0e})")
    vacuous = f"; the mask drops nothing at {o['masked'] - o['sparse']}" if o["sparse"] < o["masked"] else ""
    return f"{_fmt_err(o.get('err'))} {verdict} ({sites}, tol {o['tolerance']:.0e}{vacuous})"


def _fmt_counts(d: dict[str, int]) -> str:
    return "; ".join(f"{k} ×{v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(rows: list[Row]) -> dict[str, int]:
    built = [r for r in rows if r.status != "not built"]
    return {
        "tried": len(rows),
        "built": len(built),
        "compiled_ok": sum(r.status in ("ok", "oracle mismatch") for r in rows),
        "with_sites": sum(r.sites > 0 for r in built),
        "with_blocks": sum(r.blocks > 0 for r in built),
        "grat_rewritten": sum(r.lossy.get("grat_rewritten", 0) > 0 for r in built),
        "grat_sites": sum(r.lossy.get("grat_rewritten", 0) for r in built),
        "oracle_checked": sum(bool(r.oracle) and not r.oracle.get("error") for r in built),
        "oracle_passed": sum(bool(r.oracle.get("ok")) for r in built),
        "icc_cached": sum(r.lossy.get("cached_linears", 0) > 0 for r in built),
        "with_case": sum(r.cls in cases.CASES for r in rows),
        "fxdit_defects": sum(r.status in ("fxdit error", "wrong result", "oracle mismatch") for r in rows),
        "torch_compile_fails": sum(r.status == "torch.compile fails" for r in rows),
    }


def format_table(rows: list[Row], header: str) -> str:
    """The markdown of ``benchmarks/coverage.md``."""
    s = summary(rows)
    lines = [
        "# Coverage: every diffusers `*Transformer*Model` class, tiny, through fxdit",
        "",
        header,
        "",
        f"**Summary**: {s['tried']} classes tried ({s['with_case']} with a case in `tools/coverage_cases.py`), "
        f"**{s['built']} built** tiny and ran eager, {s['compiled_ok']} compiled OK with lossless output, "
        f"{s['with_sites']} with attention sites found, {s['with_blocks']} with blocks found; "
        f"**GRAT applies to {s['grat_rewritten']} classes** ({s['grat_sites']} sites rewritten), "
        f"**{s['oracle_checked']} checked against the GRAT oracle, {s['oracle_passed']} passed**; "
        f"**{s['icc_cached']} with ICC-cached linears**; {s['fxdit_defects']} fxdit defects (error, wrong result "
        f"or oracle mismatch), {s['torch_compile_fails']} where torch.compile fails without fxdit too.",
        "",
        "Columns: **status** (`ok`; `not built`: no tiny config/inputs the eager model runs on; `torch.compile "
        "fails`: the same compile fails without fxdit; `fxdit error` / `wrong result` / `oracle mismatch`: fxdit "
        "defects); **in** the inputs that ran (`case`: the class's case, from the diffusers model test; else the "
        "generic latent layout); **graphs** Dynamo handed to fxdit; **sites** attention sites found; **blocks** "
        "transformer blocks found (linears); **grid** token grid fxdit inferred (**case grid**: the token grid the "
        "case table states, T×H×W); **err** max |compiled − eager| with every lossy option off (**|y|** max "
        "|eager|); **GRAT** sites rewritten by GRAT-B (1×2×2 groups, radius 1, `min_tokens=0`); **oracle err** "
        "GRAT alone vs the oracle (`tests/grat_oracle.py`: the eager model with dense SDPA under the grouped mask "
        "built from the case's grid and text side): max |fxdit − oracle|, `ok` when fxdit rewrote exactly the "
        "calls the oracle masked and the error is within the tolerance; **ICC** linears / blocks cached with "
        "rank-4 SVD factors; **lossy err** full step / cached step vs eager (GRAT+ICC, lossy by design, "
        "informative only); **left alone** why sites or linears stayed untouched, as fxdit reports it.",
        "",
        "| class | status | in | graphs | sites | blocks | grid | case grid | err | \\|y\\| | GRAT | oracle err | "
        "ICC | lossy err | left alone / reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = cases.CASES.get(r.cls)
        case_grid = "×".join(map(str, case.grid)) + (f" ({case.text})" if case.text != "none" else "") \
            if case is not None and case.grid is not None else ""
        if r.status == "not built":
            lines.append(f"| {r.cls} | not built |  |  |  |  |  | {case_grid} |  |  |  |  |  |  | {_cell(r.reason)} |")
            continue
        lo = r.lossy
        grid = "×".join(map(str, r.token_grid)) if r.token_grid else "—"
        left = {}
        _merge(left, {f"find_attention: {k}": v for k, v in r.site_skips.items()})
        _merge(left, {f"GRAT: {k}": v for k, v in (lo.get("grat_skipped") or {}).items()})
        _merge(left, {f"ICC: {k}": v for k, v in (lo.get("plan_skipped") or {}).items()})
        notes = _fmt_counts(left)
        if lo.get("factors", "").startswith(("none", "calibration")):
            notes = "; ".join(x for x in (notes, f"ICC factors: {lo['factors']}") if x)
        if lo.get("error") and lo["error"] not in r.reason:
            notes = "; ".join(x for x in (notes, f"GRAT+ICC run: {lo['error']}") if x)
        if r.graphs and not r.sites:
            notes = "; ".join(x for x in ("GRAT: no attention site found", notes) if x)
        if r.reason:
            notes = "; ".join(x for x in (r.reason, notes) if x)
        icc = f"{lo.get('cached_linears', 0)} / {lo.get('cached_blocks', 0)}" if lo else ""
        lossy = f"{_fmt_err(lo.get('err_full'))} / {_fmt_err(lo.get('err_cached'))}" if lo.get("err_full") is not None \
            else ""
        lines.append(
            f"| {r.cls} | {r.status} | {r.layout} | {r.graphs or ''} | {r.sites if r.graphs else ''} | "
            f"{f'{r.blocks} ({r.linears})' if r.graphs else ''} | {grid if r.graphs else ''} | {case_grid} | "
            f"{_fmt_err(r.err)} | {_fmt_err(r.scale)} | {lo.get('grat_rewritten', '') if lo else ''} | "
            f"{_cell(_oracle_cell(r.oracle))} | {icc} | {lossy} | {_cell(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", "--only", default="",
                    help="comma-separated class names (default: every class)")
    ap.add_argument("--no-inductor", action="store_true", help="run the rewritten graphs as Python")
    ap.add_argument("--inductor-subset", default="",
                    help="with --no-inductor: these classes (comma-separated) run again with inductor")
    ap.add_argument("--no-lossy", action="store_true", help="skip the GRAT+ICC run")
    ap.add_argument("--lossy-inductor", action="store_true",
                    help="compile the GRAT+ICC run with inductor too (default: it runs as Python)")
    ap.add_argument("--out", default="benchmarks/coverage.md")
    ap.add_argument("--json", default="benchmarks/coverage.json")
    ap.add_argument("--resume", action="store_true", help="keep rows already in --json")
    ap.add_argument("--rerun", default="", help="with --resume: run these classes (comma-separated) again")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("fxdit", "torch", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    names = [n for n in a.classes.split(",") if n] or transformer_classes()
    done: dict[str, dict[str, Any]] = {}
    if a.resume and os.path.exists(a.json):
        with open(a.json) as f:
            done = {d["cls"]: d for d in json.load(f)["rows"]}
    rows: list[Row] = []
    subset_rows: list[Row] = []
    start = time.perf_counter()

    def save() -> None:
        with open(a.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "inductor_subset": [asdict(r) for r in subset_rows]}, f,
                      indent=1, default=str)
        with open(a.out, "w") as f:
            f.write(_document(rows, subset_rows, a))

    rerun = {n for n in a.rerun.split(",") if n}
    for name in names:
        if name in done and name not in rerun:
            d = done[name]
            rows.append(Row(**{**d, "grid": tuple(d["grid"]) if d["grid"] else None,
                               "token_grid": tuple(d["token_grid"]) if d["token_grid"] else None}))
            continue
        row = check_class(name, inductor=not a.no_inductor, lossy=not a.no_lossy, lossy_inductor=a.lossy_inductor)
        rows.append(row)
        log.info("%-40s %-20s err=%s sites=%d blocks=%d %.1fs %s", name, row.status, _fmt_err(row.err), row.sites,
                 row.blocks, row.seconds, row.reason[:100])
        save()
    for name in [n for n in a.inductor_subset.split(",") if n]:
        row = check_class(name, inductor=True, lossy=False)
        subset_rows.append(row)
        log.info("[inductor] %-40s %-20s err=%s %.1fs %s", name, row.status, _fmt_err(row.err), row.seconds,
                 row.reason[:100])
        save()
    save()
    log.info("%s", json.dumps(summary(rows)))
    log.info("wrote %s (%.1f min)", a.out, (time.perf_counter() - start) / 60)
    return 0


def _dense_reasons(r: Row) -> dict[str, int]:
    """Why GRAT left the sites of a built row dense, as fxdit reports it (or why no site was found)."""
    if r.graphs and not r.sites:
        return {"no attention site found": 1}
    return dict(r.lossy.get("grat_skipped") or {})


def _sections(rows: list[Row]) -> str:
    """Generated lists under the table: defects, and the built classes GRAT leaves dense with fxdit's reasons."""
    text = ""
    defects = [r for r in rows if r.status in ("fxdit error", "wrong result", "oracle mismatch")]
    text += "\n## fxdit defects\n\n"
    text += "".join(f"- **{r.cls}** ({r.status}): {_cell(r.reason)}\n" for r in defects) or "None.\n"
    dense = [r for r in rows if r.status != "not built" and r.lossy and not r.lossy.get("grat_rewritten")]
    text += (f"\n## Built classes where GRAT rewrote no site ({len(dense)})\n\n"
             "The reasons are fxdit's (`rewrite_grouped_attention` skip reasons); the case grid is the token grid "
             "the case table states for the inputs.\n\n")
    for r in dense:
        case = cases.CASES.get(r.cls)
        grid = "×".join(map(str, case.grid)) if case is not None and case.grid is not None else "none"
        why = _fmt_counts(_dense_reasons(r)) or (r.lossy.get("error") or "no reason reported")
        text += f"- {r.cls} (case grid {grid}): {_cell(why)}\n"
    return text


def _document(rows: list[Row], subset_rows: list[Row], a: argparse.Namespace) -> str:
    """The markdown of the sweep so far (header, table, inductor subset)."""
    import diffusers

    total = sum(r.seconds for r in rows)
    if a.no_inductor:
        mode = "without inductor (the rewritten graphs run as Python)"
    elif a.lossy_inductor or a.no_lossy:
        mode = "with inductor"
    else:
        mode = ("with inductor for the lossless column (err); the GRAT+ICC run (GRAT, ICC, lossy err) without "
                "inductor (the rewritten graphs run as Python: same rewrites, no C++ compile of ICC's two variants)")
    header = (f"Generated by `python tools/coverage.py{' --no-inductor' if a.no_inductor else ''}"
              f"{' --lossy-inductor' if a.lossy_inductor else ''}"
              f"{' --inductor-subset ...' if subset_rows else ''}` on diffusers {diffusers.__version__}, torch "
              f"{torch.__version__}, CPU ({os.cpu_count()} cores, shared), "
              "float32. Classes with a case in `tools/coverage_cases.py` (`in` = `case`) use the small config and "
              "dummy inputs of their diffusers model test (tests/models/transformers/test_models_transformer_*.py), "
              "at an 8×8 token grid where the test's is smaller; the others use the generic derivation: batch "
              f"{BATCH}, {TEXT_TOKENS} text tokens ({TEXT_PAD} padded), latent {SAMPLE}×{SAMPLE} ({FRAMES} frames "
              f"for video), {HEADS} heads × {HEAD_DIM} (hidden {HIDDEN}), 2 layers per kind (1 for the other layer "
              f"counts). The sweep ran {mode} in {total / 60:.1f} min (sum of the per-class times). A lossless error "
              f"above {wrong_tolerance(1.0, not a.no_inductor):g}·max(1, |y|) counts as a wrong result.")
    commits = list(dict.fromkeys(r.commit or "unrecorded" for r in rows))
    header += (f" fxdit checkout: {commits[0]}." if len(commits) == 1 else
               f" The fxdit sources changed while the sweep ran: its rows ran at {', '.join(commits)} (the json "
               "records each row's).")
    text = format_table(rows, header) + _sections(rows)
    if subset_rows:
        text += ("\n## Inductor subset\n\nThe same lossless check with inductor compiling the rewritten graphs "
                 f"(tolerance {wrong_tolerance(1.0, True):g}·max(1, |y|); seconds include the C++ compile on the "
                 "shared 2-core machine):\n\n"
                 "| class | status | graphs | sites | blocks | err | \\|y\\| | seconds | reason |\n"
                 "|---|---|---|---|---|---|---|---|---|\n")
        for r in subset_rows:
            text += (f"| {r.cls} | {r.status} | {r.graphs} | {r.sites} | {r.blocks} | {_fmt_err(r.err)} | "
                     f"{_fmt_err(r.scale)} | {r.seconds:.0f} | {_cell(r.reason)} |\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
