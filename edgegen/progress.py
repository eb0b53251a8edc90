"""A one-line progress display on stderr: redrawn in place on a terminal, printed
every `every` updates otherwise (logs and CI)."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(self, total: int, enabled: bool = True, every: int = 25, stream=None) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_len = 0

    def update(self, done: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = f"{done}/{self.total} {text} [{elapsed:.0f}s]"
        if self.tty:
            pad = " " * max(0, self._last_len - len(line))
            self.stream.write(f"\r{line}{pad}")
            self._last_len = len(line)
        elif force or done % self.every == 0 or done == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
