# -*- test-case-name: test.test_backend_file,test.test_hung_storage -*-
"""
The file backends' calls into the I/O thread pool, kept from one hung
file or mount tying up the pool: the calls on one file hold at most a
quarter of its threads (L{FileGate}), and a call stuck in storage stops
counting against the pool after L{STALL_TIMEOUT} seconds
(L{StallWatch}). L{gated} runs a call under both.
"""

from __future__ import annotations

import weakref

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from imageio.logs import Logger

__all__ = ["FileGate", "StallWatch", "gated", "STALL_TIMEOUT",
           "MAX_STALLED"]

# The file backend's log: these are its calls.
_log = Logger(namespace="imageio.backends.file.FileBackend")


class FileGate:
    """
    How many I/O threads the calls on one file may hold at once (across
    every connection and ticket on it): at most a quarter of the pool, the
    rest wait in the reactor. A file on storage that stops answering (a
    hung NFS mount) then ties up its own share of the threads, and the
    other tickets keep being served.
    """

    def __init__(self, key: str):
        self.key = key
        self.running = 0
        self.waiting: list[defer.Deferred] = []

    @staticmethod
    def limit(pool) -> int:
        # The pool's own size, without the threads added for stuck calls
        # (L{StallWatch}).
        size = getattr(pool, "max", 4) - stalled.get(pool, 0)
        return max(1, size // 4)


gates: dict[str, FileGate] = {}

STALL_TIMEOUT = 2.0
"""
Seconds after which a call in the I/O pool counts as stuck in storage
(L{StallWatch}).
"""

# At most this many threads added to one pool for stuck calls.
MAX_STALLED = 256

# Pool -> how many threads it has on top of its size for stuck calls.
stalled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StallWatch:
    """
    Gives the pool one more thread while a call of it is stuck.

    The per-file bound (L{FileGate}) keeps one hung file to its quarter
    of the pool, but a dead NFS mount holds many images: twenty tickets
    on it, one stuck open each, took every thread of a 16-thread pool and
    a ticket on healthy storage got no answer
    (C{test_hung_storage.test_hung_mount_does_not_stall}). A call that has
    not returned after L{STALL_TIMEOUT} seconds stops counting against the
    pool: its thread is lost to storage, not the pool's capacity (as in
    the reference, which has a thread per connection). Bounded by
    L{MAX_STALLED} per pool; the extra thread goes when the call returns.

    @ivar grown: whether the pool has a thread more for this call.
    """

    def __init__(self, reactor, pool, key: str):
        self.reactor = reactor
        self.pool = pool
        self.key = key
        self.grown = False
        self.started = 0.0
        self._watched = (hasattr(pool, "adjustPoolsize")
                         and hasattr(reactor, "callLater"))
        if self._watched:
            self.started = reactor.seconds()
            _Sweep.forReactor(reactor).add(self)

    def _stuck(self) -> None:
        pool = self.pool
        count = stalled.get(pool, 0)
        if count >= MAX_STALLED or not pool.started:
            return
        stalled[pool] = count + 1
        self.grown = True
        # A larger max alone starts nothing: calls queued in the pool wait
        # for a thread to free up (Twisted 26.10). Raising min past the
        # threads there are adds one now, which takes the oldest queued
        # call; min goes back at once (public API only;
        # test_hung_storage.teststalled_call_grows_pool checks it).
        base = pool.min
        pool.adjustPoolsize(minthreads=min(pool.workers + 1, pool.max + 1),
                            maxthreads=pool.max + 1)
        pool.adjustPoolsize(minthreads=base)
        _log.warn(
            "I/O call on {path} stuck for {seconds} s (storage not "
            "answering?); {count} stuck, pool of {pool} threads",
            path=self.key, seconds=STALL_TIMEOUT, count=count + 1,
            pool=pool.max)

    def done(self, result):
        if self._watched:
            self._watched = False
            _Sweep.forReactor(self.reactor).discard(self)
        if self.grown:
            self.grown = False
            pool = self.pool
            stalled[pool] = max(0, stalled.get(pool, 0) - 1)
            if not stalled[pool]:
                del stalled[pool]
            if pool.started:
                pool.adjustPoolsize(maxthreads=max(pool.min, pool.max - 1))
            _log.info(
                "Stuck I/O call on {path} returned after {seconds:.1f} s",
                path=self.key,
                seconds=self.reactor.seconds() - self.started)
        return result


class _Sweep:
    """
    The one timer of a reactor's stall watches: it fires when the oldest
    call in flight reaches L{STALL_TIMEOUT}. A timer armed and cancelled
    for each call cost a twentieth of the CPU of a 4 KiB Range GET.

    @ivar watches: the calls in flight, oldest first.
    """

    _sweeps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, reactor):
        self.reactor = reactor
        self.watches: dict[StallWatch, None] = {}
        self._timer = None

    @classmethod
    def forReactor(cls, reactor) -> _Sweep:
        sweep = cls._sweeps.get(reactor)
        if sweep is None:
            sweep = cls._sweeps[reactor] = cls(reactor)
        return sweep

    def add(self, watch: StallWatch) -> None:
        self.watches[watch] = None
        if self._timer is None:
            self._timer = self.reactor.callLater(STALL_TIMEOUT, self._sweep)

    def discard(self, watch: StallWatch) -> None:
        self.watches.pop(watch, None)

    def _sweep(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        while self.watches:
            oldest = next(iter(self.watches))
            due = oldest.started + STALL_TIMEOUT
            if due > now:
                self._timer = self.reactor.callLater(due - now, self._sweep)
                return
            del self.watches[oldest]
            oldest._watched = False
            oldest._stuck()


def gated(reactor, pool, key: str, f, *args) -> defer.Deferred:
    """
    C{deferToThreadPool(reactor, pool, f, *args)}, waiting while the calls
    on the file C{key} hold their share of the pool (L{FileGate}).
    """
    gate = gates.get(key)
    if gate is None:
        gate = gates[key] = FileGate(key)

    def release(result):
        gate.running -= 1
        if gate.waiting:
            gate.waiting.pop(0).callback(None)
        elif not gate.running:
            gates.pop(key, None)
        return result

    def start(_=None):
        gate.running += 1
        watch = StallWatch(reactor, pool, key)
        d = deferToThreadPool(reactor, pool, f, *args)
        return d.addBoth(watch.done).addBoth(release)

    if gate.running < FileGate.limit(pool):
        return start()
    waiter = defer.Deferred()
    gate.waiting.append(waiter)
    return waiter.addCallback(start)
