"""
The streaming pumps (imageio.transfer) with memory backends and in-memory
consumers and producers: ordering, depth, pausing, cancel, limits, errors.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from zope.interface import alsoProvides
from zope.interface.verify import verifyObject
from twisted.internet.interfaces import IPushProducer

from imageio import errors, transfer
from imageio.abilities import IPipelined
from imageio.backends.http import HTTPBackend
from imageio.backends.memory import MemoryBackend
from imageio.backends.nbd import NBDBackend
from imageio.units import MiB


class Consumer:
    def __init__(self, pauseAfter=None):
        self.data = bytearray()
        self.producer = None
        self.pauseAfter = pauseAfter
        self.unregistered = False

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered = True
        self.producer = None

    def write(self, data):
        assert isinstance(data, bytes)
        self.data += data
        if self.pauseAfter is not None and len(self.data) >= self.pauseAfter:
            self.producer.pauseProducing()


class Op:
    def __init__(self):
        self.done = 0
        self.canceled = False

    def progress(self, n):
        self.done += n

    def check(self):
        if self.canceled:
            raise errors.Forbidden("canceled")


def image(size):
    return bytes(i % 251 for i in range(size))


def test_download_all():
    data = image(3 * MiB + 7)
    b = MemoryBackend(data=data)
    c = Consumer()
    op = Op()
    p = transfer.DownloadProducer(b, c, 5, len(data) - 5, operation=op,
                                  chunkSize=MiB)
    verifyObject(IPushProducer, p)
    d = p.start()
    assert d.result == len(data) - 5
    assert bytes(c.data) == data[5:]
    assert c.unregistered
    assert op.done == len(data) - 5


def test_download_empty():
    c = Consumer()
    d = transfer.DownloadProducer(MemoryBackend(size=10), c, 0, 0).start()
    assert d.result == 0 and c.unregistered


def test_download_depth_and_pause():
    data = image(10 * MiB)
    b = MemoryBackend(data=data)
    b.hold("read")
    c = Consumer(pauseAfter=2 * MiB)
    p = transfer.DownloadProducer(b, c, 0, len(data), depth=3, chunkSize=MiB)
    d = p.start()
    assert b.pending == 3
    b.release()
    # Paused after two chunks; the third read completed but no new read.
    assert len(c.data) == 2 * MiB
    assert not d.called
    calls = b.calls.count("read")
    c.pauseAfter = None
    p.resumeProducing()
    assert d.result == len(data)
    assert bytes(c.data) == data
    assert b.calls.count("read") == 10 and calls <= 4


def test_download_cancel_at_next_chunk():
    b = MemoryBackend(data=image(8 * MiB))
    c = Consumer(pauseAfter=MiB)
    op = Op()
    p = transfer.DownloadProducer(b, c, 0, 8 * MiB, operation=op,
                                  chunkSize=MiB)
    d = p.start()
    op.canceled = True
    p.resumeProducing()
    assert isinstance(d.result.value, errors.Forbidden)
    d.addErrback(lambda _: None)
    assert len(c.data) == MiB
    assert c.unregistered


def test_download_stop_producing():
    b = MemoryBackend(data=image(4 * MiB))
    c = Consumer(pauseAfter=MiB)
    p = transfer.DownloadProducer(b, c, 0, 4 * MiB, chunkSize=MiB)
    d = p.start()
    p.stopProducing()
    assert d.result.check(transfer.ProducerStopped)
    d.addErrback(lambda _: None)
    assert not c.unregistered   # the consumer is gone: not touched
    p.resumeProducing()
    assert len(c.data) == MiB


def test_download_short_read():
    b = MemoryBackend(data=image(MiB + 10))
    c = Consumer()
    d = transfer.DownloadProducer(b, c, 0, 2 * MiB, chunkSize=MiB).start()
    assert d.result.check(errors.PartialContent)
    d.addErrback(lambda _: None)


def test_download_read_error():
    b = MemoryBackend(data=image(MiB))
    b.hold("read")
    c = Consumer()
    d = transfer.DownloadProducer(b, c, 0, MiB).start()
    b.close()
    assert d.result.check(errors.BackendError)
    d.addErrback(lambda _: None)


def test_download_cancel_deferred():
    b = MemoryBackend(data=image(MiB))
    b.hold("read")
    c = Consumer()
    d = transfer.DownloadProducer(b, c, 0, MiB).start()
    d.cancel()
    assert d.result.check(defer.CancelledError)
    d.addErrback(lambda _: None)
    b.release()
    assert c.data == b""


def test_upload_backpressure_and_order():
    b = MemoryBackend(size=0)
    b.hold("write")
    t = StringTransport()
    op = Op()
    s = transfer.UploadSink(b, 10, operation=op, producer=t,
                            highWater=4 * MiB, lowWater=2 * MiB)
    data = image(9 * MiB + 3)
    chunks = [data[i:i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
    done = s.whenDone()
    for c in chunks[:16]:
        s.write(c)
    assert t.producerState == "paused"
    assert s.maxPending <= 4 * MiB
    b.release()
    assert t.producerState == "producing"
    b.hold("write")
    for c in chunks[16:]:
        s.write(c)
    s.finish()
    while b.pending:
        b.release()
        b.hold("write")
    b.release()
    assert done.result == len(data)
    assert bytes(b.data[10:]) == data
    assert op.done == len(data)


def test_upload_backend_deferred():
    opened = defer.Deferred()
    t = StringTransport()
    s = transfer.UploadSink(opened, 0, producer=t, highWater=MiB,
                            lowWater=MiB // 2)
    s.write(b"a" * MiB)
    assert t.producerState == "paused"
    s.finish()
    b = MemoryBackend()
    opened.callback(b)
    assert s.whenDone().result == MiB
    assert t.producerState == "producing"
    assert bytes(b.data) == b"a" * MiB


def test_upload_open_failed():
    opened = defer.Deferred()
    s = transfer.UploadSink(opened, 0)
    s.write(b"x")
    opened.errback(errors.BackendError("no"))
    d = s.whenDone()
    assert d.result.check(errors.BackendError)
    d.addErrback(lambda _: None)


def test_upload_limit():
    b = MemoryBackend()
    s = transfer.UploadSink(b, 0, limit=100, writeSize=60)
    s.write(b"x" * 60)
    s.write(b"y" * 60)
    d = s.whenDone()
    assert d.result.check(transfer.LimitExceeded)
    d.addErrback(lambda _: None)
    assert bytes(b.data) == b"x" * 60
    s.write(b"z")
    s.finish()
    assert len(b.data) == 60


def test_upload_cancel_waits_for_writes_in_flight():
    b = MemoryBackend()
    b.hold("write")
    op = Op()
    t = StringTransport()
    s = transfer.UploadSink(b, 0, operation=op, producer=t, writeSize=MiB,
                            highWater=2 * MiB, lowWater=MiB)
    s.write(b"a" * MiB)
    s.write(b"b" * MiB)
    op.canceled = True
    d = s.whenDone()
    assert not d.called
    b.release()
    assert d.result.check(errors.Forbidden)
    d.addErrback(lambda _: None)
    # The write in flight completed; the next one never started.
    assert bytes(b.data) == b"a" * MiB
    assert t.producerState == "producing"


def test_upload_abort():
    b = MemoryBackend()
    s = transfer.UploadSink(b, 0, writeSize=10)
    s.write(b"x" * 5)
    s.abort()
    d = s.whenDone()
    assert d.result.check(transfer.ProducerStopped)
    d.addErrback(lambda _: None)
    assert b.data == b""


def _pipelined(depth=4):
    b = MemoryBackend()
    alsoProvides(b, IPipelined)
    b.readDepth = b.writeDepth = depth
    return b


def test_upload_depth():
    b = _pipelined()
    b.hold("write")
    s = transfer.UploadSink(b, 0, writeSize=MiB)
    for _ in range(6):
        s.write(b"q" * MiB)
    assert b.pending == 4
    s.finish()
    while b.pending:
        b.release()
    assert s.whenDone().result == 6 * MiB


def test_depths():
    # Declared (IPipelined), not found by name.
    b = MemoryBackend()
    b.name = "nbd"
    assert transfer.readDepth(b) == 2
    assert transfer.writeDepth(b) == 1
    b = _pipelined(4)
    assert transfer.readDepth(b) == 4
    assert transfer.writeDepth(b) == 4
    assert (NBDBackend.readDepth, NBDBackend.writeDepth) == (4, 4)
    assert (HTTPBackend.readDepth, HTTPBackend.writeDepth) == (4, 1)
