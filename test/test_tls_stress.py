"""
Stress of the TLS writer thread's hand-off (imageio.web.bodywriter), on a
real daemon over real TLS: several client processes (test/stressclient.py)
run 2,000 keep-alive Range GETs of 1 byte to 24 MiB, a quarter cut in the
middle of the body by a close or a TCP reset, a third of the next requests
pipelined while a body streams, and uploads to a second ticket verified at
the end. Every byte is compared; the daemon must log no traceback and its
guard must never fire.

Large upload bodies (half of the PUTs) are decrypted by the reader thread
(imageio.web.bodyreader) on the same keep-alive connections, and runs of
small GETs are answered by the connection's read session
(imageio.web.readsession), which gives the connection back at the first
large range.

A synchronous hand-off (the thread started from inside the TLS layer's
dataReceived) failed this with "bad record mac" errors at the clients and
a daemon crash (TLS-HANDOFF.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test.support import (
    REPO, Daemon, controlRequest, daemonConf, makePKI, writeConf)

MiB = 1024 * 1024
CLIENTS = 4
GETS = 500
IMAGE_SIZE = 64 * MiB
REGION = 32 * MiB


@pytest.mark.slow
def test_tls_writer_stress(tmp_path):
    pki = makePKI(str(tmp_path / "pki"))
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki))
    image = tmp_path / "image.raw"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(CLIENTS * REGION)
    daemon = Daemon(conf)
    try:
        sock = os.path.join(str(tmp_path), "run", "sock")
        for uuid, path, size, ops in (
                ("stress-read", image, IMAGE_SIZE, ["read"]),
                ("stress-write", target, CLIENTS * REGION, ["write"])):
            status, _, body = controlRequest(
                sock, "PUT", f"/tickets/{uuid}",
                {"uuid": uuid, "size": size, "ops": ops, "timeout": 3600,
                 "url": f"file://{path}"})
            assert status == 200, body
        procs = []
        for i in range(CLIENTS):
            args = [sys.executable, "-m", "test.stressclient",
                    str(daemon.remotePort), pki.ca, str(image),
                    "stress-read", str(GETS), str(1000 + i),
                    "--upload", "stress-write", str(target),
                    str(i * REGION), str(REGION)]
            procs.append(subprocess.Popen(
                args, cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT))
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0, out.decode()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        daemon.stop()
    log = daemon.output()
    print(results)
    errors = [e for r in results for e in r["errors"]]
    gets = sum(r["gets"] for r in results)
    assert errors == []
    assert gets >= CLIENTS * GETS
    assert sum(r["cut"] + r["reset"] for r in results) > gets * 0.15
    assert sum(r["pipelined"] for r in results) > gets * 0.2
    assert sum(r["puts"] for r in results) > 0
    assert "Traceback" not in log
    assert "while a body thread owns it" not in log
    # The threads really carried the large bodies, both ways.
    assert log.count("handed to a writer thread") > gets * 0.2
    puts = sum(r["puts"] for r in results)
    assert log.count("handed to a reader thread") > puts * 0.25
    # And the read sessions (imageio.web.readsession) answered runs of
    # small GETs on the same connections, cut and pipelined as the rest.
    answered = sum(int(line.rsplit(": ", 1)[1].split()[0])
                   for line in log.splitlines()
                   if "answered by the thread" in line)
    assert log.count("served by a thread") > 0
    assert answered > gets * 0.05
