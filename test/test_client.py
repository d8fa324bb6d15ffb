"""
The client library's Deferred API (imageio.client.aio) against our daemon
running as a real process: upload and download of raw and qcow2 images,
incremental download of a dirty bitmap, a sparse 8 TiB upload, checksums
(ours, the server's and the reference client's), proxy fallback, and
ImageioClient random I/O. Local and target images are served by real
qemu-nbd processes; results are checked with qemu-img compare.

The blocking wrappers and the command line run in subprocesses
(test_client_cli.py); the reference daemon is in test_client_ref.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor

from imageio.client import aio
from imageio.client._progress import ProgressBar
from imageio.errors import HTTPError
from imageio.units import GiB, MiB, TiB

from test.support import (
    Daemon, controlRequest, daemonConf, freePort, makePKI, writeConf)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Helpers shared with test_client_cli.py and test_client_ref.py.

def refvenv_python():
    """
    The reference virtualenv's python, or None (FAIL in CI).
    """
    path = os.environ.get("IMAGEIO_REFVENV")
    if not path:
        path = os.path.join(REPO, ".refvenv")
        if not os.path.exists(path) and os.path.exists("/tmp/refvenv"):
            path = "/tmp/refvenv"
    python = os.path.join(path, "bin", "python")
    if not os.access(python, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail(f"reference virtualenv missing: {path}")
        return None
    return python


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], check=True,
                          capture_output=True, text=True).stdout


def qemu_io(fmt, path, *commands):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, path], check=True, capture_output=True)


def compare(a, b):
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def wait_for_socket(path, timeout=10):
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no socket {path}")
        finally:
            s.close()
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class NBDServer:
    """
    qemu-nbd serving a target image (as vdsm does for an nbd ticket).
    """

    def __init__(self, path, fmt, sock, bitmap=None, read_only=False):
        self.sock = sock
        args = ["qemu-nbd", "-f", fmt, "-k", sock, "-t", "-e", "8",
                "--cache=writeback", "--discard=unmap",
                "--detect-zeroes=unmap", "-x", ""]
        if bitmap:
            args.append(f"--bitmap={bitmap}")
        if read_only:
            args.append("--read-only")
        self.proc = subprocess.Popen([*args, path])
        wait_for_socket(sock)
        self.url = f"nbd:unix:{sock}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class DaemonHandle:
    """
    A running daemon (ours or the reference) plus ticket helpers.
    """

    def __init__(self, proc, port, control, pki, tmp):
        self.proc = proc
        self.port = port
        self.control = control
        self.pki = pki
        self.tmp = tmp
        self._servers = []

    def url(self, ticket):
        return f"https://localhost:{self.port}/images/{ticket}"

    def add_ticket(self, url, size, ops=("read", "write"), **kw):
        ticket = str(uuid.uuid4())
        body = {"uuid": ticket, "size": size, "ops": list(ops),
                "timeout": 300, "url": url, **kw}
        status, _, text = controlRequest(self.control, "PUT",
                                         f"/tickets/{ticket}", body)
        assert status == 200, text
        return ticket

    def serve(self, path, fmt, size, ops=("read", "write"), bitmap=None,
              **kw):
        """
        Serve C{path} with qemu-nbd and add a ticket for it.

        @return: the transfer url.
        """
        sock = os.path.join(self.tmp, f"nbd-{uuid.uuid4().hex[:8]}.sock")
        server = NBDServer(path, fmt, sock, bitmap=bitmap,
                           read_only=ops == ("read",))
        self._servers.append(server)
        return self.url(self.add_ticket(server.url, size, ops, **kw))

    def stop_servers(self):
        for s in self._servers:
            s.stop()
        self._servers.clear()


def start_our_daemon(tmp, extra=None):
    pki = makePKI(os.path.join(tmp, "pki"))
    conf = daemonConf(tmp, pki=pki, extra=extra)
    writeConf(tmp, conf)
    d = Daemon(tmp)
    return d, DaemonHandle(d.proc, d.remotePort, conf["control"]["socket"],
                           pki, tmp)


def start_reference_daemon(tmp, python):
    """
    The reference daemon (its own virtualenv) with a test PKI, a free
    remote port, control socket in C{tmp}, a unique abstract local socket.
    Ready once its control socket answers.
    """
    pki = makePKI(os.path.join(tmp, "pki"))
    run = os.path.join(tmp, "run")
    os.makedirs(run, exist_ok=True)
    control = os.path.join(run, "sock")
    port = freePort()
    writeConf(tmp, {
        "daemon": {"drop_privileges": False, "systemd_enable": False,
                   "run_dir": run},
        "tls": {"enable": True, "key_file": pki.key, "cert_file": pki.cert,
                "ca_file": pki.ca},
        "remote": {"host": "127.0.0.1", "port": port},
        "local": {"enable": True,
                  "socket": f"\0/org/tximageio/reftest/{uuid.uuid4()}"},
        "control": {"transport": "unix", "socket": control},
        "logger_root": {"level": "WARNING", "handlers": "stderr"},
        "handlers": {"keys": "stderr"},
    })
    exe = os.path.join(os.path.dirname(python), "ovirt-imageio")
    log = open(os.path.join(tmp, "ref.log"), "wb")
    proc = subprocess.Popen([exe, "--conf-dir", tmp], stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    delay = 0.01
    while True:
        if proc.poll() is not None:
            raise RuntimeError("reference daemon exited: " +
                               open(log.name).read())
        try:
            status, _, _ = controlRequest(control, "GET", "/tickets/none")
            if status == 404:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("reference daemon not ready")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return proc, DaemonHandle(proc, port, control, pki, tmp)


def make_image(path, fmt, size, writes):
    """
    A test image with some data: C{writes} is a list of (offset, length,
    pattern byte).
    """
    qemu_img("create", "-q", "-f", fmt, path, str(size))
    if writes:
        qemu_io(fmt, path, *[f"write -P {p} {o} {n}" for o, n, p in writes])


WRITES = [(0, 1 * MiB, 0x11), (3 * MiB, 2 * MiB, 0x22),
          (40 * MiB + 4096, 8192, 0x33), (63 * MiB, 1 * MiB, 0x44)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("daemon"))
    d, handle = start_our_daemon(tmp)
    yield handle
    handle.stop_servers()
    d.stop()


# Tests.

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_upload(daemon, tmp_path, fmt):
    src = str(tmp_path / f"src.{fmt}")
    make_image(src, fmt, 64 * MiB, WRITES)
    dst = str(tmp_path / "dst.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", dst, str(64 * MiB))
    url = daemon.serve(dst, "qcow2", 64 * MiB)
    progress = ProgressBar(output=open(os.devnull, "w"))
    await aio.upload(src, url, daemon.pki.ca, progress=progress,
                     reactor=reactor)
    assert progress.size == 64 * MiB
    assert progress.transferred == 64 * MiB
    compare(src, dst)


@pytest_twisted.ensureDeferred
async def test_upload_over_existing_data_zeroes(daemon, tmp_path):
    # Without disk_is_zero, zero extents of the source are zeroed in the
    # target, hiding what was there.
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 16 * MiB, [(0, 1 * MiB, 0x11)])
    dst = str(tmp_path / "dst.raw")
    make_image(dst, "raw", 16 * MiB, [(0, 16 * MiB, 0x77)])
    url = daemon.serve(dst, "raw", 16 * MiB)
    await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    compare(src, dst)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_download(daemon, tmp_path, fmt):
    src = str(tmp_path / "src.qcow2")
    make_image(src, "qcow2", 64 * MiB, WRITES)
    url = daemon.serve(src, "qcow2", 64 * MiB, ops=("read",))
    dst = str(tmp_path / f"dst.{fmt}")
    calls = []
    await aio.download(url, dst, daemon.pki.ca, fmt=fmt,
                       progress=calls.append, max_workers=2,
                       buffer_size=1 * MiB, reactor=reactor)
    assert sum(calls) == 64 * MiB
    compare(src, dst)
    info = json.loads(qemu_img("info", "--output", "json", dst))
    assert info["format"] == fmt


@pytest_twisted.ensureDeferred
async def test_download_incremental(daemon, tmp_path):
    base = str(tmp_path / "base.qcow2")
    make_image(base, "qcow2", 32 * MiB, [(0, 4 * MiB, 0x11)])
    qemu_img("bitmap", "--add", "--enable", base, "b1")
    qemu_io("qcow2", base, "write -P 0x22 8M 1M", "write -z 1M 1M")
    url = daemon.serve(base, "qcow2", 32 * MiB, ops=("read",),
                       bitmap="b1", dirty=True)
    dst = str(tmp_path / "incr.qcow2")
    await aio.download(url, dst, daemon.pki.ca, incremental=True,
                       reactor=reactor)
    # Only the dirty ranges are in the incremental image.
    allocated = [e for e in json.loads(
        qemu_img("map", "--output", "json", "-U", dst)) if e["data"] or
        e.get("zero") and e["depth"] == 0 and e["start"] < 8 * MiB]
    data = [(e["start"], e["length"]) for e in allocated if e["data"]]
    assert data == [(8 * MiB, 1 * MiB)]
    # On top of a full backup it equals the image.
    full = str(tmp_path / "full.qcow2")
    await aio.download(url, full, daemon.pki.ca, reactor=reactor)
    qemu_img("rebase", "-u", "-b", full, "-F", "qcow2", dst)
    compare(base, dst)
    with pytest.raises(ValueError):
        await aio.download(url, str(tmp_path / "x.raw"), daemon.pki.ca,
                           fmt="raw", incremental=True, reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_download_with_backing_file(daemon, tmp_path):
    # Zero extents hide the backing file's data.
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 8 * MiB, [(1 * MiB, 1 * MiB, 0x11)])
    url = daemon.serve(src, "raw", 8 * MiB, ops=("read",))
    backing = str(tmp_path / "backing.raw")
    make_image(backing, "raw", 8 * MiB, [(0, 8 * MiB, 0x99)])
    dst = str(tmp_path / "top.qcow2")
    await aio.download(url, dst, daemon.pki.ca, backing_file=backing,
                       backing_format="raw", reactor=reactor)
    compare(src, dst)


@pytest_twisted.ensureDeferred
async def test_upload_sparse_8t(daemon, tmp_path):
    size = 8 * TiB
    src = str(tmp_path / "big.qcow2")
    make_image(src, "qcow2", size, [(0, 2 * MiB, 0x11),
                                    (4 * TiB, 1 * MiB, 0x22),
                                    (size - MiB, 1 * MiB, 0x33)])
    dst = str(tmp_path / "target.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", dst, str(size))
    url = daemon.serve(dst, "qcow2", size)
    start = time.monotonic()
    await aio.upload(src, url, daemon.pki.ca, disk_is_zero=True,
                     reactor=reactor)
    elapsed = time.monotonic() - start
    print(f"8 TiB sparse upload: {elapsed:.2f} s")
    assert elapsed < 30
    for offset, byte in ((0, 0x11), (4 * TiB, 0x22), (size - MiB, 0x33)):
        out = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-r", "-c",
             f"read -P {byte} {offset} 1M", dst],
            capture_output=True, text=True)
        assert "Pattern verification failed" not in out.stdout, out.stdout
    out = json.loads(qemu_img("info", "--output", "json", "-U", dst))
    assert out["actual-size"] < 64 * MiB


@pytest_twisted.ensureDeferred
async def test_checksum(daemon, tmp_path):
    src = str(tmp_path / "src.qcow2")
    make_image(src, "qcow2", 20 * MiB + 4096, WRITES[:2] + [(20 * MiB, 4096, 0x55)])
    ours = await aio.checksum(src, reactor=reactor)
    url = daemon.serve(src, "qcow2", 20 * MiB + 4096, ops=("read",))
    server = await aio.remote_checksum(url, daemon.pki.ca, reactor=reactor)
    assert ours == server
    small = await aio.checksum(src, block_size=1 * MiB, algorithm="sha256",
                               reactor=reactor)
    assert small["block_size"] == 1 * MiB
    assert small["algorithm"] == "sha256"
    python = refvenv_python()
    if python is None:
        pytest.skip("reference virtualenv missing")
    code = textwrap.dedent(f"""
        import json
        from ovirt_imageio import client
        print(json.dumps([client.checksum({src!r}),
                          client.checksum({src!r}, block_size={MiB},
                                          algorithm="sha256")]))
    """)
    out = subprocess.run([python, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    ref, ref_small = json.loads(out)
    assert ref == ours
    assert ref_small == small


@pytest_twisted.ensureDeferred
async def test_info_measure_extents(tmp_path):
    src = str(tmp_path / "src.qcow2")
    make_image(src, "qcow2", 8 * MiB, [(1 * MiB, 1 * MiB, 0x11)])
    info = await aio.info(src, reactor=reactor)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 8 * MiB
    measure = await aio.measure(src, "raw", reactor=reactor)
    assert measure["required"] == 8 * MiB
    extents = await aio.extents(src, reactor=reactor)
    assert [(e.start, e.length, e.zero) for e in extents] == [
        (0, 1 * MiB, True), (1 * MiB, 1 * MiB, False),
        (2 * MiB, 6 * MiB, True)]
    qemu_img("bitmap", "--add", "--enable", src, "b1")
    qemu_io("qcow2", src, "write -P 0x22 4M 64k")
    dirty = await aio.extents(src, bitmap="b1", reactor=reactor)
    assert [(e.start, e.length) for e in dirty if e.dirty] == [
        (4 * MiB, 64 * 1024)]


@pytest_twisted.ensureDeferred
async def test_member_of_ova(tmp_path):
    import tarfile
    disk = tmp_path / "disk.qcow2"
    make_image(str(disk), "qcow2", 4 * MiB, [(0, 1 * MiB, 0x11)])
    ova = str(tmp_path / "vm.ova")
    with tarfile.open(ova, "w") as tar:
        tar.add(str(disk), arcname="disk.qcow2")
    info = await aio.info(ova, member="disk.qcow2", reactor=reactor)
    assert info["format"] == "qcow2"
    assert info["member-size"] == os.path.getsize(disk)
    assert (await aio.checksum(ova, member="disk.qcow2", reactor=reactor)
            == await aio.checksum(str(disk), reactor=reactor))


@pytest_twisted.ensureDeferred
async def test_proxy_fallback(daemon, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 8 * MiB, [(0, 1 * MiB, 0x11)])
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(8 * MiB))
    url = daemon.serve(dst, "raw", 8 * MiB)
    dead = f"https://localhost:{freePort()}/images/nothing"
    await aio.upload(src, dead, daemon.pki.ca, proxy_url=url,
                     reactor=reactor)
    compare(src, dst)
    dead2 = f"https://127.0.0.1:{freePort()}/images/nothing"
    with pytest.raises(aio.TransferError) as e:
        await aio.upload(src, dead, daemon.pki.ca, proxy_url=dead2,
                         reactor=reactor)
    assert dead in str(e.value) and dead2 in str(e.value)


@pytest_twisted.ensureDeferred
async def test_errors(daemon, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 1 * MiB, [])
    # No such ticket: the server's 403, no fallback to the proxy.
    with pytest.raises(HTTPError) as e:
        await aio.upload(src, daemon.url("missing"), daemon.pki.ca,
                         proxy_url=daemon.url("other"), reactor=reactor)
    assert e.value.code == 403
    # Certificate not trusted: our own PKI's CA is another CA.
    other = makePKI(str(tmp_path / "other"))
    with pytest.raises(aio.TransferError) as e:
        await aio.upload(src, daemon.url("x"), other.ca, reactor=reactor)
    assert "ertificate" in str(e.value)
    # Missing local file.
    with pytest.raises(Exception) as e:
        await aio.upload(str(tmp_path / "nope"), daemon.url("x"),
                         daemon.pki.ca, reactor=reactor)
    assert "No such file" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_imageio_client(daemon, tmp_path):
    import io
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(8 * MiB))
    url = daemon.serve(dst, "raw", 8 * MiB)
    client = await aio.ImageioClient.open(url, daemon.pki.ca,
                                          reactor=reactor)
    try:
        assert client.size() == 8 * MiB
        assert client.max_writers >= 1
        await client.write(4096, b"x" * 4096)
        await client.read_from(io.BytesIO(b"y" * 3 * MiB), 1 * MiB, 3 * MiB)
        await client.zero(2 * MiB, 4096)
        await client.flush()
        buf = bytearray(8192)
        assert await client.read(4096, buf) == 8192
        assert buf == b"x" * 4096 + bytes(4096)
        out = io.BytesIO()
        await client.write_to(out, 1 * MiB, 3 * MiB)
        data = out.getvalue()
        assert data[:1 * MiB] == b"y" * MiB
        assert data[MiB:MiB + 4096] == bytes(4096)
        extents = await client.extents()
        assert extents[-1].end == 8 * MiB
        with pytest.raises(RuntimeError):
            await client.write(8 * MiB - 1, b"ab")
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_imageio_client_stub_treq(tmp_path):
    """
    The injectable HTTP client: the images resource in memory through
    treq's StubTreq, no sockets.
    """
    from treq.testing import StubTreq
    from test.test_images import Server
    server = Server(tmp_path)
    try:
        server.addTicket("t1", data=b"a" * 65536 + bytes(65536))
        stub = StubTreq(server.site.resource)
        client = await aio.ImageioClient.open(
            "http://localhost/images/t1", reactor=reactor, http_client=stub)
        assert client.size() == 131072
        buf = bytearray(16)
        await client.read(65530, buf)
        assert buf == b"a" * 6 + bytes(10)
        extents = await client.extents()
        assert [(e.start, e.zero) for e in extents][-1][0] < 131072
        await client.close()
    finally:
        await server.close()
