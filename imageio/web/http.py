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
from urllib.parse import unquote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import NOT_DONE_YET

from imageio.logs import Logger
from imageio import __version__
from imageio import errors

__all__ = [
    "Request", "Resource", "Root", "asyncRender", "errorResponse",
    "jsonBody", "textBody", "emptyResponse", "cors", "queryArgs",
    "requestPath", "makeSite", "SERVER",
]

SERVER = f"imageio/{__version__}".encode("ascii")

ALLOWED_METHODS = frozenset(
    [b"GET", b"PUT", b"PATCH", b"POST", b"DELETE", b"OPTIONS", b"HEAD"])

GENERIC_ERROR = "Server failed to perform the request, check logs"

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

    if request._disconnected or request.finished:
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
            if body is None or request._disconnected or request.finished:
                return
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure):
            if request._disconnected or request.finished:
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


def readJSON(request, what: str = "message"):
    """
    Decode a (small, already received) JSON request body into an object.

    @raise errors.BadRequest: with the reference's text for bad JSON, or for
        a document that is not a JSON object (SPEC A17).
    """
    data = request.content.read() if request.content is not None else b""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise errors.BadRequest(f"Invalid JSON {what}: {e}")
    return obj


class Request(server.Request):
    """
    The request class of every imageio service.

    Differs from L{server.Request} in what the reference's HTTP layer does:
    unknown methods are refused before routing, the C{server} header names
    imageio, there is no default content type, and every failure becomes a
    text/plain reply through L{errorResponse}.
    """

    defaultContentType = None

    def __init__(self, channel, *args, **kwargs):
        super().__init__(channel, *args, **kwargs)
        # The Site's metrics (imageio.metrics.Metrics.instrument) count the
        # request when its response is finished or its connection lost:
        # one hook for every way a request ends, early error responses of
        # StreamingRequest included. A Site without metrics counts nothing.
        site = getattr(channel, "site", None)
        metrics = getattr(site, "metrics", None)
        if metrics is not None:
            metrics.trackRequest(self, site.metricsService)

    def process(self):
        self.site = self.channel.site
        self.setHeader(b"server", SERVER)
        self.setHeader(b"date", http.datetimeToString())
        self.prepath = []
        self.postpath = list(map(server.unquote, self.path[1:].split(b"/")))
        try:
            if self.method not in ALLOWED_METHODS:
                raise errors.MethodNotAllowed(
                    f"Invalid method {_method(self)!r}")
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
        return site._logFormatter(site._logDateTime, self._request)


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
        L{http.HTTPChannel} for each connection (the images services use one
        that owns the connection's backends). HTTP/2 is never offered.
    @param timeout: idle seconds before a connection is dropped (the
        reference's 60 s for connections not yet bound to a ticket).
    """
    site = _Site(root, requestFactory=requestFactory, reactor=reactor)
    site.timeOut = timeout
    site.displayTracebacks = False
    if channelFactory is not None:
        site.protocol = channelFactory
    return site
