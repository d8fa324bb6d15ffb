"""
The client's response bodies read by threads (imageio/client/_bodythread.py):
real daemons, real TLS with the test PKI, real qemu-nbd; data compared
byte for byte; the guard never trips; no thread left owning a connection.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import socket
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from imageio.backends import nbd as nbd_backend
from imageio.backends import http as http_backend
from imageio.backends.http import _relay
from imageio.client import _bodythread, _transfer, aio
from imageio.client._errors import ClientError, ServerError
from imageio.units import MiB
from imageio.web.handoff import Guard

from test.support import controlRequest
from test.test_client import NBDServer, qemu_img, start_our_daemon

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")


def _dense(path, size):
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory):
    # No local service: the client stays on TLS.
    tmp = str(tmp_path_factory.mktemp("tlsdaemon"))
    d, handle = start_our_daemon(tmp, extra={"local": {"enable": False}})
    yield handle
    d.stop()


@pytest.fixture(scope="module")
def unix_daemon(tmp_path_factory):
    # A local service: the client moves to the unix socket (plain reads).
    tmp = str(tmp_path_factory.mktemp("unixdaemon"))
    d, handle = start_our_daemon(tmp)
    yield handle
    d.stop()


def _emptyTarget(tmp_path, size):
    """
    An empty raw image of C{size} bytes to upload to.
    """
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(size)
    return dst


def _denseTicket(daemon, tmp_path, size):
    """
    A dense random image of C{size} bytes and a read ticket for it.

    @return: C{(path, url)}.
    """
    src = str(tmp_path / "src.raw")
    _dense(src, size)
    url = daemon.url(daemon.add_ticket("file://" + src, size,
                                       ops=["read"]))
    return src, url


async def _settle():
    # Hand-backs run on later reactor turns.
    for _ in range(100):
        if _bodythread.running() == 0:
            return
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest.mark.parametrize("transport", ["tls", "unix"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_download_threaded(tls_daemon, unix_daemon, tmp_path,
                                 transport, fmt):
    daemon = tls_daemon if transport == "tls" else unix_daemon
    size = 40 * MiB
    src, url = _denseTicket(daemon, tmp_path, size)
    dst = str(tmp_path / f"dst.{fmt}")
    bodies, trips = _bodythread.ResponseReader.bodies, Guard.trips
    await aio.download(url, dst, daemon.pki.ca, fmt=fmt, max_workers=3,
                       reactor=reactor)
    await _settle()
    # 40 MiB in three pieces of at least 4 MiB each.
    assert _bodythread.ResponseReader.bodies - bodies >= 1
    assert Guard.trips == trips
    assert _bodythread.running() == 0
    if fmt == "raw":
        assert filecmp.cmp(src, dst, shallow=False)
    else:
        from test.test_client import compare
        compare(src, dst)


@pytest.mark.parametrize("transport", ["tls", "unix"])
@pytest_twisted.ensureDeferred
async def test_thread_writes_the_local_image(tls_daemon, unix_daemon,
                                             tmp_path, transport):
    # The threads write the local image over NBD themselves: two pieces
    # (128 MiB and 8 MiB) on one connection, so that the second body's
    # thread borrows the NBD connection the first gave back.
    daemon = tls_daemon if transport == "tls" else unix_daemon
    size = 136 * MiB
    src, url = _denseTicket(daemon, tmp_path, size)
    dst = str(tmp_path / "dst.raw")
    targets = _bodythread.ResponseReader.targets
    await aio.download(url, dst, daemon.pki.ca, fmt="raw", max_workers=1,
                       reactor=reactor)
    await _settle()
    assert _bodythread.ResponseReader.targets - targets == 2
    assert _bodythread.running() == 0
    assert filecmp.cmp(src, dst, shallow=False)


class _OneSendServer:
    """
    Plain HTTP for one image in memory, a thread per connection, that
    sends each range response, headers and body, with one C{sendall}: the
    client reads the first body bytes with the headers (our daemon sends
    its headers before the body). C{OPTIONS} is 405 (no features); a
    C{GET} without C{Range} is answered with the length only.
    """

    def __init__(self, data):
        self.data = data
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line:
                    return
                headers = {}
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b""):
                        break
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                if line.startswith(b"OPTIONS"):
                    conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n"
                                 b"Content-Length: 0\r\n\r\n")
                    continue
                if "range" not in headers:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d"
                                 b"\r\n\r\n" % len(self.data))
                    return
                a, b = map(int, headers["range"].split("=")[1].split("-"))
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\n"
                             b"Content-Range: bytes %d-%d/%d\r\n"
                             b"Content-Length: %d\r\n\r\n"
                             % (a, b, len(self.data), b + 1 - a)
                             + self.data[a:b + 1])

    def close(self):
        self._sock.close()


@pytest_twisted.ensureDeferred
async def test_thread_writes_after_the_bytes_read_with_the_headers(
        tmp_path, monkeypatch):
    # Body bytes Twisted read with the headers reach the relay, which
    # holds small pieces: the thread writing the rest to the local image
    # must write after them, not over them. The relay gives them to the
    # sink at the hand-off.
    held = []
    flush = _relay._StreamTo.flush

    def countingFlush(self):
        held.append(self._pendingSize)
        flush(self)

    monkeypatch.setattr(_relay._StreamTo, "flush", countingFlush)
    data = os.urandom(24 * MiB)
    server = _OneSendServer(data)
    image = tmp_path / "dst.raw"
    with open(image, "wb") as f:
        f.truncate(len(data))
    nbd = NBDServer(str(image), "raw", str(tmp_path / "nbd.sock"))
    try:
        src = await http_backend.HTTPBackend.connect(
            reactor, url=f"http://127.0.0.1:{server.port}/image",
            host="127.0.0.1", port=server.port, path="/image", mode="r")
        dst = await nbd_backend.open(reactor, nbd.url, mode="r+")
        targets = _bodythread.ResponseReader.targets
        try:
            for offset in range(0, len(data), 8 * MiB):
                await _transfer._download_piece(
                    src, dst, offset, 8 * MiB, 4 * MiB,
                    _transfer._Operation(None))
            await dst.flush()
        finally:
            await src.close()
            await dst.close()
        await _settle()
        assert _bodythread.ResponseReader.targets - targets == 3
        # Each of the three bodies came with bytes for the relay.
        assert len([n for n in held if n]) == 3, held
        with open(image, "rb") as f:
            assert f.read() == data
    finally:
        server.close()
        nbd.stop()


@pytest_twisted.ensureDeferred
async def test_keep_alive_after_threaded_body(tls_daemon, tmp_path):
    # One connection: a threaded body, then more requests on the same
    # connection (extents, another body, a small read) all see a sane
    # stream.
    size = 24 * MiB
    src, url = _denseTicket(tls_daemon, tmp_path, size)
    client = await aio.ImageioClient.open(url, tls_daemon.pki.ca,
                                          reactor=reactor)
    try:
        bodies = _bodythread.ResponseReader.bodies
        got = []

        class Sink:
            def write(self, data):
                got.append(bytes(data))

        for offset, length in ((0, 16 * MiB), (16 * MiB, 8 * MiB)):
            await client.write_to(Sink(), offset, length)
        buf = bytearray(4096)
        await client.read(size - 4096, buf)
        await _settle()
        assert _bodythread.ResponseReader.bodies - bodies == 2
        with open(src, "rb") as f:
            assert b"".join(got) == f.read(24 * MiB)
            f.seek(size - 4096)
            assert bytes(buf) == f.read()
    finally:
        await client.close()
    assert _bodythread.running() == 0


@pytest_twisted.ensureDeferred
async def test_cancel_mid_body(tls_daemon, tmp_path):
    # Cancelling the download while threads own connections: the
    # threads stop, the connections are aborted, nothing trips.
    size = 256 * MiB
    src, url = _denseTicket(tls_daemon, tmp_path, size)
    dst = str(tmp_path / "dst.raw")
    trips = Guard.trips
    seen = []

    def progress(n):
        seen.append(n)
        if sum(seen) >= 8 * MiB and not d.called:
            reactor.callLater(0, d.cancel)

    d = aio.download(url, dst, tls_daemon.pki.ca, fmt="raw",
                     progress=progress, reactor=reactor)
    with pytest.raises((defer.CancelledError, ClientError)):
        await d
    await _settle()
    assert 0 < sum(seen) < size
    assert _bodythread.running() == 0
    assert Guard.trips == trips
    # The daemon is fine.
    back = str(tmp_path / "back.raw")
    await aio.download(url, back, tls_daemon.pki.ca, fmt="raw",
                       reactor=reactor)
    assert filecmp.cmp(src, back, shallow=False)


@pytest_twisted.ensureDeferred
async def test_server_dies_mid_body(tmp_path):
    # The server goes away while threads read: one line naming the
    # download, no thread left.
    d, daemon = start_our_daemon(str(tmp_path / "d"),
                                 extra={"local": {"enable": False}})
    try:
        size = 512 * MiB
        src, url = _denseTicket(daemon, tmp_path, size)
        seen = []

        def progress(n):
            seen.append(n)
            if len(seen) == 1:
                os.kill(d.proc.pid, signal.SIGKILL)

        with pytest.raises(ClientError) as e:
            await aio.download(url, str(tmp_path / "dst.raw"),
                               daemon.pki.ca, fmt="raw", progress=progress,
                               reactor=reactor)
        assert "download of" in str(e.value)
        assert "\n" not in str(e.value)
        await _settle()
        assert _bodythread.running() == 0
    finally:
        d.stop()


@pytest.mark.parametrize("transport", ["tls", "unix"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_upload_threaded(tls_daemon, unix_daemon, tmp_path, transport,
                               fmt):
    daemon = tls_daemon if transport == "tls" else unix_daemon
    size = 40 * MiB
    raw = str(tmp_path / "src.raw")
    _dense(raw, size)
    src = raw
    if fmt == "qcow2":
        src = str(tmp_path / "src.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, src)
    dst = _emptyTarget(tmp_path, size)
    url = daemon.url(daemon.add_ticket("file://" + dst, size,
                                       ops=["write"]))
    bodies, trips = _bodythread.RequestWriter.bodies, Guard.trips
    await aio.upload(src, url, daemon.pki.ca, max_workers=3,
                     reactor=reactor)
    await _settle()
    assert _bodythread.RequestWriter.bodies - bodies >= 1
    assert Guard.trips == trips
    assert _bodythread.running() == 0
    assert filecmp.cmp(raw, dst, shallow=False)


@pytest_twisted.ensureDeferred
async def test_upload_every_piece_threaded(tls_daemon, tmp_path,
                                           monkeypatch):
    # An nbd ticket offers several writers: four pieces on four
    # connections opened together, three of which start their body while
    # their TLS handshake still runs. Each body still goes to a writer
    # thread once its handshake is done (before, only the piece on the
    # connection kept from OPTIONS did).
    monkeypatch.setattr(_transfer, "MAX_COPY_SIZE", 24 * MiB)
    size = 96 * MiB
    src = str(tmp_path / "src.raw")
    _dense(src, size)
    dst = _emptyTarget(tmp_path, size)
    nbd = NBDServer(dst, "raw", str(tmp_path / "nbd.sock"))
    try:
        url = tls_daemon.url(tls_daemon.add_ticket(nbd.url, size,
                                                   ops=["write"]))
        bodies, trips = _bodythread.RequestWriter.bodies, Guard.trips
        await aio.upload(src, url, tls_daemon.pki.ca, max_workers=4,
                         reactor=reactor)
        await _settle()
    finally:
        nbd.stop()
    assert _bodythread.RequestWriter.bodies - bodies == 4
    assert Guard.trips == trips
    assert _bodythread.running() == 0
    assert filecmp.cmp(src, dst, shallow=False)


@pytest_twisted.ensureDeferred
async def test_upload_early_answer(tls_daemon, tmp_path):
    # The server refuses the body after its headers (416: past the
    # ticket's range) while a thread sends it: the server's answer is
    # what the caller gets, and the thread lets go.
    size = 64 * MiB
    src = str(tmp_path / "src.raw")
    _dense(src, size)
    dst = _emptyTarget(tmp_path, size)
    url = tls_daemon.url(tls_daemon.add_ticket("file://" + dst, 4 * MiB,
                                               ops=["write"]))
    trips = Guard.trips
    bodies = _bodythread.RequestWriter.bodies
    early = _bodythread.RequestWriter.early
    with pytest.raises(ServerError) as e:
        await aio.upload(src, url, tls_daemon.pki.ca, max_workers=1,
                         reactor=reactor)
    assert e.value.code == 416
    assert "out of allowed range" in str(e.value)
    await _settle()
    assert _bodythread.RequestWriter.bodies > bodies
    # The thread saw the answer and stopped sending.
    assert _bodythread.RequestWriter.early > early
    assert _bodythread.running() == 0
    assert Guard.trips == trips


@pytest_twisted.ensureDeferred
async def test_upload_ticket_removed_mid_body(tls_daemon, tmp_path):
    # The ticket goes while threads send: one line naming the upload, no
    # thread left, the daemon still serves.
    size = 512 * MiB
    src = str(tmp_path / "src.raw")
    _dense(src, size)
    dst = _emptyTarget(tmp_path, size)
    ticket = tls_daemon.add_ticket("file://" + dst, size, ops=["write"])
    url = tls_daemon.url(ticket)
    trips = Guard.trips
    seen = []
    removing = []

    def progress(n):
        seen.append(n)
        if sum(seen) >= 16 * MiB and not removing:
            removing.append(threads.deferToThread(
                controlRequest, tls_daemon.control, "DELETE",
                f"/tickets/{ticket}"))

    with pytest.raises(ClientError) as e:
        await aio.upload(src, url, tls_daemon.pki.ca, progress=progress,
                         reactor=reactor)
    assert "upload of" in str(e.value)
    assert "\n" not in str(e.value)
    await removing[0]
    await _settle()
    assert sum(seen) < size
    assert _bodythread.running() == 0
    assert Guard.trips == trips


def test_pool_reuses_idle_threads():
    # Sequential bodies share one thread; a body that comes while every
    # thread is busy gets a new one; idle threads exit.
    import threading
    import time
    pool = _bodythread._Pool(idle=0.5)
    ran = []
    gate = threading.Event()
    done = threading.Semaphore(0)

    def job(name, wait=False):
        def run():
            ran.append((name, threading.get_ident()))
            if wait:
                gate.wait(10)
            done.release()
        return run

    pool.run(job("a"))
    assert done.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while pool._idle != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.run(job("b", wait=True))
    # "a"'s thread is idle again and takes one of them; the other needs
    # a second thread ("b" holds one until the gate opens).
    pool.run(job("c"))
    assert done.acquire(timeout=10)
    gate.set()
    assert done.acquire(timeout=10)
    by = dict(ran)
    # Either thread may take either job; one of them is "a"'s.
    assert by["a"] in (by["b"], by["c"])
    assert by["c"] != by["b"]
    assert pool.threads == 2
    deadline = time.monotonic() + 10
    while pool.threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.threads == 0
