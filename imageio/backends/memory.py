# -*- test-case-name: test.test_backend_memory -*-
"""
An in-memory L{IBackend} for tests.

Not reachable from tickets (SPEC B §3): tests build it directly and hand it
to the code under test. Besides the interface it can I{hold} operations, so
a test can keep a read or write in flight (for example while a ticket is
cancelled) and let it finish later with L{MemoryBackend.release}.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from imageio.logs import Logger
from imageio.backends import IBackend
from imageio.errors import BackendError, UnsupportedOperation
from imageio.extents import ZeroExtent
from imageio.units import MiB

__all__ = ["MemoryBackend", "OPERATIONS"]

# Operation names accepted by MemoryBackend.hold().
OPERATIONS = ("read", "write", "zero", "flush", "extents")


@implementer(IBackend)
class MemoryBackend:
    """
    A backend keeping the image in a C{bytearray}.

    Operations run synchronously (the returned Deferreds have already
    fired) unless held. Writes and zeroes past the end grow the image, as a
    file does.

    @ivar data: the image bytes (a C{bytearray}, shared if one was given).
    @ivar mode: C{"r"} or C{"r+"}.
    @ivar closed: L{close} was called.
    @ivar flushes: number of successful L{flush} calls.
    @ivar calls: names of the operations started, in order.
    @ivar _extents: configured zero extents, or C{None}.
    @ivar _dirty: configured dirty extents, or C{None}.
    @ivar _held: operation names being held.
    @ivar _waiting: held operations: C{(Deferred, callable)} pairs.
    @ivar _heldWatchers: Deferreds waiting for an operation to be held.
    """

    name = "memory"
    blockSize = 1
    maxWriters = 1

    _log = Logger()

    def __init__(self, size: int = 0, data=None, extents=None, dirty=None,
                 mode: str = "r+", maxConnections: int = 8,
                 maxRequest: int = 8 * MiB):
        """
        @param size: size of a zeroed image, used when C{data} is C{None}.
        @param data: initial content. A C{bytearray} is used as is (two
            backends can share an image); other bytes-like objects are
            copied.
        @param extents: L{ZeroExtent} list for C{extents("zero")}; by
            default one data extent over the whole image.
        @param dirty: L{DirtyExtent} list for C{extents("dirty")}; by default
            the context is unsupported.
        @param mode: C{"r"} or C{"r+"}.
        @param maxConnections: reported as C{maxReaders}.
        @param maxRequest: reported as C{maxRequest}.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"Unsupported mode: {mode!r}")
        if data is None:
            data = bytearray(size)
        elif not isinstance(data, bytearray):
            data = bytearray(data)
        self.data = data
        self.mode = mode
        self.maxReaders = maxConnections
        self.maxRequest = maxRequest
        self.closed = False
        self.flushes = 0
        self.calls: list[str] = []
        self._extents = None if extents is None else list(extents)
        self._dirty = None if dirty is None else list(dirty)
        self._held: set[str] = set()
        self._waiting: list[tuple[defer.Deferred, object]] = []
        self._heldWatchers: list[defer.Deferred] = []

    # Test hooks.

    def hold(self, *operations: str) -> None:
        """
        Keep the named operations (all of L{OPERATIONS} if none is given)
        pending from now on, until L{release}.

        A held operation does its work when released, so a held read returns
        the data current at release time. Cancelling its Deferred drops it.
        """
        unknown = set(operations) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"Unknown operations: {sorted(unknown)}")
        self._held.update(operations or OPERATIONS)

    def release(self) -> None:
        """
        Stop holding, and run the held operations in the order they came.
        """
        self._held.clear()
        waiting, self._waiting = self._waiting, []
        for d, work in waiting:
            self._finish(d, work)

    @property
    def pending(self) -> int:
        """
        The number of held operations.
        """
        return len(self._waiting)

    def whenHeld(self) -> defer.Deferred:
        """
        @return: L{Deferred} firing with C{None} as soon as at least one
            operation is held (at once if one already is).
        """
        if self._waiting:
            return defer.succeed(None)
        d = defer.Deferred()
        self._heldWatchers.append(d)
        return d

    def getvalue(self) -> bytes:
        """
        @return: a copy of the image bytes.
        """
        return bytes(self.data)

    # IBackend.

    def size(self) -> int:
        self._checkOpen()
        return len(self.data)

    def read(self, offset: int, length: int) -> defer.Deferred:
        return self._run("read", lambda: bytes(
            self.data[offset:offset + length]))

    def write(self, offset: int, data) -> defer.Deferred:
        data = bytes(data)

        def work():
            self._checkWritable("write")
            self._put(offset, data)
        return self._run("write", work)

    def zero(self, offset: int, length: int) -> defer.Deferred:
        def work():
            self._checkWritable("zero")
            self._put(offset, bytes(length))
        return self._run("zero", work)

    def flush(self) -> defer.Deferred:
        def work():
            self.flushes += 1
        return self._run("flush", work)

    def extents(self, context: str = "zero") -> defer.Deferred:
        def work():
            if context == "zero":
                if self._extents is None:
                    return [ZeroExtent(0, len(self.data), False)]
                return list(self._extents)
            if context == "dirty" and self._dirty is not None:
                return list(self._dirty)
            raise UnsupportedOperation(
                f"Backend {self.name} does not support {context} extents")
        return self._run("extents", work)

    def close(self) -> defer.Deferred:
        """
        Close the backend. Held operations fail with L{BackendError}.
        """
        if not self.closed:
            self.closed = True
            waiting, self._waiting = self._waiting, []
            for d, _ in waiting:
                d.errback(BackendError("Backend is closed"))
        return defer.succeed(None)

    # Private.

    def _checkOpen(self) -> None:
        if self.closed:
            raise BackendError("Backend is closed")

    def _checkWritable(self, operation: str) -> None:
        if self.mode != "r+":
            raise BackendError(
                f"Backend opened read-only, cannot {operation}")

    def _put(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def _run(self, operation: str, work) -> defer.Deferred:
        if self.closed:
            return defer.fail(BackendError("Backend is closed"))
        self.calls.append(operation)
        if operation not in self._held:
            return defer.maybeDeferred(work)

        def cancel(d):
            self._waiting[:] = [w for w in self._waiting if w[0] is not d]
        d = defer.Deferred(cancel)
        self._waiting.append((d, work))
        watchers, self._heldWatchers = self._heldWatchers, []
        for w in watchers:
            w.callback(None)
        return d

    def _finish(self, d: defer.Deferred, work) -> None:
        try:
            result = work()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

