"""
Small Range GETs served by the connection's own thread
(imageio.web.readsession), on a real daemon over real TLS and the local
unix socket: the bytes and headers are those Twisted sends, every request
the thread cannot answer is answered by Twisted as if the thread had never
been there, the ticket's bookkeeping and cancel hold, and the connection
comes back to Twisted when idle.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import struct
import time

import pytest

from test.support import (
    Daemon, controlRequest, daemonConf, makePKI, readResponse, writeConf)

MiB = 1024 * 1024
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readsession")
    pki = makePKI(str(tmp / "pki"))
    conf = str(tmp / "conf")
    writeConf(conf, daemonConf(str(tmp), pki))
    image = tmp / "image.raw"
    data = os.urandom(SIZE)
    image.write_bytes(data)
    daemon = Daemon(conf)
    ctl = os.path.join(str(tmp), "run", "sock")
    yield daemon, pki, ctl, image, data
    daemon.stop()
    log = daemon.output()
    assert "Traceback" not in log
    assert "while a body thread owns it" not in log


def addTicket(ctl, image, uuid=None, ops=("read",), **extra):
    uuid = uuid or f"rs-{time.monotonic_ns()}"
    ticket = {"uuid": uuid, "size": SIZE, "ops": list(ops), "timeout": 300,
              "url": f"file://{image}", **extra}
    status, _, body = controlRequest(ctl, "PUT", f"/tickets/{uuid}", ticket)
    assert status == 200, body
    return uuid


def connect(daemon, pki, transport):
    if transport == "tls":
        raw = socket.create_connection(("127.0.0.1", daemon.remotePort))
        ctx = ssl.create_default_context(cafile=pki.ca)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(daemon.addresses["local"].replace("@", "\0", 1)
                     if daemon.addresses["local"].startswith("@")
                     else daemon.addresses["local"])
    sock.settimeout(30)
    return sock


def rangeGet(uuid, first, last, extra=""):
    return (f"GET /images/{uuid} HTTP/1.1\r\nHost: localhost\r\n"
            f"Range: bytes={first}-{last}\r\n{extra}\r\n").encode()


def readFull(sock, buf, isHead=False):
    """
    One response (to a HEAD if C{isHead}): C{(status, headers, body,
    rest)}.
    """
    buf = bytearray(buf)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    headers = [tuple(x.strip() for x in line.split(":", 1))
               for line in head[1:]]
    length = 0 if isHead else int(dict((k.lower(), v) for k, v in headers)
                                  .get("content-length", 0))
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    return (head[0], headers, bytes(buf[:length]), bytes(buf[length:]))


def getRanges(sock, uuid, data, rest=b"", first=0, size=10, times=4):
    """
    C{times} GETs of the same range, checked (enough for a session).

    @return: the bytes read past the last response.
    """
    for _ in range(times):
        sock.sendall(rangeGet(uuid, first, first + size - 1))
        _, _, body, rest = readFull(sock, rest)
        assert body == data[first:first + size]
    return rest


def spreadGets(sock, uuid, data, count=40):
    """
    C{count} GETs of 4 KiB, 64 KiB apart, checked.
    """
    rest = b""
    for i in range(count):
        sock.sendall(rangeGet(uuid, i * 65536, i * 65536 + 4095))
        _, _, body, rest = readFull(sock, rest)
        assert body == data[i * 65536:i * 65536 + 4096]


def transferred(ctl, uuid):
    status, _, body = controlRequest(ctl, "GET", f"/tickets/{uuid}")
    assert status == 200
    return json.loads(body)["transferred"]


def threadCounts(daemon):
    """
    Sessions started, and requests their threads answered, from the log.
    """
    log = daemon.lines
    started = sum("served by a thread" in line for line in log)
    answered = 0
    for line in log:
        if "answered by the thread" in line:
            answered += int(line.rsplit(": ", 1)[1].split()[0])
    return started, answered


def waitFor(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("transport", ["tls", "unix"])
def test_many_reads_same_bytes_and_headers(served, transport):
    """
    Random ranges of 1 byte to 3 MiB on one connection: after the first
    two (Twisted's), the thread answers; the bytes are the image's and the
    headers are Twisted's, the date aside.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    before = threadCounts(daemon)
    sock = connect(daemon, pki, transport)
    rnd = random.Random(7)
    rest = b""
    heads = []
    count = 300
    try:
        for i in range(count):
            size = rnd.choice([1, 512, 4096, 65536, 1 << 20, 3 << 20,
                               rnd.randrange(1, 3 << 20)])
            first = rnd.randrange(0, SIZE - size + 1)
            sock.sendall(rangeGet(uuid, first, first + size - 1))
            line, headers, body, rest = readFull(sock, rest)
            assert line == "HTTP/1.1 206 Partial Content"
            assert body == data[first:first + size], i
            heads.append([(k, v) for k, v in headers if k != "Date"])
            assert heads[-1] == [
                ("Server", heads[0][0][1]),
                ("Content-Length", str(size)),
                ("Content-Type", "application/octet-stream"),
                ("Content-Disposition", "attachment"),
                ("Accept-Ranges", "bytes"),
                ("Content-Range", f"bytes {first}-{first + size - 1}/{SIZE}"),
            ]
            assert [k for k, _ in headers][:2] == ["Server", "Date"]
    finally:
        sock.close()
    waitFor(lambda: threadCounts(daemon)[1] - before[1] >= count - 2)
    started, answered = threadCounts(daemon)
    assert started - before[0] == 1
    assert answered - before[1] == count - 2


def test_unservable_requests_answered_by_twisted(served):
    """
    Whatever the thread does not answer goes to Twisted, on the same
    connection, in order: other methods, a query, an unknown header, a
    range out of the image, a range too large for the thread, another
    ticket, a bad range; then the thread serves again.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    sock = connect(daemon, pki, "tls")
    rest = b""

    def ask(raw, status, body=None):
        nonlocal rest
        sock.sendall(raw)
        line, headers, got, rest = readFull(sock, rest,
                                            raw.startswith(b"HEAD "))
        assert int(line.split()[1]) == status, (raw, line, got)
        if body is not None:
            assert got == body
        return dict((k.lower(), v) for k, v in headers), got

    try:
        for _ in range(3):
            ask(rangeGet(uuid, 0, 99), 206, data[:100])
        ask(f"OPTIONS /images/{uuid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            200)
        ask(rangeGet(uuid, 10, 19), 206, data[10:20])
        ask(f"GET /images/{uuid}?close=n HTTP/1.1\r\nHost: x\r\n"
            f"Range: bytes=5-9\r\n\r\n".encode(), 206, data[5:10])
        ask(rangeGet(uuid, 10, 19), 206, data[10:20])
        headers, _ = ask(rangeGet(uuid, 0, 9, "Origin: http://a\r\n"), 206,
                         data[:10])
        assert headers["access-control-allow-origin"] == "*"
        ask(rangeGet(uuid, 10, 19), 206, data[10:20])
        ask(rangeGet(uuid, SIZE - 10, SIZE + 10), 416)
        ask(rangeGet(uuid, 10, 19), 206, data[10:20])
        ask(rangeGet(uuid, 0, 5 * MiB - 1), 206, data[:5 * MiB])
        ask(rangeGet(uuid, 10, 19), 206, data[10:20])
        ask(rangeGet(uuid, 30, 20), 416)
        ask(f"GET /images/{uuid} HTTP/1.1\r\nHost: x\r\n"
            f"Range: bytes=-10\r\n\r\n".encode(), 416,
            b"suffix-byte-range-spec not supported yet\n")
        ask(f"HEAD /images/{uuid} HTTP/1.1\r\nHost: x\r\n"
            f"Range: bytes=0-9\r\n\r\n".encode(), 206)
        ask(rangeGet(uuid, 10, 19), 206, data[10:20])
        ask(rangeGet(uuid, 0, 9, "Connection: close\r\n"), 206, data[:10])
        assert sock.recv(1) == b""
        sock.close()
        sock = connect(daemon, pki, "tls")
        rest = b""
        for _ in range(3):
            ask(rangeGet(uuid, 0, 99), 206, data[:100])
        # Refused, and closed (as the reference does after a 403).
        ask(rangeGet("no-such-ticket", 0, 9), 403)
        assert sock.recv(1) == b""
    finally:
        sock.close()


@pytest.mark.parametrize("transport", ["tls", "unix"])
def test_pipelined(served, transport):
    """
    Requests sent together, some for the thread and some not, are answered
    in order.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    sock = connect(daemon, pki, transport)
    rest = b""
    try:
        rest = getRanges(sock, uuid, data, rest, times=3)
        ranges = [(i * 1000, i * 1000 + 4095) for i in range(20)]
        wire = b"".join(
            rangeGet(uuid, a, b) if i % 7 != 3 else
            f"OPTIONS /images/{uuid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            for i, (a, b) in enumerate(ranges))
        sock.sendall(wire)
        for i, (a, b) in enumerate(ranges):
            line, _, body, rest = readFull(sock, rest)
            if i % 7 == 3:
                assert line.split()[1] == "200"
            else:
                assert line.split()[1] == "206"
                assert body == data[a:b + 1]
    finally:
        sock.close()


def test_transferred_counts_thread_reads(served):
    """
    The ranges the thread answered count in the ticket's transferred
    bytes and extend it, as Twisted's do.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    sock = connect(daemon, pki, "tls")
    try:
        spreadGets(sock, uuid, data)
    finally:
        sock.close()
    waitFor(lambda: transferred(ctl, uuid) == 40 * 4096)


def test_cancel_waits_for_thread(served):
    """
    Deleting the ticket while a thread serves its connection completes
    promptly; the connection's next request is refused by Twisted.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    before = threadCounts(daemon)[0]
    sock = connect(daemon, pki, "tls")
    rest = b""
    try:
        rest = getRanges(sock, uuid, data, rest)
        assert threadCounts(daemon)[0] == before + 1
        start = time.monotonic()
        status, _, body = controlRequest(ctl, "DELETE", f"/tickets/{uuid}")
        assert status == 204, body
        assert time.monotonic() - start < 2
        sock.sendall(rangeGet(uuid, 0, 9))
        line, _, body, rest = readFull(sock, rest)
        assert line.split()[1] == "403", body
    finally:
        sock.close()


def test_idle_connection_goes_back(served):
    """
    Idle for a while, the connection is Twisted's again: its idle timeout
    (the ticket's inactivity timeout) closes it.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image, inactivity_timeout=2)
    sock = connect(daemon, pki, "tls")
    rest = b""
    try:
        rest = getRanges(sock, uuid, data, rest)
        time.sleep(1.5)
        sock.sendall(rangeGet(uuid, 20, 29))
        _, _, body, rest = readFull(sock, rest)
        assert body == data[20:30]
        start = time.monotonic()
        assert sock.recv(1) == b""
        assert 1.5 < time.monotonic() - start < 10
    finally:
        sock.close()


@pytest.mark.parametrize("how", ["close", "reset", "half"])
def test_client_gone(served, how):
    """
    A client that goes away while the thread owns its connection (between
    requests, or after sending half a request head) costs nothing else:
    the daemon serves the next connection.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    sock = connect(daemon, pki, "tls")
    rest = b""
    rest = getRanges(sock, uuid, data)
    if how == "half":
        sock.sendall(rangeGet(uuid, 0, 9)[:20])
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))
    sock.close()
    sock = connect(daemon, pki, "tls")
    try:
        rest = getRanges(sock, uuid, data, b"", first=100, size=100)
    finally:
        sock.close()


