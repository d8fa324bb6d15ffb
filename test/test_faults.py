# -*- test-case-name: test.test_faults -*-
"""
Faults around the images service, over real sockets: clients that go
away or stop reading, slowloris connections, failing storage (a full file
system, an NBD server failing every write), and tickets that expire or are
deleted while a transfer runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from imageio.units import MiB
from imageio.web.http import GENERIC_ERROR, Root, makeSite
from imageio.web.tickets import Tickets

from test.test_images import (  # noqa: F401 (fixture)
    _waitFor, connect, pattern, request, server, sleep)

NBDKIT = shutil.which("nbdkit")


def nonZeroPrefix(data) -> int:
    return len(bytes(data).rstrip(b"\0"))


def fileTicket(server, path, size, ops=("read", "write"), **kw):
    return server.addTicket("t1", size=size, ops=ops, url=f"file://{path}",
                            **kw)


def assertGenericError(r):
    assert r.status == 500, r
    assert r.body.startswith(b"Server failed to perform the request"), r
    assert len(r.body) < 200
    for bad in (b"/", b"Traceback", b"Error(", b"<", b"0x"):
        assert bad not in r.body, r


# ---------------------------------------------------------------------------
# Clients going away


@pytest.mark.parametrize("kind", ["memory", "file"])
@pytest_twisted.ensureDeferred
async def test_upload_client_disconnect(server, tmp_path, kind):
    size = 64 * MiB
    path = tmp_path / "disk.raw"
    if kind == "memory":
        ticket = server.addTicket(size=size, ops=["write"])
    else:
        with open(path, "wb") as f:
            f.truncate(size)
        ticket = fileTicket(server, path, size, ops=["write"])
    data = pattern(12 * MiB)
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1", {"Content-Length": str(size)},
                       b"", send=False)
    d.addErrback(lambda _: None)
    client.transport.write(data)
    await _waitFor(lambda: (ticket.transferred() or 0) >= 4 * MiB)
    client.transport.abortConnection()
    await _waitFor(lambda: not ticket.active)
    assert ticket.info()["active"] is False
    assert ticket.connections == 0
    if kind == "memory":
        assert server.opened[0].closed
        image = server.images["t1"]
    else:
        with open(path, "rb") as f:
            image = f.read()
    n = nonZeroPrefix(image)
    # Only bytes the client sent reached the image, in place.
    assert 0 < n <= len(data)
    assert bytes(image[:n]) == data[:n]
    assert ticket.transferred() <= len(data)
    # The server still serves this ticket on a new connection.
    r = await request(server.address, "PUT", "/images/t1",
                      {"Content-Range": "bytes 0-2/*"}, b"abc")
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_download_client_disconnect(server):
    size = 128 * MiB
    ticket = server.addTicket(size=size, ops=["read"])
    client = await connect(server.address)
    got = []

    def sink(data):
        got.append(len(data))
    d = client.request("GET", "/images/t1", sink=sink)
    d.addErrback(lambda _: None)
    await _waitFor(lambda: sum(got) >= 4 * MiB)
    client.transport.abortConnection()
    await _waitFor(lambda: not ticket.active)
    assert server.opened[0].closed
    assert ticket.connections == 0
    # The download stopped: it did not read the whole image.
    assert ticket.transferred() < 64 * MiB


# ---------------------------------------------------------------------------
# A client that stops reading


@pytest_twisted.ensureDeferred
async def test_stalled_reader(server):
    size = 256 * MiB
    ticket = server.addTicket(size=size, ops=["read"], inactivity_timeout=2)
    client = await connect(server.address)
    got = []
    paused = []

    def sink(data):
        got.append(len(data))
        if sum(got) >= 2 * MiB and not paused:
            paused.append(True)
            client.transport.pauseProducing()
    d = client.request("GET", "/images/t1", sink=sink)
    d.addErrback(lambda _: None)
    await _waitFor(lambda: sum(got) >= 2 * MiB)
    stalled = time.monotonic()
    # The download is paused: progress stops, bounded by the socket
    # buffers plus a few chunks, not the image size.
    await sleep(0.5)
    first = ticket.transferred()
    await sleep(0.5)
    assert ticket.transferred() == first
    assert first < 32 * MiB
    # The connection is closed after the ticket's inactivity timeout: the
    # operation ends and the backend is closed. (The paused client does
    # not read, so it sees the close only once it reads again.)
    await _waitFor(lambda: not ticket.active, timeout=10)
    elapsed = time.monotonic() - stalled
    assert 1.5 <= elapsed <= 6, elapsed
    assert server.opened[0].closed
    assert ticket.connections == 0
    client.transport.resumeProducing()
    await _waitFor(lambda: client.isClosed, timeout=10)
    assert sum(got) < size


@pytest_twisted.ensureDeferred
async def test_stalled_writer_times_out(server):
    # An upload whose client stops sending mid-body is dropped after the
    # ticket's inactivity timeout, and its operation ends.
    ticket = server.addTicket(size=16 * MiB, ops=["write"],
                              inactivity_timeout=2)
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Content-Length": str(16 * MiB)}, b"", send=False)
    d.addErrback(lambda _: None)
    client.transport.write(b"x" * MiB)
    await _waitFor(lambda: ticket.active)
    started = time.monotonic()
    await _waitFor(lambda: client.isClosed, timeout=10)
    assert 1.5 <= time.monotonic() - started <= 6
    await _waitFor(lambda: not ticket.active)


# ---------------------------------------------------------------------------
# Slowloris


class _Slow(protocol.Protocol):
    """
    Sends a request's headers a few bytes at a time, never finishing.
    """

    def connectionMade(self):
        self.lost = False
        self.transport.write(b"GET /images/t1 HTTP/1.1\r\nHost: x\r\n")
        self.loop = task.LoopingCall(self.transport.write, b"X-a: b\r\n")
        self.loop.start(0.25, now=False)

    def connectionLost(self, reason):
        self.lost = True
        if self.loop.running:
            self.loop.stop()


@pytest_twisted.ensureDeferred
async def test_slowloris(server):
    data = pattern(MiB)
    server.addTicket(data=data, ops=["read"])
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", server.address[1])
    slow = []
    # In batches: a burst of 200 connects overflows the listen backlog
    # (40, as the reference), and the kernel resets the overflow.
    for _ in range(10):
        slow += await defer.gatherResults(
            [connectProtocol(ep, _Slow()) for _ in range(20)])
        await sleep(0.02)
    try:
        client = await connect(server.address)
        worst = 0.0
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            r = await client.request("GET", "/images/t1",
                                     {"Range": "bytes=0-65535"})
            worst = max(worst, time.monotonic() - started)
            assert r.status == 206 and r.body == data[:65536]
            n += 1
            # New connections are accepted promptly too.
            if n % 10 == 0:
                started = time.monotonic()
                r = await request(server.address, "GET", "/images/t1",
                                  {"Range": "bytes=0-1"})
                assert r.status == 206
                worst = max(worst, time.monotonic() - started)
            await sleep(0.02)
        assert n >= 20
        assert worst < 0.5, worst
        # The slow connections are still being read (idle timeout is reset
        # by their bytes, as in the reference), nothing crashed.
        assert sum(1 for p in slow if not p.lost) == 200
        client.transport.loseConnection()
    finally:
        for p in slow:
            if not p.lost:
                p.transport.abortConnection()
        await _waitFor(lambda: all(p.lost for p in slow))


# ---------------------------------------------------------------------------
# Failing storage


@pytest.fixture
def smallfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                          str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {res.stderr!r}")
    try:
        yield mnt
    finally:
        # Lazy: the server may still hold the file open until teardown.
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest_twisted.ensureDeferred
async def test_put_enospc(server, smallfs):
    size = 32 * MiB
    path = smallfs / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    fileTicket(server, path, size)
    data = pattern(size)
    r = await request(server.address, "PUT", "/images/t1", {}, data)
    assert r.status == 500, r
    # A clear text, without the path.
    assert r.text == ("Server failed to perform the request: "
                      "No space left on device\n")
    assert r.headers["connection"] == "close"
    # PATCH zero of a range we cannot allocate: same answer.
    r = await request(server.address, "PATCH", "/images/t1", {},
                      b'{"op": "zero", "size": 4096, "offset": 0}')
    assert r.status in (200, 500)
    # The daemon keeps serving: other tickets, and reads of this one.
    server.addTicket("m", data=b"hello")
    r = await request(server.address, "GET", "/images/m")
    assert r.status == 200 and r.body == b"hello"
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=8192-12287"})
    assert r.status == 206 and r.body == data[8192:12288]


@pytest.fixture
def failingNBD(tmp_path):
    if NBDKIT is None:
        pytest.skip("nbdkit is not installed")
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        [NBDKIT, "-f", "-U", sock, "--filter=error", "memory", "16M",
         "error-pwrite=EIO", "error-pwrite-rate=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("nbdkit did not start")
        time.sleep(0.02)
    yield sock
    # nbdkit waits for its clients on SIGTERM; the server closes its
    # backends only after this fixture's teardown.
    proc.kill()
    proc.wait(10)


@pytest_twisted.ensureDeferred
async def test_put_nbd_eio(server, failingNBD):
    server.addTicket("t1", size=16 * MiB, url=f"nbd:unix:{failingNBD}")
    r = await request(server.address, "PUT", "/images/t1", {},
                      pattern(2 * MiB))
    assertGenericError(r)
    # A body that fails after it was fully received keeps the connection.
    r = await request(server.address, "PUT", "/images/t1", {}, b"x" * 512)
    assertGenericError(r)
    r = await request(server.address, "PATCH", "/images/t1", {},
                      b'{"op": "zero", "size": 4096}')
    assert r.status in (200, 500)
    if r.status == 500:
        assertGenericError(r)
    # Reads still work.
    r = await request(server.address, "GET", "/images/t1",
                      {"Range": "bytes=0-511"})
    assert r.status == 206 and r.body == bytes(512)
    assert not server.store.get("t1").active


# ---------------------------------------------------------------------------
# Tickets expiring or deleted during transfers


@pytest_twisted.ensureDeferred
async def test_expired_mid_transfer_keeps_going(server):
    data = pattern(32 * MiB)
    ticket = server.addTicket(data=data, ops=["read"], timeout=1)
    client = await connect(server.address)
    got = []
    d = client.request("GET", "/images/t1", sink=got.append)
    await _waitFor(lambda: sum(map(len, got)) >= MiB)
    client.transport.pauseProducing()
    await _waitFor(ticket.expired, timeout=5)
    client.transport.resumeProducing()
    r = await d
    assert r.status == 200
    assert b"".join(got) == data
    client.transport.loseConnection()
    # A new request on the expired ticket is refused (the finished
    # operation extended it by its timeout: wait for that to pass). The
    # operation may finish a moment after the client has every byte (a
    # writer thread hands the socket back after its last write).
    await _waitFor(lambda: not ticket.active, timeout=5)
    await _waitFor(ticket.expired, timeout=5)
    r = await request(server.address, "GET", "/images/t1")
    assert r.status == 403
    assert r.text.endswith("expired\n")


@pytest_twisted.ensureDeferred
async def test_delete_mid_download_via_control(server):
    ticket = server.addTicket(size=256 * MiB, ops=["read"])
    root = Root()
    root.putChild(b"tickets", Tickets(server.store, removeTimeout=10))
    control = reactor.listenTCP(0, makeSite(root, reactor=reactor),
                                interface="127.0.0.1")
    try:
        client = await connect(server.address)
        got = []

        paused = []

        def sink(data):
            got.append(len(data))
            if sum(got) >= 4 * MiB and not paused:
                paused.append(True)
                client.transport.pauseProducing()
        d = client.request("GET", "/images/t1", sink=sink)
        d.addErrback(lambda _: None)
        await _waitFor(lambda: sum(got) >= 4 * MiB)
        deleting = defer.ensureDeferred(request(
            ("tcp", control.getHost().port), "DELETE", "/tickets/t1"))
        await sleep(0.2)
        client.transport.resumeProducing()
        r = await deleting
        assert r.status == 204
        await _waitFor(lambda: client.isClosed)
        # Stopped at the next chunk.
        assert sum(got) < 64 * MiB
        assert not ticket.active
        assert "t1" not in server.store
        assert server.opened[0].closed
    finally:
        await control.stopListening()


@pytest_twisted.ensureDeferred
async def test_delete_mid_upload_stops_writing(server):
    ticket = server.addTicket(size=64 * MiB, ops=["write"])
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Content-Length": str(64 * MiB)}, b"", send=False)
    d.addErrback(lambda _: None)
    client.transport.write(pattern(8 * MiB))
    await _waitFor(lambda: (ticket.transferred() or 0) >= 4 * MiB)
    # The cancel waits for the operation's next chunk boundary (as the
    # reference, a stalled uploader holds it until remove_timeout), so the
    # DELETE is pending while more body arrives.
    removing = server.store.remove("t1", 10)
    written = nonZeroPrefix(server.images["t1"])
    # More body arrives; nothing more is written, and the cancel completes.
    client.transport.write(b"y" * (8 * MiB))
    await removing
    await _waitFor(lambda: client.isClosed)
    assert nonZeroPrefix(server.images["t1"]) == written
    assert not ticket.active
