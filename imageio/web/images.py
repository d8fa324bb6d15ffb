# -*- test-case-name: test.test_images -*-
"""
C{/images}: the data API of the remote and local services.

  - C{/images/{id}}: GET (Range), HEAD, PUT (streamed body), PATCH (zero,
    flush), OPTIONS (also C{/images/*})
  - C{/images/{id}/extents}: GET
  - C{/images/{id}/checksum}: GET
  - C{/images/{id}/checksum/algorithms}: GET, no ticket needed

Any other path below C{/images/} is 404 (SPEC A4). Validation order, status
codes and error texts follow the reference (SPEC B §1.3-§1.8, §1.14);
checks that run before authorization do so here too.

Every request that reads or writes image data runs as a ticket operation
(L{imageio.tickets.Operation}): it counts in the ticket's C{transferred},
stops at the next chunk when the ticket is canceled, and touches the ticket
when it ends. Extents requests do not.

Routing: L{Images} has a child per ticket id (L{Images.getChild}), an
L{_Image} made for the request, whose children are C{extents} and
C{checksum} (and its child C{algorithms}); anything else is L{NoHandler}.

Zero, flush, extents and checksum are run by L{imageio.operations}; this
module validates, authorizes, opens the backend and answers.

Bytes and backend latencies go to the metrics L{Images} was built with
(L{imageio.metrics}): the streaming pumps report their own reads and
writes; L{imageio.operations} reports zero, flush, extents and checksum;
the handlers here the proxy streams.
"""

from __future__ import annotations

import re
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from imageio.abilities import IStreamingRelay, IThreadTarget
from imageio.logs import Logger
from imageio import backends, blkhash, compat, errors, operations, transfer
from imageio.extents import encode as encodeExtents
from imageio.backends import http as httpbackend
from imageio.metrics import NO_METRICS
from imageio.client._bodythread import RequestWriter
from imageio.web import bodywriter, readsession, validate
from imageio.web.request import finishIfConnected
from imageio.web.http import (
    NoHandler, Resource, asyncRender, closeAfterResponse, cors,
    emptyResponse, jsonBody, queryArgs, readJSON, requestPath)

__all__ = ["Images", "parseRange", "parseContentRange"]

BASE_FEATURES = ["checksum", "extents"]
ALL_FEATURES = BASE_FEATURES + ["flush", "zero"]

MIN_BLOCK_SIZE = blkhash.BLOCK_SIZE // 4
MAX_BLOCK_SIZE = blkhash.BLOCK_SIZE * 4

# Extents lists longer than this are encoded in the thread pool.
_BIG_EXTENTS = 10000

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+|\*)/([0-9]+|\*)")


