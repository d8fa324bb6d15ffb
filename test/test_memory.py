"""
Bounded memory: a daemon process moving 1 GiB each way over TLS keeps its
peak RSS far below the image size, and never spools a body to a
temporary file (bench/rss.py measures the same with 4 GiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from test.support import (
    Daemon, controlRequest, daemonConf, makePKI, writeConf)

GiB = 1 << 30
LIMIT = 150 * (1 << 20)


def vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def deletedFiles(pid):
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            found.append(target)
    return found


@pytest.mark.slow
def test_upload_download_1g_bounded(tmp_path):
    pki = makePKI(str(tmp_path / "pki"))
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki))
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        # Real data at both ends, a hole between: the bytes still cross
        # the socket either way.
        f.write(os.urandom(64 << 20))
        f.truncate(GiB)
        f.seek(GiB - (64 << 20))
        f.write(os.urandom(64 << 20))
    target = tmp_path / "target.raw"
    target.touch()
    d = Daemon(conf)
    try:
        sock = str(tmp_path / "run" / "sock")
        ticket = {"uuid": "m", "size": GiB, "ops": ["read", "write"],
                  "timeout": 300, "url": f"file://{target}"}
        assert controlRequest(sock, "PUT", "/tickets/m", ticket)[0] == 200
        url = f"https://127.0.0.1:{d.remotePort}/images/m"
        base = vm(d.proc.pid, "VmRSS")

        seen = []
        stop = threading.Event()

        def watch():
            while not stop.wait(0.05):
                seen.extend(deletedFiles(d.proc.pid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            up = subprocess.run(
                ["curl", "-sS", "--fail-with-body", "--cacert", pki.ca,
                 "-T", str(src), url], capture_output=True, timeout=300)
        finally:
            stop.set()
            watcher.join()
        assert up.returncode == 0, up.stderr
        assert seen == []  # nothing spooled to a temporary file

        down = subprocess.run(
            ["curl", "-sS", "--fail-with-body", "--cacert", pki.ca, "-o",
             str(tmp_path / "down.raw"), url],
            capture_output=True, timeout=300)
        assert down.returncode == 0, down.stderr
        peak = vm(d.proc.pid, "VmHWM")
        assert peak < LIMIT, (base, peak)
        info = json.loads(controlRequest(sock, "GET", "/tickets/m")[2])
        assert info["active"] is False
    finally:
        d.stop()
    assert subprocess.run(["cmp", str(src), str(target)]).returncode == 0
    assert subprocess.run(["cmp", str(src), str(tmp_path / "down.raw")]
                          ).returncode == 0
