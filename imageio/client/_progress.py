# -*- test-case-name: test.test_client_progress -*-
"""
Progress reporting for transfers: a text bar for terminals and JSON lines
for programs, with the reference client's formats.
"""

from __future__ import annotations

import json
import sys
import threading
import time

__all__ = ["ProgressBar", "humansize", "FORMAT_TEXT", "FORMAT_JSON"]

FORMAT_TEXT = "text"
FORMAT_JSON = "json"
DEFAULT_WIDTH = 79

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def humansize(n: float) -> str:
    """
    C{n} bytes as a short text: C{"512 bytes"}, C{"1.50 GiB"}.
    """
    i = 0
    while n >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{int(n)} bytes"
    return f"{n:.2f} {_UNITS[i]}"


def _text_line(elapsed, percent, done, size, phase, width):
    value = f"{max(0, percent):3d}%" if size else "----"
    rate = done / elapsed if elapsed else 0
    line = (f"[ {value} ] {humansize(done)}, {elapsed:.2f} s, "
            f"{humansize(rate)}/s")
    if phase:
        line += f" | {phase}"
    return line.ljust(width)


def _json_line(elapsed, done, size, phase):
    record = {"transferred": done, "elapsed": elapsed,
              "description": phase or ""}
    if size is not None:
        record["size"] = size
    return json.dumps(record)


class ProgressBar:
    """
    Show the progress of a transfer.

    The transfer sets L{size} once known and calls L{update} with the bytes
    done after each step (the interface of C{tqdm}, so a C{tqdm} object can
    be used instead). The bar is drawn when created, when the integer
    percent grows, when L{phase} or L{size} change, and a last time by
    L{close}. Text lines end with C{"\\r"} (the next one overwrites them),
    the last one with C{"\\n"}; JSON records are one per line.

    Thread safe: the blocking client API calls L{update} from its reactor
    thread.
    """

    def __init__(self, phase=None, error_phase="command failed", size=None,
                 output=sys.stdout, format=FORMAT_TEXT, step=None,
                 width=DEFAULT_WIDTH, now=time.monotonic):
        """
        @param phase: what is being done, shown after the figures.
        @param error_phase: the phase shown when the C{with} block fails.
        @param size: total bytes, if known (else no percent is shown).
        @param output: a text file.
        @param format: C{"text"} or C{"json"}.
        @param step: ignored (kept for compatibility); the bar moves in 1%
            steps.
        @param width: text line width.
        @param now: clock, for tests.
        """
        if format not in (FORMAT_TEXT, FORMAT_JSON):
            raise ValueError(f"Unsupported format: {format!r}")
        self._phase = phase
        self._error_phase = error_phase
        self._size = size
        self._output = output
        self._format = format
        self._width = width
        self._now = now
        self._lock = threading.Lock()
        self._start = now()
        self._done = 0
        self._percent = -1
        self._closed = False
        self._draw()

    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, value):
        with self._lock:
            if not self._closed and value != self._phase:
                self._phase = value
                self._draw()

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, value):
        with self._lock:
            if not self._closed and value != self._size:
                self._size = value
                self._draw()

    @property
    def transferred(self) -> int:
        return self._done

    def update(self, n: int) -> None:
        """
        Add C{n} bytes done; redraw if the integer percent grew.
        """
        with self._lock:
            if self._closed:
                return
            self._done += n
            if self._size:
                percent = int(self._done * 100 / self._size)
                if percent > self._percent:
                    self._percent = percent
                    self._draw()

    def close(self) -> None:
        """
        Draw the last line. Idempotent.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._draw(last=True)

    def _draw(self, last=False):
        elapsed = self._now() - self._start
        if self._format == FORMAT_TEXT:
            line = _text_line(elapsed, self._percent, self._done,
                              self._size, self._phase, self._width)
            end = "\n" if last else "\r"
        else:
            line = _json_line(elapsed, self._done, self._size, self._phase)
            end = "\n"
        self._output.write(line + end)
        self._output.flush()

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        if t is not None:
            self.phase = self._error_phase
        self.close()
