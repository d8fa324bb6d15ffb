# -*- test-case-name: test.test_backend_file -*-
"""
Tests for L{imageio.backends.file}: real files on the test machine's /tmp
(ext4 here), tmpfs (/dev/shm), a loop device when we can make one, and a
comparison with the reference daemon's file backend where one is installed.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool

from imageio import config as configmod
from imageio.backends import IBackend, file as filebackend, filegate
from imageio.backends.file import FileBackend
from imageio.errors import BackendError, UnsupportedOperation
from imageio.extents import ZeroExtent
from imageio.units import KiB, MiB
from test import support

SHM = "/dev/shm"


@pytest.fixture
def pool():
    tp = ThreadPool(minthreads=0, maxthreads=4, name="test-backend-file")
    tp.start()
    yield tp
    tp.stop()


@pytest.fixture
def backends():
    """
    Backends opened by a test, closed at teardown.
    """
    opened = []
    yield opened
    for b in opened:
        b.close()


@pytest.fixture
def shmDir(tmp_path):
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm")
    path = os.path.join(SHM, f"imageio-test-{os.getpid()}-{tmp_path.name}")
    os.mkdir(path)
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


async def openFile(pool, backends, path, **kw):
    b = await FileBackend.open(reactor, str(path), threadpool=pool, **kw)
    backends.append(b)
    return b


def makeFile(path, data=b"", size=None):
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return str(path)


def content(path):
    with open(path, "rb") as f:
        return f.read()


def allocated(path):
    return os.stat(path).st_blocks * 512


def pattern(length, seed=1):
    """
    Non-zero, position-dependent bytes.
    """
    block = bytes((i * 7 + seed) % 251 + 1 for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


# Reference comparison: the reference's own backend applies the same
# operations to a copy of the file, and we compare the results.

_REFERENCE_SCRIPT = r"""
import json, mmap, sys, urllib.parse
from ovirt_imageio._internal.backends import file
args = json.loads(sys.stdin.read())
result = {}
with file.open(urllib.parse.urlparse("file://" + args["path"]), "r+",
               sparse=args["sparse"]) as b:
    result["block_size"] = b.block_size
    for op in args["ops"]:
        if op[0] == "write":
            # As the daemon's write operation: chunks copied to the start of
            # an aligned buffer, a first short chunk up to a block boundary.
            data = bytes.fromhex(op[2])
            buf = mmap.mmap(-1, len(data), mmap.MAP_SHARED)
            b.seek(op[1])
            chunks = [data]
            head = op[1] % b.block_size
            if head:
                n = min(len(data), b.block_size - head)
                chunks = [data[:n], data[n:]]
            for chunk in chunks:
                buf[:len(chunk)] = chunk
                view = memoryview(buf)[:len(chunk)]
                pos = 0
                while pos < len(chunk):
                    pos += b.write(view[pos:])
                view.release()
        elif op[0] == "zero":
            b.seek(op[1])
            left = op[2]
            while left:
                left -= b.zero(left)
    b.flush()
