# -*- test-case-name: test.test_bodyreader -*-
"""
Request bodies read by a thread from a plain socket.

On a unix socket a request body arrives in reads of about 64 KiB, and each
one went through Twisted's transport, the HTTP parser and the upload sink
in the reactor thread: 0.5 s of CPU per GiB in Python alone, the reference
spending 0.05-0.15 s per GiB in all. A L{SocketReader} takes the socket of
a plain connection (the local service, or the remote one without TLS)
over for the rest of one large C{Content-Length} body: a thread fills
2 MiB buffers with blocking reads (no GIL held while it waits or copies)
and hands each full buffer to the reactor, which feeds it to Twisted's body
decoder exactly as if Twisted had read it. The decoder, the request, the
sink (limits, backpressure, the ticket's operation, metrics) and the end of
the body work as before; only the reads and their per-64 KiB cost move.

TLS connections keep Twisted's reads: a thread decrypting the body was
built and measured, and cost more CPU than it saved (see the performance
issue's notes).

Backpressure: the sink pauses and resumes its producer, the transport;
while the thread owns the socket those calls pause the thread instead
(shadowed on the transport instance), and at most two buffers wait for the
reactor. Closes and aborts of the transport stop the thread first; an
early error response stops it before answering (L{SocketReader.stop}).

This module touches private Twisted attributes; each use names the version
it was checked against and the test of C{test/test_bodyreader.py} that
fails if an upgrade changes it.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from twisted.internet import defer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http

from imageio.logs import Logger
from imageio.transfer import fireWaiters, whenResult
from imageio.units import MiB

__all__ = ["SocketReader", "MIN_SIZE", "MAX_READERS", "BUFFER_SIZE"]

MIN_SIZE = 4 * MiB
"""
Bodies with less left to read stay on Twisted's path.
"""

MAX_READERS = 64
"""
Bodies read by threads at once; more take Twisted's path.
"""

BUFFER_SIZE = 2 * MiB
"""
Bytes per hand-over to the reactor (below malloc's 4 MiB mmap threshold,
see L{imageio.tap._tuneMalloc}).
"""

_CREDITS = 2
"""
Buffers read ahead of the reactor.
"""

_WAKE = 0.2
"""
Seconds a blocked read waits before the thread looks at its stop flag.
"""

_active = 0
_activeLock = threading.Lock()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


class _Stopped(Exception):
    pass


class SocketReader:
    """
    The reader of the rest of one request body, in a thread.

    @ivar active: the thread owns the socket.
    @cvar bodies: bodies taken over so far in this process (for tests).
    """

    _log = Logger()
    bodies = 0

    def __init__(self, reactor, channel, transport, decoder, remaining,
                 timeout):
        self._reactor = reactor
        self._channel = channel
        self._transport = transport
        self._decoder = decoder
        self._remaining = remaining
        self._timeout = timeout
        self._cond = threading.Condition()
        self._paused = False
        self._credits = _CREDITS
        self._stopping = False
        self._abortAfter = False
        self._result = None
        self._waiters: list[defer.Deferred] = []
        transport.stopReading()
        self._sock = socket.socket(fileno=os.dup(transport.fileno()))
        self.active = True
        SocketReader.bodies += 1
        self._guard()
        self._thread = threading.Thread(target=self._run,
                                        name="imageio-reader", daemon=True)
        self._thread.start()

    @classmethod
    def takeOver(cls, request, reactor=None):
        """
        Take over the socket of C{request} for the rest of its body, from
        inside C{handleContentChunk} (Twisted has delivered everything it
        read; the decoder counts what is left).

        @return: a L{SocketReader}, or C{None} when the body stays on
            Twisted's path: TLS, chunked, less than L{MIN_SIZE} left, not
            a socket, or too many readers.
        """
        global _active
        channel = request.channel
        if channel is None:
            return None
        transport = channel.transport
        if isinstance(transport, TLSMemoryBIOProtocol):
            return None
        # Twisted 26.10: HTTPChannel._transferDecoder decodes the body of
        # the request being received; an _IdentityTransferDecoder (a
        # Content-Length body) keeps the bytes still expected in
        # contentLength, decremented before each chunk is delivered.
        # Guarded by test_bodyreader.test_privateTwisted.
        decoder = getattr(channel, "_transferDecoder", None)
        if type(decoder) is not http._IdentityTransferDecoder:
            return None
        remaining = decoder.contentLength
        if (remaining is None or remaining < MIN_SIZE
                or not hasattr(transport, "fileno")
                or not hasattr(transport, "stopReading")
                or getattr(transport, "disconnecting", True)
                or not getattr(transport, "connected", False)):
            return None
        with _activeLock:
            if _active >= MAX_READERS:
                return None
            _active += 1
        if reactor is None:
            from twisted.internet import reactor
        try:
            return cls(reactor, channel, transport, decoder, remaining,
                       channel.timeOut)
        except BaseException:
            with _activeLock:
                _active -= 1
            raise

    def stop(self) -> defer.Deferred:
        """
        Stop reading now (an early response is coming) and give the socket
        back. Bytes read and not delivered are dropped: the body is being
        refused.

        @return: L{Deferred} firing once Twisted owns the socket again.
        """
        self._stopThread()
        return whenResult(self._result, self._waiters)

    def whenDone(self) -> defer.Deferred:
        """
        @return: L{Deferred} firing once Twisted owns the socket again.
        """
        return whenResult(self._result, self._waiters)

    def _stopThread(self) -> None:
        # The thread sees it within _WAKE seconds (its receive timeout).
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # The thread.

    def _run(self) -> None:
        error = None
        sock = self._sock
        try:
            # Blocking reads that wait for a whole buffer (MSG_WAITALL):
            # one system call and one GIL hand-off per buffer instead of
            # one per ~48 KiB the socket has queued. The descriptor shares
            # its flags and options with Twisted's: both are put back
            # before the socket is handed back.
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            _timeval(_WAKE))
            remaining = self._remaining
            while remaining:
                with self._cond:
                    while (self._paused or not self._credits) and \
                            not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        raise _Stopped()
                    self._credits -= 1
                buf = bytearray(min(BUFFER_SIZE, remaining))
                self._fill(memoryview(buf))
                remaining -= len(buf)
                if not remaining:
                    # Twisted may read again as soon as the last buffer
                    # is delivered.
                    self._restore(sock)
                self._reactor.callFromThread(self._deliver, buf,
                                             remaining == 0)
        except _Stopped:
            pass
        except OSError as e:
            error = e
        except Exception as e:
            error = e
        finally:
            self._restore(sock)
            sock.close()
        if error is not None or self._stopping:
            self._reactor.callFromThread(self._threadStopped, error)

    @staticmethod
    def _restore(sock) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            _timeval(0))
            sock.setblocking(False)
        except OSError:
            pass

    def _fill(self, view: memoryview) -> None:
        filled = 0
        lastData = time.monotonic()
        while filled < len(view):
            if self._stopping:
                raise _Stopped()
            try:
                n = self._sock.recv_into(view[filled:], len(view) - filled,
                                         socket.MSG_WAITALL)
            except (BlockingIOError, TimeoutError):
                n = None
            if n == 0:
                raise OSError("The client closed the connection in the "
                              "middle of the body")
            now = time.monotonic()
            if n:
                filled += n
                lastData = now
            elif self._timeout and now - lastData > self._timeout:
                raise OSError(f"No data from the client for "
                              f"{self._timeout} seconds")

    # Back in the reactor.

    def _deliver(self, buf: bytearray, last: bool) -> None:
        if self._result is not None:
            return
        if self._stopping:
            # Dropped: the body is being refused. The thread ended without
            # a report if this was its last buffer.
            if last:
                self._threadStopped(None)
            return
        if last:
            # The socket goes back before the body ends: ending it makes
            # the channel pause the transport and, after the response,
            # resume it; those must reach Twisted.
            self._handBack()
        self._channel.resetTimeout()
        self._decoder.dataReceived(buf)
        if not last:
            with self._cond:
                self._credits += 1
                self._cond.notify()

    def _threadStopped(self, error) -> None:
        if self._result is not None:
            return
        self._handBack()
        if error is not None:
            self._log.info("Upload from {peer} stopped: {error}",
                           peer=str(self._transport.getPeer()), error=error)
            if not self._abortAfter:
                self._transport.abortConnection()

    def _handBack(self) -> None:
        global _active
        with _activeLock:
            _active -= 1
        self.active = False
        self._unguard()
        if self._abortAfter:
            # Somebody closed the connection while the thread owned it.
            self._transport.abortConnection()
        elif not self._paused:
            self._transport.startReading()
        self._result = True
        fireWaiters(self._waiters, True)

    # Guarding the transport while the thread owns the socket.

    def _guard(self) -> None:
        # Twisted must not read the socket while the thread does: every
        # way of starting or stopping its reads pauses or resumes the
        # thread instead.
        t = self._transport
        t.pauseProducing = t.stopReading = self._pause
        t.resumeProducing = t.startReading = self._resume
        t.abortConnection = self._abortFromOutside
        t.loseConnection = self._loseFromOutside

    def _unguard(self) -> None:
        for name in ("pauseProducing", "resumeProducing", "stopReading",
                     "startReading", "abortConnection", "loseConnection"):
            self._transport.__dict__.pop(name, None)

    def _pause(self) -> None:
        with self._cond:
            self._paused = True

    def _resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def _abortFromOutside(self) -> None:
        self._abortAfter = True
        self._stopThread()

    def _loseFromOutside(self) -> None:
        # The body is not complete: a graceful close would wait for it.
        self._abortAfter = True
        self._stopThread()
