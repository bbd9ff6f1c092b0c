"""The private torch APIs fxdit uses, each behind one helper.

fxdit supports torch 2.11–2.15 (:data:`SUPPORTED_TORCH`). Where torch has no public API for what a pass or a lowering
needs, the private name is imported here and nowhere else, so a torch release that moves one breaks one helper with
a clear message instead of an ``ImportError`` deep inside a pass. Each helper checks the running torch against the
supported range: outside it, it logs one warning (the name may have moved); when the import fails, it raises
:class:`fxdit.errors.FxditError` naming the private API, the running torch and the supported range.

Public replacements are used where they exist (``torch.nn.attention.flex_attention.BlockMask``,
``torch.library.custom_op``, ``torch.fx``); what stays private and why:

* the FlexAttention higher-order op and its kernel-option helper: the public ``flex_attention()`` wraps the HOP in
  a nested ``torch.compile`` whose cache breaks later compilations in the same process (see
  :func:`fxdit.kernels.ops._flex_grouped_attention`);
* inductor's CPU flex capability check: no public query says whether the C++ flex template can run here;
* the fake mode of traced example values, inductor's decomposition table and ``compile_fx``: a ``torch.compile``
  backend receives fake tensors and hands its graph to inductor, for which torch offers no public entry point.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Callable, NamedTuple

import torch

from fxdit.errors import FxditError

__all__ = ["SUPPORTED_TORCH", "torch_version", "private_api", "cpu_flex_supported", "FlexInternals",
           "flex_internals", "detect_fake_mode", "fake_tensor_types", "inductor_compile_fx",
           "inductor_decomposition_table", "counters", "dynamo_passthrough_error"]

log = logging.getLogger(__name__)

#: Oldest and newest ``(major, minor)`` torch release fxdit supports (inclusive).
SUPPORTED_TORCH: tuple[tuple[int, int], tuple[int, int]] = ((2, 11), (2, 15))


def torch_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the running torch), e.g. ``"2.13.0+cpu"`` → ``(2, 13)``."""
    text = torch.__version__ if version is None else version
    parts = str(text).split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise FxditError(f"cannot read a torch version from {text!r}; expected 'MAJOR.MINOR[...]'") from None


def in_supported_range(version: tuple[int, int]) -> bool:
    """Whether ``version`` lies in :data:`SUPPORTED_TORCH`."""
    low, high = SUPPORTED_TORCH
    return low <= version <= high


def _range_text() -> str:
    (a, b), (c, d) = SUPPORTED_TORCH
    return f"{a}.{b}–{c}.{d}"


@functools.lru_cache(maxsize=None)
def _warn_outside_range(api: str) -> None:
    version = torch_version()
    if not in_supported_range(version):
        log.warning("fxdit uses the private torch API %s, checked on torch %s; this is torch %s, where it may have "
                    "moved or changed", api, _range_text(), torch.__version__)


def private_api(module: str, name: str) -> Any:
    """``module.name`` from torch's private namespace; raises FxditError (with the torch version) if it is gone."""
    api = f"{module}.{name}"
    _warn_outside_range(api)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise FxditError(f"torch {torch.__version__} has no {api} ({err}); fxdit supports torch {_range_text()}") \
            from None


def cpu_flex_supported() -> bool:
    """Whether inductor's C++ FlexAttention template can run on this CPU (``False`` when torch cannot say)."""
    try:
        check = private_api("torch._inductor.kernel.flex.flex_cpu", "check_cpu_supported")
    except FxditError as err:
        log.debug("%s", err)
        return False
    return bool(check())


class FlexInternals(NamedTuple):
    """The FlexAttention pieces a lowering needs: the HOP, the kernel-option defaults and the identity score_mod."""

    hop: Callable[..., Any]
    apply_kernel_options: Callable[..., Any]
    identity: Callable[..., Any]


def flex_internals() -> FlexInternals:
    """FlexAttention's higher-order op, ``_apply_kernel_options`` and ``_identity``."""
    return FlexInternals(private_api("torch._higher_order_ops.flex_attention", "flex_attention"),
                         private_api("torch.nn.attention.flex_attention", "_apply_kernel_options"),
                         private_api("torch.nn.attention.flex_attention", "_identity"))


def detect_fake_mode(inputs: Any = None) -> Any:
    """The fake mode of traced example values (``torch._guards.detect_fake_mode``); ``None`` outside tracing."""
    return private_api("torch._guards", "detect_fake_mode")(inputs)


def fake_tensor_types() -> tuple[type, type]:
    """``(FakeTensor, FakeTensorMode)`` from ``torch._subclasses.fake_tensor``."""
    return (private_api("torch._subclasses.fake_tensor", "FakeTensor"),
            private_api("torch._subclasses.fake_tensor", "FakeTensorMode"))


def inductor_compile_fx() -> Callable[..., Any]:
    """Inductor's ``compile_fx`` (the entry point ``backend="inductor"`` uses)."""
    return private_api("torch._inductor.compile_fx", "compile_fx")


def counters() -> Any:
    """Dynamo's counter table (``torch._dynamo.utils.counters``), where fxdit counts rewritten sites per pass."""
    return private_api("torch._dynamo.utils", "counters")


def dynamo_passthrough_error() -> type | None:
    """Dynamo's ``ShortenTraceback`` exception base, which it re-raises from a backend unwrapped (``None`` if gone)."""
    try:
        return private_api("torch._dynamo.exc", "ShortenTraceback")
    except FxditError:
        return None


def inductor_decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Inductor's default decomposition table (``torch._inductor.decomposition.select_decomp_table()``)."""
    return private_api("torch._inductor.decomposition", "select_decomp_table")()