print(json.dumps(result))
"""


def runReference(path, ops, sparse=False):
    # IMAGEIO_REFVENV (make test sets it); a failure in CI when missing.
    out = subprocess.run(
        [support.referencePython(), "-c", _REFERENCE_SCRIPT],
        input=json.dumps({"path": str(path), "ops": ops, "sparse": sparse}),
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def runOurs(pool, backends, path, ops, sparse=False):
    b = await openFile(pool, backends, path, sparse=sparse)
    for op in ops:
        if op[0] == "write":
            await b.write(op[1], bytes.fromhex(op[2]))
        else:
            await b.zero(op[1], op[2])
    await b.flush()
    await b.close()
    return b


# Opening.


def test_interface():
    from zope.interface.verify import verifyClass
    assert verifyClass(IBackend, FileBackend)


@pytest_twisted.ensureDeferred
async def test_open_url_and_config(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", pattern(8192))
    cfg = configmod.Config()
    cfg = cfg.replace("daemon", max_connections=4)
    cfg = cfg.replace("backend_file", buffer_size=128 * KiB)
    b = await filebackend.open(reactor, "file://" + path, mode="r",
                               config=cfg, threadpool=pool)
    backends.append(b)
    assert b.name == "file"
    assert b.maxReaders == 4
    assert b.maxWriters == 1
    assert b.maxRequest == 128 * KiB
    assert b.direct
    assert b.size() == 8192
    assert await b.read(0, 8192) == pattern(8192)


@pytest_twisted.ensureDeferred
async def test_open_defaults(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", pattern(4096))
    b = await filebackend.open(reactor, "file://" + path, mode="r+",
                               threadpool=pool)
    backends.append(b)
    assert (b.maxReaders, b.maxWriters, b.maxRequest) == (8, 1, 8 * MiB)


@pytest_twisted.ensureDeferred
async def test_open_missing(tmp_path, pool):
    with pytest.raises(BackendError) as e:
        await FileBackend.open(reactor, str(tmp_path / "missing"),
                               threadpool=pool)
    assert "No such file" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_open_directory(tmp_path, pool):
    with pytest.raises(BackendError):
        await FileBackend.open(reactor, str(tmp_path), mode="r",
                               threadpool=pool)


@pytest.mark.parametrize("data,size,expected", [
    # Allocated first block: 1-byte direct reads are refused.
    (b"x" * 4096, None, 512),
    # Empty or unallocated first block: 1 byte "works", so 4096.
    (b"", None, 4096),
    (b"", 1 * MiB, 4096),
])
@pytest_twisted.ensureDeferred
async def test_block_size_probe(tmp_path, pool, backends, data, size,
                                expected):
    path = makeFile(tmp_path / "image", data, size)
    b = await openFile(pool, backends, path)
    assert b.direct
    assert b.blockSize == expected
    await b.close()
    # The reference finds the same size.
    assert runReference(path, [])["block_size"] == expected


@pytest_twisted.ensureDeferred
async def test_buffered_fallback_at_open(tmp_path, pool, backends,
                                         monkeypatch):
    """
    A filesystem refusing O_DIRECT at open (EINVAL, as older tmpfs) gets
    buffered I/O, without alignment or padding.
    """
    realOpen = os.open

    def noDirect(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return realOpen(path, flags, *args)
    monkeypatch.setattr(filebackend, "_osOpen", noDirect)
    path = makeFile(tmp_path / "image", pattern(1000))
    b = await openFile(pool, backends, path)
    assert not b.direct
    assert b.blockSize == 1
    await b.write(1000, b"tail")
    assert b.size() == 1004
    assert await b.read(998, 100) == pattern(1000)[998:] + b"tail"
    await b.zero(10, 20)
    assert content(path) == (pattern(10) + bytes(20) + pattern(1000)[30:]
                             + b"tail")


@pytest_twisted.ensureDeferred
async def test_buffered_fallback_when_probe_fails(tmp_path, pool, backends,
                                                  monkeypatch):
    path = makeFile(tmp_path / "image", pattern(4096))
    monkeypatch.setattr(filebackend, "_probeBlockSize", lambda fd: None)
    b = await openFile(pool, backends, path)
    assert not b.direct
    assert b.blockSize == 1
    assert await b.read(1, 3) == pattern(4)[1:]


@pytest_twisted.ensureDeferred
async def test_tmpfs(shmDir, pool, backends):
    """
    tmpfs: direct or not depending on the kernel, never an error; zeroing
    falls back from ZERO_RANGE (unsupported there) to punch + allocate.
    """
    path = makeFile(os.path.join(shmDir, "image"), pattern(1 * MiB))
    b = await openFile(pool, backends, path)
    await b.write(4096, b"\xff" * 8192)
    await b.zero(64 * KiB, 128 * KiB)
    await b.flush()
    expected = bytearray(pattern(1 * MiB))
    expected[4096:4096 + 8192] = b"\xff" * 8192
    expected[64 * KiB:192 * KiB] = bytes(128 * KiB)
    assert await b.read(0, 1 * MiB) == expected
    assert content(path) == expected
    assert not b._canZeroRange
    assert b._canPunchHole and b._canFallocate


@pytest_twisted.ensureDeferred
async def test_forced_buffered(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image")
    b = await openFile(pool, backends, path, direct=False)
    assert not b.direct and b.blockSize == 1
    await b.write(0, b"abc")
    assert content(path) == b"abc"


# Reading.


@pytest_twisted.ensureDeferred
async def test_read_aligned_and_unaligned(tmp_path, pool, backends):
    data = pattern(3 * MiB + 1000)
    path = makeFile(tmp_path / "image", data)
    b = await openFile(pool, backends, path, mode="r",
                       bufferSize=1 * MiB)
    assert b.size() == len(data)
    for offset, length in [(0, 4096), (0, 1 * MiB), (512, 512), (1, 1),
                           (4095, 2), (1000, 70000), (1 * MiB - 1, 1 * MiB),
                           (3 * MiB, 1000), (3 * MiB + 999, 1)]:
        got = await b.read(offset, length)
        assert isinstance(got, bytes)
        assert got == data[offset:offset + length], (offset, length)


@pytest_twisted.ensureDeferred
async def test_read_larger_than_buffer(tmp_path, pool, backends):
    data = pattern(600 * KiB)
    path = makeFile(tmp_path / "image", data)
    b = await openFile(pool, backends, path, bufferSize=128 * KiB)
    assert await b.read(3, 500 * KiB) == data[3:3 + 500 * KiB]


@pytest_twisted.ensureDeferred
async def test_read_at_eof(tmp_path, pool, backends):
    data = pattern(5000)
    path = makeFile(tmp_path / "image", data)
    b = await openFile(pool, backends, path)
    assert await b.read(4000, 4096) == data[4000:]
    assert await b.read(4999, 10) == data[4999:]
    assert await b.read(5000, 10) == b""
    assert await b.read(8192, 4096) == b""
    assert await b.read(0, 0) == b""


@pytest_twisted.ensureDeferred
async def test_read_holes(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", b"", 2 * MiB)
    b = await openFile(pool, backends, path)
    assert await b.read(12345, 1 * MiB) == bytes(1 * MiB)


# Writing.


@pytest_twisted.ensureDeferred
async def test_write_aligned(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", b"", 1 * MiB)
    b = await openFile(pool, backends, path)
    data = pattern(256 * KiB)
    await b.write(64 * KiB, data)
    await b.flush()
    assert b.size() == 1 * MiB
    expected = bytes(64 * KiB) + data + bytes(1 * MiB - 320 * KiB)
    assert content(path) == expected
    assert await b.read(0, 1 * MiB) == expected


@pytest_twisted.ensureDeferred
async def test_write_bytearray_and_memoryview(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", b"", 8192)
    b = await openFile(pool, backends, path)
    await b.write(0, bytearray(b"a" * 4096))
    await b.write(4096, memoryview(b"b" * 8192)[:4096])
    assert content(path) == b"a" * 4096 + b"b" * 4096


@pytest.mark.parametrize("offset,length", [
    (1, 10), (4090, 20), (100, 10000), (0, 100), (8192, 5000),
    (512, 512), (4096, 1), (12000, 200000),
])
@pytest_twisted.ensureDeferred
async def test_write_unaligned_inside(tmp_path, pool, backends, offset,
                                      length):
    size = 512 * KiB
    original = pattern(size)
    path = makeFile(tmp_path / "image", original)
    b = await openFile(pool, backends, path)
    data = b"\xee" * length
    await b.write(offset, data)
    expected = original[:offset] + data + original[offset + length:]
    assert content(path) == expected
    assert b.size() == size


@pytest_twisted.ensureDeferred
async def test_write_at_eof_pads_to_block_size(tmp_path, pool, backends):
    """
    Direct I/O: a write ending mid-block at the end of the file leaves it
    padded with zeroes to the block size, like the reference.
    """
    path = makeFile(tmp_path / "image", pattern(4096))
    b = await openFile(pool, backends, path)
    assert b.blockSize == 512
    await b.write(4096, b"x" * 100)
    assert b.size() == 4096 + 512
    assert content(path) == pattern(4096) + b"x" * 100 + bytes(412)
    await b.write(4096 + 512 + 10, b"y" * 10)
    assert b.size() == 4096 + 1024
    assert await b.read(4096, 1024) == (b"x" * 100 + bytes(422)
                                        + b"y" * 10 + bytes(492))


@pytest_twisted.ensureDeferred
async def test_write_after_eof(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image")
    b = await openFile(pool, backends, path)
    assert b.blockSize == 4096
    await b.write(10000, b"z" * 3)
    assert b.size() == 12288
    assert content(path) == bytes(10000) + b"zzz" + bytes(2285)


@pytest_twisted.ensureDeferred
async def test_write_empty(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", pattern(1000))
    b = await openFile(pool, backends, path)
    await b.write(1000, b"")
    assert b.size() == 1000


@pytest_twisted.ensureDeferred
async def test_write_matches_reference(tmp_path, pool, backends):
    ops = [
        ["write", 0, pattern(5000).hex()],
        ["write", 7000, pattern(300, 2).hex()],
        ["write", 4096, pattern(4096, 3).hex()],
        ["write", 20000, pattern(10, 4).hex()],
        ["write", 33, pattern(70000, 5).hex()],
        ["zero", 100, 300],
        ["zero", 50000, 40000],
        ["zero", 120000, 3],
    ]
    for sparse in (False, True):
        ours = makeFile(tmp_path / f"ours-{sparse}", pattern(1234, 9))
        theirs = makeFile(tmp_path / f"theirs-{sparse}", pattern(1234, 9))
        runReference(theirs, ops, sparse=sparse)
        await runOurs(pool, backends, ours, ops, sparse=sparse)
        assert os.path.getsize(ours) == os.path.getsize(theirs)
        assert content(ours) == content(theirs)


# Zeroing.


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("offset,length", [
    (0, 1 * MiB), (4096, 8192), (1000, 5000), (100, 10), (0, 4 * MiB),
    (2 * MiB, 2 * MiB), (3 * MiB + 100, 1 * MiB),
])
@pytest_twisted.ensureDeferred
async def test_zero_content(tmp_path, pool, backends, sparse, offset,
                            length):
    size = 3 * MiB + 512
    original = pattern(size)
    path = makeFile(tmp_path / "image", original)
    b = await openFile(pool, backends, path, sparse=sparse)
    await b.zero(offset, length)
    await b.flush()
    end = offset + length
    newSize = max(size, end if end % b.blockSize == 0
                  else end + b.blockSize - end % b.blockSize)
    expected = bytearray(original) + bytearray(max(0, newSize - size))
    expected[offset:end] = bytes(length)
    assert content(path) == expected
    assert b.size() == newSize


def _zeroModes(b, mode):
    if mode in ("punch", "eof", "manual"):
        b._canZeroRange = False
    if mode in ("eof", "manual"):
        b._canPunchHole = False
    if mode == "manual":
        b._canFallocate = False


@pytest.mark.parametrize("mode", ["zero_range", "punch", "eof", "manual"])
@pytest_twisted.ensureDeferred
async def test_zero_allocating(tmp_path, pool, backends, mode):
    """
    Non-sparse zero in each strategy: content zero, space stays allocated.
    """
    path = makeFile(tmp_path / "image", pattern(2 * MiB))
    b = await openFile(pool, backends, path)
    _zeroModes(b, mode)
    await b.zero(256 * KiB, 1 * MiB)
    # Past the end: extends the file.
    await b.zero(2 * MiB, 1 * MiB)
    await b.flush()
    assert b.size() == 3 * MiB
    assert content(path) == (pattern(256 * KiB) + bytes(1 * MiB)
                             + pattern(2 * MiB)[1280 * KiB:] + bytes(1 * MiB))
    assert allocated(path) >= 3 * MiB
    # Holes (or unwritten extents) read as zero: never reported as data
    # with different content; the extents cover the file.
    extents = await b.extents()
    assert sum(e.length for e in extents) == 3 * MiB


@pytest.mark.parametrize("mode", ["punch", "manual"])
@pytest_twisted.ensureDeferred
async def test_zero_sparse(tmp_path, pool, backends, mode):
    path = makeFile(tmp_path / "image", pattern(2 * MiB))
    b = await openFile(pool, backends, path, sparse=True)
    if mode == "manual":
        b._canPunchHole = False
    await b.zero(256 * KiB, 1 * MiB)
    await b.zero(2 * MiB, 1 * MiB)      # extends with ftruncate
    await b.flush()
    assert b.size() == 3 * MiB
    assert content(path) == (pattern(256 * KiB) + bytes(1 * MiB)
                             + pattern(2 * MiB)[1280 * KiB:] + bytes(1 * MiB))
    if mode == "punch":
        assert allocated(path) <= 1 * MiB + 64 * KiB
        assert await b.extents() == [
            ZeroExtent(0, 256 * KiB, False),
            ZeroExtent(256 * KiB, 1 * MiB, True),
            ZeroExtent(1280 * KiB, 768 * KiB, False),
            ZeroExtent(2 * MiB, 1 * MiB, True),
        ]
    else:
        assert allocated(path) >= 2 * MiB


@pytest_twisted.ensureDeferred
async def test_zero_unsupported_is_remembered(tmp_path, pool, backends,
                                              monkeypatch):
    calls = []

    def fakeFallocate(fd, mode, offset, length):
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    monkeypatch.setattr(filebackend, "fallocate", fakeFallocate)
    path = makeFile(tmp_path / "image", pattern(1 * MiB))
    b = await openFile(pool, backends, path)
    await b.zero(0, 64 * KiB)
    # zero range, then punch hole; the end-of-file mode is not tried here.
    assert calls == [filebackend.FALLOC_FL_ZERO_RANGE,
                     filebackend.FALLOC_FL_PUNCH_HOLE
                     | filebackend.FALLOC_FL_KEEP_SIZE]
    del calls[:]
    await b.zero(64 * KiB, 64 * KiB)
    # Everything is known to fail now except plain fallocate, which is
    # tried only past the end of the file.
    assert calls == []
    await b.zero(1 * MiB, 64 * KiB)
    assert calls == [0]
    await b.zero(2 * MiB, 64 * KiB)
    assert calls == [0]
    assert content(path) == bytes(128 * KiB) + pattern(1 * MiB)[128 * KiB:] \
        + bytes(1 * MiB + 64 * KiB)


@pytest_twisted.ensureDeferred
async def test_zero_other_errors_fail(tmp_path, pool, backends, monkeypatch):
    def fakeFallocate(fd, mode, offset, length):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(filebackend, "fallocate", fakeFallocate)
    path = makeFile(tmp_path / "image", pattern(1 * MiB))
    b = await openFile(pool, backends, path)
    with pytest.raises(BackendError) as e:
        await b.zero(0, 64 * KiB)
    assert isinstance(e.value.__cause__, OSError)


# Extents.


@pytest_twisted.ensureDeferred
async def test_extents_holes(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", b"", 4 * MiB)
    b = await openFile(pool, backends, path)
    assert await b.extents() == [ZeroExtent(0, 4 * MiB, True)]
    await b.write(1 * MiB, pattern(64 * KiB))
    await b.write(3 * MiB, pattern(1 * MiB))
    extents = await b.extents("zero")
    assert extents == [
        ZeroExtent(0, 1 * MiB, True),
        ZeroExtent(1 * MiB, 64 * KiB, False),
        ZeroExtent(1 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, True),
        ZeroExtent(3 * MiB, 1 * MiB, False),
    ]
    assert [e.toDict()["hole"] for e in extents] == [False] * 4


@pytest_twisted.ensureDeferred
async def test_extents_data_and_empty(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", pattern(1000))
    b = await openFile(pool, backends, path)
    assert await b.extents() == [ZeroExtent(0, 1000, False)]
    empty = await openFile(pool, backends, makeFile(tmp_path / "empty"))
    # The reference's answer for an empty file.
    assert await empty.extents() == [ZeroExtent(0, 0, False)]


@pytest_twisted.ensureDeferred
async def test_extents_dirty_unsupported(tmp_path, pool, backends):
    b = await openFile(pool, backends, makeFile(tmp_path / "i", b"x"))
    with pytest.raises(UnsupportedOperation):
        await b.extents("dirty")


# Read-only mode, flush, close, concurrency.


@pytest_twisted.ensureDeferred
async def test_read_only_refuses_writes(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", pattern(8192))
    b = await openFile(pool, backends, path, mode="r")
    with pytest.raises(BackendError):
        await b.write(0, b"x" * 4096)
    with pytest.raises(BackendError):
        await b.zero(0, 4096)
    await b.flush()
    assert content(path) == pattern(8192)


@pytest_twisted.ensureDeferred
async def test_flush(tmp_path, pool, backends, monkeypatch):
    path = makeFile(tmp_path / "image", b"", 4096)
    b = await openFile(pool, backends, path)
    synced = []
    realFsync = os.fsync
    monkeypatch.setattr(os, "fsync",
                        lambda fd: synced.append(fd) or realFsync(fd))
    await b.write(0, b"x" * 4096)
    assert await b.flush() is None
    assert synced == [b._fd]


@pytest_twisted.ensureDeferred
async def test_close(tmp_path, pool):
    path = makeFile(tmp_path / "image", pattern(4096))
    b = await FileBackend.open(reactor, path, threadpool=pool)
    fd = b._fd
    await b.close()
    await b.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(BackendError):
        await b.read(0, 10)
    with pytest.raises(BackendError):
        b.size()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_operations(tmp_path, pool, backends):
    path = makeFile(tmp_path / "image", pattern(4 * MiB))
    b = await openFile(pool, backends, path)
    reads = [b.read(i * MiB, 1 * MiB) for i in range(4)]
    cancelled = b.read(0, 4096)
    cancelled.cancel()
    closed = b.close()
    # The reads are still in pool threads: the file stays open for them,
    # and new operations are refused.
    assert not closed.called
    assert b._fd is not None
    with pytest.raises(BackendError):
        await b.read(0, 10)
    results = await defer.gatherResults(reads)
    assert b"".join(results) == pattern(4 * MiB)
    with pytest.raises(defer.CancelledError):
        await cancelled
    await closed
    assert b._fd is None


@pytest_twisted.ensureDeferred
async def test_close_from_operation_callback(tmp_path, pool):
    path = makeFile(tmp_path / "image", pattern(4096))
    b = await FileBackend.open(reactor, path, threadpool=pool)
    closes = []
    d = b.read(0, 10)
    d.addCallback(lambda data: closes.append(b.close()) or data)
    assert await d == pattern(10)
    await closes[0]
    assert b._fd is None
    await b.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_reads(tmp_path, pool, backends):
    data = pattern(8 * MiB)
    path = makeFile(tmp_path / "image", data)
    b = await openFile(pool, backends, path)
    ranges = [(i * MiB + 7 * i, MiB - 3 * i) for i in range(8)]
    results = await defer.gatherResults(
        [b.read(o, n) for o, n in ranges])
    for (o, n), got in zip(ranges, results):
        assert got == data[o:o + n]


@pytest_twisted.ensureDeferred
async def test_concurrent_unaligned_writes_sharing_blocks(tmp_path, pool,
                                                          backends):
    """
    Writes to distinct ranges that share blocks: read-modify-write must not
    lose bytes.
    """
    path = makeFile(tmp_path / "image", b"", 64 * KiB)
    b = await openFile(pool, backends, path)
    pieces = [(i * 100, bytes([i % 250 + 1]) * 100) for i in range(300)]
    await defer.gatherResults([b.write(o, d) for o, d in pieces])
    expected = b"".join(d for _, d in pieces)
    assert content(path)[:len(expected)] == expected


# Block devices.


@pytest.fixture
def loopDevice(tmp_path):
    backing = tmp_path / "loop-backing"
    backing.write_bytes(pattern(8 * MiB))
    try:
        device = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], check=True,
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot create a loop device")
    yield device, str(backing)
    subprocess.run(["losetup", "-d", device], check=False)


@pytest_twisted.ensureDeferred
async def test_block_device(loopDevice, pool, backends):
    device, backing = loopDevice
    b = await openFile(pool, backends, device, maxConnections=6)
    assert b.isBlock and b.direct
    assert b.blockSize == 512
    assert (b.maxReaders, b.maxWriters) == (6, 6)
    assert b.size() == 8 * MiB
    assert await b.extents() == [ZeroExtent(0, 8 * MiB, False)]
    assert await b.read(100, 1000) == pattern(8 * MiB)[100:1100]
    await b.write(1000, b"w" * 3000)
    await b.zero(1 * MiB, 1 * MiB)
    await b.zero(3 * MiB + 7, 1000)
    await b.flush()
    expected = bytearray(pattern(8 * MiB))
    expected[1000:4000] = b"w" * 3000
    expected[1 * MiB:2 * MiB] = bytes(1 * MiB)
    expected[3 * MiB + 7:3 * MiB + 1007] = bytes(1000)
    assert await b.read(0, 8 * MiB) == expected
    with open(device, "rb") as f:
        assert f.read() == expected


@pytest_twisted.ensureDeferred
async def test_block_device_blkzeroout(loopDevice, pool, backends,
                                       monkeypatch):
    device, _ = loopDevice
    b = await openFile(pool, backends, device, sparse=True)

    def noFallocate(fd, mode, offset, length):
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
    monkeypatch.setattr(filebackend, "fallocate", noFallocate)
    await b.zero(2 * MiB, 2 * MiB)
    assert not b._canZeroRange
    await b.zero(5 * MiB, 512)
    assert await b.read(2 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert await b.read(5 * MiB - 1, 514) == (
        pattern(8 * MiB)[5 * MiB - 1:5 * MiB] + bytes(512)
        + pattern(8 * MiB)[5 * MiB + 512:5 * MiB + 513])


if __name__ == "__main__":   # pragma: no cover
    sys.exit(pytest.main([__file__]))


@pytest_twisted.ensureDeferred
async def test_maxZeroStep(tmp_path, pool, backends):
    # Regular files that zero in metadata take large steps; the caller's
    # steps stay for files that may fall back to writing zeroes.
    # Large steps only once zeroing in metadata worked here: the first
    # step is the caller's.
    path = makeFile(tmp_path / "img", size=1 * MiB)
    sparse = await openFile(pool, backends, path, sparse=True)
    assert sparse.maxZeroStep is None
    await sparse.zero(0, 4096)
    assert sparse.maxZeroStep == filebackend.FAST_ZERO_STEP
    full = await openFile(pool, backends, path)
    assert full.maxZeroStep is None
    await full.zero(0, 4096)
    assert full.maxZeroStep == filebackend.FAST_ZERO_STEP


@pytest_twisted.ensureDeferred
async def test_maxZeroStep_unsupported(tmp_path, pool, backends,
                                       monkeypatch):
    # A filesystem without FALLOC_FL_ZERO_RANGE or PUNCH_HOLE (ext2/ext3,
    # old NFS): zeroing writes zeroes, and steps stay the caller's.
    def tryFallocate(self, mode, offset, length):
        return False
    monkeypatch.setattr(FileBackend, "_tryFallocate", tryFallocate)
    path = makeFile(tmp_path / "img", b"x" * MiB, size=MiB)
    for sparse in (True, False):
        b = await openFile(pool, backends, path, sparse=sparse)
        await b.zero(0, 4096)
        assert b.maxZeroStep is None
        assert await b.read(0, 4096) == bytes(4096)


@pytest_twisted.ensureDeferred
async def test_zero_sparse_large_step(tmp_path, pool, backends):
    # One call deallocates a whole large range and keeps the size.
    size = 3 * filebackend.FAST_ZERO_STEP
    path = makeFile(tmp_path / "img", b"x" * MiB, size=size)
    b = await openFile(pool, backends, path, sparse=True)
    await b.zero(0, MiB)
    await b.zero(0, b.maxZeroStep)
    assert os.path.getsize(path) == size
    assert allocated(path) == 0


def test_reference_from_env(monkeypatch, tmp_path):
    # IMAGEIO_REFVENV names the reference; missing, CI fails (no skip).
    monkeypatch.setenv("IMAGEIO_REFVENV", str(tmp_path / "none"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        support.referencePython()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        support.referencePython()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    monkeypatch.setenv("IMAGEIO_REFVENV", str(venv))
    assert support.referencePython() == str(venv / "bin" / "python")


# ---------------------------------------------------------------------------
# A file whose storage stops answering holds only its share of the pool.


@pytest_twisted.ensureDeferred
async def test_hung_file_holds_only_its_share(tmp_path, backends):
    # No real storage hangs on demand here: the calls on one file block
    # in the pool threads (as on a hung NFS mount) until released. Only a
    # quarter of the pool runs them; the rest of that file's calls wait in
    # the reactor, and another file is served meanwhile.
    tp = ThreadPool(minthreads=0, maxthreads=8, name="test-hung")
    tp.start()
    release = __import__("threading").Event()
    try:
        hung = tmp_path / "hung.raw"
        other = tmp_path / "other.raw"
        for p in (hung, other):
            with open(p, "wb") as f:
                f.write(b"x" * 4096)
        a = await FileBackend.open(reactor, str(hung), mode="r",
                                   threadpool=tp)
        b = await FileBackend.open(reactor, str(other), mode="r",
                                   threadpool=tp)
        backends.extend([a, b])
        started = []

        def block():
            started.append(1)
            release.wait(30)
            return b"done"

        stuck = [a._run("read", block) for _ in range(8)]
        await _until(lambda: len(started) == 2)
        # 8 threads, a quarter for one file: 2 run, 6 wait in the reactor
        # (without the bound all 8 threads hang and the read below waits).
        assert filegate.gates[str(hung)].running == 2
        assert len(filegate.gates[str(hung)].waiting) == 6
        got = await defer.ensureDeferred(_timed(b.read(0, 4096), 5))
        assert got == b"x" * 4096
        release.set()
        assert await defer.gatherResults(stuck) == [b"done"] * 8
        assert str(hung) not in filegate.gates
    finally:
        release.set()
        tp.stop()


async def _until(predicate, timeout=10):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timeout")
        d = defer.Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d


async def _timed(d, seconds):
    d.addTimeout(seconds, reactor)
    return await d
