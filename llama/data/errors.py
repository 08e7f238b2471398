"""DataError, the one exception of the data pipeline, and its warning lines on stderr."""

from __future__ import annotations

import sys

import torch.distributed as dist


class DataError(ValueError):
    """Bad training data or data settings; the message is one line naming the fix."""


def log(message: str) -> None:
    """One line on stderr: cache hits, warnings about the data."""
    print(message, file=sys.stderr, flush=True)


def log_on_rank0(message: str) -> None:
    """log() on global rank 0 only (or outside a process group): for what every rank
    finds alike, said once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        log(message)
