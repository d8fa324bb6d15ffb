# -*- test-case-name: test.test_backend_http -*-
"""
Tests for L{imageio.backends.http}, the proxy backend.

Remote daemons are real servers on the test reactor: small C{twisted.web}
fakes that answer the parts of the images API the backend uses (including
legacy and broken answers), a raw protocol that answers a PUT early and
closes, and, when the images layer is there, a real images Site over TLS.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import address, defer, reactor, ssl, task
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

from imageio import config as configmod
from imageio.backends import IBackend
from imageio.backends import http as httpbackend
from imageio.errors import (
    BackendError, BadRequest, HTTPError, UnsupportedOperation)
from imageio.extents import DirtyExtent, ZeroExtent
from imageio.transfer import LimitExceeded, ProducerStopped
from imageio.units import KiB, MiB

from test.support import makePKI

ALL_FEATURES = ["checksum", "extents", "flush", "zero"]
TICKET = "ticket-0001"
PATH = f"/images/{TICKET}"


# A fake remote daemon.

class _HashingContent:
    """
    Request body storage for large bodies: keeps only their length and
    sha256, so a test can send hundreds of MiB without holding them.
    """

    def __init__(self):
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, data):
        self.size += len(data)
        self.hash.update(data)

    def seek(self, *args):
        return 0

    def tell(self):
        return self.size

    def read(self, *args):
        return b""

    def close(self):
        pass


class _FakeRequest(server.Request):
    # Bodies larger than this are hashed, not stored.
    hashAbove = 16 * MiB

    def gotLength(self, length):
        if length is not None and length > self.hashAbove:
            self.content = _HashingContent()
        else:
            super().gotLength(length)


class FakeRemote(resource.Resource):
    """
    One image behind C{/images/<TICKET>}, answering like an imageio daemon.

    @ivar options: C{"json"}, C{"405"}, C{"204"}, C{"badjson"}, or a
        C{(code, text)} error.
    @ivar errors: C{{method: (code, text)}} answered instead of the data.
    @ivar requests: C{(method, uri, headers, via, body)} of each request;
        C{via} is C{"unix"} or C{"tcp"}.
    """

    isLeaf = True

    def __init__(self, data=b"", *, features=ALL_FEATURES, options="json",
                 maxReaders=4, maxWriters=2, unixSocket=None, extents=None,
                 dirty=None, errors=None):
        super().__init__()
        self.data = bytearray(data)
        self.features = list(features)
        self.options = options
        self.maxReaders = maxReaders
        self.maxWriters = maxWriters
        self.unixSocket = unixSocket
        self.extentsList = extents
        self.dirty = dirty
        self.errors = dict(errors or {})
        self.requests = []
        self.bigPuts = []

    def _error(self, request, code, text):
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=UTF-8")
        return (text + "\n").encode("utf-8")

    def _json(self, request, obj):
        request.setHeader(b"content-type", b"application/json")
        return (json.dumps(obj) + "\n").encode("utf-8")

    def render(self, request):
        method = request.method.decode()
        via = ("unix" if isinstance(request.getHost(), address.UNIXAddress)
               else "tcp")
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        content = request.content
        if isinstance(content, _HashingContent):
            body = None
        else:
            content.seek(0)
            body = content.read()
        self.requests.append((method, request.uri.decode(), headers, via,
                              body))
        path = request.path.decode()
        if path not in (PATH, PATH + "/extents"):
            return self._error(request, 403, "You are not allowed to access "
                               "this resource: No such ticket x")
        if method in self.errors:
            return self._error(request, *self.errors[method])
        if path.endswith("/extents"):
            return self._extents(request)
        return getattr(self, "_" + method)(request, content, body)

    def _OPTIONS(self, request, content, body):
        if self.options == "405":
            return self._error(request, 405, "Method OPTIONS not allowed")
        if self.options == "204":
            request.setResponseCode(204)
            return b""
        if self.options == "badjson":
            request.setHeader(b"content-type", b"application/json")
            return b"{not json"
        if isinstance(self.options, tuple):
            return self._error(request, *self.options)
        request.setHeader(b"allow", b"OPTIONS,GET,PUT,PATCH")
        obj = {"features": self.features}
        if self.maxReaders is not None:
            obj["max_readers"] = self.maxReaders
        if self.maxWriters is not None:
            obj["max_writers"] = self.maxWriters
        if self.unixSocket is not None:
            obj["unix_socket"] = self.unixSocket
        return self._json(request, obj)

    def _extents(self, request):
        context = request.args.get(b"context", [b"zero"])[0].decode()
        if context == "dirty":
            if self.dirty is None:
                return self._error(request, 404, "Ticket does not support "
                                   "dirty extents")
            return self._json(request, [e.toDict() for e in self.dirty])
        extents = self.extentsList
        if extents is None:
            extents = [ZeroExtent(0, len(self.data), False, False)]
        return self._json(request, [e.toDict() for e in extents])

    def _GET(self, request, content, body):
        rng = request.getHeader(b"range")
        request.setHeader(b"content-type", b"application/octet-stream")
        if rng is None:
            request.setHeader(b"content-length", b"%d" % len(self.data))
            return bytes(self.data)
        m = re.fullmatch(rb"bytes=(\d+)-(\d+)", rng)
        first, last = int(m.group(1)), int(m.group(2))
        if last >= len(self.data):
            request.setHeader(b"content-range", b"bytes */%d"
                              % len(self.data))
            return self._error(request, 416, "Requested more bytes than "
                               "available")
        request.setResponseCode(206)
        request.setHeader(b"content-range", b"bytes %d-%d/%d"
                          % (first, last, len(self.data)))
        return bytes(self.data[first:last + 1])

    def _PUT(self, request, content, body):
        m = re.fullmatch(rb"bytes (\d+)-(\d+|\*)/(\d+|\*)",
                         request.getHeader(b"content-range") or b"")
        offset = int(m.group(1)) if m else 0
        if body is None:
            self.bigPuts.append((offset, content.size,
                                 content.hash.hexdigest()))
            return b""
        end = offset + len(body)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = body
        return b""

    def _PATCH(self, request, content, body):
        msg = json.loads(body)
        if msg["op"] == "zero":
            start, size = msg["offset"], msg["size"]
            self.data[start:start + size] = bytes(size)
        return b""


class Servers:
    """
    Listening ports opened by a test, closed at teardown.
    """

    def __init__(self):
        self.ports = []
        self.backends = []

    def site(self, res):
        site = server.Site(res, requestFactory=_FakeRequest)
        site.noisy = False
        return site

    def tcp(self, res, interface="127.0.0.1"):
        port = reactor.listenTCP(0, self.site(res), interface=interface)
        self.ports.append(port)
        return f"http://{interface}:{port.getHost().port}{PATH}"

    def tls(self, res, pki, host="127.0.0.1"):
        with open(pki.cert, "rb") as f:
            cert = f.read()
        with open(pki.key, "rb") as f:
            key = f.read()
        opts = ssl.PrivateCertificate.loadPEM(cert + key).options()
        port = reactor.listenSSL(0, self.site(res), opts,
                                 interface="127.0.0.1")
        self.ports.append(port)
        return f"https://{host}:{port.getHost().port}{PATH}"

    def unix(self, res, name):
        port = reactor.listenUNIX(name, self.site(res))
        self.ports.append(port)
        return name

    def factory(self, factory, interface="127.0.0.1"):
        port = reactor.listenTCP(0, factory, interface=interface)
        self.ports.append(port)
        return f"http://{interface}:{port.getHost().port}{PATH}"

    async def open(self, url, **kw):
        kw.setdefault("mode", "r+")
        backend = await httpbackend.open(reactor, url, **kw)
        self.backends.append(backend)
        return backend

    async def close(self):
        for b in self.backends:
            await b.close()
        for p in self.ports:
            await p.stopListening()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    pytest_twisted.blockon(defer.ensureDeferred(s.close()))


@pytest.fixture
def logged():
    """
    Log events emitted during the test.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _texts(events):
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return {
        "good": makePKI(str(d / "good"), hosts=("localhost", "127.0.0.1")),
        "other": makePKI(str(d / "other"), hosts=("localhost", "127.0.0.1"),
                         caName="another CA"),
        "wrongName": makePKI(str(d / "wrong"), hosts=("other.example",)),
    }


