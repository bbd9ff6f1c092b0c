"""Typed, frozen configuration for the fxdit backend.

Users pass a plain ``options`` mapping to ``torch.compile(..., backend="fxdit", options=...)``;
:meth:`FxditConfig.from_options` turns it into these frozen dataclasses and rejects anything it does
not understand with an :class:`~fxdit.errors.FxditError` (a ``ValueError``) that names the field and
what was expected. Every option is validated here, before any pass runs.

Example::

    cfg = FxditConfig.from_options({
        "attention": {"mode": "grat-b", "group": (16, 16)},
        "cache": {"factors": "dit_r128.safetensors", "schedule": {"period": 2}},
        "dump_dir": "fxdit_dump",
    })
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fxdit.errors import FxditError, did_you_mean

__all__ = [
    "AttentionConfig",
    "CacheConfig",
    "FxditConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "ATTENTION_MODES",
    "CACHE_MODES",
    "CACHE_ROLES",
    "PARALLEL_MODES",
]

ATTENTION_MODES = ("dense", "grat-b", "grat-x")
CACHE_MODES = ("off", "increment", "reuse")
#: Linear roles (as labelled by ``find_blocks``) that ICC may cache. Everything else always runs exactly.
CACHE_ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out")
QKV_FACTORISATIONS = ("separate", "joint")
PASS_ERROR_POLICIES = ("raise", "fallback")
GUARDS = ("none", "nonfinite")
PARALLEL_MODES = ("none", "halo", "ulysses")


def _err(prefix: str, name: str, value: Any, expected: str) -> FxditError:
    return FxditError(f"{prefix}{name}={value!r}; expected {expected}")


def _int_tuple(prefix: str, name: str, value: Any, *, lengths: tuple[int, ...] | None = None, minimum: int = 1,
               allow_none: bool = True) -> tuple[int, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise _err(prefix, name, value, "a tuple of integers")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _err(prefix, name, value, "a tuple of integers")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise _err(prefix, name, value, "a tuple of integers")
    if lengths is not None and len(out) not in lengths:
        raise _err(prefix, name, value, f"a tuple of {' or '.join(map(str, lengths))} integers")
    if any(v < minimum for v in out):
        raise _err(prefix, name, value, f"integers >= {minimum}")
    return out


def _check_int(prefix: str, name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise _err(prefix, name, value, "an integer" + (" or None" if allow_none else ""))
    if minimum is not None and value < minimum:
        raise _err(prefix, name, value, f"an integer >= {minimum}")


def _check_choice(prefix: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise _err(prefix, name, value, f"one of {', '.join(map(repr, choices))}{hint}")


class _Options:
    """Mixin: build a frozen config from a mapping, rejecting unknown keys with the list of valid ones."""

    _prefix: ClassVar[str] = ""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None):
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise FxditError(f"{cls._prefix.rstrip('.') or 'options'}={options!r}; expected a mapping (dict)")
        valid = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if key not in valid:
                raise FxditError(
                    f"unknown option {cls._prefix}{key!s}{did_you_mean(str(key), valid)}; "
                    f"valid keys are: {', '.join(valid)}"
                )
            kwargs[key] = cls._convert(key, value)
        return cls(**kwargs)

    @classmethod
    def _convert(cls, key: str, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class AttentionConfig(_Options):
    """Grouped block-sparse attention (GRAT).

    Args:
        mode: ``"dense"`` (leave attention alone), ``"grat-b"`` (each query group attends the groups within
            ``radius`` on every axis) or ``"grat-x"`` (groups sharing a row or column; in video, sharing any of
            t, h, w).
        group: group shape in tokens, ``(gh, gw)`` for images or ``(gt, gh, gw)`` for video. ``None`` picks
            16×16 for images and 4×8×8 for video (256 tokens each).
        radius: GRAT-B neighbourhood radius in groups (1 → 3×3 or 3×3×3).
        layers: indices of the transformer blocks to rewrite; ``None`` means all.
        min_tokens: image/video token count below which a site stays dense (the mask costs more than it saves).
        grid: the token grid ``(H, W)`` or ``(T, H, W)``; ``None`` infers it from the graph.
        block_size: BlockMask block size in tokens; ``None`` picks the largest of 128/64/32/16 that divides
            the group's token count (a block that does not divide the group makes partial blocks).
        allow_grad: opt in to grouped attention in graphs that need gradients. Refused for now: the op has
            no backward, so such a graph raises ``FxditError`` with ``allow_grad=True`` (with the default
            ``False`` it stays dense, as plain inductor compiles it, with one warning).
    """

    _prefix: ClassVar[str] = "attention."

    mode: str = "dense"
    group: tuple[int, ...] | None = None
    radius: int = 1
    layers: tuple[int, ...] | None = None
    min_tokens: int = 1024
    grid: tuple[int, ...] | None = None
    block_size: int | None = None
    allow_grad: bool = False

    def __post_init__(self) -> None:
        p = self._prefix
        _check_choice(p, "mode", self.mode, ATTENTION_MODES)
        object.__setattr__(self, "group", _int_tuple(p, "group", self.group, lengths=(2, 3)))
        _check_int(p, "radius", self.radius, minimum=0)
        object.__setattr__(self, "layers", _int_tuple(p, "layers", self.layers, minimum=0))
        _check_int(p, "min_tokens", self.min_tokens, minimum=0)
        object.__setattr__(self, "grid", _int_tuple(p, "grid", self.grid, lengths=(2, 3)))
        _check_int(p, "block_size", self.block_size, minimum=16, allow_none=True)
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise _err(p, "block_size", self.block_size, "a power of two >= 16")
        if not isinstance(self.allow_grad, bool):
            raise _err(p, "allow_grad", self.allow_grad, "a bool")
        if self.group is not None and self.grid is not None:
            if len(self.group) != len(self.grid):
                raise _err(p, "group", self.group, f"{len(self.grid)} sizes to match grid={self.grid}")
            if any(n % g for n, g in zip(self.grid, self.group)):
                raise _err(p, "group", self.group, f"sizes that divide grid={self.grid} on every axis "
                           "(the groups must tile the token grid)")

    @property
    def enabled(self) -> bool:
        return self.mode != "dense"


@dataclass(frozen=True)
class ScheduleConfig(_Options):
    """Which sampling steps are computed in full; the others reuse the caches.

    Accepted option forms: ``"none"`` (every step full), ``{"period": k}`` (full iff ``step % k == 0``, as
    the official ICC code), ``{"full_steps": [0, 1, 5, ...]}``, each optionally with ``warmup`` (the first n
    steps full), ``cooldown`` (the last n steps full; needs ``num_steps``) and ``num_steps`` (steps in one
    sampling run; when reached, the next call starts a new run).

    Args:
        period: full-step period; 1 means every step is full.
        full_steps: explicit full steps (overrides ``period``).
        warmup: leading steps always computed in full.
        cooldown: trailing steps always computed in full (requires ``num_steps``).
        num_steps: steps per sampling run, or ``None`` to rely on ``fxdit.reset``/timestep jumps.
    """

    _prefix: ClassVar[str] = "cache.schedule."

    period: int = 2
    full_steps: tuple[int, ...] | None = None
    warmup: int = 0
    cooldown: int = 0
    num_steps: int | None = None

    def __post_init__(self) -> None:
        p = self._prefix
        _check_int(p, "period", self.period, minimum=1)
        steps = _int_tuple(p, "full_steps", self.full_steps, minimum=0)
        if steps is not None:
            if not steps:
                raise _err(p, "full_steps", self.full_steps, "a non-empty list of step indices (use 'none' for all)")
            if 0 not in steps:
                raise _err(p, "full_steps", self.full_steps, "a list that contains step 0 (the caches start empty)")
            steps = tuple(sorted(set(steps)))
        object.__setattr__(self, "full_steps", steps)
        _check_int(p, "warmup", self.warmup, minimum=0)
        _check_int(p, "cooldown", self.cooldown, minimum=0)
        _check_int(p, "num_steps", self.num_steps, minimum=1, allow_none=True)
        if self.cooldown and self.num_steps is None:
            raise _err(p, "cooldown", self.cooldown, "0 unless num_steps is set (the last steps must be known)")
        if steps is not None and self.num_steps is not None and steps[-1] >= self.num_steps:
            raise _err(p, "full_steps", self.full_steps, f"indices < num_steps={self.num_steps}")

    @classmethod
    def from_mapping(cls, options):  # type: ignore[override]
        if isinstance(options, str):
            if options != "none":
                raise _err(cls._prefix.rstrip("."), "", options, "'none' or a mapping such as {'period': 2}")
            return cls(period=1)
        return super().from_mapping(options)

    @property
    def every_step_full(self) -> bool:
        return self.full_steps is None and self.period == 1

    def is_full(self, step: int) -> bool:
        """Whether sampling step ``step`` (0-based, counted from the first call of a run) is a full step."""
        if step < self.warmup:
            return True
        if self.num_steps is not None and step >= self.num_steps - self.cooldown:
            return True
        if self.full_steps is not None:
            return step in self.full_steps
        return step % self.period == 0


@dataclass(frozen=True)
class CacheConfig(_Options):
    """Increment-calibrated caching (ICC) and the plain-reuse baseline.

    Args:
        mode: ``"off"``, ``"increment"`` (``Y_c + (X − X_c)·Bᵀ·Aᵀ``; needs ``factors``) or ``"reuse"``
            (``Y_c``; FORA-style baseline). Default: ``"increment"`` when ``factors`` is given, else ``"off"``.
        factors: a path to a ``.safetensors`` factor file written by ``fxdit.calibrate(...).save(...)``, or a
            :class:`fxdit.calibration.Factors` object.
        schedule: see :class:`ScheduleConfig`; ``"none"`` makes every step full.
        roles: linear roles to cache (subset of ``CACHE_ROLES``).
        blocks: transformer-block indices to cache; ``None`` means all.
        qkv: how q/k/v increments are factorised when the graph has one fused qkv linear: ``"separate"`` (one
            factor pair per q, k, v as the paper) or ``"joint"`` (one pair for the fused weight).
        guard: ``"nonfinite"`` recomputes a cached step in full when it produced NaN/Inf (one host sync per
            cached step); ``"none"`` does not check.
    """

    _prefix: ClassVar[str] = "cache."

    mode: str | None = None
    factors: Any = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    roles: tuple[str, ...] = CACHE_ROLES
    blocks: tuple[int, ...] | None = None
    qkv: str = "separate"
    guard: str = "none"

    def __post_init__(self) -> None:
        p = self._prefix
        mode = self.mode
        if mode is None:
            mode = "increment" if self.factors is not None else "off"
        _check_choice(p, "mode", mode, CACHE_MODES)
        object.__setattr__(self, "mode", mode)
        if self.factors is not None and not isinstance(self.factors, (str, os.PathLike)):
            if not hasattr(self.factors, "factors_for"):
                raise _err(p, "factors", self.factors, "a path to a .safetensors factor file or a Factors object")
        if isinstance(self.factors, os.PathLike):
            object.__setattr__(self, "factors", os.fspath(self.factors))
        if not isinstance(self.schedule, ScheduleConfig):
            raise _err(p, "schedule", self.schedule, "'none' or a mapping such as {'period': 2}")
        roles = self.roles
        if isinstance(roles, str) or not hasattr(roles, "__iter__"):
            raise _err(p, "roles", roles, f"a list of roles from {CACHE_ROLES}")
        roles = tuple(roles)
        for r in roles:
            if r not in CACHE_ROLES:
                raise _err(p, "roles", self.roles, f"roles from {CACHE_ROLES}{did_you_mean(str(r), CACHE_ROLES)}")
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "blocks", _int_tuple(p, "blocks", self.blocks, minimum=0))
        _check_choice(p, "qkv", self.qkv, QKV_FACTORISATIONS)
        _check_choice(p, "guard", self.guard, GUARDS)
        if mode != "increment" and self.factors is not None:
            raise _err(p, "mode", mode, "'increment' (or no mode) when cache.factors is given: only increment "
                       "caching uses factors; remove cache.factors or the mode")
        if mode == "increment" and self.factors is None:
            raise _err(p, "factors", None, "a factor file or Factors object when cache.mode='increment' "
                       "(make one with fxdit.calibrate(model, ..., method='svd'))")

    @classmethod
    def _convert(cls, key: str, value: Any) -> Any:
        if key == "schedule":
            return ScheduleConfig.from_mapping(value)
        return value

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and not self.schedule.every_step_full


@dataclass(frozen=True)
class ParallelConfig(_Options):
    """Context parallelism over ``torch.distributed`` (the ``shard_tokens`` pass).

    Args:
        mode: ``"none"`` (default: nothing changes), ``"halo"`` (tokens sharded by group rows after the patch
            embedding; GRAT-B attention exchanges only the neighbouring rows' K/V, other attention uses an
            all-to-all over heads) or ``"ulysses"`` (every attention uses the all-to-all over heads).
        group: the ``torch.distributed`` process group to shard over; ``None`` means the default group.
    """

    _prefix: ClassVar[str] = "parallel."

    mode: str = "none"
    group: Any = None

    def __post_init__(self) -> None:
        p = self._prefix
        _check_choice(p, "mode", self.mode, PARALLEL_MODES)
        if self.group is not None and not (hasattr(self.group, "rank") and hasattr(self.group, "size")
                                           and hasattr(self.group, "group_name")):
            raise _err(p, "group", self.group, "a torch.distributed ProcessGroup or None (the default group)")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class FxditConfig(_Options):
    """Everything the fxdit backend does, as one frozen value.

    Args:
        attention: grouped-attention settings (:class:`AttentionConfig`).
        cache: caching settings (:class:`CacheConfig`).
        dump_dir: write graphs before/after each pass, pass reports and cost tables here (also read from the
            ``FXDIT_DUMP_DIR`` environment variable when not given).
        on_pass_error: ``"fallback"`` (default: a pass that fails leaves the graph as it was before it, with one
            warning naming the pass; the model still runs, just without that optimisation) or ``"raise"``.
        inductor: extra inductor ``config_patches`` applied to this compilation only.
        parallel: context parallelism settings (:class:`ParallelConfig`); off by default.
    """

    _prefix: ClassVar[str] = ""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    dump_dir: str | None = None
    on_pass_error: str = "fallback"
    inductor: Mapping[str, Any] = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise _err("", "dump_dir", self.dump_dir, "a directory path or None")
        if isinstance(self.dump_dir, os.PathLike):
            object.__setattr__(self, "dump_dir", os.fspath(self.dump_dir))
        _check_choice("", "on_pass_error", self.on_pass_error, PASS_ERROR_POLICIES)
        if not isinstance(self.inductor, Mapping) or not all(isinstance(k, str) for k in self.inductor):
            raise _err("", "inductor", self.inductor, "a mapping of inductor config names to values")
        object.__setattr__(self, "inductor", dict(self.inductor))
        if not isinstance(self.attention, AttentionConfig):
            raise _err("", "attention", self.attention, "a mapping of attention options")
        if not isinstance(self.cache, CacheConfig):
            raise _err("", "cache", self.cache, "a mapping of cache options")
        if not isinstance(self.parallel, ParallelConfig):
            raise _err("", "parallel", self.parallel, "a mapping of parallel options")

    @classmethod
    def _convert(cls, key: str, value: Any) -> Any:
        if key == "attention":
            return AttentionConfig.from_mapping(value)
        if key == "cache":
            return CacheConfig.from_mapping(value)
        if key == "parallel":
            return ParallelConfig.from_mapping(value)
        return value

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | FxditConfig | None) -> FxditConfig:
        """Validate a user ``options`` mapping (as given to ``torch.compile``) into a config.

        ``dump_dir`` falls back to the ``FXDIT_DUMP_DIR`` environment variable.

        Raises:
            FxditError: on an unknown key (the message lists the valid keys) or a bad value (the message names
                the field and what was expected).
        """
        if isinstance(options, FxditConfig):
            cfg = options
        else:
            cfg = cls.from_mapping(options)
        if cfg.dump_dir is None and os.environ.get("FXDIT_DUMP_DIR"):
            cfg = dataclasses.replace(cfg, dump_dir=os.environ["FXDIT_DUMP_DIR"])
        return cfg

    def replace(self, **changes: Any) -> FxditConfig:
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def inductor_patches(self) -> dict[str, Any]:
        """The inductor ``config_patches`` for this compilation (never the global config)."""
        return dict(self.inductor)

    @property
    def lossless(self) -> bool:
        """True when no lossy rewrite is enabled (output must equal plain inductor)."""
        return not self.attention.enabled and not self.cache.enabled


def valid_option_keys() -> dict[str, list[str]]:
    """The valid option keys per section, for docs and error messages."""
    sections = {"": FxditConfig, "attention": AttentionConfig, "cache": CacheConfig, "cache.schedule": ScheduleConfig,
                "parallel": ParallelConfig}
    return {k: [f.name for f in dataclasses.fields(v)] for k, v in sections.items()}
