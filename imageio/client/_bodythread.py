# -*- test-case-name: test.test_client_bodythread -*-
"""
Response bodies of the client's downloads read by a thread.

Twisted reads a response body in the reactor thread: 64 KiB socket reads,
and over TLS a decryption per 32 KiB, one by one, for every connection of
the transfer, on the thread that also writes the local image over NBD.
That kept the client on one core and behind the reference client (which
moves each connection in a thread of its own). So once a C{GET} response
of L{MIN_SIZE} bytes or more has its headers, a thread takes the
connection over for the rest of the body, reads it into buffers with
blocking calls (decrypting through the connection's own OpenSSL object,
which releases the GIL), and hands each buffer to the reactor, which feeds
it to Twisted's HTTP body decoder as if Twisted had read it: the response,
the consumer's backpressure, the end of the body and the connection's
return to the pool are Twisted's as before. Then the connection is given
back to Twisted.

The ownership rules are the daemon's (L{imageio.web.handoff}, the same
helpers): the hand-off starts on a clean reactor stack (C{callLater(0)}),
never from the response callback that runs inside the TLS layer; Twisted's
reads stop at once and a L{handoff.Guard} replaces the Connection while
the thread owns it; the transport's pause, resume, close and abort are
shadowed (a pause holds the thread back, a close or abort stops it and
aborts the connection once it is back); the connection comes back through
C{callFromThread}, with ciphertext read past the body delivered through the
TLS layer.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from imageio import compat
from imageio.logs import Logger
from imageio.units import MiB
from imageio.web import handoff

__all__ = ["ResponseReader", "RequestWriter", "MIN_SIZE", "BUFFER_SIZE",
           "running"]

MIN_SIZE = 4 * MiB
"""
Bodies with less left to read stay on Twisted's path.
"""

BUFFER_SIZE = 2 * MiB
"""
Bytes per hand-over to the reactor.
"""

IDLE_TIMEOUT = 60.0
"""
Seconds without a byte from the server before the thread gives up.
"""

_CREDITS = 2
"""
Buffers read ahead of the reactor.
"""

_WAKE = 0.2
"""
Seconds a blocked read waits before the thread looks at its stop flag.
"""

_POOL_IDLE = 10.0
"""
Seconds an idle body thread waits for the next body before it exits.
"""

_active = 0
_activeLock = threading.Lock()


class _Pool:
    """
    Daemon threads running the bodies, reused from one body to the next.

    A new thread per body cost more than the body on images with many
    small extents: C{Thread.start} waits until the new thread runs, and
    on a busy machine that held the reactor thread for milliseconds each
    time (1.7 s of a 2.9 s download of a 1 GiB image with 64 extents of
    8 MiB). A body is queued here instead; an idle thread takes it, and a
    thread is started only when none is idle.
    """

    def __init__(self, idle: float = _POOL_IDLE):
        self._cond = threading.Condition()
        self._jobs: deque = deque()
        self._idle = 0
        self._idleTimeout = idle
        self.threads = 0

    def run(self, job) -> None:
        """
        Run C{job()} in a thread of the pool (from the reactor).
        """
        with self._cond:
            self._jobs.append(job)
            if self._idle >= len(self._jobs):
                self._cond.notify()
                return
            self.threads += 1
        threading.Thread(target=self._work, name="imageio-client-body",
                         daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                deadline = time.monotonic() + self._idleTimeout
                while not self._jobs:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._idle -= 1
                        self.threads -= 1
                        return
                    self._cond.wait(left)
                self._idle -= 1
                job = self._jobs.popleft()
            # Each job reports its own errors through callFromThread.
            job()


_pool = _Pool()


def running() -> int:
    """
    @return: how many reader threads own (or are taking) a connection now.
    """
    return _active


class _Stopped(Exception):
    pass


class _BodyThread:
    """
    What L{ResponseReader} and L{RequestWriter} share: stopping their
    thread, and an abort or close of the transport while it owns the
    connection.
    """

    def _stopThread(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if not self._started:
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            if not self._done:
                self._handBack()
            return
        # Wake the thread from a blocked read or write at once (rule 4).
        self._sock.shutdown()

    def _abortFromOutside(self) -> None:
        # The body is not complete: a graceful close would wait for it.
        self._abortAfter = True
        self._stopThread()


class ResponseReader(_BodyThread):
    """
    The reader of the rest of one response body, in a thread.

    @cvar bodies: bodies taken over so far in this process (for tests).
    """

    _log = Logger()
    bodies = 0

    def __init__(self, reactor, tls, raw, conn, http11, parser, decoder):
        self._reactor = reactor
        self._tls = tls
        self._raw = raw
        self._conn = conn
        self._http11 = http11
        self._parser = parser
        self._decoder = decoder
        self._cond = threading.Condition()
        self._paused = False
        self._credits = _CREDITS
        self._stopping = False
        self._abortAfter = False
        self._started = False
        self._done = False
        self._sock = None
        self._pendingOutput = b""
        self._remaining = 0
        # Rule 1: no reads from here on; the thread takes over on a clean
        # stack (this runs inside the response callback, inside the TLS
        # layer's dataReceived).
        raw.stopReading()
        self._shadows = handoff.Shadows(
            tls, raw, startReading=self._resume, stopReading=self._pause,
            abort=self._abortFromOutside, lose=self._abortFromOutside)
        self._scheduled = reactor.callLater(0, self._handOff)

    @classmethod
    def takeOver(cls, producer, reactor):
        """
        Decide to read the rest of a response body in a thread, from the
        consumer's C{registerProducer}.

        @param producer: the protocol receiving the body (its C{transport}
            is the response's L{TransportProxyProducer}).
        @return: a L{ResponseReader}, or C{None} when the body stays on
            Twisted's path: chunked, less than L{MIN_SIZE} left, a
            connection that cannot be taken, or a proxy already cut off.
        """
        global _active
        proxy = getattr(producer, "transport", None)
        tls = transport = compat.responseTransport(proxy)
        if transport is None:
            return None
        conn = None
        if isinstance(transport, TLSMemoryBIOProtocol):
            conn = handoff.tlsConnection(transport)
            if conn is None:
                return None
            http11 = transport.wrappedProtocol
            transport = transport.transport
        else:
            http11 = compat.unwrapProtocol(
                getattr(transport, "protocol", None))
        parser = compat.responseParser(http11)
        decoder = getattr(parser, "bodyDecoder", None)
        if not compat.identityDecoder(decoder):
            return None
        remaining = decoder.contentLength
        if (remaining is None or remaining < MIN_SIZE
                or not hasattr(transport, "stopReading")
                or not handoff.usable(transport)):
            return None
        with _activeLock:
            _active += 1
        try:
            return cls(reactor, tls, transport, conn, http11, parser,
                       decoder)
        except BaseException:
            with _activeLock:
                _active -= 1
            raise

    # In the reactor: the hand-off.

    def _handOff(self) -> None:
        self._scheduled = None
        decoder = self._decoder
        if (self._done or self._stopping
                or compat.responseParser(self._http11) is not self._parser
                or self._parser.bodyDecoder is not decoder
                or not decoder.contentLength
                or not handoff.usable(self._raw)
                or (self._conn is not None and
                    handoff.tlsConnection(self._tls) is not self._conn)):
            # The body ended (or the connection went) meanwhile.
            if not self._done:
                self._handBack()
            return
        self._remaining = decoder.contentLength
        self._pendingOutput = handoff.takeOutput(self._tls, self._raw,
                                                 self._conn)
        self._sock = handoff.ThreadSocket(self._raw.fileno())
        self._started = True
        ResponseReader.bodies += 1
        _pool.run(self._run)

    # The thread.

    def _run(self) -> None:
        error = None
        sock = self._sock.sock
        try:
            handoff.setBlocking(sock, _WAKE)
            if self._pendingOutput:
                sock.sendall(self._pendingOutput)
                self._pendingOutput = b""
            receiver = handoff.Receiver(self._sock, self._conn, self._idle,
                                        "the server")
            remaining = self._remaining
            while remaining:
                with self._cond:
                    while (self._paused or not self._credits) and \
                            not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        raise _Stopped()
                    self._credits -= 1
                n = min(BUFFER_SIZE, remaining)
                buf = bytearray(n)
                receiver.fill(buf)
                remaining -= n
                if not remaining:
                    # Twisted may read again as soon as the last buffer
                    # is delivered.
                    handoff.setNonBlocking(sock)
                self._reactor.callFromThread(self._deliver, buf,
                                             remaining == 0)
        except _Stopped:
            pass
        except Exception as e:
            # Without the frames, whose views of the buffer would keep it.
            error = e.with_traceback(None)
        finally:
            handoff.setNonBlocking(sock)
            self._sock.close()
        if error is not None or self._stopping:
            self._reactor.callFromThread(self._threadStopped, error)

    def _idle(self, lastData: float) -> None:
        if self._stopping:
            raise _Stopped()
        if time.monotonic() - lastData > IDLE_TIMEOUT:
            raise OSError(f"No data from the server for {IDLE_TIMEOUT:g} "
                          f"seconds")

    # Back in the reactor.

    def _deliver(self, buf, last: bool) -> None:
        if self._done:
            return
        if self._stopping:
            # Dropped: the response is being given up.
            if last:
                self._threadStopped(None)
            return
        if last:
            # The connection goes back before the body ends: ending it
            # returns the connection to the pool, which may use it at once.
            self._handBack()
        try:
            self._decoder.dataReceived(buf)
        except BaseException:
            # What HTTP11ClientProtocol.dataReceived does with a parser
            # error: the connection is of no use any more.
            self._log.failure("Response body delivery failed", Failure())
            self._tls.abortConnection()
            return
        if not last:
            with self._cond:
                self._credits += 1
                self._cond.notify()

    def _threadStopped(self, error) -> None:
        if self._done:
            return
        self._handBack()
        if error is not None:
            self._log.info("Download from {peer} stopped: {error}",
                           peer=str(self._raw.getPeer()), error=error)
            # The response fails with the connection's loss.
            if not self._abortAfter:
                self._tls.abortConnection()

    def _handBack(self) -> None:
        global _active
        with _activeLock:
            _active -= 1
        self._done = True
        if self._started:
            handoff.restoreConnection(self._tls, self._conn)
        self._shadows.restore()
        if self._abortAfter:
            # Somebody closed the connection while the thread owned it.
            self._tls.abortConnection()
            return
        if not self._paused:
            self._raw.startReading()
        if self._conn is not None and self._started:
            # Ciphertext read past the body waits in OpenSSL: deliver it
            # on a clean stack.
            self._reactor.callLater(0, handoff.flushReceived, self._tls,
                                    self._conn)

    # Shadows of the transport's methods while the thread owns it.

    def _pause(self) -> None:
        with self._cond:
            self._paused = True

    def _resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()



HIGH_WATER = 8 * MiB
"""
Bytes of a request body queued for the writer thread at which the body's
producer is paused; it is resumed below L{LOW_WATER}.
"""

LOW_WATER = 4 * MiB

_END = object()


class _IdleTimeout(OSError):
    pass


class _PeerSpoke(Exception):
    """
    The server answered (or closed) while the body was being sent.
    """


class RequestWriter(_BodyThread):
    """
    The writer of the rest of one request body, in a thread: the body's
    writes to the connection's transport are queued for the thread, which
    sends them (encrypting them through the connection's own OpenSSL
    object over TLS), and hands the connection back once the body is out.

    Should the server answer before the body is out (an error: the body
    is refused), the thread stops and Twisted reads the answer; what the
    thread had not sent goes through Twisted as usual.

    @cvar bodies: bodies taken over so far in this process (for tests).
    @cvar early: bodies whose thread stopped because the server answered.
    """

    _log = Logger()
    bodies = 0
    early = 0

    def __init__(self, reactor, stream, tls, raw, conn):
        self._reactor = reactor
        self._stream = stream
        self._tls = tls
        self._raw = raw
        self._conn = conn
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._queued = 0
        self._producerPaused = False
        self._resumeScheduled = False
        self._stopping = False
        self._abortAfter = False
        self._broken = False
        self._started = False
        self._done = False
        self._sock = None
        self._pendingOutput = b""
        # Rule 1: no reads from here on (the answer comes after the body);
        # the thread takes over on a clean stack.
        raw.stopReading()
        self._shadows = handoff.Shadows(
            tls, raw, startReading=_ignore, stopReading=_ignore,
            abort=self._abortFromOutside, lose=self._abortFromOutside,
            write=self._write)
        self._scheduled = reactor.callLater(0, self._handOff)

    @classmethod
    def takeOver(cls, stream, consumer, reactor):
        """
        Decide to send the rest of a request body from a thread, when
        Twisted starts the body (C{stream.startProducing(consumer)}).

        @param stream: the body producer (C{length}, C{written}: bytes
            handed to C{consumer} so far, C{pauseProducing},
            C{resumeProducing}).
        @param consumer: what Twisted gave the body producer.
        @return: a L{RequestWriter}, or C{None} when the body stays on
            Twisted's path.
        """
        global _active
        tls = transport = compat.requestTransport(consumer)
        if transport is None or stream.length - stream.written < MIN_SIZE:
            return None
        conn = None
        if isinstance(transport, TLSMemoryBIOProtocol):
            conn = handoff.tlsConnection(transport)
            if conn is None:
                return None
            transport = transport.transport
        if (not hasattr(transport, "stopReading")
                or not handoff.usable(transport)):
            return None
        with _activeLock:
            _active += 1
        try:
            return cls(reactor, stream, tls, transport, conn)
        except BaseException:
            with _activeLock:
                _active -= 1
            raise

    # In the reactor.

    def _write(self, data) -> None:
        # The transport's write while we own it: queued for the thread.
        n = len(data)
        with self._cond:
            self._queue.append(data)
            self._queued += n
            if self._stream.written >= self._stream.length:
                self._queue.append(_END)
            self._cond.notify()
            pause = self._queued >= HIGH_WATER and not self._producerPaused
            if pause:
                self._producerPaused = True
        if pause:
            # May run inside the stream's own write: it expects that.
            self._stream.pauseProducing()

    def _handOff(self) -> None:
        self._scheduled = None
        if (self._done or self._stopping
                or not handoff.usable(self._raw)
                or (self._conn is not None and
                    handoff.tlsConnection(self._tls) is not self._conn)):
            if not self._done:
                self._handBack()
            return
        self._pendingOutput = handoff.takeOutput(self._tls, self._raw,
                                                 self._conn)
        self._sock = handoff.ThreadSocket(self._raw.fileno())
        self._started = True
        RequestWriter.bodies += 1
        # Twisted's transport may have paused the body before it lost the
        # socket; it will not resume it now.
        with self._cond:
            resume = not self._producerPaused
        if resume:
            self._stream.resumeProducing()
        _pool.run(self._run)

    def _resume(self) -> None:
        self._resumeScheduled = False
        if self._done or self._stopping:
            return
        with self._cond:
            resume = self._producerPaused and self._queued < LOW_WATER
            if resume:
                self._producerPaused = False
        if resume:
            self._stream.resumeProducing()

    def _threadDone(self, error) -> None:
        if self._done:
            return
        if error is not None:
            self._log.info("Upload to {peer} stopped: {error}",
                           peer=str(self._raw.getPeer()), error=error)
            self._abortAfter = True
        self._handBack()

    def _handBack(self) -> None:
        global _active
        with _activeLock:
            _active -= 1
        self._done = True
        if self._started:
            handoff.restoreConnection(self._tls, self._conn)
        self._shadows.restore()
        with self._cond:
            left = [item for item in self._queue if item is not _END]
            self._queue.clear()
            self._queued = 0
            paused, self._producerPaused = self._producerPaused, False
        if self._abortAfter:
            self._tls.abortConnection()
            return
        if not self._broken:
            # What the thread did not send goes through Twisted.
            for data in left:
                self._tls.write(data)
        self._raw.startReading()
        if self._conn is not None and self._started:
            self._reactor.callLater(0, handoff.flushReceived, self._tls,
                                    self._conn)
        if paused:
            self._stream.resumeProducing()


    # The thread.

    def _idle(self, last: float) -> None:
        if self._stopping:
            raise _Stopped()
        if time.monotonic() - last > IDLE_TIMEOUT:
            raise _IdleTimeout(f"The server read nothing for "
                               f"{IDLE_TIMEOUT:g} seconds")

    def _blocked(self, last: float) -> None:
        # A send waits: the server may have answered and stopped reading.
        self._idle(last)
        if self._sender.peerSpoke():
            self._broken = True
            raise _PeerSpoke()

    def _run(self) -> None:
        error = None
        sock = self._sock.sock
        sender = self._sender = handoff.Sender(self._sock, self._conn,
                                               self._blocked)
        try:
            handoff.setBlocking(sock, _WAKE)
            sender.start()
            sender.sendRaw(self._pendingOutput)
            self._pendingOutput = b""
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait(_WAKE)
                        if not self._queue and sender.peerSpoke():
                            raise _PeerSpoke()
                    if self._stopping:
                        raise _Stopped()
                    item = self._queue[0]
                if item is _END:
                    break
                if sender.peerSpoke():
                    raise _PeerSpoke()
                sender.send(item)
                n = len(item)
                with self._cond:
                    self._queue.popleft()
                    self._queued -= n
                    resume = (self._producerPaused
                              and self._queued < LOW_WATER
                              and not self._resumeScheduled)
                    if resume:
                        self._resumeScheduled = True
                if resume:
                    self._reactor.callFromThread(self._resume)
        except _PeerSpoke:
            RequestWriter.early += 1
        except _Stopped:
            pass
        except _IdleTimeout as e:
            error = e.with_traceback(None)
        except OSError:
            if self._stopping:
                pass
            else:
                # Reset or closed: the server may have answered first;
                # Twisted reads what it said.
                self._broken = True
        except Exception as e:
            error = e.with_traceback(None)
        finally:
            sender.stop()
            handoff.setNonBlocking(sock)
            self._sock.close()
        self._reactor.callFromThread(self._threadDone, error)


def _ignore() -> None:
    pass
