# -*- test-case-name: test.test_nbd_qemu -*-
"""
L{imageio.protocols.nbd} against real servers: qemu-nbd and nbdkit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer

from imageio.protocols import nbd
from imageio.protocols.nbd import NBDReplyError

MiB = 1 << 20

requiresQemu = pytest.mark.skipif(
    not (shutil.which("qemu-nbd") and shutil.which("qemu-img")),
    reason="qemu-nbd and qemu-img are required")
requiresNbdkit = pytest.mark.skipif(
    not shutil.which("nbdkit"), reason="nbdkit is required")


def _reactor():
    from twisted.internet import reactor
    return reactor


def waitForSocket(path, proc, timeout=10.0):
    """
    Poll until a UNIX socket accepts connections (bounded; fails if the
    server process exits).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode()}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} not ready after {timeout}s")
            time.sleep(0.01)
        finally:
            s.close()


class Server:
    """
    A server process on a UNIX socket; stopped by L{stop}.
    """

    def __init__(self, argv, sock):
        self.sock = str(sock)
        self.url = f"nbd:unix:{self.sock}"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        try:
            waitForSocket(self.sock, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture
def servers():
    started = []

    def start(argv, sock):
        server = Server(argv, sock)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def qemuNbd(servers, tmp_path):
    def start(image, fmt="raw", *extra):
        sock = tmp_path / f"qemu-{len(os.listdir(tmp_path))}.sock"
        return servers(["qemu-nbd", "--persistent", "--format", fmt,
                        "--socket", str(sock), "--cache", "writeback",
                        "--shared=8", *extra, str(image)], sock)
    return start


def run(*argv):
    return subprocess.run(argv, check=True, capture_output=True,
                          text=True).stdout


def qemuImgMap(image, fmt):
    return json.loads(run("qemu-img", "map", "--output", "json", "-f", fmt,
                          str(image)))


def ranges(items, key):
    """
    Merge consecutive (start, length, value) items with equal values.
    """
    out = []
    for start, length, value in items:
        value = key(value)
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, length, value])
    return [tuple(r) for r in out]


async def extentsOf(client, flagsFor):
    """
    Walk the whole export with BLOCK_STATUS; yield (start, length, value)
    per extent, C{flagsFor} picks the value from the context reply.
    """
    out = []
    offset = 0
    while offset < client.exportSize:
        reply = await client.blockStatus(offset, client.exportSize - offset)
        exts = reply[nbd.BASE_ALLOCATION]
        for length, flags in exts:
            length = min(length, client.exportSize - offset)
            out.append((offset, length, flagsFor(flags)))
            offset += length
            if offset == client.exportSize:
                break
    return out


def makeRaw(path, size, *writes):
    run("qemu-img", "create", "-f", "raw", str(path), str(size))
    if writes:
        qemuIo(path, "raw", *writes)
    return path


def makeQcow2(path, size, *writes, backing=None):
    argv = ["qemu-img", "create", "-f", "qcow2"]
    if backing:
        argv += ["-b", str(backing), "-F", "qcow2"]
    run(*argv, str(path), str(size))
    if writes:
        qemuIo(path, "qcow2", *writes)
    return path


def qemuIo(path, fmt, *commands):
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io is required")
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    run(*argv, str(path))


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_read_write_zero_flush(qemuNbd, tmp_path):
    image = makeRaw(tmp_path / "disk.raw", 16 * MiB)
    server = qemuNbd(image)
    client = await nbd.connect(_reactor(), server.url)
    try:
        assert client.exportSize == 16 * MiB
        assert client.structuredReplies
        assert client.canFlush and client.canZero
        assert client.hasBaseAllocation
        data = os.urandom(3 * MiB)
        await client.write(MiB, data)
        assert await client.read(MiB, 3 * MiB) == data
        assert await client.read(MiB - 10, 20) == bytes(10) + data[:10]

        await client.zero(2 * MiB, MiB, noHole=True)
        await client.zero(3 * MiB, 4096)
        await client.flush()
        got = await client.read(MiB, 3 * MiB)
        assert got == data[:MiB] + bytes(MiB + 4096) + data[2 * MiB + 4096:]
    finally:
        await client.close()
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(3 * MiB) == bytes(got)


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_zero_hole_flags(qemuNbd, tmp_path):
    """
    WRITE_ZEROES keeps the range allocated with NO_HOLE and punches a hole
    without it.
    """
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x01" * 4 * MiB)
    server = qemuNbd(image, "raw", "--discard=unmap")
    client = await nbd.connect(_reactor(), server.url)
    try:
        await client.zero(0, MiB, noHole=True)
        await client.zero(2 * MiB, MiB, noHole=False)
        await client.flush()
        got = await client.read(0, 4 * MiB)
    finally:
        await client.close()
    assert got == bytes(MiB) + b"\x01" * MiB + bytes(MiB) + b"\x01" * MiB
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 2 * MiB
        assert os.lseek(fd, 2 * MiB, os.SEEK_DATA) == 3 * MiB
    finally:
        os.close(fd)


