# -*- test-case-name: test.test_backend_http -*-
"""
The http(s) backend: an image served by another imageio daemon.

This is what the daemon uses when it runs as a proxy (on the engine host):
a ticket url C{https://host:54322/images/<id>} makes every request on that
ticket go to the daemon of C{host}, speaking the same images API (SPEC B §3
"http", C §2.2, C §2.3).

Opening a backend:

  1. Builds an L{Agent} with its own L{HTTPConnectionPool}. TLS is verified
     with L{BrowserLikePolicyForHTTPS}: the trust root is
     C{[backend_http] ca_file}, else C{[tls] ca_file}, else the platform's
     store; the host name is always checked (service_identity).
  2. Sends C{OPTIONS <path>} to learn the features (C{extents}, C{zero},
     C{flush}), C{max_readers}/C{max_writers} and C{unix_socket}. Legacy
     answers (405, 204) and a 200 without valid JSON mean "no features";
     any other error status reaches our client with the same status and
     text.
  3. Moves to HTTP over the remote's unix socket when it advertises one and
     the TCP connection is local (our address equals the peer's).
  4. Learns the image size (L{IBackend.size} is synchronous): the end of
     the last zero extent, or, without extents, the content-length of a GET
     without Range whose connection is then dropped.

Besides L{IBackend}, two streaming methods let the images layer relay a
whole client request as one upstream request, with backpressure end to end:
L{HTTPBackend.readTo} (downloads) and L{HTTPBackend.writeFrom} (uploads).
"""

from __future__ import annotations

import builtins
import json
import re
from collections import deque
from urllib.parse import urlsplit

from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS)
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from imageio.logs import Logger
from imageio.backends import IBackend
from imageio.errors import (
    BackendError, BadRequest, HTTPError, UnsupportedOperation)
from imageio.extents import DirtyExtent, ZeroExtent
from imageio.transfer import (
    LimitExceeded, ProducerStopped, fireWaiters, whenResult)
from imageio.units import KiB, MiB

__all__ = ["open", "HTTPBackend", "UploadStream", "uploadStream",
           "UpstreamTLSError", "CONNECT_TIMEOUT", "UPLOAD_HIGH_WATER"]

_log = Logger()

CONNECT_TIMEOUT = 10
"""
Seconds to wait for a TCP or unix connection to the remote daemon.
"""

OPTIONS_TIMEOUT = 60
"""
Seconds the OPTIONS request (connect, TLS handshake, answer) may take.
"""

IDLE_TIMEOUT = 50
"""
Seconds an idle upstream connection is kept for reuse; below the remote
daemon's 60 s idle timeout.
"""

DEFAULT_BUFFER_SIZE = 8 * MiB
DEFAULT_MAX_CONNECTIONS = 8

ERROR_TEXT_LIMIT = 512
"""
Bytes of an upstream error body passed on to our client (as the reference
client does).
"""

_SMALL_BODY_LIMIT = 64 * KiB   # error bodies and other answers we discard
_OPTIONS_LIMIT = 1 * MiB       # an OPTIONS JSON document

ZERO_CHUNK = 128 * KiB
"""
Bytes per write when zeroing with PUT (remote without the C{zero}
feature).
"""

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

_ZEROS = bytes(ZERO_CHUNK)

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----",
    re.DOTALL)


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


async def _open(reactor, url, mode, config) -> HTTPBackend:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BackendError(f"Unsupported url scheme: {url!r}")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as e:
        raise BackendError(f"Invalid url {url!r}: {e}") from e
    if not host:
        raise BackendError(f"Invalid url {url!r}: no host")
    if port is None:
        port = 443 if parts.scheme == "https" else 80

    if config is None:
        bufferSize = DEFAULT_BUFFER_SIZE
        maxConnections = DEFAULT_MAX_CONNECTIONS
        caFile = ""
    else:
        bufferSize = config.backend_http.buffer_size
        maxConnections = config.daemon.max_connections
        caFile = config.backend_http.ca_file or config.tls.ca_file

    creator = None
    if parts.scheme == "https":
        policy = BrowserLikePolicyForHTTPS(trustRoot=_trustRoot(caFile))
        creator = policy.creatorForNetloc(host.encode("idna"), port)

    backend = HTTPBackend(
        reactor, url=url, host=host, port=port, path=parts.path or "/",
        creator=creator, mode=mode, bufferSize=bufferSize,
        maxConnections=maxConnections)
    try:
        await backend._connect()
    except BaseException:
        await backend.close()
        raise
    return backend


