"""
The cheaper upload path: vectored backend writes (FileBackend.writev, used
by UploadSink without joining the chunks) and the receive sizes of a
streamed body.
"""

from __future__ import annotations

import inspect
import os

import pytest
import pytest_twisted
from twisted.internet import reactor, unix
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from imageio import transfer
from imageio.abilities import IVectoredWrite
from imageio.backends import file as filebackend
from imageio.backends.file import FileBackend
from imageio.backends.memory import MemoryBackend
from imageio.errors import BackendError
from imageio.units import KiB, MiB
from imageio.web import request as requestmod


@pytest.fixture
def pool():
    tp = ThreadPool(minthreads=0, maxthreads=4, name="test-upload-fast")
    tp.start()
    yield tp
    tp.stop()


def pattern(length, seed=1):
    block = bytes((i * 7 + seed) % 251 + 1 for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


def pieces(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


async def openFile(pool, path, **kw):
    return await FileBackend.open(reactor, str(path), threadpool=pool, **kw)


def makeFile(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def content(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("direct", [True, False])
@pytest_twisted.ensureDeferred
async def test_writev_aligned(tmp_path, pool, direct):
    path = makeFile(tmp_path / "image", 8 * MiB)
    b = await openFile(pool, path, direct=direct)
    try:
        if direct:
            assert b.direct
        data = pattern(4 * MiB)
        parts = pieces(data, 32 * KiB)
        # Memoryviews as UploadSink gives them (a split chunk).
        parts[3] = memoryview(parts[3])
        await b.writev(MiB, parts)
    finally:
        await b.close()
    got = content(path)
    assert got[MiB:5 * MiB] == data
    assert got[:MiB] == bytes(MiB)
    assert got[5 * MiB:] == bytes(3 * MiB)


@pytest.mark.parametrize("offset,length", [
    (1, 8192), (4096, 5000), (100, 3 * 4096 + 7), (0, 4095)])
@pytest_twisted.ensureDeferred
async def test_writev_unaligned(tmp_path, pool, offset, length):
    # Partial blocks go through read-modify-write, as write() does.
    before = pattern(64 * KiB, seed=3)
    path = str(tmp_path / "image")
    with open(path, "wb") as f:
        f.write(before)
    b = await openFile(pool, path)
    try:
        data = pattern(length, seed=5)
        await b.writev(offset, pieces(data, 1000))
    finally:
        await b.close()
    want = bytearray(before)
    want[offset:offset + length] = data
    assert content(path) == bytes(want)


@pytest_twisted.ensureDeferred
async def test_writev_many_parts(tmp_path, pool):
    # More parts than one pwritev takes.
    path = makeFile(tmp_path / "image", 2 * MiB)
    b = await openFile(pool, path, direct=False)
    try:
        data = pattern(filebackend._MAX_IOV * 2 * 100)
        await b.writev(0, pieces(data, 100))
    finally:
        await b.close()
    assert content(path)[:len(data)] == data


@pytest_twisted.ensureDeferred
async def test_writev_larger_than_buffer(tmp_path, pool):
    path = makeFile(tmp_path / "image", 4 * MiB)
    b = await openFile(pool, path, bufferSize=MiB)
    try:
        data = pattern(3 * MiB)
        await b.writev(4096, pieces(data, 256 * KiB))
    finally:
        await b.close()
    assert content(path)[4096:4096 + len(data)] == data


@pytest_twisted.ensureDeferred
async def test_writev_errors(tmp_path, pool):
    path = makeFile(tmp_path / "image", MiB)
    b = await openFile(pool, path, mode="r")
    try:
        with pytest.raises(BackendError):
            await b.writev(0, [b"x" * 4096])
    finally:
        await b.close()
    b = await openFile(pool, path)
    try:
        with pytest.raises(ValueError):
            await b.writev(-1, [b"x"])
        await b.writev(0, [])
        await b.writev(0, [b"", b""])
    finally:
        await b.close()
    with pytest.raises(BackendError):
        await b.writev(0, [b"x"])
    assert content(path) == bytes(MiB)


@implementer(IVectoredWrite)
class VectoredMemory(MemoryBackend):
    """
    A memory backend with writev, recording the parts it was given.
    """

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.vcalls = []

    def writev(self, offset, buffers):
        self.vcalls.append([len(b) for b in buffers])
        return self.write(offset, b"".join(buffers))


def test_sink_uses_writev_without_joining():
    b = VectoredMemory(size=0)
    t = StringTransport()
    s = transfer.UploadSink(b, 0, producer=t, highWater=MiB,
                            lowWater=MiB // 2, writeSize=MiB // 2)
    data = pattern(MiB + 1000)
    for c in pieces(data, 100 * KiB):
        s.write(c)
    s.finish()
    assert s.whenDone().result == len(data)
    assert bytes(b.data) == data
    # Parts as they came (a chunk split at a write boundary), never joined.
    assert all(max(call) <= 100 * KiB for call in b.vcalls)
    assert sum(map(sum, b.vcalls)) == len(data)
    assert b.vcalls[0] == [100 * KiB] * 5 + [12 * KiB]


def test_sink_without_writev():
    b = MemoryBackend(size=0)
    s = transfer.UploadSink(b, 5, highWater=MiB, lowWater=MiB // 2)
    data = pattern(MiB)
    for c in pieces(data, 3000):
        s.write(c)
    s.finish()
    assert s.whenDone().result == len(data)
    assert bytes(b.data[5:]) == data


class FakeSocketTransport:
    bufferSize = 2 ** 16


class FakeChannel:
    def __init__(self, transport):
        self.transport = transport


def test_receive_size_plain():
    # Below malloc's mmap threshold: see PLAIN_RECEIVE_SIZE.
    assert requestmod.PLAIN_RECEIVE_SIZE < 128 * KiB
    t = FakeSocketTransport()
    r = requestmod.StreamingRequest.__new__(requestmod.StreamingRequest)
    r.channel = FakeChannel(t)
    r._growReceiveSize()
    assert t.bufferSize == requestmod.PLAIN_RECEIVE_SIZE


def test_receive_size_tls():
    t = FakeSocketTransport()
    tls = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
    tls.transport = t
    r = requestmod.StreamingRequest.__new__(requestmod.StreamingRequest)
    r.channel = FakeChannel(tls)
    r._growReceiveSize()
    assert t.bufferSize == requestmod.RECEIVE_SIZE


def test_unix_read_uses_bufferSize():
    # Twisted 26.10: a unix socket server reads with recvmsg of bufferSize
    # bytes (unix._SendmsgMixin.doRead), as TCP does with recv.
    assert "self.bufferSize" in inspect.getsource(unix._SendmsgMixin.doRead)
    assert issubclass(unix.Server, unix._SendmsgMixin)
    assert os.name == "posix"
