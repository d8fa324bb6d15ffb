# -*- test-case-name: test.test_bodywriter -*-
"""
What the download writer thread (L{imageio.web.bodywriter}) reads with:
threads that read a body's range a few pieces ahead of the sending
(L{DirectReads}: a file with C{O_DIRECT}, holes not read; L{NBDReads}: a
lent NBD connection, two reads in flight), the reused buffers they read
into (L{Buffers}, with a budget for the pieces read beyond the first
two), and the helpers that open a file again for the thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque

from imageio.units import MiB

__all__ = ["DIRECT_CHUNK", "ALIGN", "Buffers", "segments", "reopen",
           "openDirect", "Stopped", "ReadAhead", "DirectReads", "NBDReads",
           "directBuffers"]

DIRECT_CHUNK = 4 * MiB
"""
Bytes per read of a body's range (C{O_DIRECT} from a file, one
C{NBD_CMD_READ} at most).
"""

DEPTH = 4
"""
Pieces a body's reader may hold: read and waiting, or being sent. Two
are always given; the others come from L{AHEAD_BUDGET}. Four parallel
TLS Range downloads with one worker (2 GiB, cold cache, against the
reference in the same runs; medians of 5 runs): two pieces of 2 MiB
0.90-0.92x, two of 4 MiB 0.97x, three of 4 MiB 1.08-1.11x, four of
4 MiB 1.00-1.17x (four sets, the disk's speed varying by a third from
one to the next). With two pieces the reader waits whenever the sending
lags behind for a moment, and the disk idles meanwhile.
"""

DEEP_SIZE = 32 * MiB
"""
Bodies shorter than this hold two pieces at most, whatever the budget:
their time goes to starting up more than to reading, and the soak's
random ranges (up to 16 MiB) peaked 11-13 MiB higher in RSS (190-193
MiB, against 179) when they took four.
"""

AHEAD_BUDGET = 16
"""
Buffers out at once (all bodies) beyond which a body's reader gets no
more than its first two: 64 MiB, the four parallel ranges of a backup at
full depth; many bodies at once still read two pieces ahead each.
"""

ALIGN = 4096
"""
C{O_DIRECT} alignment of reads (offsets, lengths and buffers).
"""

class Buffers:
    """
    The threads' buffers: anonymous mappings, reused from one body to the
    next. Allocated per body from malloc's heap they fragmented it (a
    soak's idle daemon kept 70 MiB it could not give back).
    """

    def __init__(self, size: int, keep: int = 8, budget: int = 0):
        self.size = size
        self._keep = keep
        self._budget = budget
        self._free: list[mmap.mmap] = []
        self._out = 0
        self._lock = threading.Lock()

    @property
    def out(self) -> int:
        """
        Buffers taken and not given back.
        """
        return self._out

    def take(self) -> mmap.mmap:
        return self._take(None)

    def tryTake(self) -> mmap.mmap | None:
        """
        A buffer, or C{None} if C{budget} buffers are out already.
        """
        return self._take(self._budget)

    def _take(self, limit: int | None) -> mmap.mmap | None:
        # The count is checked and raised under one lock: two readers
        # asking at once never both get the budget's last buffer.
        with self._lock:
            if limit is not None and self._out >= limit:
                return None
            self._out += 1
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._out -= 1
            if len(self._free) < self._keep:
                self._free.append(buf)
                return
        try:
            buf.close()
        except BufferError:
            pass  # still viewed: unmapped when collected

def segments(fd: int, offset: int, end: int):
    """
    The data and hole segments of a file's range: C{(start, end, isData)}
    tuples, from C{SEEK_DATA}/C{SEEK_HOLE} (a filesystem without them
    reports all data).
    """
    while offset < end:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end
        data = min(data, end)
        if data > offset:
            yield offset, data, False
            offset = data
            if offset >= end:
                return
        hole = min(os.lseek(fd, offset, os.SEEK_HOLE), end)
        yield offset, hole, True
        offset = hole


def reopen(fd: int) -> int:
    """
    A new descriptor (a new open file description, through the page
    cache) of the file open as C{fd}.
    """
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def openDirect(fd: int) -> int | None:
    """
    A new C{O_DIRECT} descriptor of the file open as C{fd}, or C{None}
    where the filesystem refuses it.
    """
    try:
        return os.open(f"/proc/self/fd/{fd}",
                       os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


class Stopped(Exception):
    pass


class ReadAhead:
    """
    Reads a body's range in a thread of its own, a few pieces ahead of the
    writer thread, which sends them (L{SocketWriter._sendDirect}): the
    storage works while the writer encrypts and writes. Subclasses read
    (L{_run}).

    Pieces are C{(length, buffer, skip)}: C{length} bytes at C{skip} in an
    aligned C{buffer}, or C{buffer} C{None} for zeroes.
    """

    def __init__(self, start: int, end: int):
        self._start = start
        self._end = end
        self._cond = threading.Condition()
        self._pieces: deque = deque()
        self._free = [directBuffers.take() for _ in range(2)]
        depth = DEPTH if end - start >= DEEP_SIZE else 2
        while len(self._free) < depth:
            buf = directBuffers.tryTake()
            if buf is None:
                break
            self._free.append(buf)
        self._all = list(self._free)
        self._stopping = False
        self._error = None
        self._thread = threading.Thread(target=self._run,
                                        name="imageio-readahead",
                                        daemon=True)
        self._thread.start()

    def next(self):
        """
        The next piece (in the writer thread; waits for it).

        @raise OSError: reading failed.
        """
        with self._cond:
            while not self._pieces and self._error is None:
                self._cond.wait()
            if self._pieces:
                return self._pieces.popleft()
            raise self._error

    def give(self, buf) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        for buf in self._all:
            directBuffers.give(buf)

    def _take(self):
        with self._cond:
            while not self._free and not self._stopping:
                self._cond.wait()
            if self._stopping:
                raise Stopped()
            return self._free.pop()

    def _put(self, piece) -> None:
        with self._cond:
            self._pieces.append(piece)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._read()
        except Stopped:
            pass
        except Exception as e:
            # The writer raises it from next(), and stops.
            with self._cond:
                self._error = e.with_traceback(None)
                self._cond.notify_all()

    def _read(self) -> None:
        raise NotImplementedError()


class DirectReads(ReadAhead):
    """
    Reads a body's range of a file with C{O_DIRECT}, up to three pieces
    ahead of the writer (see L{ReadAhead}): the page cache is not touched
    at all. Holes are not read (C{SEEK_DATA}): they come as pieces of
    zeroes.

    @cvar bodies: bodies read this way so far in this process (for tests).
    """

    bodies = 0

    def __init__(self, fd: int, start: int, end: int):
        DirectReads.bodies += 1
        self._fd = fd
        super().__init__(start, end)

    def _read(self) -> None:
        for segStart, segEnd, isData in segments(self._fd, self._start,
                                                  self._end):
            if not isData:
                self._put((segEnd - segStart, None, 0))
                continue
            offset = segStart
            while offset < segEnd:
                buf = self._take()
                aligned = offset - offset % ALIGN
                skip = offset - aligned
                n = min(segEnd - offset, DIRECT_CHUNK)
                span = -(-(skip + n) // ALIGN) * ALIGN
                with memoryview(buf)[:span] as view:
                    got = os.preadv(self._fd, [view], aligned)
                if got < skip + n:
                    raise OSError(errno.EIO,
                                  "The file ended before the range")
                self._put((n, buf, skip))
                offset += n


class NBDReads(ReadAhead):
    """
    Reads a body's range on a lent NBD connection (see L{ReadAhead}),
    two requests in flight, so that the server's reading and the
    transfer through the socket overlap the writer's sending.
    """

    def __init__(self, conn, start: int, end: int):
        self._conn = conn
        super().__init__(start, end)

    def _tryTake(self):
        with self._cond:
            if self._stopping:
                raise Stopped()
            return self._free.pop() if self._free else None

    def _read(self) -> None:
        conn = self._conn
        pending: deque = deque()
        offset = self._start
        step = min(DIRECT_CHUNK, conn.maxRequest)
        while offset < self._end or pending:
            if offset < self._end and len(pending) < 2:
                buf = self._tryTake() if pending else self._take()
                if buf is not None:
                    n = min(self._end - offset, step)
                    view = memoryview(buf)[:n]
                    pending.append((conn.startRead(view, offset), buf, view,
                                    n))
                    offset += n
                    continue
            handle, buf, view, n = pending.popleft()
            with view:
                conn.finishRead(handle)
            self._put((n, buf, 0))


directBuffers = Buffers(DIRECT_CHUNK + ALIGN, keep=4, budget=AHEAD_BUDGET)
