"""The one error type fxdit raises about user input (options, factor files, models it cannot serve)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["FxditError", "did_you_mean"]


class FxditError(ValueError):
    """A problem with what the user gave fxdit: an option, a factor file, a shape.

    The message always names the option, file or site and what was expected. It subclasses
    ``ValueError`` so code that already catches bad-argument errors keeps working.
    """


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` when ``name`` is close to one of ``valid``, else ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
