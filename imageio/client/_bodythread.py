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
from imageio.errors import BackendError
from imageio.logs import Logger
from imageio.units import MiB
from imageio.web import bodyreader, handoff, readahead

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

DIRECT_SIZE = 2 * MiB
"""
Bytes per NBD write when the thread writes the local image itself.
"""

_diskBuffers = readahead.Buffers(DIRECT_SIZE, keep=16)
"""
The threads' NBD write buffers, two per connection, kept between bodies:
a download is a series of 8 MiB GETs on up to 8 connections.
"""

IDLE_TIMEOUT = 60.0
"""
Seconds without a byte from the server before the thread gives up.
"""

_WAKE = 0.2
"""
Seconds a blocked read waits before the thread looks at its stop flag.
"""

_POOL_IDLE = 10.0
"""
Seconds an idle body thread waits for the next body before it exits.
"""

_slots = handoff.Slots()


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
    return _slots.running


class _BodyThread(handoff.BodyThread):
    """
    What L{ResponseReader} and L{RequestWriter} add to the daemon's: the
    connection went back once C{_done}.
    """

    _done = False
    slots = _slots

    def _ended(self) -> bool:
        return self._done

    def _handBack(self) -> None:
        self._done = True
        super()._handBack()


class ResponseReader(bodyreader.DirectWrites, _BodyThread):
    """
    The reader of the rest of one response body, in a thread. When the
    body goes to a local image over NBD (a L{transfer.UploadSink} whose
    backend lends its connection), the thread writes it there itself, as
    the daemon's reader threads write uploads
    (L{bodyreader.DirectWrites}): the reactor only counts.

    @cvar bodies: bodies taken over so far in this process (for tests).
    """

    _log = Logger()
    bodies = 0
    stopped = "Download from"
    peer = "the server"
    WAKE = _WAKE
    bufferSize = BUFFER_SIZE
    directSize = DIRECT_SIZE
    diskBuffers = _diskBuffers

    def __init__(self, reactor, tls, raw, conn, http11, parser, decoder,
                 relay=None, sink=None):
        super().__init__(reactor, tls, raw, conn)
        self._http11 = http11
        self._parser = parser
        self._decoder = decoder
        self._relay = relay
        self._sink = sink
        # Rule 1: no reads from here on; the thread takes over on a clean
        # stack (this runs inside the response callback, inside the TLS
        # layer's dataReceived).
        raw.stopReading()
        self._shadow()
        self._scheduled = reactor.callLater(0, self._handOff)

    @classmethod
    def takeOver(cls, producer, reactor, sink=None):
        """
        Decide to read the rest of a response body in a thread, from the
        consumer's C{registerProducer}.

        @param producer: the protocol receiving the body (its C{transport}
            is the response's L{TransportProxyProducer}).
        @param sink: the L{transfer.UploadSink} the body goes to, if the
            thread may write to its backend itself.
        @return: a L{ResponseReader}, or C{None} when the body stays on
            Twisted's path: chunked, less than L{MIN_SIZE} left, a
            connection that cannot be taken, or a proxy already cut off.
        """
        proxy = getattr(producer, "transport", None)
        transport = compat.responseTransport(proxy)
        if transport is None:
            return None
        if isinstance(transport, TLSMemoryBIOProtocol):
            http11 = transport.wrappedProtocol
        else:
            http11 = compat.unwrapProtocol(
                getattr(transport, "protocol", None))
        parser = compat.responseParser(http11)
        decoder = getattr(parser, "bodyDecoder", None)
        if (not compat.identityDecoder(decoder)
                or decoder.contentLength is None
                or decoder.contentLength < MIN_SIZE):
            return None
        return cls._create(reactor, transport, http11, parser, decoder,
                           producer, sink)

    # In the reactor: the hand-off.

    def _handOff(self) -> None:
        self._scheduled = None
        decoder = self._decoder
        if (self._done or self._stopping
                or compat.responseParser(self._http11) is not self._parser
                or self._parser.bodyDecoder is not decoder
                or not decoder.contentLength
                or not self._stillOurs()):
            # The body ended (or the connection went) meanwhile.
            if not self._done:
                self._handBack()
            return
        sink = self._sink
        if sink is not None:
            # The thread writes after the bytes received before it: those
            # the relay still holds go to the sink, and the sink writes
            # them. Twisted does not read meanwhile, but the TLS layer may
            # deliver plaintext it had: asked again after each wait.
            flush = getattr(self._relay, "flush", None)
            if flush is not None:
                flush()
            ready: list = []
            d = sink.drain().addBoth(ready.append)
            if not ready:
                d.addBoth(lambda _: self._reactor.callLater(
                    0, self._handOffLater))
                return
        self._remaining = decoder.contentLength
        self._useTarget(sink)
        self._take()
        ResponseReader.bodies += 1
        _pool.run(self._run)

    def _handOffLater(self) -> None:
        if not self._done and not self._stopping:
            self._handOff()

    # The thread.

    def _idle(self, lastData: float) -> None:
        if self._stopping:
            raise handoff.Stopped()
        if time.monotonic() - lastData > IDLE_TIMEOUT:
            raise OSError(f"No data from the server for {IDLE_TIMEOUT:g} "
                          f"seconds")

    # Back in the reactor.

    def _feed(self, buf) -> bool:
        # (Ending the body returns the connection to the pool, which may
        # use it at once: it is Twisted's again before the last buffer.)
        try:
            self._decoder.dataReceived(buf)
        except BaseException:
            # What HTTP11ClientProtocol.dataReceived does with a parser
            # error: the connection is of no use any more.
            self._log.failure("Response body delivery failed", Failure())
            self._tls.abortConnection()
            return False
        return True

    def _failed(self, error) -> None:
        # On an error, the response fails with the connection's loss. A
        # failed write of the local image fails the sink first, so that
        # the transfer names it rather than the connection.
        if isinstance(error, BackendError) and self._sink is not None:
            self._sink.abort(Failure(error))
        super()._failed(error)