def _config(**sections):
    cfg = configmod.Config()
    for name, options in sections.items():
        cfg = cfg.replace(name, **options)
    return cfg


def _uniqueAbstract():
    return f"\0/org/tximageio/test/http/{os.getpid()}/{time.monotonic_ns()}"


def _data(size):
    block = os.urandom(4096)
    return (block * (size // 4096 + 1))[:size]


# OPTIONS discovery.

@pytest_twisted.ensureDeferred
async def test_open_features(servers):
    remote = FakeRemote(_data(1 * MiB))
    b = await servers.open(servers.tcp(remote))
    assert IBackend.providedBy(b)
    assert b.name == "http"
    assert b.blockSize == 1
    assert b.features == set(ALL_FEATURES)
    assert (b.maxReaders, b.maxWriters) == (4, 2)
    assert b.maxRequest == 8 * MiB
    assert b.size() == 1 * MiB
    assert b.unixSocket is None
    # OPTIONS first, then extents for the size.
    assert [(r[0], r[1]) for r in remote.requests] == [
        ("OPTIONS", PATH), ("GET", PATH + "/extents?context=zero")]


@pytest_twisted.ensureDeferred
async def test_open_buffer_size_from_config(servers):
    remote = FakeRemote(_data(4096))
    cfg = _config(backend_http={"buffer_size": 128 * KiB})
    b = await servers.open(servers.tcp(remote), config=cfg)
    assert b.maxRequest == 128 * KiB


@pytest_twisted.ensureDeferred
async def test_open_missing_max_readers_writers(servers):
    remote = FakeRemote(_data(4096), maxReaders=None, maxWriters=None)
    b = await servers.open(servers.tcp(remote))
    assert (b.maxReaders, b.maxWriters) == (1, 1)


@pytest.mark.parametrize("answer", ["405", "204", "badjson"])
@pytest_twisted.ensureDeferred
async def test_open_legacy_options(servers, answer):
    data = _data(3 * MiB + 17)
    remote = FakeRemote(data, options=answer)
    b = await servers.open(servers.tcp(remote))
    assert b.features == set()
    assert (b.maxReaders, b.maxWriters) == (1, 1)
    # Size from a GET without Range, its connection dropped.
    assert b.size() == len(data)
    assert [(r[0], r[1], "range" in r[2]) for r in remote.requests] == [
        ("OPTIONS", PATH, False), ("GET", PATH, False)]
    # No extents feature: one data extent, no dirty extents.
    assert await b.extents() == [ZeroExtent(0, len(data), False, False)]
    with pytest.raises(UnsupportedOperation):
        await b.extents("dirty")
    # Reads still work after the dropped connection.
    assert await b.read(100, 1000) == data[100:1100]
    # No flush feature: flush is a no-op, PUT has no flush query.
    await b.flush()
    await b.write(0, b"x" * 10)
    assert remote.requests[-1][1] == PATH
    assert not any(r[0] == "PATCH" for r in remote.requests)


@pytest.mark.parametrize("code,text", [
    (403, "You are not allowed to access this resource: No such ticket x"),
    (500, "Server failed to perform the request, check logs"),
    (400, "x" * 600),
])
@pytest_twisted.ensureDeferred
async def test_open_options_error_passthrough(servers, code, text):
    remote = FakeRemote(b"", options=(code, text))
    with pytest.raises(HTTPError) as e:
        await servers.open(servers.tcp(remote))
    assert e.value.code == code
    # Cut at 512 bytes, trailing newline removed.
    assert e.value.message == text[:512]


@pytest_twisted.ensureDeferred
async def test_open_connection_refused(servers):
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol),
                             interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    with pytest.raises(BackendError):
        await servers.open(f"http://127.0.0.1:{number}{PATH}")


# Size discovery.

@pytest_twisted.ensureDeferred
async def test_size_from_last_extent(servers):
    extents = [ZeroExtent(0, 1 * MiB, False, False),
               ZeroExtent(1 * MiB, 5 * MiB, True, False)]
    remote = FakeRemote(_data(6 * MiB), extents=extents)
    b = await servers.open(servers.tcp(remote))
    assert b.size() == 6 * MiB
    # The extents were cached while the size was found.
    assert await b.extents("zero") == extents
    assert sum(r[0] == "GET" for r in remote.requests) == 1


@pytest_twisted.ensureDeferred
async def test_size_from_get_without_extents(servers):
    data = _data(2 * MiB + 1)
    remote = FakeRemote(data, features=["flush", "zero"])
    b = await servers.open(servers.tcp(remote))
    assert b.size() == len(data)
    assert remote.requests[-1][0:2] == ("GET", PATH)


@pytest_twisted.ensureDeferred
async def test_size_empty_image(servers):
    remote = FakeRemote(b"", extents=[])
    b = await servers.open(servers.tcp(remote))
    assert b.size() == 0
    assert await b.read(0, 100) == b""


# Data.

@pytest_twisted.ensureDeferred
async def test_read(servers):
    data = _data(1 * MiB)
    remote = FakeRemote(data)
    b = await servers.open(servers.tcp(remote))
    assert await b.read(4096, 8192) == data[4096:12288]
    method, uri, headers, via, _ = remote.requests[-1]
    assert (method, uri, headers["range"]) == ("GET", PATH,
                                               "bytes=4096-12287")
    # Clipped at the end of the image.
    assert await b.read(1 * MiB - 10, 100) == data[-10:]
    assert await b.read(1 * MiB, 100) == b""


@pytest_twisted.ensureDeferred
async def test_read_concurrent(servers):
    data = _data(4 * MiB)
    remote = FakeRemote(data)
    b = await servers.open(servers.tcp(remote))
    chunks = await defer.gatherResults(
        [b.read(i * MiB, MiB) for i in range(4)])
    assert b"".join(chunks) == data


@pytest_twisted.ensureDeferred
async def test_read_error_passthrough(servers):
    remote = FakeRemote(_data(4096))
    b = await servers.open(servers.tcp(remote))
    remote.errors["GET"] = (403, "You are not allowed to access this "
                            "resource: Transfer=t expired")
    with pytest.raises(HTTPError) as e:
        await b.read(0, 100)
    assert e.value.code == 403
    assert e.value.message == ("You are not allowed to access this "
                               "resource: Transfer=t expired")


@pytest_twisted.ensureDeferred
async def test_read_416_passthrough(servers):
    remote = FakeRemote(_data(4096))
    b = await servers.open(servers.tcp(remote))
    # The remote image shrank after we learned its size.
    del remote.data[2048:]
    with pytest.raises(HTTPError) as e:
        await b.read(0, 4096)
    assert e.value.code == 416
    assert e.value.message == "Requested more bytes than available"


@pytest_twisted.ensureDeferred
async def test_write(servers):
    remote = FakeRemote(bytes(1 * MiB))
    b = await servers.open(servers.tcp(remote))
    payload = _data(300 * KiB)
    await b.write(4096, payload)
    assert bytes(remote.data[4096:4096 + len(payload)]) == payload
    method, uri, headers, via, body = remote.requests[-1]
    assert method == "PUT"
    assert uri == PATH + "?flush=n"
    assert headers["content-range"] == \
        f"bytes 4096-{4096 + len(payload) - 1}/*"
    assert headers["content-length"] == str(len(payload))
    assert headers["content-type"] == "application/octet-stream"
    # Bytes-like objects too.
    await b.write(0, memoryview(b"abc"))
    assert remote.data[:3] == b"abc"


@pytest_twisted.ensureDeferred
async def test_write_error_passthrough(servers):
    remote = FakeRemote(bytes(4096))
    b = await servers.open(servers.tcp(remote))
    remote.errors["PUT"] = (416, "Requested range out of allowed range")
    with pytest.raises(HTTPError) as e:
        await b.write(0, b"x" * 100)
    assert (e.value.code, e.value.message) == (
        416, "Requested range out of allowed range")
    # The connection pool still works after an error.
    del remote.errors["PUT"]
    await b.write(0, b"y" * 100)
    assert remote.data[:100] == b"y" * 100


@pytest_twisted.ensureDeferred
async def test_zero_with_patch(servers):
    remote = FakeRemote(_data(1 * MiB))
    b = await servers.open(servers.tcp(remote))
    await b.zero(4096, 8192)
    assert remote.data[4096:12288] == bytes(8192)
    method, uri, headers, via, body = remote.requests[-1]
    assert method == "PATCH"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"op": "zero", "offset": 4096, "size": 8192,
                                "flush": False}


