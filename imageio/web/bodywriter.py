# -*- test-case-name: test.test_bodywriter -*-
"""
Response bodies written by a thread, straight to the connection's socket.

Twisted moves a download through the reactor thread: for a TLS connection
every 16 KiB record is sliced, encrypted, read back from the memory BIO and
queued (C{TLSMemoryBIOProtocol._write}), and the socket gets at most
128 KiB per reactor turn, the rest of the buffer being copied again. That
costs 2-3 times the reference's CPU per GiB and caps a download at one
core (TWISTED-NOTES §6). A L{SocketWriter} takes the connection over for
the body of one large response instead: the reactor still parses the
request, writes the headers, reads the backend and keeps the books
(operation, metrics, backpressure), but a thread encrypts the body (the
calls into OpenSSL release the GIL) and writes it with blocking I/O in
large pieces; on a plain socket a file backend's bytes go by C{sendfile}
without entering the process. When the body is done the connection is
handed back to Twisted, and keep-alive goes on as before.

While the thread owns the connection nothing else may touch it: Twisted
neither reads nor writes the socket (stopped), nothing is buffered in its
transport (taken over first), and an abort or close of the transport goes
through L{SocketWriter.abort} first, which stops the thread and only then
lets Twisted close. The thread writes to a duplicate of the socket's
descriptor, so the socket cannot be closed, and its number reused, under
it.

This module touches private Twisted and pyOpenSSL attributes; each use
names the version it was checked against and the test of
C{test/test_bodywriter.py} that fails if an upgrade changes it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections import deque

from twisted.internet import defer, interfaces
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.logs import Logger
from imageio.transfer import ProducerStopped, fireWaiters, whenResult
from imageio.units import MiB

try:
    # pyOpenSSL 26.4: the low level binding Connection uses; lets the
    # thread drain the memory BIO into one reused buffer instead of a new
    # allocation and a copy per call (Connection.bio_read).
    # Guarded by test_bodywriter.test_privateOpenSSL.
    from OpenSSL._util import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - a future pyOpenSSL
    _ffi = _lib = None

__all__ = ["SocketWriter", "FileRegion", "MIN_SIZE", "MAX_WRITERS"]

MIN_SIZE = 4 * MiB
"""
Smaller bodies stay on Twisted's path: a thread per response costs more
than it saves there.
"""

THREADED_TLS = False
"""
Whether TLS connections get a writer thread too. Off: with it on, a soak
(C{bench/soak.py}, 16 mixed transfers with injected disconnects and
cancels) saw about one TLS download in 1,300 fail with "bad record mac"
at the client and the reactor's TLS layer failing in C{bio_read}, and one
run crashed the daemon, while a single stream and the tests were fine: the
connection's OpenSSL object is still reached from the reactor thread
somewhere while the writer thread uses it. Plain sockets are not
affected (same soak with this off: no errors). The tests turn it on to
keep the mechanism working until that is found.
"""

MAX_WRITERS = 64
"""
Bodies written by threads at once; more downloads take Twisted's path.
"""

HIGH_WATER = 8 * MiB
"""
Bytes queued for the thread at which the producer is paused.
"""

LOW_WATER = 4 * MiB
"""
Queued bytes at which a paused producer is resumed.
"""

_SEND_SIZE = 1 * MiB
"""
Most bytes of one C{os.write} call, and the size of the thread's buffers
(ciphertext drained from OpenSSL, file bytes read over TLS).
"""

_SENDFILE_SIZE = 8 * MiB
"""
Most bytes of one C{sendfile} call (no buffer in the process).
"""

_END = object()
_active = 0
_activeLock = threading.Lock()


class FileRegion:
    """
    A range of a file for a plain connection's writer to send with
    C{os.sendfile}: what a L{SocketWriter.sourceFor} view returns instead
    of bytes.

    @ivar fd: a descriptor of the file owned by the writer.
    """

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int):
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


class _Regions:
    """
    A read-only view of a file backend whose reads return L{FileRegion}s,
    for L{imageio.transfer.DownloadProducer}.
    """

    name = "file"
    maxRequest = 8 * MiB

    def __init__(self, backend, fd: int):
        self._backend = backend
        self._fd = fd

    def size(self) -> int:
        return self._backend.size()

    def read(self, offset: int, length: int) -> defer.Deferred:
        end = min(offset + length, self._backend.size())
        return defer.succeed(FileRegion(self._fd, offset,
                                        max(0, end - offset)))


class WriterStopped(ProducerStopped):
    """
    The thread could not write the body: the client went away, stopped
    reading for longer than the idle timeout, or the writer was aborted.
    """


def _pending(raw) -> bytes | None:
    # Twisted 26.10: abstract.FileDescriptor keeps unsent output in
    # dataBuffer[offset:] followed by the _tempDataBuffer list
    # (_tempDataLen bytes). Guarded by test_bodywriter.test_privateTwisted.
    try:
        data = raw.dataBuffer[raw.offset:]
        temp = raw._tempDataBuffer
        raw._tempDataLen
    except AttributeError:
        return None
    return bytes(data) + b"".join(temp)


def _clearPending(raw) -> None:
    raw.dataBuffer = b""
    raw.offset = 0
    raw._tempDataBuffer = []
    raw._tempDataLen = 0
    raw.stopWriting()


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
    @cvar regions: file regions sent with C{sendfile} so far (for tests).
    """

    _log = Logger()
    bodies = 0
    regions = 0

    def __init__(self, reactor, request, raw, tls, conn):
        self._reactor = reactor
        self._request = request
        self._raw = raw
        self._tls = tls
        self._conn = conn
        self._fd = -1
        self._timeout = None
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
        self._readBuffer = None
        self._readWanted = True
        self._savedWrite = None
        self._later: list[bytes] = []
        self.failed: Failure | None = None
        self._result = None
        self._waiters: list[defer.Deferred] = []

    @classmethod
    def takeOver(cls, request, size: int, reactor=None):
        """
        Reserve a writer for C{request}'s body of C{size} bytes. The
        connection is taken over at the first L{write}: until then an error
        can still be answered with a status (a backend that fails its first
        read gives a 500, not a cut response).

        @return: a L{SocketWriter}, or C{None} when the body should take
            Twisted's path: small, not HTTP/1.x over a socket, a TLS
            connection still handshaking, or too many writers running.
        """
        global _active
        if size < MIN_SIZE or request.channel is None:
            return None
        transport = request.channel.transport
        conn = None
        raw = transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            if not THREADED_TLS:
                return None
            # Twisted 26.10: the pyOpenSSL Connection of the TLS layer and
            # its queue of writes waiting for the handshake.
            # Guarded by test_bodywriter.test_privateTwisted.
            conn = getattr(transport, "_tlsConnection", None)
            if (conn is None or getattr(transport, "_appSendBuffer", True)
                    or _lib is None or not hasattr(conn, "_from_ssl")):
                return None
            raw = transport.transport
        if (_pending(raw) is None or not hasattr(raw, "fileno")
                or getattr(raw, "disconnecting", True)
                or not getattr(raw, "connected", False)):
            return None
        with _activeLock:
            if _active >= MAX_WRITERS:
                return None
            _active += 1
        if reactor is None:
            from twisted.internet import reactor
        return cls(reactor, request, raw, transport, conn)

    def _start(self) -> None:
        """
        Send the headers through Twisted, take the connection over and
        start the thread.
        """
        request = self._request
        # The headers go through Twisted (and the TLS layer, whose
        # small-write aggregator must send them now: BufferingTLSTransport,
        # Twisted 26.10, guarded by test_bodywriter.test_privateTwisted).
        request.write(b"")
        aggregator = getattr(self._tls, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()
        raw = self._raw
        raw.stopReading()
        # Bytes Twisted had not sent yet (the headers, encrypted if TLS):
        # the thread sends them first, as they are.
        self._pendingOutput = _pending(raw)
        _clearPending(raw)
        self._fd = os.dup(raw.fileno())
        channel = request.channel
        # Twisted 26.10: the idle timeout of a connection that handles a
        # request waits in _savedTimeOut (see ImageioChannel).
        self._timeout = (getattr(channel, "_savedTimeOut", None)
                         or channel.timeOut)
        self._started = True
        SocketWriter.bodies += 1
        self._guard()
        self._thread = threading.Thread(target=self._run,
                                        name="imageio-writer", daemon=True)
        self._thread.start()

    def _release(self, result) -> None:
        # Never started: give the slot and the file descriptors back.
        global _active
        with _activeLock:
            _active -= 1
        fds, self._regionFds = self._regionFds, []
        for fd in fds:
            os.close(fd)
        self._finished(result)

    # The backend view.

    def sourceFor(self, backend):
        """
        A view of C{backend} whose reads return L{FileRegion}s, or
        C{backend} itself when that is not possible (not a file backend,
        a block device). The thread sends a region with C{sendfile} on a
        plain socket; over TLS it reads it into its own buffer, through
        the page cache, and encrypts from there (no pool thread, no copy
        into a new object, no reactor turn per chunk).
        """
        reopen = getattr(backend, "sendfileSource", None)
        if reopen is None:
            return backend
        fd = reopen()
        if fd is None:
            return backend
        self._regionFds.append(fd)
        return _Regions(backend, fd)

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
        if not self._started:
            self._start()
        with self._cond:
            self._queue.append(data)
            self._queued += len(data)
            queued = self._queued
            self._cond.notify()
        if (queued >= HIGH_WATER and not self._producerPaused
                and self._producer is not None):
            self._producerPaused = True
            self._producer.pauseProducing()

    # Ending.

    def close(self) -> defer.Deferred:
        """
        Send what is queued, then hand the connection back.

        @return: L{Deferred} firing when the connection is Twisted's again,
            failing with L{WriterStopped} if the body could not be sent
            (the connection is then aborted).
        """
        if not self._started:
            if self._result is None:
                self._release(True)
            return self._whenDone()
        with self._cond:
            self._ended = True
            self._queue.append(_END)
            self._cond.notify()
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
        try:
            # Wakes the thread from poll() and fails its next write.
            socket.socket(fileno=os.dup(self._fd)).shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _whenDone(self) -> defer.Deferred:
        return whenResult(self._result, self._waiters)

    # The thread.

    def _run(self) -> None:
        error = None
        out = None
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            if self._conn is not None:
                out = _ffi.new("char[]", _SEND_SIZE)
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
                    if self._conn is not None:
                        self._sendRegionTLS(item, out, poller)
                    else:
                        self._sendfile(item, poller)
                elif self._conn is not None:
                    self._sendTLS(item, out, poller)
                else:
                    self._sendAll(item, poller)
                self._sent(len(item))
        except WriterStopped as e:
            error = e
        except OSError as e:
            error = WriterStopped(f"Writing to the client failed: "
                                  f"{e.strerror or e}")
        except Exception as e:
            # OpenSSL errors and the like: the connection is unusable.
            error = WriterStopped(f"Writing to the client failed: {e!r}")
        finally:
            os.close(self._fd)
            self._fd = -1
            for fd in self._regionFds:
                os.close(fd)
            self._reactor.callFromThread(self._threadDone, error)

    def _sent(self, n: int) -> None:
        with self._cond:
            self._queued -= n
            resume = (self._producerPaused and self._queued <= LOW_WATER
                      and not self._resumeScheduled)
            if resume:
                self._resumeScheduled = True
        if resume:
            self._reactor.callFromThread(self._resume)

    def _resume(self) -> None:
        self._resumeScheduled = False
        if self._producerPaused and self._producer is not None and \
                self.failed is None and not self._aborting:
            self._producerPaused = False
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
            # Memory BIOs never refuse a write, so this consumes all of it
            # but for partial-write mode returning per record.
            n = conn.send(view[:_SEND_SIZE])
            view = view[n:]
            while True:
                # pyOpenSSL 26.4: Connection._from_ssl is the write BIO.
                # Guarded by test_bodywriter.test_privateOpenSSL.
                got = _lib.BIO_read(conn._from_ssl, out, _SEND_SIZE)
                if got <= 0:
                    break
                self._sendAll(_ffi.buffer(out, got), poller)

    def _sendRegionTLS(self, region: FileRegion, out, poller) -> None:
        if self._readBuffer is None:
            self._readBuffer = bytearray(_SEND_SIZE)
        view = memoryview(self._readBuffer)
        offset = region.offset
        end = offset + region.length
        while offset < end:
            n = os.preadv(region.fd, [view[:min(end - offset, _SEND_SIZE)]],
                          offset)
            if n == 0:
                raise OSError(errno.EIO, "The file ended before the range")
            self._sendTLS(view[:n], out, poller)
            offset += n

    def _sendfile(self, region: FileRegion, poller) -> None:
        offset = region.offset
        end = offset + region.length
        while offset < end:
            try:
                n = os.sendfile(self._fd, region.fd, offset,
                                min(end - offset, _SENDFILE_SIZE))
            except BlockingIOError:
                self._wait(poller)
                continue
            if n == 0:
                raise OSError(errno.EIO, "The file ended before the range")
            offset += n

    # Back in the reactor.

    def _threadDone(self, error) -> None:
        global _active
        with _activeLock:
            _active -= 1
        self._unguard()
        if error is not None:
            self.failed = Failure(error)
            if self._abortedByCaller:
                # The caller has an error to answer with, and does (the
                # response started: errorResponse aborts the connection).
                producer, self._producer = self._producer, None
                if producer is not None:
                    producer.stopProducing()
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
            producer, self._producer = self._producer, None
            if producer is not None:
                producer.stopProducing()
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
        # Instance attributes shadow the methods until _unguard. Reading
        # must stay off: a read makes the TLS layer use the connection's
        # OpenSSL object in the reactor thread while the writer thread
        # uses it (a soak run caught "bad record mac" and a crash). The
        # channel resumes its transport after other requests and a TLS
        # transport passes pause/resume on to the socket's (Twisted 26.10,
        # ProtocolWrapper.__getattr__); those calls are recorded and
        # applied when the socket is handed back.
        for target in {id(self._tls): self._tls,
                       id(self._raw): self._raw}.values():
            target.abortConnection = self._abortFromOutside
            target.loseConnection = self._abortFromOutside
        raw = self._raw
        raw.startReading = raw.resumeProducing = self._wantReading
        raw.stopReading = raw.pauseProducing = self._wantNoReading
        # Output from the reactor (the TLS layer would encrypt it with the
        # same OpenSSL object) waits until the socket is handed back.
        self._savedWrite = self._tls.__dict__.get("write")
        self._tls.write = self._laterWrite
        self._tls.writeSequence = self._laterWriteSequence

    def _unguard(self) -> None:
        for target in (self._tls, self._raw):
            for name in ("abortConnection", "loseConnection", "startReading",
                         "resumeProducing", "stopReading", "pauseProducing",
                         "write", "writeSequence"):
                target.__dict__.pop(name, None)
        if self._savedWrite is not None:
            # BufferingTLSTransport's own instance attribute (Twisted 26.10).
            self._tls.write = self._savedWrite
        later, self._later = self._later, []
        for data in later:
            self._tls.write(data)

    def _laterWrite(self, data) -> None:
        self._later.append(bytes(data))

    def _laterWriteSequence(self, seq) -> None:
        self._laterWrite(b"".join(seq))

    def _wantReading(self) -> None:
        self._readWanted = True

    def _wantNoReading(self) -> None:
        self._readWanted = False

    def _abortFromOutside(self) -> None:
        # Somebody closes the connection while the thread owns it: the
        # body will not complete. Stop the thread; _threadDone aborts.
        self._log.debug("Connection closed during a threaded download")
        self._stopThread()
