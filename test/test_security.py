# -*- test-case-name: test.test_security -*-
"""
Security properties: the control API is only on the control service, the
control socket is 0660, a ticket id grants exactly its ops, nothing is
written past a ticket's size, TLS refuses old protocols and weak ciphers,
and error bodies never leak paths, tracebacks or object reprs.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time

import pytest
import pytest_twisted

from imageio.units import MiB

from test import support
from test.test_images import (  # noqa: F401 (fixture)
    connect, pattern, request, server)

OPENSSL = shutil.which("openssl")


def assertNoLeak(body: bytes, *secrets: str) -> None:
    text = body.decode("utf-8", "replace")
    for bad in ("Traceback", "File \"", " object at 0x", "<", "Error(",
                *secrets):
        assert bad not in text, body
    assert len(body) < 512, body


# ---------------------------------------------------------------------------
# A real daemon (TLS remote, abstract local socket, unix control socket)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("secdaemon"))
    pki = support.makePKI(os.path.join(tmp, "pki"))
    conf = os.path.join(tmp, "conf")
    sections = support.daemonConf(tmp, pki)
    support.writeConf(conf, sections)
    d = support.Daemon(conf)
    d.pki = pki
    d.controlSocket = sections["control"]["socket"]
    d.localSocket = sections["local"]["socket"]
    try:
        yield d
    finally:
        d.stop()


CONTROL_REQUESTS = [
    ("GET", "/tickets/x", None), ("PUT", "/tickets/x",
                                  b'{"uuid": "x", "size": 1, "ops": ["read"],'
                                  b' "timeout": 300, "url": "file:///etc/'
                                  b'passwd"}'),
    ("PATCH", "/tickets/x", b'{"timeout": 300}'), ("DELETE", "/tickets/x",
                                                   None),
    ("DELETE", "/tickets/", None), ("GET", "/tickets/", None),
    ("GET", "/metrics", None), ("POST", "/profile/?run=y", None),
]


@pytest.mark.parametrize("method,path,body", CONTROL_REQUESTS)
def test_control_api_not_on_remote(daemon, method, path, body):
    con = support.httpsConnection(daemon.remotePort, daemon.pki.ca)
    try:
        status, _, data = support.request(con, method, path, body)
    finally:
        con.close()
    assert status == 404, (status, data)
    assertNoLeak(data)


@pytest.mark.parametrize("method,path,body", CONTROL_REQUESTS)
def test_control_api_not_on_local(daemon, method, path, body):
    con = support.UnixHTTPConnection(daemon.localSocket)
    try:
        status, _, data = support.request(con, method, path, body)
    finally:
        con.close()
    assert status == 404, (status, data)


def test_ticket_from_remote_never_installed(daemon):
    # After all the attempts above, the control service knows no ticket x.
    status, _, _ = support.controlRequest(daemon.controlSocket, "GET",
                                          "/tickets/x")
    assert status == 404


def test_control_socket_mode(daemon):
    st = os.stat(daemon.controlSocket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


# ---------------------------------------------------------------------------
# TLS scan of the remote port


def _sclient(port, *args):
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    res = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief",
         *args], input=b"", capture_output=True, timeout=20)
    out = (res.stdout + res.stderr).decode("utf-8", "replace")
    ok = res.returncode == 0 and "Cipher is (NONE)" not in out and (
        "CONNECTION ESTABLISHED" in out or "Protocol version" in out)
    return ok, out


# (SSLv3 is compiled out of Debian's openssl: no client here can offer it.)
@pytest.mark.parametrize("version,accepted", [
    ("-tls1", False), ("-tls1_1", False),
    ("-tls1_2", True), ("-tls1_3", True)])
def test_tls_versions(daemon, version, accepted):
    # SECLEVEL=0 so the client offers old protocols: the server must refuse.
    args = [version]
    if version != "-tls1_3":
        args += ["-cipher", "ALL:@SECLEVEL=0"]
    ok, out = _sclient(daemon.remotePort, *args)
    assert ok == accepted, out
    if not accepted:
        # Refused by the server, not by the client's own configuration.
        assert "no protocols available" not in out, out
        assert "alert" in out or "unsupported protocol" in out, out


# Suites Debian's openssl can still offer. RC4, 3DES, EXPORT and LOW are
# compiled out of it, so no client here can offer them; the server's own
# cipher list is checked for those instead (test_tls_server_cipher_list).
@pytest.mark.parametrize("cipher", [
    "NULL", "eNULL", "aNULL", "ADH", "AECDH", "MD5"])
def test_tls_weak_ciphers(daemon, cipher):
    assert subprocess.run([OPENSSL, "ciphers", f"{cipher}:@SECLEVEL=0"],
                          capture_output=True).returncode == 0
    ok, out = _sclient(daemon.remotePort, "-tls1_2", "-cipher",
                       f"{cipher}:@SECLEVEL=0")
    assert not ok, out


def test_tls_plain_http_refused(daemon):
    # Plain HTTP on the TLS port: no HTTP answer, the connection closes.
    with socket.create_connection(("127.0.0.1", daemon.remotePort),
                                  timeout=10) as s:
        s.sendall(b"GET /images/x HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert b"HTTP/1.1" not in data


# ---------------------------------------------------------------------------
# A ticket id grants its ops and nothing more


SIZE = 1 * MiB

OPERATIONS = [
    # (name, method, path suffix, headers, body, needs)
    ("get", "GET", "", {}, b"", "read"),
    ("get range", "GET", "", {"Range": "bytes=0-9"}, b"", "read"),
    ("head", "HEAD", "", {}, b"", "read"),
    ("options", "OPTIONS", "", {}, b"", "read"),
    ("extents", "GET", "/extents", {}, b"", "read"),
    ("checksum", "GET", "/checksum", {}, b"", "read"),
    ("put", "PUT", "", {}, b"EVIL", "write"),
    ("put range", "PUT", "", {"Content-Range": "bytes 100-103/*"}, b"EVIL",
     "write"),
    ("put chunked", "PUT", "", {"Transfer-Encoding": "chunked"},
     b"4\r\nEVIL\r\n0\r\n\r\n", "write"),
    ("zero", "PATCH", "", {}, b'{"op": "zero", "size": 4096}', "write"),
    ("flush", "PATCH", "", {}, b'{"op": "flush"}', "write"),
]

KINDS = ["wrong", "expired", "canceled", "read-only", "write-only"]


def _makeTicket(server, kind, data):
    if kind == "wrong":
        server.addTicket("real", data=data)
        return "t1x"
    if kind == "expired":
        server.addTicket("t1", data=data, timeout=0)
    elif kind == "canceled":
        ticket = server.addTicket("t1", data=data)
        ticket.cancel(0)
    elif kind == "read-only":
        server.addTicket("t1", data=data, ops=["read"])
    elif kind == "write-only":
        server.addTicket("t1", data=data, ops=["write"])
    return "t1"


@pytest.mark.parametrize("kind", KINDS)
@pytest_twisted.ensureDeferred
async def test_ticket_grants_only_its_ops(server, kind):
    data = pattern(SIZE)
    ticketId = _makeTicket(server, kind, data)
    for name, method, suffix, headers, body, needs in OPERATIONS:
        r = await request(server.address, method,
                          f"/images/{ticketId}{suffix}", headers, body)
        if kind in ("wrong", "expired", "canceled"):
            allowed = False
        elif kind == "read-only":
            allowed = needs == "read"
        else:
            # "write" implies "read" (SPEC B §2).
            allowed = True
        if allowed:
            assert r.status < 300, (kind, name, r)
        else:
            assert r.status == 403, (kind, name, r)
            if name != "checksum":
                # The reference keeps a refused checksum's connection.
                assert r.headers.get("connection") == "close", (name, r)
            if method == "HEAD":
                continue
            assert r.text.startswith(
                "You are not allowed to access this resource: "), r
            assertNoLeak(r.body)
        if kind != "write-only":
            # Nothing was written.
            name_ = "real" if kind == "wrong" else "t1"
            assert bytes(server.images[name_]) == data, (kind, name)
    # The ticket store cannot be reached from here.
    for method in ("GET", "PUT", "DELETE"):
        r = await request(server.address, method, "/tickets/t1",
                          {}, b"{}" if method == "PUT" else b"")
        assert r.status == 404


# ---------------------------------------------------------------------------
# No write past the ticket size


TICKET_SIZE = 1 * MiB
FILE_SIZE = 2 * MiB


@pytest.fixture
def bigFile(tmp_path, server):
    """
    A file larger than the ticket that covers its start.
    """
    path = tmp_path / "disk.raw"
    original = pattern(FILE_SIZE, seed=7)
    path.write_bytes(original)
    server.addTicket("t1", size=TICKET_SIZE, url=f"file://{path}")
    return path, original


BOUNDARY_CASES = [
    ("put across", "PUT", {"Content-Range": f"bytes {TICKET_SIZE - 10}-*/*"},
     b"X" * 20),
    ("put at end", "PUT", {"Content-Range": f"bytes {TICKET_SIZE}-*/*"},
     b"X"),
    ("put past end", "PUT",
     {"Content-Range": f"bytes {TICKET_SIZE + 4096}-*/*"}, b"X" * 10),
    ("put too long", "PUT", {}, b"X" * (TICKET_SIZE + 1)),
    ("zero across", "PATCH", {},
     b'{"op": "zero", "offset": %d, "size": 20}' % (TICKET_SIZE - 10)),
    ("zero at end", "PATCH", {},
     b'{"op": "zero", "offset": %d, "size": 1}' % TICKET_SIZE),
    ("zero huge", "PATCH", {},
     b'{"op": "zero", "offset": 0, "size": %d}' % (2**63 - 1)),
    ("zero offset huge", "PATCH", {},
     b'{"op": "zero", "offset": %d, "size": 1}' % (2**63 - 1)),
]


@pytest.mark.parametrize("name,method,headers,body", BOUNDARY_CASES,
                         ids=[c[0] for c in BOUNDARY_CASES])
@pytest_twisted.ensureDeferred
async def test_no_write_past_ticket(server, bigFile, name, method, headers,
                                    body):
    path, original = bigFile
    r = await request(server.address, method, "/images/t1", headers, body)
    assert r.status == 416, r
    assert r.headers["content-range"] == f"bytes */{TICKET_SIZE}"
    # Refused before writing anything.
    assert path.read_bytes() == original


@pytest.mark.parametrize("offset", [0, TICKET_SIZE - 100000])
@pytest_twisted.ensureDeferred
async def test_chunked_overflow(server, bigFile, offset):
    path, original = bigFile
    client = await connect(server.address)
    d = client.request("PUT", "/images/t1",
                       {"Transfer-Encoding": "chunked",
                        "Content-Range": f"bytes {offset}-*/*"},
                       b"", send=False)
    # 64 KiB chunks well past the ticket's end.
    chunk = b"E" * 65536
    total = TICKET_SIZE - offset + 5 * 65536
    sent = 0
    while sent < total:
        client.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
    client.transport.write(b"0\r\n\r\n")
    r = await d
    assert r.status == 416, r
    data = path.read_bytes()
    assert len(data) == FILE_SIZE
    # Nothing past the ticket's end changed; before it, only our bytes.
    assert data[TICKET_SIZE:] == original[TICKET_SIZE:]
    assert data[:offset] == original[:offset]
    changed = data[offset:TICKET_SIZE]
    assert set(changed) <= {ord("E")} | set(original[offset:TICKET_SIZE])


# ---------------------------------------------------------------------------
# Error bodies of failing backends


@pytest.mark.parametrize("url", [
    "file:///nonexistent/secret/dir/disk.raw",
    "file:///",
    "nbd:unix:/nonexistent/secret/nbd.sock",
    "nbd:localhost:1",
    "http://127.0.0.1:1/secret/path",
])
@pytest_twisted.ensureDeferred
async def test_backend_error_bodies(server, url):
    server.addTicket("t1", size=4096, url=url)
    for method, suffix, body in [("GET", "", b""),
                                 ("PUT", "", b"x" * 100),
                                 ("OPTIONS", "", b""),
                                 ("GET", "/extents", b""),
                                 ("GET", "/checksum", b""),
                                 ("PATCH", "", b'{"op": "flush"}')]:
        r = await request(server.address, method, "/images/t1" + suffix, {},
                          body)
        assert r.status >= 400, (url, method, r)
        assertNoLeak(r.body, "secret", "nonexistent", "127.0.0.1", "/")
        if r.status == 500:
            assert r.text == ("Server failed to perform the request, "
                              "check logs\n"), r


def test_tls_server_cipher_list(daemon):
    # What the server would accept, whatever the local client can offer
    # (the openssl here has no RC4, 3DES or EXPORT suites to try).
    from OpenSSL import SSL

    from imageio.config import TLS
    from imageio.tls import tlsOptions
    opts = tlsOptions(TLS(enable=True, key_file=daemon.pki.key,
                          cert_file=daemon.pki.cert))
    names = SSL.Connection(opts.getContext(), None).get_cipher_list()
    assert names
    for name in names:
        for weak in ("RC4", "DES", "NULL", "EXP", "MD5", "ADH", "AECDH",
                     "anon", "PSK", "SRP"):
            assert weak not in name, names


# TLS 1.2 suites: forward-secret AEAD only (ECDHE with AES-GCM or
# ChaCha20-Poly1305), as the reference. An RSA server key too, so that the
# RSA key-exchange suites can be offered at all.


@pytest.fixture(scope="module")
def rsaDaemon(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("rsadaemon"))
    pki = support.makePKI(os.path.join(tmp, "pki"), keyType="rsa")
    conf = os.path.join(tmp, "conf")
    support.writeConf(conf, support.daemonConf(tmp, pki))
    d = support.Daemon(conf)
    try:
        yield d
    finally:
        d.stop()


REFUSED_TLS12 = {
    "rsa": ["AES128-SHA", "AES256-SHA", "AES128-GCM-SHA256",
            "AES256-GCM-SHA384", "AES128-SHA256", "AES128-CCM",
            "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-CHACHA20-POLY1305",
            "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"],
    "ec": ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA",
           "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384",
           "ECDHE-ECDSA-AES128-CCM", "ECDHE-ECDSA-AES256-CCM"],
}
ACCEPTED_TLS12 = {
    "rsa": ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-RSA-CHACHA20-POLY1305"],
    "ec": ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
           "ECDHE-ECDSA-CHACHA20-POLY1305"],
}


def _tls12(request, key, cipher):
    d = request.getfixturevalue("rsaDaemon" if key == "rsa" else "daemon")
    out = subprocess.run([OPENSSL, "ciphers", f"{cipher}:@SECLEVEL=0"],
                         capture_output=True)
    assert out.returncode == 0, f"the client cannot offer {cipher}"
    return _sclient(d.remotePort, "-tls1_2", "-cipher",
                    f"{cipher}:@SECLEVEL=0")


@pytest.mark.parametrize("key,cipher", [
    (k, c) for k, cs in REFUSED_TLS12.items() for c in cs])
def test_tls12_refused_suites(request, key, cipher):
    ok, out = _tls12(request, key, cipher)
    assert not ok, out
    assert "alert" in out or "handshake failure" in out, out


@pytest.mark.parametrize("key,cipher", [
    (k, c) for k, cs in ACCEPTED_TLS12.items() for c in cs])
def test_tls12_accepted_suites(request, key, cipher):
    ok, out = _tls12(request, key, cipher)
    assert ok, out
    assert cipher in out, out


def test_tls12_server_cipher_list(daemon):
    # Whatever the local client can offer: every TLS 1.2 suite the server
    # would take is ECDHE with an AEAD cipher.
    from OpenSSL import SSL

    from imageio.config import TLS
    from imageio.tls import tlsOptions
    opts = tlsOptions(TLS(enable=True, key_file=daemon.pki.key,
                          cert_file=daemon.pki.cert))
    names = SSL.Connection(opts.getContext(), None).get_cipher_list()
    tls12 = [n for n in names if not n.startswith("TLS_")]
    assert tls12
    for name in tls12:
        assert name.startswith("ECDHE-"), names
        assert "GCM" in name or "CHACHA20-POLY1305" in name, names


@pytest.mark.parametrize("kind", ["file", "memory"])
@pytest_twisted.ensureDeferred
async def test_chunked_overflow_loop(server, bigFile, kind):
    # Whether the overrun is seen while the body arrives (early answer) or
    # once it all arrived (the renderer answers): 416 every time, never a
    # 500 or a logged traceback.
    from twisted.logger import LogLevel, globalLogPublisher
    path, original = bigFile
    if kind == "memory":
        server.addTicket("m1", size=TICKET_SIZE)
    ticket = "t1" if kind == "file" else "m1"
    events = []

    def observe(event):
        if "log_failure" in event or event.get("log_level") in (
                LogLevel.error, LogLevel.critical):
            events.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        for i in range(40):
            # A chunk inside the range (its write may still be in flight
            # when the next chunk overruns), then the overrunning chunk and
            # the last chunk, all in one small body.
            first = b"E" * (4096 + 512 * (i % 8))
            second = b"E" * (20 + i % 7)
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                            for c in (first, second)) + b"0\r\n\r\n"
            offset = TICKET_SIZE - len(first) - 10
            client = await connect(server.address)
            try:
                # The connection's backend is open: the first chunk's
                # write starts at once.
                r = await client.request("PUT", f"/images/{ticket}",
                                         {"Content-Range": "bytes 0-*/*"},
                                         b"E")
                assert r.status == 200, r
                r = await client.request(
                    "PUT", f"/images/{ticket}",
                    {"Transfer-Encoding": "chunked",
                     "Content-Range": f"bytes {offset}-*/*"}, body)
            finally:
                client.transport.loseConnection()
            assert r.status == 416, (i, r)
            assert r.headers["content-range"] == f"bytes */{TICKET_SIZE}"
            assert r.body == b"Requested range out of allowed range\n"
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not events, [e.get("log_format") for e in events]
    assert path.read_bytes()[TICKET_SIZE:] == original[TICKET_SIZE:]


@pytest_twisted.ensureDeferred
async def test_chunked_overflow_after_body(server, monkeypatch):
    # The overrun is found while a write is in flight, and the body ends
    # before that write returns: the renderer answers. It answered 500
    # with a critical traceback (_Upload.wait called _translate(None)).
    from twisted.logger import LogLevel, globalLogPublisher

    from imageio.web.request import StreamingRequest
    from test.test_images import sleep
    complete = []
    original = StreamingRequest.requestReceived

    def requestReceived(self, *args):
        complete.append(self)
        return original(self, *args)
    monkeypatch.setattr(StreamingRequest, "requestReceived", requestReceived)
    events = []

    def observe(event):
        if "log_failure" in event or event.get("log_level") in (
                LogLevel.error, LogLevel.critical):
            events.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        size = 3 * MiB
        for i in range(10):
            server.addTicket("t1", size=size)
            server.holds["t1"] = ["write"]
            server.opened.clear()
            complete.clear()
            client = await connect(server.address)
            try:
                d = client.request("PUT", "/images/t1",
                                   {"Transfer-Encoding": "chunked"},
                                   b"", send=False)
                # A write's worth (the backend's 1 MiB requests) and more.
                first = b"E" * (2 * MiB + i)
                client.transport.write(b"%x\r\n%s\r\n" % (len(first), first))
                for _ in range(2000):
                    if server.opened and server.opened[0].pending:
                        break
                    await sleep(0.005)
                else:
                    raise AssertionError("no write in flight")
                # Overruns the ticket by 10 bytes, then ends the body.
                second = b"E" * (size - len(first) + 10)
                client.transport.write(b"%x\r\n%s\r\n0\r\n\r\n"
                                       % (len(second), second))
                for _ in range(2000):
                    if complete:
                        break
                    await sleep(0.005)
                else:
                    raise AssertionError("the body did not end")
                server.opened[0].release()
                r = await d
                assert r.status == 416, (i, r)
                assert r.body == b"Requested range out of allowed range\n"
                assert r.headers["content-range"] == f"bytes */{size}"
            finally:
                client.transport.loseConnection()
            # Nothing past the range; only the bytes of the first chunk.
            assert len(server.images["t1"]) == size
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not events, [e.get("log_format") for e in events]


@pytest.mark.parametrize("sparse", [False, True])
@pytest_twisted.ensureDeferred
async def test_patch_zero_without_fast_zero(server, tmp_path, monkeypatch,
                                            sparse):
    # A filesystem without FALLOC_FL_ZERO_RANGE/PUNCH_HOLE (the probe
    # forced to "unsupported"): every zero step is an ordinary one, so a
    # cancel stops a running zero within one step. The first step used to
    # be the whole range (up to 64 GiB of written zeroes, uncancellable).
    from imageio.backends.file import FileBackend
    from imageio import operations
    step = MiB
    monkeypatch.setattr(operations, "MAX_ZERO_STEP", step)
    monkeypatch.setattr(FileBackend, "_tryFallocate",
                        lambda self, mode, offset, length: False)
    calls = []
    original = FileBackend._zero

    def zero(self, offset, length):
        # (In a pool thread.) Slow storage: a step takes a while.
        calls.append(length)
        time.sleep(0.02)
        return original(self, offset, length)
    monkeypatch.setattr(FileBackend, "_zero", zero)
    size = 64 * MiB
    path = tmp_path / "zero.raw"
    path.write_bytes(b"x" * size)
    server.addTicket("z", size=size, url=f"file://{path}", sparse=sparse)
    r = await request(server.address, "PATCH", "/images/z",
                      {"Content-Type": "application/json"},
                      b'{"op": "zero", "offset": 0, "size": %d}' % (8 * MiB))
    assert r.status == 200, r
    assert calls and max(calls) <= step, calls
    assert path.read_bytes()[:8 * MiB] == bytes(8 * MiB)

    # Cancel a running zero of the whole image: it stops within a few
    # steps and the DELETE does not time out.
    calls.clear()
    client = await connect(server.address)
    body = b'{"op": "zero", "offset": 0, "size": %d}' % size
    d = client.request("PATCH", "/images/z",
                       {"Content-Type": "application/json"}, body)
    from test.test_images import sleep
    for _ in range(1000):
        if calls:
            break
        await sleep(0.005)
    assert calls
    await server.store.remove("z", 5)
    r = await d
    assert r.status == 403, r
    client.transport.loseConnection()
    assert max(calls) <= step
    # Stopped early: far from the 64 steps of the whole image.
    assert sum(calls) < size, len(calls)
