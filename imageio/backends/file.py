# -*- test-case-name: test.test_backend_file -*-
"""
The file backend: host bytes of a regular file or a block device.

Every blocking system call runs in a L{ThreadPool} through
L{deferToThreadPool}; the reactor thread only does bookkeeping.

Files are opened with C{O_DIRECT} where the filesystem accepts it, and then
all I/O goes through page-aligned (mmap) buffers in whole blocks of
L{FileBackend.blockSize}: a write or zero that does not cover whole blocks
reads the partial blocks, merges the new bytes and writes the blocks back.
As in the reference, such a write at the end of a regular file leaves the
file padded with zeroes to the next block boundary. Where C{O_DIRECT} does
not work the file is used with buffered I/O and a block size of 1 (SPEC A9).

Zeroing prefers C{fallocate} and C{BLKZEROOUT} to writing zeroes, trying the
modes in the reference's order and remembering, per backend, those the
filesystem does not support (SPEC B §3).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.abilities import (
    IPageCacheFreeSource, IThreadReads, IThreadTarget, IVectoredWrite,
    IZeroSteps)
from imageio.logs import Logger
from imageio.backends import IBackend, filegate
from imageio.errors import BackendError, UnsupportedOperation
from imageio.extents import ZeroExtent
from imageio.units import MiB

__all__ = [
    "open", "FileBackend", "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE", "BLKZEROOUT", "BLKSSZGET",
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKZEROOUT = 0x127F     # _IO(0x12, 127): zero a byte range of a device
BLKSSZGET = 0x1268      # _IO(0x12, 104): logical sector size

DEFAULT_BUFFER_SIZE = 8 * MiB
DEFAULT_MAX_CONNECTIONS = 8

_PAGE = mmap.PAGESIZE

# Manual zeroing writes at most this much per system call.
_ZERO_BUFFER_SIZE = 1 * MiB

# Zero steps for a regular file whose filesystem deallocates or zeroes a
# range in metadata only (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE): such a
# call costs the same for 128 MiB or 64 GiB, while each step is a trip to
# the thread pool. Zeroing 8 TiB in the web layer's 128 MiB steps took
# 65,536 trips, 10 times longer than the reference's (bench/run.py).
FAST_ZERO_STEP = 64 * 1024 * MiB

# Idle aligned buffers kept per backend for reuse (more in flight are
# allocated and dropped on release).
_MAX_IDLE_BUFFERS = 2

# Most buffers given to one pwritev (IOV_MAX is 1024 on Linux).
_MAX_IOV = 512

_libc = ctypes.CDLL(None, use_errno=True)
try:
    _c_fallocate = _libc.fallocate64
except AttributeError:  # pragma: no cover - glibc always has it
    _c_fallocate = _libc.fallocate
_c_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                         ctypes.c_int64]
_c_fallocate.restype = ctypes.c_int

# Indirection so tests can simulate a filesystem refusing O_DIRECT.
_osOpen = os.open


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """
    fallocate(2) with a mode (C{os.posix_fallocate} has none). Blocks; the
    GIL is released during the call.

    @raise OSError: with the call's errno.
    """
    if _c_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def blkzeroout(fd: int, offset: int, length: int) -> None:
    """
    Zero a range of a block device with the C{BLKZEROOUT} ioctl.
    """
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))


def blksszget(fd: int) -> int:
    """
    The logical sector size of a block device (C{BLKSSZGET}).
    """
    buf = fcntl.ioctl(fd, BLKSSZGET, struct.pack("=i", 0))
    return struct.unpack("=i", buf)[0]


def _alignedBuffer(size: int) -> mmap.mmap:
    # An anonymous shared mapping is page aligned, as O_DIRECT needs, and
    # unlike a private one stays safe for direct I/O if another thread forks
    # while the I/O is in flight (see open(2), O_DIRECT notes).
    return mmap.mmap(-1, size, mmap.MAP_SHARED)


def _closeBuffer(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:
        # A view still exists (kept alive by a traceback, say); the mapping
        # goes away with the last view.
        pass


def _roundDown(n: int, size: int) -> int:
    return n - n % size


def _roundUp(n: int, size: int) -> int:
    return _roundDown(n + size - 1, size)


def _configValue(config, section: str, option: str, default):
    if config is None:
        return default
    value = getattr(getattr(config, section, None), option, None)
    return default if value is None else value


def open(reactor, url: str, *, mode: str, sparse: bool = False,
         config=None, threadpool=None) -> defer.Deferred:
    """
    Open the file backend for a C{file:///path} ticket url.

    As in the reference, the url path is used as is (no percent-decoding).

    @param mode: C{"r"} or C{"r+"}.
    @param config: the daemon configuration: C{daemon.max_connections} and
        C{backend_file.buffer_size} are used (defaults 8 and 8 MiB).
    @param threadpool: a started L{ThreadPool} for the blocking calls; the
        reactor's pool if C{None}.
    @return: L{Deferred} firing with a L{FileBackend}, or failing with
        L{BackendError}.
    """
    path = urlsplit(url).path
    return FileBackend.open(
        reactor, path, mode=mode, sparse=sparse, threadpool=threadpool,
        maxConnections=_configValue(
            config, "daemon", "max_connections", DEFAULT_MAX_CONNECTIONS),
        bufferSize=_configValue(
            config, "backend_file", "buffer_size", DEFAULT_BUFFER_SIZE))


class _Opened:
    """
    What the blocking part of L{FileBackend.open} found out.
    """

    def __init__(self, fd, isBlock, direct, blockSize):
        self.fd = fd
        self.isBlock = isBlock
        self.direct = direct
        self.blockSize = blockSize
        self.size = _currentSize(fd, isBlock)


def _currentSize(fd: int, isBlock: bool) -> int:
    """
    The size of a file (C{st_size}) or device: a system call that blocks
    on a dead mount (NFS asks the server once its attribute cache
    expires), so only ever made in the I/O pool.
    """
    if isBlock:
        return os.lseek(fd, 0, os.SEEK_END)
    return os.fstat(fd).st_size


class ThreadTarget:
    """
    The file of an upload, for the one thread that writes whole blocks to
    it (L{FileBackend.threadTarget}). It holds its own descriptor (the same
    open file description, so C{O_DIRECT} stays), which survives a close of
    the backend in the middle of a transfer.

    @ivar blockSize: writes must start and end on multiples of this (1 for
        buffered I/O).
    """

    def __init__(self, fd: int, path: str, blockSize: int):
        self._fd = fd
        self._path = path
        self.blockSize = blockSize

    def write(self, view: memoryview, offset: int) -> None:
        """
        Write all of C{view} at C{offset} (in the calling thread).

        @raise BackendError: the write failed.
        """
        done = 0
        try:
            while done < len(view):
                n = os.pwritev(self._fd, [view[done:]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, "Short write")
                done += n
        except OSError as e:
            raise BackendError(
                f"write failed on {self._path}: {e.strerror}") from e

    def close(self) -> None:
        os.close(self._fd)


class ThreadReader:
    """
    Small reads of a file for the one thread that serves a connection's
    Range GETs (L{FileBackend.threadReader}). It holds its own descriptor
    (the same open file description, so C{O_DIRECT} stays) and one
    page-aligned buffer, grown to the largest read.
    """

    def __init__(self, fd: int, path: str, direct: bool, blockSize: int):
        self._fd = fd
        self._path = path
        self._align = blockSize if direct else 1
        self._buf = None
        self._view = None

    def read(self, offset: int, length: int) -> memoryview:
        """
        Read C{length} bytes at C{offset} (in the calling thread).

        @return: a view of the bytes, valid until the next call; short
            only at the end of the file.
        @raise BackendError: the read failed.
        """
        align = self._align
        start = offset - offset % align
        span = -(-(offset + length) // align) * align - start
        if self._buf is None or len(self._buf) < span:
            self._release()
            self._buf = _alignedBuffer(_roundUp(span, mmap.PAGESIZE))
            self._view = memoryview(self._buf)
        view = self._view[:span]
        done = 0
        try:
            while done < span:
                n = os.preadv(self._fd, [view[done:]], start + done)
                if n == 0:
                    break
                done += n
                if done % align:
                    break
        except OSError as e:
            raise BackendError(
                f"read failed on {self._path}: {e.strerror}") from e
        skip = offset - start
        return view[skip:max(skip, min(done, skip + length))]

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._buf is not None:
            _closeBuffer(self._buf)
            self._buf = None

    def close(self) -> None:
        self._release()
        os.close(self._fd)


def _openBlocking(path: str, mode: str, direct: bool) -> _Opened:
    """
    Open C{path} and find its block size. Runs in a pool thread.

    Only a regular file or a block device is an image: anything else (a
    FIFO above all, whose open and reads block until a writer comes) is
    refused without blocking (O_NONBLOCK, cleared once the type is known),
    so it never holds a pool thread that other tickets need.
    """
    flags = ((os.O_RDWR if mode == "r+" else os.O_RDONLY) | os.O_CLOEXEC
             | os.O_NONBLOCK)
    fd = None
    if direct:
        try:
            fd = _osOpen(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            FileBackend._log.info(
                "O_DIRECT not supported for {path}, using buffered I/O",
                path=path)
    if fd is None:
        fd = _osOpen(path, flags)
        direct = False
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        isBlock = stat.S_ISBLK(st.st_mode)
        if not isBlock and not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL,
                          "Not a regular file or block device", path)
        _clearNonBlocking(fd)
        if not direct:
            blockSize = 1
        elif isBlock:
            try:
                blockSize = blksszget(fd)
            except OSError:
                blockSize = 512
        else:
            blockSize = _probeBlockSize(fd)
            if blockSize is None:
                # The open accepted O_DIRECT but no read size works: use the
                # file without it rather than failing.
                FileBackend._log.info(
                    "Direct I/O unusable for {path}, using buffered I/O",
                    path=path)
                os.close(fd)
                fd = None
                fd = _osOpen(path, flags)
                _clearNonBlocking(fd)
                direct = False
                blockSize = 1
        return _Opened(fd, isBlock, direct, blockSize)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _clearNonBlocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL,
                fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def _probeBlockSize(fd: int) -> int | None:
    """
    The smallest direct read size that works at offset 0, as the reference
    finds it: 1, 512 or 4096. A 1-byte success means direct I/O is not
    really in effect (NFS, or an unallocated first block), and 4096 is used.

    @return: the block size, or C{None} if no size works.
    """
    buf = _alignedBuffer(_PAGE)
    try:
        with memoryview(buf) as view:
            for size in (1, 512, 4096):
                try:
                    os.preadv(fd, [view[:size]], 0)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    continue
                return 4096 if size == 1 else size
    finally:
        buf.close()
    return None


@implementer(IBackend, IVectoredWrite, IZeroSteps, IThreadTarget,
             IPageCacheFreeSource, IThreadReads)
class FileBackend:
    """
    A regular file or block device, read and written from a thread pool.

    Call every method from the reactor thread. Operations may overlap (several
    reads or writes in flight); writes to distinct ranges are safe even when
    they share a block, because read-modify-write cycles are serialised.

    @ivar path: the file path.
    @ivar mode: C{"r"} or C{"r+"}.
    @ivar sparse: zeroing deallocates space.
    @ivar direct: the file is open with C{O_DIRECT}.
    @ivar isBlock: the file is a block device.
    @ivar blockSize: I/O alignment: 1 for buffered I/O, the sector size for
        block devices, the probed size for regular files.
    @ivar _fd: the file descriptor, C{None} once closed.
    @ivar _inFlight: operations started and not yet back from the pool.
    @ivar _closing: L{Deferred} of a close waiting for L{_inFlight} to drop.
    @ivar _buffers: idle aligned buffers of C{_bufferSize} bytes.
    @ivar _bufferLock: guards L{_buffers} (used from pool threads).
    @ivar _rmwLock: serialises read-modify-write cycles.
    @ivar _canZeroRange: C{FALLOC_FL_ZERO_RANGE} may work here.
    @ivar _canPunchHole: C{FALLOC_FL_PUNCH_HOLE} may work here.
    @ivar _zeroRangeWorks: C{FALLOC_FL_ZERO_RANGE} worked here (once).
    @ivar _punchHoleWorks: C{FALLOC_FL_PUNCH_HOLE} worked here (once).
    @ivar _canFallocate: plain fallocate may work here.
    """

    name = "file"

    _log = Logger()

    def __init__(self, reactor, threadpool, fd: int, path: str, *,
                 mode: str = "r+", sparse: bool = False,
                 direct: bool = False, isBlock: bool = False,
                 blockSize: int = 1,
                 maxConnections: int = DEFAULT_MAX_CONNECTIONS,
                 bufferSize: int = DEFAULT_BUFFER_SIZE,
                 size: int | None = None):
        """
        Wrap an open file descriptor (the backend owns it from now on).
        L{FileBackend.open} is the usual way to get one.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"Unsupported mode: {mode!r}")
        self._reactor = reactor
        self._pool = threadpool
        self._fd = fd
        self.path = path
        # Measured in the I/O pool (open, each call); see size().
        self._size = (size if size is not None
                      else _currentSize(fd, isBlock))
        self.mode = mode
        self.sparse = sparse
        self.direct = direct
        self.isBlock = isBlock
        self.blockSize = blockSize
        self.maxReaders = maxConnections
        # A qcow2 image in a regular file grows as it is written, so one
        # writer only; a device has a fixed layout.
        self.maxWriters = maxConnections if isBlock else 1
        self.maxRequest = bufferSize
        self._inFlight = 0
        self._closing: defer.Deferred | None = None
        self._bufferSize = _roundUp(bufferSize + 2 * blockSize, _PAGE)
        self._buffers: list[mmap.mmap] = []
        self._bufferLock = threading.Lock()
        self._rmwLock = threading.Lock()
        self._zeroBuffer: mmap.mmap | None = None
        self._canZeroRange = True
        self._canPunchHole = True
        self._canFallocate = True
        self._zeroRangeWorks = False
        self._punchHoleWorks = False

    @classmethod
    def open(cls, reactor, path: str, *, mode: str = "r+",
             sparse: bool = False, threadpool=None,
             maxConnections: int = DEFAULT_MAX_CONNECTIONS,
             bufferSize: int = DEFAULT_BUFFER_SIZE,
             direct: bool = True) -> defer.Deferred:
        """
        Open a file or block device.

        @param direct: try C{O_DIRECT} (falling back to buffered I/O where
            it does not work); C{False} forces buffered I/O.
        @return: L{Deferred} firing with a L{FileBackend}, or failing with
            L{BackendError}.
        """
        if mode not in ("r", "r+"):
            return defer.fail(ValueError(f"Unsupported mode: {mode!r}"))
        if threadpool is None:
            threadpool = reactor.getThreadPool()

        def opened(o: _Opened):
            backend = cls(
                reactor, threadpool, o.fd, path, mode=mode, sparse=sparse,
                direct=o.direct, isBlock=o.isBlock, blockSize=o.blockSize,
                maxConnections=maxConnections, bufferSize=bufferSize,
                size=o.size)
            cls._log.debug(
                "Open {path} mode={mode} sparse={sparse} direct={direct} "
                "block_size={blockSize}", path=path, mode=mode,
                sparse=sparse, direct=o.direct, blockSize=o.blockSize)
            return backend

        def failed(f: Failure):
            f.trap(OSError)
            raise BackendError(
                f"Cannot open {path}: {f.value.strerror}") from f.value

        d = filegate.gated(reactor, threadpool, path, _openBlocking, path, mode,
                   direct)
        d.addCallbacks(opened, failed)
        return d

    # IBackend.

    def size(self) -> int:
        """
        @return: the size (C{st_size} for a file, the device size for a
            block device) as the I/O pool last saw it: at the open and
            after each call there. Never a system call in the reactor: a
            stat on a dead mount would freeze the daemon.
        """
        self._checkOpen()
        return self._size

    @property
    def maxZeroStep(self) -> int | None:
        """
        The largest range worth zeroing in one L{zero} call, or C{None} to
        leave it to the caller. Block devices keep the caller's steps (some
        storage times out on large zero requests), and so does any file
        that may fall back to writing zeroes: large steps only once fast
        zeroing worked here, so the first step is an ordinary one (a
        64 GiB first step on a filesystem without it was 64 GiB of
        written zeroes that no cancel could stop).
        """
        if self.isBlock:
            return None
        if self.sparse and self._punchHoleWorks:
            return FAST_ZERO_STEP
        if not self.sparse and self._zeroRangeWorks:
            return FAST_ZERO_STEP
        return None

    def threadTarget(self) -> "ThreadTarget | None":
        """
        A way for a body thread (L{imageio.web.bodyreader}) to write an
        upload's bytes itself: received into an aligned buffer and written
        with C{pwrite} in the same thread, as the reference does, instead
        of handing each buffer to the reactor and the pool. C{None} when
        the backend is read-only or closed.
        """
        if self.mode != "r+":
            return None
        try:
            fd = os.dup(self._checkOpen())
        except (BackendError, OSError):
            return None
        return ThreadTarget(fd, self.path, self.blockSize)

    def threadReader(self) -> "ThreadReader | None":
        """
        A reader for the thread that serves this connection's small Range
        GETs (L{imageio.web.readsession}); C{None} when the backend is
        closed.
        """
        try:
            fd = os.dup(self._checkOpen())
        except (BackendError, OSError):
            return None
        return ThreadReader(fd, self.path, self.direct, self.blockSize)

    def pageCacheSource(self) -> int | None:
        """
        A duplicate of this backend's descriptor for the writer thread
        (L{imageio.web.bodywriter}), owned by the caller; C{None} for a
        block device or if the backend is closed.

        The thread opens the file again from it, through C{/proc/self/fd}
        (a new open file description without C{O_DIRECT}, through the page
        cache, and one with it where that works), in the thread: an open on
        a hung NFS mount blocks, and must not block the reactor. A
        duplicate survives a close of the backend in the middle of a
        transfer. Block devices never go through the page cache here: a
        shared LUN written by another host would leave stale pages in ours
        (the reason for C{O_DIRECT}). Regular files are coherent through it
        (a local filesystem, or NFS, which revalidates on open).
        """
        if self.isBlock:
            return None
        try:
            return os.dup(self._checkOpen())
        except (BackendError, OSError) as e:
            self._log.debug("No page cache source for {path}: {error}",
                            path=self.path, error=e)
            return None

    def read(self, offset: int, length: int) -> defer.Deferred:
        if offset < 0 or length < 0:
            return defer.fail(ValueError("Negative offset or length"))
        return self._run("read", self._read, offset, length)

    def write(self, offset: int, data) -> defer.Deferred:
        if self.mode != "r+":
            return defer.fail(BackendError(
                "Backend opened read-only, cannot write"))
        if offset < 0:
            return defer.fail(ValueError("Negative offset"))
        return self._run("write", self._write, offset, data)

    def writev(self, offset: int, buffers) -> defer.Deferred:
        """
        Write the concatenation of C{buffers} (bytes-like objects) at
        C{offset}, without joining them first: with C{O_DIRECT} they are
        copied into an aligned buffer, else written with one C{pwritev}.
        """
        if self.mode != "r+":
            return defer.fail(BackendError(
                "Backend opened read-only, cannot write"))
        if offset < 0:
            return defer.fail(ValueError("Negative offset"))
        return self._run("write", self._writev, offset, list(buffers))

    def zero(self, offset: int, length: int) -> defer.Deferred:
        if self.mode != "r+":
            return defer.fail(BackendError(
                "Backend opened read-only, cannot zero"))
        if offset < 0 or length < 0:
            return defer.fail(ValueError("Negative offset or length"))
        return self._run("zero", self._zero, offset, length)

    def flush(self) -> defer.Deferred:
        return self._run("flush", os.fsync, self._fd)

    def extents(self, context: str = "zero") -> defer.Deferred:
        if context != "zero":
            return defer.fail(UnsupportedOperation(
                f"Backend {self.name} does not support {context} extents"))
        return self._run("extents", self._extents)

    def close(self) -> defer.Deferred:
        """
        Close the file once the operations in flight are back.
        """
        if self._closing is None:
            self._closing = defer.Deferred()
            if not self._inFlight:
                self._release()
        result = defer.Deferred()
        if self._fd is None:
            result.callback(None)
        else:
            self._closing.addCallback(lambda _: result.callback(None))
        return result

    # Bookkeeping in the reactor thread.

    def _checkOpen(self) -> int:
        if self._closing is not None or self._fd is None:
            raise BackendError("Backend is closed")
        return self._fd

    def _run(self, what: str, f, *args) -> defer.Deferred:
        """
        Run C{f(*args)} in the pool, counting it as in flight until it
        returns, even if the caller cancels the returned Deferred (the
        thread cannot be stopped, and the file must stay open for it).
        """
        try:
            self._checkOpen()
        except BackendError:
            return defer.fail()
        self._inFlight += 1
        result = defer.Deferred()

        def call():
            try:
                result = f(*args)
                self._size = _currentSize(self._fd, self.isBlock)
                return result
            except OSError as e:
                raise BackendError(
                    f"{what} failed on {self.path}: {e.strerror}") from e

        def done(outcome):
            self._inFlight -= 1
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif isinstance(outcome, Failure):  # canceled by the caller
                self._log.debug("{what} failed after cancel: {error}",
                                what=what, error=outcome.value)
            # A close waiting for us goes last, after the caller has the
            # result of the operation.
            if self._closing is not None and not self._inFlight:
                self._release()

        filegate.gated(self._reactor, self._pool, self.path, call).addBoth(done)
        return result

    def _release(self) -> None:
        if self._closing.called:
            # Already done: close() ran from the callbacks of the last
            # operation, before its done() got here.
            return
        fd, self._fd = self._fd, None
        with self._bufferLock:
            buffers, self._buffers = self._buffers, []
        if self._zeroBuffer is not None:
            buffers.append(self._zeroBuffer)
            self._zeroBuffer = None
        for b in buffers:
            _closeBuffer(b)
        if fd is not None:
            self._log.debug("Close {path}", path=self.path)
            try:
                os.close(fd)
            except OSError:
                # Nothing to retry: the descriptor is gone either way.
                self._log.failure("Closing {path} failed", path=self.path)
        self._closing.callback(None)

    # Blocking work, run in pool threads.

    def _getBuffer(self, size: int) -> mmap.mmap:
        if size <= self._bufferSize:
            with self._bufferLock:
                if self._buffers:
                    return self._buffers.pop()
            return _alignedBuffer(self._bufferSize)
        return _alignedBuffer(_roundUp(size, _PAGE))

    def _putBuffer(self, buf: mmap.mmap) -> None:
        if len(buf) == self._bufferSize:
            with self._bufferLock:
                if len(self._buffers) < _MAX_IDLE_BUFFERS:
                    self._buffers.append(buf)
                    return
        _closeBuffer(buf)

    def _preadDirect(self, view: memoryview, offset: int) -> int:
        """
        Fill an aligned view from an aligned offset; short only at the end.
        """
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
            if done % self.blockSize:
                # Unaligned end of file: the next read would be refused.
                break
        return done

    def _pwriteAll(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.pwritev(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "Short write")
            done += n

    def _read(self, offset: int, length: int) -> bytes:
        if not self.direct:
            chunks = []
            while length:
                chunk = os.pread(self._fd, length, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        bs = self.blockSize
        start = _roundDown(offset, bs)
        span = _roundUp(offset + length, bs) - start
        skip = offset - start
        buf = self._getBuffer(span)
        try:
            with memoryview(buf) as view:
                got = self._preadDirect(view[:span], start)
                end = min(got, skip + length)
                return view[skip:end].tobytes() if end > skip else b""
        finally:
            self._putBuffer(buf)

    def _write(self, offset: int, data) -> None:
        with memoryview(data) as raw, raw.cast("B") as src:
            if not src:
                return
            if not self.direct:
                self._pwriteAll(src, offset)
                return
            bs = self.blockSize
            end = offset + len(src)
            start = _roundDown(offset, bs)
            stop = _roundUp(end, bs)
            span = stop - start
            buf = self._getBuffer(span)
            try:
                with memoryview(buf) as view:
                    if start == offset and stop == end:
                        view[:span] = src
                        self._pwriteAll(view[:span], start)
                        return
                    with self._rmwLock:
                        if offset != start:
                            self._readBlock(view[:bs], start)
                        # The last block, unless it is the first one and
                        # was just read.
                        if end != stop and (offset == start
                                            or stop - bs > start):
                            self._readBlock(view[span - bs:span], stop - bs)
                        view[offset - start:end - start] = src
                        self._pwriteAll(view[:span], start)
            finally:
                self._putBuffer(buf)

    def _writev(self, offset: int, buffers: list) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        try:
            total = sum(len(v) for v in views)
            if not total:
                return
            if len(views) == 1 or len(views) > _MAX_IOV:
                self._write(offset, views[0] if len(views) == 1
                            else b"".join(views))
                return
            if not self.direct:
                n = os.pwritev(self._fd, views, offset)
                if n < total:
                    # Short write (rare): the rest, in one piece.
                    rest = b"".join(views)[n:]
                    self._pwriteAll(memoryview(rest), offset + n)
                return
            bs = self.blockSize
            if offset % bs or total % bs or total > self._bufferSize:
                # Partial blocks need read-modify-write: the general path.
                self._write(offset, b"".join(views))
                return
            buf = self._getBuffer(total)
            try:
                with memoryview(buf) as view:
                    pos = 0
                    for v in views:
                        view[pos:pos + len(v)] = v
                        pos += len(v)
                    self._pwriteAll(view[:total], offset)
            finally:
                self._putBuffer(buf)
        finally:
            for v in views:
                v.release()

    def _readBlock(self, view: memoryview, offset: int) -> None:
        """
        Read one block for a read-modify-write; what lies past the end of
        the file reads as zeroes, so writing the block back pads the file.
        """
        got = self._preadDirect(view, offset)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def _zero(self, offset: int, length: int) -> None:
        if not length:
            return
        bs = self.blockSize
        end = offset + length
        if bs > 1:
            # Partial blocks at either end go through read-modify-write,
            # whole blocks through the zeroing strategies.
            head = min(end, _roundUp(offset, bs))
            if head > offset:
                self._write(offset, bytes(head - offset))
                offset = head
            tail = max(offset, _roundDown(end, bs))
            if end > tail:
                middle = tail - offset
                if middle:
                    self._zeroAligned(offset, middle)
                self._write(tail, bytes(end - tail))
                return
        if end > offset:
            self._zeroAligned(offset, end - offset)

    def _zeroAligned(self, offset: int, length: int) -> None:
        if self.isBlock:
            self._zeroDevice(offset, length)
        elif self.sparse:
            self._zeroSparse(offset, length)
        else:
            self._zeroAllocate(offset, length)

    def _tryFallocate(self, mode: int, offset: int, length: int) -> bool:
        """
        @return: C{False} if the filesystem does not support C{mode}.
        """
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            return False
        return True

    def _zeroAllocate(self, offset: int, length: int) -> None:
        """
        Zero a range of a regular file, leaving it allocated.
        """
        if self._canZeroRange:
            if self._tryFallocate(FALLOC_FL_ZERO_RANGE, offset, length):
                self._zeroRangeWorks = True
                return
            self._log.debug("{path}: no FALLOC_FL_ZERO_RANGE", path=self.path)
            self._canZeroRange = False

        # Deallocate then allocate again: what qemu does without ZERO_RANGE.
        if self._canPunchHole and self._canFallocate:
            if self._tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  offset, length):
                if self._tryFallocate(0, offset, length):
                    return
                self._log.debug("{path}: no fallocate", path=self.path)
                self._canFallocate = False
            else:
                self._log.debug("{path}: no FALLOC_FL_PUNCH_HOLE",
                                path=self.path)
                self._canPunchHole = False

        # New space past the end of the file reads as zeroes.
        if self._canFallocate and offset >= os.fstat(self._fd).st_size:
            if self._tryFallocate(0, offset, length):
                return
            self._log.debug("{path}: no fallocate", path=self.path)
            self._canFallocate = False

        self._writeZeroes(offset, length)

    def _zeroSparse(self, offset: int, length: int) -> None:
        """
        Zero a range of a regular file, deallocating it.
        """
        if self._canPunchHole:
            size = os.fstat(self._fd).st_size
            if offset + length > size:
                os.ftruncate(self._fd, offset + length)
                if offset == size:
                    return
            if self._tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  offset, length):
                self._punchHoleWorks = True
                return
            self._log.debug("{path}: no FALLOC_FL_PUNCH_HOLE", path=self.path)
            self._canPunchHole = False
        self._writeZeroes(offset, length)

    def _zeroDevice(self, offset: int, length: int) -> None:
        """
        Zero a range of a block device (sparse or not, as the reference).
        """
        if self._canZeroRange:
            try:
                # Preferred: it also drops stale pages from the page cache.
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE, offset, length)
                return
            except OSError as e:
                # Old kernels answer ENODEV for block devices.
                if e.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                    raise
                self._log.debug("{path}: no FALLOC_FL_ZERO_RANGE, using "
                                "BLKZEROOUT", path=self.path)
                self._canZeroRange = False
        blkzeroout(self._fd, offset, length)

    def _writeZeroes(self, offset: int, length: int) -> None:
        # Written from a zero-filled aligned mapping nobody writes to, so
        # threads can share it.
        with self._bufferLock:
            if self._zeroBuffer is None:
                self._zeroBuffer = _alignedBuffer(_ZERO_BUFFER_SIZE)
            zeroes = self._zeroBuffer
        with memoryview(zeroes) as view:
            while length:
                n = min(length, _ZERO_BUFFER_SIZE)
                self._pwriteAll(view[:n], offset)
                offset += n
                length -= n

    def _extents(self) -> list[ZeroExtent]:
        """
        Data and holes from C{SEEK_DATA}/C{SEEK_HOLE}: data is
        C{zero: false}, a hole C{zero: true, hole: false} (SPEC A9).
        """
        fd = self._fd
        if self.isBlock:
            size = os.lseek(fd, 0, os.SEEK_END)
            return [ZeroExtent(0, size, False)]
        size = os.fstat(fd).st_size
        if size == 0:
            # What the reference answers for an empty file.
            return [ZeroExtent(0, 0, False)]
        result: list[ZeroExtent] = []

        def add(start, end, zero):
            if end <= start:
                return
            if result and result[-1].zero == zero:
                last = result.pop()
                start = last.start
            result.append(ZeroExtent(start, end - start, zero))

        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # only a hole up to the end
                    data = size
                elif e.errno == errno.EINVAL and not result and pos == 0:
                    return [ZeroExtent(0, size, False)]  # not supported
                else:
                    raise
            data = min(data, size)
            add(pos, data, True)
            if data >= size:
                break
            try:
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError as e:
                if e.errno != errno.ENXIO:      # file shrank meanwhile
                    raise
                hole = size
            hole = min(hole, size)
            add(data, hole, False)
            pos = hole
        return result
