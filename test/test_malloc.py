"""
imageio.malloc: the idle trim gives freed transfer buffers back to the
system, and runs only after transfers, never while one runs.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.internet import task

from imageio import malloc


def test_idle_trim_only_after_activity_and_when_idle(monkeypatch):
    trims = []
    monkeypatch.setattr(malloc, "trim", lambda: trims.append(1) or True)
    state = {"busy": False, "activity": 0}
    clock = task.Clock()
    svc = malloc.IdleTrim(lambda: state["busy"], lambda: state["activity"],
                          interval=10, clock=clock)
    svc.startService()
    try:
        clock.advance(30)
        assert trims == []          # nothing ran
        state["activity"] = 3
        state["busy"] = True
        clock.advance(10)
        assert trims == []          # a transfer runs
        state["busy"] = False
        clock.advance(10)
        assert len(trims) == 1      # ran, now idle
        clock.advance(30)
        assert len(trims) == 1      # nothing new
        state["activity"] = 4
        clock.advance(10)
        assert len(trims) == 2
    finally:
        svc.stopService()


_FRAGMENT = r"""
import os
from imageio import malloc
malloc.tune()

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

# Transfer-like buffers (2 MiB, under the mmap threshold: from the heap),
# all freed but the last, which pins the top of the heap: glibc's own
# trimming cannot return the free space below it.
chunk = os.urandom(64) * (2 * 1024 * 1024 // 64)
bufs = [bytearray(chunk) for _ in range(40)]
last = bufs.pop()
bufs.clear()
before = rss()
malloc.trim()
after = rss()
print(before, after)
"""


def test_trim_gives_memory_back():
    out = subprocess.run([sys.executable, "-c", _FRAGMENT], check=True,
                         capture_output=True, text=True).stdout
    before, after = map(int, out.split())
    # The heap kept 78 MiB of freed buffers; trim returns them.
    assert before - after > 64 * 1024 * 1024, (before, after)
