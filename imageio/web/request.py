# -*- test-case-name: test.test_request -*-
"""
The channel and request classes of the images services (remote and local).

L{StreamingRequest} streams request bodies into a sink while they arrive,
with backpressure, instead of Twisted's default of spooling them to a
temporary file and rendering only at the end (TWISTED-NOTES §1). The
routing and authorization decision for a body is made in L{gotLength},
from the request line and the headers, and never writes a response there
(the channel sends C{100 Continue} right after it returns).

L{ImageioChannel} owns what the reference keeps per (connection, ticket):
the open backend, bound to the ticket so that a cancel closes it, and the
idle timeout, which becomes the ticket's C{inactivity_timeout} once bound.

This module is the only one touching private Twisted attributes. Each use
names the Twisted version it was checked against and the test in
C{test/test_request.py} that fails if a Twisted upgrade changes it.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http, server

from imageio.logs import Logger
from imageio import compat, errors, malloc
from imageio.deferreds import fireWaiters
from imageio.units import KiB, MiB
from imageio.web import bodyreader
from imageio.web.http import (
    Channel, Request, errorResponse, requestPath)

__all__ = ["ImageioChannel", "StreamingRequest", "BackendContext",
           "MAX_BUFFERED_BODY", "RECEIVE_SIZE", "PLAIN_RECEIVE_SIZE",
           "finishIfConnected"]

MAX_BUFFERED_BODY = 64 * KiB
"""
The largest request body kept in memory for non-streaming requests (PATCH
JSON messages and the like are a few hundred bytes). Larger bodies are
refused with 413 before they are read.
"""

RECEIVE_SIZE = malloc.RECEIVE_SIZE
"""
Socket read size while a body streams over TLS (Twisted's default is 64
KiB; 1 MiB reads nearly doubled upload throughput, TWISTED-NOTES §1, when
every upload body took this path; bodies of 4 MiB or more are read by
threads now), from the heap.
"""

PLAIN_RECEIVE_SIZE = 128 * KiB - 1 * KiB
"""
Socket read size while a body streams over a plain (unix or TCP)
connection. Each read allocates a new object of this size, and a read
returns what is queued, about 64 KiB on a unix socket: above malloc's
mmap threshold (128 KiB at first) every read cost an mmap, an mremap, a
munmap and page faults, twice the CPU of the reads themselves.
"""


class PayloadTooLarge(errors.HTTPError):
    """
    A body too large for a request that buffers it.
    """
    code = 413
    close = True


class BackendContext:
    """
    The backend one connection opened for one ticket.

    Bound to the ticket (C{ticket.bind}), so a ticket cancel closes it;
    closed by the channel when the connection closes.

    @ivar ticket: the L{imageio.tickets.Ticket}.
    @ivar backend: the L{imageio.backends.IBackend}, once opened.
    @ivar closed: L{close} was called.
    """

    _log = Logger()

    def __init__(self, channel: ImageioChannel, ticket):
        self._channel = channel
        self.ticket = ticket
        self.backend = None
        self.closed = False
        self._waiting: list[defer.Deferred] = []

    def ready(self) -> defer.Deferred:
        """
        @return: L{Deferred} firing with the backend once it is open.
        """
        if self.backend is not None:
            return defer.succeed(self.backend)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def _opened(self, backend) -> None:
        if self.closed:
            # Canceled or disconnected while opening.
            self._closeBackend(backend)
            self._fire(Failure(errors.Forbidden(
                "You are not allowed to access this resource: Transfer "
                f"{self.ticket.transferId} was canceled")))
            return
        try:
            self.ticket.bind(self)
        except Exception:
            self._channel._forget(self)
            self.closed = True
            self._closeBackend(backend)
            self._fire(Failure())
            return
        self.backend = backend
        self._channel.setIdleTimeout(self.ticket.inactivityTimeout)
        self._fire(backend)

    def _openFailed(self, failure: Failure) -> None:
        # Not cached: the next request tries again (as the reference).
        self._channel._forget(self)
        self.closed = True
        self._fire(failure)

    def _fire(self, result) -> None:
        waiting, self._waiting = self._waiting, []
        fireWaiters(waiting, result)

    def _closeBackend(self, backend) -> defer.Deferred:
        d = defer.maybeDeferred(backend.close)
        d.addErrback(lambda f: self._log.failure(
            "Closing backend of transfer {transfer} failed", f,
            transfer=self.ticket.transferId))
        return d

    def close(self) -> defer.Deferred:
        """
        Unbind from the ticket and close the backend (the ticket calls this
        on cancel, the channel when the connection closes). Idempotent.

        @return: L{Deferred} firing when the backend is closed.
        """
        if self.closed:
            return defer.succeed(None)
        self.closed = True
        self._channel._forget(self)
        self.ticket.unbind(self)
        backend, self.backend = self.backend, None
        if backend is None:
            return defer.succeed(None)
        return self._closeBackend(backend)


class ImageioChannel(Channel):
    """
    An HTTP/1.1 connection of the images services.

    @ivar _contexts: L{BackendContext} by ticket uuid.
    @cvar closed: connections of this process closed so far (for
        L{imageio.malloc.Reclaim}).
    """

    _log = Logger()

    _stall = None
    closed = 0

    def __init__(self):
        super().__init__()
        self._contexts: dict[str, BackendContext] = {}

    # Output.

    def pauseProducing(self):
        # The transport calls this when its write buffer is full: the client
        # is not reading our response. Twisted's idle timeout cannot see
        # this (it is reset only by input, and is off while a response is
        # produced), so a client that stops reading would hold the
        # connection, its backend and its ticket operation forever. The
        # reference's socket timeout closes such a connection after the
        # ticket's inactivity_timeout (60 s before a ticket is bound); so do
        # we, unless the transport drains meanwhile (test_faults
        # test_stalled_reader).
        super().pauseProducing()
        if self._stall is None and not self._lost:
            # The idle timeout of a connection handling a request is
            # saved, and off (see setIdleTimeout).
            timeout = (compat.savedTimeout(self)
                       if compat.handlingRequest(self)
                       else self.timeOut) or self.timeOut
            if timeout:
                self._stall = self.callLater(timeout, self._stalled)

    def resumeProducing(self):
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().resumeProducing()

    def _stalled(self) -> None:
        self._stall = None
        if self._lost or self.transport is None:
            return
        self._log.info("Client {peer} stopped reading, closing the "
                       "connection", peer=str(self.transport.getPeer()))
        self.transport.abortConnection()

    # Per-ticket backends.

    def backendFor(self, ticket, opener) -> defer.Deferred:
        """
        The backend this connection uses for C{ticket}, opened with
        C{opener()} (returning an L{IBackend} or a L{Deferred} of one) on
        first use and bound to the ticket.

        @return: L{Deferred} firing with the backend; failing with the
            opener's error (not cached: the next request tries again) or
            with L{errors.Forbidden} if the ticket was canceled meanwhile.
        """
        ctx = self._contexts.get(ticket.uuid)
        if ctx is not None and ctx.ticket is not ticket:
            # The ticket was replaced (PUT /tickets with the same uuid).
            ctx.close()
            ctx = None
        if ctx is not None:
            return ctx.ready()
        if self._lost:
            return defer.fail(errors.HTTPError("Connection lost"))
        ctx = BackendContext(self, ticket)
        self._contexts[ticket.uuid] = ctx
        d = ctx.ready()
        defer.maybeDeferred(opener).addCallbacks(ctx._opened, ctx._openFailed)
        return d

    readStreak = 0
    """
    Small Range GETs of a file answered on this connection (see
    L{imageio.web.readsession}).
    """

    readSessionGiveUps = 0
    """
    Read sessions of this connection that ended on a request their thread
    could not answer.
    """

    def openContext(self, ticket) -> BackendContext | None:
        """
        The open context of C{ticket} on this connection, or C{None}.
        """
        ctx = self._contexts.get(ticket.uuid)
        if (ctx is None or ctx.ticket is not ticket or ctx.closed
                or ctx.backend is None):
            return None
        return ctx

    def betweenRequests(self) -> bool:
        """
        Whether the connection is open, kept alive, and idle between
        requests with nothing received and not handled.
        """
        return (self.transport is not None and not self._lost
                and not self._discarding and self.persistent
                and not self.requests
                and not compat.handlingRequest(self)
                and not compat.bufferedInput(self))

    @property
    def lost(self) -> bool:
        return self._lost

    def _forget(self, ctx: BackendContext) -> None:
        if self._contexts.get(ctx.ticket.uuid) is ctx:
            del self._contexts[ctx.ticket.uuid]

    def setIdleTimeout(self, seconds) -> None:
        """
        Make C{seconds} the idle timeout of this connection, now if it is
        idle or receiving a body, else once the current response is done.
        """
        # Twisted saves the idle timeout and turns it off while a request
        # is handled, and restores it after.
        if compat.handlingRequest(self):
            compat.setSavedTimeout(self, seconds)
        else:
            self.setTimeout(seconds)

    def connectionLost(self, reason) -> None:
        self._lost = True
        ImageioChannel.closed += 1
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connectionLost(reason)
        for ctx in list(self._contexts.values()):
            ctx.close()


def finishIfConnected(request) -> None:
    """
    Finish C{request} unless its client went away or it is finished.
    """
    # finish() raises once the connection is lost.
    if not compat.requestGone(request) and not request.finished:
        request.finish()


def _queryArgs(uri: bytes) -> dict:
    # Twisted's parse_qs, as Request.requestReceived uses later: it works on
    # bytes throughout. urllib's decodes them as ASCII first and raised
    # UnicodeDecodeError from inside the parser for a PUT whose query had
    # a non-ASCII byte (test_fuzz, test_properties.test_queryArgs).
    parts = uri.split(b"?", 1)
    return http.parse_qs(parts[1], 1) if len(parts) > 1 else {}


class _AfterReader:
    """
    An early response waiting for a L{bodyreader.SocketReader} to give the
    socket back; cancelled like the delayed call it stands for.
    """

    canceled = False

    def cancel(self) -> None:
        self.canceled = True


class StreamingRequest(Request):
    """
    A request whose body may stream into a sink as it arrives.

    In L{gotLength} a C{PUT} is routed through the site's resource tree; a
    resource with a C{startBody(request, length)} method may return a
    I{sink} (C{write(bytes)}, C{finish()}, C{abort(reason)}) that receives
    the body. It may also raise an L{errors.HTTPError}: the error is
    answered once the body was read, or early (and the connection closed)
    if the body is still arriving on the next reactor turn. Every other
    request buffers its body in memory, up to L{MAX_BUFFERED_BODY} bytes.

    A sink that fails while the body arrives calls L{bodyFailed}; the error
    is answered early in the same way. When the whole body arrived, the
    request is processed as usual and the resource's C{render_PUT} answers
    (L{streamSink} is the sink).

    @ivar streamSink: the sink receiving the body, or C{None}.
    @ivar streamError: an error decided before the body was read, or
        C{None}.
    @ivar bodyComplete: the whole body arrived.
    @ivar _discardBody: drop further body bytes.
    @ivar _bodySize: bytes of a buffered body received so far.
    @ivar _early: the delayed call answering early, or C{None}.
    """

    streamSink = None
    streamError = None
    bodyComplete = False
    maxBufferedBody = MAX_BUFFERED_BODY
    _discardBody = False
    _bodySize = 0
    _early = None
    _reader = None

    def gotLength(self, length):
        self.content = io.BytesIO()
        # The request line is only on the channel until the body is
        # complete. HTTP/2 streams have none: they stay on the buffered
        # path.
        line = compat.requestLine(self.channel)
        command, path, version = line or (None, None, None)
        if path is not None:
            # Valid request attributes: an early response needs them (the
            # status line uses clientproto, logs use method and uri).
            self.method, self.uri, self.clientproto = command, path, version
            self.path = path.split(b"?", 1)[0]
            self.args = _queryArgs(path)
        if self.headError is not None:
            # Answered once the (empty) body is read, by process().
            self._discardBody = True
            return
        if command == b"PUT" and path is not None:
            try:
                sink = self._routeBody(length)
            except Exception:
                self._refuseBody(Failure())
                return
            if sink is not None:
                self.streamSink = sink
                self._growReceiveSize()
                return
        if length is not None and length > self.maxBufferedBody:
            self._refuseBody(Failure(PayloadTooLarge(
                f"Request body too large: {length} > "
                f"{self.maxBufferedBody}")))

    def _routeBody(self, length):
        if not self.path.startswith(b"/"):
            # As Request.process: no route matches.
            raise errors.NotFound(
                f"No handler for {requestPath(self)!r}", close=True)
        site = self.channel.site
        self.prepath = []
        self.postpath = list(map(server.unquote, self.path[1:].split(b"/")))
        resrc = site.getResourceFor(self)
        self.routed = (resrc, list(self.prepath), list(self.postpath))
        start = getattr(resrc, "startBody", None)
        if start is None:
            return None
        return start(self, length)

    def _growReceiveSize(self) -> None:
        transport = self.channel.transport
        # A TLS connection's transport is the TLSMemoryBIOProtocol; the
        # socket is below it. bufferSize is the recv size of Twisted's
        # FileDescriptor (abstract.py); it persists for the connection.
        # Guarded by test_request.test_bufferSize.
        size = PLAIN_RECEIVE_SIZE
        if isinstance(transport, TLSMemoryBIOProtocol):
            size = RECEIVE_SIZE
            transport = transport.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = max(transport.bufferSize, size)

    def handleContentChunk(self, data):
        if self._discardBody:
            return
        if self.streamSink is not None:
            self.streamSink.write(data)
            if self._reader is None and self.streamSink is not None:
                # Once per body: the rest may be read by a thread.
                self._reader = bodyreader.SocketReader.takeOver(
                    self, getattr(self.channel.site, "reactor", None)) or False
            return
        self._bodySize += len(data)
        if self._bodySize > self.maxBufferedBody:
            self._refuseBody(Failure(PayloadTooLarge(
                f"Request body too large: more than "
                f"{self.maxBufferedBody} bytes")))
            return
        self.content.write(data)

    def bodyFailed(self, reason) -> None:
        """
        The sink cannot take the body: answer with C{reason} now if the
        body is still arriving (closing the connection). Once the whole
        body arrived the resource's renderer answers, and this does
        nothing.
        """
        if self.bodyComplete:
            return
        self._refuseBody(reason if isinstance(reason, Failure)
                         else Failure(reason))

    def _refuseBody(self, reason: Failure) -> None:
        if self.streamError is None:
            self.streamError = reason
        self._discardBody = True
        sink, self.streamSink = self.streamSink, None
        if sink is not None and not self.bodyComplete:
            sink.abort(reason)
        if (self.bodyComplete or self._early is not None
                or self.channel is None):
            return
        if self._reader and self._reader.active:
            # A body thread stops reading now: a sink that failed resumes
            # its producer, and the thread would read the rest of the body
            # at full speed, completing it before the early answer's turn
            # (test_nbd_daemon.test_write_error, under load).
            self._reader.stop()
        # Never answer from inside the parser (gotLength or
        # handleContentChunk): the channel would write 100 Continue after
        # our response, or index its empty request list when the body ends
        # in the same read (TWISTED-NOTES §1).
        reactor = getattr(self.channel.site, "reactor", None)
        if reactor is None:
            from twisted.internet import reactor
        self._early = reactor.callLater(0, self._respondEarly)

    def _respondEarly(self) -> None:
        self._early = None
        if (compat.requestGone(self) or self.finished
                or self.channel is None):
            return
        if self._reader and self._reader.active:
            # A thread owns the socket: it stops first.
            pending = self._early = _AfterReader()
            self._reader.stop().addCallback(
                lambda _: self._readerStopped(pending))
            return
        channel = self.channel
        channel.discardInput()
        channel.persistent = False
        transport = channel.transport
        if transport is not None:
            # We may have paused it for backpressure; the response must go
            # out and the close be seen.
            transport.resumeProducing()
        self.startReply()
        self.setHeader(b"connection", b"close")
        errorResponse(self, self.streamError)

    def _readerStopped(self, pending) -> None:
        if pending.canceled or self._early is not pending:
            return
        self._respondEarly()

    def requestReceived(self, command, path, version):
        self.bodyComplete = True
        if self._early is not None:
            self._early.cancel()
            self._early = None
        if self.streamSink is not None:
            self.streamSink.finish()
        super().requestReceived(command, path, version)

    def process(self):
        if self.streamError is not None:
            self.startReply()
            errorResponse(self, self.streamError)
            return
        super().process()

    def connectionLost(self, reason):
        if self._early is not None:
            self._early.cancel()
            self._early = None
        sink, self.streamSink = self.streamSink, None
        if sink is not None and not self.bodyComplete:
            sink.abort(reason)
        elif sink is not None:
            self.streamSink = sink
        super().connectionLost(reason)