@pytest_twisted.ensureDeferred
async def test_zero_with_put(servers):
    data = _data(2 * MiB)
    remote = FakeRemote(data, features=["extents", "flush"])
    b = await servers.open(servers.tcp(remote))
    length = 300 * KiB + 5
    await b.zero(1000, length)
    assert remote.data[1000:1000 + length] == bytes(length)
    assert remote.data[:1000] == data[:1000]
    assert remote.data[1000 + length:] == data[1000 + length:]
    method, uri, headers, via, body = remote.requests[-1]
    assert (method, uri) == ("PUT", PATH + "?flush=n")
    assert headers["content-range"] == f"bytes 1000-{1000 + length - 1}/*"
    assert headers["content-length"] == str(length)


@pytest_twisted.ensureDeferred
async def test_flush(servers):
    remote = FakeRemote(_data(4096))
    b = await servers.open(servers.tcp(remote))
    await b.flush()
    method, uri, headers, via, body = remote.requests[-1]
    assert method == "PATCH"
    assert json.loads(body) == {"op": "flush"}
    assert headers["content-type"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_patch_error_passthrough(servers):
    remote = FakeRemote(_data(4096))
    b = await servers.open(servers.tcp(remote))
    remote.errors["PATCH"] = (500, "Server failed to perform the request, "
                              "check logs")
    with pytest.raises(HTTPError) as e:
        await b.flush()
    assert e.value.code == 500
    assert e.value.message == ("Server failed to perform the request, "
                               "check logs")


# Extents.

@pytest_twisted.ensureDeferred
async def test_extents_cached_until_write(servers):
    extents = [ZeroExtent(0, 4096, False, False),
               ZeroExtent(4096, 4096, True, True)]
    remote = FakeRemote(_data(8192), extents=extents)
    b = await servers.open(servers.tcp(remote))
    assert await b.extents() == extents
    assert await b.extents("zero") == extents
    gets = sum(1 for r in remote.requests if "/extents" in r[1])
    assert gets == 1
    # Our own write changes the image: ask again.
    await b.write(4096, b"x")
    await b.extents()
    assert sum(1 for r in remote.requests if "/extents" in r[1]) == 2


@pytest_twisted.ensureDeferred
async def test_extents_dirty(servers):
    dirty = [DirtyExtent(0, 4096, True, False),
             DirtyExtent(4096, 4096, False, True)]
    remote = FakeRemote(_data(8192), dirty=dirty)
    b = await servers.open(servers.tcp(remote))
    assert await b.extents("dirty") == dirty
    assert remote.requests[-1][1] == PATH + "/extents?context=dirty"


@pytest_twisted.ensureDeferred
async def test_extents_dirty_unsupported(servers):
    remote = FakeRemote(_data(8192))
    b = await servers.open(servers.tcp(remote))
    with pytest.raises(UnsupportedOperation) as e:
        await b.extents("dirty")
    assert "Ticket does not support dirty extents" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_extents_error_passthrough(servers):
    remote = FakeRemote(_data(8192))
    b = await servers.open(servers.tcp(remote))
    remote.errors["GET"] = (403, "You are not allowed to access this "
                            "resource: Transfer=t was canceled")
    with pytest.raises(HTTPError) as e:
        await b.extents("dirty")
    assert e.value.code == 403


# Close.

@pytest_twisted.ensureDeferred
async def test_close(servers):
    remote = FakeRemote(_data(8192))
    b = await servers.open(servers.tcp(remote))
    await b.read(0, 10)
    assert b._pool._connections
    await b.close()
    assert not b._pool._connections
    await b.close()
    with pytest.raises(BackendError):
        await b.read(0, 10)


# The unix socket upgrade.

@pytest_twisted.ensureDeferred
async def test_unix_socket_upgrade(servers):
    data = _data(1 * MiB)
    name = _uniqueAbstract()
    remote = FakeRemote(data, unixSocket=name)
    servers.unix(remote, name)
    b = await servers.open(servers.tcp(remote))
    assert b.unixSocket == name
    before = len(remote.requests)
    assert await b.read(0, 4096) == data[:4096]
    await b.write(0, b"abc")
    await b.flush()
    got = bytearray()
    await b.readTo(0, 8192, _Collector(got))
    assert bytes(got) == b"abc" + data[3:8192]
    assert [r[3] for r in remote.requests[:2]] == ["tcp", "unix"]
    assert {r[3] for r in remote.requests[before:]} == {"unix"}


@pytest_twisted.ensureDeferred
async def test_unix_socket_unreachable_stays_tcp(servers, logged):
    data = _data(4096)
    remote = FakeRemote(data, unixSocket=_uniqueAbstract())
    b = await servers.open(servers.tcp(remote))
    assert b.unixSocket is None
    assert await b.read(0, 4096) == data
    assert {r[3] for r in remote.requests} == {"tcp"}
    assert any("Cannot use unix socket" in t for t in _texts(logged))


@pytest_twisted.ensureDeferred
async def test_unix_socket_not_used_for_other_host(servers):
    # Connecting to 127.0.0.2 from 127.0.0.1: not the same address.
    name = _uniqueAbstract()
    remote = FakeRemote(_data(4096), unixSocket=name)
    servers.unix(remote, name)
    try:
        url = servers.tcp(remote, interface="127.0.0.2")
    except Exception:
        pytest.skip("cannot listen on 127.0.0.2")
    b = await servers.open(url)
    if b._endpoints.addresses[0] == "127.0.0.2":
        pytest.skip("the source address is 127.0.0.2 here")
    assert b.unixSocket is None
    await b.read(0, 10)
    assert {r[3] for r in remote.requests} == {"tcp"}


# TLS.

@pytest_twisted.ensureDeferred
async def test_tls_backend_ca_file(servers, pki):
    data = _data(64 * KiB)
    url = servers.tls(FakeRemote(data), pki["good"])
    cfg = _config(backend_http={"ca_file": pki["good"].ca},
                  tls={"ca_file": pki["other"].ca})
    b = await servers.open(url, config=cfg)
    assert await b.read(0, len(data)) == data


@pytest_twisted.ensureDeferred
async def test_tls_falls_back_to_tls_ca_file(servers, pki):
    data = _data(4096)
    url = servers.tls(FakeRemote(data), pki["good"], host="localhost")
    cfg = _config(tls={"ca_file": pki["good"].ca})
    b = await servers.open(url, config=cfg)
    assert await b.read(0, len(data)) == data


@pytest_twisted.ensureDeferred
async def test_tls_other_ca_refused(servers, pki, logged):
    url = servers.tls(FakeRemote(b"x"), pki["good"])
    cfg = _config(backend_http={"ca_file": pki["other"].ca})
    with pytest.raises(httpbackend.UpstreamTLSError) as e:
        await servers.open(url, config=cfg)
    netloc = url.split("/")[2]
    # Not an HTTPError: its text is for the log, the client gets the
    # generic 500 (test_proxy.test_host_certificate_other_ca).
    assert not isinstance(e.value, HTTPError)
    assert netloc in str(e.value)
    assert "certificate" in str(e.value)
    assert any("refused" in t and netloc in t for t in _texts(logged))


@pytest_twisted.ensureDeferred
async def test_tls_platform_trust_refuses_test_ca(servers, pki):
    url = servers.tls(FakeRemote(b"x"), pki["good"])
    with pytest.raises(httpbackend.UpstreamTLSError):
        await servers.open(url, config=_config())


@pytest_twisted.ensureDeferred
async def test_tls_wrong_host_name_refused(servers, pki):
    url = servers.tls(FakeRemote(b"x"), pki["wrongName"])
    cfg = _config(backend_http={"ca_file": pki["wrongName"].ca})
    with pytest.raises(httpbackend.UpstreamTLSError) as e:
        await servers.open(url, config=cfg)
    assert "host name" in str(e.value)
    assert url.split("/")[2] in str(e.value)


@pytest_twisted.ensureDeferred
async def test_tls_to_plain_http_server(servers, pki):
    class Plain(Protocol):
        def dataReceived(self, data):
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\n"
                                 b"content-length: 0\r\n\r\n")
            self.transport.loseConnection()

    url = servers.factory(Factory.forProtocol(Plain)).replace(
        "http:", "https:")
    cfg = _config(backend_http={"ca_file": pki["good"].ca})
    with pytest.raises(httpbackend.UpstreamTLSError) as e:
        await servers.open(url, config=cfg)
    assert str(e.value).startswith(
        f"TLS connection to {url.split('/')[2]} failed")


