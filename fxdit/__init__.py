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

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxdit.errors import FxditError


def _source_checkout_root() -> str | None:
    """The checkout root when ``fxdit`` runs from a source checkout, else ``None``.

    ``fxdit.passes`` and ``fxdit.kernels`` are the top-level folders ``passes/`` and ``kernels/`` (setuptools
    ``package-dir``). They carry no ``__init__.py``: a Python process started in the checkout has its root on
    ``sys.path``, and a regular package named ``kernels`` there would shadow the installed PyPI package of that name
    (which transformers imports). As namespace portions they lose to any installed package of the same name. A wheel
    installs them as ``fxdit/kernels`` and ``fxdit/passes``; in a checkout (or an editable install of one) they are
    found by adding the root to this package's ``__path__``.
    """
    here = Path(__file__).resolve().parent
    if (here / "kernels").is_dir() and (here / "passes").is_dir():
        return None
    root = here.parent
    if (root / "kernels").is_dir() and (root / "passes").is_dir() and (root / "pyproject.toml").is_file():
        return str(root)
    return None


_root = _source_checkout_root()
if _root is not None and _root not in __path__:
    __path__.append(_root)
del _root

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

    Each record has ``graph_id``, ``reports`` (one :class:`~fxdit.passes._base.PassReport` per pass),
    ``summary`` (attention sites, blocks, token grid...) and ``dump_dir``.

    Args:
        model: the module, or the ``torch.compile`` wrapper of it, that was compiled with ``backend="fxdit"``.
    """
    from fxdit import registry

    return registry.all_records() if model is None else registry.records_for(model)
