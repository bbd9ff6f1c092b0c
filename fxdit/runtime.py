"""Step state for cached sampling (ICC). Placeholder: the cache runtime has not landed yet."""
from __future__ import annotations
from contextlib import contextmanager
from typing import Any, Iterator


def reset(model: Any) -> None:
    """Start a new sampling run for ``model`` (no-op until caching lands)."""


@contextmanager
def sampling(model: Any) -> Iterator[None]:
    reset(model)
    yield
    reset(model)


def build_cached_runtime(*args: Any, **kwargs: Any):
    from fxdit.errors import FxditError
    raise FxditError("cache: increment-calibrated caching is not available in this build yet")
