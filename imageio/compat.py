# -*- test-case-name: test.test_compat -*-
"""
Every private Twisted and pyOpenSSL name the package uses, in one place.

The rest of C{imageio} calls the functions and the channel base class
here and never names a private attribute of Twisted or pyOpenSSL itself
(C{test.test_compat.test_no_private_names_elsewhere} fails when it does).
Each assumption is written against the versions in L{TESTED} (and
C{setup.py}); C{test.test_compat} tries every one on real objects and
names the one that broke, so that an upgrade fails a test with a clear
message instead of corrupting a stream:

  - the HTTP server (C{twisted.web.http}): the request line and the body
    decoder of the request being received, the idle timeout saved while a
    request is handled, the head counters, the network producer, a
    request's client being gone, the site's access log formatter;
  - the TLS layer (C{twisted.protocols.tls}): its pyOpenSSL Connection
    and the state around it, the small-write aggregator, the receive
    loop; pyOpenSSL's C{SSL*} and memory BIOs and its C{cffi} binding;
  - socket transports (C{twisted.internet.abstract}): unsent output;
  - the HTTP client (C{twisted.web._newclient}, C{endpoints}): the
    transport under a response body, the response's parser, the wrapped
    protocol, the transport a request body writes to;
  - the reactor's exit signal.
"""

from __future__ import annotations

from twisted.web import http

try:
    # pyOpenSSL 26.4: the low level binding Connection uses; lets the body
    # threads move bytes between OpenSSL and reused buffers without a new
    # allocation and a copy per call.
    from OpenSSL._util import ffi, lib
except ImportError:  # pragma: no cover - a future pyOpenSSL
    ffi = lib = None

__all__ = [
    "TESTED", "ChannelBase", "requestGone", "requestLine", "bodyDecoder",
    "identityDecoder", "handlingRequest", "savedTimeout", "setSavedTimeout",
    "accessLogLine", "ffi", "lib", "tlsConnection", "flushAggregator",
    "swapConnection", "tlsLost", "flushReceiveBIO", "ssl", "readBIO",
    "writeBIO", "raiseSSLError", "pendingOutput", "clearPendingOutput",
    "unwrapProtocol", "responseTransport", "responseParser",
    "requestTransport", "clearExitSignal", "currentConnection",
    "handshaking"]

TESTED = {"Twisted": "26.10", "pyOpenSSL": "26.4"}
"""
The versions every assumption here was checked against (C{setup.py}
allows their minor releases).
"""


# The HTTP server.

class ChannelBase(http.HTTPChannel):
    """
    C{HTTPChannel} with its private head parsing turned into hooks a
    subclass overrides by public names.
    """

    def requestLineSeen(self) -> bool:
        """
        Whether the request line of the request being received is parsed
        (Twisted sets C{_command} then and deletes it at the request's end).
        """
        return hasattr(self, "_command")

    def headSize(self) -> int:
        """
        Bytes of header lines received so far for this request.
        """
        return self._receivedHeaderSize

    def headerCount(self) -> int:
        """
        Header lines received so far for this request.
        """
        return self._receivedHeaderCount

    def unregisterNetworkProducer(self) -> None:
        """
        What C{HTTPChannel.loseConnection} does before closing: stop being
        the transport's producer.
        """
        self._networkProducer.unregisterProducer()

    def transferHeaderReceived(self, header: bytes, data: bytes) -> bool:
        """
        A C{Content-Length} or C{Transfer-Encoding} header (canonical name,
        stripped value). Override to look first; call up to let Twisted
        choose the body decoder.

        @return: C{False} to refuse the request with a bare 400.
        """
        return super()._maybeChooseTransferDecoder(header, data)

    def badHead(self) -> None:
        """
        The head cannot be parsed: Twisted answers a bare 400 and closes.
        """
        super()._respondToBadRequestAndDisconnect()

    def _maybeChooseTransferDecoder(self, header, data):
        return self.transferHeaderReceived(header, data)

    def _respondToBadRequestAndDisconnect(self):
        self.badHead()


def requestGone(request) -> bool:
    """
    Whether C{request}'s connection was lost (C{finish} would raise).
    """
    return request._disconnected


def requestLine(channel) -> tuple[bytes, bytes, bytes] | None:
    """
    The method, target and version of the request C{channel} is receiving;
    Twisted keeps them on the channel until the body is complete (HTTP/2
    streams have none).
    """
    path = getattr(channel, "_path", None)
    if path is None:
        return None
    return channel._command, path, channel._version


def bodyDecoder(channel):
    """
    The decoder of the body C{channel} is receiving, or C{None}.
    """
    return getattr(channel, "_transferDecoder", None)


def identityDecoder(decoder) -> bool:
    """
    Whether C{decoder} (server or client) decodes a C{Content-Length}
    body: its C{contentLength} counts the bytes still expected, decremented
    before each piece is delivered.
    """
    return type(decoder) is http._IdentityTransferDecoder


def handlingRequest(channel) -> bool:
    """
    Whether C{channel} is between a request's head and its response's end
    (its idle timeout is then saved, and off).
    """
    return channel._handlingRequest


def bufferedInput(channel) -> bool:
    """
    Whether C{channel} holds bytes it received and has not handled: part
    of a line (C{LineReceiver}), or data kept while a request was handled.
    """
    return bool(channel._buffer) or bool(channel._dataBuffer)


