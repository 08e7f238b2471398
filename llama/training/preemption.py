"""Stopping a job cleanly before the cluster stops it.

A scheduler about to preempt a job signals it (SLURM: SIGTERM, or the signal given to
`sbatch --signal`; torchrun forwards SIGTERM to its workers), then kills it a grace period
later. A job may also have a wall-clock budget. Either way the signal handler only sets a
flag; at a step boundary every rank learns, in one small all-reduce, whether any rank wants
to stop, and they all save and exit together. A signal that arrives during a save
therefore lets the save finish first.

That all-reduce is a host barrier of the whole world: at 16K ranks, hundreds of ms. So
the ranks agree only at some boundaries: on the steps that wait for the host anyway (log
and save steps), and every N steps, N chosen at each agreement from the longest step and
save any rank has seen (agreed in the same all-reduce, so every rank picks the same N and
the same steps): as many steps as fit in SIGNAL_DELAY_S, and with a time limit in its
margin, whose check looks N steps ahead."""

import contextlib
import re
import signal
import sys
import time
from typing import Optional, Sequence

from parallel.control import max_over_ranks

PREEMPTED_EXIT_CODE = 3  # stopped early with a checkpoint of the current step: run again with --resume
# The most training time a signal waits for the ranks to agree on it (then the save
# follows): well inside Slurm's default KillWait of 30 s between SIGTERM and SIGKILL, and
# long enough that an agreement of a few hundred ms costs a few percent at most
SIGNAL_DELAY_S = 10.0
MAX_STEPS_BETWEEN_AGREEMENTS = 1000  # a bound for very short steps


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
    last step and the final checkpoint still fit, plus the steps until the next agreement.
    `agreements` counts the all-reduces."""

    def __init__(self, signals: Sequence[signal.Signals] = (), time_limit_s: Optional[float] = None, safety: float = 2.0,
                 signal_delay_s: float = SIGNAL_DELAY_S):
        self.start = time.monotonic()
        self.time_limit_s = time_limit_s
        self.safety = safety
        self.signal_delay_s = signal_delay_s
        self.received: Optional[str] = None
        self.longest_step = 0.0
        self.longest_save = 0.0
        self.next_agreement = 0  # the first boundary agrees, whatever it is
        self.agreements = 0
        self._boundary: Optional[float] = None  # start_clock() and each agreed() set it
        self._saving = 0.0
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping with a checkpoint at the next step boundary", file=sys.stderr, flush=True)

    def start_clock(self) -> None:
        """The loop starts: step times count from here (setup is not a step)."""
        self._boundary, self._saving = time.monotonic(), 0.0

    @contextlib.contextmanager
    def saving(self):
        """Time spent inside is save time, not step time."""
        start = time.monotonic()
        try:
            yield
        finally:
            self._saving += time.monotonic() - start
            self.observe(save_seconds=time.monotonic() - start)

    def observe(self, step_seconds: float = 0.0, save_seconds: float = 0.0) -> None:
        self.longest_step = max(self.longest_step, step_seconds)
        self.longest_save = max(self.longest_save, save_seconds)

    def out_of_time(self, steps_ahead: int = 0, elapsed: Optional[float] = None) -> bool:
        """Whether the time left no longer covers the margin (and `steps_ahead` more steps)."""
        if self.time_limit_s is None:
            return False
        elapsed = time.monotonic() - self.start if elapsed is None else elapsed
        margin = self.safety * (self.longest_step + self.longest_save)
        return self.time_limit_s - elapsed < margin + steps_ahead * self.longest_step

    def steps_between_agreements(self) -> int:
        """N: the steps that fit in SIGNAL_DELAY_S, and with a time limit in its margin
        (the time the job keeps in hand), so that looking N steps ahead gives up at most
        about one margin of the budget."""
        if self.longest_step <= 0:
            return 1
        budget = self.signal_delay_s
        if self.time_limit_s is not None:
            budget = min(budget, self.safety * (self.longest_step + self.longest_save))
        return max(1, min(MAX_STEPS_BETWEEN_AGREEMENTS, int(budget / self.longest_step)))

    def agreed(self, step: int, waits_anyway: bool = True) -> Optional[str]:
        """On every rank at the boundary after `step`: why the job stops now, or None to go
        on. `waits_anyway`: this step waits for the host already (it logs or saves), so an
        agreement costs little; on other steps the ranks agree only every N steps."""
        if self._boundary is not None:  # the step that just ended, less its save
            now = time.monotonic()
            self.observe(step_seconds=now - self._boundary - self._saving)
            self._boundary, self._saving = now, 0.0
        if not waits_anyway and step < self.next_agreement:
            return None
        self.agreements += 1
        by_signal, elapsed, self.longest_step, self.longest_save = max_over_ranks(
            [self.received is not None, time.monotonic() - self.start, self.longest_step, self.longest_save]
        )
        every = self.steps_between_agreements()
        self.next_agreement = step + every
        if by_signal:
            return "a signal"
        if self.out_of_time(steps_ahead=every, elapsed=elapsed):
            return "the --time-limit"
        return None
