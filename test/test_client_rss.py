"""
Client memory (issue 15: under 200 MiB for a 4 GiB transfer). A 4 GiB
image with 512 MiB of data (the rest zero, so the test stays fast) is
uploaded and downloaded over TLS with the server's default 8 connections,
by the library's blocking API and by the `imageio` command, each in a
fresh process reporting its own peak RSS (VmHWM; the private qemu-nbd is
another process). The dense 4 GiB case is bench/client_rss.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from imageio.units import GiB, MiB

from test.test_client import (
    compare, make_image, qemu_img, start_our_daemon)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 4 * GiB
DATA = [(i * GiB, 128 * MiB, 0x41 + i) for i in range(4)]
LIMIT_MIB = 200

# The peak RSS is VmHWM, which starts afresh at exec. Not ru_maxrss: Linux
# carries it over from the process that forked us (pytest, several hundred
# MiB late in the suite) across exec.
_RUN = textwrap.dedent("""
    import json, sys
    from imageio import client
    from imageio.client import cli
    op, args, kw = json.loads(sys.argv[1])
    if op == "cli":
        if cli.main(args) != 0:
            sys.exit(1)
    else:
        getattr(client, op)(*args, **kw)
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM:")][0]
    print(json.dumps(int(hwm.split()[1])))
""")


def peak_rss_mib(op, args, **kw):
    r = subprocess.run([sys.executable, "-c", _RUN,
                        json.dumps([op, args, kw])],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]) / 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("daemon"))
    d, handle = start_our_daemon(tmp, extra={"local": {"enable": False}})
    yield handle
    handle.stop_servers()
    d.stop()


def test_client_rss_4g(daemon, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", SIZE, DATA)
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(SIZE))
    # A sparse ticket: zeroing deallocates, so the 3.5 GiB of zeros do not
    # take disk space (CI machines may have little).
    url = daemon.serve(dst, "raw", SIZE, sparse=True)
    ca = daemon.pki.ca
    rss = {}
    rss["upload"] = peak_rss_mib("upload", [src, url, ca])
    compare(src, dst)
    back = str(tmp_path / "back.qcow2")
    rss["download"] = peak_rss_mib("download", [url, back, ca])
    compare(src, back)
    os.unlink(back)
    cli_back = str(tmp_path / "cli.raw")
    rss["cli download"] = peak_rss_mib(
        "cli", ["download", url, cli_back, "-f", "raw", "--cafile", ca])
    compare(src, cli_back)
    os.unlink(cli_back)
    print("client peak RSS (MiB):", rss)
    for what, mib in rss.items():
        assert mib < LIMIT_MIB, f"{what}: {mib:.1f} MiB"
