"""
L{imageio.compat}: each private Twisted or pyOpenSSL name it uses, tried on
real objects of the installed versions (a failure names what changed), and
a scan of the package that fails when a private name is used anywhere else.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import signal
from pathlib import Path

import pytest
import twisted
import OpenSSL
from OpenSSL import SSL
from twisted.internet import abstract, defer, endpoints, protocol
from twisted.internet import ssl as tssl
from twisted.internet.base import ReactorBase
from twisted.internet.testing import (
    MemoryReactorClock, StringTransport, StringTransportWithDisconnection)
from twisted.protocols import tls
from twisted.test import iosim
from twisted.web import _newclient, http, server
from twisted.web.resource import Resource

from imageio import compat
from imageio.compat import ffi, lib
from imageio.tls import TLSFiles, tlsOptions

from test.support import makePKI

PACKAGE = Path(__file__).resolve().parent.parent / "imageio"
VERSIONS = (f"Twisted {twisted.__version__}, "
            f"pyOpenSSL {OpenSSL.__version__}")


def expect(condition, what: str) -> None:
    """
    Fail with a message naming the assumption of L{imageio.compat} that
    the installed Twisted or pyOpenSSL broke.
    """
    assert condition, (f"imageio.compat: {what} no longer holds with "
                       f"{VERSIONS} (checked with {compat.TESTED})")


def test_tested_versions_in_setup():
    setup = (PACKAGE.parent / "setup.py").read_text()
    for name, version in compat.TESTED.items():
        major, minor = version.split(".")
        spec = f">={major}.{minor},<{int(major) + 1}"
        expect(f'"{name.lower()}' in setup.lower() and spec in setup,
               f"setup.py names the tested range of {name} ({spec})")


# ---------------------------------------------------------------------------
# The HTTP server.


class _Channel(compat.ChannelBase):
    def __init__(self):
        super().__init__()
        self.seen = []

    def lineReceived(self, line):
        self.seen.append((line, self.requestLineSeen(), self.headSize(),
                          self.headerCount()))
        super().lineReceived(line)

    def transferHeaderReceived(self, header, data):
        self.seen.append(("transfer", header, data))
        return super().transferHeaderReceived(header, data)

    def badHead(self):
        self.seen.append("bad head")
        super().badHead()


class _Hold(http.Request):
    held: list = []

    def gotLength(self, length):
        _Hold.line = compat.requestLine(self.channel)
        _Hold.decoder = compat.bodyDecoder(self.channel)
        super().gotLength(length)

    def process(self):
        _Hold.held.append(self)


def _channel(reactor=None):
    channel = _Channel()
    if reactor is not None:
        channel.callLater = reactor.callLater
    channel.requestFactory = _Hold
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_channel_head_hooks():
    channel, _ = _channel()
    channel.dataReceived(b"PUT /a?b=c HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 3\r\n\r\n")
    lines = [s for s in channel.seen if isinstance(s[0], bytes)]
    expect(lines[0][1] is False,
           "HTTPChannel._command unset before the request line "
           "(ChannelBase.requestLineSeen)")
    expect(all(line[1] is True for line in lines[1:]),
           "HTTPChannel._command set after the request line")
    expect(("transfer", b"Content-Length", b"3") in channel.seen,
           "HTTPChannel._maybeChooseTransferDecoder(name, value) "
           "(ChannelBase.transferHeaderReceived)")
    sizes = [line[2] for line in lines]
    expect(sizes == sorted(set(sizes)) and sizes[-1] >= 43,
           "HTTPChannel._receivedHeaderSize counts the head "
           "(ChannelBase.headSize)")
    expect(lines[-1][3] >= 1,
           "HTTPChannel._receivedHeaderCount counts header lines "
           "(ChannelBase.headerCount)")


def test_channel_bad_head():
    channel, transport = _channel()
    channel.dataReceived(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    expect("bad head" in channel.seen,
           "HTTPChannel._respondToBadRequestAndDisconnect "
           "(ChannelBase.badHead)")
    expect(transport.value().startswith(b"HTTP/1.1 400"),
           "HTTPChannel._respondToBadRequestAndDisconnect answers 400")


def test_channel_network_producer():
    channel, transport = _channel()
    expect(transport.producer is channel, "the channel is the producer")
    channel.unregisterNetworkProducer()
    expect(transport.producer is None,
           "HTTPChannel._networkProducer (ChannelBase"
           ".unregisterNetworkProducer)")


def test_request_line_and_decoder():
    channel, _ = _channel()
    channel.dataReceived(b"PUT /a?b=c HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
    expect(_Hold.line == (b"PUT", b"/a?b=c", b"HTTP/1.1"),
           "HTTPChannel._command, _path, _version in gotLength "
           "(compat.requestLine)")
    expect(compat.identityDecoder(_Hold.decoder)
           and _Hold.decoder.contentLength == 10,
           "HTTPChannel._transferDecoder, an _IdentityTransferDecoder "
           "(compat.bodyDecoder, identityDecoder)")
    channel.dataReceived(b"abcd")
    expect(compat.bodyDecoder(channel).contentLength == 6,
           "_IdentityTransferDecoder.contentLength counts what is left")
    channel.dataReceived(b"efghij")
    expect(compat.bodyDecoder(channel) is None,
           "HTTPChannel._transferDecoder cleared after the body")
    expect(compat.requestLine(channel) is None,
           "HTTPChannel._path deleted after the body")


def test_identity_decoder_delivery():
    seen = []
    decoder = http._IdentityTransferDecoder(
        10, lambda d: seen.append((bytes(d), decoder.contentLength)),
        lambda rest: seen.append(("end", bytes(rest))))
    decoder.dataReceived(bytearray(b"abcd"))
    decoder.dataReceived(bytearray(b"efghijXY"))
    expect(seen == [(b"abcd", 6), (b"efghij", 0), ("end", b"XY")],
           "_IdentityTransferDecoder.contentLength decremented before "
           "each piece is delivered")


def test_saved_timeout():
    reactor = MemoryReactorClock()
    channel, _ = _channel(reactor)
    channel.timeOut = 60
    _Hold.held = []
    expect(compat.handlingRequest(channel) is False,
           "HTTPChannel._handlingRequest false when idle")
    channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    expect(compat.handlingRequest(channel) is True
           and channel.timeOut is None
           and compat.savedTimeout(channel) == 60,
           "HTTPChannel._savedTimeOut holds the idle timeout while a "
           "request is handled")
    compat.setSavedTimeout(channel, 99)
    _Hold.held[0].finish()
    expect(channel.timeOut == 99,
           "HTTPChannel restores the idle timeout from _savedTimeOut")


def test_buffered_input():
    reactor = MemoryReactorClock()
    channel, _ = _channel(reactor)
    _Hold.held = []
    expect(compat.bufferedInput(channel) is False,
           "HTTPChannel holds no input at first")
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x")
    expect(compat.bufferedInput(channel) is True,
           "LineReceiver._buffer holds a partial line")
    channel.dataReceived(b"\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    expect(len(_Hold.held) == 1 and compat.bufferedInput(channel) is True,
           "HTTPChannel._dataBuffer keeps a request that comes while one "
           "is handled")
    _Hold.held[0].finish()
    expect(len(_Hold.held) == 2 and compat.bufferedInput(channel) is False,
           "HTTPChannel handles kept input when the request is done")
    _Hold.held[1].finish()


def test_request_gone():
    channel, _ = _channel()
    request = http.Request(channel)
    expect(compat.requestGone(request) is False,
           "http.Request._disconnected false at first")
    request.connectionLost(None)
    expect(compat.requestGone(request) is True,
           "http.Request._disconnected set by connectionLost")


def test_access_log_line():
    site = server.Site(Resource())
    channel = http.HTTPChannel()
    channel.site = site
    channel.makeConnection(StringTransport())
    request = server.Request(channel)
    request.method, request.uri, request.clientproto = (
        b"GET", b"/x", b"HTTP/1.1")
    request.code = 200
    line = compat.accessLogLine(site, request)
    expect(isinstance(line, str) and '"GET /x HTTP/1.1" 200' in line,
           "Site._logFormatter(Site._logDateTime, request)")


# ---------------------------------------------------------------------------
# The TLS layer and pyOpenSSL.


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return makePKI(str(tmp_path_factory.mktemp("pki")))


def _tlsPair(pki, greet=True):
    # The daemon's own server options.
    serverOptions = tlsOptions(TLSFiles(key_file=pki.key,
                                        cert_file=pki.cert))
    with open(pki.ca) as f:
        ca = tssl.Certificate.loadPEM(f.read())
    clientOptions = tssl.optionsForClientTLS("localhost", trustRoot=ca)
    received = []

    class Keep(protocol.Protocol):
        def dataReceived(self, data):
            received.append(data)

    serverFactory = tls.TLSMemoryBIOFactory(
        serverOptions, False, protocol.Factory.forProtocol(Keep))
    clientFactory = tls.TLSMemoryBIOFactory(
        clientOptions, True, protocol.Factory.forProtocol(protocol.Protocol))
    server_ = serverFactory.buildProtocol(None)
    client = clientFactory.buildProtocol(None)
    pump = iosim.connect(server_, iosim.makeFakeServer(server_),
                         client, iosim.makeFakeClient(client),
                         greet=greet)
    return server_, client, pump, received


def test_tls_connection(pki):
    server_, client, pump, received = _tlsPair(pki, greet=False)
    expect(isinstance(client, tls.BufferingTLSTransport),
           "TLSMemoryBIOFactory builds a BufferingTLSTransport")
    # Before the handshake: writes wait in the layer, no Connection for
    # a thread yet.
    client.write(b"early")
    compat.flushAggregator(client)
    expect(compat.handshaking(client) and compat.tlsConnection(client)
           is None, "TLSMemoryBIOProtocol._handshakeDone and "
           "_appSendBuffer before the handshake (compat.handshaking)")
    pump.flush()
    expect(not compat.handshaking(client) and not compat.handshaking(
        server_), "TLSMemoryBIOProtocol._handshakeDone and _appSendBuffer "
        "after the handshake (compat.handshaking)")
    expect(b"".join(received) == b"early",
           "writes queued during the handshake are sent after it")
    received.clear()
    for side in (server_, client):
        conn = compat.tlsConnection(side)
        expect(isinstance(conn, SSL.Connection),
               "TLSMemoryBIOProtocol._tlsConnection, _appSendBuffer, "
               "_handshakeDone, _lostTLSConnection, _aggregator after the "
               "handshake (compat.tlsConnection)")
        expect(compat.currentConnection(side) is conn,
               "TLSMemoryBIOProtocol._tlsConnection")
        expect(compat.tlsLost(side) is False,
               "TLSMemoryBIOProtocol._lostTLSConnection")

    # Written through the aggregator, sent once it is flushed.
    client.write(b"hello")
    compat.flushAggregator(client)
    pump.flush()
    expect(b"".join(received) == b"hello",
           "BufferingTLSTransport._aggregator.flush sends small writes")

    # Ciphertext fed to the read BIO behind the layer's back comes out
    # through its receive loop.
    conn = compat.tlsConnection(server_)
    clientConn = compat.tlsConnection(client)
    clientConn.send(b" world")
    cipher = clientConn.bio_read(65536)
    buf = ffi.from_buffer(bytearray(cipher))
    expect(lib.BIO_write(compat.readBIO(conn), buf, len(cipher))
           == len(cipher), "SSL.Connection._into_ssl is the read BIO")
    compat.flushReceiveBIO(server_)
    expect(b"".join(received) == b"hello world",
           "TLSMemoryBIOProtocol._flushReceiveBIO delivers plaintext "
           "(compat.flushReceiveBIO)")

    # The write BIO and the SSL*.
    conn.send(b"x")
    out = ffi.new("char[]", 65536)
    expect(lib.BIO_read(compat.writeBIO(conn), out, 65536) > 0,
           "SSL.Connection._from_ssl is the write BIO")
    expect(lib.SSL_set_mode(compat.ssl(conn), 0)
           & lib.SSL_MODE_ENABLE_PARTIAL_WRITE,
           "SSL.Connection._ssl is the SSL* (partial writes on)")

    # A stand-in for the Connection, and the real one back.
    marker = object()
    compat.swapConnection(server_, marker)
    expect(compat.currentConnection(server_) is marker,
           "TLSMemoryBIOProtocol._tlsConnection can be replaced")
    compat.swapConnection(server_, conn)


def test_raise_ssl_error():
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    conn.set_connect_state()
    sslPtr = compat.ssl(conn)
    one = ffi.new("char[1]")
    n = lib.SSL_read(sslPtr, one, 1)
    with pytest.raises(SSL.Error):
        compat.raiseSSLError(conn, sslPtr, n)


# ---------------------------------------------------------------------------
# Socket transports.


def test_pending_output():
    fd = abstract.FileDescriptor(MemoryReactorClock())
    fd.connected = True
    fd.startWriting = lambda: None
    fd.write(b"abc")
    fd.write(b"def")
    expect(compat.pendingOutput(fd) == b"abcdef",
           "FileDescriptor.dataBuffer, offset, _tempDataBuffer, "
           "_tempDataLen hold unsent output")
    compat.clearPendingOutput(fd)
    expect(compat.pendingOutput(fd) == b"",
           "clearing FileDescriptor's output buffers")


# ---------------------------------------------------------------------------
# The HTTP client.


def test_client_internals():
    marker = object()
    expect(compat.responseTransport(
        _newclient.TransportProxyProducer(marker)) is marker,
        "TransportProxyProducer._producer")
    http11 = _newclient.HTTP11ClientProtocol()
    expect(compat.responseParser(http11) is None
           and hasattr(_newclient.HTTPClientParser, "bodyDecoder"),
           "HTTP11ClientProtocol._parser, HTTPClientParser.bodyDecoder")
    wrapping = endpoints._WrappingProtocol(defer.Deferred(), marker)
    expect(compat.unwrapProtocol(wrapping) is marker,
           "endpoints._WrappingProtocol._wrappedProtocol")

    class Producer:
        length = 10

    consumer = _newclient.LengthEnforcingConsumer(Producer(), marker,
                                                  defer.Deferred())
    expect(compat.requestTransport(consumer) is marker,
           "LengthEnforcingConsumer._consumer")


def test_client_parser_during_body():
    # The parser of a response being received, and its decoder.
    http11 = _newclient.HTTP11ClientProtocol()
    transport = StringTransportWithDisconnection()
    transport.protocol = http11
    http11.makeConnection(transport)
    request = _newclient.Request(
        b"GET", b"/", _newclient.Headers({b"host": [b"x"]}), None)
    got = http11.request(request)
    http11.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    responses = []
    got.addCallback(responses.append)
    parser = compat.responseParser(http11)
    expect(compat.identityDecoder(parser.bodyDecoder)
           and parser.bodyDecoder.contentLength == 10,
           "HTTPClientParser.bodyDecoder, an _IdentityTransferDecoder")
    expect(responses and compat.responseTransport(
        responses[0]._transport) is transport,
        "Response._transport's _producer is the connection's transport")


# ---------------------------------------------------------------------------
# The reactor.


def test_clear_exit_signal():
    expect("_exitSignal" in vars(ReactorBase),
           "ReactorBase._exitSignal")
    reactor = MemoryReactorClock()
    reactor._exitSignal = signal.SIGTERM
    compat.clearExitSignal(reactor, signal.SIGINT)
    assert reactor._exitSignal == signal.SIGTERM
    compat.clearExitSignal(reactor, signal.SIGTERM)
    assert reactor._exitSignal is None
    src = inspect.getsource(ReactorBase.sigTerm)
    expect("_exitSignal" in src, "ReactorBase.sigTerm saves the signal")


# ---------------------------------------------------------------------------
# No private name anywhere else.

_LIBRARIES = ("twisted", "OpenSSL", "treq")


def _privateNames(source: str) -> set[str]:
    """
    The private names a library's module defines: its class members and
    attributes its methods set on self, and its module-level names.
    """
    names = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:     # pragma: no cover
        return names
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = (item.targets if isinstance(item, ast.Assign)
                               else [item.target])
                    names.update(t.id for t in targets
                                 if isinstance(t, ast.Name))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets
                         if isinstance(t, ast.Name))
    return {n for n in names if n.startswith("_")
            and not n.startswith("__")}


def _libraryNames() -> set[str]:
    names = set()
    for lib_ in _LIBRARIES:
        root = Path(importlib.import_module(lib_).__file__).parent
        for path in root.rglob("*.py"):
            if "test" in path.relative_to(root).parts[:-1]:
                continue
            names |= _privateNames(path.read_text(errors="replace"))
    return names


def _ourNames(files) -> set[str]:
    """
    Private names the package defines itself (anywhere but compat).
    """
    names = set()
    for path, tree in files:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute)
                    and isinstance(node.ctx, ast.Store)):
                names.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                   ast.ClassDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Name)
                    and isinstance(node.ctx, ast.Store)):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _libraryBaseNames(obj) -> set[str]:
    """
    Private names the library classes among C{obj}'s bases define.
    """
    names = set()
    for base in getattr(obj, "__mro__", ())[1:]:
        if base.__module__.split(".")[0] not in _LIBRARIES:
            continue
        try:
            names |= _privateNames(inspect.getsource(base))
        except (OSError, TypeError):
            pass
        names |= {n for n in vars(base) if n.startswith("_")
                  and not n.startswith("__")}
    return names


def _libraryModules(tree) -> set[str]:
    """
    Names bound in a module to library modules and classes.
    """
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in _LIBRARIES:
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _LIBRARIES:
                    names.add(a.asname or a.name.split(".")[0])
    return names


def _uses(path, tree, library, ours, namespace):
    """
    Private library names used in one module: attributes of library
    modules and classes, private library modules imported, names only a
    library defines read from any object (also through getattr and
    hasattr), and inherited private attributes used on self.

    @param namespace: the module's globals (its classes).
    """
    bound = _libraryModules(tree)
    found = []

    def report(node, what):
        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                     f"{what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in _LIBRARIES:
            private = [p for p in node.module.split(".")
                       if p.startswith("_")]
            private += [a.name for a in node.names
                        if a.name.startswith("_")]
            if private:
                report(node, f"imports {node.module}: {private}")
        elif isinstance(node, ast.Attribute) and \
                node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in bound:
                report(node, f"{base.id}.{node.attr}")
            elif (node.attr in library and node.attr not in ours
                    and not (isinstance(base, ast.Name)
                             and base.id in ("self", "cls"))):
                report(node, f"._{node.attr.lstrip('_')}")
        elif (isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            name = node.args[1].value
            if name in library and name not in ours:
                report(node, f"{node.func.id}(..., {name!r})")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        # Class attributes of our own that shadow a library's (a Logger
        # named _log) are ours; methods overriding private ones are not.
        shadowed = {t.id for item in cls.body
                    if isinstance(item, ast.Assign)
                    for t in item.targets if isinstance(t, ast.Name)}
        inherited = _libraryBaseNames(namespace.get(cls.name)) - shadowed
        for node in ast.walk(cls):
            if (isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "self"
                    and node.attr in inherited):
                report(node, f"self.{node.attr} (inherited from "
                             f"{'/'.join(_LIBRARIES)})")
            elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name in inherited):
                report(node, f"overrides {node.name}")
    return found


def test_no_private_names_elsewhere():
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py" and path.parent == PACKAGE:
            continue
        files.append((path, ast.parse(path.read_text())))
    library = _libraryNames()
    ours = _ourNames(files)
    found = []
    for path, tree in files:
        module = ".".join(path.relative_to(PACKAGE.parent)
                          .with_suffix("").parts)
        namespace = vars(importlib.import_module(module))
        found += _uses(path, tree, library, ours, namespace)
    assert not found, ("Private Twisted/pyOpenSSL/treq names outside "
                       "imageio/compat.py:\n" + "\n".join(found))


def test_scan_finds_uses():
    # The scan is not blind: a module like ours that used the names
    # compat hides is reported, use by use.
    source = (
        "from twisted.web import http\n"
        "from OpenSSL._util import lib\n"
        "class C(http.HTTPChannel):\n"
        "    def f(self, request, conn):\n"
        "        self._networkProducer.unregisterProducer()\n"
        "        d = http._IdentityTransferDecoder\n"
        "        getattr(self, '_transferDecoder', None)\n"
        "        return request._disconnected, conn._from_ssl\n"
        "    def _respondToBadRequestAndDisconnect(self):\n"
        "        pass\n")
    namespace = {}
    exec(compile(source, "probe", "exec"), namespace)
    found = _uses(PACKAGE / "probe.py", ast.parse(source), _libraryNames(),
                  set(), namespace)
    text = "\n".join(found)
    for what in ("_util", "self._networkProducer", "http._Identity",
                 "'_transferDecoder'", "._disconnected", "._from_ssl",
                 "overrides _respondToBadRequestAndDisconnect"):
        assert what in text, (what, text)


def test_compat_is_the_only_place():
    # And compat itself does use them (the scan above would otherwise be
    # vacuous about moved code).
    tree = ast.parse((PACKAGE / "compat.py").read_text())
    library = _libraryNames()
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr in library}
    for name in ("_transferDecoder", "_tlsConnection", "_from_ssl",
                 "_disconnected", "_exitSignal", "_wrappedProtocol"):
        assert name in used or name in (PACKAGE / "compat.py").read_text()
    assert os.path.basename(compat.__file__) == "compat.py"
