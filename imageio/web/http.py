# -*- test-case-name: test.test_http -*-
"""
HTTP plumbing shared by every service: the request class, the base
resource, error and JSON replies, async rendering, CORS and query parsing.

The reference's HTTP layer semantics (SPEC B §1.1) live here in one place:
405 for unknown methods before routing, 404 for unknown paths, 405 for a
method a resource lacks (HEAD included, unless the resource defines it),
text/plain error bodies with a trailing newline, a generic 500 whose details
go only to the log, C{content-length} on every reply and
C{server: imageio/<version>}.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import time
from urllib.parse import unquote

from twisted.internet import defer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import NOT_DONE_YET

from imageio.logs import Logger
from imageio import __version__
from imageio import compat, errors

__all__ = [
    "Channel", "Request", "Resource", "Root", "asyncRender", "errorResponse",
    "jsonBody", "textBody", "emptyResponse", "cors", "queryArgs",
    "requestPath", "makeSite", "SERVER",
]

SERVER = f"imageio/{__version__}".encode("ascii")

ALLOWED_METHODS = frozenset(
    [b"GET", b"PUT", b"PATCH", b"POST", b"DELETE", b"OPTIONS", b"HEAD"])

GENERIC_ERROR = "Server failed to perform the request, check logs"

MAX_REQUEST_LINE = 4096
"""
The longest request line, its CRLF included; a longer one is answered 414
(the reference's limit).
"""

MAX_HEADER_LINE = 65536
"""
The longest header line, its CRLF included; a longer one is answered 431
(the limit of the reference's C{http.client}).
"""

MAX_HEADERS = 100
"""
The most header lines a request may have; more are answered 431 (the
limit of the reference's C{http.client}).
"""

MAX_HEAD = 256 * 1024
"""
The largest request head (request line and header lines); a larger one is
answered 431. The reference has no such bound (only MAX_HEADERS lines of
MAX_HEADER_LINE bytes); ours keeps the memory a connection can hold small.
"""

REASONS = {
    100: b"Continue",
    200: b"OK",
    204: b"No Content",
    206: b"Partial Content",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Request Entity Too Large",
    414: b"Request-URI Too Long",
    416: b"Requested Range Not Satisfiable",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
"""
The reason phrase of every status we send: the phrases of the reference's
Python (3.11, C{http.server.BaseHTTPRequestHandler.responses}), which
differ from Twisted's for some codes (416) and from newer Pythons' for
others (413, 416). C{test_http.test_reason_phrases} compares them with
the reference's table.
"""

# Storage conditions the user can act on: a 500 like any backend failure
# (clients of the reference expect it), but the text names the condition
# (errno text only; never the path, which stays in the log).
_STORAGE_ERRNOS = frozenset([errno.ENOSPC, errno.EDQUOT])

# Response headers an error reply keeps; everything else a handler set
# before failing (content-disposition, content-length...) is dropped.
_KEEP_ON_ERROR = (b"server", b"date", b"access-control-allow-origin",
                  b"access-control-allow-headers",
                  b"access-control-allow-methods",
                  b"access-control-max-age", b"connection")

_log = Logger()


def requestPath(request) -> str:
    """
    The percent-decoded request path, as the reference reports it in
    error texts.
    """
    return unquote(request.path.decode("utf-8", "replace"))


def _method(request) -> str:
    return request.method.decode("ascii", "replace")


def closeAfterResponse(request) -> None:
    """
    Make the channel close the connection once this response is done.
    """
    request.setHeader(b"connection", b"close")
    channel = request.channel
    if channel is not None:
        channel.persistent = False


def errorResponse(request, reason) -> None:
    """
    Answer C{request} with the error C{reason} (an exception or a
    L{Failure}) and finish it.

    L{errors.HTTPError} gives its status and text; backend errors are
    mapped here; anything else is a 500 whose traceback goes to the log
    only. If the response already started, the connection is aborted: a
    status cannot be sent any more and a truncated body is the only signal
    left.
    """
    failure = reason if isinstance(reason, Failure) else Failure(reason)
    exc = failure.value
    if isinstance(exc, errors.HTTPError):
        code, message, headers, close = (
            exc.code, exc.message, exc.headers, exc.close)
    elif isinstance(exc, errors.UnsupportedOperation):
        code, message, headers, close = 404, str(exc), {}, False
    elif isinstance(exc, errors.PartialContent):
        code, message, headers, close = 400, str(exc), {}, False
    else:
        code, message, headers, close = 500, GENERIC_ERROR, {}, False
        storage = _storageError(exc)
        if storage is not None:
            message = f"Server failed to perform the request: {storage}"
        _log.failure("{method} {path} failed", failure,
                     method=_method(request), path=requestPath(request))

    if compat.requestGone(request) or request.finished:
        return
    if request.startedWriting:
        _log.warn("{method} {path} failed after the response started: "
                  "{error}; aborting the connection",
                  method=_method(request), path=requestPath(request),
                  error=message)
        transport = request.channel.transport if request.channel else None
        if transport is not None:
            transport.abortConnection()
        return

    _log.info("{method} {path}: {code} {message}", method=_method(request),
              path=requestPath(request), code=code, message=message)
    for name, _ in list(request.responseHeaders.getAllRawHeaders()):
        if name.lower() not in _KEEP_ON_ERROR:
            request.responseHeaders.removeHeader(name)
    request.setResponseCode(code)
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    if close:
        closeAfterResponse(request)
    body = textBody(request, message)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _storageError(exc) -> str | None:
    """
    The errno text of an out-of-space error anywhere in C{exc}'s chain of
    causes (backends wrap C{OSError} and NBD errors in L{errors.BackendError}),
    else C{None}.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None)
        if isinstance(code, int) and code in _STORAGE_ERRNOS:
            return os.strerror(code)
        exc = exc.__cause__ or exc.__context__
    return None


def textBody(request, message: str) -> bytes:
    """
    Set a text/plain content type and return C{message} + newline.
    """
    request.setHeader(b"content-type", b"text/plain; charset=UTF-8")
    return (message + "\n").encode("utf-8")


def jsonBody(request, obj) -> bytes:
    """
    Set a JSON content type and return the encoded object + newline.
    """
    request.setHeader(b"content-type", b"application/json")
    return (json.dumps(obj) + "\n").encode("utf-8")


def emptyResponse(request, code: int = 200) -> None:
    """
    Finish C{request} with C{code} and an empty body (always with
    C{content-length: 0}: vdsm and the engine rely on it).
    """
    request.setResponseCode(code)
    request.setHeader(b"content-length", b"0")
    request.write(b"")
    request.finish()


def finishWith(request, body: bytes, code: int = 200) -> None:
    """
    Finish C{request} with C{body}, setting its length.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def asyncRender(f):
    """
    Let a C{render_X} method be an C{async def}.

    The coroutine may return C{bytes} (sent with status 200 unless it set
    another), or C{None} when it finished the response itself (streaming).
    A raised exception is answered by L{errorResponse}. If the client goes
    away, the coroutine is cancelled.
    """
    @functools.wraps(f)
    def render(self, request):
        d = defer.ensureDeferred(f(self, request))
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(body):
            if body is None or compat.requestGone(request) or request.finished:
                return
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure):
            if compat.requestGone(request) or request.finished:
                if not failure.check(defer.CancelledError):
                    _log.failure("{method} {path} failed after the client "
                                 "went away", failure,
                                 method=_method(request),
                                 path=requestPath(request))
                return
            errorResponse(request, failure)

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: _log.failure("rendering failed", f))
        return NOT_DONE_YET
    return render


def cors(request, methods: bytes = b"*") -> None:
    """
    Add CORS reply headers for the CORS request headers present (SPEC B
    §1.12). Call before the handler can fail: errors carry them too.
    """
    added = False
    if request.getHeader(b"origin") is not None:
        request.setHeader(b"access-control-allow-origin", b"*")
        added = True
    if request.getHeader(b"access-control-request-headers") is not None:
        request.setHeader(b"access-control-allow-headers", b"*")
        added = True
    if request.getHeader(b"access-control-request-method") is not None:
        request.setHeader(b"access-control-allow-methods", methods)
        added = True
    if added:
        request.setHeader(b"access-control-max-age", b"86400")


def queryArgs(request) -> dict[str, str]:
    """
    The query string as C{str} to C{str}; blank values kept, the last of a
    repeated key wins (as the reference).

    @raise errors.BadRequest: the query is not valid UTF-8.
    """
    try:
        return {k.decode("utf-8"): v[-1].decode("utf-8")
                for k, v in request.args.items()}
    except UnicodeDecodeError:
        raise errors.BadRequest("Invalid query string: not UTF-8")


def readJSON(request, prefix: str = "Invalid JSON message "):
    """
    Decode a (small, already received) JSON request body into an object.

    @param prefix: the text before the decoder's message in the error, as
        the reference words it for this request.
    @raise errors.BadRequest: the body is not JSON (SPEC A17).
    """
    data = request.content.read() if request.content is not None else b""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise errors.BadRequest(f"{prefix}{e}")
    return obj


_date = [0, b""]


def httpDate() -> bytes:
    """
    The C{date} header's value for now. Formatting it took a fiftieth of
    the CPU of a 4 KiB Range GET; it changes once a second.
    """
    now = int(time.time())
    if _date[0] != now:
        _date[1] = http.datetimeToString(now)
        _date[0] = now
    return _date[1]


class Request(server.Request):
    """
    The request class of every imageio service.

    Differs from L{server.Request} in what the reference's HTTP layer does:
    unknown methods are refused before routing, the C{server} header names
    imageio, there is no default content type, and every failure becomes a
    text/plain reply through L{errorResponse}.
    """

    defaultContentType = None

    def __init__(self, channel, *args, metrics=None, service=None,
                 **kwargs):
        """
        @param metrics: count the request as C{service}'s when its
            response is finished or its connection lost (one hook for
            every way a request ends, early error responses of
            L{imageio.web.request.StreamingRequest} included); given by
            the Site's request factory (L{imageio.metrics.Metrics
            .instrument}). C{None}: not counted.
        """
        super().__init__(channel, *args, **kwargs)
        self.metrics = metrics
        self.service = service
        if metrics is not None:
            metrics.trackRequest(self, service)

    headError = None
    """
    An error found in the request head that does not break the framing
    (a bad C{Content-Length}), answered instead of the request; set by
    L{Channel}.
    """

    routed = None
    """
    C{(resource, prepath, postpath)} when the resource was found before the
    body was read (L{imageio.web.request.StreamingRequest}), so that
    L{process} does not walk the tree again.
    """

    def setResponseCode(self, code, message=None):
        if message is None:
            message = REASONS.get(code)
        super().setResponseCode(code, message)

    def startReply(self) -> None:
        """
        What every reply starts with, an error answered before routing
        included: the site, and the C{server} and C{date} headers.
        """
        self.site = self.channel.site
        self.setHeader(b"server", SERVER)
        self.setHeader(b"date", httpDate())

    def process(self):
        self.startReply()
        self.prepath = []
        self.postpath = list(map(server.unquote, self.path[1:].split(b"/")))
        try:
            if self.headError is not None:
                raise self.headError
            if self.method not in ALLOWED_METHODS:
                raise errors.MethodNotAllowed(
                    f"Invalid method {_method(self)!r}")
            if not self.path.startswith(b"/"):
                # "*", "Ximages/x", an absolute URI: no route matches (the
                # tree below would route it without its first byte).
                raise errors.NotFound(
                    f"No handler for {requestPath(self)!r}")
            if self.routed is not None:
                # Found already, when the body started.
                resrc, self.prepath, self.postpath = self.routed
            else:
                resrc = self.site.getResourceFor(self)
            body = resrc.render(self)
            if body is NOT_DONE_YET:
                return
            finishWith(self, body, self.code)
        except Exception:
            errorResponse(self, Failure())

    def processingFailed(self, reason):
        errorResponse(self, reason)
        return reason


class Channel(compat.ChannelBase):
    """
    An HTTP/1.1 connection of any imageio service.

    Adds to L{http.HTTPChannel} the reference's limits on the request head,
    each answered with a text and a close (414 for the request line, 431
    for header lines, their number and the head's size, 400 for bad
    syntax), the reference's 400 for a bad C{Content-Length} (the
    connection is kept; the body is taken as empty), and a lingering close
    after such an early answer.

    @ivar _discarding: input is dropped (an early error response was sent
        while the client may still be sending).
    @ivar _lost: the connection is gone.
    @ivar _badLength: the text of the 400 answering the current request's
        bad C{Content-Length}, or C{None}.
    """

    _log = Logger()

    MAX_LENGTH = MAX_HEADER_LINE - 2
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEAD

    LINGER = 5
    """
    Seconds a connection refusing a request keeps reading (and dropping)
    what the client sends after the error response, before it is closed.
    """

    _lingering = None
    _badLength = None
    _host = None

    def __init__(self):
        super().__init__()
        self._discarding = False
        self._lost = False

    def getHost(self):
        # Each request asks (Twisted's Request.__init__): a getsockname
        # call per request, for an address that never changes.
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    # Input.

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        if not self.requestLineSeen():
            if len(line) + 2 > MAX_REQUEST_LINE:
                self._refuseHead(414, b"Request-URI Too Long",
                                 "Request-URI Too Long")
                return
        elif self.headSize() + len(line) > self.totalHeadersSize:
            self._refuseHead(431, b"Request Header Fields Too Large",
                             "Request header fields too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver closes the transport itself, which never happens on
        # TLS while this channel is the transport's producer (the request
        # then hung until the idle timeout).
        if not self.requestLineSeen():
            self._refuseHead(414, b"Request-URI Too Long",
                             "Request-URI Too Long")
        else:
            self._refuseHead(431, b"Line too long", "Line too long")

    def headerReceived(self, line: bytes) -> bool:
        if self.headerCount() >= self.maxHeaders:
            self._refuseHead(431, b"Too many headers", "Too many headers")
            return False
        return super().headerReceived(line)

    def transferHeaderReceived(self, header: bytes, data: bytes) -> bool:
        # Twisted refuses a non-digit Content-Length with a bare 400 and a
        # close. The reference parses it with int() and answers 400 with a
        # text, keeping the connection (the body is then taken as empty).
        if header == b"Content-Length":
            text = data.decode("latin-1")
            try:
                length = int(text)
            except ValueError:
                self._badLength = f"Invalid Content-Length: {text!r}"
                return True
            if length < 0:
                self._badLength = f"Negative Content-Length: {length}"
                return True
            data = b"%d" % length
        return super().transferHeaderReceived(header, data)

    def allHeadersReceived(self) -> None:
        if self._badLength is not None:
            self.requests[-1].headError = errors.BadRequest(self._badLength)
            self._badLength = None
        super().allHeadersReceived()

    def badHead(self) -> None:
        self._refuseHead(400, b"Bad Request", "Bad request")

    def _refuseHead(self, code: int, phrase: bytes, message: str) -> None:
        """
        Answer a request whose head cannot be parsed or is too large, and
        close the connection (lingering: the client may still be sending).
        """
        if self._discarding or self.transport is None:
            return
        self._log.info("Refusing request from {peer}: {code} {message}",
                       peer=str(self.transport.getPeer()), code=code,
                       message=message)
        body = (message + "\n").encode("utf-8")
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (code, phrase),
            b"server: " + SERVER + b"\r\n",
            b"date: " + httpDate() + b"\r\n",
            b"content-type: text/plain; charset=UTF-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n", body]))
        self.persistent = False
        self.discardInput()
        self.loseConnection()

    def discardInput(self) -> None:
        """
        Drop everything the client sends from now on: the connection will
        close once the error response is sent.
        """
        self._discarding = True

    def loseConnection(self):
        if not self._discarding or self._lost or self.transport is None:
            return super().loseConnection()
        if self._lingering is not None:
            return
        # Lingering close. The client may still be sending what we refused;
        # closing a socket with unread input makes the kernel send a reset,
        # which can destroy our response before the client reads it. So
        # end our side only (FIN after the response; a TLS connection sends
        # close_notify and waits for the peer's), keep dropping input, and
        # close for good after LINGER seconds.
        self.unregisterNetworkProducer()
        transport = self.transport
        halfClose = getattr(transport, "loseWriteConnection", None)
        if halfClose is not None and not isinstance(
                transport, TLSMemoryBIOProtocol):
            halfClose()
        else:
            transport.loseConnection()
        self._lingering = self.callLater(self.LINGER, self._endLinger)

    def _endLinger(self) -> None:
        self._lingering = None
        if not self._lost:
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self._lost = True
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        super().connectionLost(reason)


class Resource(resource.Resource):
    """
    Base resource: a method without a C{render_X} gives 405 with the
    reference's text. HEAD is not mapped to GET unless a subclass defines
    C{render_HEAD} (SPEC A6).
    """

    render_HEAD = None

    def render(self, request):
        method = _method(request)
        handler = getattr(self, "render_" + method, None)
        if handler is None:
            raise errors.MethodNotAllowed(
                f"Method {method!r} not defined for {requestPath(request)!r}")
        return handler(request)

    def getChild(self, name, request):
        return NoHandler()


class NoHandler(Resource):
    """
    What an unknown path resolves to: 404 for every allowed method.
    """

    isLeaf = True

    def render(self, request):
        raise errors.NotFound(f"No handler for {requestPath(request)!r}")


class Root(Resource):
    """
    A service's root: only its children answer.
    """

    def render(self, request):
        raise errors.NotFound(f"No handler for {requestPath(request)!r}")


class _AccessLine:
    """
    An access log line formatted only if an observer wants it.
    """

    __slots__ = ("_site", "_request")

    def __init__(self, site, request):
        self._site = site
        self._request = request

    def __str__(self):
        site = self._site
        return compat.accessLogLine(site, self._request)


class _Site(server.Site):
    """
    A Site whose access log is a debug event (Twisted's goes to the legacy
    log at info level, one formatted line per request: a sixth of the CPU
    of a small Range GET).
    """

    _accessLog = Logger(namespace="imageio.web.access")

    def log(self, request) -> None:
        self._accessLog.debug("{line}", line=_AccessLine(self, request))


def makeSite(root, *, reactor, requestFactory=Request, channelFactory=None,
             timeout=60):
    """
    A L{server.Site} for one service.

    @param channelFactory: if given, a zero-argument callable building the
        L{Channel} for each connection (the images services use one that
        owns the connection's backends); L{Channel} by default. HTTP/2 is
        never offered.
    @param timeout: idle seconds before a connection is dropped (the
        reference's 60 s for connections not yet bound to a ticket).
    """
    site = _Site(root, requestFactory=requestFactory, reactor=reactor)
    site.timeOut = timeout
    site.displayTracebacks = False
    site.protocol = channelFactory if channelFactory is not None else Channel
    return site
