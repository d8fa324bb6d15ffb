# -*- test-case-name: test.test_client -*-
"""
The client's copy engine and its HTTP side.

  - L{open_http}: open the remote image (OPTIONS first, the unix socket
    upgrade when the server is on this host) through
    L{imageio.backends.http}, falling back from the transfer url to the
    proxy url when the first cannot be reached.
  - L{copy}: move an image between a local C{qemu-nbd} export and the
    remote, driven by extents: N workers (one HTTP connection and one NBD
    connection each) take pieces of at most L{MAX_COPY_SIZE} bytes; data
    moves as one streaming request per piece (C{PUT} fed by pipelined NBD
    reads, or C{GET} feeding pipelined NBD writes) in chunks of
    C{buffer_size}; zero extents become zero requests or are skipped;
    zero bytes never cross the wire. Every connection is flushed at the
    end.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import treq
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from imageio.client import _bodythread
from imageio.client._errors import (
    ServerError, TransferError, _backend_text)
from imageio.logs import Logger
from imageio.backends import http as http_backend
from imageio.errors import BackendError, HTTPError, InternalError
from imageio.transfer import DownloadProducer, UploadSink
from imageio.units import GiB, MiB

__all__ = ["TransferError", "open_http", "copy", "http_client",
           "remote_checksum", "MAX_BUFFER_SIZE", "MAX_COPY_SIZE",
           "MAX_ZERO_SIZE"]

_log = Logger()

MAX_BUFFER_SIZE = 32 * MiB
"""
The largest chunk moved at once (the NBD maximum request size).
"""

MAX_COPY_SIZE = 128 * MiB
"""
The largest piece of data moved by one HTTP request; smaller pieces
spread big extents over the workers and keep progress moving.
"""

MAX_ZERO_SIZE = 1 * GiB
"""
The largest range zeroed by one request.
"""

UPLOAD_READ_DEPTH = 2
"""
Reads of the local image in flight per upload connection.
"""

DOWNLOAD_HIGH_WATER = 4 * MiB
"""
Bytes of a download connection buffered (or being written to the local
image) before its socket is paused; reading resumes below half of it.
"""

DOWNLOAD_WRITE_SIZE = 1 * MiB
"""
The largest write to the local image of a download.
"""


# HTTP side.

@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    TLS without certificate verification (C{secure=False}), still sending
    the host name (SNI) and refusing TLS older than 1.2.
    """

    def __init__(self, hostname: str):
        options = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self._context = options.getContext()
        self._sni = None
        if not _is_ip(hostname):
            self._sni = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class _UnverifiedPolicy:
    def creatorForNetloc(self, hostname, port):
        if isinstance(hostname, bytes):
            hostname = hostname.decode("ascii")
        return _Unverified(hostname)


