# -*- test-case-name: test.test_backend_memory -*-
"""
Tests for L{imageio.backends.memory}.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio.backends import IBackend
from imageio.backends.memory import MemoryBackend
from imageio.errors import BackendError, UnsupportedOperation
from imageio.extents import DirtyExtent, ZeroExtent


class MemoryBackendTests(SynchronousTestCase):

    def test_interface(self):
        b = MemoryBackend()
        self.assertTrue(verifyObject(IBackend, b))
        self.assertEqual(b.name, "memory")
        self.assertEqual(b.blockSize, 1)
        self.assertEqual((b.maxReaders, b.maxWriters), (8, 1))
        self.assertEqual(MemoryBackend(maxConnections=3).maxReaders, 3)

    def test_size_and_data(self):
        self.assertEqual(MemoryBackend().size(), 0)
        self.assertEqual(MemoryBackend(size=10).getvalue(), bytes(10))
        self.assertEqual(MemoryBackend(data=b"abc").size(), 3)

    def test_shared_bytearray(self):
        data = bytearray(b"abcd")
        one = MemoryBackend(data=data)
        two = MemoryBackend(data=data)
        self.successResultOf(one.write(0, b"X"))
        self.assertEqual(self.successResultOf(two.read(0, 2)), b"Xb")

    def test_read(self):
        b = MemoryBackend(data=b"0123456789")
        self.assertEqual(self.successResultOf(b.read(2, 3)), b"234")
        self.assertEqual(self.successResultOf(b.read(8, 10)), b"89")
        self.assertEqual(self.successResultOf(b.read(20, 10)), b"")

    def test_write_and_grow(self):
        b = MemoryBackend(size=4)
        self.assertIsNone(self.successResultOf(b.write(1, b"ab")))
        self.successResultOf(b.write(6, memoryview(b"cd")))
        self.assertEqual(b.getvalue(), b"\0ab\0\0\0cd")

    def test_zero(self):
        b = MemoryBackend(data=b"x" * 10)
        self.successResultOf(b.zero(2, 3))
        self.successResultOf(b.zero(9, 3))
        self.assertEqual(b.getvalue(), b"xx\0\0\0xxxx\0\0\0")

    def test_read_only(self):
        b = MemoryBackend(data=b"abc", mode="r")
        self.failureResultOf(b.write(0, b"x"), BackendError)
        self.failureResultOf(b.zero(0, 1), BackendError)
        self.assertEqual(b.getvalue(), b"abc")

    def test_bad_mode(self):
        self.assertRaises(ValueError, MemoryBackend, mode="w")

    def test_flush(self):
        b = MemoryBackend()
        self.assertIsNone(self.successResultOf(b.flush()))
        self.assertEqual(b.flushes, 1)

    def test_extents_default(self):
        b = MemoryBackend(size=100)
        self.assertEqual(self.successResultOf(b.extents()),
                         [ZeroExtent(0, 100, False)])
        self.failureResultOf(b.extents("dirty"), UnsupportedOperation)

    def test_extents_configured(self):
        zero = [ZeroExtent(0, 50, False), ZeroExtent(50, 50, True, True)]
        dirty = [DirtyExtent(0, 100, True)]
        b = MemoryBackend(size=100, extents=zero, dirty=dirty)
        self.assertEqual(self.successResultOf(b.extents("zero")), zero)
        self.assertEqual(self.successResultOf(b.extents("dirty")), dirty)
        self.failureResultOf(b.extents("other"), UnsupportedOperation)

    def test_close(self):
        b = MemoryBackend(size=4)
        self.assertIsNone(self.successResultOf(b.close()))
        self.successResultOf(b.close())
        self.assertTrue(b.closed)
        self.failureResultOf(b.read(0, 1), BackendError)
        self.assertRaises(BackendError, b.size)

    def test_calls(self):
        b = MemoryBackend(size=4)
        b.read(0, 1)
        b.write(0, b"x")
        b.flush()
        self.assertEqual(b.calls, ["read", "write", "flush"])


class HoldTests(SynchronousTestCase):

    def test_hold_and_release(self):
        b = MemoryBackend(data=b"abcd")
        b.hold("read")
        held = b.whenHeld()
        self.assertNoResult(held)
        d = b.read(0, 2)
        self.successResultOf(held)
        self.assertNoResult(d)
        self.assertEqual(b.pending, 1)
        # Writes are not held: the held read sees them when released.
        self.successResultOf(b.write(0, b"XY"))
        b.release()
        self.assertEqual(self.successResultOf(d), b"XY")
        self.assertEqual(b.pending, 0)
        # Released: not held any more.
        self.assertEqual(self.successResultOf(b.read(2, 2)), b"cd")

    def test_hold_all_in_order(self):
        b = MemoryBackend(size=2)
        b.hold()
        w = b.write(0, b"a")
        r = b.read(0, 1)
        f = b.flush()
        self.assertEqual(b.pending, 3)
        self.successResultOf(b.whenHeld())
        b.release()
        self.successResultOf(w)
        self.assertEqual(self.successResultOf(r), b"a")
        self.successResultOf(f)

    def test_held_error(self):
        b = MemoryBackend(size=2, mode="r")
        b.hold("write")
        d = b.write(0, b"a")
        self.assertNoResult(d)
        b.release()
        self.failureResultOf(d, BackendError)

    def test_cancel_held(self):
        b = MemoryBackend(size=2)
        b.hold("write")
        d = b.write(0, b"a")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(b.pending, 0)
        b.release()
        self.assertEqual(b.getvalue(), b"\0\0")

    def test_close_fails_held(self):
        b = MemoryBackend(size=2)
        b.hold("read")
        d = b.read(0, 1)
        self.successResultOf(b.close())
        self.failureResultOf(d, BackendError)

    def test_unknown_operation(self):
        self.assertRaises(ValueError, MemoryBackend().hold, "bogus")