HIGH_WATER = 8 * MiB
"""
Bytes of a request body queued for the writer thread at which the body's
producer is paused; it is resumed below L{LOW_WATER}.
"""

LOW_WATER = 4 * MiB

HANDSHAKE_POLL = 0.002
"""
Seconds between looks at a connection still in its TLS handshake when
its request body starts.
"""

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

    def __init__(self, reactor, tls, raw, conn, stream):
        super().__init__(reactor, tls, raw, conn)
        self._stream = stream
        self._queue: deque = deque()
        self._queued = 0
        self._producerPaused = False
        self._resumeScheduled = False
        self._broken = False
        # Rule 1: no reads from here on (the answer comes after the body);
        # the thread takes over on a clean stack.
        raw.stopReading()
        self._shadow(startReading=_ignore, stopReading=_ignore,
                     write=self._write)
        self._scheduled = reactor.callLater(0, self._handOff)

    @classmethod
    def sendFromThread(cls, stream, reactor) -> None:
        """
        Have the rest of C{stream}'s body sent by a thread once Twisted
        starts it (the client's uploads, the daemon's proxy uploads).

        @param stream: an L{imageio.backends.http.UploadStream}.
        """
        start = stream.startProducing

        def startProducing(consumer):
            d = start(consumer)
            cls._takeOverWhenReady(stream, consumer, reactor)
            return d

        stream.startProducing = startProducing

    @classmethod
    def _takeOverWhenReady(cls, stream, consumer, reactor) -> None:
        """
        L{takeOver} now, or once the connection's TLS handshake is done.

        A request on a connection just opened starts its body while the
        handshake still runs: the TLS layer queues the writes, and no
        thread may take the connection yet. Before this waited, those
        bodies stayed on Twisted's path to their end: an upload's
        workers open their connections together, so 7 of the 8 first
        128 MiB pieces were encrypted by the reactor thread.
        """
        if cls.takeOver(stream, consumer, reactor) is not None:
            return
        transport = compat.requestTransport(consumer)
        if (isinstance(transport, TLSMemoryBIOProtocol)
                and compat.handshaking(transport)
                and getattr(transport.transport, "connected", False)
                and stream.length - stream.written >= MIN_SIZE):
            reactor.callLater(HANDSHAKE_POLL, cls._takeOverWhenReady,
                              stream, consumer, reactor)

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
        transport = compat.requestTransport(consumer)
        if transport is None or stream.length - stream.written < MIN_SIZE:
            return None
        return cls._create(reactor, transport, stream)

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
        if self._done or self._stopping or not self._stillOurs():
            if not self._done:
                self._handBack()
            return
        self._take()
        RequestWriter.bodies += 1
        self._log.debug("Body to {peer} handed to a writer thread",
                        peer=str(self._raw.getPeer()))
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
        self.slots.give()
        self._done = True
        self._restoreTransport()
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
        self._resumeTransport()
        if paused:
            self._stream.resumeProducing()


    # The thread.

    def _idle(self, last: float) -> None:
        if self._stopping:
            raise handoff.Stopped()
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
                        raise handoff.Stopped()
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
        except handoff.Stopped:
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
            self._giveUpSocket(sender)
        self._reactor.callFromThread(self._threadDone, error)


def _ignore() -> None:
    pass