def test_replaced_ticket(served, tmp_path):
    """
    A ticket replaced (PUT with the same uuid, another image) while a
    thread serves its connection: the next request reads the new image.
    """
    daemon, pki, ctl, image, data = served
    uuid = addTicket(ctl, image)
    other = tmp_path / "other.raw"
    otherData = os.urandom(SIZE)
    other.write_bytes(otherData)
    sock = connect(daemon, pki, "tls")
    rest = b""
    try:
        rest = getRanges(sock, uuid, data, rest)
        addTicket(ctl, other, uuid=uuid)
        sock.sendall(rangeGet(uuid, 0, 9))
        _, _, body, rest = readFull(sock, rest)
        assert body == otherData[:10]
    finally:
        sock.close()


def test_workers(tmp_path):
    """
    With worker processes the thread serves in the worker, and the main
    process's ticket hears of every answered range and of the session's
    end: transferred counts them, and a cancel completes promptly.
    """
    pki = makePKI(str(tmp_path / "pki"))
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki,
                               extra={"daemon": {"workers": 2}}))
    image = tmp_path / "image.raw"
    data = os.urandom(SIZE)
    image.write_bytes(data)
    daemon = Daemon(conf)
    ctl = os.path.join(str(tmp_path), "run", "sock")
    try:
        uuid = addTicket(ctl, image)
        sock = connect(daemon, pki, "tls")
        try:
            spreadGets(sock, uuid, data)
            waitFor(lambda: transferred(ctl, uuid) == 40 * 4096)
            assert threadCounts(daemon)[0] == 1
            start = time.monotonic()
            status, _, body = controlRequest(ctl, "DELETE",
                                             f"/tickets/{uuid}")
            assert status == 204, body
            assert time.monotonic() - start < 2
        finally:
            sock.close()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.output()
