"""
The blocking client API and the C{imageio} command, run in subprocesses
(they run their own reactor) against our daemon as a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from imageio.units import MiB

from test.support import freePort, makePKI
from test.test_client import (
    WRITES, compare, make_image, qemu_img, start_our_daemon)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "imageio.client.cli"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("daemon"))
    d, handle = start_our_daemon(tmp)
    yield handle
    handle.stop_servers()
    d.stop()


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          timeout=120, **kw)


def test_blocking_api(daemon, tmp_path):
    src = str(tmp_path / "src.qcow2")
    make_image(src, "qcow2", 64 * MiB, WRITES)
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(64 * MiB))
    url = daemon.serve(dst, "raw", 64 * MiB)
    back = str(tmp_path / "back.qcow2")
    code = textwrap.dedent(f"""
        import io, json
        from imageio import client
        url, ca = {url!r}, {daemon.pki.ca!r}
        client.upload({src!r}, url, ca)
        # Several calls in one process share one reactor thread.
        client.download(url, {back!r}, ca, max_workers=2)
        local = client.checksum({src!r})
        info = client.info({back!r})
        extents = [e.toDict() for e in client.extents({src!r})]
        with client.ImageioClient(url, ca) as c:
            c.write(0, b"z" * 4096)
            buf = bytearray(4096)
            c.read(0, buf)
            assert buf == b"z" * 4096
            c.read_from(io.BytesIO(b"w" * 8192), 8192, 8192)
            out = io.BytesIO()
            c.write_to(out, 8192, 8192)
            assert out.getvalue() == b"w" * 8192
            c.zero(0, 16384)
            c.flush()
            size = c.size()
        print(json.dumps({{"checksum": local, "format": info["format"],
                          "extents": extents, "size": size}}))
    """)
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    compare(src, back)
    assert result["format"] == "qcow2"
    assert result["size"] == 64 * MiB
    assert result["extents"][-1]["start"] + result["extents"][-1][
        "length"] == 64 * MiB


def test_cli_upload_download_verify_json(daemon, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 32 * MiB, WRITES[:2])
    dst = str(tmp_path / "dst.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", dst, str(32 * MiB))
    url = daemon.serve(dst, "qcow2", 32 * MiB)
    r = run([*CLI, "upload", src, url, "--cafile", daemon.pki.ca,
             "--verify", "--output", "json", "--buffer-size", "1m",
             "--max-workers", "2"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    progress = [x for x in lines if "transferred" in x]
    assert progress[-1]["transferred"] == 32 * MiB
    assert progress[-1]["size"] == 32 * MiB
    assert progress[-1]["description"] == "upload completed"
    assert {"verified": True} .items() <= lines[-2].items() or any(
        x.get("verified") for x in lines)
    compare(src, dst)
    back = str(tmp_path / "back.raw")
    r = run([*CLI, "download", url, back, "-f", "raw", "--cafile",
             daemon.pki.ca, "--verify"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""      # not a terminal: no progress bar
    compare(src, back)
    # checksum and extents of a url.
    r = run([*CLI, "checksum", url, "--cafile", daemon.pki.ca, "-o",
             "json"])
    assert r.returncode == 0, r.stderr
    r2 = run([*CLI, "checksum", src, "-o", "json"])
    assert json.loads(r.stdout) == json.loads(r2.stdout)
    r = run([*CLI, "extents", url, "--cafile", daemon.pki.ca, "-o",
             "json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[-1]["start"] < 32 * MiB


def test_cli_progress_bar_on_terminal(daemon, tmp_path):
    if shutil.which("script") is None:
        pytest.skip("script(1) is needed")
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 16 * MiB, WRITES[:2])
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(16 * MiB))
    url = daemon.serve(dst, "raw", 16 * MiB)
    cmd = " ".join([*CLI, "upload", src, url, "--cafile", daemon.pki.ca])
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"],
                       capture_output=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"[ 100% ] 16.00 MiB" in r.stdout
    assert b"upload completed" in r.stdout
    # Lines overwrite each other; the last one ends the line.
    assert b"\r[" in r.stdout
    compare(src, dst)


def _one_line_error(r, *words):
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("imageio: error: "), r.stderr
    for w in words:
        assert w in lines[0], r.stderr


def test_cli_errors(daemon, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 1 * MiB, [])
    ca = daemon.pki.ca
    # Bad url (nobody listening), unsupported url.
    dead = f"https://localhost:{freePort()}/images/x"
    _one_line_error(run([*CLI, "upload", src, dead, "--cafile", ca]),
                    dead)
    _one_line_error(run([*CLI, "upload", src, "ftp://x/y"]), "ftp://x/y")
    # No such ticket: the server's 403 and its text.
    _one_line_error(run([*CLI, "upload", src, daemon.url("missing"),
                         "--cafile", ca]), "403")
    # Missing file.
    _one_line_error(run([*CLI, "upload", str(tmp_path / "nope.raw"),
                         daemon.url("missing"), "--cafile", ca]),
                    "No such file")
    _one_line_error(run([*CLI, "info", str(tmp_path / "nope.raw")]),
                    "No such file")
    # Certificate failure (another CA).
    other = makePKI(str(tmp_path / "other"))
    _one_line_error(run([*CLI, "download", daemon.url("x"),
                         str(tmp_path / "out.raw"), "--cafile", other.ca]),
                    "ertificate")
    # --insecure accepts it (then the ticket is missing: 403).
    _one_line_error(run([*CLI, "download", daemon.url("x"),
                         str(tmp_path / "out.raw"), "--insecure"]), "403")
    # Bad option values are usage errors (argparse: exit 2).
    r = run([*CLI, "upload", src, dead, "--buffer-size", "12q"])
    assert r.returncode == 2


def test_cli_sigterm(daemon, tmp_path):
    # A slow upload (the target is served by a qemu-nbd limited by a tiny
    # buffer and many workers is not enough to be slow: use a big image
    # and kill early).
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", 512 * MiB, [(0, 512 * MiB, 0x11)])
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(512 * MiB))
    url = daemon.serve(dst, "raw", 512 * MiB)
    proc = subprocess.Popen(
        [*CLI, "upload", src, url, "--cafile", daemon.pki.ca, "-o", "json",
         "--buffer-size", "64k", "--max-workers", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the transfer moves.
    line = proc.stdout.readline()
    while line and json.loads(line)["transferred"] == 0:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err
    # No private qemu-nbd is left behind (it may take a moment to exit).
    deadline = time.monotonic() + 10
    while True:
        ps = subprocess.run(["pgrep", "-af", "qemu-nbd.*imageio-"],
                            capture_output=True, text=True).stdout
        if src not in ps or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert src not in ps
