# -*- test-case-name: test.test_bodywriter -*-
"""
Response bodies written by a thread, straight to the connection's socket.

Twisted moves a download through the reactor thread: for a TLS connection
every 16 KiB record is sliced, encrypted, read back from the memory BIO and
queued by the TLS layer, and the socket gets at most
128 KiB per reactor turn, the rest of the buffer being copied again. That
costs 2-3 times the reference's CPU per GiB and caps a download at one
core (TWISTED-NOTES §6). A L{SocketWriter} takes the connection over for
the body of one large response instead: the reactor still parses the
request, writes the headers, reads the backend and keeps the books
(operation, metrics, backpressure), but a thread encrypts the body (the
calls into OpenSSL release the GIL) and writes it with blocking I/O in
large pieces; a file backend's ranges are read by the thread itself,
without leaving the image in the page cache (L{imageio.web.readahead}).
When the body is done the connection is handed back to Twisted, and
keep-alive goes on as before.

The hand-off follows the rules of L{imageio.web.handoff} (taken from
the reactor on a clean stack after the first write, a guard in place of
the TLS layer's Connection, partial writes off in the thread, aborts under
the thread's close lock).

This module touches private Twisted and pyOpenSSL attributes; each use
names the version it was checked against and the test of
C{test/test_bodywriter.py} that fails if an upgrade changes it.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import threading
from collections import deque

from twisted.internet import defer, interfaces
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio import compat
from imageio.abilities import (
    IPageCacheFreeSource, IPipelined, IThreadSource)
from imageio.compat import ffi as _ffi, lib as _lib
from imageio.logs import Logger
from imageio.protocols.nbd import NBDError
from imageio.protocols.nbdthread import Broken as NBDBroken
from imageio.deferreds import fireWaiters, whenResult
from imageio.transfer import ProducerStopped, Region
from imageio.units import MiB
from imageio.web import handoff, readahead


__all__ = ["SocketWriter", "FileRegion", "MIN_SIZE", "MAX_WRITERS",
           "running"]

MIN_SIZE = 4 * MiB
"""
Smaller bodies stay on Twisted's path: a thread per response costs more
than it saves there.
"""

MAX_WRITERS = 64
"""
Bodies written by threads at once; more downloads take Twisted's path.
"""

HIGH_WATER = 4 * MiB
"""
Bytes queued for the thread at which the producer is paused.
"""

LOW_WATER = 2 * MiB
"""
Queued bytes at which a paused producer is resumed.
"""

REGION_SIZE = 8 * MiB
"""
Bytes of one file region: the thread reads ahead, and drops from the page
cache, a region at a time.
"""

REGION_HIGH_WATER = 3 * REGION_SIZE
"""
Queued bytes of file regions at which the producer is paused: regions are
descriptions, not memory; a few keep the thread from waiting for the
reactor between them.
"""

_SEND_SIZE = 1 * MiB
"""
Most bytes of one C{os.write} call, and the size of the thread's buffers
(ciphertext drained from OpenSSL, file bytes read over TLS).
"""

_TLS_SLACK = 64 * 1024
"""
Room for the TLS records' headers and tags in the ciphertext buffer, so
that one C{BIO_read} takes all of a MiB's ciphertext.
"""

_READ_AHEAD = 8 * MiB
"""
Bytes of a file region read ahead (C{POSIX_FADV_WILLNEED}) while the
previous ones are sent, and the unit of dropping them from the page cache
behind the cursor.
"""

_END = object()
_slots = handoff.Slots(MAX_WRITERS)


_buffers = readahead.Buffers(_SEND_SIZE + _TLS_SLACK)
_zeros = memoryview(mmap.mmap(-1, _SEND_SIZE, prot=mmap.PROT_READ))
"""
Zeroes for holes, shared: a read-only anonymous mapping, all of it the
kernel's zero page.
"""


def running() -> int:
    """
    @return: how many writer threads own a connection now.
    """
    return _slots.running


class FileRegion(Region):
    """
    A range of a file for the writer thread to read and send itself:
    what a L{SocketWriter.sourceFor} view returns instead of bytes.

    @ivar fd: a descriptor of the file owned by the writer.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__(offset, length)
        self.fd = fd


