"""Reference models for tests, benchmarks and the demo.

Each named model comes as a :class:`ModelSpec`: the module (eval mode, fp32, seeded random weights), example
inputs for its forward, and an :class:`Expected` record of what the graph analysis must find in it (attention
sites, blocks, linear roles per block, token grid, text/image spans), derived from the model's config.

    spec = fxdit.apps.models.build("dit-tiny", batch=2)
    out = spec.run()                      # eager
    out = spec.run(torch.compile(spec.model, backend="fxdit"))

Names: :func:`names`. The reference DiT lives in :mod:`fxdit.apps.models.dit`; tiny configurations of the diffusers
transformers (built offline from configs, no downloads) in :mod:`fxdit.apps.models.tiny`. Importing this package
does not import diffusers; the diffusers builders import it when called.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxdit.errors import FxditError, did_you_mean

__all__ = ["Expected", "ModelSpec", "build", "names", "output_tensor", "resolve", "REFERENCE_NAMES", "DIFFUSERS_NAMES"]

log = logging.getLogger(__name__)

#: The linear roles, in the order of ``fxdit.passes._records.LINEAR_ROLES``.
ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out", "modulation", "other")


@dataclass(frozen=True)
class Expected:
    """What graph analysis should find in one forward of a model (one Dynamo graph, no graph breaks).

    Attributes:
        attention_sites: attention calls per forward.
        self_attention_sites: of those, calls whose keys come from the query sequence (joint text+image
            attention counts as self-attention).
        cross_attention_sites: calls whose keys come from another sequence (image queries, text keys).
        blocks: transformer blocks.
        linear_roles: role -> count of linear calls in the first block (roles not listed: 0).
        token_grid: the image/video token grid ``(T, H, W)``.
        text_span: ``(start, stop)`` of the text tokens in the joint attention sequence, or ``None``.
        image_span: ``(start, stop)`` of the image tokens in the (joint) attention sequence, or ``None``.
        linear_roles_per_block: role counts of every block when blocks differ (Flux double/single-stream
            blocks), else ``None`` (every block has ``linear_roles``).
        attention_per_block: attention calls per block when it is not 1 per block (PixArt, Wan: self + cross).
        text_only_attention_sites: self-attention calls over text tokens only, outside the blocks (HunyuanVideo's
            token refiner); included in ``attention_sites`` and ``self_attention_sites``.
        site_kinds: one entry per attention call, in graph order: ``"image"`` (self-attention over the image
            tokens alone), ``"joint"`` (self-attention over text + image tokens, ordered as the spans say),
            ``"text"`` (self-attention over text tokens alone) or ``"cross"`` (image queries, text keys).
        site_blocks: for each attention call, the index of its block (``None`` outside the blocks).
        notes: how the numbers follow from the config.
    """

    attention_sites: int
    self_attention_sites: int
    cross_attention_sites: int
    blocks: int
    linear_roles: dict[str, int]
    token_grid: tuple[int, int, int]
    text_span: tuple[int, int] | None = None
    image_span: tuple[int, int] | None = None
    linear_roles_per_block: list[dict[str, int]] | None = None
    attention_per_block: int = 1
    text_only_attention_sites: int = 0
    site_kinds: tuple[str, ...] = ()
    site_blocks: tuple[int | None, ...] = ()
    notes: str = ""

    def roles(self, block: int = 0) -> dict[str, int]:
        """Role -> count (every role, zeros included) for block ``block``."""
        src = self.linear_roles if self.linear_roles_per_block is None else self.linear_roles_per_block[block]
        return {r: src.get(r, 0) for r in ROLES}

    @property
    def tokens(self) -> int:
        """Image/video tokens per sample."""
        t, h, w = self.token_grid
        return t * h * w


@dataclass
class ModelSpec:
    """A model with example inputs and what the analysis should find in it.

    Attributes:
        name: the registry name (or ``"module:factory"``).
        model: the module, in eval mode, fp32.
        args, kwargs: example inputs for ``model(*args, **kwargs)``.
        expected: the analysis expectations, or ``None`` when unknown (models from ``resolve("module:factory")``
            that return a bare tuple).
        description: one line about the model.
    """

    name: str
    model: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    expected: Expected | None = None
    description: str = ""

    def run(self, m: Callable[..., Any] | None = None) -> Any:
        """Call ``m`` (default: the model) on the example inputs."""
        return (m if m is not None else self.model)(*self.args, **self.kwargs)

    def sample(self, m: Callable[..., Any] | None = None) -> torch.Tensor:
        """Like :meth:`run` but returns the output tensor (diffusers models return a tuple or a dataclass)."""
        return output_tensor(self.run(m))


def output_tensor(out: Any) -> torch.Tensor:
    """The sample tensor of a model output: the tensor itself, ``out[0]`` of a tuple, or ``out.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Reference DiT builders
# --------------------------------------------------------------------------------------------------------------


