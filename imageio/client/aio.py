# -*- test-case-name: test.test_client -*-
"""
The client API returning L{Deferred}s, for Twisted programs.

Same names, parameters and meanings as the blocking API of
L{imageio.client} (and the reference's C{ovirt_imageio.client}), plus:

  - C{reactor=}: the reactor to use (default: the global one);
  - C{http_client=}: a treq L{HTTPClient} to send the HTTP requests with
    instead of real connections (tests pass L{treq.testing.StubTreq}).

Every function returns a L{Deferred}; cancelling it stops the transfer,
stops the private C{qemu-nbd} and closes the connections. Failures are
L{ClientError}s whose text is one line naming what failed and why (see
L{imageio.client._errors} and docs/client-api.md).
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from imageio import blkhash, malloc
from imageio.backends import nbd as nbd_backend
from imageio.client import _bodythread, _qemu, _transfer
from imageio.client._errors import (
    ClientError, ImageError, QemuError, ServerError, TransferError,
    translate)
from imageio.units import MiB

__all__ = ["BUFFER_SIZE", "MAX_WORKERS", "WORKERS_LIMIT", "upload",
           "download", "info",
           "measure", "checksum", "extents", "ImageioClient",
           "remote_checksum", "ClientError", "ServerError", "TransferError",
           "ImageError", "QemuError"]

BUFFER_SIZE = 4 * MiB
"""
Bytes moved per chunk by default.
"""

MAX_WORKERS = 4
"""
The reference client's default number of connections, kept for scripts
that pass it explicitly. Our default (C{max_workers=None}) is what the
server offers (C{max_writers} / C{max_readers} from C{OPTIONS}), at most
L{WORKERS_LIMIT}.
"""

WORKERS_LIMIT = 8
"""
The most connections a transfer uses by default, whatever the server
offers (the reference's command allows at most 8 too). Each download
connection buffers up to about 16 MiB, so this also bounds the client's
memory (bench/client_rss.py). An explicit C{max_workers} may go higher.
"""


def _workers(offered: int, max_workers: int | None) -> int:
    """
    Connections to use: the server's offer, capped by the caller's
    C{max_workers} when given, and by L{WORKERS_LIMIT}.
    """
    wanted = WORKERS_LIMIT if max_workers is None else max_workers
    return max(1, min(offered, wanted))


def _pool_size(max_workers: int | None) -> int:
    return WORKERS_LIMIT if max_workers is None else max_workers


def _guard(d: defer.Deferred, what: str, **kw) -> defer.Deferred:
    """
    Make C{d}'s failure the caller's exception (L{translate}): one line
    naming C{what} failed and why.
    """
    def failed(f: Failure):
        exc = translate(f.value, what, **kw)
        return f if exc is f.value else Failure(exc)
    return d.addErrback(failed)


_tuned = False

_MMAP_THRESHOLD = 16 * MiB
"""
Allocations served by glibc's heaps rather than fresh mmaps: every chunk
of a transfer with the default C{BUFFER_SIZE} (4 MiB, plus the object's
header: above the daemon's 4 MiB threshold). Measured: an upload's
system time fell from 0.25 to 0.09 s per 256 MiB.
"""


def _tune_malloc() -> None:
    """
    Tune glibc malloc for transfer buffers once per process, as the
    daemon does (L{malloc.tune}): by default every 1-4 MiB buffer of a
    transfer is a fresh mmap, faulted in page by page and unmapped when
    freed (about 0.4 s of system time per GiB downloaded). What the heaps
    keep is given back after each transfer (L{malloc.trim}).
    """
    global _tuned
    if not _tuned:
        _tuned = True
        malloc.tune(mmapThreshold=_MMAP_THRESHOLD)


def _trimmed(d: defer.Deferred) -> defer.Deferred:
    def trim(result):
        malloc.trim()
        return result
    return d.addBoth(trim)


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor
    return reactor


class _Progress:
    """
    Accept the reference's progress forms: an object with C{update(n)}
    (and maybe a C{size} attribute), or a plain callable.
    """

    def __init__(self, progress):
        self._progress = progress

    def set_size(self, size):
        if hasattr(self._progress, "update"):
            try:
                self._progress.size = size
            except AttributeError:
                pass

    def update(self, n):
        if self._progress is None:
            return
        if hasattr(self._progress, "update"):
            self._progress.update(n)
        else:
            self._progress(n)


async def _open_nbd_backends(reactor, server, count, mode, dirty=False):
    ds = [nbd_backend.open(reactor, server.url, mode=mode, dirty=dirty,
                           sparse=True) for _ in range(count)]
    results = await defer.DeferredList(ds, consumeErrors=True)
    opened = [r for ok, r in results if ok]
    for ok, r in results:
        if not ok:
            await _close_all(opened)
            r.raiseException()
    return opened


async def _close_all(backends):
    ds = [defer.maybeDeferred(b.close) for b in backends]
    await defer.DeferredList(ds, consumeErrors=True)


async def _upload(reactor, filename, url, cafile, buffer_size, secure,
                  progress, proxy_url, max_workers, member, backing_chain,
                  disk_is_zero, http_client):
    progress = _Progress(progress)
    # Before anything remote: a missing file is the user's first problem.
    image = await _qemu.info(reactor, filename, member=member)
    dst = await _transfer.open_http(
        reactor, url, "r+", cafile=cafile, secure=secure,
        proxy_url=proxy_url, max_connections=_pool_size(max_workers),
        buffer_size=buffer_size, client=http_client)
    try:
        workers = _workers(dst.maxWriters, max_workers)
        server = await _qemu.start_nbd(
            reactor, filename, image["format"], read_only=True,
            shared=workers + 1, offset=image.get("member-offset"),
            size=image.get("member-size"), backing_chain=backing_chain)
        try:
            srcs = await _open_nbd_backends(reactor, server, workers + 1,
                                            "r")
            try:
                size = srcs[0].size()
                if dst.size() is not None and size > dst.size():
                    raise TransferError(
                        f"The image {filename!r} ({size} bytes) is larger "
                        f"than the target ({dst.size()} bytes)")
                progress.set_size(size)
                extents = await srcs[-1].extents("zero")
                requests = _transfer.plan(
                    extents, zero=not (disk_is_zero and backing_chain),
                    hole=backing_chain)
                await _transfer.copy(
                    srcs[:workers], [dst] * workers, requests,
                    direction="upload", buffer_size=buffer_size,
                    progress=progress)
            finally:
                await _close_all(srcs)
        finally:
            await server.stop()
    finally:
        await dst.close()


def upload(filename, url, cafile, buffer_size=BUFFER_SIZE, secure=True,
           progress=None, proxy_url=None, max_workers=None,
           member=None, backing_chain=True, disk_is_zero=False, *,
           reactor=None, http_client=None) -> defer.Deferred[None]:
    """
    Upload the local image C{filename} (any format qemu reads; or the tar
    C{member} of an OVA) to the transfer C{url}.

    @param cafile: CA certificates (PEM) verifying the server, or C{None}
        for the platform's store.
    @param buffer_size: bytes per chunk (at most 32 MiB).
    @param secure: verify the server certificate and host name.
    @param progress: a L{ProgressBar}-like object (C{size} is set, then
        C{update(n)} called) or a callable taking C{n}.
    @param proxy_url: tried when C{url} cannot be reached.
    @param max_workers: connections to use, at most the server's
        C{max_writers}; C{None} (default): as many as the server offers
        (at most L{WORKERS_LIMIT}).
    @param backing_chain: upload the backing chain too; when false, holes
        stay holes in the target (upload to an empty snapshot).
    @param disk_is_zero: the target reads as zeroes, so zero extents are
        skipped instead of zeroed.
    """
    reactor = _reactor(reactor)
    _tune_malloc()
    return _guard(_trimmed(defer.ensureDeferred(_upload(
        reactor, filename, url, cafile, buffer_size, secure, progress,
        proxy_url, max_workers, member, backing_chain, disk_is_zero,
        http_client))), f"upload of {filename!r} to {url}", local=filename)


async def _download(reactor, url, filename, cafile, fmt, incremental,
                    buffer_size, secure, progress, proxy_url, max_workers,
                    backing_file, backing_format, http_client):
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"Unsupported image format {fmt!r}: expecting "
                         f"'raw' or 'qcow2'")
    if incremental and fmt != "qcow2":
        raise ValueError(f"incremental={incremental} is incompatible with "
                         f"fmt={fmt}")
    progress = _Progress(progress)
    src = await _transfer.open_http(
        reactor, url, "r", cafile=cafile, secure=secure,
        proxy_url=proxy_url, max_connections=_pool_size(max_workers),
        buffer_size=buffer_size, client=http_client)
    try:
        size = src.size()
        if incremental:
            extents = await src.extents("dirty")
        else:
            extents = await src.extents("zero")
        await _qemu.create(reactor, filename, fmt, size=size,
                           backing_file=backing_file,
                           backing_format=backing_format)
        workers = _workers(src.maxReaders, max_workers)
        server = await _qemu.start_nbd(reactor, filename, fmt,
                                       shared=workers)
        try:
            dsts = await _open_nbd_backends(reactor, server, workers, "r+")
            try:
                progress.set_size(size)
                requests = _transfer.plan(
                    extents, dirty=incremental,
                    zero=backing_file is not None, hole=False)
                await _transfer.copy(
                    [src] * workers, dsts, requests, direction="download",
                    buffer_size=buffer_size, progress=progress)
            finally:
                await _close_all(dsts)
        finally:
            await server.stop()
    finally:
        await src.close()


def download(url, filename, cafile, fmt="qcow2", incremental=False,
             buffer_size=BUFFER_SIZE, secure=True, progress=None,
             proxy_url=None, max_workers=None, backing_file=None,
             backing_format=None, *, reactor=None,
             http_client=None) -> defer.Deferred[None]:
    """
    Download the transfer C{url} to a new local image C{filename} in
    format C{fmt} (C{"qcow2"} or C{"raw"}).

    @param incremental: copy only the dirty extents (backup with a dirty
        bitmap; needs C{fmt="qcow2"}).
    @param backing_file: create the image on top of this backing file
        (zero extents are then written as zeroes to hide it).
    @param backing_format: the format of C{backing_file}.

    Other parameters as in L{upload}; C{max_workers} is capped by the
    server's C{max_readers} (C{None}: as many as it offers).
    """
    reactor = _reactor(reactor)
    _tune_malloc()
    return _guard(_trimmed(defer.ensureDeferred(_download(
        reactor, url, filename, cafile, fmt, incremental, buffer_size,
        secure, progress, proxy_url, max_workers, backing_file,
        backing_format, http_client))), f"download of {url} to {filename!r}",
        local=filename, writing_local=True)


def info(filename, member=None, *, reactor=None) -> defer.Deferred[dict]:
    """
    C{qemu-img info} of the image (C{member-offset} and C{member-size}
    added for an OVA C{member}).
    """
    return _guard(defer.ensureDeferred(
        _qemu.info(_reactor(reactor), filename, member=member)),
        f"info of {filename!r}")


def measure(filename, dst_fmt, member=None, *,
            reactor=None) -> defer.Deferred[dict]:
    """
    C{qemu-img measure} of the image converted to C{dst_fmt}.
    """
    return _guard(defer.ensureDeferred(
        _qemu.measure(_reactor(reactor), filename, dst_fmt, member=member)),
        f"measure of {filename!r}")


async def _with_local(reactor, filename, member, fn, bitmap=None):
    image = await _qemu.info(reactor, filename, member=member)
    server = await _qemu.start_nbd(
        reactor, filename, image["format"], read_only=True, shared=1,
        bitmap=bitmap, offset=image.get("member-offset"),
        size=image.get("member-size"))
    try:
        backend = await nbd_backend.open(reactor, server.url, mode="r",
                                         dirty=bitmap is not None)
        try:
            return await fn(backend)
        finally:
            await backend.close()
    finally:
        await server.stop()


async def _checksum(reactor, backend, block_size, algorithm,
                    detect_zeroes):
    hasher = blkhash.Hasher(algorithm, block_size,
                            detectZeroes=detect_zeroes)
    pool = reactor.getThreadPool()
    depth = 4
    extents = await backend.extents("zero")
    for ext in extents:
        if ext.zero:
            hasher.zero(ext.length)
            continue
        # Keep a few reads in flight; hash in order in a thread (hashlib
        # releases the GIL), so reading and hashing overlap.
        pending = []
        pieces = list(_transfer._split(ext.start, ext.length, block_size))
        i = 0
        while i < len(pieces) or pending:
            while i < len(pieces) and len(pending) < depth:
                start, n = pieces[i]
                pending.append(backend.read(start, n))
                i += 1
            data = await pending.pop(0)
            await threads.deferToThreadPool(reactor, pool, hasher.update,
                                            data)
    return hasher.result()


def checksum(filename, member=None, block_size=blkhash.BLOCK_SIZE,
             algorithm=blkhash.ALGORITHM, detect_zeroes=True, *,
             reactor=None) -> defer.Deferred[dict]:
    """
    The blkhash of the image's guest data, the same dict as the server's
    C{/checksum}: C{{"algorithm", "block_size", "checksum"}}.
    """
    reactor = _reactor(reactor)

    async def compute(backend):
        return await _checksum(reactor, backend, block_size, algorithm,
                               detect_zeroes)

    return _guard(defer.ensureDeferred(_with_local(
        reactor, filename, member, compute)), f"checksum of {filename!r}",
        local=filename)


def extents(filename, member=None, bitmap=None, *,
            reactor=None) -> defer.Deferred[list]:
    """
    The image's extents: a list of L{imageio.extents.ZeroExtent}, or of
    L{imageio.extents.DirtyExtent} for the dirty C{bitmap}.
    """
    reactor = _reactor(reactor)

    async def get(backend):
        return await backend.extents("dirty" if bitmap else "zero")

    return _guard(defer.ensureDeferred(_with_local(
        reactor, filename, member, get, bitmap=bitmap)),
        f"extents of {filename!r}", local=filename)


def remote_checksum(url, cafile=None, secure=True, algorithm=None,
                    block_size=None, *, reactor=None,
                    http_client=None) -> defer.Deferred[dict]:
    """
    The server's checksum of the transfer C{url} (C{GET <url>/checksum}).
    """
    return _guard(defer.ensureDeferred(_transfer.remote_checksum(
        _reactor(reactor), url, cafile=cafile, secure=secure,
        algorithm=algorithm, block_size=block_size, client=http_client)),
        f"checksum of {url}")


class _Writer:
    """
    Collects a GET body for L{ImageioClient.write_to}: hands each piece to
    the caller's C{writer.write}.
    """

    def __init__(self, writer, reactor=None):
        self._writer = writer
        self._reactor = reactor

    def registerProducer(self, producer, streaming):
        if self._reactor is not None:
            # A large body is read by a thread, as in downloads.
            _bodythread.ResponseReader.takeOver(producer, self._reactor)

    def unregisterProducer(self):
        pass

    def write(self, data):
        self._writer.write(data)


class ImageioClient:
    """
    Random access to a transfer url. Create it with L{ImageioClient.open}.

    @ivar max_readers: the server's advised concurrent readers.
    @ivar max_writers: the server's advised concurrent writers.
    """

    def __init__(self, backend, buffer_size=BUFFER_SIZE, url=None):
        self._backend = backend
        self._buffer_size = min(buffer_size, _transfer.MAX_BUFFER_SIZE)
        self._url = url or repr(backend)

    def _guard(self, d: defer.Deferred, what: str) -> defer.Deferred:
        return _guard(d, f"{what} {self._url}")

    @classmethod
    def open(cls, transfer_url, cafile=None, secure=True, proxy_url=None,
             buffer_size=BUFFER_SIZE, *, reactor=None,
             http_client=None) -> defer.Deferred[ImageioClient]:
        """
        Connect (OPTIONS, unix socket upgrade) to C{transfer_url}, or to
        C{proxy_url} when it cannot be reached.
        """
        reactor = _reactor(reactor)
        d = defer.ensureDeferred(_transfer.open_http(
            reactor, transfer_url, "r+", cafile=cafile, secure=secure,
            proxy_url=proxy_url, max_connections=2,
            buffer_size=buffer_size, client=http_client))
        d.addCallback(cls, buffer_size, transfer_url)
        return _guard(d, f"opening {transfer_url}")

    @property
    def max_readers(self) -> int:
        return self._backend.maxReaders

    @property
    def max_writers(self) -> int:
        return self._backend.maxWriters

    @property
    def backend(self):
        """
        The underlying L{imageio.backends.http.HTTPBackend}.
        """
        return self._backend

    def size(self) -> int:
        return self._backend.size()

    def extents(self, context="zero") -> defer.Deferred[list]:
        return self._guard(self._backend.extents(context),
                           f"{context} extents of")

    def _check(self, offset, length, what):
        if offset < 0 or offset + length > self._backend.size():
            raise RuntimeError(f"{what} out of image bounds")

    def read_from(self, reader, offset, length) -> defer.Deferred[None]:
        """
        One C{PUT} of C{length} bytes at C{offset}, read from C{reader}
        (C{readinto(buf)}; called in the reactor thread, so it should not
        block for long).
        """
        try:
            self._check(offset, length, "Write")
        except RuntimeError:
            return defer.fail()
        return self._guard(
            defer.ensureDeferred(self._read_from(reader, offset, length)),
            f"write of {length} bytes at {offset} to")

    async def _read_from(self, reader, offset, length):
        self._check(offset, length, "Write")
        upload = self.start_upload(offset, length)
        try:
            for data in _read_pieces(reader, length, self._buffer_size):
                await upload.write(data)
        except BaseException:
            upload.abort()
            raise
        await upload.finish()

    def start_upload(self, offset, length) -> _Upload:
        """
        Start one streaming C{PUT}; feed it with L{_Upload.write}.
        """
        self._check(offset, length, "Write")
        return _Upload(self._backend, offset, length)

    def write_to(self, writer, offset, length) -> defer.Deferred[None]:
        """
        One C{GET} of C{length} bytes at C{offset}; each piece goes to
        C{writer.write(data)} (in the reactor thread).
        """
        try:
            self._check(offset, length, "Read")
        except RuntimeError:
            return defer.fail()
        d = self._backend.readTo(
            offset, length,
            _Writer(writer, getattr(self._backend, "_reactor", None)))
        return self._guard(d.addCallback(lambda _: None),
                           f"read of {length} bytes at {offset} from")

    def read(self, offset, buf) -> defer.Deferred[int]:
        """
        Read C{len(buf)} bytes at C{offset} into C{buf}.
        """
        try:
            self._check(offset, len(buf), "Read")
        except RuntimeError:
            return defer.fail()

        def got(data):
            n = len(data)
            memoryview(buf).cast("B")[:n] = data
            return n

        return self._guard(
            self._backend.read(offset, len(buf)).addCallback(got),
            f"read of {len(buf)} bytes at {offset} from")

    def write(self, offset, buf) -> defer.Deferred[None]:
        """
        Write the bytes of C{buf} at C{offset}.
        """
        try:
            self._check(offset, len(buf), "Write")
        except RuntimeError:
            return defer.fail()
        return self._guard(self._backend.write(offset, bytes(buf)),
                           f"write of {len(buf)} bytes at {offset} to")

    def zero(self, offset, length) -> defer.Deferred[None]:
        return self._guard(self._backend.zero(offset, length),
                           f"zero of {length} bytes at {offset} of")

    def flush(self) -> defer.Deferred[None]:
        return self._guard(self._backend.flush(), "flush of")

    def close(self) -> defer.Deferred[None]:
        return self._backend.close()


def _read_pieces(reader, length: int, size: int):
    """
    Read C{length} bytes with C{reader.readinto(buf)} into a buffer of
    C{size} bytes, for L{ImageioClient.read_from} (here and in the blocking
    L{imageio.client.ImageioClient}, which reads in the calling thread).

    @return: an iterator of the pieces read, as C{bytes}.
    @raise RuntimeError: the reader ended before C{length} bytes.
    """
    buf = bytearray(size)
    todo = length
    while todo:
        n = reader.readinto(memoryview(buf)[:min(todo, len(buf))])
        if not n:
            raise RuntimeError(f"Unexpected end of file, {todo} bytes "
                               f"missing")
        yield bytes(buf[:n])
        todo -= n


class _Upload:
    """
    One streaming C{PUT} fed piece by piece: L{write} returns a Deferred
    that fires once the connection wants more (backpressure).
    """

    def __init__(self, backend, offset, length):
        self._paused = False
        self._waiters: list[defer.Deferred] = []
        self.stream, self.done = backend.writeFrom(offset, length,
                                                   producer=self)
        self.done.addBoth(self._ended)

    def _ended(self, result):
        # Reported by whenDone(); wake a writer waiting for a resume.
        self._wake()

    # IPushProducer, called by the stream.

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._wake()

    def stopProducing(self):
        self._wake()

    def _wake(self):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def write(self, data) -> defer.Deferred[None]:
        self.stream.write(data)
        if self.stream.failed:
            return self.stream.whenDone()
        if not self._paused or self.stream.received >= self.stream.length:
            # A paused connection is not resumed once the body is
            # complete: never wait for that.
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def finish(self) -> defer.Deferred[None]:
        self.stream.finish()
        return self.stream.whenDone().addCallback(lambda _: None)

    def abort(self):
        self.stream.abort()
