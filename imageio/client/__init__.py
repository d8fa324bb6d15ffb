# -*- test-case-name: test.test_client -*-
"""
imageio client library: upload and download disk images to and from an
imageio daemon, and inspect local images.

The names, parameters, defaults and meanings are those of the reference's
C{ovirt_imageio.client} (SPEC B §7). These functions B{block} until done;
Twisted programs use the L{Deferred} twins in L{imageio.client.aio}.

How the blocking calls run: they need a running reactor. If the global
reactor is not running, the first call starts it in a daemon thread
(C{"imageio-reactor"}, without signal handlers; child processes are reaped
by polling) and leaves it running for later calls, so any number of calls,
from any number of threads, work in one process. If a program already runs
the reactor in another thread, that reactor is used. Calling from the
reactor thread itself would deadlock and raises C{RuntimeError}: use
L{imageio.client.aio} there. An exception such as C{KeyboardInterrupt}
while waiting cancels the transfer (the private C{qemu-nbd} is stopped)
before it propagates.
"""

from __future__ import annotations

import atexit
import queue
import threading

from twisted.python import threadable
from twisted.python.failure import Failure

from imageio import blkhash
from imageio.client import aio
from imageio.client._progress import ProgressBar
from imageio.client._errors import (
    ClientError, ImageError, QemuError, ServerError, TransferError)
from imageio.errors import BackendError, HTTPError

__all__ = ["BUFFER_SIZE", "MAX_WORKERS", "WORKERS_LIMIT", "upload",
           "download", "info",
           "measure", "checksum", "extents", "ImageioClient", "ProgressBar",
           "ClientError", "ServerError", "TransferError", "ImageError",
           "QemuError", "HTTPError", "BackendError"]

BUFFER_SIZE = aio.BUFFER_SIZE
MAX_WORKERS = aio.MAX_WORKERS
WORKERS_LIMIT = aio.WORKERS_LIMIT

_CANCEL_WAIT = 30.0


