"""fxdit: a torch.compile backend that makes Diffusion Transformers cheaper to sample from.

    fast = torch.compile(model, backend="fxdit", options={...})

Public API (imported lazily; ``import fxdit`` registers nothing and patches nothing):

- :func:`make_backend`: a backend bound to a typed :class:`FxditConfig`.
- :func:`reports`: what each pass did to each compiled graph of a model.
- :func:`reset`, :func:`sampling`: start a new sampling run (fresh caches) for a compiled model.
- :func:`calibrate`: low-rank factors for increment-calibrated caching.
- :class:`FxditError`: the error fxdit raises about user input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fxdit.errors import FxditError

__version__ = "0.1.0"

__all__ = [
    "FxditConfig",
    "FxditError",
    "calibrate",
    "make_backend",
    "reports",
    "reset",
    "sampling",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from fxdit.backend import make_backend
    from fxdit.calibration import calibrate
    from fxdit.config import FxditConfig
    from fxdit.runtime import reset, sampling

_LAZY = {
    "FxditConfig": ("fxdit.config", "FxditConfig"),
    "make_backend": ("fxdit.backend", "make_backend"),
    "calibrate": ("fxdit.calibration", "calibrate"),
    "Factors": ("fxdit.calibration", "Factors"),
    "reset": ("fxdit.runtime", "reset"),
    "sampling": ("fxdit.runtime", "sampling"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fxdit' has no attribute {name!r}")


def reports(model: Any = None) -> list:
    """The :class:`~fxdit.registry.CompiledGraph` records of ``model`` (or of every model when ``None``).

    Each record has ``graph_id``, ``reports`` (one :class:`~fxdit.passes.PassReport` per pass),
    ``summary`` (attention sites, blocks, token grid...) and ``dump_dir``.

    Args:
        model: the module, or the ``torch.compile`` wrapper of it, that was compiled with ``backend="fxdit"``.
    """
    from fxdit import registry

    return registry.all_records() if model is None else registry.records_for(model)
