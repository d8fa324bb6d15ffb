"""
Threaded response bodies (imageio.web.bodywriter): downloads over real TCP
and unix sockets (threaded) and TLS (not threaded), with keep-alive after
them, client disconnects, a ticket cancel and a stalled client while the
thread owns the socket.

The clients are blocking (http.client, ssl) and run in threads, so the
reactor serving them keeps running.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from imageio.config import TLS
from imageio.tls import tlsOptions
from imageio.units import MiB
from imageio.web import bodywriter, handoff, readahead
from imageio.web.bodywriter import SocketWriter

from test.support import UnixHTTPConnection, makePKI
from test.test_images import Server, pattern, sleep, _waitFor  # noqa: F401


SIZE = 24 * MiB + 4321


@pytest.fixture
def tlsServer(tmp_path):
    pki = makePKI(str(tmp_path / "pki"))
    opts = tlsOptions(TLS(enable=True, key_file=pki.key, cert_file=pki.cert))
    srv = Server(tmp_path)
    srv.pki = pki
    try:
        srv.tlsPort = reactor.listenSSL(0, srv.site, opts,
                                        interface="127.0.0.1")
    except BaseException:
        pytest_twisted.blockon(defer.ensureDeferred(srv.close()))
        raise
    try:
        yield srv
    finally:
        try:
            pytest_twisted.blockon(srv.tlsPort.stopListening())
        finally:
            pytest_twisted.blockon(defer.ensureDeferred(srv.close()))


def fileTicket(server, tmp_path, uuid="f1", size=SIZE, **kw):
    data = os.urandom(size)
    path = tmp_path / f"{uuid}.raw"
    path.write_bytes(data)
    server.addTicket(uuid, size=size, url=f"file://{path}", **kw)
    return data


def sparseFileTicket(server, tmp_path, uuid, size, **kw):
    """
    A ticket on a new sparse file of C{size} bytes (reads give zeroes,
    nothing is allocated); for downloads and uploads too large to keep.
    """
    path = tmp_path / f"{uuid}.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return server.addTicket(uuid, size=size, url=f"file://{path}", **kw), path


def tcpConnection(server, timeout=30):
    return http.client.HTTPConnection("127.0.0.1", server.address[1],
                                      timeout=timeout)


def tlsConnection(server, timeout=30):
    ctx = ssl.create_default_context(cafile=server.pki.ca)
    return http.client.HTTPSConnection(
        "127.0.0.1", server.tlsPort.getHost().port, context=ctx,
        timeout=timeout)


def get(con, path, headers=None):
    con.request("GET", path, headers=headers or {})
    r = con.getresponse()
    return r.status, r.read()


def sequence(con, uuid, data):
    """
    On one keep-alive connection: a full download, an unaligned range, a
    small range (Twisted's path) and an OPTIONS.
    """
    out = []
    out.append(get(con, f"/images/{uuid}") == (200, data))
    first, last = 12345, 12345 + 5 * MiB - 1
    out.append(get(con, f"/images/{uuid}",
                   {"Range": f"bytes={first}-{last}"})
               == (206, data[first:last + 1]))
    out.append(get(con, f"/images/{uuid}", {"Range": "bytes=7-1030"})
               == (206, data[7:1031]))
    con.request("OPTIONS", f"/images/{uuid}")
    r = con.getresponse()
    r.read()
    out.append(r.status == 200)
    con.close()
    return out


# ---------------------------------------------------------------------------
# Downloads


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_file_keep_alive(tlsServer, tmp_path, transport,
                               monkeypatch):
    # File regions, read and sent by the thread. The file is opened again
    # by the thread, never in the reactor (an open on a hung mount
    # blocks).
    data = fileTicket(tlsServer, tmp_path)
    bodies, regions = SocketWriter.bodies, SocketWriter.regions
    opened = []
    reopen = readahead.reopen
    openDirect = readahead.openDirect
    monkeypatch.setattr(readahead, "reopen", lambda fd: (
        opened.append(threading.current_thread().name), reopen(fd))[1])
    monkeypatch.setattr(readahead, "openDirect", lambda fd: (
        opened.append(threading.current_thread().name), openDirect(fd))[1])
    con = (UnixHTTPConnection(tlsServer.unixPath) if transport == "unix"
           else tcpConnection(tlsServer))
    results = await threads.deferToThread(sequence, con, "f1", data)
    assert results == [True] * 4
    assert SocketWriter.bodies == bodies + 2
    assert SocketWriter.regions > regions
    assert len(opened) >= 2
    assert set(opened) == {"imageio-writer"}


@pytest_twisted.ensureDeferred
async def test_tcp_memory_backend(tlsServer):
    # A plain socket, bytes rather than file regions.
    data = pattern(6 * MiB)
    tlsServer.addTicket("m2", data=data)
    regions = SocketWriter.regions
    con = http.client.HTTPConnection("127.0.0.1", tlsServer.address[1],
                                     timeout=30)
    results = await threads.deferToThread(sequence, con, "m2", data)
    assert results == [True] * 4
    assert SocketWriter.regions == regions


@pytest_twisted.ensureDeferred
async def test_fallback_when_too_many_writers(tlsServer, tmp_path,
                                              monkeypatch):
    data = fileTicket(tlsServer, tmp_path)
    monkeypatch.setattr(bodywriter._slots, "limit", 0)
    before = SocketWriter.bodies
    results = await threads.deferToThread(
        sequence, UnixHTTPConnection(tlsServer.unixPath), "f1", data)
    assert results == [True] * 4
    assert SocketWriter.bodies == before


def _readSome(con, path, nbytes):
    con.request("GET", path)
    r = con.getresponse()
    assert r.status == 200
    return r.read(nbytes)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_client_disconnect(tlsServer, tmp_path, transport):
    size = 256 * MiB
    ticket, _ = sparseFileTicket(tlsServer, tmp_path, "b1", size,
                                 ops=["read"])
    if transport == "tcp":
        con = tcpConnection(tlsServer)
    else:
        con = UnixHTTPConnection(tlsServer.unixPath)
    got = await threads.deferToThread(_readSome, con, "/images/b1", MiB)
    assert got == bytes(MiB)
    con.sock.shutdown(socket.SHUT_RDWR)
    con.close()
    # The operation ends and the connection's backend is released.
    await _waitFor(lambda: not ticket.active, timeout=10)
    assert ticket.transferred() < size
    # The server is fine: a new connection downloads a range.
    if transport == "tcp":
        con = tcpConnection(tlsServer)
    else:
        con = UnixHTTPConnection(tlsServer.unixPath)
    status, body = await threads.deferToThread(
        get, con, "/images/b1", {"Range": f"bytes=0-{8 * MiB - 1}"})
    con.close()
    assert (status, body) == (206, bytes(8 * MiB))


@pytest_twisted.ensureDeferred
async def test_cancel_while_client_stalls(tlsServer, tmp_path):
    # As on Twisted's path (test_images.test_cancel_download): a cancel
    # waits for the running download, which stops at its next chunk once
    # the client reads again; the connection is then aborted.
    size = 512 * MiB
    ticket, _ = sparseFileTicket(tlsServer, tmp_path, "c1", size,
                                 ops=["read"])
    con = tcpConnection(tlsServer)

    def stall():
        # Read the response head, then stop reading: the socket buffers
        # fill and the writer thread waits in poll().
        con.request("GET", "/images/c1")
        r = con.getresponse()
        return r

    response = await threads.deferToThread(stall)
    assert response.status == 200
    await _waitFor(lambda: ticket.transferred() > 0, timeout=10)
    await sleep(0.3)
    removed = tlsServer.store.remove("c1", 10)
    await sleep(0.3)
    assert not removed.called
    assert ticket.active

    def drain():
        got = 0
        try:
            while True:
                chunk = response.read(MiB)
                if not chunk:
                    break
                got += len(chunk)
        except (OSError, http.client.HTTPException):
            pass
        return got

    assert await threads.deferToThread(drain) < 64 * MiB
    await removed
    assert not ticket.active
    assert ticket.transferred() < 64 * MiB
    con.close()


@pytest_twisted.ensureDeferred
async def test_stalled_client_times_out(tlsServer, tmp_path):
    size = 512 * MiB
    ticket, _ = sparseFileTicket(tlsServer, tmp_path, "s1", size,
                                 ops=["read"], inactivity_timeout=1)
    sock = socket.create_connection(("127.0.0.1", tlsServer.address[1]))
    sock.sendall(b"GET /images/s1 HTTP/1.1\r\nHost: x\r\n\r\n")
    # Never read: the thread's poll() gives up after the ticket's
    # inactivity timeout, and the operation ends.
    await _waitFor(lambda: ticket.transferred() > 0, timeout=10)
    await _waitFor(lambda: not ticket.active, timeout=10)
    assert ticket.transferred() < size
    sock.close()


def test_pageCacheSource(tmp_path):
    from imageio.backends.file import FileBackend
    path = tmp_path / "f.raw"
    path.write_bytes(b"x" * 8192)
    regular = FileBackend(reactor, None, os.open(path, os.O_RDONLY),
                          str(path), mode="r")
    fd = regular.pageCacheSource()
    try:
        # A duplicate of its own, which the writer thread opens again
        # through the page cache (and not in the reactor: an open on a
        # hung mount blocks).
        assert fd is not None and fd != regular._fd
        assert os.fstat(fd).st_ino == os.fstat(regular._fd).st_ino
        again = readahead.reopen(fd)
        try:
            assert fcntlFlags(again) & os.O_DIRECT == 0
            assert os.pread(again, 4, 0) == b"xxxx"
        finally:
            os.close(again)
    finally:
        os.close(fd)
    # Never for a block device: a shared LUN may be written by another
    # host, and our page cache would serve stale pages.
    block = FileBackend(reactor, None, os.open(path, os.O_RDONLY),
                        str(path), mode="r", isBlock=True)
    assert block.pageCacheSource() is None
    os.close(regular._fd)
    os.close(block._fd)


def fcntlFlags(fd):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


@pytest_twisted.ensureDeferred
async def test_reading_stays_off_while_thread_writes(tlsServer, tmp_path,
                                                     monkeypatch):
    # The channel (or anything else) resuming the transport while the
    # thread owns the socket must not make Twisted read it (over TLS its
    # TLS layer would use the OpenSSL object concurrently).
    data = fileTicket(tlsServer, tmp_path, size=48 * MiB)
    writers = []
    start = SocketWriter._handOff

    def recording(self):
        writers.append(self)
        return start(self)

    monkeypatch.setattr(SocketWriter, "_handOff", recording)
    con = tcpConnection(tlsServer)

    def slowGet():
        con.request("GET", "/images/f1")
        r = con.getresponse()
        got = bytearray()
        while True:
            chunk = r.read(MiB)
            if not chunk:
                break
            got += chunk
            time.sleep(0.005)
        return r.status, bytes(got)

    d = threads.deferToThread(slowGet)
    await _waitFor(lambda: writers, timeout=10)
    writer = writers[0]
    readers = []
    while not d.called:
        writer._tls.resumeProducing()
        writer._raw.startReading()
        if writer._result is None:
            # Still the thread's: Twisted does not read.
            readers.append(writer._raw in reactor.getReaders())
        await sleep(0.01)
    status, got = await d
    con.close()
    assert (status, got == data) == (200, True)
    assert len(readers) > 10 and not any(readers)
    # Handed back: keep-alive reads again.
    assert writer._raw in reactor.getReaders()


@pytest_twisted.ensureDeferred
async def test_tls_keep_alive(tlsServer, tmp_path):
    # Over TLS the thread encrypts the bodies of large downloads; the
    # connection goes back to Twisted after each (keep-alive, small
    # ranges, OPTIONS), and nothing trips the guard.
    data = fileTicket(tlsServer, tmp_path)
    before = SocketWriter.bodies
    trips = handoff.Guard.trips
    results = await threads.deferToThread(
        sequence, tlsConnection(tlsServer), "f1", data)
    assert results == [True] * 4
    assert SocketWriter.bodies == before + 2
    assert handoff.Guard.trips == trips


@pytest_twisted.ensureDeferred
async def test_tls_memory_backend(tlsServer):
    data = os.urandom(SIZE)
    tlsServer.addTicket("m1", data=data)
    before = SocketWriter.bodies
    results = await threads.deferToThread(
        sequence, tlsConnection(tlsServer), "m1", data)
    assert results == [True] * 4
    assert SocketWriter.bodies == before + 2


@pytest_twisted.ensureDeferred
async def test_tls_handoff_from_clean_stack(tlsServer, tmp_path,
                                            monkeypatch):
    # The first body write of a keep-alive request whose backend read is
    # already done runs inside the TLS layer's dataReceived; the hand-off
    # must wait for a clean reactor stack (TLS-HANDOFF.md, rule 1).
    import traceback
    data = fileTicket(tlsServer, tmp_path)
    stacks = []
    handOff = SocketWriter._handOff

    def recording(self):
        stacks.append([f.name for f in traceback.extract_stack()])
        return handOff(self)

    monkeypatch.setattr(SocketWriter, "_handOff", recording)
    results = await threads.deferToThread(
        sequence, tlsConnection(tlsServer), "f1", data)
    assert results == [True] * 4
    assert len(stacks) == 2
    for names in stacks:
        assert "dataReceived" not in names


class _Producer:
    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


class _Calls:
    """
    A reactor that keeps what threads ask it to call, to run them later.
    """

    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))

    def run(self):
        while self.calls:
            f, args = self.calls.pop(0)
            f(*args)


class _SendOnRelease:
    """
    The writer's lock, whose first release by the reactor lets "the thread"
    send everything queued at once: the tightest interleaving of a write
    with the thread.
    """

    def __init__(self, writer):
        self._cond = threading.Condition()
        self._writer = writer
        self.armed = True

    def __enter__(self):
        return self._cond.__enter__()

    def __exit__(self, *exc):
        self._cond.__exit__(*exc)
        if self.armed:
            self.armed = False
            w = self._writer
            with self._cond:
                sent = sum(len(item) for item in w._queue)
                w._queue.clear()
            w._sent(sent)

    def notify(self):
        self._cond.notify()


def test_pause_is_never_left_behind():
    # A write that reaches the high-water mark pauses the producer. If the
    # thread sends everything right after the write queued it, before the
    # reactor pauses, the pause must still be undone: decided after the
    # lock was released, it was not, and the download stopped for good (a
    # curl waiting forever for the rest of its range).
    reactor = _Calls()
    writer = SocketWriter(reactor, None, 64 * MiB, None, None, None)
    writer._started = True
    producer = _Producer()
    writer.registerProducer(producer, True)
    writer._cond = _SendOnRelease(writer)
    writer.write(b"x" * bodywriter.HIGH_WATER)
    assert producer.paused
    reactor.run()
    assert not producer.paused
    assert writer._queued == 0


def test_guard_raises_and_counts():
    guard = handoff.Guard("peer")
    trips = handoff.Guard.trips
    with pytest.raises(handoff.GuardTripped):
        guard.recv(1)
    with pytest.raises(handoff.GuardTripped):
        guard.bio_read(1)
    assert handoff.Guard.trips == trips + 2


def test_drainBIO_takes_everything():
    # A TLS 1.3 handshake leaves session tickets and more in the send BIO
    # than Twisted's one 32 KiB bio_read per flush takes.
    from OpenSSL import SSL
    pki = makePKI(os.path.join(os.environ.get("TMPDIR", "/tmp"),
                               f"pki-drain-{os.getpid()}"))
    sctx = tlsOptions(TLS(enable=True, key_file=pki.key,
                          cert_file=pki.cert)).getContext()
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()

    def pump(a, b):
        while True:
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                return

    for _ in range(4):
        for c in (client, server):
            try:
                c.do_handshake()
            except SSL.WantReadError:
                pass
        pump(client, server)
        pump(server, client)
    sent = 0
    while sent < 100 * 1024:
        # pyOpenSSL's partial-write mode: one 16 KiB record per call.
        sent += server.send(b"x" * (100 * 1024 - sent))
    out = handoff.drainBIO(server)
    assert len(out) > 100 * 1024
    with pytest.raises(SSL.WantReadError):
        server.bio_read(1)


# ---------------------------------------------------------------------------
# The page cache and holes.


def cachedBytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw",
                          "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def dropCache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def countingDownload(con, path):
    # Reads the body without keeping it; returns (status, length, digest).
    con.request("GET", path)
    r = con.getresponse()
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = r.read(MiB)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    con.close()
    return r.status, n, h.hexdigest()


@pytest.mark.parametrize("transport", ["tls", "unix", "tcp",
                                       "tls-buffered", "unix-buffered"])
@pytest_twisted.ensureDeferred
async def test_download_leaves_no_page_cache(tlsServer, tmp_path,
                                             transport, monkeypatch):
    # A host running VMs must not lose its page cache to a backup: after
    # a 1 GiB download (the file's cache dropped first) at most 64 MiB of
    # the image stays cached.
    size = 1024 * MiB
    path = tmp_path / "big.raw"
    block = os.urandom(MiB)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
            h.update(block)
    dropCache(path)
    assert cachedBytes(path) < 8 * MiB
    tlsServer.addTicket("big", size=size, url=f"file://{path}")
    useDirect = _directWorks(path)
    if transport.endswith("-buffered"):
        # Reads through the page cache (a filesystem refusing O_DIRECT),
        # read ahead and dropped behind the cursor.
        monkeypatch.setattr(readahead, "openDirect", lambda fd: None)
        transport = transport.split("-")[0]
        useDirect = False
    con = {"tls": tlsConnection, "tcp": tcpConnection}.get(
        transport, lambda s: UnixHTTPConnection(s.unixPath))(tlsServer)
    regions = SocketWriter.regions
    direct = readahead.DirectReads.bodies
    result = await threads.deferToThread(countingDownload, con,
                                         "/images/big")
    assert result == (200, size, h.hexdigest())
    assert SocketWriter.regions > regions
    # Where O_DIRECT works the thread reads with it.
    assert readahead.DirectReads.bodies == direct + (1 if useDirect
                                                       else 0)
    assert cachedBytes(path) <= 64 * MiB


@pytest.mark.parametrize("transport", ["tls", "unix"])
@pytest_twisted.ensureDeferred
async def test_download_holes(tlsServer, tmp_path, transport):
    # Holes are sent as zeroes without reading them; data around them,
    # unaligned ranges across the edges, all byte for byte.
    size = 40 * MiB
    path = tmp_path / "holes.raw"
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for start, length in ((0, 3 * MiB), (11 * MiB + 4096, 5 * MiB),
                              (33 * MiB, 7 * MiB)):
            piece = os.urandom(length)
            f.seek(start)
            f.write(piece)
            data[start:start + length] = piece
    data = bytes(data)
    tlsServer.addTicket("holes", size=size, url=f"file://{path}")

    def run():
        con = (tlsConnection(tlsServer) if transport == "tls"
               else UnixHTTPConnection(tlsServer.unixPath))
        out = [get(con, "/images/holes") == (200, data)]
        for first, last in ((2 * MiB + 1, 12 * MiB + 7),
                            (15 * MiB, 34 * MiB - 3)):
            out.append(get(con, "/images/holes",
                           {"Range": f"bytes={first}-{last}"})
                       == (206, data[first:last + 1]))
        con.close()
        return out

    regions = SocketWriter.regions
    assert await threads.deferToThread(run) == [True] * 3
    assert SocketWriter.regions > regions


def test_segments(tmp_path):
    path = tmp_path / "seg.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"x" * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = list(readahead.segments(fd, MiB, 15 * MiB))
    finally:
        os.close(fd)
    assert got == [(MiB, 4 * MiB, False), (4 * MiB, 5 * MiB, True),
                   (5 * MiB, 15 * MiB, False)]


def _directWorks(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("transport", ["tls", "unix"])
@pytest_twisted.ensureDeferred
async def test_direct_reads_buffered_fallback(tlsServer, tmp_path,
                                              transport, monkeypatch):
    # Where the filesystem refuses O_DIRECT (tmpfs, some FUSE), the
    # thread reads through the page cache, read ahead and dropped.
    monkeypatch.setattr(readahead, "openDirect", lambda fd: None)
    data = fileTicket(tlsServer, tmp_path, uuid="b1")
    direct = readahead.DirectReads.bodies
    regions = SocketWriter.regions
    con = (tlsConnection(tlsServer) if transport == "tls"
           else UnixHTTPConnection(tlsServer.unixPath))
    results = await threads.deferToThread(sequence, con, "b1", data)
    assert results == [True] * 4
    assert SocketWriter.regions > regions
    assert readahead.DirectReads.bodies == direct


def test_buffers_budget():
    bufs = readahead.Buffers(4096, keep=1, budget=2)
    first = bufs.take()
    second = bufs.tryTake()
    assert second is not None
    assert bufs.out == 2
    # Past the budget only take() gives: a body's first two pieces.
    assert bufs.tryTake() is None
    third = bufs.take()
    assert bufs.out == 3
    for buf in (first, second, third):
        bufs.give(buf)
    assert bufs.out == 0
    assert bufs.tryTake() is not None


def _readAll(reads, size):
    out = bytearray()
    while len(out) < size:
        n, buf, skip = reads.next()
        out += b"\0" * n if buf is None else buf[skip:skip + n]
        if buf is not None:
            reads.give(buf)
    return bytes(out)


def test_direct_reads_depth_within_budget(tmp_path, monkeypatch):
    # A long body reads with DEPTH pieces while the process-wide budget
    # lasts; past it, and for short bodies, two. The bytes are right
    # either way, and every buffer goes back.
    bufs = readahead.Buffers(readahead.DIRECT_CHUNK + readahead.ALIGN,
                             keep=8, budget=readahead.DEPTH + 4)
    monkeypatch.setattr(readahead, "directBuffers", bufs)
    size = readahead.DEEP_SIZE + 12345
    data = os.urandom(size)
    path = tmp_path / "depth.raw"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        short = readahead.DirectReads(fd, 0, readahead.DEEP_SIZE - 1)
        deep = readahead.DirectReads(fd, 0, size)
        past = readahead.DirectReads(fd, 4096 + 7, size)
        assert len(short._all) == 2
        assert len(deep._all) == readahead.DEPTH
        assert len(past._all) == 2
        assert bufs.out == readahead.DEPTH + 4
        assert _readAll(deep, size) == data
        assert _readAll(past, size - 4103) == data[4103:]
        assert _readAll(short, readahead.DEEP_SIZE - 1) == \
            data[:readahead.DEEP_SIZE - 1]
        for reads in (deep, past, short):
            reads.stop()
    finally:
        os.close(fd)
    assert bufs.out == 0
