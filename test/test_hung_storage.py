"""
Storage that hangs in the kernel, as a dead NFS mount does: a FUSE mount
(L{test.hungfs}) whose reads are never answered once it "dies", under a
real daemon with one process and with workers. Tickets on it tie up only
their own threads, a ticket on healthy storage is still served, and
SIGTERM stops the daemon within 10 s with status 0.

Needs /dev/fuse and root (mount(2)); without them a skip, and a failure in
CI (C{CI=true}), as for the other tools of the suite.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from imageio.backends import filegate
from imageio.units import MiB
from test import hungfs
from test.support import (
    Daemon, UnixHTTPConnection, controlRequest, daemonConf, httpsConnection,
    makePKI, request, writeConf)
from test.test_workers import workerPids

# As in the issue: twenty read tickets on the dead mount, more than the
# I/O threads of a process with the default max_connections (8).
HUNG = 20
POOL = 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return makePKI(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def mount(tmp_path):
    """
    A function mounting a L{hungfs.HungFS} in C{tmp_path}; every mount is
    unmounted and aborted at the end of the test, whatever happened.
    """
    reason = hungfs.unavailable()
    if reason is not None:
        message = f"cannot mount FUSE: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    mounted = []

    def mount(files, **kw):
        fs = hungfs.HungFS(str(tmp_path / f"mnt{len(mounted)}"), files, **kw)
        try:
            fs.mount()
        except OSError as e:
            # No CAP_SYS_ADMIN (a container), no fuse module...
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount FUSE: {e}")
            pytest.skip(f"cannot mount FUSE: {e}")
        mounted.append(fs)
        return fs

    yield mount
    for fs in mounted:
        fs.close()
    for fs in mounted:
        assert fs.error is None, fs.error
        with open("/proc/self/mountinfo") as f:
            assert f" {fs.mountpoint} " not in f.read()


def _reader(path):
    return subprocess.Popen(
        [sys.executable, "-c",
         "import sys\n"
         "try:\n"
         "    open(sys.argv[1], 'rb').read()\n"
         "except OSError as e:\n"
         "    print(e.errno, flush=True)\n", path],
        stdout=subprocess.PIPE)


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_hungfs(mount):
    """
    The helper itself: files read back, then reads wait in the kernel
    until the reader is killed (as on NFS); an unkillable wait ends when
    the mount is closed.
    """
    fs = mount({"a.raw": MiB, "b.raw": 3 * 4096})
    assert sorted(os.listdir(fs.mountpoint)) == ["a.raw", "b.raw"]
    assert os.stat(fs.path("a.raw")).st_size == MiB
    with open(fs.path("a.raw"), "rb") as f:
        assert f.read() == hungfs.content("a.raw", 0, MiB)
    fd = os.open(fs.path("b.raw"), os.O_RDONLY | os.O_DIRECT)
    os.close(fd)
    fs.hang()
    p = _reader(fs.path("a.raw"))
    try:
        assert fs.waitHeld(1)
        time.sleep(0.5)
        assert p.poll() is None
        assert _state(p.pid) in "SD"
        assert fs.heldBy() == {p.pid}
        p.kill()
        p.wait(5)
        deadline = time.monotonic() + 5
        while fs.held:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()

    # Any request named can hang: a stat, with no attributes cached.
    attrs = mount({"d.raw": 4096}, hang=("getattr",), attrTimeout=0)
    attrs.hang()
    p = subprocess.Popen([sys.executable, "-c", "import os, sys\n"
                          "os.stat(sys.argv[1])", attrs.path("d.raw")])
    try:
        assert attrs.waitHeld(1)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()

    stuck = mount({"c.raw": MiB}, killable=False)
    stuck.hang()
    p = _reader(stuck.path("c.raw"))
    try:
        assert stuck.waitHeld(1)
        p.kill()
        time.sleep(0.5)
        assert p.poll() is None     # even SIGKILL waits
        stuck.close()
        assert p.wait(5) == -signal.SIGKILL
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------
# The daemon.


def _start(tmp_path, pki, workers):
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki,
                               extra={"daemon": {"workers": workers}}))
    return Daemon(conf)


def _control(tmp_path):
    return str(tmp_path / "run" / "sock")


def _addTicket(tmp_path, uuid, path, size):
    status, _, body = controlRequest(_control(tmp_path), "PUT",
                                     f"/tickets/{uuid}", {
                                         "uuid": uuid, "size": size,
                                         "ops": ["read"], "timeout": 300,
                                         "url": f"file://{path}"})
    assert status == 200, body


def _hungGets(d, pki, fs, names, held=None):
    """
    Start a GET of each ticket in C{names} and wait until C{held} of them
    (default: all) hold a thread in the mount; return the client sockets.
    """
    ctx = ssl.create_default_context(cafile=pki.ca)
    clients = []
    for name in names:
        s = ctx.wrap_socket(socket.create_connection(
            ("127.0.0.1", d.remotePort), timeout=10),
            server_hostname="127.0.0.1")
        s.sendall(f"GET /images/{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        clients.append(s)
    held = len(names) if held is None else held
    assert fs.waitHeld(held), (len(fs.held), d.output()[-3000:])
    return clients


@pytest.mark.parametrize("workers", [1, 2])
def test_hung_mount_does_not_stall(tmp_path, pki, mount, workers):
    """
    Twenty read tickets on a mount that stops answering, their clients
    gone after 2 s: each GET holds a thread stuck in the kernel (in the
    processes that serve tickets: the workers with workers = 2), a ticket
    on healthy storage is served at once, and SIGTERM stops the daemon
    within 10 s with status 0.
    """
    names = [f"h{i}" for i in range(HUNG)]
    fs = mount({f"{name}.raw": MiB for name in names})
    d = _start(tmp_path, pki, workers)
    stopped = False
    try:
        for name in names:
            _addTicket(tmp_path, name, fs.path(f"{name}.raw"), MiB)
        image = tmp_path / "image.raw"
        image.write_bytes(b"x" * MiB)
        _addTicket(tmp_path, "ok", image, MiB)
        # Before the storage dies, the daemon reads it.
        con = httpsConnection(d.remotePort, pki.ca, timeout=10)
        status, _, body = request(con, "GET", "/images/h0", None,
                                  {"Range": "bytes=4096-8191"})
        con.close()
        assert status == 206
        assert body == hungfs.content("h0.raw", 4096, 4096)

        fs.hang()
        # Each GET opens its file: the open's O_DIRECT probe read hangs.
        # All the pool's threads are soon stuck (those of one of the
        # workers, or both), the other GETs wait for one.
        clients = _hungGets(d, pki, fs, names, held=POOL)
        serving = ({d.proc.pid} if workers == 1
                   else set(workerPids(d).values()))
        assert fs.heldBy() <= serving, (fs.heldBy(), serving)
        time.sleep(2)
        for s in clients:
            s.close()

        started = time.monotonic()
        con = httpsConnection(d.remotePort, pki.ca, timeout=5)
        try:
            status, _, body = request(con, "GET", "/images/ok")
        finally:
            con.close()
        assert status == 200 and body == b"x" * MiB
        assert time.monotonic() - started < 5
        # The storage did not come back: every GET got to it, and waits.
        assert fs.waitHeld(HUNG, 5), len(fs.held)

        stopping = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        status = d.proc.wait(30)
        elapsed = time.monotonic() - stopping
        stopped = True
    finally:
        if not stopped:
            d.stop()
        d.stop()
    assert status == 0, d.output()
    assert elapsed < 10, d.output()
    assert "Traceback" not in d.output()
    # The stuck threads ended with their processes (a fatal signal ends
    # the wait, as on NFS).
    deadline = time.monotonic() + 5
    while fs.held:
        assert time.monotonic() < deadline, fs.held
        time.sleep(0.05)


def test_unkillable_worker_does_not_hold_stop(tmp_path, pki, mount):
    """
    A worker that even SIGKILL does not end (a thread in an
    uninterruptible wait in storage): the main process stops the workers
    in parallel within one bound, gives up on it, and exits within 10 s
    of SIGTERM with status 0; the worker goes once the storage answers
    (here: the mount is aborted).
    """
    names = [f"u{i}" for i in range(4)]
    fs = mount({f"{name}.raw": MiB for name in names}, killable=False)
    d = _start(tmp_path, pki, workers=2)
    stopped = False
    try:
        for name in names:
            _addTicket(tmp_path, name, fs.path(f"{name}.raw"), MiB)
        pids = set(workerPids(d).values())
        fs.hang()
        clients = _hungGets(d, pki, fs, names)
        stuck = fs.heldBy()
        assert stuck and stuck <= pids, (stuck, pids)
        for s in clients:
            s.close()

        stopping = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        status = d.proc.wait(30)
        elapsed = time.monotonic() - stopping
        stopped = True
        # The stuck workers are still there.
        assert all(os.path.exists(f"/proc/{pid}") for pid in stuck)
    finally:
        if not stopped:
            d.stop()
        fs.close()
        # Their wait ends with the connection, and so do they (reaped by
        # init or left as zombies, never in D state).
        deadline = time.monotonic() + 10
        for pid in stuck if stopped else ():
            while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
                assert time.monotonic() < deadline, pid
                time.sleep(0.05)
        d.stop()
    assert status == 0, d.output()
    assert elapsed < 10, d.output()
    assert "did not end 8.0 s after SIGTERM" in d.output()
    assert "Traceback" not in d.output()


def test_hung_stat_does_not_freeze_reactor(tmp_path, pki, mount):
    """
    A second request on a kept-alive connection, after the mount died and
    with no attributes cached (NFS revalidates them after C{acregmax}, at
    most 60 s by default): the daemon keeps answering its control API.
    (FileBackend.size() used to fstat in the reactor for every request.)
    """
    fs = mount({"s.raw": MiB}, hang=("read", "getattr"), attrTimeout=0)
    d = _start(tmp_path, pki, workers=1)
    try:
        _addTicket(tmp_path, "s", fs.path("s.raw"), MiB)
        con = httpsConnection(d.remotePort, pki.ca, timeout=10)
        status, _, _ = request(con, "GET", "/images/s", None,
                               {"Range": "bytes=0-4095"})
        assert status == 206
        fs.hang()
        con.sock.sendall(b"GET /images/s HTTP/1.1\r\nHost: x\r\n"
                         b"Range: bytes=4096-8191\r\n\r\n")
        assert fs.waitHeld(1)
        control = UnixHTTPConnection(_control(tmp_path), timeout=5)
        try:
            status, _, _ = request(control, "GET", "/tickets/s")
        finally:
            control.close()
        assert status == 200
    finally:
        # The storage answers again (aborted): the daemon can stop.
        fs.close()
        d.stop()


# ---------------------------------------------------------------------------
# The pool grows past stuck calls.


@pytest_twisted.ensureDeferred
async def test_stalled_call_grows_pool(monkeypatch):
    """
    Calls on different files that never return fill the pool; once they
    count as stuck the pool gets a thread for each, and a call queued
    behind them runs. When they return, the pool is its own size again.
    """
    monkeypatch.setattr(filegate, "STALL_TIMEOUT", 0.2)
    tp = ThreadPool(minthreads=0, maxthreads=2, name="test-stall")
    tp.start()
    release = threading.Event()
    try:
        stuck = [filegate.gated(reactor, tp, f"/hung{i}", release.wait,
                                    30) for i in range(2)]
        ok = filegate.gated(reactor, tp, "/healthy", lambda: "done")
        ok.addTimeout(5, reactor)
        assert await ok == "done"
        deadline = reactor.seconds() + 5
        while filegate.stalled.get(tp) != 2:
            assert reactor.seconds() < deadline
            d = defer.Deferred()
            reactor.callLater(0.02, d.callback, None)
            await d
        assert tp.max == 4
        assert filegate.stalled[tp] == 2
        assert filegate.FileGate.limit(tp) == 1
        release.set()
        assert await defer.gatherResults(stuck) == [True, True]
        assert tp.max == 2
        assert tp not in filegate.stalled
    finally:
        release.set()
        tp.stop()