@pytest_twisted.ensureDeferred
async def test_tls_bad_ca_file(servers, pki, tmp_path):
    url = servers.tls(FakeRemote(b"x"), pki["good"])
    bad = tmp_path / "empty.pem"
    bad.write_text("nothing here\n")
    with pytest.raises(BackendError):
        await servers.open(url, config=_config(
            backend_http={"ca_file": str(bad)}))


# Streaming download.

@implementer(IConsumer)
class _Collector:
    """
    A consumer keeping everything it gets.
    """

    def __init__(self, buf):
        self.buf = buf
        self.producer = None
        self.registrations = 0

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer
        self.registrations += 1

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.buf += data


@implementer(IConsumer)
class _SlowConsumer:
    """
    A consumer draining C{rate} bytes per 10 ms, pausing its producer above
    C{highWater} buffered bytes and resuming it below half of that.
    """

    def __init__(self, rate, highWater=1 * MiB):
        self.rate = rate
        self.highWater = highWater
        self.buffered = 0
        self.maxBuffered = 0
        self.total = 0
        self.pauses = 0
        self.hash = hashlib.sha256()
        self.producer = None
        self.paused = False
        self.loop = task.LoopingCall(self._drain)
        self.loop.start(0.01, now=False)

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.hash.update(data)
        self.total += len(data)
        self.buffered += len(data)
        self.maxBuffered = max(self.maxBuffered, self.buffered)
        if self.buffered > self.highWater and self.producer is not None:
            self.pauses += 1
            self.paused = True
            self.producer.pauseProducing()

    def _drain(self):
        self.buffered = max(0, self.buffered - self.rate)
        if (self.paused and self.buffered < self.highWater // 2
                and self.producer is not None):
            self.paused = False
            self.producer.resumeProducing()

    def stop(self):
        if self.loop.running:
            self.loop.stop()


