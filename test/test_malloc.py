"""
imageio.malloc: L{Reclaim} collects the garbage of finished transfers
and gives freed memory back to the system, only after activity.
"""

from __future__ import annotations

import gc
import subprocess
import sys

from twisted.internet import task

from imageio import malloc


class _Cycle:
    """
    A reference cycle that says when it is freed.
    """

    freed = 0

    def __init__(self):
        self.me = self

    def __del__(self):
        _Cycle.freed += 1


def test_reclaim_runs_only_after_activity(monkeypatch):
    trims = []
    monkeypatch.setattr(malloc, "trim", lambda: trims.append(1) or True)
    state = {"activity": 0}
    clock = task.Clock()
    svc = malloc.Reclaim(lambda: state["activity"], interval=1,
                         clock=clock)
    svc.startService()
    try:
        clock.advance(5)
        assert trims == []          # nothing ran
        state["activity"] = 3
        clock.advance(1)
        assert len(trims) == 1
        clock.advance(5)
        assert len(trims) == 1      # nothing new
        state["activity"] = 4
        clock.advance(1)
        assert len(trims) == 2
        assert svc.runs == 2
    finally:
        svc.stopService()


def test_reclaim_collects_cycles_that_die_after_start(monkeypatch):
    """
    Cycles made before the service starts are frozen out of the
    collector's sight (cheap collections); cycles of later connections are
    collected at the next run, not at the collector's leisure.
    """
    monkeypatch.setattr(malloc, "trim", lambda: True)
    gc.collect()
    _Cycle.freed = 0
    old = _Cycle()
    state = {"activity": 0}
    clock = task.Clock()
    svc = malloc.Reclaim(lambda: state["activity"], interval=1,
                         clock=clock)
    gc.disable()  # only the service collects here
    svc.startService()
    try:
        assert gc.get_freeze_count() > 0
        del old
        for _ in range(10):
            _Cycle()
        assert _Cycle.freed == 0
        state["activity"] = 1
        clock.advance(1)
        # The ten new ones; the frozen one stays until unfrozen.
        assert _Cycle.freed == 10
    finally:
        svc.stopService()
        gc.enable()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert _Cycle.freed == 11


_FRAGMENT = r"""
import os
from imageio import malloc
malloc.tune()

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

# Transfer-like buffers (under the mmap threshold: from the heap), all
# freed but the last, which pins the top of the heap: glibc's own trimming
# cannot return the free space below it.
chunk = os.urandom(64) * (malloc.HEAP_BUFFER // 64)
bufs = [bytearray(chunk) for _ in range(84)]
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
