"""Stopping a job cleanly before the cluster stops it.

A scheduler about to preempt a job signals it (SLURM: SIGTERM, or the signal given to
`sbatch --signal`; torchrun forwards SIGTERM to its workers), then kills it a grace period
later. A job may also have a wall-clock budget. Either way the signal handler only sets a
flag: at the next step boundary every rank learns, in one small all-reduce, whether any
rank wants to stop, and they all save and exit together. A signal that arrives during a
save therefore lets the save finish first."""

import re
import signal
import sys
import time
from typing import Optional, Sequence

from .control import any_rank

PREEMPTED_EXIT_CODE = 3  # stopped early with a checkpoint of the current step: run again with --resume


def parse_signals(spec: str) -> list:
    """'SIGTERM,SIGUSR1' (or 'TERM,USR1', or 'none') -> [signal.SIGTERM, signal.SIGUSR1]."""
    if spec.strip().lower() in ("", "none"):
        return []
    found = []
    for name in spec.split(","):
        name = name.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"--save-on-signal: {name} is not a signal a process can catch; use e.g. SIGTERM,SIGUSR1")
        found.append(sig)
    return found


def parse_time_limit(spec: Optional[str]) -> Optional[float]:
    """'HH:MM' or 'HH:MM:SS' (or SLURM's 'D-HH:MM:SS') -> seconds."""
    if not spec:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?", spec.strip())
    if not match:
        raise ValueError(f"--time-limit {spec!r}: write HH:MM, HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


class StopRequests:
    """Collects reasons to stop (signals, the time budget) and lets the ranks agree on them.

    The budget counts from this object's creation. The job stops once the time left is less
    than `safety` times the longest step plus the longest save seen so far, so that the
    last step and the final checkpoint still fit."""

    def __init__(self, signals: Sequence[signal.Signals] = (), time_limit_s: Optional[float] = None, safety: float = 2.0):
        self.start = time.monotonic()
        self.time_limit_s = time_limit_s
        self.safety = safety
        self.received: Optional[str] = None
        self.longest_step = 0.0
        self.longest_save = 0.0
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping with a checkpoint at the next step boundary", file=sys.stderr, flush=True)

    def observe(self, step_seconds: float = 0.0, save_seconds: float = 0.0) -> None:
        self.longest_step = max(self.longest_step, step_seconds)
        self.longest_save = max(self.longest_save, save_seconds)

    def out_of_time(self) -> bool:
        if self.time_limit_s is None:
            return False
        left = self.time_limit_s - (time.monotonic() - self.start)
        return left < self.safety * (self.longest_step + self.longest_save)

    def agreed(self) -> Optional[str]:
        """On every rank at a step boundary: why the job stops now, or None to go on."""
        by_signal, by_time = any_rank([self.received is not None, self.out_of_time()])
        if by_signal:
            return "a signal"
        if by_time:
            return "the --time-limit"
        return None
