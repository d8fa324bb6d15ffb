"""
Our client library against the REFERENCE daemon (ovirt-imageio 2.5.1 from
its own virtualenv): upload and download of raw and qcow2 images, data
identical (qemu-img compare), and our checksum equal to its /checksum.
"""

from __future__ import annotations

import shutil

import pytest
import pytest_twisted
from twisted.internet import reactor

from imageio.client import aio
from imageio.units import MiB

from test.test_client import (
    WRITES, compare, make_image, qemu_img, refvenv_python,
    start_reference_daemon)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")


@pytest.fixture(scope="module")
def refdaemon(tmp_path_factory):
    python = refvenv_python()
    if python is None:
        pytest.skip("reference virtualenv missing")
    tmp = str(tmp_path_factory.mktemp("refdaemon"))
    proc, handle = start_reference_daemon(tmp, python)
    yield handle
    handle.stop_servers()
    proc.terminate()
    proc.wait(20)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_upload_download(refdaemon, tmp_path, fmt):
    src = str(tmp_path / f"src.{fmt}")
    make_image(src, fmt, 64 * MiB, WRITES)
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(64 * MiB))
    url = refdaemon.serve(dst, "raw", 64 * MiB)
    await aio.upload(src, url, refdaemon.pki.ca, reactor=reactor)
    compare(src, dst)
    back = str(tmp_path / f"back.{fmt}")
    await aio.download(url, back, refdaemon.pki.ca, fmt=fmt,
                       reactor=reactor)
    compare(src, back)
    ours = await aio.checksum(src, reactor=reactor)
    server = await aio.remote_checksum(url, refdaemon.pki.ca,
                                       reactor=reactor)
    assert ours == server
