# -*- test-case-name: test.test_backend_http -*-
"""
The http backend's two relays: a whole client request relayed as one
upstream request, with backpressure end to end.

  - L{_StreamTo}: an upstream C{GET} response body delivered to a consumer
    (L{HTTPBackend.readTo}); the consumer's pauses pause the upstream
    socket.
  - L{UploadStream}: the body of one upstream C{PUT}, fed by the caller
    (L{HTTPBackend.writeFrom}, L{uploadStream}); the upstream connection's
    pauses pause the caller's producer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from imageio.backends.http._upstream import (
    SMALL_BODY_LIMIT, DropBody, readBody)
from imageio.errors import BackendError, BadRequest
from imageio.transfer import (
    ProducerStopped, UploadSink, Written, _operationOK)
from imageio.units import KiB, MiB

if TYPE_CHECKING:
    from imageio.backends.http._backend import HTTPBackend

__all__ = ["UploadStream", "uploadStream", "ProducerRelay",
           "UPLOAD_HIGH_WATER", "STREAM_WRITE_SIZE"]

UPLOAD_HIGH_WATER = 8 * MiB
"""
An upload stream not yet connected upstream pauses its producer once it
buffers this much.
"""

STREAM_WRITE_SIZE = 512 * KiB
"""
Bytes gathered before one write when streaming: pieces of an upstream
response before a write to the consumer of L{HTTPBackend.readTo}, and
pieces of a client body before a write to the upstream connection of an
L{UploadStream}. TLS connections deliver 32 KiB pieces; relaying them one
by one costs the next TLS layer far more CPU than fewer, larger writes
(TWISTED-NOTES §6).
"""


def uploadStream(backend, offset: int, length: int, *, producer=None,
                 operation=None, flush: bool = False) -> UploadStream:
    """
    Like L{HTTPBackend.writeFrom}, for a backend that may still be opening.

    @param backend: an L{HTTPBackend} or a L{Deferred} firing with one. The
        body is buffered (bounded by L{UPLOAD_HIGH_WATER}, pausing
        C{producer}) until it fires; if it fails, the stream fails with
        its error.
    @return: the L{UploadStream}; its C{whenDone()} reports the outcome.
    """
    return UploadStream(backend, offset, length, producer=producer,
                        operation=operation, flush=flush)


@implementer(IPushProducer)
class ProducerRelay:
    """
    Forward pause, resume and stop to whatever producer is set now (the
    upstream transport of a C{GET}, once its response arrived); nothing
    while it is C{None}.

    @ivar producer: the L{IPushProducer} to forward to, or C{None}.
    """

    producer = None

    def pauseProducing(self):
        if self.producer is not None:
            self.producer.pauseProducing()

    def resumeProducing(self):
        if self.producer is not None:
            self.producer.resumeProducing()

    def stopProducing(self):
        if self.producer is not None:
            self.producer.stopProducing()


class _StreamTo(ProducerRelay, Protocol):
    """
    Deliver an upstream response body to a consumer, forwarding the
    consumer's pause and resume to the upstream transport (see
    L{HTTPBackend.readTo}): the relay's producer is our transport.

    @ivar pauses: how many times the consumer paused us.
    @ivar received: body bytes received so far.
    @ivar _pending: received pieces not yet written to the consumer, at
        most L{STREAM_WRITE_SIZE} bytes (C{_pendingSize}).
    """

    def __init__(self, consumer, length: int, operation, where: str):
        self._consumer = consumer
        self._length = length
        self._operation = operation
        self._where = where
        self._registered = False
        self._consumerGone = False
        self._finished = False
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self.pauses = 0
        self.received = 0
        self.done: defer.Deferred[int] = defer.Deferred(self._cancel)

    def connectionMade(self):
        self.producer = self.transport
        if self._finished:
            self.transport.stopProducing()
            return
        self._consumer.registerProducer(self, True)
        self._registered = True

    # IPushProducer, called by the consumer.

    def pauseProducing(self):
        self.pauses += 1
        super().pauseProducing()

    def stopProducing(self):
        self._registered = False
        self._consumerGone = True
        super().stopProducing()

    # The response body.

    def dataReceived(self, data):
        if self._finished:
            return
        n = len(data)
        if self.received + n > self._length:
            self._abort(BackendError(f"GET {self._where}: the remote sent "
                                     f"more than {self._length} bytes"))
            return
        if not _operationOK(self._operation, self._abort):
            return
        self.received += n
        if isinstance(data, Written):
            # Bytes a body thread wrote to the consumer's backend itself:
            # their count goes to the consumer after the bytes before them.
            if self._pending:
                self._write()
            self._consumer.write(data)
            if self._operation is not None:
                self._operation.progress(n)
            return
        self._pending.append(data)
        self._pendingSize += n
        if (self._pendingSize >= STREAM_WRITE_SIZE
                or self.received == self._length):
            self._write()

    def flush(self) -> None:
        """
        Write the pieces received and not yet written to the consumer now
        (a body thread is about to write the rest of the body to the
        consumer's backend itself, after them).
        """
        if self._pending and not self._finished:
            self._write()

    def _write(self):
        pending, self._pending = self._pending, []
        n, self._pendingSize = self._pendingSize, 0
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        # May pause or stop us synchronously.
        self._consumer.write(data)
        if self._operation is not None:
            self._operation.progress(n)

    def connectionLost(self, reason):
        if self._finished:
            return
        if reason.check(ResponseDone) and self.received == self._length:
            self._finished = True
            self._unregister()
            self.done.callback(self.received)
        elif self._consumerGone:
            self._fail(Failure(ProducerStopped(
                "The consumer stopped the download")))
        else:
            error = BackendError(
                f"GET {self._where}: the remote stopped after "
                f"{self.received} of {self._length} bytes: "
                f"{reason.getErrorMessage()}")
            # Keep the reason for callers that explain it (the client).
            error.__cause__ = reason.value
            self._fail(Failure(error))

    def _abort(self, reason) -> None:
        self._fail(reason if isinstance(reason, Failure)
                   else Failure(reason))
        self.transport.stopProducing()

    def _unregister(self):
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()

    def _fail(self, failure: Failure):
        if self._finished:
            return
        self._finished = True
        self._pending = []
        self._unregister()
        self.done.errback(failure)

    def _cancel(self, d):
        # The caller cancelled readTo: drop the upstream connection and
        # leave the consumer.
        self._finished = True
        self._pending = []
        self._unregister()
        if self.transport is not None:
            self.transport.stopProducing()


@implementer(IBodyProducer)
class UploadStream(UploadSink):
    """
    The body of one upstream C{PUT}, fed by the caller (see
    L{HTTPBackend.writeFrom} for the contract).

    The caller's side is the L{UploadSink}'s (L{write}, L{finish},
    L{abort}, L{whenDone}, L{failed}), with C{limit} the announced length
    and the backend possibly still opening; bytes that come before the
    upstream request is ready are buffered there, pausing the producer at
    L{UPLOAD_HIGH_WATER}. Unlike a sink, the stream does not write to the
    backend: it is the upstream request's L{IBodyProducer}, so bytes go
    straight to the upstream connection, which calls
    L{pauseProducing}/L{resumeProducing}; they are forwarded to the
    producer of the incoming bytes (the client's socket). The operation is
    checked on every L{write}.

    @ivar length: the body length announced upstream.
    @ivar received: bytes given to L{write}.
    @ivar written: bytes handed to the upstream connection.
    @ivar maxPending: the most bytes buffered here at once (only before the
        upstream connection is ready; afterwards bytes go straight to it).
    @ivar pauses: how many times the upstream connection paused us.
    @ivar _gathered: pieces received after the upstream connection was
        ready, not yet handed to it: less than L{STREAM_WRITE_SIZE} bytes
        (C{_gatheredSize}).
    """

    def __init__(self, backend, offset: int, length: int, *,
                 producer=None, operation=None, flush: bool = False):
        """
        @param backend: the L{HTTPBackend}, or a L{Deferred} firing with
            it; the upstream request starts once it is known.
        """
        # Set before the sink attaches the backend: the upstream request
        # may start (and call startProducing) at once.
        self.offset = offset
        self.length = length
        self.flush = flush
        self.pauses = 0
        self._consumer = None
        self._gathered: list[bytes] = []
        self._gatheredSize = 0
        self._upstreamPaused = False
        self._upstreamGone = False
        self._bodyDone: defer.Deferred | None = None
        self._request: defer.Deferred | None = None
        super().__init__(backend, offset, limit=length, operation=operation,
                         producer=producer, highWater=UPLOAD_HIGH_WATER)
        if length <= 0:
            self._result = 0

    def _attach(self, backend) -> None:
        if self.backend is not None:
            raise RuntimeError("The stream is attached already")
        self.backend = backend
        if (self._failure is not None or self._result is not None
                or self.length <= 0):
            return
        backend._startUpload(self)

    # The caller's side.

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        Set the producer of the incoming bytes (must be streaming).
        """
        if not streaming:
            raise ValueError("UploadStream needs a streaming producer")
        self._producer = producer
        if self._upstreamPaused or self._buffered >= self._highWater:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data) -> None:
        """
        Take the next piece of the body. Never blocks; may pause the
        producer.
        """
        n = self._admit(data)
        if not n or not _operationOK(self._operation, self._fail):
            return
        if self._consumer is None or self._chunks:
            self._buffer(data, n)
        else:
            self._gather(data)
        if self._upstreamPaused:
            self._pauseProducer()

    def finish(self) -> None:
        """
        The body ended. Fails the upload if fewer than C{length} bytes came.
        """
        if self._failure is not None or self._result is not None:
            return
        self._ended = True
        if self.received < self.length:
            self._fail(Failure(BadRequest(
                f"Expected {self.length} bytes, received {self.received} "
                f"bytes")))

    # No body thread writes a proxy upload to its backend (see
    # UploadSink.directTarget): nothing to wait for.

    def whenAttached(self) -> defer.Deferred:
        return defer.succeed(None)

    def drain(self) -> defer.Deferred:
        return defer.succeed(None)

    def directTarget(self):
        return None

    # IBodyProducer: the upstream connection's side.

    def startProducing(self, consumer) -> defer.Deferred[None]:
        self._consumer = consumer
        self._bodyDone = defer.Deferred(lambda d: self.stopProducing())
        done = self._bodyDone
        while self._chunks and self._failure is None:
            data = self._chunks.popleft()
            self._buffered -= len(data)
            self._send(data)
        if (self._failure is None and not self._upstreamPaused
                and self._buffered < self._highWater
                and self._producer is not None):
            self._producer.resumeProducing()
        return done

    def pauseProducing(self) -> None:
        self.pauses += 1
        self._upstreamPaused = True
        self._pauseProducer()

    def resumeProducing(self) -> None:
        self._upstreamPaused = False
        if self._producer is not None and self._failure is None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        # The upstream connection is gone or the request was stopped; the
        # request's Deferred reports why. Never fire _bodyDone now.
        self._bodyDone = None
        self._upstreamPaused = False
        self._upstreamGone = True
        if self._failure is None and self._result is None:
            if self._producer is not None:
                self._producer.resumeProducing()

    # Internals.

    def _pauseProducer(self) -> None:
        if self._producer is not None:
            self._producer.pauseProducing()

    def _gather(self, data) -> None:
        # The client's TLS connection delivers 32 KiB pieces: send them
        # upstream in writes of STREAM_WRITE_SIZE (see there).
        last = self.received == self.length
        if not self._gathered and (last or len(data) >= STREAM_WRITE_SIZE):
            self._send(data)
            return
        self._gathered.append(data)
        self._gatheredSize += len(data)
        if last or self._gatheredSize >= STREAM_WRITE_SIZE:
            parts, self._gathered = self._gathered, []
            self._gatheredSize = 0
            self._send(b"".join(parts))

    def _send(self, data) -> None:
        if self._upstreamGone:
            # The request's Deferred will report why; drop the bytes.
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        n = len(data)
        self.written += n
        # May call pauseProducing synchronously.
        self._consumer.write(data)
        if self._operation is not None:
            self._operation.progress(n)
        if self.written == self.length and self._bodyDone is not None:
            done, self._bodyDone = self._bodyDone, None
            done.callback(None)

    def _gotResponse(self, response, backend: HTTPBackend):
        if response.code == 200 and self.written == self.length:
            d = readBody(response, SMALL_BODY_LIMIT)
            d.addCallbacks(lambda _: self._succeed(), self._fail)
            return
        if response.code == 200:
            response.deliverBody(DropBody())
            self._fail(Failure(BackendError(
                f"PUT {backend._netloc}{backend._path}: the remote answered "
                f"200 after {self.written} of {self.length} bytes")))
            return
        d = defer.ensureDeferred(backend._unexpected(response, "PUT"))
        d.addBoth(lambda exc: self._fail(
            exc if isinstance(exc, Failure) else Failure(exc)))

    def _requestFailed(self, failure: Failure):
        self._fail(failure)

    def _succeed(self) -> None:
        if self._result is None and self._failure is None:
            self._result = self.length
            self._notify()

    def _fail(self, failure: Failure) -> None:
        # Once: a stream that succeeded stays so.
        if self._failure is not None or self._result is not None:
            return
        self._gathered = []
        self._gatheredSize = 0
        super()._fail(failure)

    def _settle(self) -> None:
        request, self._request = self._request, None
        if request is not None and not request.called:
            # Stop sending upstream; the remote sees a truncated body.
            request.cancel()
        super()._settle()
