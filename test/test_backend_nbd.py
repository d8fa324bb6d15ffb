# -*- test-case-name: test.test_backend_nbd -*-
"""
Tests for L{imageio.backends.nbd}: extent logic against a fake client, and
the whole backend against qemu-nbd and nbdkit.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio.backends import IBackend
from imageio.backends import nbd as backend
from imageio.errors import BackendError, UnsupportedOperation
from imageio.extents import DirtyExtent, ZeroExtent
from imageio.protocols import nbd
from imageio.units import GiB, MiB

requiresQemu = pytest.mark.skipif(
    not (shutil.which("qemu-nbd") and shutil.which("qemu-img")
         and shutil.which("qemu-io")),
    reason="qemu-nbd, qemu-img and qemu-io are required")
requiresNbdkit = pytest.mark.skipif(
    not shutil.which("nbdkit"), reason="nbdkit is required")


class FakeClient:
    """
    Just enough of L{nbd.NBDClient} for the backend, with canned block
    status replies.
    """

    def __init__(self, size, replies=(), contexts=(nbd.BASE_ALLOCATION,),
                 dirtyBitmap=None, canZero=True, maxBlock=32 * MiB):
        self.exportSize = size
        self.exportName = "fake"
        self.minimumBlockSize = 512
        self.maximumBlockSize = maxBlock
        self.canZero = canZero
        self.metaContexts = {name: i for i, name in enumerate(contexts)}
        self.dirtyBitmap = dirtyBitmap
        self.replies = list(replies)
        self.calls = []
        self.closed = 0

    @property
    def hasBaseAllocation(self):
        return nbd.BASE_ALLOCATION in self.metaContexts

    def blockStatus(self, offset, length):
        self.calls.append(("status", offset, length))
        return defer.succeed(self.replies.pop(0))

    def zero(self, offset, length, noHole=False):
        self.calls.append(("zero", offset, length, noHole))
        return defer.succeed(None)

    def read(self, offset, length):
        self.calls.append(("read", offset, length))
        return defer.succeed(bytearray(length))

    def close(self):
        self.closed += 1
        return defer.succeed(None)


def make(client, **kw):
    return backend.NBDBackend(client, **kw)


BA = nbd.BASE_ALLOCATION
DEPTH = nbd.ALLOCATION_DEPTH
BITMAP = "qemu:dirty-bitmap:b0"


class ExtentsTests(SynchronousTestCase):

    def test_interface(self):
        verifyObject(IBackend, make(FakeClient(MiB)))

    def test_no_base_allocation(self):
        b = make(FakeClient(10 * MiB, contexts=()))
        self.assertEqual(self.successResultOf(b.extents("zero")),
                         [ZeroExtent(0, 10 * MiB, False, False)])

    def test_merge_and_clip(self):
        # Neighbours with equal flags merge; the last extent reaches past
        # the end and is clipped; extents beyond the end are ignored.
        client = FakeClient(10 * MiB, [
            {BA: [(MiB, 0), (MiB, 0), (2 * MiB, 3), (MiB, 2)]},
            {BA: [(MiB, 2), (10 * MiB, 0), (MiB, 3)]},
        ])
        b = make(client)
        self.assertEqual(self.successResultOf(b.extents()), [
            ZeroExtent(0, 2 * MiB, False, False),
            # STATE_HOLE is not exposed but still splits extents.
            ZeroExtent(2 * MiB, 2 * MiB, True, False),
            ZeroExtent(4 * MiB, 2 * MiB, True, False),
            ZeroExtent(6 * MiB, 4 * MiB, False, False),
        ])
        self.assertEqual(client.calls, [("status", 0, 10 * MiB),
                                        ("status", 5 * MiB, 5 * MiB)])

    def test_steps(self):
        # Steps of MAX_STATUS_STEP (4 GiB - 1 MiB): the largest aligned
        # length one request carries.
        step = backend.MAX_STATUS_STEP
        self.assertEqual(step, 4 * GiB - MiB)
        size = 9 * GiB
        client = FakeClient(size, [{BA: [(step, 3)]},
                                   {BA: [(step, 3)]},
                                   {BA: [(size - 2 * step, 0)]}])
        b = make(client)
        self.assertEqual(self.successResultOf(b.extents()), [
            ZeroExtent(0, 2 * step, True, False),
            ZeroExtent(2 * step, size - 2 * step, False, False)])
        self.assertEqual(client.calls, [("status", 0, step),
                                        ("status", step, step),
                                        ("status", 2 * step,
                                         size - 2 * step)])

    def test_allocation_depth(self):
        client = FakeClient(8 * MiB, [{
            BA: [(4 * MiB, 0), (4 * MiB, 3)],
            DEPTH: [(MiB, 1), (5 * MiB, 0), (2 * MiB, 2)],
        }], contexts=(BA, DEPTH))
        self.assertEqual(self.successResultOf(make(client).extents()), [
            ZeroExtent(0, MiB, False, False),
            ZeroExtent(MiB, 3 * MiB, False, True),
            ZeroExtent(4 * MiB, 2 * MiB, True, True),
            ZeroExtent(6 * MiB, 2 * MiB, True, False)])

    def test_dirty(self):
        client = FakeClient(8 * MiB, [{
            BA: [(2 * MiB, 0), (6 * MiB, 3)],
            BITMAP: [(MiB, 0), (2 * MiB, 1), (5 * MiB, 0)],
            DEPTH: [(8 * MiB, 0)],
        }], contexts=(BA, DEPTH, BITMAP), dirtyBitmap=BITMAP)
        b = make(client, dirty=True)
        self.assertEqual(self.successResultOf(b.extents("dirty")), [
            DirtyExtent(0, MiB, False, False),
            DirtyExtent(MiB, MiB, True, False),
            DirtyExtent(2 * MiB, MiB, True, True),
            DirtyExtent(3 * MiB, 5 * MiB, False, True)])

    def test_dirty_not_requested(self):
        client = FakeClient(MiB, dirtyBitmap=BITMAP)
        self.failureResultOf(make(client).extents("dirty"),
                             UnsupportedOperation)

    def test_dirty_no_bitmap(self):
        b = make(FakeClient(MiB), dirty=True)
        self.failureResultOf(b.extents("dirty"), UnsupportedOperation)

    def test_unknown_context(self):
        self.failureResultOf(make(FakeClient(MiB)).extents("nope"),
                             UnsupportedOperation)

    def test_empty_image(self):
        b = make(FakeClient(0))
        self.assertEqual(self.successResultOf(b.extents()), [])

    def test_reply_without_context(self):
        b = make(FakeClient(MiB, [{DEPTH: [(MiB, 0)]}]))
        self.failureResultOf(b.extents(), BackendError)


class BackendTests(SynchronousTestCase):

    def test_defaults(self):
        b = make(FakeClient(MiB, maxBlock=32 * MiB))
        self.assertEqual((b.name, b.blockSize, b.maxReaders, b.maxWriters,
                          b.maxRequest, b.size()),
                         ("nbd", 512, 8, 8, 8 * MiB, MiB))

    def test_small_server_max(self):
        b = make(FakeClient(MiB, maxBlock=MiB), bufferSize=8 * MiB,
                 maxConnections=4)
        self.assertEqual((b.maxRequest, b.maxReaders, b.maxWriters),
                         (MiB, 4, 4))

    def test_read_clipped(self):
        client = FakeClient(MiB)
        b = make(client)
        self.assertEqual(len(self.successResultOf(b.read(MiB - 10, 100))),
                         10)
        self.assertEqual(self.successResultOf(b.read(MiB, 100)), b"")
        self.assertEqual(client.calls, [("read", MiB - 10, 10)])

    def test_read_only(self):
        b = make(FakeClient(MiB), mode="r")
        self.failureResultOf(b.write(0, b"x"), BackendError)
        self.failureResultOf(b.zero(0, 10), BackendError)

    def test_zero_flags(self):
        client = FakeClient(MiB)
        self.successResultOf(make(client, mode="r+").zero(0, 10))
        self.successResultOf(make(client, mode="r+", sparse=True).zero(0, 10))
        self.assertEqual(client.calls, [("zero", 0, 10, True),
                                        ("zero", 0, 10, False)])

    def test_zero_unsupported(self):
        b = make(FakeClient(MiB, canZero=False), mode="r+")
        self.failureResultOf(b.zero(0, 10), BackendError)

    def test_close_idempotent(self):
        client = FakeClient(MiB)
        b = make(client)
        self.successResultOf(b.close())
        self.successResultOf(b.close())
        self.assertEqual(client.closed, 1)
        self.failureResultOf(b.read(0, 1), BackendError)

    def test_bad_mode(self):
        self.failureResultOf(backend.open(None, "nbd:unix:/x", mode="x"),
                             ValueError)


# Real servers.

def run(*argv):
    return subprocess.run(argv, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def serve(tmp_path):
    procs = []

    def start(argv, sock):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"{argv[0]} exited"
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(sock))
                break
            except OSError:
                assert time.monotonic() < deadline, f"{sock} not ready"
                time.sleep(0.01)
            finally:
                s.close()
        return f"nbd:unix:{sock}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def qemuNbd(serve, tmp_path):
    def start(image, fmt, *extra):
        sock = tmp_path / f"q{len(os.listdir(tmp_path))}.sock"
        return serve(["qemu-nbd", "--persistent", "-f", fmt, "-k", str(sock),
                      "--cache", "writeback", "--shared=8", *extra,
                      str(image)], sock)
    return start


def reactor():
    from twisted.internet import reactor
    return reactor


def makeImage(path, fmt, size, *writes, backing=None):
    argv = ["qemu-img", "create", "-f", fmt]
    if backing:
        argv += ["-b", str(backing), "-F", fmt]
    run(*argv, str(path), str(size))
    argv = ["qemu-io", "-f", fmt]
    for w in writes:
        argv += ["-c", w]
    if writes:
        run(*argv, str(path))
    return path


def asDicts(extents):
    return [e.toDict() for e in extents]


# What ovirt-imageio 2.5.1's nbd backend reports for the same images
# (collected by running the reference against qemu-nbd 7.2).
REF_BACKING = [
    {"start": 0, "length": 3145728, "zero": False, "hole": False},
    {"start": 3145728, "length": 3145728, "zero": True, "hole": True},
    {"start": 6291456, "length": 1048576, "zero": False, "hole": False},
    {"start": 7340032, "length": 3145728, "zero": True, "hole": True},
    {"start": 10485760, "length": 1048576, "zero": True, "hole": False},
    {"start": 11534336, "length": 5242880, "zero": True, "hole": True}]
REF_BITMAP_ZERO = [
    {"start": 0, "length": 2097152, "zero": True, "hole": False},
    {"start": 2097152, "length": 131072, "zero": False, "hole": False},
    {"start": 2228224, "length": 7208960, "zero": True, "hole": False},
    {"start": 9437184, "length": 1048576, "zero": False, "hole": False},
    {"start": 10485760, "length": 6291456, "zero": True, "hole": False}]
REF_BITMAP_DIRTY = [
    {"start": 0, "length": 2097152, "dirty": False, "zero": True},
    {"start": 2097152, "length": 131072, "dirty": True, "zero": False},
    {"start": 2228224, "length": 3014656, "dirty": False, "zero": True},
    {"start": 5242880, "length": 65536, "dirty": True, "zero": True},
    {"start": 5308416, "length": 4128768, "dirty": False, "zero": True},
    {"start": 9437184, "length": 1048576, "dirty": True, "zero": False},
    {"start": 10485760, "length": 6291456, "dirty": False, "zero": True}]


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_extents_backing_chain(qemuNbd, tmp_path):
    base = makeImage(tmp_path / "base.qcow2", "qcow2", 16 * MiB,
                     "write -P 1 0 2M", "write -P 3 6M 1M")
    top = makeImage(tmp_path / "top.qcow2", "qcow2", 16 * MiB,
                    "write -P 2 1M 2M", "write -z 10M 1M", backing=base)
    url = qemuNbd(top, "qcow2", "--allocation-depth", "--read-only")
    b = await backend.open(reactor(), url, mode="r")
    try:
        assert asDicts(await b.extents("zero")) == REF_BACKING
    finally:
        await b.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_extents_dirty(qemuNbd, tmp_path):
    image = makeImage(tmp_path / "d.qcow2", "qcow2", 16 * MiB)
    run("qemu-img", "bitmap", "--add", "--enable", "-f", "qcow2", str(image),
        "b0")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 2M 128k", "-c",
        "write -z 5M 64k", "-c", "write -P 1 9M 1M", str(image))
    url = qemuNbd(image, "qcow2", "-B", "b0", "--read-only")
    b = await backend.open(reactor(), url, mode="r", dirty=True)
    try:
        plain = await backend.open(reactor(), url, mode="r")
    except BaseException:
        await b.close()
        raise
    try:
        assert asDicts(await b.extents("zero")) == REF_BITMAP_ZERO
        assert asDicts(await b.extents("dirty")) == REF_BITMAP_DIRTY
        with pytest.raises(UnsupportedOperation):
            await plain.extents("dirty")
    finally:
        await b.close()
        await plain.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_extents_raw_match_qemu_img_map(qemuNbd, tmp_path):
    image = makeImage(tmp_path / "r.raw", "raw", 16 * MiB,
                      "write -P 1 1M 1M", "write -z 4M 1M",
                      "write -P 2 8M 64k")
    url = qemuNbd(image, "raw")
    b = await backend.open(reactor(), url, mode="r")
    try:
        extents = await b.extents()
    finally:
        await b.close()
    import json
    qmap = json.loads(run("qemu-img", "map", "--output", "json", "-f", "raw",
                          str(image)))
    merged = []
    for e in qmap:
        if merged and merged[-1][1] == e["zero"]:
            merged[-1][0] += e["length"]
        else:
            merged.append([e["length"], e["zero"]])
    ours = []
    for e in extents:
        assert not e.hole
        if ours and ours[-1][1] == e.zero:
            ours[-1][0] += e.length
        else:
            ours.append([e.length, e.zero])
    assert ours == merged
    assert sum(e.length for e in extents) == 16 * MiB


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_read_write_zero_flush(qemuNbd, tmp_path):
    image = makeImage(tmp_path / "d.raw", "raw", 4 * MiB)
    url = qemuNbd(image, "raw")
    config = SimpleNamespace(daemon=SimpleNamespace(max_connections=4),
                             backend_nbd=SimpleNamespace(buffer_size=MiB))
    b = await backend.open(reactor(), url, mode="r+", config=config)
    try:
        ro = await backend.open(reactor(), url, mode="r")
    except BaseException:
        await b.close()
        raise
    try:
        assert (b.maxReaders, b.maxWriters, b.maxRequest, b.blockSize) == \
            (4, 4, MiB, 1)
        assert b.size() == 4 * MiB
        data = os.urandom(MiB)
        await defer.gatherResults([b.write(i * MiB, data) for i in range(4)])
        await b.zero(MiB, MiB)
        await b.flush()
        got = await b.read(0, 2 * MiB)
        assert got == data + bytes(MiB)
        assert len(await b.read(4 * MiB - 100, MiB)) == 100
        assert await ro.read(0, 10) == data[:10]
        with pytest.raises(BackendError):
            await ro.write(0, b"x")
        with pytest.raises(BackendError):
            await ro.zero(0, 10)
        await ro.flush()
    finally:
        await b.close()
        await b.close()
        await ro.close()


@requiresQemu
@pytest_twisted.ensureDeferred
async def test_write_to_read_only_export(qemuNbd, tmp_path):
    image = makeImage(tmp_path / "d.raw", "raw", MiB)
    url = qemuNbd(image, "raw", "--read-only")
    b = await backend.open(reactor(), url, mode="r+")
    try:
        with pytest.raises(BackendError) as e:
            await b.write(0, b"x")
        assert "NBD write failed" in str(e.value)
    finally:
        await b.close()


@pytest_twisted.ensureDeferred
async def test_open_fails(tmp_path):
    with pytest.raises(BackendError) as e:
        await backend.open(reactor(), f"nbd:unix:{tmp_path}/no.sock",
                           mode="r")
    assert "Cannot open NBD backend" in str(e.value)
    with pytest.raises(BackendError):
        await backend.open(reactor(), "nbd:garbage", mode="r")


@requiresNbdkit
@pytest_twisted.ensureDeferred
async def test_nbdkit_errors(serve, tmp_path):
    sock = tmp_path / "kit.sock"
    url = serve(["nbdkit", "-f", "-U", str(sock), "--filter=error", "memory",
                 "16M", "error-pread=EIO", "error-pread-rate=1"], sock)
    b = await backend.open(reactor(), url, mode="r+")
    try:
        with pytest.raises(BackendError) as e:
            await b.read(0, 4096)
        assert "Input/output error" in str(e.value)
        await b.write(0, b"x" * 4096)
        await b.zero(4096, 4096)
        await b.flush()
        extents = await b.extents()
        # nbdkit's memory plugin allocates in pages of its own size.
        assert extents[0].start == 0 and not extents[0].zero
        assert extents[-1].zero and extents[-1].end == 16 * MiB
    finally:
        await b.close()