class _Regions:
    """
    A read-only view of a file backend whose reads return L{FileRegion}s,
    for L{imageio.transfer.DownloadProducer}.
    """

    maxRequest = REGION_SIZE
    chunkSize = REGION_SIZE

    def __init__(self, backend, fd: int):
        self._backend = backend
        self._fd = fd
        # The backend's metrics label.
        self.name = backend.name

    def size(self) -> int:
        return self._backend.size()

    def read(self, offset: int, length: int) -> defer.Deferred:
        end = min(offset + length, self._backend.size())
        return defer.succeed(FileRegion(self._fd, offset,
                                        max(0, end - offset)))


class NBDRegion(Region):
    """
    A range of an NBD export for the writer thread to read on the lent
    connection and send itself (see L{SocketWriter.sourceFor}).
    """

    __slots__ = ()


@implementer(IPipelined)
class _NBDRegions:
    """
    A read-only view of an nbd backend for
    L{imageio.transfer.DownloadProducer}: the first read goes through the
    reactor as usual (a failing server is then answered with an error
    status, before the headers), then the connection is lent to the
    writer thread and reads return L{NBDRegion}s. If it cannot be lent,
    reads go to the backend.
    """

    readDepth = 4
    writeDepth = 1
    maxRequest = REGION_SIZE
    chunkSize = REGION_SIZE

    def __init__(self, writer: "SocketWriter", backend):
        self._writer = writer
        self._backend = backend
        # The backend's metrics label.
        self.name = backend.name
        self._first = True
        self._lent: bool | None = None
        self._waiters: list[defer.Deferred] = []

    def size(self) -> int:
        return self._backend.size()

    def read(self, offset: int, length: int) -> defer.Deferred:
        end = min(offset + length, self._backend.size())
        length = max(0, end - offset)
        if self._first:
            self._first = False
            d = self._backend.read(offset, length)
            d.addBoth(self._firstDone)
            return d
        if self._lent is None:
            d = defer.Deferred()
            self._waiters.append(d)
        else:
            d = defer.succeed(None)
        return d.addCallback(lambda _: self._read(offset, length))

    def _read(self, offset, length):
        if self._lent:
            return NBDRegion(offset, length)
        return self._backend.read(offset, length)

    def _firstDone(self, result):
        # The connection is idle now (one read at a time so far).
        self._lent = (not isinstance(result, Failure)
                      and self._writer._lend(self._backend))
        fireWaiters(self._waiters, None)
        return result


class WriterStopped(ProducerStopped):
    """
    The thread could not write the body: the client went away, stopped
    reading for longer than the idle timeout, or the writer was aborted.
    """