@pytest_twisted.ensureDeferred
async def test_read_to_slow_consumer_bounded(servers):
    size = 48 * MiB
    data = _data(size)
    remote = FakeRemote(data)
    b = await servers.open(servers.tcp(remote))
    consumer = _SlowConsumer(rate=2 * MiB)
    try:
        n = await b.readTo(0, size, consumer)
    finally:
        consumer.stop()
    assert n == size
    assert consumer.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    assert consumer.producer is None       # unregistered when done
    assert consumer.pauses > 5
    # What the consumer held never grew much past its high water mark:
    # the upstream socket was not read while we were paused.
    assert consumer.maxBuffered < consumer.highWater + 2 * MiB
    # One upstream request for the whole range.
    gets = [r for r in remote.requests if r[0] == "GET" and r[1] == PATH]
    assert [r[2]["range"] for r in gets] == [f"bytes=0-{size - 1}"]
    # The connection went back to the pool and is usable.
    assert await b.read(0, 10) == data[:10]


@pytest_twisted.ensureDeferred
async def test_read_to_progress_and_cancel_by_operation(servers):
    data = _data(8 * MiB)
    remote = FakeRemote(data)
    b = await servers.open(servers.tcp(remote))

    class Op:
        done = 0

        def check(self):
            if self.done >= 2 * MiB:
                raise HTTPError("canceled", code=403)

        def progress(self, n):
            self.done += n

    got = bytearray()
    consumer = _Collector(got)
    with pytest.raises(HTTPError):
        await b.readTo(0, len(data), consumer, operation=Op())
    assert 2 * MiB <= len(got) < len(data)
    assert consumer.producer is None


@pytest_twisted.ensureDeferred
async def test_read_to_consumer_stops(servers):
    data = _data(32 * MiB)
    remote = FakeRemote(data)
    b = await servers.open(servers.tcp(remote))

    @implementer(IConsumer)
    class Stopping(_Collector):
        def write(self, data):
            self.buf += data
            if len(self.buf) > 1 * MiB and self.producer is not None:
                producer, self.producer = self.producer, None
                producer.stopProducing()

    got = bytearray()
    with pytest.raises(ProducerStopped):
        await b.readTo(0, len(data), Stopping(got))
    assert len(got) < len(data)
    assert await b.read(0, 10) == data[:10]


@pytest_twisted.ensureDeferred
async def test_read_to_error_before_body(servers):
    remote = FakeRemote(_data(4096))
    b = await servers.open(servers.tcp(remote))
    remote.errors["GET"] = (403, "You are not allowed to access this "
                            "resource: Transfer=t expired")
    consumer = _Collector(bytearray())
    with pytest.raises(HTTPError) as e:
        await b.readTo(0, 4096, consumer)
    assert e.value.code == 403
    # The consumer was never touched: the caller can still answer.
    assert consumer.registrations == 0 and consumer.buf == b""