def _header(request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _unsatisfiable(message: str) -> errors.HTTPError:
    # The reference sends no content-range with these 416s.
    return errors.HTTPError(message, code=416)


def _int(text: str, error: Exception) -> int:
    # The regexes allow digits only, but Python refuses int() of more than
    # 4300 digits with ValueError: the client's fault, not a 500.
    try:
        return int(text)
    except ValueError:
        raise error from None


def parseRange(value: str | None):
    """
    Parse a C{Range} header: C{bytes=F-L} or C{bytes=F-}; case-sensitive,
    no spaces, a single range.

    @return: C{None} (no header), or C{(first, last)} with C{last} C{None}
        for an open range.
    @raise errors.HTTPError: 416 with the reference's texts, for anything
        else, including a suffix range C{bytes=-N}.
    """
    if value is None:
        return None
    m = _RANGE.fullmatch(value)
    if m is None:
        raise _unsatisfiable(
            f"Cannot satisfy range {value!r}, invalid range or multiple "
            f"ranges")
    first, last = m.groups()
    if not first:
        if not last:
            raise _unsatisfiable(
                f"Cannot satisfy range {value!r}, no first or last")
        raise _unsatisfiable("suffix-byte-range-spec not supported yet")
    tooLarge = _unsatisfiable("Cannot satisfy range, number too large")
    first = _int(first, tooLarge)
    if not last:
        return (first, None)
    last = _int(last, tooLarge)
    if first > last:
        raise _unsatisfiable(
            f"Cannot satisfy range {value!r}, first > last")
    return (first, last)


def parseContentRange(value: str | None) -> int:
    """
    Parse a PUT's C{Content-Range} (C{bytes F-L/C}, L and C may be C{*}).
    Only the start is used; the length always comes from the body.

    @return: the first byte, 0 without the header.
    @raise errors.BadRequest: with the reference's texts.
    """
    if value is None:
        return 0
    m = _CONTENT_RANGE.fullmatch(value)
    if m is None:
        raise errors.BadRequest(f"Invalid Content-Range {value!r}")
    first, last, complete = m.groups()
    tooLarge = errors.BadRequest("Invalid Content-Range, number too large")
    first = _int(first, tooLarge)
    if last != "*":
        last = _int(last, tooLarge)
        if last < first:
            raise errors.BadRequest(
                f"Invalid Content-Range {value!r}, first > last")
        if complete != "*" and last >= _int(complete, tooLarge):
            raise errors.BadRequest(
                f"Invalid Content-Range {value!r}, last >= complete")
    return first


def _isProxy(ticket) -> bool:
    # Asked of the class of the backend the url names: the backend itself
    # is still opening.
    return IStreamingRelay.implementedBy(backends.backendClass(ticket.url))


def _allowedRange(offset: int, size: int, ticket) -> None:
    if offset + size > ticket.size:
        raise errors.RangeNotSatisfiable(
            "Requested range out of allowed range", ticket.size)


async def _throughWriter(writer, send) -> None:
    """
    Await C{send()} (what feeds the body to C{writer}, a
    L{bodywriter.SocketWriter}), then the writer's end; abort the writer
    if either fails.
    """
    try:
        await send()
        await writer.close()
    except BaseException:
        await writer.abort()
        raise


class _CountingOperation:
    """
    A ticket operation that also counts its progress as bytes moved: the
    proxy streams (L{httpbackend}) report progress, but their data does not
    pass through the metered pumps.
    """

    __slots__ = ("_operation", "_count")

    def __init__(self, operation, count):
        self._operation = operation
        self._count = count

    def check(self) -> None:
        self._operation.check()

    def progress(self, n: int) -> None:
        self._operation.progress(n)
        self._count(n)

    def finish(self) -> None:
        self._operation.finish()


class _Upload:
    """
    The state of one streamed PUT, created by L{_Image.startBody} and used
    by L{_Image.render_PUT}.

    It is the request's sink: the body goes to an L{transfer.UploadSink},
    or, for a proxy ticket (http or https url) and a body with a
    Content-Length, to an L{httpbackend.UploadStream}: one upstream PUT for
    the whole body, with backpressure from the upstream connection to the
    client's socket. A sink failure while the body still arrives is
    answered early through C{request.bodyFailed}.

    @ivar flush: flush the backend after the body is written; false when
        the upstream PUT flushes as part of it.
    @ivar metrics: the L{imageio.metrics.Metrics} of the L{Images}.
    """

    def __init__(self, request, ticket, operation, backend, offset: int,
                 limit: int, flush: bool, chunked: bool = False,
                 metrics=NO_METRICS, *, reactor):
        self.ticket = ticket
        self.operation = operation
        self.flush = flush
        self.metrics = metrics
        if not chunked and _isProxy(ticket):
            # A chunked body has no length to announce upstream (the
            # reference requires a Content-Length): it goes through the
            # backend's per-chunk writes below.
            # The backend is still opening (a Deferred): name it by class.
            meter = self.metrics.meter(httpbackend.HTTPBackend)
            self.sink = httpbackend.uploadStream(
                backend, offset, limit, producer=request.transport,
                operation=_CountingOperation(operation, meter.writeBytes),
                flush=flush)
            # The upstream TLS hop encrypts in a thread, as the client's
            # uploads do.
            RequestWriter.sendFromThread(self.sink, reactor)
            self.flush = False
        else:
            self.sink = transfer.UploadSink(
                backend, offset, limit=limit, operation=operation,
                producer=request.transport,
                metrics=self.metrics if self.metrics.enabled else None)
        self.sink.whenDone().addErrback(
            lambda f: request.bodyFailed(self._translate(f)))

    def _translate(self, failure):
        if failure.check(transfer.LimitExceeded):
            return self._outOfRange()
        return failure

    def _outOfRange(self) -> errors.HTTPError:
        return errors.RangeNotSatisfiable(
            "Requested range out of allowed range", self.ticket.size)

    # Sink interface for StreamingRequest.

    def write(self, data) -> None:
        self.sink.write(data)

    def whenReady(self):
        """
        @return: L{Deferred} firing once L{directTarget} can answer: the
            backend is open, and the bytes received so far are written.
        """
        whenAttached = getattr(self.sink, "whenAttached", None)
        if whenAttached is None:
            return defer.succeed(None)

        def attached(_):
            # Only a backend the thread may write to waits for the bytes
            # before the thread's (a slow nbd write would delay the
            # hand-off for nothing).
            if not IThreadTarget.providedBy(self.sink.backend):
                return None
            return self.sink.drain()

        return whenAttached().addCallback(attached)

    def directTarget(self):
        """
        See L{transfer.UploadSink.directTarget}; C{None} for proxy
        uploads.
        """
        directTarget = getattr(self.sink, "directTarget", None)
        return directTarget() if directTarget is not None else None

    def finish(self) -> None:
        self.sink.finish()

    def abort(self, reason) -> None:
        # The request will not be rendered: end the operation here, once
        # no write is in flight any more.
        self.sink.abort(reason)
        self.sink.whenDone().addBoth(lambda _: self.operation.finish())

    async def wait(self) -> int:
        try:
            return await self.sink.whenDone()
        except transfer.LimitExceeded:
            # The overrun was found while a write was in flight and the
            # body ended before it returned: the renderer answers.
            raise self._outOfRange() from None


class _Handler(Resource):
    """
    Base of the resources below C{/images/{id}}: made for one request (by
    L{Images.getChild} and the children's C{getChild}). A child this
    resource does not have is L{NoHandler}.

    @ivar images: the L{Images}.
    @ivar ticketId: the C{{id}} segment of the path (C{""} if empty).
    """

    def __init__(self, images: Images, ticketId: str):
        super().__init__()
        self.images = images
        self.ticketId = ticketId

    def requireId(self) -> str:
        if not self.ticketId:
            raise errors.BadRequest("Ticket id is required")
        return self.ticketId


class _Image(_Handler):
    """
    C{/images/{id}}.
    """

    _log = Logger()

    def getChild(self, name, request):
        if name == b"extents":
            return _Extents(self.images, self.ticketId)
        if name == b"checksum":
            return _Checksum(self.images, self.ticketId)
        return NoHandler()

    # GET and HEAD

    @asyncRender
    async def render_GET(self, request):
        return await self._read(request, head=False)

    @asyncRender
    async def render_HEAD(self, request):
        return await self._read(request, head=True)

    async def _read(self, request, head: bool):
        cors(request)
        ticketId = self.requireId()
        args = queryArgs(request)
        if args.get("close") == "y":
            closeAfterResponse(request)
        rng = parseRange(_header(request, b"range"))
        ticket = self.images.store.authorize(ticketId, "read")
        backend = await self.images.backendFor(request, ticket)

        available = min(ticket.size, backend.size())
        if rng is not None and rng[1] is not None:
            offset = rng[0]
            size = rng[1] - offset + 1
            _allowedRange(offset, size, ticket)
            if offset + size > available:
                raise errors.RangeNotSatisfiable(
                    f"Requested more bytes than available: "
                    f"{offset + size} > {available}", available)
        else:
            offset = rng[0] if rng is not None else 0
            size = available - offset
            if size < 0:
                # The reference answers with a negative length here.
                raise errors.RangeNotSatisfiable(
                    f"Requested more bytes than available: "
                    f"{offset} > {available}", available)

        disposition = "attachment"
        if ticket.filename:
            disposition += f"; filename={ticket.filename}"
        request.setHeader(b"content-length", b"%d" % size)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-disposition",
                          disposition.encode("utf-8"))
        request.setHeader(b"accept-ranges", b"bytes")
        if rng is not None:
            request.setResponseCode(206)
            request.setHeader(
                b"content-range",
                b"bytes %d-%d/%d" % (offset, offset + size - 1, ticket.size))

        if head:
            request.write(b"")
            finishIfConnected(request)
            return None

        self._log.debug("READ size={size} offset={offset} transfer={tid}",
                        size=size, offset=offset, tid=ticket.transferId)
        stats = self.images.metrics
        op = ticket.startOperation(offset, size)
        small = False
        try:
            relay = IStreamingRelay.providedBy(backend)
            if not relay and size <= transfer.CHUNK_SIZE:
                small = True
                # Small range: one read, one write; no producer to set up
                # (a transport buffers one chunk without harm).
                op.check()
                started = time.monotonic()
                data = await backend.read(offset, size)
                if stats.enabled:
                    stats.meter(backend).read(len(data),
                                              time.monotonic() - started)
                if len(data) < size:
                    raise errors.PartialContent(size, len(data))
                if compat.requestGone(request):
                    return None
                op.check()
                request.write(data if isinstance(data, bytes)
                              else bytes(data))
                op.progress(size)
            elif relay:
                # The proxy backend: one upstream GET for the whole range,
                # the client's socket pausing the upstream one. A large
                # body is written (encrypted) to the client by a thread:
                # the reactor then only decrypts the upstream response.
                counting = _CountingOperation(
                    op, stats.meter(backend).readBytes)
                writer = bodywriter.SocketWriter.takeOver(
                    request, size, self.images.reactor)
                if writer is None:
                    await backend.readTo(offset, size, request,
                                         operation=counting)
                else:
                    await _throughWriter(writer, lambda: backend.readTo(
                        offset, size, writer, operation=counting))
            else:
                writer = bodywriter.SocketWriter.takeOver(
                    request, size, self.images.reactor)
                if writer is None:
                    producer = transfer.DownloadProducer(
                        backend, request, offset, size, operation=op,
                        metrics=stats if stats.enabled else None)
                    await producer.start()
                else:
                    def send():
                        source = writer.sourceFor(backend)
                        return transfer.DownloadProducer(
                            source, writer, offset, size, operation=op,
                            chunkSize=getattr(source, "chunkSize",
                                              transfer.CHUNK_SIZE),
                            metrics=stats if stats.enabled else None
                        ).start()
                    await _throughWriter(writer, send)
        except transfer.ProducerStopped:
            # The client went away; nobody to answer.
            return None
        finally:
            op.finish()
        channel = request.channel
        finishIfConnected(request)
        if small and rng is not None:
            readsession.offer(channel, request, self.images.store, ticket,
                              backend, stats, self.images.reactor)
        return None

    # PUT: the body streams through startBody; render_PUT answers.

    def startBody(self, request, length):
        """
        Decide about a PUT body from its headers (called by
        L{imageio.web.request.StreamingRequest.gotLength}).

        @return: the sink for the body.
        @raise errors.HTTPError: the request is refused.
        """
        cors(request)
        ticketId = self.requireId()
        args = queryArgs(request)
        if args.get("close") == "y":
            closeAfterResponse(request)
        if length is None:
            chunked = True
        else:
            chunked = False
            if request.getHeader(b"content-length") is None:
                # Twisted reports 0 for a request with neither header.
                raise errors.BadRequest("Content-Length header is required")
        offset = parseContentRange(_header(request, b"content-range"))
        flush = validate.enum(args, "flush", ("y", "n"), default="y") == "y"
        ticket = self.images.store.authorize(ticketId, "write")
        if chunked:
            if offset > ticket.size:
                raise errors.RangeNotSatisfiable(
                    "Requested range out of allowed range", ticket.size)
            limit = ticket.size - offset
        else:
            _allowedRange(offset, length, ticket)
            limit = length
        self._log.debug(
            "WRITE size={size} offset={offset} flush={flush} "
            "transfer={tid}", size="chunked" if chunked else length,
            offset=offset, flush=flush, tid=ticket.transferId)
        backend = self.images.backendFor(request, ticket)
        op = ticket.startOperation(offset, limit)
        return _Upload(request, ticket, op, backend, offset, limit, flush,
                       chunked, metrics=self.images.metrics,
                       reactor=self.images.reactor)

    @asyncRender
    async def render_PUT(self, request):
        upload = getattr(request, "streamSink", None)
        if not isinstance(upload, _Upload):
            # Only reachable with a request factory that does not stream.
            raise errors.InternalError(
                "Streaming request factory is required for PUT")
        try:
            await upload.wait()
            if upload.flush:
                with upload.metrics.timed("flush"):
                    await upload.sink.backend.flush()
        finally:
            upload.operation.finish()
        # Canceled while the last bytes were written: the reference answers
        # 403 and closes the connection.
        upload.operation.check()
        emptyResponse(request)
        return None

    # PATCH

    @asyncRender
    async def render_PATCH(self, request):
        ticketId = self.requireId()
        msg = validate.requireObject(readJSON(request))
        op = validate.enum(msg, "op", ("zero", "flush"))
        if op == "zero":
            await self._zero(request, ticketId, msg)
        else:
            await self._flush(request, ticketId)
        emptyResponse(request)
        return None

    async def _zero(self, request, ticketId, msg) -> None:
        size = validate.integer(msg, "size", minval=0)
        offset = validate.integer(msg, "offset", minval=0, default=0)
        flush = validate.boolean(msg, "flush", default=False)
        ticket = self.images.store.authorize(ticketId, "write")
        backend = await self.images.backendFor(request, ticket)
        _allowedRange(offset, size, ticket)
        self._log.debug("ZERO size={size} offset={offset} flush={flush} "
                        "transfer={tid}", size=size, offset=offset,
                        flush=flush, tid=ticket.transferId)
        await operations.zero(backend, ticket, offset, size, flush=flush,
                              metrics=self.images.metrics)

    async def _flush(self, request, ticketId) -> None:
        ticket = self.images.store.authorize(ticketId, "write")
        backend = await self.images.backendFor(request, ticket)
        self._log.info("FLUSH transfer={tid}", tid=ticket.transferId)
        await operations.flush(backend, ticket, metrics=self.images.metrics)

    # OPTIONS

    @asyncRender
    async def render_OPTIONS(self, request):
        cors(request, b"OPTIONS,GET,PUT")
        ticketId = self.requireId()
        options = {}
        config = self.images.config
        if config.local.enable:
            options["unix_socket"] = self.images.localSocket()
        if ticketId == "*":
            allow = ["OPTIONS", "GET", "HEAD", "PUT", "PATCH"]
            options["features"] = ALL_FEATURES
        else:
            ticket = self.images.store.authorize(ticketId, "read")
            backend = await self.images.backendFor(request, ticket)
            # Asking for a ticket's options is client activity.
            ticket.touch()
            allow = ["OPTIONS", "GET", "HEAD"]
            options["features"] = BASE_FEATURES
            if ticket.may("write"):
                allow += ["PUT", "PATCH"]
                options["features"] = ALL_FEATURES
            options["max_readers"] = backend.maxReaders
            options["max_writers"] = backend.maxWriters
        request.setHeader(b"allow", ",".join(allow).encode("ascii"))
        return jsonBody(request, options)