def dit_expected(cfg: Any) -> Expected:
    """Expectations of the reference :class:`~fxdit.apps.models.dit.DiT` for ``cfg`` (a ``DiTConfig``).

    One self-attention per block (joint text+image attention when ``text_tokens > 0``); per block one each
    of ``qkv`` (fused ``attn.qkv``), ``attn_out`` (``attn.proj``), ``mlp_in`` (``mlp.fc1``), ``mlp_out``
    (``mlp.fc2``) and ``modulation`` (``adaLN_modulation.1``). The text projection runs once before the blocks.
    """
    n = cfg.tokens
    txt = cfg.text_tokens
    if txt == 0:
        text_span, image_span = None, (0, n)
    elif cfg.text_position == "before":
        text_span, image_span = (0, txt), (txt, txt + n)
    else:
        text_span, image_span = (n, n + txt), (0, n)
    return Expected(
        attention_sites=cfg.depth,
        self_attention_sites=cfg.depth,
        cross_attention_sites=0,
        blocks=cfg.depth,
        linear_roles={"qkv": 1, "attn_out": 1, "mlp_in": 1, "mlp_out": 1, "modulation": 1},
        token_grid=cfg.grid,
        text_span=text_span,
        image_span=image_span,
        site_kinds=("joint" if txt else "image",) * cfg.depth,
        site_blocks=tuple(range(cfg.depth)),
        notes="depth blocks x 1 self-attention; per block qkv, proj, fc1, fc2, adaLN_modulation.1",
    )


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` under a forked CPU RNG seeded with ``seed`` (no change to the caller's RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _build_dit(name: str, defaults: dict[str, Any], description: str) -> Callable[..., ModelSpec]:
    def builder(*, batch: int = 1, seed: int = 0, **overrides: Any) -> ModelSpec:
        from fxdit.apps.models.dit import DiT, DiTConfig

        unknown = set(overrides) - set(DiTConfig.__dataclass_fields__)
        if unknown:
            bad = sorted(unknown)[0]
            raise FxditError(f"build({name!r}): override {bad!r} is not a DiTConfig field"
                             f"{did_you_mean(bad, DiTConfig.__dataclass_fields__)}")
        cfg = DiTConfig(**{**defaults, **overrides})

        def make() -> ModelSpec:
            model = DiT(cfg).eval()
            x = torch.randn(batch, cfg.in_channels, *cfg.input_size)
            t = torch.randint(0, 1000, (batch,)).float()
            y = torch.randint(0, max(cfg.num_classes, 1), (batch,))
            kwargs: dict[str, Any] = {}
            if cfg.text_tokens:
                kwargs["text"] = torch.randn(batch, cfg.text_tokens, cfg.text_dim or cfg.hidden)
            return ModelSpec(name, model, (x, t, y), kwargs, dit_expected(cfg), description)

        return _seeded(seed, make)

    return builder


REFERENCE_NAMES = ("dit-tiny", "dit-tiny-unfused", "dit-video-tiny")
DIFFUSERS_NAMES = ("diffusers-dit", "pixart-alpha", "sd3", "flux", "hunyuan-video", "wan")

_BUILDERS: dict[str, Callable[..., ModelSpec]] = {
    "dit-tiny": _build_dit("dit-tiny", {}, "reference DiT, depth 2, hidden 64, 16x16 latent, patch 2: 64 tokens, SDPA"),
    "dit-tiny-unfused": _build_dit(
        "dit-tiny-unfused", {"attention": "unfused"}, "dit-tiny with softmax(q @ k^T * scale) @ v attention"
    ),
    # Video: (T, H, W) = (4, 8, 8) latent, patch (1, 2, 2) -> a (4, 4, 4) grid = 64 tokens, Conv3d patch embed.
    "dit-video-tiny": _build_dit(
        "dit-video-tiny", {"input_size": (4, 8, 8), "patch": (1, 2, 2)},
        "reference DiT on a (4, 8, 8) video latent, patch (1, 2, 2): (4, 4, 4) grid, 64 tokens, SDPA",
    ),
}


def _diffusers_builder(name: str) -> Callable[..., ModelSpec]:
    def builder(*, batch: int = 1, seed: int = 0, **overrides: Any) -> ModelSpec:
        from fxdit.apps.models import tiny

        return tiny.build(name, batch=batch, seed=seed, **overrides)

    return builder


for _n in DIFFUSERS_NAMES:
    _BUILDERS[_n] = _diffusers_builder(_n)


def names() -> list[str]:
    """Every model name :func:`build` knows, reference models first."""
    return list(_BUILDERS)


def build(name: str, *, batch: int = 1, seed: int = 0, **overrides: Any) -> ModelSpec:
    """Build a named model with seeded random weights and example inputs.

    Args:
        name: one of :func:`names`.
        batch: batch size of the example inputs.
        seed: seed of the weights and inputs (the caller's RNG state is left unchanged).
        **overrides: config fields to change (``DiTConfig`` fields for the reference models, diffusers config
            keys for the diffusers models); the :class:`Expected` record follows them.

    Returns:
        The :class:`ModelSpec`.

    Raises:
        FxditError: unknown name or override.
    """
    if name not in _BUILDERS:
        raise FxditError(f"model name {name!r} is unknown{did_you_mean(name, _BUILDERS)}; expected one of {names()}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise FxditError(f"batch={batch!r}; expected an integer >= 1")
    return _BUILDERS[name](batch=batch, seed=seed, **overrides)


def resolve(spec: str) -> ModelSpec:
    """A :class:`ModelSpec` from a registry name or a ``"module:factory"`` reference.

    ``factory()`` is called without arguments and must return a :class:`ModelSpec` or a
    ``(model, args, kwargs)`` tuple (``expected`` is then ``None``).

    Args:
        spec: a name from :func:`names`, or ``"package.module:function"``.

    Raises:
        FxditError: unknown name, unimportable module, missing factory or a factory returning something else.
    """
    if spec in _BUILDERS:
        return build(spec)
    if ":" not in spec:
        raise FxditError(f"model {spec!r} is unknown{did_you_mean(spec, _BUILDERS)}; expected one of {names()} "
                         "or 'module:factory'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FxditError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FxditError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}")
    made = factory()
    if isinstance(made, ModelSpec):
        return made
    if isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], nn.Module):
        model, args, kwargs = made
        return ModelSpec(spec, model, tuple(args), dict(kwargs or {}), None, f"from {spec}")
    raise FxditError(f"model {spec!r}: factory returned {type(made).__name__}; expected a ModelSpec or a "
                     "(model, args, kwargs) tuple")