@pytest_twisted.ensureDeferred
async def test_read_to_cancel(servers):
    remote = FakeRemote(_data(32 * MiB))
    b = await servers.open(servers.tcp(remote))

    @implementer(IConsumer)
    class Stalled(_Collector):
        def write(self, data):
            self.buf += data
            self.producer.pauseProducing()

    consumer = Stalled(bytearray())
    d = b.readTo(0, 32 * MiB, consumer)
    while not consumer.buf:
        await task.deferLater(reactor, 0.01)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert consumer.producer is None


# Streaming upload.

@implementer(IPushProducer)
class _Generator:
    """
    An incoming stream (like a client socket): pushes C{total} generated
    bytes in C{chunk} pieces into C{sink.write} while not paused, one piece
    per reactor turn at most a few at a time.
    """

    def __init__(self, total, chunk=1 * MiB):
        self.total = total
        self.chunk = chunk
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.hash = hashlib.sha256()
        self.sink = None
        self._base = os.urandom(chunk)
        self._call = None
        self.done = defer.Deferred()

    def start(self, sink):
        self.sink = sink
        self._schedule()

    def _schedule(self):
        if self._call is None and not self.paused and self.sent < self.total:
            self._call = reactor.callLater(0, self._run)

    def _run(self):
        self._call = None
        for _ in range(4):
            if self.paused or self.sent >= self.total:
                break
            n = min(self.chunk, self.total - self.sent)
            piece = struct.pack(">Q", self.sent) + self._base[8:n]
            piece = piece[:n]
            self.hash.update(piece)
            self.sent += n
            self.sink.write(piece)
        if self.sent >= self.total:
            if not self.done.called:
                self.sink.finish()
                self.done.callback(None)
            return
        self._schedule()

    def pauseProducing(self):
        self.pauses += 1
        self.paused = True

    def resumeProducing(self):
        self.resumes += 1
        self.paused = False
        self._schedule()

    def stopProducing(self):
        self.paused = True


@pytest_twisted.ensureDeferred
async def test_write_from_large_stream_one_put(servers):
    size = 256 * MiB
    remote = FakeRemote(b"", extents=[])
    b = await servers.open(servers.tcp(remote))
    gen = _Generator(size)
    start = time.monotonic()
    stream, done = b.writeFrom(4096, size, producer=gen)
    gen.start(stream)
    assert await done == size
    elapsed = time.monotonic() - start
    print(f"writeFrom {size // MiB} MiB over TCP: "
          f"{size / elapsed / 1e6:.0f} MB/s")
    puts = [r for r in remote.requests if r[0] == "PUT"]
    assert len(puts) == 1
    method, uri, headers, via, _ = puts[0]
    assert uri == PATH + "?flush=n"
    assert headers["content-length"] == str(size)
    assert headers["content-range"] == f"bytes 4096-{4096 + size - 1}/*"
    assert remote.bigPuts == [(4096, size, gen.hash.hexdigest())]
    # The upstream connection pushed back and the incoming stream paused.
    assert stream.pauses > 0 and gen.pauses > 0
    assert stream.maxPending <= httpbackend.UPLOAD_HIGH_WATER + gen.chunk
    assert stream.written == stream.received == size


@pytest_twisted.ensureDeferred
async def test_write_from_tls_flush(servers, pki):
    size = 32 * MiB
    remote = FakeRemote(b"", extents=[])
    url = servers.tls(remote, pki["good"])
    cfg = _config(backend_http={"ca_file": pki["good"].ca})
    b = await servers.open(url, config=cfg)
    gen = _Generator(size)
    start = time.monotonic()
    stream, done = b.writeFrom(0, size, producer=gen, flush=True)
    gen.start(stream)
    assert await done == size
    elapsed = time.monotonic() - start
    print(f"writeFrom {size // MiB} MiB over TLS: "
          f"{size / elapsed / 1e6:.0f} MB/s")
    assert [r[1] for r in remote.requests if r[0] == "PUT"] == \
        [PATH + "?flush=y"]
    assert remote.bigPuts == [(0, size, gen.hash.hexdigest())]


@pytest_twisted.ensureDeferred
async def test_write_from_small_exact(servers):
    remote = FakeRemote(bytes(1 * MiB))
    b = await servers.open(servers.tcp(remote))
    payload = _data(100 * KiB)
    stream, done = b.writeFrom(1000, len(payload))
    # Pieces of any size, given before the upstream connection is ready.
    for i in range(0, len(payload), 7000):
        stream.write(payload[i:i + 7000])
    stream.finish()
    assert await done == len(payload)
    assert bytes(remote.data[1000:1000 + len(payload)]) == payload
    assert stream.backend is b


@pytest_twisted.ensureDeferred
async def test_upload_stream_while_opening(servers):
    remote = FakeRemote(bytes(64 * KiB))
    opening = httpbackend.open(reactor, servers.tcp(remote), mode="r+")
    stream = httpbackend.uploadStream(opening, 10, 5)
    stream.write(b"hello")
    stream.finish()
    assert await stream.whenDone() == 5
    servers.backends.append(stream.backend)
    assert remote.data[10:15] == b"hello"


@pytest_twisted.ensureDeferred
async def test_upload_stream_open_fails(servers):
    remote = FakeRemote(b"", options=(403, "No such ticket"))
    opening = httpbackend.open(reactor, servers.tcp(remote), mode="r+")
    gen = _Generator(1 * MiB)
    stream = httpbackend.uploadStream(opening, 0, 1 * MiB, producer=gen)
    gen.start(stream)
    with pytest.raises(HTTPError) as e:
        await stream.whenDone()
    assert e.value.code == 403


@pytest_twisted.ensureDeferred
async def test_write_from_too_much(servers):
    remote = FakeRemote(bytes(4096))
    b = await servers.open(servers.tcp(remote))
    stream, done = b.writeFrom(0, 10)
    stream.write(b"x" * 11)
    with pytest.raises(LimitExceeded):
        await done
    assert remote.data == bytes(4096)