def savedTimeout(channel):
    """
    The idle timeout C{channel} restores when the current request is done.
    """
    return getattr(channel, "_savedTimeOut", None)


def setSavedTimeout(channel, seconds) -> None:
    """
    Change the idle timeout C{channel} restores after the current request.
    """
    channel._savedTimeOut = seconds


def accessLogLine(site, request) -> str:
    """
    The line C{site}'s access log formatter makes for C{request}.
    """
    return site._logFormatter(site._logDateTime, request)


# The TLS layer and pyOpenSSL.

def tlsConnection(transport):
    """
    The pyOpenSSL Connection of a TLS transport that a thread may take
    over, or C{None}: still handshaking (writes queued), closing, not the
    Connection Twisted made (a guard in its place), or a pyOpenSSL without
    the bindings the threads use.
    """
    conn = getattr(transport, "_tlsConnection", None)
    if (conn is None or lib is None
            or getattr(transport, "_appSendBuffer", True)
            or not getattr(transport, "_handshakeDone", False)
            or getattr(transport, "_lostTLSConnection", True)
            or not hasattr(transport, "_aggregator")
            or not hasattr(conn, "_from_ssl") or not hasattr(conn, "_ssl")
            or not hasattr(conn, "_into_ssl")):
        return None
    return conn


def handshaking(transport) -> bool:
    """
    Whether C{transport} (a TLS layer) is still handshaking, or has
    writes queued until the handshake is done: a connection that
    L{tlsConnection} refuses now and may accept later.
    """
    return (not getattr(transport, "_lostTLSConnection", True)
            and (not getattr(transport, "_handshakeDone", False)
                 or bool(getattr(transport, "_appSendBuffer", None))))


def currentConnection(transport):
    """
    What stands as C{transport}'s Connection now (perhaps a guard).
    """
    return getattr(transport, "_tlsConnection", None)


def flushAggregator(tls) -> None:
    """
    Send what C{BufferingTLSTransport}'s small-write aggregator holds.
    """
    tls._aggregator.flush()


def swapConnection(tls, conn) -> None:
    """
    Make C{conn} (a Connection, or a stand-in) C{tls}'s Connection.
    """
    tls._tlsConnection = conn


def tlsLost(tls) -> bool:
    """
    Whether C{tls}'s TLS connection is closed or closing.
    """
    return tls._lostTLSConnection


def flushReceiveBIO(tls) -> None:
    """
    Run the TLS layer's receive loop (what its C{dataReceived} does after
    feeding ciphertext in): plaintext left in OpenSSL is delivered.
    """
    tls._flushReceiveBIO()


def ssl(conn):
    """
    C{conn}'s C{SSL*}, for L{lib}.
    """
    return conn._ssl


def readBIO(conn):
    """
    C{conn}'s read (network to OpenSSL) memory BIO.
    """
    return conn._into_ssl


def writeBIO(conn):
    """
    C{conn}'s write (OpenSSL to network) memory BIO.
    """
    return conn._from_ssl


def raiseSSLError(conn, sslPtr, result: int) -> None:
    """
    Raise the C{SSL.Error} that pyOpenSSL raises for C{result}, the
    return value of an C{SSL_*} call on C{sslPtr}.
    """
    conn._raise_ssl_error(sslPtr, result)


# Socket transports.

def pendingOutput(raw) -> bytes | None:
    """
    The bytes Twisted has not sent yet on C{raw} (a socket transport), or
    C{None} if its buffers are not the ones known here: C{dataBuffer}
    from C{offset}, then the C{_tempDataBuffer} list.
    """
    try:
        data = raw.dataBuffer[raw.offset:]
        temp = raw._tempDataBuffer
        raw._tempDataLen
    except AttributeError:
        return None
    return bytes(data) + b"".join(temp)


def clearPendingOutput(raw) -> None:
    """
    Forget C{raw}'s unsent bytes (taken by L{pendingOutput}).
    """
    raw.dataBuffer = b""
    raw.offset = 0
    raw._tempDataBuffer = []
    raw._tempDataLen = 0


# The HTTP client.

def unwrapProtocol(protocol):
    """
    The protocol an endpoint's C{_WrappingProtocol} wraps (C{protocol}
    itself when not wrapped).
    """
    while hasattr(protocol, "_wrappedProtocol"):
        protocol = protocol._wrappedProtocol
    return protocol


def responseTransport(proxy):
    """
    The connection's transport under a response body's
    C{TransportProxyProducer}, or C{None} once cut off.
    """
    return getattr(proxy, "_producer", None)


def responseParser(protocol):
    """
    The response parser of an C{HTTP11ClientProtocol} (its C{bodyDecoder}
    decodes the body being received), or C{None}.
    """
    return getattr(protocol, "_parser", None)


def requestTransport(consumer):
    """
    The connection's transport under the C{LengthEnforcingConsumer} a
    request body producer writes to, or C{None}.
    """
    return getattr(consumer, "_consumer", None)


# The reactor.

def clearExitSignal(reactor, signum: int) -> None:
    """
    Forget that C{reactor} stops because of C{signum}: twistd kills
    itself with the signal the reactor saved once it has stopped.
    """
    if getattr(reactor, "_exitSignal", None) == signum:
        reactor._exitSignal = None
