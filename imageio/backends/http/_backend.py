# -*- test-case-name: test.test_backend_http -*-
"""
The http backend itself: L{open} and L{HTTPBackend}, an L{IBackend} whose
every request goes to another imageio daemon (see L{imageio.backends.http}).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from zope.interface import implementer

from imageio.abilities import IPipelined, IStreamingRelay
from imageio.backends import IBackend
from imageio.backends.http._relay import UploadStream, _StreamTo
from imageio.backends.http._upstream import (
    OPTIONS_LIMIT, SMALL_BODY_LIMIT, BytesBody, DropBody, Endpoints,
    UpstreamTLSError, ZeroBody, errorText, findError, httpError, makeClient,
    readBody, tlsFailure, trustRoot)
from imageio.errors import BackendError, HTTPError, UnsupportedOperation
from imageio.extents import DirtyExtent, ZeroExtent
from imageio.logs import Logger
from imageio.units import MiB

__all__ = ["open", "HTTPBackend", "splitURL", "InvalidURL",
           "OPTIONS_TIMEOUT", "DEFAULT_BUFFER_SIZE",
           "DEFAULT_MAX_CONNECTIONS"]

# The namespace the backend's log lines always had.
_log = Logger(namespace="imageio.backends.http")

OPTIONS_TIMEOUT = 60
"""
Seconds the OPTIONS request (connect, TLS handshake, answer) may take.
"""

DEFAULT_BUFFER_SIZE = 8 * MiB
DEFAULT_MAX_CONNECTIONS = 8


def open(reactor, url: str, *, mode: str, sparse: bool = False,
         dirty: bool = False, config=None) -> defer.Deferred[HTTPBackend]:
    """
    Connect to the remote imageio daemon serving C{url}.

    @param url: C{https://host:port/images/<id>} or C{http://...}.
    @param mode: C{"r"} or C{"r+"}; the remote ticket decides what is
        allowed, so it is only recorded.
    @param sparse: ignored (the remote ticket decides).
    @param dirty: ignored (the remote ticket decides).
    @param config: the daemon L{imageio.config.Config}, or C{None} for the
        defaults.
    @return: L{Deferred} firing with an L{HTTPBackend}, or failing with an
        L{HTTPError} carrying the remote's status and text, an
        L{UpstreamTLSError} naming the host when its certificate is refused
        (logged; a generic 500 for the client), or a L{BackendError}.
    """
    return defer.ensureDeferred(_open(reactor, url, mode, config))


class InvalidURL(BackendError):
    """
    An image url the backend cannot use: not http or https, a bad port,
    no host.
    """


def splitURL(url: str) -> tuple[str, str, int, str]:
    """
    @return: C{(scheme, host, port, path)} of an http or https image url;
        the port defaults to the scheme's, the path to C{/}.
    @raise InvalidURL: the url cannot be used (the text says why).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidURL(f"Unsupported url scheme: {url!r}")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as e:
        raise InvalidURL(f"Invalid url {url!r}: {e}") from e
    if not host:
        raise InvalidURL(f"Invalid url {url!r}: no host")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts.scheme, host, port, parts.path or "/"


async def _open(reactor, url, mode, config) -> HTTPBackend:
    scheme, host, port, path = splitURL(url)
    if config is None:
        bufferSize = DEFAULT_BUFFER_SIZE
        maxConnections = DEFAULT_MAX_CONNECTIONS
        caFile = ""
    else:
        bufferSize = config.backend_http.buffer_size
        maxConnections = config.daemon.max_connections
        caFile = config.backend_http.ca_file or config.tls.ca_file

    creator = None
    if scheme == "https":
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRoot(caFile))
        creator = policy.creatorForNetloc(host.encode("idna"), port)

    return await HTTPBackend.connect(
        reactor, url=url, host=host, port=port, path=path, creator=creator,
        mode=mode, bufferSize=bufferSize, maxConnections=maxConnections)


# The backend.