def _is_ip(host: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _policy(cafile: str | None, secure: bool):
    """
    @return: the L{IPolicyForHTTPS} for C{cafile} and C{secure}; a bad CA
        file raises L{TransferError} at once.
    """
    if not secure:
        return _UnverifiedPolicy()
    try:
        root = http_backend.trustRoot(cafile or "")
    except BackendError as e:
        raise TransferError(str(e)) from None
    return BrowserLikePolicyForHTTPS(trustRoot=root)


def http_client(reactor, cafile: str | None = None,
                secure: bool = True) -> HTTPClient:
    """
    A treq L{HTTPClient} verifying servers with C{cafile} (or the platform
    store), or not at all when C{secure} is false.
    """
    agent = Agent(reactor, contextFactory=_policy(cafile, secure))
    return HTTPClient(agent)


def _unreachable(failure_or_exc) -> bool:
    """
    Whether an error means "cannot talk to that server" (connection
    refused, timeout, DNS, TLS), as opposed to an answer of the server.
    """
    exc = failure_or_exc
    if isinstance(exc, Failure):
        exc = exc.value
    if isinstance(exc, InternalError):
        # The http backend's refused certificate / failed handshake.
        return True
    if isinstance(exc, HTTPError):
        return False
    return isinstance(exc, (BackendError, OSError, TransferError))


async def _open_one(reactor, url: str, mode: str, policy, *,
                    max_connections: int, buffer_size: int,
                    client: HTTPClient | None):
    if urlsplit(url).scheme not in ("http", "https"):
        raise TransferError(f"Unsupported url {url!r}: the scheme must be "
                            f"https or http")
    try:
        scheme, host, port, path = http_backend.splitURL(url)
    except http_backend.InvalidURL as e:
        raise TransferError(str(e)) from None
    creator = None
    if scheme == "https":
        creator = policy.creatorForNetloc(host.encode("idna"), port)
    return await http_backend.HTTPBackend.connect(
        reactor, url=url, host=host, port=port, path=path, creator=creator,
        mode=mode, bufferSize=buffer_size, maxConnections=max_connections,
        client=client)


async def open_http(reactor, url: str, mode: str, *, cafile=None,
                    secure: bool = True, proxy_url: str | None = None,
                    max_connections: int = 4,
                    buffer_size: int = 4 * MiB,
                    client: HTTPClient | None = None):
    """
    Open the remote image at C{url}, or at C{proxy_url} if C{url} cannot
    be reached.

    @param client: a treq L{HTTPClient} to use instead of real connections
        (tests pass L{treq.testing.StubTreq}).
    @return: an L{imageio.backends.http.HTTPBackend}; raises the server's
        L{HTTPError}, or L{TransferError} naming both urls when neither
        answers.
    """
    policy = _policy(cafile, secure)
    kw = dict(max_connections=max_connections,
              buffer_size=min(buffer_size, MAX_BUFFER_SIZE), client=client)
    _log.debug("Trying {url}", url=url)
    try:
        return await _open_one(reactor, url, mode, policy, **kw)
    except Exception as e:
        if not proxy_url or not _unreachable(e):
            if _unreachable(e) and not isinstance(e, TransferError):
                raise TransferError(
                    f"cannot reach {url}: {_backend_text(e)}") from e
            raise
        first = e
    _log.debug("Cannot reach {url} ({error}), trying {proxy}", url=url,
               error=first, proxy=proxy_url)
    try:
        return await _open_one(reactor, proxy_url, mode, policy, **kw)
    except Exception as e:
        if _unreachable(e):
            raise TransferError(
                f"cannot reach {url}: {_backend_text(first)}; cannot reach "
                f"proxy {proxy_url}: {_backend_text(e)}") from e
        raise


async def remote_checksum(reactor, url: str, *, cafile=None,
                          secure: bool = True, algorithm: str | None = None,
                          block_size: int | None = None,
                          client: HTTPClient | None = None) -> dict:
    """
    C{GET <url>/checksum}: the server's blkhash of the image.
    """
    client = client or http_client(reactor, cafile, secure)
    query = {}
    if algorithm:
        query["algorithm"] = algorithm
    if block_size:
        query["block_size"] = str(block_size)
    try:
        response = await client.get(url.rstrip("/") + "/checksum",
                                    params=query or None, timeout=60)
        body = await treq.content(response)
    except Exception as e:
        raise TransferError(f"cannot reach {url}: {_backend_text(e)}") \
            from e
    if response.code != 200:
        text = body[:512].decode("utf-8", "replace").strip()
        raise ServerError(response.code, text, method="GET")
    return json.loads(body)


# The copy engine.

def _settled(d: defer.Deferred) -> defer.Deferred:
    """
    A cancellable Deferred following C{d}, which cancelling leaves alone.
    """
    out: defer.Deferred = defer.Deferred()
    d.addBoth(lambda r: (None if out.called else out.callback(r)))
    return out


class _Operation:
    """
    What the streaming pumps report to: C{check()} stops them once the
    transfer failed, C{progress(n)} feeds the progress object.
    """

    def __init__(self, progress):
        self._progress = progress
        self.failure: Failure | None = None

    def check(self):
        if self.failure is not None:
            raise defer.CancelledError("The transfer was aborted")

    def progress(self, n: int):
        if self._progress is not None and n:
            self._progress.update(n)


class _SinkConsumer:
    """
    An L{IConsumer} over an L{UploadSink} writing to a local NBD export:
    what L{HTTPBackend.readTo} streams a C{GET} body into. The sink pauses
    the HTTP transport while NBD writes are pending.
    """

    def __init__(self, backend, offset, buffer_size, operation,
                 reactor=None):
        self._reactor = reactor
        self.reader = None
        self._relay = http_backend.ProducerRelay()
        # Small NBD writes and a low high-water mark: the bytes of one
        # connection wait here, so this bounds the client's memory per
        # connection (4 MiB + 1 MiB writes: 109 MiB peak RSS for a dense
        # 4 GiB download with 8 connections, against 160 MiB with 8 MiB
        # and 4 MiB writes, at the same speed; bench/client_rss.py).
        write = min(buffer_size, DOWNLOAD_WRITE_SIZE)
        high = max(DOWNLOAD_HIGH_WATER, 2 * write)
        self.sink = UploadSink(backend, offset, operation=operation,
                               producer=self._relay, highWater=high,
                               lowWater=high // 2, writeSize=write)

    def registerProducer(self, producer, streaming):
        self._relay.producer = producer
        if self._reactor is not None:
            # The rest of a large body is read by a thread
            # (L{_bodythread}); it comes back through the same producer.
            self.reader = _bodythread.ResponseReader.takeOver(
                producer, self._reactor, self.sink)

    def unregisterProducer(self):
        self._relay.producer = None

    def write(self, data):
        self.sink.write(data)


def _split(start, length, step):
    end = start + length
    while start < end:
        n = min(step, end - start)
        yield start, n
        start += n


def plan(extents, *, dirty=False, zero=True, hole=True):
    """
    Turn extents into requests C{(op, start, length)}, C{op} one of
    C{"copy"}, C{"zero"} and C{"skip"}, split into pieces of at most
    L{MAX_COPY_SIZE} (copy) or L{MAX_ZERO_SIZE} (zero) bytes.

    Zero context: data is copied; a zero extent is zeroed when C{zero} is
    true and it is no hole or C{hole} is true; else skipped. Dirty context:
    dirty data is copied, dirty zeroes zeroed, clean extents skipped.
    """
    for ext in extents:
        if dirty:
            if not ext.dirty:
                op = "skip"
            else:
                op = "zero" if ext.zero else "copy"
        elif not ext.zero:
            op = "copy"
        elif zero and (not ext.hole or hole):
            op = "zero"
        else:
            op = "skip"
        if op == "skip":
            yield op, ext.start, ext.length
        else:
            step = MAX_COPY_SIZE if op == "copy" else MAX_ZERO_SIZE
            for start, n in _split(ext.start, ext.length, step):
                yield op, start, n


async def _upload_piece(src, dst, start, length, buffer_size, operation):
    reactor = getattr(dst, "_reactor", None)
    if reactor is None:
        stream, done = dst.writeFrom(start, length, operation=operation)
    else:
        # The request may start at once (a pooled connection): the thread
        # hook goes in before the stream is attached to the backend.
        attached: defer.Deferred = defer.Deferred()
        stream = http_backend.uploadStream(attached, start, length,
                                           operation=operation)
        _bodythread.RequestWriter.sendFromThread(stream, reactor)
        attached.callback(dst)
        done = stream.whenDone()
    # Two reads in flight per connection (the NBD default is 4): with up
    # to 8 connections that still keeps 16 reads going, and bounds the
    # client's memory (bench/client_rss.py).
    pump = DownloadProducer(src, stream, start, length,
                            chunkSize=buffer_size, depth=UPLOAD_READ_DEPTH)
    pumped = pump.start()

    upload_failed = []

    def stop_pump(failure):
        if not pumped.called:
            upload_failed.append(True)
            pumped.cancel()
        return failure

    done.addErrback(stop_pump)
    # stop_pump resumes this coroutine from inside done's callbacks; a
    # Deferred cannot be awaited while it runs its callbacks (Twisted
    # asserts), so wait on a follower fired after them.
    outcome = _settled(done)
    try:
        await pumped
    except defer.CancelledError:
        if not upload_failed:
            # We were cancelled: abort the request.
            stream.abort(Failure())
            outcome.addErrback(lambda _: None)
            raise
        # The upload failed first; outcome has the reason.
    except BaseException:
        stream.abort(Failure())
        outcome.addErrback(lambda _: None)
        raise
    else:
        stream.finish()
    await outcome


async def _download_piece(src, dst, start, length, buffer_size, operation):
    consumer = _SinkConsumer(dst, start, buffer_size, operation,
                             getattr(src, "_reactor", None))
    sink = consumer.sink
    try:
        await src.readTo(start, length, consumer, operation=None)
    except BaseException as e:
        error = e
    else:
        sink.finish()
        await sink.whenDone()
        return
    # If writing the local image failed first (ENOSPC, say), that is the
    # error, raised on its own (outside an except block: not chained to
    # the download it stopped).
    wroteFirst = sink.failed
    sink.abort(Failure(error))
    writeError = None
    try:
        await sink.whenDone()
    except BaseException as e:
        writeError = e
    if wroteFirst and writeError is not None:
        raise writeError
    raise error


async def _worker(queue, src, dst, direction, buffer_size, operation):
    piece = _upload_piece if direction == "upload" else _download_piece
    for op, start, length in queue:
        operation.check()
        if op == "copy":
            await piece(src, dst, start, length, buffer_size, operation)
        elif op == "zero":
            await dst.zero(start, length)
            operation.progress(length)
        else:
            operation.progress(length)


async def copy(srcs, dsts, requests, *, direction: str, buffer_size: int,
               progress=None, flush_all=None) -> None:
    """
    Run the workers: worker i copies with C{srcs[i]} and C{dsts[i]} (the
    same backend object may appear several times; the HTTP backend keeps a
    connection per request in flight). Each takes the next request from
    C{requests} (see L{plan}) when free.

    @param direction: C{"upload"} (NBD to HTTP) or C{"download"}.
    @param flush_all: flushes the destination at the end; by default
        every destination object listed is flushed, concurrently (so an
        HTTP backend flushes on each of its connections).
    @raise: the first error of any worker; the others stop at their next
        chunk.
    """
    buffer_size = max(1, min(buffer_size, MAX_BUFFER_SIZE))
    operation = _Operation(progress)
    queue = iter(requests)
    workers = [defer.ensureDeferred(
        _worker(queue, src, dst, direction, buffer_size, operation))
        for src, dst in zip(srcs, dsts)]

    first: list[Failure] = []

    def failed(f):
        if not first:
            first.append(f)
            operation.failure = f
            for w in workers:
                if not w.called:
                    w.cancel()
        return None

    for w in workers:
        w.addErrback(failed)
    try:
        await _settled(defer.DeferredList(workers))
    except defer.CancelledError:
        # We were cancelled (e.g. SIGINT): stop the workers and wait for
        # them to let go of their backends.
        for w in workers:
            if not w.called:
                w.cancel()
        await defer.DeferredList(workers, consumeErrors=True)
        raise
    if first:
        first[0].raiseException()
    if flush_all is not None:
        await flush_all()
    else:
        await defer.gatherResults([defer.maybeDeferred(d.flush)
                                   for d in dsts], consumeErrors=True) \
            .addErrback(lambda f: f.value.subFailure)