class _Extents(_Handler):
    """
    C{/images/{id}/extents[?context=zero|dirty][&start=N][&length=N]}.
    """

    _log = Logger()

    @asyncRender
    async def render_GET(self, request):
        ticketId = self.requireId()
        ticket = self.images.store.authorize(ticketId, "read")
        backend = await self.images.backendFor(request, ticket)
        args = queryArgs(request)
        context = validate.enum(args, "context", ("zero", "dirty"),
                                default="zero")
        if context == "dirty" and not ticket.dirty:
            raise errors.NotFound("Ticket does not support dirty extents")
        start = _nonNegative(args, "start")
        length = _nonNegative(args, "length")
        self._log.info("EXTENTS transfer={tid} context={context}",
                       tid=ticket.transferId, context=context)
        extents = await operations.extents(
            backend, context, start=start, length=length,
            metrics=self.images.metrics)
        if len(extents) > _BIG_EXTENTS:
            # A million extents take ~0.4 s to encode: not in the reactor.
            body = await deferToThreadPool(
                self.images.reactor, self.images.threadpool,
                encodeExtents, extents)
        else:
            body = encodeExtents(extents)
        request.setHeader(b"content-type", b"application/json")
        return body


def _nonNegative(args: dict, name: str) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if not value.isdigit() or not value.isascii() or len(value) > 20:
        raise errors.BadRequest(f"Invalid {name}: {value[:32]!r}")
    return int(value)