def _trustRoot(caFile: str):
    """
    @return: the trust root for verifying the remote daemon: the
        certificates of C{caFile}, or the platform's store.
    """
    if not caFile:
        return ssl.platformTrust()
    try:
        with builtins.open(caFile, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise BackendError(f"Cannot read CA file {caFile!r}: {e}") from e
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise BackendError(f"No certificate in CA file {caFile!r}")
    try:
        certs = [ssl.Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise BackendError(f"Invalid CA file {caFile!r}: {e}") from e
    return ssl.trustRootFromCertificates(certs)


# Connections.

@implementer(IStreamClientEndpoint)
class _Recording:
    """
    An endpoint that remembers the local and peer addresses of the last
    connection it made, so the backend can tell whether the remote daemon
    runs on this host.
    """

    def __init__(self, endpoint, owner: _Endpoints):
        self._endpoint = endpoint
        self._owner = owner

    def connect(self, factory):
        d = self._endpoint.connect(factory)
        d.addCallback(self._connected)
        return d

    def _connected(self, protocol):
        transport = protocol.transport
        try:
            self._owner.addresses = (transport.getHost().host,
                                     transport.getPeer().host)
        except AttributeError:
            pass
        return protocol


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Endpoints of one remote daemon: TCP (with TLS for https) or a unix
    socket. The URI the agent asks for is ignored; every request of a
    backend goes to the same place.

    @ivar addresses: C{(local host, peer host)} of the last TCP connection.
    """

    addresses: tuple | None = None

    def __init__(self, reactor, *, host=None, port=None, creator=None,
                 unixPath=None):
        self._reactor = reactor
        self._host = host
        self._port = port
        self._creator = creator
        self._unixPath = unixPath

    def endpointForURI(self, uri):
        if self._unixPath is not None:
            return UNIXClientEndpoint(self._reactor, self._unixPath,
                                      timeout=CONNECT_TIMEOUT)
        endpoint = _Recording(
            HostnameEndpoint(self._reactor, self._host, self._port,
                             timeout=CONNECT_TIMEOUT), self)
        if self._creator is not None:
            endpoint = wrapClientTLS(self._creator, endpoint)
        return endpoint


def _makeClient(reactor, endpoints: _Endpoints, maxConnections: int):
    pool = HTTPConnectionPool(reactor, persistent=True)
    # Close idle connections before the remote's 60 s idle timeout does, so
    # a request never races the remote closing its end.
    pool.cachedConnectionTimeout = IDLE_TIMEOUT
    # Downloads keep several reads in flight and extents may run beside
    # them: keep enough connections for all of them.
    pool.maxPersistentPerHost = max(2, maxConnections + 2)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return HTTPClient(agent), pool


# Failures.

def _find(failure: Failure, *types):
    """
    @return: the first exception of one of C{types} in C{failure} or in the
        failures it wraps (as L{ResponseNeverReceived} and friends do), or
        C{None}.
    """
    seen = [failure]
    while seen:
        f = seen.pop()
        if isinstance(f.value, types):
            return f.value
        for inner in getattr(f.value, "reasons", None) or ():
            if isinstance(inner, Failure):
                seen.append(inner)
    return None


class UpstreamTLSError(BackendError):
    """
    The TLS connection to the remote failed (its certificate refused, or
    the handshake). The text names the remote's host and port: it goes to
    the log only, and the client gets the generic 500.
    """


def _tlsFailure(failure: Failure):
    """
    @return: C{(certificate, reason)} for a TLS failure: whether the peer's
        certificate was refused, and a short text; or C{None} if
        C{failure} is no TLS failure.
    """
    exc = _find(failure, VerificationError, SSL.Error)
    if exc is None:
        return None
    if isinstance(exc, VerificationError):
        return True, "certificate does not match the host name"
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) \
        else []
    texts = [str(e[-1]) for e in errors if e]
    reason = ", ".join(texts) or "TLS handshake failed"
    return "certificate" in reason, reason


def _httpError(code: int, body: bytes) -> HTTPError:
    """
    The remote's error as our own, for our client: same status, same text
    (cut to 512 bytes, trailing newline removed).
    """
    text = body[:ERROR_TEXT_LIMIT].decode("utf-8", "replace").rstrip()
    return HTTPError(text, code=code)


class _Collect(Protocol):
    """
    Collect a response body of at most C{limit} bytes. A longer body is
    cut there and its connection dropped.
    """

    def __init__(self, limit: int, done: defer.Deferred):
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0
        self._cut = False

    def dataReceived(self, data):
        if self._cut:
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self._cut = True
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if self._cut or reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts)[:self._limit])
        else:
            self._done.errback(reason)


def _readBody(response, limit: int) -> defer.Deferred[bytes]:
    d: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_Collect(limit, d))
    return d


class _Drop(Protocol):
    """
    Drop a response body: close its connection without reading it.
    """

    def connectionMade(self):
        self.transport.stopProducing()

    def connectionLost(self, reason):
        pass


@implementer(IBodyProducer)
class _BytesBody:
    """
    A request body already in memory, written in one piece.
    """

    def __init__(self, data):
        self._data = data if isinstance(data, bytes) else bytes(data)
        self.length = len(self._data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        self._data = b""
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IBodyProducer)
class _ZeroBody:
    """
    C{length} zero bytes, written in chunks of L{ZERO_CHUNK} bytes as fast
    as the connection takes them.
    """

    def __init__(self, length: int):
        self.length = length
        self._remaining = length
        self._consumer = None
        self._paused = False
        self._stopped = False
        self._running = False
        self._done: defer.Deferred | None = None

    def startProducing(self, consumer):
        self._consumer = consumer
        # _run may finish (and forget _done) before returning.
        done = self._done = defer.Deferred(lambda d: self.stopProducing())
        self._run()
        return done

    def _run(self):
        if self._running:
            return
        self._running = True
        try:
            while not (self._paused or self._stopped) and self._remaining:
                n = min(ZERO_CHUNK, self._remaining)
                self._remaining -= n
                # May call pauseProducing synchronously.
                self._consumer.write(_ZEROS if n == ZERO_CHUNK
                                     else _ZEROS[:n])
        finally:
            self._running = False
        if not self._remaining and not self._stopped and self._done:
            done, self._done = self._done, None
            done.callback(None)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        if self._consumer is not None:
            self._run()

    def stopProducing(self):
        self._stopped = True


# The backend.

@implementer(IBackend)
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
    blockSize = 1

    def __init__(self, reactor, *, url: str, host: str, port: int,
                 path: str, creator=None, mode: str = "r+",
                 bufferSize: int = DEFAULT_BUFFER_SIZE,
                 maxConnections: int = DEFAULT_MAX_CONNECTIONS):
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
        self._endpoints = _Endpoints(reactor, host=host, port=port,
                                     creator=creator)
        self._client, self._pool = _makeClient(reactor, self._endpoints,
                                               maxConnections)
        self._pools = [self._pool]
        self._size: int | None = None
        self._extents: dict[str, list] = {}
        self._active: set = set()
        self._closed: defer.Deferred | None = None

    def __repr__(self):
        via = f" via {self.unixSocket!r}" if self.unixSocket else ""
        return f"<HTTPBackend {self._base}{self._path}{via}>"

    # Opening.

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
            await _readBody(response, _SMALL_BODY_LIMIT)
            return {}
        if code != 200:
            raise await self._unexpected(response, "OPTIONS")
        body = await _readBody(response, _OPTIONS_LIMIT)
        try:
            options = json.loads(body.decode("utf-8"))
        except ValueError:
            return {}
        return options if isinstance(options, dict) else {}

    async def _useUnixSocket(self, path: str) -> None:
        endpoints = _Endpoints(self._reactor, unixPath=path)
        client, pool = _makeClient(self._reactor, endpoints,
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
        response.deliverBody(_Drop())
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
        tls = _tlsFailure(failure)
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
        if _find(failure, defer.CancelledError) is not None:
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
                body = await _readBody(response, _SMALL_BODY_LIMIT)
            except Exception:
                body = b""
            error = _httpError(response.code, body)
            # Which request got the answer, for the client's message.
            error.method = method
            return error
        response.deliverBody(_Drop())
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
        return _readBody(response, _SMALL_BODY_LIMIT).addCallback(
            lambda _: None)

    def _patch(self, message: dict) -> defer.Deferred[None]:
        body = _BytesBody(json.dumps(message).encode("utf-8"))
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
        d.addCallback(_readBody, length)
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
                response.deliverBody(_Drop())
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
                          body=_BytesBody(data))
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
                          body=_ZeroBody(length))
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
            body = await _readBody(response, _SMALL_BODY_LIMIT)
            text = body[:ERROR_TEXT_LIMIT].decode("utf-8", "replace").rstrip()
            raise UnsupportedOperation(
                f"Server does not support {context} extents: {text}")
        if response.code != 200:
            raise await self._unexpected(response, "GET")
        body = await _readBody(response, 1 << 62)
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

        The stream has the interface of L{imageio.transfer.UploadSink}
        (C{write}, C{finish}, C{abort}, C{whenDone}, C{failed}, C{received},
        C{written}, C{maxPending}, C{backend}), so it can replace one.

        @return: C{(stream, done)}: an L{UploadStream} and a L{Deferred}.
        """
        stream = UploadStream(offset, length, producer=producer,
                              operation=operation, flush=flush)
        stream._attach(self)
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
    stream = UploadStream(offset, length, producer=producer,
                          operation=operation, flush=flush)
    if isinstance(backend, defer.Deferred):
        backend.addCallbacks(stream._attach, stream._openFailed)
    else:
        stream._attach(backend)
    return stream


@implementer(IPushProducer)
class _StreamTo(Protocol):
    """
    Deliver an upstream response body to a consumer, forwarding the
    consumer's pause and resume to the upstream transport (see
    L{HTTPBackend.readTo}).

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
        if self._finished:
            self.transport.stopProducing()
            return
        self._consumer.registerProducer(self, True)
        self._registered = True

    # IPushProducer, called by the consumer.

    def pauseProducing(self):
        self.pauses += 1
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self):
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self):
        self._registered = False
        self._consumerGone = True
        if self.transport is not None:
            self.transport.stopProducing()

    # The response body.

    def dataReceived(self, data):
        if self._finished:
            return
        n = len(data)
        if self.received + n > self._length:
            self._abort(BackendError(f"GET {self._where}: the remote sent "
                                     f"more than {self._length} bytes"))
            return
        if self._operation is not None:
            try:
                self._operation.check()
            except Exception:
                self._abort(Failure())
                return
        self.received += n
        self._pending.append(data)
        self._pendingSize += n
        if (self._pendingSize >= STREAM_WRITE_SIZE
                or self.received == self._length):
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
class UploadStream:
    """
    The body of one upstream C{PUT}, fed by the caller (see
    L{HTTPBackend.writeFrom} for the contract).

    It is the upstream request's L{IBodyProducer}: the upstream connection
    calls L{pauseProducing}/L{resumeProducing}, which are forwarded to the
    producer of the incoming bytes (the client's socket).

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

    _log = Logger()

    def __init__(self, offset: int, length: int, *, producer=None,
                 operation=None, flush: bool = False):
        self.offset = offset
        self.length = length
        self.flush = flush
        self.backend = None
        self.received = 0
        self.written = 0
        self.maxPending = 0
        self.pauses = 0
        self._producer = producer
        self._operation = operation
        self._consumer = None
        self._pending: deque = deque()
        self._buffered = 0
        self._gathered: list[bytes] = []
        self._gatheredSize = 0
        self._upstreamPaused = False
        self._upstreamGone = False
        self._ended = False
        self._bodyDone: defer.Deferred | None = None
        self._request: defer.Deferred | None = None
        self._failure: Failure | None = None
        self._result = None
        self._waiters: list[defer.Deferred] = []
        if length <= 0:
            self._result = 0

    def _attach(self, backend) -> None:
        if self.backend is not None:
            raise RuntimeError("The stream is attached already")
        self.backend = backend
        if self._failure is not None or self._result is not None:
            return
        backend._startUpload(self)

    def _openFailed(self, failure: Failure) -> None:
        self._fail(failure)

    # The caller's side.

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        Set the producer of the incoming bytes (must be streaming).
        """
        if not streaming:
            raise ValueError("UploadStream needs a streaming producer")
        self._producer = producer
        if self._upstreamPaused or self._buffered >= UPLOAD_HIGH_WATER:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data) -> None:
        """
        Take the next piece of the body. Never blocks; may pause the
        producer.
        """
        if self._failure is not None or self._result is not None:
            return
        n = len(data)
        if not n:
            return
        if self.received + n > self.length:
            self.received += n
            self._fail(Failure(LimitExceeded(self.length)))
            return
        if self._operation is not None:
            try:
                self._operation.check()
            except Exception:
                self._fail(Failure())
                return
        self.received += n
        if self._consumer is None or self._pending:
            self._pending.append(data)
            self._buffered += n
            self.maxPending = max(self.maxPending, self._buffered)
            if self._buffered >= UPLOAD_HIGH_WATER:
                self._pauseProducer()
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

    def abort(self, reason=None) -> None:
        """
        The incoming stream broke: abort the upstream request and fail.
        """
        if self._failure is not None or self._result is not None:
            return
        if reason is None:
            reason = Failure(ProducerStopped("The upload stream was aborted"))
        elif not isinstance(reason, Failure):
            reason = Failure(reason)
        self._producer = None
        self._fail(reason)

    def whenDone(self) -> defer.Deferred[int]:
        """
        @return: a new L{Deferred} firing with C{length} once the remote
            accepted the whole body, or failing with the first error.
        """
        return whenResult(self._result, self._waiters)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    # IBodyProducer: the upstream connection's side.

    def startProducing(self, consumer) -> defer.Deferred[None]:
        self._consumer = consumer
        self._bodyDone = defer.Deferred(lambda d: self.stopProducing())
        done = self._bodyDone
        while self._pending and self._failure is None:
            data = self._pending.popleft()
            self._buffered -= len(data)
            self._send(data)
        if (self._failure is None and not self._upstreamPaused
                and self._buffered < UPLOAD_HIGH_WATER
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
            d = _readBody(response, _SMALL_BODY_LIMIT)
            d.addCallbacks(lambda _: self._succeed(), self._fail)
            return
        if response.code == 200:
            response.deliverBody(_Drop())
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
        if self._failure is not None or self._result is not None:
            return
        self._failure = failure
        self._pending.clear()
        self._buffered = 0
        self._gathered = []
        self._gatheredSize = 0
        request, self._request = self._request, None
        if request is not None and not request.called:
            # Stop sending upstream; the remote sees a truncated body.
            request.cancel()
        self._result = failure
        if self._producer is not None:
            # Let the caller drain or close the client connection.
            self._producer.resumeProducing()
        self._notify()

    def _notify(self) -> None:
        fireWaiters(self._waiters, self._result)
