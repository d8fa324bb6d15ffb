"""
The /images API (imageio.web.images) over real sockets: a Site with our
channel and request classes on TCP (and a unix socket), a real TicketStore,
memory and file backends, and a small raw HTTP client, so that status,
headers, bodies and connection closing are checked byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource as _resource
import shutil
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import (
    TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol)
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.threadpool import ThreadPool

from imageio import backends, blkhash, operations
from imageio.backends.memory import MemoryBackend
from imageio.config import Config
from imageio.extents import DirtyExtent, ZeroExtent
from imageio.tickets import TicketStore
from imageio.units import KiB, MiB, GiB
from imageio.web.http import Root, makeSite
from imageio.web import images
from imageio.web.images import Images
from imageio.web.request import ImageioChannel, StreamingRequest

CURL = shutil.which("curl")

# Ticket urls the test server serves from memory backends (tickets accept
# only the reference's schemes).
MEMORY = "file:///memory-backend/"


# ---------------------------------------------------------------------------
# Helpers (also used by test_images_ref.py)


class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:200]!r}>"


class RawClient(protocol.Protocol):
    """
    A keep-alive HTTP/1.1 client that shows everything: one request at a
    time, bodies read by content-length, lower-case header names (a list
    of values for repeated ones is not needed here).
    """

    def __init__(self):
        self._buf = bytearray()
        self._waiting = None
        self._head = None
        self.closed = defer.Deferred()
        self.isClosed = False
        self.responseStarted = None
        self.received = 0
        self.interim = []
        self._sink = None

    def connectionLost(self, reason):
        self.isClosed = True
        self.closed.callback(None)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(reason)

    def dataReceived(self, data):
        self._buf += data
        self.received += len(data)
        self._parse()

    def _parse(self):
        while self._waiting is not None:
            if self._head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
                del self._buf[:end + 4]
                version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
                headers = {}
                for line in lines[1:]:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                if status == "100":
                    self.interim.append(status)
                    continue
                self._head = (int(status), reason, headers)
                if self.responseStarted is not None:
                    d, self.responseStarted = self.responseStarted, None
                    d.callback(self._head)
            status, reason, headers = self._head
            if self._method == "HEAD":
                length = 0
            else:
                length = int(headers.get("content-length", 0))
            if self._sink is not None:
                take = min(len(self._buf), length - self._sinkGot)
                if take:
                    self._sink(bytes(self._buf[:take]))
                    del self._buf[:take]
                    self._sinkGot += take
                if self._sinkGot < length:
                    return
                body = b""
            else:
                if len(self._buf) < length:
                    return
                body = bytes(self._buf[:length])
                del self._buf[:length]
            self._head = None
            d, self._waiting = self._waiting, None
            d.callback(Response(status, reason, headers, body))

    def request(self, method, path, headers=None, body=b"", sink=None,
                send=True):
        headers = dict(headers or {})
        headers.setdefault("Host", "localhost")
        if body and "Content-Length" not in headers and \
                "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self._method = method
        self._sink = sink
        self._sinkGot = 0
        self._waiting = defer.Deferred()
        d = self._waiting
        self.transport.write(head.encode("latin-1"))
        if body and send:
            self.transport.write(body)
        return d


async def connect(address):
    """
    @param address: C{("tcp", port)} or C{("unix", path)}.
    """
    if address[0] == "tcp":
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", address[1])
    else:
        ep = UNIXClientEndpoint(reactor, address[1])
    return await connectProtocol(ep, RawClient())


async def request(address, method, path, headers=None, body=b""):
    client = await connect(address)
    try:
        return await client.request(method, path, headers, body)
    finally:
        client.transport.loseConnection()


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class Server:
    """
    An images site in this process. Tickets with url C{MEMORY + NAME} use a
    memory backend over C{self.images[NAME]} (a shared bytearray); other
    urls go to the real backends.
    """

    def __init__(self, tmp_path, config=None, localSocket=None):
        self.config = config or Config().replace("local", enable=False)
        self.store = TicketStore(reactor)
        self.pool = ThreadPool(2, 8, name="test-images")
        self.pool.start()
        self.images = {}
        self.extents = {}
        self.dirty = {}
        self.opened = []
        self.holds = {}
        root = Root()
        self.resource = Images(self.store, self.config, reactor, self.pool,
                               openBackend=self.openBackend,
                               localSocket=localSocket)
        root.putChild(b"images", self.resource)
        self.site = makeSite(root, reactor=reactor,
                             requestFactory=StreamingRequest,
                             channelFactory=ImageioChannel)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.address = ("tcp", self.port.getHost().port)
        self.url = f"http://127.0.0.1:{self.address[1]}"
        self.unixPath = str(tmp_path / "images.sock")
        self.unixPort = reactor.listenUNIX(self.unixPath, self.site)
        self.unixAddress = ("unix", self.unixPath)

    def openBackend(self, reactor_, url, *, mode, sparse=False, dirty=False,
                    config=None, threadpool=None):
        if url.startswith(MEMORY):
            name = url[len(MEMORY):]
            b = MemoryBackend(data=self.images[name], mode=mode,
                              extents=self.extents.get(name),
                              dirty=self.dirty.get(name) if dirty else None,
                              maxRequest=1 * MiB)
            for op in self.holds.get(name, ()):
                b.hold(op)
            self.opened.append(b)
            return defer.succeed(b)
        return backends.open(reactor_, url, mode=mode, sparse=sparse,
                             dirty=dirty, config=config,
                             threadpool=threadpool)

    def addTicket(self, uuid="t1", size=None, ops=("read", "write"),
                  data=None, url=None, **kw):
        if url is None:
            self.images[uuid] = bytearray(data if data is not None
                                          else bytes(size or 0))
            url = MEMORY + uuid
        if size is None:
            size = len(self.images[uuid])
        d = {"uuid": uuid, "size": size, "ops": list(ops), "timeout": 300,
             "url": url}
        d.update(kw)
        return self.store.add(d)

    async def close(self):
        await self.port.stopListening()
        await self.unixPort.stopListening()
        self.pool.stop()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    pytest_twisted.blockon(defer.ensureDeferred(srv.close()))


def pattern(size, seed=0):
    """
    Deterministic non-repeating-looking bytes.
    """
    out = bytearray()
    i = seed
    while len(out) < size:
        out += hashlib.sha256(b"%d" % i).digest()
        i += 1
    return bytes(out[:size])


# ---------------------------------------------------------------------------
# GET


@pytest_twisted.ensureDeferred
async def test_get_full(server):
    data = pattern(1 * MiB + 17)
    server.addTicket(data=data, filename="disk.raw", ops=["read"])
    r = await request(server.address, "GET", "/images/t1")
    assert r.status == 200
    assert r.body == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == "attachment; filename=disk.raw"
    assert r.headers["server"].startswith("imageio/")
    assert "content-range" not in r.headers
    assert server.store.get("t1").transferred() == len(data)


@pytest_twisted.ensureDeferred
async def test_get_range(server):
    data = pattern(3 * MiB + 5)
    server.addTicket(data=data)
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=100-2097251"})
    assert r.status == 206
    assert r.body == data[100:2097252]
    assert r.headers["content-range"] == f"bytes 100-2097251/{len(data)}"
    assert r.headers["content-disposition"] == "attachment"


@pytest_twisted.ensureDeferred
async def test_get_range_zero_open_is_206(server):
    data = pattern(1000)
    server.addTicket(data=data)
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=0-"})
    assert r.status == 206
    assert r.body == data
    assert r.headers["content-range"] == "bytes 0-999/1000"
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=990-"})
    assert r.status == 206
    assert r.body == data[990:]


@pytest_twisted.ensureDeferred
async def test_get_total_is_ticket_size_and_clamped(server):
    data = pattern(1000)
    server.addTicket(data=data, size=4096)
    r = await request(server.address, "GET", "/images/t1")
    assert r.status == 200
    assert r.body == data
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=0-99"})
    assert r.headers["content-range"] == "bytes 0-99/4096"
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=0-1999"})
    assert r.status == 416
    assert r.text == "Requested more bytes than available: 2000 > 1000\n"
    assert r.headers["content-range"] == "bytes */1000"


@pytest_twisted.ensureDeferred
async def test_get_past_ticket(server):
    server.addTicket(data=pattern(1000), size=500)
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=0-500"})
    assert r.status == 416
    assert r.text == "Requested range out of allowed range\n"
    assert r.headers["content-range"] == "bytes */500"
    assert r.headers["content-type"] == "text/plain; charset=UTF-8"


@pytest.mark.parametrize("value,text", [
    ("bytes=-", "Cannot satisfy range 'bytes=-', no first or last"),
    ("bytes=-10", "suffix-byte-range-spec not supported yet"),
    ("bytes=5-1", "Cannot satisfy range 'bytes=5-1', first > last"),
    ("bytes=0-1,3-4", "Cannot satisfy range 'bytes=0-1,3-4', invalid range "
                      "or multiple ranges"),
    ("Bytes=0-1", "Cannot satisfy range 'Bytes=0-1', invalid range or "
                  "multiple ranges"),
    ("bytes= 0-1", "Cannot satisfy range 'bytes= 0-1', invalid range or "
                   "multiple ranges"),
])
@pytest_twisted.ensureDeferred
async def test_get_bad_range_before_auth(server, value, text):
    # No ticket at all: the range is checked first.
    r = await request(server.address, "GET", "/images/nope",
                      {"Range": value})
    assert r.status == 416
    assert r.text == text + "\n"
    assert "content-range" not in r.headers


@pytest_twisted.ensureDeferred
async def test_get_empty_image(server):
    server.addTicket(data=b"", size=0)
    r = await request(server.address, "GET", "/images/t1")
    assert r.status == 200
    assert r.body == b""
    assert r.headers["content-length"] == "0"


@pytest_twisted.ensureDeferred
async def test_get_filename_utf8(server):
    server.addTicket(data=b"x", filename="\u05d0\u05d1.raw")
    client = await connect(server.address)
    r = await client.request("GET", "/images/t1")
    client.transport.loseConnection()
    raw = r.headers["content-disposition"].encode("latin-1")
    assert raw == "attachment; filename=\u05d0\u05d1.raw".encode("utf-8")


@pytest_twisted.ensureDeferred
async def test_get_forbidden_closes(server):
    client = await connect(server.address)
    r = await client.request("GET", "/images/nope")
    assert r.status == 403
    assert r.text == ("You are not allowed to access this resource: "
                      "No such ticket nope\n")
    assert r.headers["connection"] == "close"
    await client.closed


@pytest_twisted.ensureDeferred
async def test_get_read_only_ticket_forbids_put(server):
    server.addTicket(data=b"abc", ops=["read"], transfer_id="tx")
    r = await request(server.address, "PUT", "/images/t1", body=b"x")
    assert r.status == 403
    assert r.text == ("You are not allowed to access this resource: "
                      "Transfer=tx forbids write\n")


@pytest_twisted.ensureDeferred
async def test_empty_id(server):
    for method in ("GET", "PUT", "OPTIONS", "PATCH"):
        r = await request(server.address, method, "/images/",
                          body=b"{}" if method == "PATCH" else b"")
        assert r.status == 400, method
        assert r.text == "Ticket id is required\n"
    r = await request(server.address, "GET", "/images//extents")
    assert (r.status, r.text) == (400, "Ticket id is required\n")
    r = await request(server.address, "GET", "/images//checksum")
    assert (r.status, r.text) == (400, "Ticket id is required\n")


@pytest_twisted.ensureDeferred
async def test_routing(server):
    server.addTicket(data=b"abc")
    for path in ("/images/t1/", "/images/t1/foo", "/images/t1/extents/x",
                 "/images/t1/checksumx", "/images/t1/checksum/x",
                 "/images/t1/checksum/algorithms/", "/images"):
        r = await request(server.address, "GET", path)
        assert r.status == 404, path
        assert r.text == f"No handler for {path!r}\n"
    r = await request(server.address, "POST", "/images/t1")
    assert (r.status, r.text) == (
        405, "Method 'POST' not defined for '/images/t1'\n")
    r = await request(server.address, "HEAD", "/images/t1/extents")
    assert r.status == 405
    r = await request(server.address, "PUT", "/images/t1/extents", body=b"x")
    assert (r.status, r.text) == (
        405, "Method 'PUT' not defined for '/images/t1/extents'\n")
    r = await request(server.address, "FOO", "/no/such")
    assert (r.status, r.text) == (405, "Invalid method 'FOO'\n")


@pytest_twisted.ensureDeferred
async def test_close_query(server):
    server.addTicket(data=b"abc")
    client = await connect(server.address)
    r = await client.request("GET", "/images/t1?close=y")
    assert r.status == 200 and r.body == b"abc"
    assert r.headers["connection"] == "close"
    await client.closed


@pytest_twisted.ensureDeferred
async def test_keep_alive(server):
    server.addTicket(data=b"abcdef")
    client = await connect(server.address)
    for i in range(3):
        r = await client.request("GET", "/images/t1",
                                 {"Range": f"bytes={i}-{i}"})
        assert r.body == b"abcdef"[i:i + 1]
    r = await client.request("GET", "/images/t1", {"Range": "bytes=0-100"})
    assert r.status == 416
    r = await client.request("GET", "/images/t1")
    assert r.status == 200
    assert not client.isClosed
    # One backend for the connection.
    assert len(server.opened) == 1
    assert server.store.get("t1").connections == 1
    client.transport.loseConnection()
    await client.closed
    # The server sees the close on a later turn (later still on a loaded
    # machine).
    await _waitFor(lambda: server.store.get("t1").connections == 0)
    assert server.opened[0].closed


# ---------------------------------------------------------------------------
# HEAD


@pytest_twisted.ensureDeferred
async def test_head(server):
    server.addTicket(data=pattern(5000), filename="a.img")
    client = await connect(server.address)
    r = await client.request("HEAD", "/images/t1")
    assert r.status == 200
    assert r.headers["content-length"] == "5000"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-disposition"] == "attachment; filename=a.img"
    r = await client.request("HEAD", "/images/t1", {"Range": "bytes=10-19"})
    assert r.status == 206
    assert r.headers["content-length"] == "10"
    assert r.headers["content-range"] == "bytes 10-19/5000"
    # The connection is still in sync.
    r = await client.request("GET", "/images/t1", {"Range": "bytes=0-3"})
    assert r.body == pattern(5000)[:4]
    client.transport.loseConnection()


@pytest.mark.skipif(CURL is None, reason="curl is missing")
@pytest_twisted.ensureDeferred
async def test_head_curl(server):
    server.addTicket(data=pattern(12345))
    out, err, code = await getProcessOutputAndValue(
        CURL, ["-sS", "-I", server.url + "/images/t1"])
    assert code == 0, err
    lines = out.decode().lower().splitlines()
    assert "content-length: 12345" in lines
    assert lines[0].startswith("http/1.1 200")


# ---------------------------------------------------------------------------
# PUT


@pytest_twisted.ensureDeferred
async def test_put(server):
    server.addTicket(size=3 * MiB)
    data = pattern(2 * MiB + 3)
    client = await connect(server.address)
    r = await client.request("PUT", "/images/t1", {
        "Content-Range": f"bytes 1000-{1000 + len(data) - 1}/*"}, data)
    assert r.status == 200
    assert r.body == b""
    assert r.headers["content-length"] == "0"
    assert bytes(server.images["t1"][1000:1000 + len(data)]) == data
    assert server.opened[0].flushes == 1
    r = await client.request("PUT", "/images/t1?flush=n", {}, b"xyz")
    assert r.status == 200
    assert server.opened[0].flushes == 1
    assert bytes(server.images["t1"][:3]) == b"xyz"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_put_transferred(server):
    server.addTicket(size=1 * MiB, ops=["write"])
    await request(server.address, "PUT", "/images/t1",
                  {"Content-Range": "bytes 0-99/*"}, b"a" * 100)
    await request(server.address, "PUT", "/images/t1",
                  {"Content-Range": "bytes 50-249/*"}, b"b" * 200)
    assert server.store.get("t1").transferred() == 250


@pytest_twisted.ensureDeferred
async def test_put_zero_length(server):
    server.addTicket(size=100)
    r = await request(server.address, "PUT", "/images/t1",
                      {"Content-Length": "0"})
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_put_no_length(server):
    server.addTicket(size=100)
    client = await connect(server.address)
    r = await client.request("PUT", "/images/t1")
    assert r.status == 400
    assert r.text == "Content-Length header is required\n"
    # Nothing was left unread: keep-alive.
    assert not client.isClosed
    client.transport.loseConnection()


@pytest.mark.parametrize("value,text", [
    ("bytes 5-1/*", "Invalid Content-Range 'bytes 5-1/*', first > last"),
    ("bytes 0-10/10", "Invalid Content-Range 'bytes 0-10/10', "
                      "last >= complete"),
    ("bytes */10", "Invalid Content-Range 'bytes */10'"),
    ("bytes=0-1", "Invalid Content-Range 'bytes=0-1'"),
])
@pytest_twisted.ensureDeferred
async def test_put_bad_content_range(server, value, text):
    server.addTicket(size=100)
    r = await request(server.address, "PUT", "/images/t1",
                      {"Content-Range": value}, b"x")
    assert r.status == 400
    assert r.text == text + "\n"


@pytest_twisted.ensureDeferred
async def test_put_content_range_only_start(server):
    server.addTicket(size=200)
    r = await request(server.address, "PUT", "/images/t1",
                      {"Content-Range": "bytes 99-100/*"}, b"x")
    assert r.status == 200
    assert server.images["t1"][99:100] == b"x"


@pytest_twisted.ensureDeferred
async def test_put_bad_flush(server):
    server.addTicket(size=100)
    r = await request(server.address, "PUT", "/images/t1?flush=x", body=b"x")
    assert r.status == 400
    assert r.text == ("Unsupported value 'x' for 'flush', expecting one of "
                      "['n', 'y']\n")


@pytest_twisted.ensureDeferred
async def test_put_past_ticket(server):
    server.addTicket(size=100)
    client = await connect(server.address)
    r = await client.request("PUT", "/images/t1",
                             {"Content-Range": "bytes 90-*/*"}, b"x" * 11)
    assert r.status == 416
    assert r.text == "Requested range out of allowed range\n"
    assert r.headers["content-range"] == "bytes */100"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_put_chunked(server):
    server.addTicket(size=1 * MiB)
    body = (b"5\r\nhello\r\n" b"6\r\n world\r\n" b"0\r\n\r\n")
    r = await request(server.address, "PUT", "/images/t1",
                      {"Transfer-Encoding": "chunked",
                       "Content-Range": "bytes 10-*/*"}, body)
    assert r.status == 200
    assert bytes(server.images["t1"][10:21]) == b"hello world"


@pytest_twisted.ensureDeferred
async def test_put_chunked_past_ticket(server):
    server.addTicket(size=100)
    chunk = b"%x\r\n%s\r\n" % (60, b"y" * 60)
    client = await connect(server.address)
    r = await client.request(
        "PUT", "/images/t1", {"Transfer-Encoding": "chunked",
                              "Content-Range": "bytes 50-*/*"},
        chunk + chunk + b"0\r\n\r\n")
    assert r.status == 416
    assert r.text == "Requested range out of allowed range\n"
    assert r.headers["content-range"] == "bytes */100"
    # Nothing written past the ticket end.
    assert len(server.images["t1"]) == 100
    assert bytes(server.images["t1"][50:100]) == bytes(50)


@pytest.mark.skipif(CURL is None, reason="curl is missing")
@pytest_twisted.ensureDeferred
async def test_put_chunked_curl(server, tmp_path):
    data = pattern(3 * MiB + 1)
    src = tmp_path / "src"
    src.write_bytes(data)
    server.addTicket(size=4 * MiB)
    out, err, code = await getProcessOutputAndValue(
        CURL, ["-sS", "-o", "/dev/null", "-w", "%{http_code}",
               "-H", "Transfer-Encoding: chunked", "-T", str(src),
               server.url + "/images/t1"])
    assert code == 0, err
    assert out == b"200"
    assert bytes(server.images["t1"][:len(data)]) == data


@pytest.mark.skipif(CURL is None, reason="curl is missing")
@pytest_twisted.ensureDeferred
async def test_put_get_curl_odd_sizes(server, tmp_path):
    for size in (1, 4095, 1 * MiB + 1, 5 * MiB - 7):
        data = pattern(size, seed=size)
        src = tmp_path / "src"
        src.write_bytes(data)
        server.addTicket(size=size)
        out, err, code = await getProcessOutputAndValue(
            CURL, ["-sS", "-o", "/dev/null", "-w", "%{http_code}",
                   "-T", str(src), server.url + "/images/t1"])
        assert (code, out) == (0, b"200"), err
        dst = tmp_path / "dst"
        out, err, code = await getProcessOutputAndValue(
            CURL, ["-sS", "-o", str(dst), "-w", "%{http_code}",
                   server.url + "/images/t1"])
        assert (code, out) == (0, b"200"), err
        assert dst.read_bytes() == data


@pytest_twisted.ensureDeferred
async def test_put_expect_continue(server):
    server.addTicket(size=100)
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1", {"Content-Length": "5",
                                             "Expect": "100-continue"},
                       b"hello", send=False)
    await sleep(0.05)
    assert client.interim == ["100"]
    client.transport.write(b"hello")
    r = await d
    assert r.status == 200
    assert client.interim == ["100"]
    assert bytes(server.images["t1"][:5]) == b"hello"
    # Refused before the body: exactly one 100, then the error.
    client.interim = []
    d = client.request("PUT", "/images/nope", {"Content-Length": "5",
                                               "Expect": "100-continue"},
                       b"hello", send=False)
    r = await d
    assert r.status == 403
    assert client.interim == ["100"]
    await client.closed


@pytest_twisted.ensureDeferred
async def test_put_early_error_closes(server):
    # A refused upload is answered before its body is read, and the
    # connection closes.
    client = await connect(server.address)
    d = client.request("PUT", "/images/nope",
                       {"Content-Length": str(100 * MiB)}, b"", send=False)
    client.transport.write(b"x" * MiB)
    r = await d
    assert r.status == 403
    assert r.headers["connection"] == "close"
    await client.closed


@pytest_twisted.ensureDeferred
async def test_put_backend_error_mid_body(server):
    server.addTicket(size=64 * MiB)
    server.holds["t1"] = ["write"]
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Content-Length": str(64 * MiB)}, b"", send=False)
    client.transport.write(b"x" * (12 * MiB))
    backend = None
    while backend is None or not backend.pending:
        await sleep(0.01)
        backend = server.opened[0] if server.opened else None
    # Fail the write in flight.
    waiting, backend._waiting = backend._waiting, []
    for wd, _ in waiting:
        wd.errback(RuntimeError("disk on fire"))
    r = await d
    assert r.status == 500
    assert r.text == "Server failed to perform the request, check logs\n"
    await client.closed


@pytest_twisted.ensureDeferred
async def test_put_backpressure(server):
    server.addTicket(size=64 * MiB)
    server.holds["t1"] = ["write"]
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Content-Length": str(48 * MiB)}, b"", send=False)
    data = pattern(48 * MiB)
    client.transport.write(data)
    await _waitFor(lambda: server.opened and server.opened[0].pending == 1)
    backend = server.opened[0]
    # The server stopped reading at the high-water mark.
    upload = None
    assert backend.pending == 1
    backend.release()
    r = await d
    assert r.status == 200
    assert bytes(server.images["t1"][:len(data)]) == data
    del upload


# ---------------------------------------------------------------------------
# PATCH


@pytest_twisted.ensureDeferred
async def test_patch_zero(server):
    server.addTicket(data=b"\xff" * 1000, ops=["write"])
    r = await request(server.address, "PATCH", "/images/t1",
                      {"Content-Type": "application/json"},
                      json.dumps({"op": "zero", "offset": 10, "size": 20,
                                  "flush": True, "future": 1}).encode())
    assert r.status == 200
    assert r.headers["content-length"] == "0"
    assert server.images["t1"][:10] == b"\xff" * 10
    assert server.images["t1"][10:30] == bytes(20)
    assert server.images["t1"][30:31] == b"\xff"
    assert server.opened[0].flushes == 1
    assert server.store.get("t1").transferred() == 20


@pytest_twisted.ensureDeferred
async def test_patch_zero_steps(server):
    server.addTicket(size=300 * MiB)
    r = await request(server.address, "PATCH", "/images/t1",
                      body=json.dumps({"op": "zero", "size": 300 * MiB})
                      .encode())
    assert r.status == 200
    assert server.opened[0].calls.count("zero") == 3


@pytest_twisted.ensureDeferred
async def test_patch_zero_sparse_file_big_steps(server, tmp_path,
                                                monkeypatch):
    # A sparse file punches holes in the backend's big steps (64 GiB), not
    # 128 MiB ones: 8 TiB in 129 calls, not 65,536 (the first step is an
    # ordinary one: it tells the backend that punching holes works here).
    from imageio.backends.file import FileBackend
    calls = []
    zero = FileBackend.zero

    def counting(self, offset, length):
        calls.append(length)
        return zero(self, offset, length)

    monkeypatch.setattr(FileBackend, "zero", counting)
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(8 * 1024 * GiB)
    server.addTicket("z1", size=8 * 1024 * GiB, url=f"file://{path}",
                     sparse=True)
    r = await request(server.address, "PATCH", "/images/z1",
                      body=json.dumps({"op": "zero", "size": 8 * 1024 * GiB})
                      .encode())
    assert r.status == 200
    assert calls[0] == 128 * MiB
    assert set(calls[1:-1]) == {64 * GiB}
    assert len(calls) == 129
    assert os.stat(path).st_blocks == 0


@pytest_twisted.ensureDeferred
async def test_patch_flush(server):
    server.addTicket(size=10)
    r = await request(server.address, "PATCH", "/images/t1",
                      body=b'{"op": "flush", "offset": "x"}')
    assert r.status == 200
    assert server.opened[0].flushes == 1


@pytest.mark.parametrize("body,text", [
    (b"not json", None),
    (b"[]", None),
    (b"{}", "Missing required value for op"),
    (b'{"op": "x"}', "Unsupported value 'x' for 'op', expecting one of "
                     "['flush', 'zero']"),
    (b'{"op": "zero"}', "Missing required value for 'size'"),
    (b'{"op": "zero", "size": "1"}', "Integer required '1'"),
    (b'{"op": "zero", "size": -1}', "Invalid value -1 < 0"),
    (b'{"op": "zero", "size": 1, "offset": -1}', "Invalid value -1 < 0"),
    (b'{"op": "zero", "size": 1, "flush": 1}', "Boolean required 1"),
    (b'{"op": "zero", "size": 100000000000000000000}', None),
])
@pytest_twisted.ensureDeferred
async def test_patch_invalid_before_auth(server, body, text):
    r = await request(server.address, "PATCH", "/images/nope", body=body)
    assert r.status == 400, r
    if text is not None:
        assert r.text == text + "\n"


@pytest_twisted.ensureDeferred
async def test_patch_zero_past_ticket(server):
    server.addTicket(size=100)
    r = await request(server.address, "PATCH", "/images/t1",
                      body=b'{"op": "zero", "offset": 50, "size": 51}')
    assert r.status == 416
    assert r.text == "Requested range out of allowed range\n"
    assert r.headers["content-range"] == "bytes */100"


@pytest_twisted.ensureDeferred
async def test_patch_forbidden_closes(server):
    server.addTicket(size=100, ops=["read"])
    client = await connect(server.address)
    r = await client.request("PATCH", "/images/t1", {},
                             b'{"op": "flush"}')
    assert r.status == 403
    await client.closed


@pytest_twisted.ensureDeferred
async def test_patch_huge_body_refused(server):
    client = await connect(server.address)
    d = client.request("PATCH", "/images/t1",
                       {"Content-Length": str(GiB)}, b"", send=False)
    r = await d
    assert r.status == 413
    await client.closed


@pytest_twisted.ensureDeferred
async def test_patch_no_cors(server):
    server.addTicket(size=10)
    r = await request(server.address, "PATCH", "/images/t1",
                      {"Origin": "x"}, b'{"op": "flush"}')
    assert r.status == 200
    assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------------
# OPTIONS


@pytest_twisted.ensureDeferred
async def test_options_all(server):
    r = await request(server.address, "OPTIONS", "/images/*")
    assert r.status == 200
    assert r.headers["allow"] == "OPTIONS,GET,HEAD,PUT,PATCH"
    assert r.json() == {"features": ["checksum", "extents", "flush", "zero"]}


@pytest_twisted.ensureDeferred
async def test_options_ticket(server):
    t = server.addTicket(size=10, ops=["read"])
    before = t.expires
    t.expires = 0
    r = await request(server.address, "OPTIONS", "/images/t1")
    assert r.status == 403
    assert r.text.endswith("expired\n")
    t.expires = before - 100
    r = await request(server.address, "OPTIONS", "/images/t1")
    assert r.status == 200
    assert r.headers["allow"] == "OPTIONS,GET,HEAD"
    assert r.json() == {"features": ["checksum", "extents"],
                        "max_readers": 8, "max_writers": 1}
    assert t.expires >= before
    server.addTicket("t2", size=10, ops=["write"])
    r = await request(server.address, "OPTIONS", "/images/t2")
    assert r.headers["allow"] == "OPTIONS,GET,HEAD,PUT,PATCH"
    assert r.json()["features"] == ["checksum", "extents", "flush", "zero"]


@pytest_twisted.ensureDeferred
async def test_options_unix_socket(tmp_path):
    cfg = Config().replace("local", enable=True, socket="\0/test/x")
    srv = Server(tmp_path, config=cfg)
    try:
        r = await request(srv.address, "OPTIONS", "/images/*")
        assert b'"unix_socket": "\\u0000/test/x"' in r.body
        assert r.json()["unix_socket"] == "\0/test/x"
    finally:
        await srv.close()


@pytest_twisted.ensureDeferred
async def test_options_forbidden_closes(server):
    client = await connect(server.address)
    r = await client.request("OPTIONS", "/images/nope")
    assert r.status == 403
    await client.closed


@pytest_twisted.ensureDeferred
async def test_options_backend_open_error(server):
    server.addTicket(url="file:///no/such/file", size=10)
    r = await request(server.address, "OPTIONS", "/images/t1")
    assert r.status == 500
    assert r.text == "Server failed to perform the request, check logs\n"


# ---------------------------------------------------------------------------
# CORS


@pytest_twisted.ensureDeferred
async def test_cors(server):
    server.addTicket(size=10)
    r = await request(server.address, "OPTIONS", "/images/t1", {
        "Origin": "https://e", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-range"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-headers"] == "*"
    assert r.headers["access-control-allow-methods"] == "OPTIONS,GET,PUT"
    assert r.headers["access-control-max-age"] == "86400"
    # On errors too, and "*" elsewhere.
    r = await request(server.address, "GET", "/images/nope", {
        "Origin": "https://e", "Access-Control-Request-Method": "GET"})
    assert r.status == 403
    assert r.headers["access-control-allow-methods"] == "*"
    r = await request(server.address, "PUT", "/images/nope",
                      {"Origin": "https://e"}, b"x")
    assert r.headers["access-control-allow-origin"] == "*"
    r = await request(server.address, "GET", "/images/t1")
    assert not any(k.startswith("access-control") for k in r.headers)


# ---------------------------------------------------------------------------
# Extents


@pytest_twisted.ensureDeferred
async def test_extents(server):
    server.addTicket(size=3 * MiB)
    server.extents["t1"] = [ZeroExtent(0, MiB, False),
                            ZeroExtent(MiB, 2 * MiB, True, True)]
    t = server.store.get("t1")
    before = t.expires
    t.expires -= 10
    r = await request(server.address, "GET", "/images/t1/extents")
    assert r.status == 200
    assert r.json() == [
        {"start": 0, "length": MiB, "zero": False, "hole": False},
        {"start": MiB, "length": 2 * MiB, "zero": True, "hole": True}]
    # Extents do not touch the ticket.
    assert t.expires == before - 10
    r = await request(server.address, "GET",
                      f"/images/t1/extents?start={MiB - 10}&length=20")
    assert r.json() == [
        {"start": MiB - 10, "length": 10, "zero": False, "hole": False},
        {"start": MiB, "length": 10, "zero": True, "hole": True}]
    r = await request(server.address, "GET", "/images/t1/extents?start=x")
    assert r.status == 400


@pytest_twisted.ensureDeferred
async def test_extents_errors(server):
    server.addTicket(size=10)
    r = await request(server.address, "GET", "/images/t1/extents?context=x")
    assert r.status == 400
    assert r.text == ("Unsupported value 'x' for 'context', expecting one "
                      "of ['dirty', 'zero']\n")
    r = await request(server.address, "GET",
                      "/images/t1/extents?context=dirty")
    assert (r.status, r.text) == (
        404, "Ticket does not support dirty extents\n")
    server.addTicket("t2", size=10, dirty=True)
    r = await request(server.address, "GET",
                      "/images/t2/extents?context=dirty")
    assert r.status == 404
    server.dirty["t2"] = [DirtyExtent(0, 10, True)]
    r = await request(server.address, "GET",
                      "/images/t2/extents?context=dirty")
    assert r.json() == [{"start": 0, "length": 10, "dirty": True,
                         "zero": False}]
    client = await connect(server.address)
    r = await client.request("GET", "/images/nope/extents")
    assert r.status == 403
    await client.closed


@pytest.mark.parametrize("count", [1, images._BIG_EXTENTS + 7])
@pytest_twisted.ensureDeferred
async def test_extents_body_bytes(server, count):
    """
    The extents body is byte for byte json.dumps of the dicts, small lists
    (encoded in the reactor) and large ones (in the pool), both contexts.
    """
    size = count * 4096
    server.addTicket(size=size, dirty=True)
    zero = [ZeroExtent(i * 4096, 4096, bool(i % 2), bool(i % 3 == 1))
            for i in range(count)]
    dirty = [DirtyExtent(i * 4096, 4096, bool(i % 3 == 2), bool(i % 2))
             for i in range(count)]
    server.extents["t1"] = zero
    server.dirty["t1"] = dirty
    for context, extents in (("zero", zero), ("dirty", dirty)):
        r = await request(server.address, "GET",
                          f"/images/t1/extents?context={context}")
        assert r.status == 200
        assert r.headers["content-type"] == "application/json"
        assert r.body == (json.dumps([e.toDict() for e in extents])
                          + "\n").encode()


# ---------------------------------------------------------------------------
# Checksum


def blkhashOf(data, algorithm="blake2b", blockSize=4 * MiB):
    ds = 32 if algorithm.startswith("blake2") else None

    def new(b=b""):
        return hashlib.new(algorithm, b, **({"digest_size": ds} if ds
                                            else {}))
    outer = new()
    for i in range(0, len(data), blockSize):
        outer.update(new(data[i:i + blockSize]).digest())
    return outer.hexdigest()


@pytest.mark.parametrize("algorithm,blockSize", [
    ("blake2b", 4 * MiB), ("sha1", 1 * MiB), ("sha256", 2 * MiB + 4096)])
@pytest_twisted.ensureDeferred
async def test_checksum(server, algorithm, blockSize):
    data = bytearray(9 * MiB + 333)
    data[:100] = pattern(100)
    data[5 * MiB:5 * MiB + 7] = b"1234567"
    server.addTicket(data=bytes(data), ops=["read"])
    server.extents["t1"] = [ZeroExtent(0, 4096, False),
                            ZeroExtent(4096, 5 * MiB - 4096, True),
                            ZeroExtent(5 * MiB, len(data) - 5 * MiB, False)]
    r = await request(server.address, "GET",
                      f"/images/t1/checksum?algorithm={algorithm}"
                      f"&block_size={blockSize}")
    assert r.status == 200
    assert r.json() == {"algorithm": algorithm, "block_size": blockSize,
                        "checksum": blkhashOf(bytes(data), algorithm,
                                              blockSize)}
    assert server.store.get("t1").transferred() == len(data)


@pytest.mark.parametrize("blockSize", [1 * MiB, 2 * MiB + 4096, 4 * MiB])
@pytest_twisted.ensureDeferred
async def test_checksum_unaligned_extents(server, blockSize):
    """
    Data extents starting and ending inside blocks, zero extents that are
    not all zeroes' worth of blocks, extents ending before the image: the
    checksum is still the one of every byte.
    """
    size = 21 * MiB + 4096 + 7
    data = bytearray(size)
    data[3 * MiB - 10:3 * MiB + 10] = pattern(20, 1)
    data[9 * MiB + 4096:11 * MiB] = pattern(2 * MiB - 4096, 2)
    data[20 * MiB:20 * MiB + 3] = b"end"
    server.addTicket(data=bytes(data), ops=["read"])
    server.extents["t1"] = [
        ZeroExtent(0, 3 * MiB - 10, True),
        ZeroExtent(3 * MiB - 10, 20, False),
        ZeroExtent(3 * MiB + 10, 9 * MiB + 4086 - 3 * MiB, True),
        ZeroExtent(9 * MiB + 4096, 2 * MiB - 4096, False),
        ZeroExtent(11 * MiB, 9 * MiB, True),
        ZeroExtent(20 * MiB, 4096, False)]
    r = await request(server.address, "GET",
                      f"/images/t1/checksum?block_size={blockSize}")
    assert r.status == 200, r
    assert r.json()["checksum"] == blkhashOf(bytes(data),
                                             blockSize=blockSize)
    assert server.store.get("t1").transferred() == size
    # Only the blocks holding data were read.
    backend = server.opened[0]
    dataBlocks = {(3 * MiB - 10) // blockSize, (3 * MiB + 9) // blockSize,
                  20 * MiB // blockSize}
    dataBlocks |= set(range((9 * MiB + 4096) // blockSize,
                            (11 * MiB - 1) // blockSize + 1))
    reads = backend.calls.count("read")
    assert reads <= len(dataBlocks) * -(-blockSize // MiB)


@pytest_twisted.ensureDeferred
async def test_checksum_reads_in_flight_bounded(server):
    """
    The checksum reads ahead, but keeps at most CHECKSUM_READS reads in
    flight on the backend.
    """
    data = pattern(24 * MiB)
    server.addTicket(data=data, ops=["read"])
    server.holds["t1"] = ["read"]
    d = defer.ensureDeferred(
        request(server.address, "GET", "/images/t1/checksum"))
    await _waitFor(lambda: server.opened and server.opened[0].pending)
    await sleep(0.1)
    backend = server.opened[0]
    assert backend.pending == operations.CHECKSUM_READS
    backend.release()
    r = await d
    assert r.status == 200, r
    assert r.json()["checksum"] == blkhashOf(data)


@pytest_twisted.ensureDeferred
async def test_checksum_read_ahead_bounded(server):
    """
    While hashing cannot keep up (every pool thread busy), reading stops
    once CHECKSUM_BUFFER bytes of blocks wait for their digest: memory
    does not grow with the image.
    """
    data = pattern(96 * MiB)
    server.addTicket(data=data, ops=["read"])
    busy = threading.Event()
    started = []
    for _ in range(server.pool.max):
        server.pool.callInThread(lambda: (started.append(1), busy.wait(10)))
    await _waitFor(lambda: len(started) == server.pool.max)
    try:
        d = defer.ensureDeferred(
        request(server.address, "GET", "/images/t1/checksum"))
        await _waitFor(lambda: server.opened
                       and server.opened[0].calls.count("read"))
        await sleep(0.2)
        read = server.opened[0].calls.count("read") * 1 * MiB
        assert read == operations.CHECKSUM_BUFFER
    finally:
        busy.set()
    r = await d
    assert r.status == 200, r
    assert r.json()["checksum"] == blkhashOf(data)
    assert server.opened[0].calls.count("read") == len(data) // MiB


@pytest_twisted.ensureDeferred
async def test_checksum_canceled_with_reads_in_flight(server):
    data = pattern(16 * MiB)
    server.addTicket(data=data, ops=["read"])
    server.holds["t1"] = ["read"]
    d = defer.ensureDeferred(
        request(server.address, "GET", "/images/t1/checksum"))
    await _waitFor(lambda: server.opened and server.opened[0].pending)
    removed = server.store.remove("t1", 5)
    await sleep(0.05)
    # The reads in flight end first: nothing outlives the request.
    assert not removed.called
    server.opened[0].release()
    await removed
    r = await d
    assert r.status == 403, r
    assert r.text.endswith("was canceled\n")
    assert "Traceback" not in r.text


@pytest_twisted.ensureDeferred
async def test_checksum_empty(server):
    server.addTicket(data=b"")
    r = await request(server.address, "GET", "/images/t1/checksum")
    assert r.json()["checksum"] == hashlib.blake2b(digest_size=32).hexdigest()


@pytest.mark.parametrize("query,text", [
    ("algorithm=nope", None),
    ("algorithm=shake_128", None),
    ("block_size=x", "Invalid block size: 'x'"),
    ("block_size=4096", "Block size out of allowed range: 1048576-16777216"),
    ("block_size=20000000", "Block size out of allowed range: "
                            "1048576-16777216"),
    ("block_size=1048577", "Block size is not aligned to 4096"),
])
@pytest_twisted.ensureDeferred
async def test_checksum_bad_params_before_auth(server, query, text):
    r = await request(server.address, "GET", f"/images/nope/checksum?{query}")
    assert r.status == 400
    if text:
        assert r.text == text + "\n"
    else:
        assert r.text.startswith("Unsupported value")


@pytest_twisted.ensureDeferred
async def test_checksum_forbidden_keeps_connection(server):
    client = await connect(server.address)
    r = await client.request("GET", "/images/nope/checksum")
    assert r.status == 403
    r = await client.request("GET", "/images/nope/checksum/algorithms")
    assert r.status == 200
    assert "blake2b" in r.json()["algorithms"]
    assert not any(a.startswith("shake") for a in r.json()["algorithms"])
    assert r.json()["algorithms"] == sorted(r.json()["algorithms"])
    client.transport.loseConnection()


# ---------------------------------------------------------------------------
# Cancel


async def _waitFor(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timeout")
        await sleep(0.01)


@pytest_twisted.ensureDeferred
async def test_cancel_download(server):
    size = 256 * MiB
    server.addTicket(size=size, ops=["read"])
    client = await connect(server.address)
    got = []
    paused = []

    def sink(data):
        got.append(len(data))
        if sum(got) >= 8 * MiB and not paused:
            # Stop reading: the server's download is paused mid-body.
            paused.append(True)
            client.transport.pauseProducing()
    d = client.request("GET", "/images/t1", sink=sink)
    await _waitFor(lambda: sum(got) >= 8 * MiB)
    await sleep(0.05)
    removed = server.store.remove("t1", 5)
    await sleep(0.05)
    assert not removed.called
    client.transport.resumeProducing()
    await removed
    with pytest.raises(Exception):
        await d
    # Stopped at the next chunk: what the socket buffers held, not the rest.
    assert sum(got) < 64 * MiB
    assert "t1" not in server.store
    assert server.opened[0].closed


@pytest_twisted.ensureDeferred
async def test_cancel_upload(server):
    server.addTicket(size=64 * MiB, ops=["write"])
    server.holds["t1"] = ["write"]
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Content-Length": str(64 * MiB)}, b"", send=False)
    client.transport.write(b"z" * (20 * MiB))
    await _waitFor(lambda: server.opened and server.opened[0].pending)
    backend = server.opened[0]
    removed = server.store.remove("t1", 5)
    backend.release()
    await removed
    r = await d
    assert r.status == 403
    assert r.text.endswith("was canceled\n")
    await client.closed
    assert "t1" not in server.store
    written = len(server.images["t1"].rstrip(b"\0"))
    # Only the write in flight when canceled reached the image.
    assert written <= 4 * MiB
    assert backend.closed


# ---------------------------------------------------------------------------
# Concurrency and memory


@pytest_twisted.ensureDeferred
async def test_big_download_does_not_block_others(server, tmp_path):
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(GiB)
    server.addTicket(url=f"file://{path}", size=GiB, ops=["read"])
    big = await connect(server.address)
    got = [0]

    def count(data):
        got[0] += len(data)
    d = big.request("GET", "/images/t1", sink=count)
    await _waitFor(lambda: got[0] > 32 * MiB)
    other = await connect(server.address)
    worst = 0
    for i in range(5):
        start = time.monotonic()
        r = await other.request("GET", "/images/t1/extents")
        assert r.status == 200
        r = await other.request("GET", "/images/t1",
                                {"Range": "bytes=0-4095"})
        assert r.status == 206
        worst = max(worst, time.monotonic() - start)
    assert worst < 0.1, worst
    assert got[0] < GiB, "the download finished too early to measure"
    big.transport.loseConnection()
    other.transport.loseConnection()
    with pytest.raises(Exception):
        await d


@pytest_twisted.ensureDeferred
async def test_no_temp_files(server):
    server.addTicket(size=32 * MiB)
    before = set(os.listdir("/proc/self/fd"))
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Content-Length": str(32 * MiB)}, b"", send=False)
    client.transport.write(pattern(16 * MiB))
    await sleep(0.1)
    for fd in set(os.listdir("/proc/self/fd")) - before:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        assert "(deleted)" not in target and "/tmp" not in target, target
    client.transport.write(pattern(16 * MiB))
    r = await d
    assert r.status == 200
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_unix_socket(server):
    data = pattern(MiB + 1)
    server.addTicket(size=len(data))
    r = await request(server.unixAddress, "PUT", "/images/t1", body=data)
    assert r.status == 200
    r = await request(server.unixAddress, "GET", "/images/t1")
    assert r.body == data


@pytest_twisted.ensureDeferred
async def test_file_backend_roundtrip(server, tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"")
    data = pattern(3 * MiB + 511)
    server.addTicket(url=f"file://{path}", size=len(data))
    client = await connect(server.address)
    r = await client.request("PUT", "/images/t1", {}, data)
    assert r.status == 200
    r = await client.request("GET", "/images/t1",
                             {"Range": f"bytes=0-{len(data) - 1}"})
    assert r.status == 206
    assert r.body == data
    r = await client.request("GET", "/images/t1/checksum")
    assert r.json()["checksum"] == blkhashOf(path.read_bytes())
    client.transport.loseConnection()


def test_maxrss_probe():
    # Cheap sanity check that the resource module works here (the memory
    # figures in the report come from bench, not from tests).
    assert _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss > 0
    assert blkhash.ALGORITHMS
    assert KiB == 1024
