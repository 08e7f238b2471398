"""How far a cache build is, on stderr, and the one line that ends it."""

from __future__ import annotations

import sys
import time
from pathlib import Path


class Progress:
    """How far a cache build is, on stderr: a bar redrawn in place on a terminal,
    otherwise a plain line at every further 10% of the bytes or 10 s, whichever is first."""

    LINE_EVERY_S = 10.0
    LINE_EVERY_FRACTION = 0.1
    BAR_EVERY_S = 0.2
    BAR_WIDTH = 24

    def __init__(self, verb: str, total_bytes: int, *, unit: str = "documents", quiet: bool = False,
                 stream=None):
        self.verb, self.unit, self.total, self.quiet = verb, unit, max(total_bytes, 1), quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = not quiet and self.stream.isatty()
        self.start = self.last_shown = time.perf_counter()
        self.steps_shown = 0  # whole LINE_EVERY_FRACTIONs done at the last line
        self.drawn = False

    def update(self, done_bytes: int, documents: int, tokens: int) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        fraction = min(done_bytes / self.total, 1.0)
        steps = int(fraction / self.LINE_EVERY_FRACTION + 1e-9)
        if self.tty:
            due = now - self.last_shown >= self.BAR_EVERY_S or fraction == 1.0
        else:
            due = steps > self.steps_shown or now - self.last_shown >= self.LINE_EVERY_S
        if not due:
            return
        if self.tty:
            self._show(f"\r{self._bar(fraction, done_bytes, documents, tokens, now)}\x1b[K")
            self.drawn = True
        else:
            self._show(f"{self._line(fraction, done_bytes, documents, tokens, now)}\n")
        self.last_shown, self.steps_shown = now, steps

    def finish(self, summary: str) -> None:
        if not self.quiet:
            self._show(("\r\x1b[K" if self.drawn else "") + summary + "\n")

    def _rates(self, fraction: float, done_bytes: int, now: float) -> tuple[float, str]:
        seconds = max(now - self.start, 1e-9)
        eta = seconds * (1 - fraction) / fraction if fraction > 0 else None
        return done_bytes / 1e6 / seconds, "?" if eta is None else f"{int(eta) // 60}:{int(eta) % 60:02d}"

    def _bar(self, fraction: float, done_bytes: int, documents: int, tokens: int, now: float) -> str:
        mb_per_s, eta = self._rates(fraction, done_bytes, now)
        filled = int(fraction * self.BAR_WIDTH)
        return (f"{self.verb} [{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {100 * fraction:3.0f}% "
                f"{done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB | {documents:,} {self.unit} | "
                f"{tokens:,} tokens | {mb_per_s:.1f} MB/s | ETA {eta}")

    def _line(self, fraction: float, done_bytes: int, documents: int, tokens: int, now: float) -> str:
        mb_per_s, eta = self._rates(fraction, done_bytes, now)
        return (f"{self.verb}: {100 * fraction:.0f}% ({done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB), "
                f"{documents:,} {self.unit}, {tokens:,} tokens, {mb_per_s:.1f} MB/s, ETA {eta}")

    def _show(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def build_summary(verb: str, num_files: int, num_docs: int, num_tokens: int, progress: Progress, workers: int,
                  meta_path: Path) -> str:
    """The one line that ends a build."""
    seconds = time.perf_counter() - progress.start
    return (f"{verb} {num_files} files: {num_docs:,} {progress.unit}, {num_tokens:,} tokens in {seconds:.1f}s "
            f"({num_tokens / max(seconds, 1e-9):,.0f} tokens/s, {workers} worker{'s' * (workers != 1)}) "
            f"-> {meta_path}")