class _ReactorThread:
    """
    Runs the global reactor in a daemon thread, started on first use.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def reactor(self):
        from twisted.internet import reactor
        if threadable.isInIOThread() and reactor.running:
            raise RuntimeError("The blocking imageio.client API cannot run "
                               "in the reactor thread; use "
                               "imageio.client.aio")
        with self._lock:
            if self._thread is None and not reactor.running:
                started = threading.Event()

                def running():
                    from twisted.internet import task
                    from twisted.internet.process import reapAllProcesses
                    # No SIGCHLD handler in a non-main thread: reap by
                    # polling (cheap when no child is running).
                    task.LoopingCall(reapAllProcesses).start(0.02)
                    started.set()

                reactor.callWhenRunning(running)
                self._thread = threading.Thread(
                    target=reactor.run,
                    kwargs={"installSignalHandlers": False},
                    name="imageio-reactor", daemon=True)
                self._thread.start()
                started.wait()
                atexit.register(self._stop)
        return reactor

    def _stop(self):
        from twisted.internet import reactor
        if self._thread is not None and reactor.running:
            reactor.callFromThread(reactor.stop)
            self._thread.join(10)

    def call(self, fn, *args, **kwargs):
        """
        Run C{fn(*args, reactor=..., **kwargs)} in the reactor thread and
        wait for its Deferred.
        """
        reactor = self.reactor()
        results: queue.Queue = queue.Queue()
        holder = []

        def start():
            from twisted.internet import defer
            d = defer.maybeDeferred(fn, *args, reactor=reactor, **kwargs)
            holder.append(d)
            d.addBoth(results.put)

        reactor.callFromThread(start)
        try:
            result = results.get()
        except BaseException:
            def cancel():
                if holder:
                    holder[0].cancel()
            reactor.callFromThread(cancel)
            try:
                results.get(timeout=_CANCEL_WAIT)
            except BaseException:
                pass
            raise
        if isinstance(result, Failure):
            result.raiseException()
        return result


_runner = _ReactorThread()


def upload(filename, url, cafile, buffer_size=BUFFER_SIZE, secure=True,
           progress=None, proxy_url=None, max_workers=None,
           member=None, backing_chain=True, disk_is_zero=False):
    """
    Upload the local image C{filename} to the transfer C{url} (see
    L{imageio.client.aio.upload}). C{progress.update} is called in the
    reactor thread.
    """
    return _runner.call(
        aio.upload, filename, url, cafile, buffer_size=buffer_size,
        secure=secure, progress=progress, proxy_url=proxy_url,
        max_workers=max_workers, member=member,
        backing_chain=backing_chain, disk_is_zero=disk_is_zero)


def download(url, filename, cafile, fmt="qcow2", incremental=False,
             buffer_size=BUFFER_SIZE, secure=True, progress=None,
             proxy_url=None, max_workers=None, backing_file=None,
             backing_format=None):
    """
    Download the transfer C{url} to the new local image C{filename} (see
    L{imageio.client.aio.download}).
    """
    return _runner.call(
        aio.download, url, filename, cafile, fmt=fmt,
        incremental=incremental, buffer_size=buffer_size, secure=secure,
        progress=progress, proxy_url=proxy_url, max_workers=max_workers,
        backing_file=backing_file, backing_format=backing_format)


def info(filename, member=None):
    """
    C{qemu-img info} of C{filename} as a dict.
    """
    return _runner.call(aio.info, filename, member=member)


def measure(filename, dst_fmt, member=None):
    """
    C{qemu-img measure} of C{filename} converted to C{dst_fmt}.
    """
    return _runner.call(aio.measure, filename, dst_fmt, member=member)


def checksum(filename, member=None, block_size=blkhash.BLOCK_SIZE,
             algorithm=blkhash.ALGORITHM, detect_zeroes=True):
    """
    The blkhash of the image's guest data, as the server's C{/checksum}.
    """
    return _runner.call(aio.checksum, filename, member=member,
                        block_size=block_size, algorithm=algorithm,
                        detect_zeroes=detect_zeroes)


def extents(filename, member=None, bitmap=None):
    """
    The image's zero extents (or dirty extents of C{bitmap}), as a list
    (the reference yields them; a list iterates the same way).
    """
    return _runner.call(aio.extents, filename, member=member, bitmap=bitmap)


class ImageioClient:
    """
    Blocking random access to a transfer url (see
    L{imageio.client.aio.ImageioClient}).
    """

    def __init__(self, transfer_url, cafile=None, secure=True,
                 proxy_url=None, buffer_size=BUFFER_SIZE):
        self._buffer_size = buffer_size
        self._client = _runner.call(
            aio.ImageioClient.open, transfer_url, cafile=cafile,
            secure=secure, proxy_url=proxy_url, buffer_size=buffer_size)

    def _call(self, fn, *args):
        return _runner.call(lambda *a, reactor: fn(*a), *args)

    @property
    def max_readers(self):
        return self._client.max_readers

    @property
    def max_writers(self):
        return self._client.max_writers

    def size(self):
        return self._client.size()

    def extents(self, context="zero"):
        """
        Iterate over the server's extents (C{"zero"} or C{"dirty"}).
        """
        yield from self._call(self._client.extents, context)

    def read_from(self, reader, offset, length):
        """
        One C{PUT} of C{length} bytes at C{offset}, read from
        C{reader.readinto(buf)} in the calling thread.
        """
        upload = self._call(self._start_upload, offset, length)
        what = f"write of {length} bytes at {offset} to"
        write = self._guarded(upload.write, what)
        size = min(self._buffer_size, 32 << 20)
        try:
            for data in aio._read_pieces(reader, length, size):
                self._call(write, data)
        except BaseException:
            _runner.reactor().callFromThread(upload.abort)
            raise
        self._call(self._guarded(upload.finish, what))

    def _guarded(self, fn, what):
        """
        C{fn} returning a Deferred whose failure is the client's error
        (see L{imageio.client.aio.ImageioClient}).
        """
        from twisted.internet import defer

        def call(*args):
            return self._client._guard(defer.maybeDeferred(fn, *args),
                                       what)
        return call

    def _start_upload(self, offset, length):
        from twisted.internet import defer
        return defer.maybeDeferred(self._client.start_upload, offset, length)

    def write_to(self, writer, offset, length):
        """
        One C{GET} of C{length} bytes at C{offset}, each piece given to
        C{writer.write(data)} (called in the reactor thread while this
        thread waits).
        """
        return self._call(self._client.write_to, writer, offset, length)

    def read(self, offset, buffer):
        return self._call(self._client.read, offset, buffer)

    def write(self, offset, buffer):
        return self._call(self._client.write, offset, buffer)

    def zero(self, offset, length):
        return self._call(self._client.zero, offset, length)

    def flush(self):
        return self._call(self._client.flush)

    def close(self):
        return self._call(self._client.close)

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        try:
            self.close()
        except Exception:
            if t is None:
                raise