@implementer(interfaces.IConsumer)
class SocketWriter:
    """
    The consumer of one response body, written by a thread to the socket.

    Made by L{takeOver} once the response headers are set; then give it to
    a producer (L{imageio.transfer.DownloadProducer}) as its consumer, and
    when the producer is done, wait for L{close}; on any error wait for
    L{abort} instead. Both hand the connection back to Twisted.

    @ivar failed: why the thread stopped early (a L{Failure}), or C{None}.
    @cvar bodies: bodies taken over so far in this process (for tests).
    @cvar regions: file regions sent by the thread so far (for tests).
    """

    _log = Logger()
    bodies = 0
    regions = 0

    def __init__(self, reactor, request, size, raw, tls, conn):
        self._reactor = reactor
        self._size = size
        self._bodyStart = None
        self._bodyEnd = None
        self._request = request
        self._raw = raw
        self._tls = tls
        self._conn = conn
        self._fd = -1
        self._sock = None
        self._timeout = None
        self._scheduled = None
        self._started = False
        self._pendingOutput = b""
        self._queue: deque = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._producer = None
        self._producerPaused = False
        self._resumeScheduled = False
        self._aborting = False
        self._abortedByCaller = False
        self._ended = False
        self._regionFds: list[int] = []
        self._regionFd = None
        self._wantDirect = False
        self._directFd = None
        self._direct = None
        self._item = None
        self._sentBytes = 0
        self._itemPos = 0
        self._highWater = HIGH_WATER
        self._readBuffer = None
        self._nbd = None
        self._threadExited = False
        self._outBuffer = None
        self._outView = None
        self._readWanted = True
        self._shadows = None
        self.failed: Failure | None = None
        self._result = None
        self._waiters: list[defer.Deferred] = []

    @classmethod
    def takeOver(cls, request, size: int, reactor=None):
        """
        Reserve a writer for C{request}'s body of C{size} bytes. The
        connection is taken over on the reactor turn after the first
        L{write}: until then an error can still be answered with a status
        (a backend that fails its first read gives a 500, not a cut
        response).

        @return: a L{SocketWriter}, or C{None} when the body should take
            Twisted's path: small, not HTTP/1.x over a socket, a TLS
            connection still handshaking, or too many writers running.
        """
        if size < MIN_SIZE or request.channel is None:
            return None
        parts = handoff.split(request.channel.transport)
        if parts is None or not _slots.take():
            return None
        tls, raw, conn = parts
        if reactor is None:
            from twisted.internet import reactor
        return cls(reactor, request, size, raw, tls, conn)

    def _handOff(self) -> None:
        """
        Take the connection over and start the thread; called by the
        reactor, from a clean stack, after the first write.
        """
        self._scheduled = None
        if self._result is not None or self._aborting:
            return
        request = self._request
        raw = self._raw
        if (compat.requestGone(request) or request.channel is None
                or not handoff.usable(raw)
                or (self._conn is not None
                    and handoff.tlsConnection(self._tls) is not self._conn)):
            # Lost (or closing) since the first write: Twisted tells the
            # request; the producer stops and the caller aborts us.
            self.failed = Failure(WriterStopped(
                "The connection closed before the body started"))
            self._stopProducer()
            if self._ended:
                # close() waits: it fails, and the slot is given back.
                self._release(self.failed)
            return
        # The headers (encrypted if TLS) and anything else Twisted had not
        # sent yet: the thread sends them first, as they are.
        self._pendingOutput = handoff.takeOutput(self._tls, raw, self._conn)
        self._sock = handoff.ThreadSocket(raw.fileno())
        self._fd = self._sock.fd
        channel = request.channel
        # The idle timeout of a connection that handles a request is
        # saved, and off (see ImageioChannel).
        self._timeout = compat.savedTimeout(channel) or channel.timeOut
        self._started = True
        SocketWriter.bodies += 1
        self._log.debug("Body of {peer} handed to a writer thread",
                        peer=str(raw.getPeer()))
        self._guard()
        self._thread = threading.Thread(target=self._run,
                                        name="imageio-writer", daemon=True)
        self._thread.start()

    def _release(self, result) -> None:
        # Never started: give the slot and the file descriptors back.
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        _slots.give()
        fds, self._regionFds = self._regionFds, []
        for fd in fds:
            os.close(fd)
        nbd, self._nbd = self._nbd, None
        if nbd is not None:
            nbd.giveBack()
        self._finished(result)

    # The backend view.

    def sourceFor(self, backend):
        """
        A view of C{backend} whose reads return L{FileRegion}s, or
        C{backend} itself when that is not possible (not a file backend,
        a block device). The thread reads a region into its own buffer and
        sends it from there, encrypted over TLS (no pool thread, no copy
        into a new object, no reactor turn per chunk). Holes are not read
        at all, the reads run ahead of the sending, and the pages read are
        dropped from the page cache behind it.
        """
        if IThreadSource.providedBy(backend):
            # An nbd backend: after the first read its connection is the
            # thread's until the body is sent.
            self._highWater = REGION_HIGH_WATER
            return _NBDRegions(self, backend)
        if not IPageCacheFreeSource.providedBy(backend):
            return backend
        fd = backend.pageCacheSource()
        if fd is None:
            return backend
        self._regionFds.append(fd)
        self._highWater = REGION_HIGH_WATER
        # Where the backend found O_DIRECT to work, the thread reads with
        # it too: the page cache work of buffered reads (read ahead, copy,
        # drop) cost 0.5 s of CPU per GiB.
        self._wantDirect = (backend.direct
                            and backend.blockSize <= readahead.ALIGN)
        return _Regions(backend, fd)

    def _lend(self, backend) -> bool:
        """
        Borrow C{backend}'s NBD connection for the thread, unless the body
        is over (in the reactor).
        """
        with self._cond:
            if (self._threadExited or self._aborting
                    or self._result is not None or self.failed is not None):
                return False
            source = backend.threadSource()
            self._nbd = source
        return source is not None

    # IConsumer

    def registerProducer(self, producer, streaming) -> None:
        if not streaming:
            raise ValueError("SocketWriter needs a push producer")
        self._producer = producer
        if self.failed is not None or self._aborting:
            producer.stopProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data) -> None:
        if (self.failed is not None or self._aborting or self._ended
                or self._result is not None):
            return
        if not self._started and self._scheduled is None:
            # The headers go through Twisted now; the thread takes over on
            # a clean stack (rule 1: this may run inside the TLS layer).
            self._request.write(b"")
            self._scheduled = self._reactor.callLater(0, self._handOff)
        with self._cond:
            self._queue.append(data)
            self._queued += len(data)
            # Decided under the lock: the thread may send all of it as
            # soon as the lock is released, and it schedules a resume only
            # if it sees the pause. (Decided after the release, a body the
            # thread had already sent left the producer paused for good:
            # a download that stopped in the middle.)
            pause = (self._queued >= self._highWater
                     and not self._producerPaused
                     and self._producer is not None)
            if pause:
                self._producerPaused = True
            self._cond.notify()
        if pause:
            # A resume the thread schedules now runs after this returns.
            self._producer.pauseProducing()

    # Ending.

    def close(self) -> defer.Deferred:
        """
        Send what is queued, then hand the connection back.

        @return: L{Deferred} firing when the connection is Twisted's again,
            failing with L{WriterStopped} if the body could not be sent
            (the connection is then aborted).
        """
        if self.failed is not None:
            return defer.fail(self.failed)
        with self._cond:
            self._ended = True
            self._queue.append(_END)
            self._cond.notify()
        if not self._started and self._scheduled is None:
            if self._result is None:
                self._release(True)
        return self._whenDone()

    def abort(self) -> defer.Deferred:
        """
        Stop the thread now and hand the connection back; the caller is
        about to abort it (the body is incomplete).

        @return: L{Deferred} firing when the thread stopped.
        """
        self._abortedByCaller = True
        if not self._started:
            if self._result is None:
                self._release(True)
        else:
            self._stopThread()
        d = self._whenDone()
        d.addErrback(lambda f: None)
        return d

    def _stopThread(self) -> None:
        with self._cond:
            self._aborting = True
            self._queue.clear()
            self._cond.notify()
        if self._sock is not None:
            # Wakes the thread from poll() and fails its next write.
            self._sock.shutdown()

    def _stopProducer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()

    def _whenDone(self) -> defer.Deferred:
        return whenResult(self._result, self._waiters)

    # The thread.

    def _run(self) -> None:
        error = None
        out = None
        conn = self._conn
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            if conn is not None:
                self._outBuffer = _buffers.take()
                self._outView = memoryview(self._outBuffer)
                out = _ffi.from_buffer(self._outBuffer)
                # pyOpenSSL turns partial writes on: SSL_write would
                # return after every 16 KiB record (rule 3).
                _lib.SSL_clear_mode(compat.ssl(conn),
                                    _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
            self._sendAll(self._pendingOutput, poller)
            self._pendingOutput = b""
            while True:
                with self._cond:
                    while not self._queue and not self._aborting:
                        self._cond.wait()
                    if self._aborting:
                        raise WriterStopped("The download was aborted")
                    item = self._queue.popleft()
                if item is _END:
                    break
                if isinstance(item, FileRegion):
                    SocketWriter.regions += 1
                    self._sendRegion(item, out, poller)
                elif isinstance(item, NBDRegion):
                    SocketWriter.regions += 1
                    self._sendNBD(item, out, poller)
                elif conn is not None:
                    self._sendTLS(item, out, poller)
                else:
                    self._sendAll(item, poller)
                self._sent(len(item))
        except WriterStopped as e:
            error = e
        except (NBDError, NBDBroken) as e:
            error = WriterStopped(f"Reading from the NBD server failed: {e}")
        except OSError as e:
            error = WriterStopped(f"Writing to the client failed: "
                                  f"{e.strerror or e}")
        except Exception as e:
            # OpenSSL errors and the like: the connection is unusable.
            error = WriterStopped(f"Writing to the client failed: {e!r}")
        finally:
            if conn is not None:
                _lib.SSL_set_mode(compat.ssl(conn),
                                  _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
            self._sock.close()
            self._fd = -1
            if self._direct is not None:
                self._direct.stop()
            if self._directFd is not None:
                os.close(self._directFd)
            if self._regionFd is not None:
                os.close(self._regionFd)
            for fd in self._regionFds:
                os.close(fd)
            self._giveBuffers(out)
            with self._cond:
                self._threadExited = True
                nbd = self._nbd
            if nbd is not None:
                # Before _threadDone: the connection is the reactor's
                # again before the next request can use it.
                self._reactor.callFromThread(nbd.giveBack)
            self._reactor.callFromThread(self._threadDone, error)

    def _giveBuffers(self, out) -> None:
        if out is not None:
            _ffi.release(out)
            self._outView.release()
            _buffers.give(self._outBuffer)
        if self._readBuffer is not None:
            _buffers.give(self._readBuffer)
        self._outBuffer = self._outView = self._readBuffer = None

    def _sent(self, n: int) -> None:
        self._sentBytes += n
        with self._cond:
            self._queued -= n
            resume = (self._producerPaused
                      and self._queued <= self._highWater - HIGH_WATER
                      + LOW_WATER
                      and not self._resumeScheduled)
            if resume:
                self._resumeScheduled = True
        if resume:
            self._reactor.callFromThread(self._resume)

    def _resume(self) -> None:
        with self._cond:
            self._resumeScheduled = False
            resume = (self._producerPaused and self._producer is not None
                      and self.failed is None and not self._aborting)
            if resume:
                self._producerPaused = False
        if resume:
            self._producer.resumeProducing()

    def _wait(self, poller) -> None:
        timeout = self._timeout
        ready = poller.poll(None if not timeout else timeout * 1000)
        if self._aborting:
            raise WriterStopped("The download was aborted")
        if not ready:
            raise WriterStopped(f"The client stopped reading for "
                                f"{timeout} seconds")

    def _sendAll(self, data, poller) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view[:_SEND_SIZE])
            except BlockingIOError:
                self._wait(poller)
                continue
            view = view[n:]

    def _sendTLS(self, data, out, poller) -> None:
        conn = self._conn
        view = memoryview(data)
        while view:
            # Partial writes are off and memory BIOs never refuse a
            # write: this encrypts all of the piece at once.
            n = conn.send(view[:_SEND_SIZE])
            view = view[n:]
            while True:
                got = _lib.BIO_read(compat.writeBIO(conn), out,
                                    _SEND_SIZE + _TLS_SLACK)
                if got <= 0:
                    break
                self._sendAll(self._outView[:got], poller)

    def _sendRegion(self, region: FileRegion, out, poller) -> None:
        """
        Send a file region: holes as zeroes without reading them, data
        read into the thread's buffer and written (encrypted first over
        TLS), the next region read ahead by the kernel while this one is
        sent, and the pages dropped from the page cache once sent (a host
        running VMs must not lose its cache to a backup; the reference
        reads with C{O_DIRECT} for the same reason).

        No C{sendfile}: the pages it splices into a socket stay referenced
        until the peer reads them, and are not charged to the socket's
        buffer in full (Linux 6.x), so the sender runs ahead of a slow
        reader by hundreds of MiB of page cache that nothing can drop
        meanwhile (seen: 144 MiB of a 1 GiB image left cached on a unix
        socket, 166 MiB on TCP under load).
        """
        if self._regionFd is None:
            # The file is opened again here, not in the reactor: an open
            # on a hung mount blocks.
            self._regionFd = readahead.reopen(region.fd)
            if self._wantDirect:
                self._directFd = readahead.openDirect(region.fd)
        fd = self._regionFd
        start = region.offset
        end = start + region.length
        if self._bodyEnd is None:
            self._bodyStart = start
            self._bodyEnd = start + self._size
            if self._directFd is not None:
                self._direct = readahead.DirectReads(
                    self._directFd, start, self._bodyEnd)
        if self._direct is not None:
            self._sendDirect(region.length, out, poller)
            return
        for segStart, segEnd, isData in readahead.segments(fd, start, end):
            if not isData:
                self._sendZeros(segEnd - segStart, out, poller)
                continue
            offset = segStart
            while offset < segEnd:
                n = min(segEnd - offset, _READ_AHEAD)
                # The kernel reads the next piece of the body while this
                # one is sent.
                ahead = min(_READ_AHEAD, self._bodyEnd - offset - n)
                if ahead > 0:
                    os.posix_fadvise(fd, offset + n, ahead,
                                     os.POSIX_FADV_WILLNEED)
                self._readAndSend(fd, offset, n, out, poller)
                # Dropped behind the cursor, with the last _READ_AHEAD
                # bytes again (pages still being read ahead are kept the
                # first time).
                back = max(self._bodyStart, offset - _READ_AHEAD)
                os.posix_fadvise(fd, back, offset + n - back,
                                 os.POSIX_FADV_DONTNEED)
                offset += n
        if end == self._bodyEnd:
            # The last bytes are sent: once more over the whole body (the
            # client may be done before the thread hears of the end).
            self._dropBody()

    def _sendDirect(self, length: int, out, poller) -> None:
        # The next length bytes of the body, from the read-ahead thread's
        # pieces (which do not follow the regions' boundaries).
        direct = self._direct
        while length:
            if self._item is None:
                self._item = direct.next()
                self._itemPos = 0
            n, buf, skip = self._item
            take = min(n - self._itemPos, length)
            if buf is None:
                self._sendZeros(take, out, poller)
            else:
                start = skip + self._itemPos
                with memoryview(buf)[start:start + take] as view:
                    self._send(view, out, poller)
            self._itemPos += take
            length -= take
            if self._itemPos == n:
                if buf is not None:
                    direct.give(buf)
                self._item = None

    def _sendNBD(self, region: NBDRegion, out, poller) -> None:
        if self._direct is None:
            # The rest of the body, read ahead on the lent connection by a
            # thread of its own while this one encrypts and sends.
            end = region.offset + self._size - self._sentBytes
            self._direct = readahead.NBDReads(self._nbd.conn, region.offset,
                                              end)
        self._sendDirect(region.length, out, poller)

    def _dropBody(self) -> None:
        # Pages that were still queued on the socket when their piece was
        # dropped get a second chance (all but the last few MiB).
        os.posix_fadvise(self._regionFd, self._bodyStart,
                         self._bodyEnd - self._bodyStart,
                         os.POSIX_FADV_DONTNEED)

    def _send(self, data, out, poller) -> None:
        if self._conn is None:
            self._sendAll(data, poller)
        else:
            self._sendTLS(data, out, poller)

    def _sendZeros(self, length: int, out, poller) -> None:
        zeros = _zeros
        while length:
            n = min(length, _SEND_SIZE)
            self._send(zeros[:n], out, poller)
            length -= n

    def _readAndSend(self, fd: int, offset: int, length: int, out,
                     poller) -> None:
        if self._readBuffer is None:
            self._readBuffer = _buffers.take()
        view = memoryview(self._readBuffer)
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [view[:min(end - offset, _SEND_SIZE)]],
                          offset)
            if n == 0:
                raise OSError(errno.EIO, "The file ended before the range")
            self._send(view[:n], out, poller)
            offset += n

    # Back in the reactor.

    def _threadDone(self, error) -> None:
        _slots.give()
        self._unguard()
        if error is not None:
            self.failed = Failure(error)
            if self._abortedByCaller:
                # The caller has an error to answer with, and does (the
                # response started: errorResponse aborts the connection).
                self._stopProducer()
                self._finished(self.failed)
                return
            if not self._aborting:
                self._log.info("Download to {peer} stopped: {error}",
                               peer=str(self._raw.getPeer()), error=error)
            # The body is incomplete: the connection cannot be reused. The
            # writer is done once the request saw the disconnect (so the
            # connection's backends are closed when its operation ends, as
            # on Twisted's path).
            lost = self._request.notifyFinish()
            self._stopProducer()
            self._tls.abortConnection()
            lost.addBoth(lambda _: self._finished(self.failed))
        else:
            if self._readWanted:
                self._raw.resumeProducing()
            self._finished(True)

    def _finished(self, result) -> None:
        self._result = result
        fireWaiters(self._waiters, result)

    # Guarding the transport while the thread owns it.

    def _guard(self) -> None:
        # Reading stays off while the thread owns the connection; the
        # calls that would start or stop it are recorded and applied when
        # the socket is handed back. A close or abort stops the thread.
        self._shadows = handoff.Shadows(
            self._tls, self._raw, startReading=self._wantReading,
            stopReading=self._wantNoReading, abort=self._abortFromOutside,
            lose=self._abortFromOutside)

    def _unguard(self) -> None:
        handoff.restoreConnection(self._tls, self._conn)
        self._shadows.restore()

    def _wantReading(self) -> None:
        self._readWanted = True

    def _wantNoReading(self) -> None:
        self._readWanted = False

    def _abortFromOutside(self) -> None:
        # Somebody closes the connection while the thread owns it: the
        # body will not complete. Stop the thread; _threadDone aborts.
        self._log.debug("Connection closed during a threaded download")
        self._stopThread()
