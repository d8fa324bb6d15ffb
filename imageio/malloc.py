# -*- test-case-name: test.test_malloc -*-
"""
glibc malloc and the daemon's transfer buffers: tuning at start-up, and
giving freed buffers back to the system once transfers stop.
"""

from __future__ import annotations

import ctypes
import gc

from twisted.application.internet import TimerService

from imageio.logs import Logger

__all__ = ["tune", "trim", "Reclaim", "MMAP_THRESHOLD", "HEAP_BUFFER",
           "RECEIVE_SIZE"]

HEAP_BUFFER = 1024 * 1024
"""
The size of buffers made again and again (a hand-over to the reactor, a
checksum read): from the heap, so that none of them costs a new mapping.
"""

RECEIVE_SIZE = 256 * 1024
"""
The most bytes one socket read in the reactor asks for (the NBD client's,
a TLS body's). A read allocates this much and shrinks to what arrived
(often less than 200 KiB): reads of L{HEAP_BUFFER} left holes all over
the heap (the soak peaked at 209 MiB with them), mappings of their own
cost CPU (a checksum of an nbd image: 0.79 s per GiB instead of 0.56).
"""

MMAP_THRESHOLD = HEAP_BUFFER + 64 * 1024
"""
Allocations of this size or more are mappings of their own (L{tune}):
returned whole when freed, but faulted in page by page when made. Just
above L{HEAP_BUFFER} and the object's header.
"""

_log = Logger()

try:
    _libc = ctypes.CDLL(None)
    _libc.mallopt
    _libc.malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _libc = None


def tune(arenas: int = 2, mmapThreshold: int = MMAP_THRESHOLD,
         trimThreshold: int = 32 * 1024 * 1024) -> None:
    """
    Keep glibc malloc from fragmenting on transfer buffers, and from giving
    them back to the system after every chunk.

    Every chunk a transfer moves is a 0.1-8 MiB buffer. By default each
    thread that allocates gets its own arena, and glibc raises its mmap
    threshold after such a buffer is freed, so later ones come from the
    arenas' heaps, which fragment: a 10-minute soak of 16 transfers grew
    from 190 to 245 MiB RSS (idle after: 208 MiB). Two arenas and a fixed
    threshold stop the drift. The threshold was 512 KiB at first, but that
    made every 1 MiB chunk a fresh mmap, faulted in page by page and
    unmapped when freed: a TLS download spent 0.5 s of system time per GiB
    on it (429 MB/s, 1.70 s CPU per GiB). The threshold went up to 4 MiB
    then, and the two arenas kept up to 32 MiB free at their top instead
    of trimming after each chunk (881-905 MB/s, 1.17-1.19 s per GiB).

    Since then the large bodies moved to threads that reuse their buffers
    (L{imageio.web.bodywriter}, L{imageio.web.bodyreader}), and the
    1-4 MiB allocations left in the heaps only fragmented them: under the
    soak the main heap held 80-96 MiB resident and the daemon peaked at
    198-215 MiB. Now such allocations are mappings of their own
    (L{MMAP_THRESHOLD}), the buffers made again and again stay below it
    (L{HEAP_BUFFER}), and socket reads ask for L{RECEIVE_SIZE}: a
    10-minute soak (bench/soak.py --minutes 10 --seed 7, 100,775
    requests) peaked at 179 MiB, with the heap at most 66 MiB resident,
    and went back to 97 MiB idle. Same as
    MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_,
    without depending on how the daemon is started.
    """
    if _libc is None:
        return
    _libc.mallopt(-8, arenas)  # M_ARENA_MAX
    _libc.mallopt(-3, mmapThreshold)  # M_MMAP_THRESHOLD
    _libc.mallopt(-1, trimThreshold)  # M_TRIM_THRESHOLD


def trim() -> bool:
    """
    Give the free memory of every arena back to the system
    (C{malloc_trim(0)}: the top of each heap, and whole free pages inside
    them).

    @return: whether any memory was released.
    """
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))


class Reclaim(TimerService):
    """
    Gives the memory of finished transfers back, every C{interval} seconds
    in which transfers ran or connections closed: first a full garbage
    collection, then L{trim}.

    The collection matters more than it looks. A closed connection is
    freed only when its reference cycles are collected (Twisted's channel
    and request, the body thread, a failure's traceback), and with it its
    OpenSSL object, whose memory BIOs grew to the size of the thread's
    writes: megabytes that Python does not see, so the collector's
    allocation counts do not hurry it. A 2-minute soak left 118 MiB of
    such garbage held after the run; collected every second, the daemon
    stayed under 192 MiB under load (303 MiB before) and went back to
    94 MiB idle (58 MiB before the run; 198 MiB without the collection).

    Collections are cheap because what exists when the service starts
    (modules, configuration, resources) is moved out of the collector's
    sight first (C{gc.freeze}): about 2 ms each under that soak, against
    60 ms without. Trimming every second under load costs about 9 ms; the
    heap's free holes stop being held resident between transfers.

    @param activity: callable, a number that changes when transfers run
        or connections close.
    """

    def __init__(self, activity, interval: float = 1.0, clock=None):
        super().__init__(interval, self.check)
        if clock is not None:
            self.clock = clock
        self._activity = activity
        self._seen = activity()
        self.runs = 0

    def startService(self) -> None:
        gc.collect()
        gc.freeze()
        super().startService()

    def stopService(self):
        gc.unfreeze()
        return super().stopService()

    def check(self) -> None:
        now = self._activity()
        if now == self._seen:
            return
        self._seen = now
        self.runs += 1
        gc.collect()
        trim()
