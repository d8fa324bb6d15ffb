"""
Request bodies read by a thread from plain sockets
(imageio.web.bodyreader): uploads over real unix and TCP sockets into file
and memory backends, keep-alive after them, client disconnects, early
errors and a stalled client while the thread owns the socket.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from imageio import transfer
from imageio.units import MiB
from imageio.web import bodyreader, handoff
from imageio.web.bodyreader import SocketReader

from test.test_images import Server, pattern, sleep, _waitFor  # noqa: F401
from test.support import UnixHTTPConnection, readResponse
from test.test_bodywriter import (  # noqa: F401
    get, sparseFileTicket, tlsConnection, tlsServer)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    pytest_twisted.blockon(defer.ensureDeferred(srv.close()))


def connection(server, transport):
    if transport == "unix":
        return UnixHTTPConnection(server.unixPath)
    if transport == "tls":
        return tlsConnection(server)
    return http.client.HTTPConnection("127.0.0.1", server.address[1],
                                      timeout=30)


def upload(con, path, data, headers=None):
    con.request("PUT", path, body=data, headers=headers or {})
    r = con.getresponse()
    return r.status, r.read()


@pytest_twisted.ensureDeferred
async def test_memory_backend_backpressure_and_cancel(server):
    # The sink pauses the thread (a held backend write), and a cancel
    # answers early: the thread gives the socket back first.
    server.addTicket(size=64 * MiB)
    server.holds["t1"] = ["write"]
    before = SocketReader.bodies
    sock = socket.create_connection(("127.0.0.1", server.address[1]))
    sock.sendall(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % (64 * MiB))
    sent = 0
    sock.setblocking(False)

    def push():
        nonlocal sent
        try:
            while sent < 40 * MiB:
                sent += sock.send(b"y" * MiB)
        except BlockingIOError:
            pass

    for _ in range(50):
        push()
        await sleep(0.02)
    assert server.opened and server.opened[0].pending
    assert SocketReader.bodies == before + 1
    # Paused: far less than sent was taken, the rest waits in the socket.
    assert sent < 40 * MiB
    removed = server.store.remove("t1", 5)
    server.opened[0].release()
    await removed
    sock.setblocking(True)
    sock.settimeout(10)
    head = await threads.deferToThread(sock.recv, 65536)
    assert head.startswith(b"HTTP/1.1 403 ")
    sock.close()


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_body(server, tmp_path):
    size = 64 * MiB
    ticket, _ = sparseFileTicket(server, tmp_path, "d1", size, ops=["write"])
    before = SocketReader.bodies
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(server.unixPath)
    sock.sendall(b"PUT /images/d1 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    await threads.deferToThread(sock.sendall, os.urandom(12 * MiB))
    await _waitFor(lambda: SocketReader.bodies == before + 1)
    sock.close()
    # The operation ends; the server goes on.
    await _waitFor(lambda: not ticket.active, timeout=10)
    con = UnixHTTPConnection(server.unixPath)
    status, _ = await threads.deferToThread(
        upload, con, "/images/d1", b"z" * MiB,
        {"Content-Range": f"bytes 0-{MiB - 1}/*"})
    con.close()
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_stalled_client_times_out(server, tmp_path):
    size = 64 * MiB
    ticket, _ = sparseFileTicket(server, tmp_path, "s1", size,
                                 ops=["write"], inactivity_timeout=1)
    # The connection binds the ticket (and its 1 s idle timeout) first.
    con = UnixHTTPConnection(server.unixPath)
    status, _ = await threads.deferToThread(
        upload, con, "/images/s1", b"a" * 4096,
        {"Content-Range": "bytes 0-4095/*"})
    assert status == 200
    before = SocketReader.bodies
    con.sock.sendall(b"PUT /images/s1 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
    await threads.deferToThread(con.sock.sendall, b"b" * (8 * MiB))
    await _waitFor(lambda: SocketReader.bodies == before + 1)
    # Nothing more is sent: the thread gives up after the idle timeout
    # and the connection is closed.
    start = reactor.seconds()
    con.sock.settimeout(10)
    got = await threads.deferToThread(con.sock.recv, 100)
    assert got == b""
    assert 0.5 <= reactor.seconds() - start <= 5
    await _waitFor(lambda: not ticket.active, timeout=10)
    con.close()


@pytest_twisted.ensureDeferred
async def test_fallback_when_too_many_readers(server, tmp_path, monkeypatch):
    monkeypatch.setattr(bodyreader._slots, "limit", 0)
    size = 8 * MiB
    _, target = sparseFileTicket(server, tmp_path, "m1", size)
    data = os.urandom(size)
    before = SocketReader.bodies
    con = UnixHTTPConnection(server.unixPath)
    status, _ = await threads.deferToThread(upload, con, "/images/m1", data)
    con.close()
    assert status == 200
    assert SocketReader.bodies == before
    assert target.read_bytes()[:size] == data


# ---------------------------------------------------------------------------
# TLS: the thread decrypts.


def tlsSocket(server):
    ctx = ssl.create_default_context(cafile=server.pki.ca)
    raw = socket.create_connection(("127.0.0.1", server.tlsPort.getHost().port),
                                   timeout=30)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.parametrize("transport,backend", [
    ("unix", "file"), ("tcp", "file"), ("tls", "file"), ("tls", "memory")])
@pytest_twisted.ensureDeferred
async def test_upload_keep_alive(tlsServer, tmp_path, transport, backend):
    # Two threaded uploads on one keep-alive connection, then a download;
    # over TLS the thread decrypts, and nothing trips the guard.
    size = 20 * MiB + 123
    if backend == "file":
        _, target = sparseFileTicket(tlsServer, tmp_path, "f1", size)
    else:
        tlsServer.addTicket("f1", size=size)
    data = os.urandom(size)
    before = SocketReader.bodies
    trips = handoff.Guard.trips

    def run():
        con = connection(tlsServer, transport)
        out = [upload(con, "/images/f1", data)]
        out.append(upload(con, "/images/f1", data[:8 * MiB],
                          {"Content-Range": f"bytes 0-{8 * MiB - 1}/*"}))
        con.request("GET", "/images/f1")
        r = con.getresponse()
        out.append((r.status, r.read() == data))
        con.close()
        return out

    results = await threads.deferToThread(run)
    assert results == [(200, b""), (200, b""), (200, True)]
    assert SocketReader.bodies == before + 2
    assert handoff.Guard.trips == trips
    if backend == "file":
        # (O_DIRECT pads the file to the next block with zeroes.)
        assert target.read_bytes()[:size] == data


@pytest_twisted.ensureDeferred
async def test_tls_upload_pipelined_request(tlsServer, tmp_path):
    # The next request is sent with the body, in the same TLS records:
    # the thread reads part of it past the body, and the TLS layer must
    # still deliver it after the hand-back.
    size = 9 * MiB + 17
    _, target = sparseFileTicket(tlsServer, tmp_path, "p1", size)
    data = os.urandom(size)
    before = SocketReader.bodies

    def run():
        sock = tlsSocket(tlsServer)
        sock.sendall(b"PUT /images/p1 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % size + data +
                     b"GET /images/p1 HTTP/1.1\r\nHost: x\r\n"
                     b"Range: bytes=0-99\r\n\r\n")
        first = readResponse(sock, b"")
        second = readResponse(sock, first[2])
        sock.close()
        return first[0], second[0], second[1]

    put, get, body = await threads.deferToThread(run)
    assert (put, get, body) == (200, 206, data[:100])
    assert SocketReader.bodies == before + 1
    assert target.read_bytes()[:size] == data


@pytest_twisted.ensureDeferred
async def test_tls_client_disconnect_mid_body(tlsServer, tmp_path):
    size = 64 * MiB
    ticket, _ = sparseFileTicket(tlsServer, tmp_path, "d1", size,
                                 ops=["write"])
    before = SocketReader.bodies
    sock = await threads.deferToThread(tlsSocket, tlsServer)
    sock.sendall(b"PUT /images/d1 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    await threads.deferToThread(sock.sendall, os.urandom(12 * MiB))
    await _waitFor(lambda: SocketReader.bodies == before + 1)
    sock.close()
    await _waitFor(lambda: not ticket.active, timeout=10)
    con = tlsConnection(tlsServer)
    status, _ = await threads.deferToThread(
        upload, con, "/images/d1", b"z" * MiB,
        {"Content-Range": f"bytes 0-{MiB - 1}/*"})
    con.close()
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_tls_cancel_answers_early(tlsServer):
    # A held backend pauses the thread; a cancel answers 403 early: the
    # thread gives the connection back first, and the answer goes out
    # through the TLS layer.
    tlsServer.addTicket(size=64 * MiB)
    tlsServer.holds["t1"] = ["write"]
    before = SocketReader.bodies
    sock = await threads.deferToThread(tlsSocket, tlsServer)
    sock.sendall(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % (64 * MiB))

    def push():
        sock.settimeout(2)
        sent = 0
        try:
            while sent < 40 * MiB:
                sent += sock.send(b"y" * MiB)
        except (TimeoutError, socket.timeout, ssl.SSLWantWriteError):
            pass
        return sent

    sent = await threads.deferToThread(push)
    assert tlsServer.opened and tlsServer.opened[0].pending
    assert SocketReader.bodies == before + 1
    assert sent < 40 * MiB
    removed = tlsServer.store.remove("t1", 5)
    tlsServer.opened[0].release()
    await removed
    sock.settimeout(10)
    status, _, _ = await threads.deferToThread(readResponse, sock, b"")
    assert status == 403
    sock.close()


# ---------------------------------------------------------------------------
# File uploads written by the reader thread itself.


@pytest.mark.parametrize("transport", ["unix", "tls"])
@pytest_twisted.ensureDeferred
async def test_direct_write_unaligned_range(tlsServer, tmp_path, transport):
    # An unaligned start and end: the head and tail go through the sink
    # (read-modify-write), the blocks between are written by the thread.
    size = 24 * MiB
    ticket, target = sparseFileTicket(tlsServer, tmp_path, "u1", size,
                                      ops=["write"])
    start, length = 12345, 9 * MiB + 777
    data = os.urandom(length)
    before = SocketReader.bodies
    written = []
    real = transfer.UploadSink._wroteDirect

    def recording(self, w):
        written.append(len(w))
        return real(self, w)

    transfer.UploadSink._wroteDirect = recording
    try:
        con = connection(tlsServer, transport)
        status, _ = await threads.deferToThread(
            upload, con, "/images/u1", data,
            {"Content-Range": f"bytes {start}-{start + length - 1}/*"})
        con.close()
    finally:
        transfer.UploadSink._wroteDirect = real
    assert status == 200
    assert SocketReader.bodies == before + 1
    # Nearly all of it went by the thread's own writes.
    assert sum(written) > length - 2 * MiB
    got = target.read_bytes()
    assert got[start:start + length] == data
    assert got[:start] == bytes(start)
    assert got[start + length:size] == bytes(size - start - length)
    assert ticket.transferred() == length


@pytest_twisted.ensureDeferred
async def test_direct_write_cancel(server, tmp_path):
    # A cancel while the thread writes and the client keeps sending: the
    # thread stops within a buffer, the client gets 403, nothing is
    # written past what was sent.
    size = 1024 * MiB
    ticket, target = sparseFileTicket(server, tmp_path, "c1", size,
                                      ops=["write"])
    before = SocketReader.bodies
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(server.unixPath)
    sock.sendall(b"PUT /images/c1 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n" % size)
    sent = 0

    def send():
        nonlocal sent
        try:
            while sent < size:
                sock.sendall(b"c" * MiB)
                sent += MiB
        except OSError:
            pass

    sending = threads.deferToThread(send)
    await _waitFor(lambda: SocketReader.bodies == before + 1)
    await _waitFor(lambda: sent >= 64 * MiB, timeout=30)
    await server.store.remove("c1", 5)
    sock.settimeout(10)
    head = await threads.deferToThread(sock.recv, 65536)
    assert head.startswith(b"HTTP/1.1 403 ")
    sock.close()
    await sending
    assert sent < size
    data = target.read_bytes()
    # (the sendall cut by the close sent part of its MiB)
    assert len(data.rstrip(b"\0")) <= sent + MiB
    assert data.rstrip(b"\0") == b"c" * len(data.rstrip(b"\0"))


@pytest.fixture
def smallFS(tmp_path):
    # A real filesystem that fills up (root: CI and `make test` run as
    # root).
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("transport", ["unix", "tls"])
@pytest_twisted.ensureDeferred
async def test_direct_write_no_space(tlsServer, smallFS, transport):
    # ENOSPC in the thread's own write: 500 with the usual text, the
    # connection closed, the daemon goes on.
    path = smallFS / "full.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    tlsServer.addTicket("n1", size=64 * MiB, url=f"file://{path}")
    before = SocketReader.bodies

    def run():
        con = connection(tlsServer, transport)
        try:
            return upload(con, "/images/n1", b"n" * (16 * MiB))
        except (ConnectionError, BrokenPipeError) as e:
            # The server answered and closed while the body was sent.
            return ("closed", repr(e))
        finally:
            con.close()

    status, body = await threads.deferToThread(run)
    assert SocketReader.bodies == before + 1
    if status != "closed":
        assert status == 500
        assert b"Traceback" not in body
    # The daemon still serves the ticket (reads work).
    con = UnixHTTPConnection(tlsServer.unixPath)
    got = await threads.deferToThread(
        get, con, "/images/n1", {"Range": "bytes=0-3"})
    con.close()
    assert got[0] == 206


class _FakeReader:
    _reactor = reactor
    CREDITS = SocketReader.CREDITS
    diskBuffers = SocketReader.diskBuffers


def test_disk_writer_buffers_reused(tmp_path):
    """
    The next upload's disk writer takes the buffers the last one gave
    back: new mappings cost a page fault and a zeroed page per 4 KiB
    written (a client's upload is a series of 8 MiB PUTs).
    """
    from imageio.backends.file import ThreadTarget
    path = tmp_path / "image"
    path.write_bytes(b"")
    target = ThreadTarget(os.open(path, os.O_RDWR), str(path), 1)
    try:
        first = bodyreader._DiskWriter(_FakeReader(), target)
        used = {id(buf) for buf in first._all}
        assert len(used) == SocketReader.CREDITS
        assert all(len(buf) == bodyreader.DIRECT_SIZE for buf in first._all)
        first.stop()
        second = bodyreader._DiskWriter(_FakeReader(), target)
        assert {id(buf) for buf in second._all} == used
        second.stop()
    finally:
        target.close()
