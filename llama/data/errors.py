"""DataError, the one exception of the data pipeline, and its warning lines on stderr."""

from __future__ import annotations

import sys


class DataError(ValueError):
    """Bad training data or data settings; the message is one line naming the fix."""


def log(message: str) -> None:
    """One line on stderr: cache hits, warnings about the data."""
    print(message, file=sys.stderr, flush=True)
