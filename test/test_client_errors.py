"""
The client's error table (issue 15): every failure ends in one line naming
what failed and what the server (or the system) said, both from the
C{imageio} command (exit status 1, one line on stderr, no traceback, no
exception class name) and from the library (a documented exception type
of L{imageio.client}, with that line as its C{str()}).

Everything is real: our daemon as a twistd process over TLS, qemu-img and
qemu-nbd, an HTTP server answering 409 behind a proxy ticket, a TCP relay
that resets the connection in the middle of a transfer, a small tmpfs for
the download that runs out of space.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor

from imageio import client
from imageio.client import aio
from imageio.errors import HTTPError
from imageio.units import MiB

from test.support import freePort, makePKI
from test.test_client import make_image, qemu_img, start_our_daemon

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "imageio.client.cli"]

# A class name such as AssertionError, ValueError, TransferError.
_CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Failure)\b")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """
    Our daemon over TLS, without the local unix socket, so the client's
    data goes through TCP (and through the resetting relay below).
    """
    tmp = str(tmp_path_factory.mktemp("daemon"))
    d, handle = start_our_daemon(tmp, extra={"local": {"enable": False}})
    yield handle
    handle.stop_servers()
    d.stop()


@pytest.fixture
def src(tmp_path):
    path = str(tmp_path / "src.raw")
    make_image(path, "raw", 8 * MiB, [(0, 8 * MiB, 0x11)])
    return path


def run(args, env=None, **kw):
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=dict(os.environ, **(env or {})),
                          **kw)


def cli(*args, **kw):
    return run([*CLI, *args], **kw)


def one_line(r, *words):
    """
    The command failed with one line on stderr containing C{words}.
    """
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("imageio: error: "), line
    assert not _CLASS_NAME.search(line), line
    for w in words:
        assert w in line, line
    return line


def check(exc, kind, *words):
    """
    The library raised a C{kind} whose message is one line with C{words}.
    """
    assert isinstance(exc, kind), repr(exc)
    assert isinstance(exc, client.ClientError), repr(exc)
    text = str(exc)
    assert "\n" not in text, text
    assert not _CLASS_NAME.search(text), text
    for w in words:
        assert w in text, text
    return text


# The server says no.

@pytest_twisted.ensureDeferred
async def test_unknown_ticket_403(daemon, src, tmp_path):
    url = daemon.url("no-such-ticket")
    line = one_line(cli("upload", src, url, "--cafile", daemon.pki.ca),
                    "upload of", url, "403 Forbidden", "No such ticket")
    assert "OPTIONS" in line
    one_line(cli("download", url, str(tmp_path / "out.raw"), "--cafile",
                 daemon.pki.ca), "download of", url, "403",
             "No such ticket")
    with pytest.raises(client.ServerError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, HTTPError, "upload of", url, "403", "No such ticket")
    assert e.value.code == 403
    assert "No such ticket" in e.value.text
    with pytest.raises(client.ServerError) as e:
        await aio.download(url, str(tmp_path / "out.raw"), daemon.pki.ca,
                           reactor=reactor)
    assert e.value.code == 403


@pytest_twisted.ensureDeferred
async def test_operation_not_allowed_403(daemon, src, tmp_path):
    # The reported bug: this printed "imageio: error: AssertionError".
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(8 * MiB))
    url = daemon.serve(dst, "raw", 8 * MiB, ops=("read",))
    one_line(cli("upload", src, url, "--cafile", daemon.pki.ca),
             "upload of", url, "PUT", "403 Forbidden", "forbids write")
    with pytest.raises(client.ServerError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.ServerError, "upload of", "403", "forbids write")
    assert e.value.code == 403
    assert e.value.method == "PUT"


@pytest_twisted.ensureDeferred
async def test_not_found_404(daemon, src):
    # A typo in the url path.
    url = f"https://localhost:{daemon.port}/imagez/ticket"
    one_line(cli("upload", src, url, "--cafile", daemon.pki.ca),
             "upload of", url, "404 Not Found", "No handler")
    with pytest.raises(client.ServerError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.ServerError, url, "404", "No handler")
    assert e.value.code == 404


class _Answer409(http.server.BaseHTTPRequestHandler):
    TEXT = b"Transfer is paused by the engine\n"

    def _answer(self):
        self.send_response(409)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(self.TEXT)))
        self.end_headers()
        self.wfile.write(self.TEXT)

    do_OPTIONS = do_GET = do_PUT = do_PATCH = _answer

    def log_message(self, *args):
        pass


@pytest_twisted.ensureDeferred
async def test_conflict_409(daemon, src, tmp_path):
    # A proxy ticket whose upstream answers 409: our daemon passes the
    # status and text on.
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer409)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        port = upstream.server_address[1]
        ticket = daemon.add_ticket(f"http://127.0.0.1:{port}/images/t",
                                   8 * MiB)
        url = daemon.url(ticket)
        one_line(cli("download", url, str(tmp_path / "out.raw"),
                     "--cafile", daemon.pki.ca),
                 "download of", url, "409 Conflict",
                 "Transfer is paused by the engine")
        with pytest.raises(client.ServerError) as e:
            await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
        check(e.value, client.ServerError, "upload of", "409",
              "Transfer is paused by the engine")
        assert e.value.code == 409
    finally:
        upstream.shutdown()
        upstream.server_close()


@pytest_twisted.ensureDeferred
async def test_range_not_satisfiable_416(daemon, src, tmp_path):
    # The ticket allows 4 MiB of the 8 MiB image; the upload writes past.
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(8 * MiB))
    url = daemon.serve(dst, "raw", 4 * MiB)
    one_line(cli("upload", src, url, "--cafile", daemon.pki.ca),
             "upload of", url, "416", "out of allowed range")
    with pytest.raises(client.ServerError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.ServerError, "416", "out of allowed range")
    assert e.value.code == 416


@pytest_twisted.ensureDeferred
async def test_server_failure_500(daemon, src, tmp_path):
    # The ticket's backend cannot be opened: the daemon fails with 500
    # and its text.
    ticket = daemon.add_ticket(
        f"nbd:unix:{tmp_path}/no-such-socket", 8 * MiB)
    url = daemon.url(ticket)
    one_line(cli("download", url, str(tmp_path / "out.raw"), "--cafile",
                 daemon.pki.ca),
             "download of", url, "500 Internal Server Error",
             "Server failed to perform the request, check logs")
    with pytest.raises(client.ServerError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.ServerError, "500",
          "Server failed to perform the request")
    assert e.value.code == 500


# The connection fails.

@pytest_twisted.ensureDeferred
async def test_tls_verification_failure(daemon, src, tmp_path):
    other = makePKI(str(tmp_path / "other"), caName="another CA")
    url = daemon.url("x")
    one_line(cli("upload", src, url, "--cafile", other.ca),
             "upload of", url, "ertificate")
    with pytest.raises(client.TransferError) as e:
        await aio.upload(src, url, other.ca, reactor=reactor)
    check(e.value, client.TransferError, "upload of", "ertificate")


@pytest_twisted.ensureDeferred
async def test_connection_refused(daemon, src, tmp_path):
    url = f"https://localhost:{freePort()}/images/x"
    one_line(cli("download", url, str(tmp_path / "out.raw"), "--cafile",
                 daemon.pki.ca), "download of", url, "connection refused")
    with pytest.raises(client.TransferError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.TransferError, "upload of", url,
          "connection refused")


class Relay:
    """
    A TCP relay to the daemon on 127.0.0.1 that counts connections and
    bytes, and, with C{reset_after}, resets a connection (RST: SO_LINGER
    0) once it carried that many bytes in one direction: the connection
    reset in the middle of a transfer.

    @ivar accepted: connections accepted.
    @ivar peak: the most connections open at once.
    @ivar up: bytes from the client to the daemon.
    @ivar down: bytes from the daemon to the client.
    @ivar resets: connections reset.
    """

    def __init__(self, port, reset_after=None):
        self._target = ("127.0.0.1", port)
        self._limit = reset_after
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.accepted = self.peak = self.resets = self.up = self.down = 0
        self._open = 0
        self._stopped = False
        self._threads = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, url, port):
        return url.replace(f":{port}/", f":{self.port}/")

    def _accept(self):
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._open += 1
                self.peak = max(self.peak, self._open)
            t = threading.Thread(target=self._relay, args=(conn,),
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _relay(self, a):
        b = socket.create_connection(self._target)
        moved = {a: 0, b: 0}
        peer = {a: b, b: a}
        try:
            while not self._stopped:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
                    moved[s] += len(data)
                    with self._lock:
                        if s is a:
                            self.up += len(data)
                        else:
                            self.down += len(data)
                    if self._limit is not None and moved[s] >= self._limit:
                        self.resets += 1
                        for x in (a, b):
                            x.setsockopt(socket.SOL_SOCKET,
                                         socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                        return
        except OSError:
            return
        finally:
            a.close()
            b.close()
            with self._lock:
                self._open -= 1

    def close(self):
        self._stopped = True
        self._sock.close()
        for t in self._threads:
            t.join(5)


@pytest.mark.parametrize("direction", ["upload", "download"])
@pytest_twisted.ensureDeferred
async def test_connection_reset_mid_transfer(daemon, tmp_path, direction):
    image = str(tmp_path / "image.raw")
    make_image(image, "raw", 32 * MiB, [(0, 32 * MiB, 0x22)])
    target = str(tmp_path / "target.raw")
    qemu_img("create", "-q", "-f", "raw", target, str(32 * MiB))
    served = image if direction == "download" else target
    ticket_url = daemon.serve(served, "raw", 32 * MiB)
    relay = Relay(daemon.port, reset_after=2 * MiB)
    try:
        url = relay.url(ticket_url, daemon.port)
        out = str(tmp_path / "out.raw")
        if direction == "upload":
            args = ["upload", image, url]
        else:
            args = ["download", url, out, "-f", "raw"]
        one_line(cli(*args, "--cafile", daemon.pki.ca, "--max-workers",
                     "1"), f"{direction} of", url, "reset")
        assert relay.resets >= 1
        resets = relay.resets
        with pytest.raises(client.TransferError) as e:
            if direction == "upload":
                await aio.upload(image, url, daemon.pki.ca, max_workers=1,
                                 reactor=reactor)
            else:
                await aio.download(url, out + ".2", daemon.pki.ca,
                                   fmt="raw", max_workers=1,
                                   reactor=reactor)
        check(e.value, client.TransferError, f"{direction} of", url,
              "reset")
        assert relay.resets > resets
    finally:
        relay.close()


# The local image.

@pytest_twisted.ensureDeferred
async def test_local_image_missing(daemon, tmp_path):
    missing = str(tmp_path / "nope.raw")
    url = daemon.url("x")
    one_line(cli("upload", missing, url, "--cafile", daemon.pki.ca),
             "upload of", "No such file", missing)
    one_line(cli("info", missing), "No such file", missing)
    with pytest.raises(client.ImageError) as e:
        await aio.upload(missing, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.ImageError, "upload of", "No such file")
    assert e.value.filename == missing
    assert e.value.errno == 2
    with pytest.raises(client.ImageError):
        await aio.checksum(missing, reactor=reactor)


@pytest.fixture
def unreadable(tmp_path):
    """
    An image the client cannot read (mode 0), and the command prefix that
    runs the client without the capabilities that let root read it
    anyway (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), when the tests run as
    root.
    """
    path = str(tmp_path / "disk.raw")
    make_image(path, "raw", 1 * MiB, [])
    os.chmod(path, 0)
    prefix = []
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}",
                  "--"]
    yield path, prefix
    os.chmod(path, 0o600)


def test_local_image_unreadable(daemon, unreadable):
    path, prefix = unreadable
    url = daemon.url("x")
    one_line(run([*prefix, *CLI, "upload", path, url, "--cafile",
                  daemon.pki.ca]),
             "upload of", "Cannot read", path, "Permission denied")
    # The library (blocking API) in the same situation.
    code = textwrap.dedent(f"""
        import json
        from imageio import client
        try:
            client.upload({path!r}, {url!r}, {daemon.pki.ca!r})
        except client.ImageError as e:
            print(json.dumps({{"str": str(e), "errno": e.errno,
                              "filename": e.filename}}))
    """)
    r = run([*prefix, sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["errno"] == 13
    assert out["filename"] == path
    assert "Permission denied" in out["str"] and "upload of" in out["str"]


@pytest_twisted.ensureDeferred
async def test_local_image_unknown_format(daemon, tmp_path):
    # A qcow2 header of a version qemu does not know.
    bad = str(tmp_path / "bad.qcow2")
    with open(bad, "wb") as f:
        f.write(b"QFI\xfb" + (99).to_bytes(4, "big") + bytes(504))
    url = daemon.url("x")
    one_line(cli("upload", bad, url, "--cafile", daemon.pki.ca),
             "upload of", bad, "not an image qemu can read",
             "Unsupported qcow2 version 99")
    with pytest.raises(client.ImageError) as e:
        await aio.upload(bad, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.ImageError, "Unsupported qcow2 version")
    # An unknown target format for a download is the caller's mistake.
    with pytest.raises(ValueError):
        await aio.download(url, str(tmp_path / "x"), daemon.pki.ca,
                           fmt="floppy", reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_qemu_nbd_fails_to_start(daemon, src, tmp_path, monkeypatch):
    # qemu-nbd cannot create its socket: the path (in TMPDIR) is longer
    # than a unix socket address allows.
    long_dir = tmp_path / ("d" * 110)
    long_dir.mkdir()
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(8 * MiB))
    url = daemon.serve(dst, "raw", 8 * MiB)
    one_line(cli("upload", src, url, "--cafile", daemon.pki.ca,
                 env={"TMPDIR": str(long_dir)}),
             "upload of", "qemu-nbd failed to start", "is too long")
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    with pytest.raises(client.QemuError) as e:
        await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    check(e.value, client.QemuError, "upload of",
          "qemu-nbd failed to start", "is too long")


@pytest.fixture
def small_fs(tmp_path):
    """
    A 4 MiB tmpfs (mounted as root; the suite runs as root in CI).
    """
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                        str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (needs root): {r.stderr}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest_twisted.ensureDeferred
async def test_download_no_space_left(daemon, tmp_path, small_fs):
    image = str(tmp_path / "image.raw")
    make_image(image, "raw", 16 * MiB, [(0, 16 * MiB, 0x33)])
    url = daemon.serve(image, "raw", 16 * MiB, ops=("read",))
    out = os.path.join(small_fs, "out.raw")
    one_line(cli("download", url, out, "-f", "raw", "--cafile",
                 daemon.pki.ca), "download of", out,
             "No space left on device")
    os.unlink(out)
    with pytest.raises(client.ImageError) as e:
        await aio.download(url, out, daemon.pki.ca, fmt="raw",
                           reactor=reactor)
    check(e.value, client.ImageError, "download of", "writing",
          "No space left on device")
    assert e.value.errno == 28
    assert e.value.filename == out


def test_unexpected_error_is_named_without_class():
    # A bug of ours (any exception the table does not know) still ends in
    # one line naming what failed, without the exception's class name.
    from imageio.client._errors import translate
    exc = translate(AssertionError(), "upload of 'a.raw' to https://h/x")
    assert isinstance(exc, client.ClientError)
    check(exc, client.ClientError, "upload of 'a.raw'",
          "unexpected client error")
    exc = translate(KeyError("x"), "download of https://h/x")
    check(exc, client.ClientError, "download of", "unexpected client error")


def test_blocking_imageio_client_errors(daemon, tmp_path):
    # The blocking random-access client raises the same errors, from each
    # operation, including a streamed read_from.
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(1 * MiB))
    url = daemon.serve(dst, "raw", 1 * MiB, ops=("read",))
    code = textwrap.dedent(f"""
        import io, json
        from imageio import client
        out = {{}}
        with client.ImageioClient({url!r}, {daemon.pki.ca!r}) as c:
            for name, call in [
                    ("write", lambda: c.write(0, b"x" * 4096)),
                    ("read_from", lambda: c.read_from(
                        io.BytesIO(b"y" * 8192), 0, 8192)),
                    ("zero", lambda: c.zero(0, 4096))]:
                try:
                    call()
                except client.ServerError as e:
                    out[name] = [e.code, str(e)]
        try:
            client.ImageioClient({daemon.url("missing")!r},
                                 {daemon.pki.ca!r})
        except client.ServerError as e:
            out["open"] = [e.code, str(e)]
        print(json.dumps(out))
    """)
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"write", "read_from", "zero", "open"}, out
    for name in ("write", "read_from", "zero"):
        code, text = out[name]
        assert code == 403, out
        assert "forbids write" in text and url in text, text
        assert not _CLASS_NAME.search(text), text
    assert out["open"][0] == 403
    assert "opening" in out["open"][1] and "No such ticket" in out["open"][1]


def test_wrapped_failure_text():
    # A request failing for a reason Twisted wraps (RequestGenerationFailed
    # and friends print as "[<twisted.python.failure.Failure ...>]") is
    # described by the wrapped error's own text.
    from twisted.python.failure import Failure
    from twisted.web._newclient import RequestGenerationFailed
    from imageio.client._errors import translate
    from imageio.errors import BackendError
    try:
        raise OSError(5, "Input/output error")
    except OSError:
        inner = Failure()
    wrapped = RequestGenerationFailed([inner])
    error = BackendError(f"PUT host:1/images/t failed: {wrapped}")
    error.__cause__ = wrapped
    exc = translate(error, "upload of 'a.raw' to https://host:1/images/t")
    text = check(exc, client.TransferError, "PUT host:1/images/t",
                 "Input/output error")
    assert "[<" not in text
