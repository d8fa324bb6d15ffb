# -*- test-case-name: test.test_backend_http -*-
"""
The upstream side of the http backend: how we reach and trust the remote
daemon, what its failures mean for us, and the small request and response
bodies every request uses.

  - Trust: L{trustRoot} (the CA file of C{[backend_http]} or C{[tls]}, or
    the platform's store); the host name is always checked.
  - Connections: L{Endpoints} (TCP, TLS for https, or the remote's unix
    socket) and L{makeClient} (a treq client on a persistent pool of its
    own).
  - Failures: L{UpstreamTLSError}, L{tlsFailure}, L{httpError},
    L{findError}.
  - Bodies: L{readBody} (bounded), L{DropBody}, L{BytesBody}, L{ZeroBody}.
"""

from __future__ import annotations

import builtins
import re

from OpenSSL import SSL
from service_identity import VerificationError
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent, HTTPConnectionPool, ResponseDone)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from imageio.errors import BackendError, HTTPError
from imageio.units import KiB, MiB

__all__ = ["trustRoot", "Endpoints", "makeClient", "UpstreamTLSError",
           "tlsFailure", "errorText", "httpError", "findError", "readBody",
           "DropBody", "BytesBody", "ZeroBody", "CONNECT_TIMEOUT",
           "IDLE_TIMEOUT",
           "ERROR_TEXT_LIMIT", "SMALL_BODY_LIMIT", "OPTIONS_LIMIT",
           "ZERO_CHUNK"]

CONNECT_TIMEOUT = 10
"""
Seconds to wait for a TCP or unix connection to the remote daemon.
"""

IDLE_TIMEOUT = 50
"""
Seconds an idle upstream connection is kept for reuse; below the remote
daemon's 60 s idle timeout.
"""

ERROR_TEXT_LIMIT = 512
"""
Bytes of an upstream error body passed on to our client (as the reference
client does).
"""

SMALL_BODY_LIMIT = 64 * KiB   # error bodies and other answers we discard
OPTIONS_LIMIT = 1 * MiB       # an OPTIONS JSON document

ZERO_CHUNK = 128 * KiB
"""
Bytes per write when zeroing with PUT (remote without the C{zero}
feature).
"""

_ZEROS = bytes(ZERO_CHUNK)

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----",
    re.DOTALL)


# Trust.

def trustRoot(caFile: str):
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

    def __init__(self, endpoint, owner: Endpoints):
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
class Endpoints:
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


def makeClient(reactor, endpoints: Endpoints, maxConnections: int):
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

def findError(failure: Failure, *types):
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


def tlsFailure(failure: Failure):
    """
    @return: C{(certificate, reason)} for a TLS failure: whether the peer's
        certificate was refused, and a short text; or C{None} if
        C{failure} is no TLS failure.
    """
    exc = findError(failure, VerificationError, SSL.Error)
    if exc is None:
        return None
    if isinstance(exc, VerificationError):
        return True, "certificate does not match the host name"
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) \
        else []
    texts = [str(e[-1]) for e in errors if e]
    reason = ", ".join(texts) or "TLS handshake failed"
    return "certificate" in reason, reason


def errorText(body: bytes) -> str:
    """
    @return: the text of an upstream error body: cut to
        L{ERROR_TEXT_LIMIT} bytes, trailing newline removed.
    """
    return body[:ERROR_TEXT_LIMIT].decode("utf-8", "replace").rstrip()


def httpError(code: int, body: bytes) -> HTTPError:
    """
    The remote's error as our own, for our client: same status, same text
    (L{errorText}).
    """
    return HTTPError(errorText(body), code=code)


# Bodies.

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


def readBody(response, limit: int) -> defer.Deferred[bytes]:
    """
    @return: L{Deferred} firing with the first C{limit} bytes of the body
        of C{response} (see L{_Collect}).
    """
    d: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_Collect(limit, d))
    return d


class DropBody(Protocol):
    """
    Drop a response body: close its connection without reading it.
    """

    def connectionMade(self):
        self.transport.stopProducing()

    def connectionLost(self, reason):
        pass


@implementer(IBodyProducer)
class BytesBody:
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
class ZeroBody:
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