class _Checksum(_Handler):
    """
    C{/images/{id}/checksum[?algorithm=A][&block_size=N]}.
    """

    _log = Logger()

    @asyncRender
    async def render_GET(self, request):
        ticketId = self.requireId()
        args = queryArgs(request)
        algorithm = validate.enum(args, "algorithm", blkhash.ALGORITHMS,
                                  default=blkhash.ALGORITHM)
        raw = args.get("block_size")
        try:
            blockSize = blkhash.BLOCK_SIZE if raw is None else int(raw)
        except ValueError:
            raise errors.BadRequest(f"Invalid block size: {raw!r}")
        if not MIN_BLOCK_SIZE <= blockSize <= MAX_BLOCK_SIZE:
            raise errors.BadRequest(
                f"Block size out of allowed range: "
                f"{MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}")
        if blockSize % 4096:
            raise errors.BadRequest("Block size is not aligned to 4096")
        try:
            ticket = self.images.store.authorize(ticketId, "read")
        except errors.Forbidden as e:
            # The reference keeps the connection open here.
            raise errors.Forbidden(e.message, close=False) from None
        backend = await self.images.backendFor(request, ticket)
        self._log.info(
            "CHECKSUM transfer={tid} algorithm={algorithm} "
            "block_size={blockSize}", tid=ticket.transferId,
            algorithm=algorithm, blockSize=blockSize)
        result = await operations.checksum(
            backend, ticket, algorithm, blockSize,
            reactor=self.images.reactor, threadpool=self.images.threadpool,
            metrics=self.images.metrics)
        return jsonBody(request, result)

    def getChild(self, name, request):
        if name == b"algorithms":
            return _Algorithms(self.images, self.ticketId)
        return NoHandler()


