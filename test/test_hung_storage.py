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
import subprocess
import sys
import time

import pytest

from imageio.units import MiB
from test import hungfs


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
        mounted.append(fs)
        return fs.mount()

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