def _walk(extents, start=0):
    for length, flags in extents:
        yield start, length, flags
        start += length


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_pipelined_reads_and_splitting(qemuNbd, tmp_path):
    image = tmp_path / "disk.raw"
    data = os.urandom(48 * MiB)
    image.write_bytes(data)
    server = qemuNbd(image, "raw", "--read-only")
    client = await nbd.connect(_reactor(), server.url)
    try:
        assert client.readOnly
        # 40 MiB is more than qemu-nbd's 32 MiB maximum: split by the client.
        ds = [client.read(0, 40 * MiB)]
        ds += [client.read(i * 512 * 1024 + 7, 512 * 1024)
               for i in range(64)]
        assert client.inFlight >= 2 + 64
        results = await defer.gatherResults(ds)
        assert results[0] == data[:40 * MiB]
        for i, got in enumerate(results[1:]):
            off = i * 512 * 1024 + 7
            assert got == data[off:off + 512 * 1024]
        with pytest.raises(NBDReplyError):
            await client.write(0, b"x")
    finally:
        await client.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_read_pieces(qemuNbd, tmp_path):
    """
    readPieces of data, holes and both, pipelined: the same bytes as read.
    """
    image = tmp_path / "disk.raw"
    data = bytearray(16 * MiB)
    data[:3 * MiB] = os.urandom(3 * MiB)
    data[9 * MiB:9 * MiB + 4096] = os.urandom(4096)
    with open(image, "wb") as f:
        f.truncate(len(data))
        f.write(data[:3 * MiB])
        f.seek(9 * MiB)
        f.write(data[9 * MiB:9 * MiB + 4096])
    server = qemuNbd(image, "raw", "--read-only")
    client = await nbd.connect(_reactor(), server.url)
    try:
        ranges = [(0, 2 * MiB), (2 * MiB, 2 * MiB), (4 * MiB, 2 * MiB),
                  (8 * MiB + 7, 2 * MiB), (0, 16 * MiB)]
        results = await defer.gatherResults(
            [client.readPieces(off, n) for off, n in ranges])
        for (off, n), pieces in zip(ranges, results):
            assert isinstance(pieces, list)
            assert b"".join(bytes(p) for p in pieces) == data[off:off + n]
    finally:
        await client.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_read_past_end(qemuNbd, tmp_path):
    server = qemuNbd(makeRaw(tmp_path / "d.raw", MiB))
    client = await nbd.connect(_reactor(), server.url)
    try:
        with pytest.raises(NBDReplyError) as e:
            await client.read(MiB - 10, 20)
        assert e.value.errno == 22
        # Still usable after an error reply.
        assert await client.read(0, 10) == bytes(10)
    finally:
        await client.close()


@requiresQemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest_twisted.ensureDeferred
async def test_block_status_matches_qemu_img_map(qemuNbd, tmp_path, fmt):
    writes = ["write -P 1 1M 1M", "write -z 4M 1M", "write -P 2 8M 64k",
              "write -P 3 12M 2M"]
    if fmt == "raw":
        image = makeRaw(tmp_path / "d.raw", 16 * MiB, *writes)
    else:
        image = makeQcow2(tmp_path / "d.qcow2", 16 * MiB, *writes)
    expected = ranges(
        [(e["start"], e["length"], e["zero"]) for e in qemuImgMap(image, fmt)],
        bool)
    server = qemuNbd(image, fmt, "--read-only")
    client = await nbd.connect(_reactor(), server.url)
    try:
        got = ranges(await extentsOf(client, lambda f: f & nbd.STATE_ZERO),
                     bool)
    finally:
        await client.close()
    assert got == expected


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_allocation_depth_backing(qemuNbd, tmp_path):
    base = makeQcow2(tmp_path / "base.qcow2", 16 * MiB, "write -P 1 0 2M",
                     "write -P 3 6M 1M")
    top = makeQcow2(tmp_path / "top.qcow2", 16 * MiB, "write -P 2 1M 2M",
                    "write -z 10M 1M", backing=base)
    server = qemuNbd(top, "qcow2", "--read-only", "--allocation-depth")
    client = await nbd.connect(_reactor(), server.url)
    try:
        assert client.hasAllocationDepth
        reply = await client.blockStatus(0, 16 * MiB)
    finally:
        await client.close()
    # Allocation depth 0 means allocated in no layer of the chain, which is
    # qemu-img map's "present": false.
    got = ranges(_walk(reply[nbd.ALLOCATION_DEPTH]), lambda d: d == 0)
    expected = ranges(
        [(e["start"], e["length"], e["present"])
         for e in qemuImgMap(top, "qcow2")], lambda p: not p)
    assert got == expected
    assert got == [(0, 3 * MiB, False), (3 * MiB, 3 * MiB, True),
                   (6 * MiB, MiB, False), (7 * MiB, 3 * MiB, True),
                   (10 * MiB, MiB, False), (11 * MiB, 5 * MiB, True)]


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_dirty_bitmap(qemuNbd, tmp_path):
    image = makeQcow2(tmp_path / "d.qcow2", 16 * MiB, "write -P 9 0 1M")
    run("qemu-img", "bitmap", "--add", "--enable", "-f", "qcow2", str(image),
        "b0")
    qemuIo(image, "qcow2", "write -P 7 2M 128k", "write -z 5M 64k",
           "write -P 1 9M 1M")
    server = qemuNbd(image, "qcow2", "--read-only", "--bitmap", "b0")
    client = await nbd.connect(_reactor(), server.url, dirty=True)
    try:
        assert client.dirtyBitmap == "qemu:dirty-bitmap:b0"
        reply = await client.blockStatus(0, 16 * MiB)
    finally:
        await client.close()
    dirty = [(s, n) for s, n, d in ranges(
        _walk(reply[client.dirtyBitmap]), lambda f: bool(f & 1)) if d]
    assert dirty == [(2 * MiB, 128 * 1024), (5 * MiB, 64 * 1024),
                     (9 * MiB, MiB)]


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_dirty_without_bitmap(qemuNbd, tmp_path):
    server = qemuNbd(makeRaw(tmp_path / "d.raw", MiB))
    client = await nbd.connect(_reactor(), server.url, dirty=True)
    try:
        assert client.dirtyBitmap is None
        assert client.hasBaseAllocation
    finally:
        await client.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_unknown_export(qemuNbd, tmp_path):
    server = qemuNbd(makeRaw(tmp_path / "d.raw", MiB), "raw",
                     "--export-name", "sda")
    with pytest.raises(nbd.NBDOptionError) as e:
        await nbd.connect(_reactor(), server.url + ":exportname=nope")
    assert "nope" in str(e.value)
    client = await nbd.connect(_reactor(),
                               f"nbd+unix:///sda?socket={server.sock}")
    await client.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_server_dies_with_requests_in_flight(qemuNbd, tmp_path):
    image = tmp_path / "d.raw"
    image.write_bytes(os.urandom(32 * MiB))
    server = qemuNbd(image)
    client = await nbd.connect(_reactor(), server.url)
    ds = [client.read(i * MiB, MiB) for i in range(32)]
    server.proc.kill()
    results = await defer.DeferredList(ds, consumeErrors=True)
    failures = [r for ok, r in results if not ok]
    assert failures, "some reads must fail"
    for f in failures:
        assert f.check(nbd.NBDConnectionLost)
    await client.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_connect_refused(tmp_path):
    with pytest.raises(Exception):
        await nbd.connect(_reactor(), f"nbd:unix:{tmp_path}/none.sock")


@requiresNbdkit
@pytest_twisted.ensureDeferred
async def test_nbdkit_memory(servers, tmp_path):
    sock = tmp_path / "kit.sock"
    server = servers(["nbdkit", "-f", "-U", str(sock), "memory", "1G"], sock)
    client = await nbd.connect(_reactor(), server.url)
    try:
        assert client.exportSize == 1 << 30
        await client.write(100 * MiB, b"abc" * 1000)
        await client.zero(100 * MiB + 10, 10, noHole=True)
        await client.flush()
        got = await client.read(100 * MiB, 3000)
        assert got == b"abcabcabca" + bytes(10) + (b"abc" * 1000)[20:]
        reply = await client.blockStatus(0, 1 << 30)
        assert reply[nbd.BASE_ALLOCATION][0] == (100 * MiB,
                                                 nbd.STATE_HOLE
                                                 | nbd.STATE_ZERO)
    finally:
        await client.close()


@requiresNbdkit
@pytest_twisted.ensureDeferred
async def test_nbdkit_error_replies(servers, tmp_path):
    sock = tmp_path / "kit.sock"
    server = servers(["nbdkit", "-f", "-U", str(sock), "--filter=error",
                      "memory", "64M", "error-pread=EIO",
                      "error-pread-rate=1", "error-pwrite=ENOSPC",
                      "error-pwrite-rate=1"], sock)
    client = await nbd.connect(_reactor(), server.url)
    try:
        results = await defer.DeferredList(
            [client.read(0, 4096), client.write(0, b"x" * 512),
             client.read(MiB, 10)], consumeErrors=True)
        errnos = [r.value.errno for ok, r in results]
        assert errnos == [5, 28, 5]
        # Still usable: block status does not go through pread.
        reply = await client.blockStatus(0, 64 * MiB)
        assert reply[nbd.BASE_ALLOCATION]
    finally:
        await client.close()