class _Algorithms(_Handler):
    """
    C{/images/{id}/checksum/algorithms}: no ticket needed.
    """

    def render_GET(self, request):
        return jsonBody(request, {"algorithms": list(blkhash.ALGORITHMS)})


class Images(Resource):
    """
    The C{/images} resource; mount it as C{root.putChild(b"images", ...)}.

    @ivar store: the L{imageio.tickets.ITicketStore}.
    @ivar config: the daemon L{imageio.config.Config}.
    @ivar reactor: the reactor.
    @ivar threadpool: the started L{ThreadPool} for blocking work (file
        I/O, hashing, large JSON documents).
    @ivar metrics: the L{imageio.metrics.Metrics} the handlers report
        bytes and latencies to (L{NO_METRICS}: none).
    """

    def __init__(self, store, config, reactor, threadpool, *,
                 metrics=NO_METRICS, openBackend=backends.open,
                 localSocket=None):
        """
        @param openBackend: opens a ticket's backend; called as
            C{openBackend(reactor, url, mode=, sparse=, dirty=, config=,
            threadpool=)} and returning a L{Deferred} of an C{IBackend}
            (tests pass one returning memory backends).
        @param localSocket: a callable returning the local service's socket
            name for OPTIONS, when it is known only once bound (a random
            abstract name); by default C{config.local.socket}.
        """
        super().__init__()
        self.store = store
        self.config = config
        self.reactor = reactor
        self.threadpool = threadpool
        self.metrics = metrics
        self._openBackend = openBackend
        self._localSocket = localSocket

    def localSocket(self) -> str:
        if self._localSocket is not None:
            return self._localSocket()
        return self.config.local.socket

    def getChild(self, name, request):
        """
        C{/images/{id}}: the L{_Image} of ticket id C{name} (C{/images/}
        has the empty id, refused when the request is rendered).
        """
        return _Image(self, name.decode("utf-8", "replace"))

    def render(self, request):
        # /images itself: only the ticket ids below it answer.
        raise errors.NotFound(f"No handler for {requestPath(request)!r}")

    def backendFor(self, request, ticket) -> defer.Deferred:
        """
        The backend of C{ticket} for the request's connection: opened once
        per (connection, ticket) and kept by the connection.
        """
        def opener():
            return self._openBackend(
                self.reactor, ticket.url,
                mode="r+" if ticket.may("write") else "r",
                sparse=ticket.sparse, dirty=ticket.dirty, config=self.config,
                threadpool=self.threadpool)

        channel = request.channel
        backendFor = getattr(channel, "backendFor", None)
        if backendFor is not None:
            return backendFor(ticket, opener)
        # A channel that does not keep backends: open one for this request.
        d = defer.maybeDeferred(opener)

        def opened(backend):
            request.notifyFinish().addBoth(
                lambda _: defer.maybeDeferred(backend.close))
            return backend
        return d.addCallback(opened)