@implementer(IBackend, IPipelined, IStreamingRelay)
class HTTPBackend:
    """
    An L{IBackend} relaying to another imageio daemon.

    Every request goes through this backend's own connection pool (one
    persistent connection per request in flight, kept for reuse), over TCP
    (TLS for https) or, after the upgrade, over the remote's unix socket.

    @ivar url: the ticket url.
    @ivar features: the remote's features (C{set} of C{str}).
    @ivar unixSocket: the unix socket in use, or C{None} (TCP).
    @ivar _extents: cached extent lists by context. Zero extents are
        forgotten after our own writes and zeroes.
    @ivar _active: upstream requests and streams in progress, cancelled by
        L{close}.
    """

    name = "http"
    readDepth = 4
    writeDepth = 1
    blockSize = 1

    def __init__(self, reactor, *, url: str, host: str, port: int,
                 path: str, creator=None, mode: str = "r+",
                 bufferSize: int = DEFAULT_BUFFER_SIZE,
                 maxConnections: int = DEFAULT_MAX_CONNECTIONS,
                 client: HTTPClient | None = None):
        """
        Use L{connect}: a backend is usable once connected.

        @param creator: the TLS connection creator for https, or C{None}
            (http).
        @param client: a treq L{HTTPClient} sending the requests instead of
            one on the backend's own pool (tests pass
            L{treq.testing.StubTreq}).
        """
        self._reactor = reactor
        self.url = url
        self.mode = mode
        self.maxRequest = bufferSize
        self.maxReaders = 1
        self.maxWriters = 1
        self.features: set[str] = set()
        self.unixSocket: str | None = None
        self._maxConnections = maxConnections
        self._netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._path = path
        scheme = "https" if creator is not None else "http"
        self._base = f"{scheme}://{self._netloc}"
        self._endpoints = Endpoints(reactor, host=host, port=port,
                                     creator=creator)
        self._client, self._pool = makeClient(reactor, self._endpoints,
                                               maxConnections)
        if client is not None:
            self._client = client
        self._pools = [self._pool]
        self._size: int | None = None
        self._extents: dict[str, list] = {}
        self._active: set = set()
        self._closed: defer.Deferred | None = None

    def __repr__(self):
        via = f" via {self.unixSocket!r}" if self.unixSocket else ""
        return f"<HTTPBackend {self._base}{self._path}{via}>"

    # Opening.

    @classmethod
    def connect(cls, reactor, *, url: str, host: str, port: int,
                path: str, creator=None, mode: str = "r+",
                bufferSize: int = DEFAULT_BUFFER_SIZE,
                maxConnections: int = DEFAULT_MAX_CONNECTIONS,
                client: HTTPClient | None = None
                ) -> defer.Deferred[HTTPBackend]:
        """
        Open a backend on a url already parsed (L{open} parses the
        daemon's, L{imageio.client} its own): learn the remote's features,
        move to its unix socket when it is on this host, learn the size.
        The parameters are those of the constructor.

        @return: L{Deferred} firing with the connected L{HTTPBackend}, or
            failing (the backend closed) as L{open}'s does.
        """
        backend = cls(reactor, url=url, host=host, port=port, path=path,
                      creator=creator, mode=mode, bufferSize=bufferSize,
                      maxConnections=maxConnections, client=client)
        return defer.ensureDeferred(backend._connectOrClose())

    async def _connectOrClose(self) -> HTTPBackend:
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def _connect(self) -> None:
        options = await self._options(self._client, self._base,
                                      timeout=OPTIONS_TIMEOUT)
        self._applyOptions(options)
        _log.debug("{netloc}{path}: features={features} "
                   "max_readers={r} max_writers={w}",
                   netloc=self._netloc, path=self._path,
                   features=sorted(self.features), r=self.maxReaders,
                   w=self.maxWriters)
        unixSocket = options.get("unix_socket")
        if isinstance(unixSocket, str) and unixSocket and self._isLocal():
            await self._useUnixSocket(unixSocket)
        if "extents" in self.features:
            extents = await self.extents("zero")
            self._size = extents[-1].end if extents else 0
        else:
            self._size = await self._emulateHead()

    def _applyOptions(self, options: dict) -> None:
        features = options.get("features")
        if isinstance(features, list):
            self.features = {f for f in features if isinstance(f, str)}
        for key, attr in (("max_readers", "maxReaders"),
                          ("max_writers", "maxWriters")):
            value = options.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) \
                    or value < 1:
                value = 1
            setattr(self, attr, value)

    def _isLocal(self) -> bool:
        addresses = self._endpoints.addresses
        return bool(addresses) and addresses[0] == addresses[1]

    async def _options(self, client, base, timeout=None,
                       label=None) -> dict:
        response = await self._request("OPTIONS", client=client, base=base,
                                       timeout=timeout, label=label)
        code = response.code
        if code in (204, 405):
            # Older proxies (204, no body) and daemons (405) know no
            # OPTIONS features.
            await readBody(response, SMALL_BODY_LIMIT)
            return {}
        if code != 200:
            raise await self._unexpected(response, "OPTIONS")
        body = await readBody(response, OPTIONS_LIMIT)
        try:
            options = json.loads(body.decode("utf-8"))
        except ValueError:
            return {}
        return options if isinstance(options, dict) else {}

    async def _useUnixSocket(self, path: str) -> None:
        endpoints = Endpoints(self._reactor, unixPath=path)
        client, pool = makeClient(self._reactor, endpoints,
                                   self._maxConnections)
        base = "http://localhost"
        try:
            await self._options(client, base, timeout=OPTIONS_TIMEOUT,
                                label=f"{self._path} via {path!r}")
        except Exception as e:
            _log.warn("Cannot use unix socket {path!r} of {netloc}, "
                      "staying on TCP: {error}", path=path,
                      netloc=self._netloc, error=e)
            await pool.closeCachedConnections()
            return
        _log.debug("{netloc}{path}: using unix socket {socket!r}",
                   netloc=self._netloc, path=self._path, socket=path)
        old = self._pool
        self._client, self._pool, self._base = client, pool, base
        self._pools.append(pool)
        self.unixSocket = path
        await old.closeCachedConnections()
        self._pools.remove(old)

    async def _emulateHead(self) -> int:
        # No extents: the size is the length of a GET without Range. The
        # body is not wanted, so the connection is dropped (as the
        # reference does; there is no HEAD in the reference's API).
        response = await self._request("GET")
        if response.code != 200:
            raise await self._unexpected(response, "GET")
        length = response.length
        response.deliverBody(DropBody())
        if not isinstance(length, int):
            raise BackendError(f"{self._netloc}{self._path}: GET without "
                               f"content-length, cannot tell the size")
        return length

    # Requests.

    def _request(self, method: str, *, query: str = "", headers=None,
                 body=None, timeout=None, suffix: str = "", client=None,
                 base=None, label=None) -> defer.Deferred:
        """
        Send one request to the remote's image url.

        @return: L{Deferred} firing with the unbuffered response, or failing
            with L{UpstreamTLSError} (certificate refused, handshake
            failed) or L{BackendError}
            (connection failed).
        """
        client = client or self._client
        url = (base or self._base) + self._path + suffix + query
        d = client.request(method, url, headers=headers, data=body,
                           unbuffered=True, allow_redirects=False,
                           timeout=timeout)
        self._active.add(d)

        def settled(result):
            self._active.discard(d)
            return result

        d.addBoth(settled)
        d.addErrback(self._requestFailed, method, label)
        return d

    def _requestFailed(self, failure: Failure, method: str, label=None):
        if failure.check(HTTPError, BackendError):
            return failure
        if failure.check(defer.CancelledError) and self._closed is not None:
            return failure
        where = label or f"{self._netloc}{self._path}"
        tls = tlsFailure(failure)
        if tls is not None:
            certificate, reason = tls
            if certificate:
                message = (f"Certificate of {self._netloc} refused: "
                           f"{reason}")
            else:
                message = f"TLS connection to {self._netloc} failed: {reason}"
            # Logged in full (errorResponse logs the traceback, with this
            # text); the client gets the generic 500 text: the backend's
            # host and port are no business of the image's client (the
            # reference answers the same).
            _log.error("{method} {where}: {message}", method=method,
                       where=where, message=message)
            raise UpstreamTLSError(message) from failure.value
        if findError(failure, defer.CancelledError) is not None:
            raise BackendError(f"{method} {where}: timed out") \
                from failure.value
        raise BackendError(
            f"{method} {where} failed: {failure.getErrorMessage()}"
        ) from failure.value

    async def _unexpected(self, response, method: str) -> Exception:
        """
        @return: the error for an unexpected response: the remote's own
            error (status 400 and above) with its text, else a
            L{BackendError}. The body is read (error texts are short) or
            dropped.
        """
        if response.code >= 400:
            try:
                body = await readBody(response, SMALL_BODY_LIMIT)
            except Exception:
                body = b""
            error = httpError(response.code, body)
            # Which request got the answer, for the client's message.
            error.method = method
            return error
        response.deliverBody(DropBody())
        return BackendError(f"{method} {self._netloc}{self._path}: "
                            f"unexpected status {response.code}")

    def _failResponse(self, response, method):
        return defer.ensureDeferred(self._unexpected(response, method)) \
            .addCallback(Failure)

    def _range(self, offset: int, length: int) -> dict:
        return {"range": f"bytes={offset}-{offset + length - 1}"}

    def _putHeaders(self, offset: int, length: int) -> dict:
        return {"content-type": "application/octet-stream",
                "content-range": f"bytes {offset}-{offset + length - 1}/*"}

    def _putQuery(self, flush: bool = False) -> str:
        if "flush" not in self.features:
            return ""
        return "?flush=y" if flush else "?flush=n"

    def _expect200(self, response, method: str):
        if response.code != 200:
            return self._failResponse(response, method)
        return readBody(response, SMALL_BODY_LIMIT).addCallback(
            lambda _: None)

    def _patch(self, message: dict) -> defer.Deferred[None]:
        body = BytesBody(json.dumps(message).encode("utf-8"))
        d = self._request("PATCH", body=body,
                          headers={"content-type": "application/json"})
        d.addCallback(self._expect200, "PATCH")
        return d

    def _check(self) -> None:
        if self._closed is not None:
            raise BackendError(f"{self!r} is closed")

    # IBackend.

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> defer.Deferred:
        """
        Read with one C{GET} and C{range: bytes=a-b}; the answer must be 206
        with exactly that many bytes. Reads are clipped to the image size.
        """
        try:
            self._check()
        except Exception:
            return defer.fail()
        if self._size is not None:
            length = min(length, self._size - offset)
        if length <= 0:
            return defer.succeed(b"")
        d = self._getRange(offset, length)
        d.addCallback(readBody, length)
        return d

    def _getRange(self, offset: int, length: int) -> defer.Deferred:
        """
        Send C{GET} with C{range: bytes=a-b}.

        @return: L{Deferred} firing with the response once it is a 206 of
            exactly C{length} bytes (its body not read yet); otherwise
            failing with the remote's error (passed through) or a
            L{BackendError}.
        """
        d = self._request("GET", headers=self._range(offset, length))

        def check(response):
            if response.code != 206:
                return self._failResponse(response, "GET")
            if response.length != length:
                response.deliverBody(DropBody())
                raise BackendError(
                    f"GET {self._netloc}{self._path}: expected {length} "
                    f"bytes, the remote sends {response.length}")
            return response

        d.addCallback(check)
        return d

    def write(self, offset: int, data) -> defer.Deferred[None]:
        """
        Write with one C{PUT} (C{?flush=n} when the remote can flush).
        """
        try:
            self._check()
        except Exception:
            return defer.fail()
        length = len(data)
        if not length:
            return defer.succeed(None)
        self._extents.pop("zero", None)
        d = self._request("PUT", query=self._putQuery(),
                          headers=self._putHeaders(offset, length),
                          body=BytesBody(data))
        d.addCallback(self._expect200, "PUT")
        return d

    def zero(self, offset: int, length: int) -> defer.Deferred[None]:
        """
        C{PATCH} C{{"op": "zero"}} when the remote has the C{zero} feature,
        else one C{PUT} streaming zeroes.
        """
        try:
            self._check()
        except Exception:
            return defer.fail()
        if length <= 0:
            return defer.succeed(None)
        self._extents.pop("zero", None)
        if "zero" in self.features:
            return self._patch({"op": "zero", "offset": offset,
                                "size": length,
                                "flush": "flush" not in self.features})
        d = self._request("PUT", query=self._putQuery(),
                          headers=self._putHeaders(offset, length),
                          body=ZeroBody(length))
        d.addCallback(self._expect200, "PUT")
        return d

    def flush(self) -> defer.Deferred[None]:
        """
        C{PATCH} C{{"op": "flush"}} when the remote has the C{flush}
        feature; nothing otherwise.
        """
        try:
            self._check()
        except Exception:
            return defer.fail()
        if "flush" not in self.features:
            return defer.succeed(None)
        return self._patch({"op": "flush"})

    def extents(self, context: str = "zero") -> defer.Deferred[list]:
        """
        The remote's extents (C{GET <path>/extents?context=...}), cached.
        Without the C{extents} feature: one data extent (zero context) or
        L{UnsupportedOperation} (dirty context).
        """
        return defer.ensureDeferred(self._getExtents(context))

    async def _getExtents(self, context: str) -> list:
        if context not in ("zero", "dirty"):
            raise BackendError(f"Invalid extents context: {context!r}")
        self._check()
        cached = self._extents.get(context)
        if cached is not None:
            return list(cached)
        if "extents" not in self.features:
            if context == "zero":
                return [ZeroExtent(0, self._size, False, False)]
            raise UnsupportedOperation(
                "Server does not support dirty extents")
        response = await self._request(
            "GET", suffix="/extents", query=f"?context={context}")
        if response.code == 404:
            body = await readBody(response, SMALL_BODY_LIMIT)
            text = errorText(body)
            raise UnsupportedOperation(
                f"Server does not support {context} extents: {text}")
        if response.code != 200:
            raise await self._unexpected(response, "GET")
        body = await readBody(response, 1 << 62)
        extents = self._parseExtents(body, context)
        self._extents[context] = extents
        return list(extents)

    def _parseExtents(self, body: bytes, context: str) -> list:
        where = f"{self._netloc}{self._path}/extents"
        try:
            items = json.loads(body.decode("utf-8"))
            if not isinstance(items, list):
                raise ValueError("not a list")
            result = []
            for item in items:
                start, length = item["start"], item["length"]
                if not (isinstance(start, int) and isinstance(length, int)):
                    raise ValueError(f"bad extent {item!r}")
                if context == "zero":
                    result.append(ZeroExtent(start, length,
                                             bool(item.get("zero", False)),
                                             bool(item.get("hole", False))))
                else:
                    result.append(DirtyExtent(start, length,
                                              bool(item.get("dirty", False)),
                                              bool(item.get("zero", False))))
            return result
        except (ValueError, TypeError, KeyError) as e:
            raise BackendError(f"Invalid extents from {where}: {e}") from e

    def close(self) -> defer.Deferred[None]:
        """
        Cancel what is in flight and close the pools' cached connections.
        """
        if self._closed is None:
            for d in list(self._active):
                d.cancel()
            self._active.clear()
            self._closed = defer.gatherResults(
                [p.closeCachedConnections() for p in self._pools],
                consumeErrors=True)
            self._closed.addErrback(
                lambda f: _log.failure("Closing {backend}", f,
                                       backend=self))
            self._closed.addCallback(lambda _: None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    # Streaming.

    def readTo(self, offset: int, length: int, consumer, *,
               operation=None) -> defer.Deferred[int]:
        """
        Copy C{length} bytes at C{offset} to C{consumer} with one upstream
        C{GET}, with backpressure end to end.

        The upstream response must be 206 with exactly C{length} bytes; until
        it is, nothing touches the consumer, so a failure can still be
        answered with a status (the remote's status and text for its
        errors). Then a push producer forwarding to the upstream transport
        is registered with the consumer (streaming): when the consumer
        pauses us, the upstream socket stops being read, so a slow client
        slows the upstream and memory stays bounded. Each body piece is
        written to the consumer as it arrives. On success or failure the
        producer is unregistered, unless the consumer stopped it (then the
        consumer is never touched again).

        @param consumer: an L{IConsumer}, e.g. the L{Request} whose headers
            (status, content-length, content-range) are already set.
        @param operation: optional; C{check()} before each piece (its
            exception aborts the copy), C{progress(n)} after each.
        @return: L{Deferred} firing with C{length}; failing with
            L{HTTPError}, L{BackendError} (upstream failed or closed
            early), L{ProducerStopped} (the consumer stopped us) or the
            operation's error. Cancelling it aborts the upstream request.
        """
        try:
            self._check()
        except Exception:
            return defer.fail()
        if length <= 0:
            return defer.succeed(0)
        d = self._getRange(offset, length)

        def got(response):
            stream = _StreamTo(consumer, length, operation,
                               f"{self._netloc}{self._path}")
            self._active.add(stream.done)
            stream.done.addBoth(self._forget, stream.done)
            response.deliverBody(stream)
            return stream.done

        d.addCallback(got)
        return d

    def _forget(self, result, d):
        self._active.discard(d)
        return result

    def writeFrom(self, offset: int, length: int, *, producer=None,
                  operation=None, flush: bool = False) -> tuple:
        """
        Start one upstream C{PUT} of C{length} bytes at C{offset}, whose body
        the caller feeds as it arrives.

        Contract for the images layer (one call per client PUT with a known
        Content-Length; a chunked body of unknown length goes through
        per-chunk L{write} calls instead, because the reference daemon
        requires a Content-Length):

          - C{stream, done = backend.writeFrom(offset, length,
            producer=request.transport, operation=op, flush=flush)}, or,
            while the backend is still opening,
            C{stream = uploadStream(backendDeferred, offset, length, ...)}.
          - For every piece of the client body: C{stream.write(data)}. It
            never blocks; it pauses C{producer} while the upstream
            connection pushes back (and, before the upstream request has
            started, once L{UPLOAD_HIGH_WATER} bytes are buffered), and
            resumes it when the upstream drains. Call C{write} for every
            piece even after a pause: the producer may be resumed by
            others, and the stream pauses it again.
          - At the end of the body: C{stream.finish()}. If the client
            connection breaks: C{stream.abort(reason)}.
          - C{done} (or C{stream.whenDone()}, any number of times) fires
            with C{length} once the remote answered 200 to the whole body,
            or fails with the remote's L{HTTPError} (same status and text;
            this can happen before the body ended: answer early),
            L{BackendError}, L{LimitExceeded} (more than C{length} bytes),
            L{BadRequest} (C{finish} before C{length} bytes) or the
            operation's error. After a failure further input is dropped and
            C{producer} is resumed, so the caller can drain or close the
            client connection.
          - C{flush=True}: the remote flushes as part of the PUT
            (C{?flush=y}) when it has the C{flush} feature, so the caller
            need not call L{flush} afterwards. Otherwise C{?flush=n} is
            sent (when the remote has the feature).

        The stream is an L{imageio.transfer.UploadSink} (C{write},
        C{finish}, C{abort}, C{whenDone}, C{failed}, C{received},
        C{written}, C{maxPending}, C{backend}), so it can replace one.

        @return: C{(stream, done)}: an L{UploadStream} and a L{Deferred}.
        """
        stream = UploadStream(self, offset, length, producer=producer,
                              operation=operation, flush=flush)
        return stream, stream.whenDone()

    def _startUpload(self, stream: UploadStream) -> None:
        self._extents.pop("zero", None)
        try:
            self._check()
        except Exception:
            stream._fail(Failure())
            return
        offset, length = stream.offset, stream.length
        d = self._request("PUT", query=self._putQuery(stream.flush),
                          headers=self._putHeaders(offset, length),
                          body=stream)
        stream._request = d
        d.addCallbacks(stream._gotResponse, stream._requestFailed,
                       callbackArgs=(self,))
