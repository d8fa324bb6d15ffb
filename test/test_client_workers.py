"""
How many connections the client uses (issue 15): as many as the server
offers (C{max_writers} / C{max_readers} from OPTIONS) unless the caller
chooses fewer, and still driven by extents (zero ranges never cross the
wire as data). Measured with a counting TCP relay in front of our daemon
(TLS, no local unix socket so that every byte goes through the relay).
"""

from __future__ import annotations

import shutil

import pytest
import pytest_twisted
from twisted.internet import reactor

from imageio.client import aio
from imageio.units import MiB

from test.test_client import (
    compare, make_image, qemu_img, start_our_daemon)
from test.test_client_errors import Relay

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are needed")

OFFERED = 6
"""
The daemon's max_connections: more than the reference client's 4.
"""

SIZE = 64 * MiB
DATA = [(i * 10 * MiB, 1 * MiB, 0x10 + i) for i in range(OFFERED)]
DATA_BYTES = sum(n for _, n, _ in DATA)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("daemon"))
    d, handle = start_our_daemon(tmp, extra={
        "local": {"enable": False},
        "daemon": {"max_connections": OFFERED}})
    yield handle
    handle.stop_servers()
    d.stop()


@pytest.fixture
def relay(daemon):
    r = Relay(daemon.port)
    yield r
    r.close()


@pytest_twisted.ensureDeferred
async def test_upload_uses_the_offered_writers(daemon, relay, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", SIZE, DATA)
    # The target holds other data everywhere: zero ranges must be zeroed.
    dst = str(tmp_path / "dst.raw")
    make_image(dst, "raw", SIZE, [(0, SIZE, 0x77)])
    url = relay.url(daemon.serve(dst, "raw", SIZE), daemon.port)
    client = await aio.ImageioClient.open(url, daemon.pki.ca,
                                          reactor=reactor)
    assert client.max_writers == OFFERED
    await client.close()
    relay.peak = 0
    await aio.upload(src, url, daemon.pki.ca, reactor=reactor)
    compare(src, dst)
    assert OFFERED <= relay.peak <= OFFERED + 1
    # Only the data extents were sent (plus headers and TLS).
    assert DATA_BYTES <= relay.up < DATA_BYTES + 1 * MiB


@pytest_twisted.ensureDeferred
async def test_upload_caller_chooses_fewer(daemon, relay, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", SIZE, DATA)
    dst = str(tmp_path / "dst.raw")
    qemu_img("create", "-q", "-f", "raw", dst, str(SIZE))
    url = relay.url(daemon.serve(dst, "raw", SIZE), daemon.port)
    await aio.upload(src, url, daemon.pki.ca, max_workers=2,
                     reactor=reactor)
    compare(src, dst)
    assert 1 <= relay.peak <= 3


@pytest_twisted.ensureDeferred
async def test_download_uses_the_offered_readers(daemon, relay, tmp_path):
    src = str(tmp_path / "src.raw")
    make_image(src, "raw", SIZE, DATA)
    url = relay.url(daemon.serve(src, "raw", SIZE, ops=("read",)),
                    daemon.port)
    dst = str(tmp_path / "dst.qcow2")
    await aio.download(url, dst, daemon.pki.ca, reactor=reactor)
    compare(src, dst)
    assert OFFERED <= relay.peak <= OFFERED + 1
    assert DATA_BYTES <= relay.down < DATA_BYTES + 1 * MiB
    # The caller's choice wins when smaller.
    relay.peak = 0
    await aio.download(url, str(tmp_path / "one.raw"), daemon.pki.ca,
                       fmt="raw", max_workers=1, reactor=reactor)
    compare(src, str(tmp_path / "one.raw"))
    assert relay.peak <= 2


def test_workers_choice():
    assert aio._workers(8, None) == 8
    assert aio._workers(8, 4) == 4
    assert aio._workers(2, 4) == 2
    assert aio._workers(64, None) == aio.WORKERS_LIMIT
    assert aio._workers(64, 12) == 12
    assert aio._workers(1, None) == 1
