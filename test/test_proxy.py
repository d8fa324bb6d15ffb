"""
The engine-host proxy, end to end, with real daemons.

A host daemon (TLS with PKI A; file tickets, and nbd tickets served by a
qemu-nbd on a unix socket) and a proxy daemon configured as engine-setup
does (control over TCP, no local service, its own TLS certificate from
PKI B, C{[backend_http] ca_file} = PKI A's CA). Tickets are added over each
daemon's control service; the proxy ticket's url is the host's image url
(SPEC C §2.2).

Shown here:
  - full uploads and downloads of 1 GiB through the proxy are byte-exact,
    each one client request relayed as one upstream request; the
    reference client works through the proxy, sparse transfers included;
  - the host's 403, 404, 416 and 500 reach the client;
  - backpressure: a slow client downloading, or a slow host receiving an
    upload, keeps the proxy's memory flat;
  - a host certificate from another CA or for another name is refused
    with a clear error; the right CA makes it work;
  - interoperability with the reference daemon as host and as proxy.

Data is generated and hashed as it streams: nothing holds an image in
memory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import textwrap
import threading
import time
import uuid

import pytest

from test.support import (
    Daemon, controlRequest, daemonConf, freePort, httpsConnection, makePKI,
    writeConf)
from test.test_images_ref import refvenv  # noqa: F401 (fixture)

MiB = 1024**2
GiB = 1024**3

QEMU_NBD = shutil.which("qemu-nbd")
QEMU_IMG = shutil.which("qemu-img")
NBDKIT = shutil.which("nbdkit")
CURL = shutil.which("curl")

pytestmark = pytest.mark.skipif(
    None in (QEMU_NBD, QEMU_IMG, NBDKIT, CURL),
    reason="qemu-nbd, qemu-img, nbdkit and curl are needed")

# The client reads slowly at this rate (curl --limit-rate) ...
SLOW_CLIENT = "20M"
# ... and the slow host's NBD server writes at this many bits per second
# (nbdkit rate filter): 10 MB/s nominal; measured nearer 15 MB/s, the
# filter's bucket starting full.
SLOW_HOST_BITS = "80M"
# The most the proxy's RSS may grow while relaying to or from a slow peer.
MAX_RSS_GROWTH = 32 * MiB

GENERIC_ERROR = "Server failed to perform the request, check logs"


# Data.

def pattern(size: int, seed: int = 0):
    """
    C{size} bytes of reproducible data in 1 MiB chunks: a random block
    with the chunk number in front, so no two chunks are equal.
    """
    base = random.Random(seed).randbytes(MiB)
    for i, offset in enumerate(range(0, size, MiB)):
        chunk = i.to_bytes(8, "little") + base[8:]
        yield chunk[:size - offset]


def digest(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def fileDigest(path, size=None) -> str:
    h = hashlib.sha256()
    left = os.path.getsize(path) if size is None else size
    with open(path, "rb") as f:
        while left:
            data = f.read(min(4 * MiB, left))
            if not data:
                break
            h.update(data)
            left -= len(data)
    return h.hexdigest()


def sparseFile(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# Daemons.

def control(sections, method, path, body=None):
    """
    One request to a daemon's control service (unix socket as vdsm, or
    TCP as the engine: a new connection per request, no content-type).

    @return: C{(status, body)}.
    """
    if body is not None:
        body = json.dumps(body)
    ctl = sections["control"]
    if ctl["transport"] == "unix":
        status, _, data = controlRequest(ctl["socket"], method, path, body)
        return status, data
    con = http.client.HTTPConnection("localhost", ctl["port"], timeout=30)
    try:
        con.request(method, path, body=body)
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


class Node:
    """
    A daemon (ours or the reference) with its configuration.

    @ivar sections: the configuration written to its conf dir.
    @ivar ca: the CA a client of its remote service must trust.
    """

    def __init__(self, name, confDir, sections, ca, reference=None):
        self.name = name
        self.sections = sections
        self.ca = ca
        os.makedirs(confDir, exist_ok=True)
        writeConf(confDir, sections)
        if reference is None:
            self.daemon = Daemon(confDir)
            self.proc = self.daemon.proc
            self.port = self.daemon.remotePort
        else:
            self.daemon = _Reference(reference, confDir, sections)
            self.proc = self.daemon.proc
            self.port = sections["remote"]["port"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.daemon.output()

    def stop(self):
        self.daemon.stop()

    def addTicket(self, uuid_, url, size, ops=("read", "write"), **kw):
        ticket = {"uuid": uuid_, "size": size, "url": url, "ops": list(ops),
                  "timeout": 3600, "transfer_id": f"transfer-{uuid_}",
                  **kw}
        status, body = control(self.sections, "PUT", f"/tickets/{uuid_}",
                               ticket)
        assert status == 200, (status, body)

    def removeTicket(self, uuid_):
        control(self.sections, "DELETE", f"/tickets/{uuid_}")

    def ticketInfo(self, uuid_) -> dict:
        status, body = control(self.sections, "GET", f"/tickets/{uuid_}")
        assert status == 200, (status, body)
        return json.loads(body)

    def imageURL(self, uuid_, host="127.0.0.1") -> str:
        return f"https://{host}:{self.port}/images/{uuid_}"


class _Reference:
    """
    The reference daemon in its own virtualenv. Ready once its control
    service answers (polled; it prints nothing we could wait for on
    stdout before it is ready).
    """

    def __init__(self, python, confDir, sections, timeout=30):
        self.lines = []
        exe = os.path.join(os.path.dirname(python), "ovirt-imageio")
        self.proc = subprocess.Popen(
            [exe, "--conf-dir", confDir], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                control(sections, "GET", "/tickets/no-such-ticket")
                return
            except OSError:
                if (self.proc.poll() is not None
                        or time.monotonic() > deadline):
                    self.stop()
                    raise RuntimeError("reference daemon did not start:\n"
                                       + self.output())
                time.sleep(0.05)

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def hostConf(tmp, pki, control="unix"):
    """
    A hypervisor's daemon. The local service is off: the proxy must use
    TLS as it does across hosts (it would move to the unix socket of a
    daemon on its own host).
    """
    return daemonConf(str(tmp), pki=pki, control=control, extra={
        "remote": {"port": freePort()},
        "local": {"enable": False}})


def proxyConf(tmp, pki, upstreamCA):
    """
    The engine host's daemon, as engine-setup configures it (SPEC C §2.2).
    """
    return daemonConf(str(tmp), pki=pki, control="tcp", extra={
        "remote": {"port": freePort()},
        "local": {"enable": False},
        "backend_http": {"ca_file": upstreamCA}})


class Server:
    """
    A unix socket NBD server process (qemu-nbd or nbdkit).
    """

    def __init__(self, cmd, sock, timeout=10):
        self.sock = sock
        self.url = f"nbd:unix:{sock}"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                return
            except OSError:
                if self.proc.poll() is not None or \
                        time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{cmd[0]} did not start: "
                                       f"{self.proc.stderr.read()!r}")
                time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def qemuNBD(path, sock):
    return Server([QEMU_NBD, "--socket", sock, "--format", "raw",
                   "--persistent", "--shared=8", "--cache=writeback",
                   "--discard=unmap",
                   path], sock)


def slowNBD(path, sock):
    return Server([NBDKIT, "--foreground", "--unix", sock,
                   "--filter=rate", "file", f"file={path}",
                   f"rate={SLOW_HOST_BITS}"], sock)


# Clients.

def upload(node, path, chunks, length, ca=None, offset=None,
           timeout=300):
    """
    Stream C{chunks} (C{length} bytes) in one PUT with a Content-Length.

    @return: C{(status, body)}.
    """
    con = httpsConnection(node.port, ca or node.ca, timeout=timeout)
    try:
        con.putrequest("PUT", path, skip_accept_encoding=True)
        con.putheader("content-length", str(length))
        con.putheader("content-type", "application/octet-stream")
        if offset is not None:
            con.putheader("content-range",
                          f"bytes {offset}-{offset + length - 1}/*")
        con.endheaders()
        try:
            for chunk in chunks:
                con.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass    # Answered early; the response tells why.
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


def download(node, path, headers=None, ca=None, timeout=300):
    """
    One GET, the body hashed as it arrives.

    @return: C{(status, sha256 or error text, length)}.
    """
    con = httpsConnection(node.port, ca or node.ca, timeout=timeout)
    try:
        con.request("GET", path, headers=headers or {})
        resp = con.getresponse()
        if resp.status >= 300:
            return resp.status, resp.read().decode(), 0
        h = hashlib.sha256()
        n = 0
        while True:
            data = resp.read(4 * MiB)
            if not data:
                break
            h.update(data)
            n += len(data)
        return resp.status, h.hexdigest(), n
    finally:
        con.close()


def call(node, method, path, body=None, headers=None, ca=None):
    con = httpsConnection(node.port, ca or node.ca)
    try:
        con.request(method, path, body=body, headers=headers or {})
        resp = con.getresponse()
        return resp.status, resp.read().decode()
    finally:
        con.close()


class MemoryWatch:
    """
    Sample a process's resident memory while something runs.

    The peak (VmHWM) is reset first (C{clear_refs} 5), so an earlier,
    larger transfer does not hide the growth.
    """

    def __init__(self, pid, interval=0.02):
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self.samples = []

    def _status(self) -> dict:
        values = {}
        with open(f"/proc/{self._pid}/status") as f:
            for line in f:
                m = re.match(r"(Vm\w+):\s+(\d+) kB", line)
                if m:
                    values[m.group(1)] = int(m.group(2)) * 1024
        return values

    def __enter__(self):
        try:
            with open(f"/proc/{self._pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.baseline = self._status()["VmRSS"]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self._interval):
            self.samples.append(self._status()["VmRSS"])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        status = self._status()
        self.peak = max([status["VmHWM"], status["VmRSS"], *self.samples])
        self.growth = self.peak - self.baseline


def hostLogged(node, what, tid):
    """
    The sizes of C{what} (READ or WRITE) requests our host daemon logged
    for a transfer.
    """
    pattern_ = re.compile(
        rf"{what} size=(\d+) offset=\d+ .*transfer=transfer-{tid}\b")
    return [int(m.group(1)) for m in map(pattern_.search,
                                         node.output().splitlines()) if m]


def logged(node, text, timeout=10) -> str | None:
    """
    The first line of C{node}'s log containing C{text}, waiting for it (the
    log arrives through a pipe): C{None} if it does not come.
    """
    deadline = time.monotonic() + timeout
    while True:
        for line in node.output().splitlines():
            if text in line:
                return line
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


# Fixtures.

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """
    PKI A and B, our host and proxy daemons, and a qemu-nbd serving a
    1 GiB raw file.
    """
    tmp = tmp_path_factory.mktemp("proxy")
    started = []
    try:
        pkiA = makePKI(str(tmp / "pki-a"), caName="host CA")
        pkiB = makePKI(str(tmp / "pki-b"), caName="engine CA")
        host = Node("host", tmp / "host", hostConf(tmp / "host", pkiA),
                    pkiA.ca)
        started.append(host)
        proxy = Node("proxy", tmp / "proxy",
                     proxyConf(tmp / "proxy", pkiB, pkiA.ca), pkiB.ca)
        started.append(proxy)
        yield Env(tmp, pkiA, pkiB, host, proxy, started)
    finally:
        for s in reversed(started):
            s.stop()


class Env:
    def __init__(self, tmp, pkiA, pkiB, host, proxy, started):
        self.tmp = tmp
        self.pkiA = pkiA
        self.pkiB = pkiB
        self.host = host
        self.proxy = proxy
        self._started = started

    def transfer(self, url, size, proxySize=None, hostSize=None,
                 proxy=None, host=None, **kw):
        """
        Add a host ticket for C{url} and the proxy ticket pointing to it.

        @return: the ticket id (the same on both, as the engine does).
        """
        proxy = proxy or self.proxy
        host = host or self.host
        tid = str(uuid.uuid4())
        host.addTicket(tid, url, hostSize or size, **kw)
        proxy.addTicket(tid, host.imageURL(tid), proxySize or size, **kw)
        return tid

    def fileTransfer(self, size, **kw):
        """
        A transfer of a new sparse file. @return: C{(id, path)}.
        """
        path = sparseFile(self.tmp / f"{uuid.uuid4()}.raw", size)
        return self.transfer(f"file://{path}", size, **kw), path

    def nbdTransfer(self, size, **kw):
        """
        A transfer of a new sparse file served by its own qemu-nbd (stopped
        with the module's daemons). @return: C{(id, path)}.
        """
        name = uuid.uuid4()
        path = sparseFile(self.tmp / f"{name}.raw", size)
        server = qemuNBD(path, str(self.tmp / f"{name}.sock"))
        self._started.append(server)
        return self.transfer(server.url, size, **kw), path

    def newTransfer(self, kind, size, **kw):
        if kind == "file":
            return self.fileTransfer(size, **kw)
        return self.nbdTransfer(size, **kw)


# (a) Full transfers.

@pytest.mark.parametrize("kind", ["file", "nbd"])
def test_full_image_upload_download(env, kind):
    size = GiB
    tid, path = env.newTransfer(kind, size)
    expected = digest(pattern(size, seed=1))

    start = time.monotonic()
    status, body = upload(env.proxy, f"/images/{tid}", pattern(size, 1),
                          size)
    up = time.monotonic() - start
    assert status == 200, body
    assert fileDigest(path) == expected

    start = time.monotonic()
    status, got, n = download(env.proxy, f"/images/{tid}")
    down = time.monotonic() - start
    print(f"{kind}: upload {size / up / 1e6:.0f} MB/s, download "
          f"{size / down / 1e6:.0f} MB/s")
    assert (status, n) == (200, size), got
    assert got == expected

    # One upstream request per client request, the whole image each.
    assert hostLogged(env.host, "WRITE", tid) == [size]
    assert hostLogged(env.host, "READ", tid) == [size]
    # The upstream PUT's body was encrypted and sent by a thread, and so
    # was the response to the client's GET.
    assert any("handed to a writer thread" in line and "Body to " in line
               for line in env.proxy.output().splitlines())
    assert any("handed to a writer thread" in line and "Body of " in line
               for line in env.proxy.output().splitlines())
    # The module's directory lives until its last test: give the GiB of
    # disk back now (CI machines may have little).
    os.truncate(path, 0)


def test_ranges_through_proxy(env):
    size = 8 * MiB
    tid, path = env.fileTransfer(size)
    data = b"".join(pattern(size, 2))
    status, _ = upload(env.proxy, f"/images/{tid}", [data[:3 * MiB]],
                       3 * MiB)
    assert status == 200
    status, _ = upload(env.proxy, f"/images/{tid}", [data[3 * MiB:]],
                       size - 3 * MiB, offset=3 * MiB)
    assert status == 200
    first, last = 1000, 5 * MiB + 17
    status, got, n = download(env.proxy, f"/images/{tid}",
                              {"Range": f"bytes={first}-{last}"})
    assert (status, n) == (206, last - first + 1)
    assert got == hashlib.sha256(data[first:last + 1]).hexdigest()
    with open(path, "rb") as f:
        assert f.read() == data


def makeSparseImage(path, size):
    """
    A raw image with a few data areas and holes between them.
    """
    with open(path, "wb") as f:
        f.truncate(size)
        for i, offset in enumerate((0, size // 3 // MiB * MiB,
                                    size - 3 * MiB)):
            f.seek(offset)
            f.write(b"".join(pattern(2 * MiB + 4096, seed=10 + i)))
    return str(path)


def refClient(python, code):
    r = subprocess.run([python, "-c", textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("kind", ["file", "nbd"])
def test_reference_client_through_proxy(env, refvenv, kind):
    size = 256 * MiB
    src = makeSparseImage(env.tmp / f"src-{kind}.raw", size)
    tid, target = env.newTransfer(kind, size, sparse=True)
    url = env.proxy.imageURL(tid)
    dst = str(env.tmp / f"dst-{kind}.raw")
    refClient(refvenv, f"""
        from ovirt_imageio import client
        client.upload({src!r}, {url!r}, {env.pkiB.ca!r})
        client.download({url!r}, {dst!r}, {env.pkiB.ca!r}, fmt="raw")
    """)
    assert fileDigest(target, size) == fileDigest(src)
    assert fileDigest(dst) == fileDigest(src)
    # Extents drove both ways: only the data areas were written and read
    # (the client sends the holes as zero requests).
    data = 3 * (2 * MiB + 4096)
    assert sum(hostLogged(env.host, "WRITE", tid)) == data
    if kind == "nbd":
        # (A file reports one data extent, as the reference's.)
        assert sum(hostLogged(env.host, "READ", tid)) == data
    # The host's image stayed sparse.
    assert os.stat(target).st_blocks * 512 < 2 * data


# (b) The host's errors reach the client.

def test_error_403_no_such_host_ticket(env):
    tid = str(uuid.uuid4())
    env.proxy.addTicket(tid, env.host.imageURL(tid), MiB)
    status, text, _ = download(env.proxy, f"/images/{tid}")
    direct = download(env.host, f"/images/{tid}")
    assert direct[0] == 403
    assert (status, text) == (403, direct[1])


def test_error_403_read_only_host_ticket(env):
    tid, _ = env.fileTransfer(MiB)
    # The host allows reading only; the proxy ticket allows writing.
    env.host.addTicket(tid, f"file://{env.tmp / 'ro.raw'}", MiB,
                       ops=["read"])
    sparseFile(env.tmp / "ro.raw", MiB)
    status, text = upload(env.proxy, f"/images/{tid}", [b"x" * 100], 100)
    direct = upload(env.host, f"/images/{tid}", [b"x" * 100], 100)
    assert direct[0] == 403
    assert (status, text) == (403, direct[1])


def test_error_404_dirty_extents(env):
    # The proxy ticket allows dirty extents, the host's does not.
    tid = str(uuid.uuid4())
    path = sparseFile(env.tmp / f"{tid}.raw", MiB)
    env.host.addTicket(tid, f"file://{path}", MiB)
    env.proxy.addTicket(tid, env.host.imageURL(tid), MiB, dirty=True)
    path_ = f"/images/{tid}/extents?context=dirty"
    direct = call(env.host, "GET", path_)
    status, text = call(env.proxy, "GET", path_)
    assert direct[0] == 404
    # As the reference proxy: the host's text, after saying what failed.
    assert status == 404
    assert text == ("Server does not support dirty extents: "
                    + direct[1])


def test_error_416_beyond_host_ticket(env):
    size = 4 * MiB
    # The host ticket covers the first half only.
    tid, _ = env.fileTransfer(size, hostSize=size // 2)
    rng = {"Range": f"bytes={size // 2}-{size - 1}"}
    direct = download(env.host, f"/images/{tid}", rng)
    status, text, _ = download(env.proxy, f"/images/{tid}", rng)
    assert direct[0] == 416
    assert (status, text) == (416, direct[1])

    body = [bytes(MiB)]
    direct = upload(env.host, f"/images/{tid}", body, MiB, offset=size // 2)
    status, text = upload(env.proxy, f"/images/{tid}", body, MiB,
                          offset=size // 2)
    assert direct[0] == 416
    assert (status, text) == (416, direct[1])


def test_error_500_host_backend_fails(env):
    # The host cannot reach its NBD server.
    tid = env.transfer(f"nbd:unix:{env.tmp / 'no-such.sock'}", MiB)
    direct = download(env.host, f"/images/{tid}")
    status, text, _ = download(env.proxy, f"/images/{tid}")
    assert direct[:2] == (500, GENERIC_ERROR + "\n")
    assert (status, text) == direct[:2]


# (c) Backpressure.

def test_slow_client_download(env):
    size = 256 * MiB
    length = 100 * MiB
    tid, _ = env.fileTransfer(size)
    upload(env.proxy, f"/images/{tid}", pattern(size, 3), size)
    start = time.monotonic()
    with MemoryWatch(env.proxy.pid) as mem:
        r = subprocess.run(
            [CURL, "-sS", "--fail", "--limit-rate", SLOW_CLIENT, "--cacert",
             env.pkiB.ca, "-r", f"0-{length - 1}", "-o", "/dev/null",
             "-w", "%{http_code} %{size_download}",
             env.proxy.imageURL(tid)],
            capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    print(f"slow client download: {length / elapsed / 1e6:.1f} MB/s, proxy "
          f"RSS {mem.baseline / MiB:.1f} MiB, peak {mem.peak / MiB:.1f} MiB")
    assert r.stdout == f"206 {length}", r.stderr
    # The client was slow (20 MB/s: 5 s) ...
    assert length / elapsed < 25e6
    # ... and the proxy did not buffer what it could not send.
    assert mem.growth < MAX_RSS_GROWTH, (mem.baseline, mem.peak)


def test_slow_host_upload(env):
    size = 64 * MiB
    path = sparseFile(env.tmp / "slow.raw", size)
    slow = slowNBD(path, str(env.tmp / "slow.sock"))
    try:
        tid = env.transfer(slow.url, size)
        start = time.monotonic()
        with MemoryWatch(env.proxy.pid) as mem:
            status, body = upload(env.proxy, f"/images/{tid}",
                                  pattern(size, 4), size)
            elapsed = time.monotonic() - start
    finally:
        slow.stop()
    print(f"slow host upload: {size / elapsed / 1e6:.1f} MB/s, proxy RSS "
          f"{mem.baseline / MiB:.1f} MiB, peak {mem.peak / MiB:.1f} MiB")
    assert status == 200, body
    assert fileDigest(path) == digest(pattern(size, 4))
    # The host was slow (the proxy alone does over 150 MB/s) ...
    assert size / elapsed < 40e6
    # ... and the proxy did not buffer what it could not send.
    assert mem.growth < MAX_RSS_GROWTH, (mem.baseline, mem.peak)


# (d) The host's certificate.

@pytest.fixture(scope="module")
def otherHost(env):
    """
    A host whose certificate is signed by another CA (D) and names only
    "localhost", and a proxy trusting CA D.
    """
    tmp = env.tmp / "other"
    pkiD = makePKI(str(tmp / "pki-d"), hosts=("localhost",),
                   caName="other CA")
    host = Node("other-host", tmp / "host", hostConf(tmp / "host", pkiD),
                pkiD.ca)
    try:
        proxy = Node("other-proxy", tmp / "proxy",
                     proxyConf(tmp / "proxy", env.pkiB, pkiD.ca),
                     env.pkiB.ca)
        try:
            yield host, proxy
        finally:
            proxy.stop()
    finally:
        host.stop()


def test_host_certificate_other_ca(env, otherHost):
    host, goodProxy = otherHost
    size = MiB
    tid, _ = env.fileTransfer(size, host=host)
    env.proxy.addTicket(tid, host.imageURL(tid, host="localhost"), size)

    status, text, _ = download(env.proxy, f"/images/{tid}")
    # The generic text, as the reference: the backend's host and port are
    # not the client's business. The log has it all.
    assert status == 500
    assert text == "Server failed to perform the request, check logs\n"
    line = logged(env.proxy, f"Certificate of localhost:{host.port} "
                             f"refused")
    assert line and "#error]" in line, line
    assert "certificate verify failed" in line
    assert logged(env.proxy, "UpstreamTLSError: Certificate of localhost:"
                             f"{host.port} refused")

    # The proxy trusting the host's CA works.
    goodProxy.addTicket(tid, host.imageURL(tid, host="localhost"), size)
    status, body = upload(goodProxy, f"/images/{tid}", pattern(size, 5),
                          size)
    assert status == 200, body
    assert download(goodProxy, f"/images/{tid}")[1] == \
        digest(pattern(size, 5))


def test_host_certificate_other_name(env, otherHost):
    host, proxy = otherHost
    size = MiB
    tid, _ = env.fileTransfer(size, host=host, proxy=proxy)
    # The certificate names "localhost", the url 127.0.0.1.
    proxy.addTicket(tid, host.imageURL(tid, host="127.0.0.1"), size)
    status, text, _ = download(proxy, f"/images/{tid}")
    assert status == 500
    assert text == "Server failed to perform the request, check logs\n"
    assert f"127.0.0.1:{host.port}" not in text
    line = logged(proxy, f"Certificate of 127.0.0.1:{host.port} refused")
    assert line and "#error]" in line, line
    assert "certificate does not match the host name" in line

    proxy.addTicket(tid, host.imageURL(tid, host="localhost"), size)
    status, _, n = download(proxy, f"/images/{tid}")
    assert (status, n) == (200, size)


# (e) The reference daemon as host, and as proxy.

@pytest.fixture(scope="module")
def ref(env, refvenv):
    """
    The reference daemon as a host (PKI A) and as a proxy (PKI B,
    trusting CA A), configured as ours.
    """
    tmp = env.tmp / "ref"
    host = Node("ref-host", tmp / "host", hostConf(tmp / "host", env.pkiA),
                env.pkiA.ca, reference=refvenv)
    try:
        proxy = Node("ref-proxy", tmp / "proxy",
                     proxyConf(tmp / "proxy", env.pkiB, env.pkiA.ca),
                     env.pkiB.ca, reference=refvenv)
        try:
            yield host, proxy
        finally:
            proxy.stop()
    finally:
        host.stop()


def roundTrip(env, proxy, host, kind, size, seed):
    tid, path = env.newTransfer(kind, size, proxy=proxy, host=host)
    expected = digest(pattern(size, seed))
    status, body = upload(proxy, f"/images/{tid}", pattern(size, seed),
                          size)
    assert status == 200, body
    assert fileDigest(path, size) == expected
    status, got, n = download(proxy, f"/images/{tid}")
    assert (status, n, got) == (200, size, expected)
    return tid


@pytest.mark.parametrize("kind", ["file", "nbd"])
def test_our_proxy_reference_host(env, ref, kind):
    refHost, _ = ref
    size = 256 * MiB
    roundTrip(env, env.proxy, refHost, kind, size, seed=6)

    # Its errors pass too.
    tid = str(uuid.uuid4())
    env.proxy.addTicket(tid, refHost.imageURL(tid), MiB)
    direct = download(refHost, f"/images/{tid}")
    status, text, _ = download(env.proxy, f"/images/{tid}")
    assert direct[0] == 403
    assert (status, text) == (403, direct[1])


@pytest.mark.parametrize("kind", ["file", "nbd"])
def test_reference_proxy_our_host(env, ref, kind):
    _, refProxy = ref
    size = 256 * MiB
    tid = roundTrip(env, refProxy, env.host, kind, size, seed=7)
    # The reference proxy relays in buffer-sized requests.
    assert len(hostLogged(env.host, "WRITE", tid)) > 1