@pytest_twisted.ensureDeferred
async def test_write_from_short_body(servers):
    remote = FakeRemote(bytes(4096))
    b = await servers.open(servers.tcp(remote))
    stream, done = b.writeFrom(0, 10)
    stream.write(b"x" * 5)
    stream.finish()
    with pytest.raises(BadRequest):
        await done


@pytest_twisted.ensureDeferred
async def test_write_from_abort(servers):
    remote = FakeRemote(bytes(4096))
    b = await servers.open(servers.tcp(remote))
    stream, done = b.writeFrom(0, 1000)
    stream.write(b"x" * 10)
    await task.deferLater(reactor, 0.05)
    stream.abort(RuntimeError("client went away"))
    with pytest.raises(RuntimeError):
        await done
    await task.deferLater(reactor, 0.05)
    assert not [r for r in remote.requests if r[0] == "PUT"]
    # The backend still works.
    await b.write(0, b"ok")
    assert remote.data[:2] == b"ok"


@pytest_twisted.ensureDeferred
async def test_write_from_error_passthrough(servers):
    remote = FakeRemote(bytes(4096))
    b = await servers.open(servers.tcp(remote))
    remote.errors["PUT"] = (403, "You are not allowed to access this "
                            "resource: Transfer=t forbids write")
    stream, done = b.writeFrom(0, 100)
    stream.write(b"x" * 100)
    stream.finish()
    with pytest.raises(HTTPError) as e:
        await done
    assert (e.value.code, e.value.message) == (
        403, "You are not allowed to access this resource: Transfer=t "
        "forbids write")


# A remote answering a PUT early and closing the connection.

class _EarlyAnswer(Protocol):
    """
    A minimal HTTP server: answers OPTIONS and extents, and answers a PUT
    with 500 once C{after} body bytes arrived, closing the connection
    without reading the rest.
    """

    after = 256 * KiB

    def connectionMade(self):
        self.buf = b""
        self.body = None

    def dataReceived(self, data):
        if self.body is not None:
            self.body += len(data)
            self._checkBody()
            return
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            line = head.split(b"\r\n")[0]
            method, target = line.split()[:2]
            if method == b"OPTIONS":
                self._send(200, json.dumps(
                    {"features": ALL_FEATURES}).encode())
            elif target.endswith(b"/extents?context=zero"):
                self._send(200, json.dumps([{
                    "start": 0, "length": 1 << 30, "zero": False,
                    "hole": False}]).encode())
            elif method == b"PUT":
                self.body = len(self.buf)
                self.buf = b""
                self._checkBody()
                return

    def _checkBody(self):
        if self.body >= self.after:
            self._send(500, b"Server failed to perform the request, "
                       b"check logs\n", close=True)
            self.transport.loseConnection()
            self.body = -1 << 62

    def _send(self, code, body, close=False):
        self.transport.write(
            b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s"
            % (code, len(body), b"connection: close\r\n" if close else b"",
               body))


@pytest.mark.parametrize("size", [64 * MiB, 4 * MiB])
@pytest_twisted.ensureDeferred
async def test_write_from_early_answer(servers, size):
    url = servers.factory(Factory.forProtocol(_EarlyAnswer))
    b = await servers.open(url)
    gen = _Generator(size)
    stream, done = b.writeFrom(0, size, producer=gen)
    gen.start(stream)
    with pytest.raises(HTTPError) as e:
        await done
    assert e.value.code == 500
    assert e.value.message == ("Server failed to perform the request, "
                               "check logs")
    # The incoming stream is not left paused: its owner must drain it.
    assert not gen.paused or gen.sent == size
    assert stream.failed


@pytest_twisted.ensureDeferred
async def test_write_early_answer(servers):
    url = servers.factory(Factory.forProtocol(_EarlyAnswer))
    b = await servers.open(url)
    with pytest.raises(HTTPError) as e:
        await b.write(0, b"x" * (8 * MiB))
    assert e.value.code == 500


# Against the real images resource.

def _imagesAvailable():
    try:
        from imageio.backends.memory import MemoryBackend  # noqa: F401
        from imageio.tickets import TicketStore  # noqa: F401
        from imageio.web.images import Images  # noqa: F401
        from imageio.web.request import (  # noqa: F401
            ImageioChannel, StreamingRequest)
    except ImportError:
        return False
    return True


needsImages = pytest.mark.skipif(not _imagesAvailable(),
                                 reason="the images layer is not there yet")


class Daemon:
    """
    The images service of a daemon, in process: a ticket store, an images
    Site over TLS on 127.0.0.1 and on a unique abstract unix socket.

    @ivar opened: backends the images resource opened (for the proxy, our
        http backends).
    """

    def __init__(self, servers, pki, threadpool, *, openBackend=None,
                 config=None, local=True):
        from imageio import tickets
        from imageio.backends import open as openAny
        from imageio.web.http import Root, makeSite
        from imageio.web.images import Images
        from imageio.web.request import ImageioChannel, StreamingRequest

        self.socket = _uniqueAbstract()
        cfg = config or configmod.Config()
        cfg = cfg.replace("local", enable=local, socket=self.socket)
        self.config = cfg
        self.store = tickets.TicketStore(tickets.MonotonicClock(reactor))
        self.opened = []
        inner = openBackend or openAny

        def opener(*args, **kw):
            d = defer.maybeDeferred(inner, *args, **kw)
            d.addCallback(lambda b: (self.opened.append(b), b)[1])
            return d

        def site():
            root = Root()
            root.putChild(b"images", Images(self.store, cfg, reactor,
                                            threadpool, openBackend=opener))
            return makeSite(root, reactor=reactor,
                            requestFactory=StreamingRequest,
                            channelFactory=ImageioChannel, timeout=60)

        with open(pki.cert, "rb") as f:
            cert = f.read()
        with open(pki.key, "rb") as f:
            key = f.read()
        opts = ssl.PrivateCertificate.loadPEM(cert + key).options()
        port = reactor.listenSSL(0, site(), opts, interface="127.0.0.1")
        servers.ports.append(port)
        self.port = port.getHost().port
        if local:
            servers.ports.append(reactor.listenUNIX(self.socket, site()))

    def url(self, ticketId=TICKET):
        return f"https://127.0.0.1:{self.port}/images/{ticketId}"

    def addTicket(self, url, size, ops=("write",), ticketId=TICKET):
        return self.store.add({
            "uuid": ticketId, "size": size, "ops": list(ops),
            "timeout": 300, "url": url, "transfer_id": "t-" + ticketId})


