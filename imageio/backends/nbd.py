# -*- test-case-name: test.test_backend_nbd -*-
"""
The NBD backend: an image served by an NBD server (usually qemu-nbd).

One backend holds one L{NBDClient} connection. Commands are pipelined, so a
caller may keep several reads or writes in flight on one backend.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.abilities import (
    IPieceReads, IPipelined, IThreadSource, IThreadTarget)
from imageio.logs import Logger
from imageio.backends import IBackend
from imageio.errors import BackendError, UnsupportedOperation
from imageio.extents import DirtyExtent, ZeroExtent
from imageio.protocols import nbd, nbdthread, nbdwire
from imageio.units import MiB

__all__ = ["open", "NBDBackend"]

DEFAULT_MAX_CONNECTIONS = 8
DEFAULT_BUFFER_SIZE = 8 * MiB

# Block status is asked for in steps of this size: the largest 1 MiB
# aligned length a request can carry (the reference asks for 2 GiB). Half
# the requests of 2 GiB steps: the 8 TiB bench image (32,768 extents) costs
# the daemon ~0.3 s of CPU instead of ~0.5 s. The time is qemu-nbd's, which
# reads every 4 KiB L2 slice of a qcow2 image one by one, the same for any
# step size or depth (docs/architecture.md, "Data paths").
MAX_STATUS_STEP = nbdwire.MAX_LENGTH + 1 - 1 * MiB

# Block status requests in flight while listing extents: the server always
# has the next one while we parse a reply. Steps times depth bounds the
# range whose extents are held unmerged (16 GiB, as 8 steps of 2 GiB did).
STATUS_DEPTH = 4

# Internal extent flags: base:allocation's HOLE and ZERO bits as they are,
# plus a bit each for "dirty" (bitmap bit 0) and "backing" (allocation
# depth 0), so extents of different contexts merge on one integer.
_HOLE = nbd.STATE_HOLE
_ZERO = nbd.STATE_ZERO
_DIRTY = 1 << 2
_BACKING = 1 << 3


def open(reactor, url: str, *, mode: str, sparse: bool = False,
         dirty: bool = False, config=None) -> defer.Deferred[NBDBackend]:
    """
    Connect to the NBD export C{url} names.

    @param mode: C{"r"} (read only) or C{"r+"} (read write; C{"w"} is
        accepted as write only).
    @param sparse: zero deallocates space (no C{NO_HOLE} flag).
    @param dirty: negotiate the export's dirty bitmap, needed by
        C{extents("dirty")}.
    @param config: the daemon config (C{daemon.max_connections},
        C{backend_nbd.buffer_size}), or L{None} for the defaults.
    @return: L{Deferred} firing with an L{NBDBackend}, or failing with
        L{BackendError}.
    """
    if mode not in ("r", "r+", "w"):
        return defer.fail(ValueError(f"Unsupported mode {mode!r}"))
    if config is None:
        maxConnections = DEFAULT_MAX_CONNECTIONS
        bufferSize = DEFAULT_BUFFER_SIZE
    else:
        maxConnections = config.daemon.max_connections
        bufferSize = config.backend_nbd.buffer_size

    def connected(client):
        return NBDBackend(client, mode=mode, sparse=sparse, dirty=dirty,
                          maxConnections=maxConnections,
                          bufferSize=bufferSize)

    def failed(f):
        if f.check(BackendError):
            return f
        raise BackendError(
            f"Cannot open NBD backend {url}: {f.getErrorMessage()}"
        ) from f.value

    d = defer.maybeDeferred(nbd.connect, reactor, url, dirty=dirty)
    d.addCallbacks(connected, failed)
    return d


def _wrap(what: str):
    """
    An errback turning NBD failures into L{BackendError}.
    """
    def errback(f: Failure):
        if f.check(nbd.NBDError):
            raise BackendError(f"NBD {what} failed: {f.getErrorMessage()}") \
                from f.value
        return f
    return errback


def _overlay(a: list, b: list):
    """
    Combine two extent lists that describe the same range with different
    flag bits.

    @param a: C{[(length, flags), ...]}.
    @param b: the same shape; flags must not share bits with C{a}'s.
    @return: a list of C{(length, flags_a | flags_b)}, cut wherever either
        list has a boundary, ending where the shorter list ends.
    """
    out = []
    i = j = 0
    la = lb = 0
    fa = fb = 0
    while True:
        if la == 0:
            if i == len(a):
                break
            la, fa = a[i]
            i += 1
        if lb == 0:
            if j == len(b):
                break
            lb, fb = b[j]
            j += 1
        n = min(la, lb)
        out.append((n, fa | fb))
        la -= n
        lb -= n
    return out


class ThreadTarget:
    """
    The NBD connection of an upload, lent to the one thread that writes
    whole buffers to it (L{NBDBackend.threadTarget}): each buffer goes to
    the server with one C{sendmsg} from the thread, instead of through the
    reactor, where the sink joins it, the client copies it to C{bytes} and
    Twisted joins it with its header again.

    @ivar blockSize: writes must start and end on multiples of this.
    """

    def __init__(self, client: nbd.NBDClient, sock, reactor):
        self._client = client
        self._reactor = reactor
        self._conn = nbdthread.ThreadConnection(
            sock, min(client.maximumBlockSize, DEFAULT_BUFFER_SIZE),
            client.structuredReplies)
        self.blockSize = client.minimumBlockSize

    def write(self, view: memoryview, offset: int) -> None:
        """
        Write all of C{view} at C{offset} (in the calling thread).

        @raise BackendError: the write failed.
        """
        try:
            self._conn.write(view, offset)
        except (nbd.NBDError, nbdthread.Broken) as e:
            # The server's error stays the cause: its errno is what the
            # client tells the user (ENOSPC: no space left). Without its
            # frames, which hold a view of the thread's buffer.
            raise BackendError(f"NBD write failed: {e}") \
                from e.with_traceback(None)

    def close(self) -> None:
        """
        Give the connection back to the reactor (from the thread).
        """
        self._reactor.callFromThread(self._client.giveBack,
                                     self._conn.broken)


class ThreadSource:
    """
    The NBD connection of a download, lent to the writer thread
    (L{NBDBackend.threadSource}), which reads into its own buffers and
    sends from there.

    @ivar conn: the L{nbdthread.ThreadConnection}, for the thread only.
    """

    def __init__(self, backend: "NBDBackend", sock):
        client = backend.client
        self._client = client
        self._size = backend.size()
        self.conn = nbdthread.ThreadConnection(
            sock, min(client.maximumBlockSize, DEFAULT_BUFFER_SIZE),
            client.structuredReplies)

    def size(self) -> int:
        return self._size

    def giveBack(self) -> None:
        """
        Give the connection back (in the reactor, once the thread is done
        with it).
        """
        self._client.giveBack(self.conn.broken or self.conn.inFlight > 0)


@implementer(IBackend, IPipelined, IPieceReads, IThreadSource, IThreadTarget)
class NBDBackend:
    """
    An L{IBackend} over one NBD connection.

    @ivar _client: the L{nbd.NBDClient}, or L{None} once closed.
    """

    _log = Logger()
    name = "nbd"
    readDepth = 4
    writeDepth = 4

    def __init__(self, client: nbd.NBDClient, *, mode: str = "r",
                 sparse: bool = False, dirty: bool = False,
                 maxConnections: int = DEFAULT_MAX_CONNECTIONS,
                 bufferSize: int = DEFAULT_BUFFER_SIZE):
        self._client = client
        self._mode = mode
        self._sparse = sparse
        self._dirty = dirty
        self._closed: defer.Deferred[None] | None = None
        self.blockSize = client.minimumBlockSize
        self.maxReaders = maxConnections
        self.maxWriters = maxConnections
        self.maxRequest = min(client.maximumBlockSize, bufferSize)
        self._size = client.exportSize

    @property
    def client(self) -> nbd.NBDClient:
        """
        The underlying L{nbd.NBDClient}.
        """
        return self._client

    def size(self) -> int:
        return self._size

    def _check(self, op: str, write: bool = False):
        if self._closed is not None:
            raise BackendError(f"Backend closed: {op}")
        if write and self._mode == "r":
            raise BackendError(f"Unsupported operation: {op}")
        if not write and self._mode == "w":
            raise BackendError(f"Unsupported operation: {op}")

    def read(self, offset: int, length: int) -> defer.Deferred:
        return self._read(lambda o, n: self._client.read(o, n), offset,
                          length, b"")

    def readPieces(self, offset: int, length: int) -> defer.Deferred:
        """
        L{read} without joining the payload: a list of bytes-like pieces
        whose concatenation is the data (L{nbd.NBDClient.readPieces}), for
        the checksum, which hashes the pieces where they are.

        @param length: at most L{maxRequest}.
        """
        return self._read(lambda o, n: self._client.readPieces(o, n),
                          offset, length, [])

    def _read(self, call, offset: int, length: int, empty):
        # call(offset, length) once the backend is known to be open.
        try:
            self._check("read")
        except BackendError:
            return defer.fail()
        length = max(0, min(length, self._size - offset))
        if length == 0:
            return defer.succeed(empty)
        return call(offset, length).addErrback(_wrap("read"))

    def write(self, offset: int, data) -> defer.Deferred[None]:
        try:
            self._check("write", write=True)
        except BackendError:
            return defer.fail()
        return self._client.write(offset, data).addErrback(_wrap("write"))

    def zero(self, offset: int, length: int) -> defer.Deferred[None]:
        try:
            self._check("zero", write=True)
            if not self._client.canZero:
                raise BackendError("NBD server does not support zero")
        except BackendError:
            return defer.fail()
        d = self._client.zero(offset, length, noHole=not self._sparse)
        return d.addErrback(_wrap("zero"))

    def flush(self) -> defer.Deferred[None]:
        if self._closed is not None:
            return defer.fail(BackendError("Backend closed: flush"))
        return self._client.flush().addErrback(_wrap("flush"))

    def extents(self, context: str = "zero") -> defer.Deferred[list]:
        try:
            if context not in ("zero", "dirty"):
                raise UnsupportedOperation(
                    f"Backend nbd does not support {context} extents")
            if context == "dirty" and (not self._dirty
                                       or self._client.dirtyBitmap is None):
                raise UnsupportedOperation(
                    f"NBD export {self._client.exportName!r} does not "
                    f"support dirty extents")
            if self._closed is not None:
                raise BackendError("Backend closed: extents")
        except BackendError:
            return defer.fail()
        if context == "zero" and not self._client.hasBaseAllocation:
            return defer.succeed([ZeroExtent(0, self._size, False, False)])
        d = defer.ensureDeferred(self._extents(context == "dirty"))
        return d.addErrback(_wrap("block status"))

    async def _extents(self, dirty: bool) -> list:
        end = self._size
        steps = [(o, min(o + MAX_STATUS_STEP, end))
                 for o in range(0, end, MAX_STATUS_STEP)]
        merged: list[list[int]] = []   # [start, length, flags]
        # Up to STATUS_DEPTH steps are asked for at once (the server
        # answers them concurrently), and merged in order.
        pending: deque = deque()
        failed = []
        try:
            for i, (first, last) in enumerate(steps):
                pending.append(defer.ensureDeferred(
                    self._statusStep(first, last, dirty)))
                if len(pending) < STATUS_DEPTH and i + 1 < len(steps):
                    continue
                self._merge(merged, await pending.popleft())
            while pending:
                self._merge(merged, await pending.popleft())
        except BaseException:
            # Never cancel: cancelling one NBD request aborts the
            # connection. Let the others end; their errors are ours.
            for d in pending:
                d.addErrback(failed.append)
            raise
        if dirty:
            return [DirtyExtent(s, n, bool(f & _DIRTY), bool(f & _ZERO))
                    for s, n, f in merged]
        return [ZeroExtent(s, n, bool(f & _ZERO), bool(f & _BACKING))
                for s, n, f in merged]

    @staticmethod
    def _merge(merged: list, step: list) -> None:
        for start, length, flags in step:
            if merged and merged[-1][2] == flags:
                merged[-1][1] += length
            else:
                merged.append([start, length, flags])

    async def _statusStep(self, offset: int, end: int, dirty: bool) -> list:
        """
        The extents of C{[offset, end)} as C{[start, length, flags]},
        asking again while the server answers for less than the range.
        """
        client = self._client
        result: list[list[int]] = []
        while offset < end:
            reply = await client.blockStatus(offset, end - offset)
            base = reply.get(nbd.BASE_ALLOCATION)
            if dirty:
                marks = [(n, _DIRTY if f & nbd.STATE_DIRTY else 0)
                         for n, f in reply.get(client.dirtyBitmap, ())]
                extents = _overlay(base, marks) if base is not None else marks
            elif nbd.ALLOCATION_DEPTH in reply and base is not None:
                depth = [(n, _BACKING if f == 0 else 0)
                         for n, f in reply[nbd.ALLOCATION_DEPTH]]
                extents = _overlay(base, depth)
            else:
                extents = base or []
            if not extents:
                raise nbd.NBDProtocolError(
                    f"Block status reply without the needed contexts: "
                    f"{sorted(reply)}")
            for length, flags in extents:
                # The last extent may reach past the range asked for.
                length = min(length, end - offset)
                if result and result[-1][2] == flags:
                    result[-1][1] += length
                else:
                    result.append([offset, length, flags])
                offset += length
                if offset == end:
                    # Ignore anything a non-compliant server sends beyond.
                    break
        return result

    def threadSource(self) -> ThreadSource | None:
        """
        This backend's connection lent for a writer thread's reads
        (L{imageio.web.bodywriter}); give it back with
        L{ThreadSource.giveBack}. Call in the reactor, with no request in
        flight. L{None} when the backend is write-only or closed, or the
        connection is busy or cannot be lent.
        """
        if self._closed is not None or self._mode == "w":
            return None
        sock = self._client.lend()
        if sock is None:
            return None
        self._log.debug("NBD connection lent to a writer thread")
        return ThreadSource(self, sock)

    def threadTarget(self) -> ThreadTarget | None:
        """
        A way for a body thread (L{imageio.web.bodyreader}) to write an
        upload's bytes itself, on this backend's connection lent to it (see
        L{ThreadTarget}). Call in the reactor, with no request in flight.
        L{None} when the backend is read-only or closed, or the connection
        is busy or cannot be lent.
        """
        if self._closed is not None or self._mode == "r":
            return None
        sock = self._client.lend()
        if sock is None:
            return None
        self._log.debug("NBD connection lent to a body thread")
        return ThreadTarget(self._client, sock,
                            self._client.transport.reactor)

    def close(self) -> defer.Deferred[None]:
        if self._closed is None:
            self._closed = self._client.close()
        # Every caller gets its own Deferred firing when the connection is
        # gone.
        d: defer.Deferred[None] = defer.Deferred()
        self._closed.addBoth(lambda result: (d.callback(None), result)[1])
        return d