@pytest.fixture
def threadpool():
    from twisted.python.threadpool import ThreadPool
    tp = ThreadPool(minthreads=0, maxthreads=4, name="test-backend-http")
    tp.start()
    yield tp
    tp.stop()


def _memoryOpener(image, extents=None):
    from imageio.backends.memory import MemoryBackend

    def opener(reactor, url, *, mode, sparse=False, dirty=False,
               config=None, threadpool=None):
        return MemoryBackend(data=image, extents=extents, mode=mode)
    return opener


@needsImages
@pytest_twisted.ensureDeferred
async def test_real_daemon(servers, pki, threadpool):
    size = 8 * MiB
    image = bytearray(_data(size))
    host = Daemon(servers, pki["good"], threadpool,
                  openBackend=_memoryOpener(image))
    host.addTicket("file:///memory", size)
    cfg = _config(backend_http={"ca_file": pki["good"].ca})
    b = await servers.open(host.url(), config=cfg)
    assert b.features == {"checksum", "extents", "flush", "zero"}
    assert (b.maxReaders, b.maxWriters) == (8, 1)
    # Same host: moved to the daemon's local socket.
    assert b.unixSocket == host.socket
    assert b.size() == size
    assert await b.read(1000, 5000) == image[1000:6000]
    await b.write(4096, b"x" * 10000)
    assert image[4096:14096] == b"x" * 10000
    await b.zero(0, 4096)
    assert image[:4096] == bytes(4096)
    await b.flush()
    assert await b.extents() == [ZeroExtent(0, size, False, False)]
    with pytest.raises(UnsupportedOperation):
        await b.extents("dirty")
    got = bytearray()
    assert await b.readTo(0, size, _Collector(got)) == size
    assert got == image
    payload = _data(3 * MiB)
    stream, done = b.writeFrom(MiB, len(payload))
    stream.write(payload)
    stream.finish()
    assert await done == len(payload)
    assert image[MiB:MiB + len(payload)] == payload
    # Errors of the remote reach us with its status and text.
    consumer = _Collector(bytearray())
    with pytest.raises(HTTPError) as e:
        await b.readTo(size - 10, 100, consumer)
    assert e.value.code == 416
    assert consumer.registrations == 0
    with pytest.raises(HTTPError) as e:
        await b.write(size, b"x")
    assert (e.value.code, e.value.message) == (
        416, "Requested range out of allowed range")


@needsImages
@pytest_twisted.ensureDeferred
async def test_real_daemon_errors(servers, pki, threadpool):
    host = Daemon(servers, pki["good"], threadpool, local=False,
                  openBackend=_memoryOpener(bytearray(4096)))
    cfg = _config(tls={"ca_file": pki["good"].ca})
    with pytest.raises(HTTPError) as e:
        await servers.open(host.url(), config=cfg)
    assert e.value.code == 403
    assert e.value.message.startswith(
        "You are not allowed to access this resource")
    host.addTicket("file:///memory", 4096, ops=["read"])
    b = await servers.open(host.url(), config=cfg)
    assert b.features == {"checksum", "extents"}
    assert b.unixSocket is None
    with pytest.raises(HTTPError) as e:
        await b.write(0, b"x")
    assert e.value.code == 403
    assert "forbids write" in e.value.message


@needsImages
@pytest_twisted.ensureDeferred
async def test_real_proxy_chain(servers, pki, threadpool):
    """
    client -> proxy daemon (http backend) -> host daemon (memory backend),
    both over TLS, all in process.
    """
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import (
        Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool)

    size = 16 * MiB
    image = bytearray(_data(size))
    host = Daemon(servers, pki["good"], threadpool,
                  openBackend=_memoryOpener(image))
    host.addTicket("file:///memory", size)
    proxy = Daemon(servers, pki["good"], threadpool, local=False,
                   config=_config(backend_http={"ca_file": pki["good"].ca}))
    proxy.addTicket(host.url(), size)

    caPEM = open(pki["good"].ca, "rb").read()
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = HTTPClient(Agent(reactor, pool=pool, contextFactory=(
        BrowserLikePolicyForHTTPS(ssl.Certificate.loadPEM(caPEM)))))
    url = proxy.url()
    try:
        r = await client.request("OPTIONS", url)
        options = await r.json()
        assert set(options["features"]) == set(ALL_FEATURES)

        r = await client.get(url, headers={"range": f"bytes=0-{size - 1}"})
        assert r.code == 206
        assert await treq.content(r) == image

        payload = _data(5 * MiB)
        r = await client.put(url + "?flush=n", data=payload, headers={
            "content-range": f"bytes {MiB}-{MiB + len(payload) - 1}/*"})
        assert r.code == 200, await treq.content(r)
        await treq.content(r)
        assert image[MiB:MiB + len(payload)] == payload

        r = await client.patch(url, json={"op": "zero", "offset": 0,
                                          "size": 4096})
        assert r.code == 200
        await treq.content(r)
        assert image[:4096] == bytes(4096)

        r = await client.get(url + "/extents")
        assert await r.json() == [{"start": 0, "length": size,
                                   "zero": False, "hole": False}]

        # A host error passes through the proxy unchanged.
        r = await client.get(url, headers={"range": f"bytes={size}-{size}"})
        assert r.code == 416
        await treq.content(r)
        host.store.get(TICKET).cancel()
        r = await client.get(url, headers={"range": "bytes=0-9"})
        text = await treq.text_content(r)
        assert r.code == 403
        assert text.startswith("You are not allowed to access this "
                               "resource")
    finally:
        await pool.closeCachedConnections()
    # The proxy's upstream connections used the host's local socket.
    assert all(b.unixSocket == host.socket for b in proxy.opened)
