# -*- test-case-name: test.test_transfer -*-
"""
The two streaming pumps shared by the daemon and the client.

  - L{DownloadProducer} moves bytes from a backend to a consumer (an HTTP
    response, a client socket): an L{IPushProducer} that keeps a few
    backend reads in flight and writes their results in order.
  - L{UploadSink} moves bytes from a stream (an HTTP request body) to a
    backend: it buffers a bounded amount, writes to the backend, and pauses
    the stream's producer (the socket) while too much is pending.

Both report to an optional I{operation} (L{imageio.tickets.Operation}):
C{check()} before every chunk, so a canceled ticket stops the transfer at
the next chunk, and C{progress(n)} after every chunk. Neither calls
C{finish()}: the caller owns the operation.

Both may also report to the daemon's I{metrics}
(L{imageio.metrics.Metrics}): once the backend is known they take its
meter (C{metrics.meter(backend)}) and call C{read(nbytes, seconds)} after
each backend read returns, C{write(nbytes, seconds)} after each backend
write completes, C{seconds} being the time the backend took.

Nothing here knows about HTTP: the client library uses the same classes.
"""

from __future__ import annotations

import time
from collections import deque

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.abilities import (
    IThreadTarget, IVectoredWrite, readDepth, writeDepth)
from imageio.deferreds import fireWaiters, whenResult
from imageio.errors import PartialContent
from imageio.logs import Logger
from imageio.units import MiB

__all__ = [
    "DownloadProducer", "UploadSink", "Written", "Region", "LimitExceeded",
    "ProducerStopped",
    "readDepth", "writeDepth", "CHUNK_SIZE",
    "HIGH_WATER", "LOW_WATER",
]

CHUNK_SIZE = 1 * MiB
"""
Bytes per consumer write (and per backend read) of a download. 1 MiB
writes halve the CPU cost of TLS compared with 64 KiB (TWISTED-NOTES §6).
"""

HIGH_WATER = 8 * MiB
"""
An upload pauses its producer once this much is buffered or being written.
"""

LOW_WATER = 4 * MiB
"""
A paused upload resumes its producer once pending bytes fall to this.
"""

def _operationOK(operation, fail) -> bool:
    """
    Check C{operation} (a canceled ticket raises), if any; on an error
    call C{fail} with it.

    @return: whether the transfer may go on.
    """
    if operation is None:
        return True
    try:
        operation.check()
    except Exception:
        fail(Failure())
        return False
    return True


class ProducerStopped(defer.CancelledError):
    """
    The consumer of a download went away (C{stopProducing}), or the stream
    of an upload was aborted. A L{defer.CancelledError}: nobody is left to
    tell.
    """


class LimitExceeded(Exception):
    """
    An upload stream carried more bytes than its limit allows. Nothing past
    the limit was written.

    @ivar limit: the number of bytes allowed.
    """

    def __init__(self, limit: int):
        super().__init__(f"More than {limit} bytes in the stream")
        self.limit = limit


class _Reentry:
    """
    Run a pump loop without recursion: a request to run it while it runs
    makes the running loop go once more. Backends may fire their Deferreds
    synchronously (memory backend, page-cache hits), so a callback would
    otherwise re-enter the loop that issued the request.
    """

    __slots__ = ("_running", "_again")

    def __init__(self):
        self._running = False
        self._again = False

    def run(self, step) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            while True:
                self._again = False
                step()
                if not self._again:
                    break
        finally:
            self._running = False


@implementer(IPushProducer)
class DownloadProducer:
    """
    Copy C{length} bytes at C{offset} from a backend to a consumer.

    Up to C{depth} backend reads of at most C{chunkSize} bytes are in flight;
    results are written to the consumer in order, one write per read. While
    paused, no new read is issued; reads already in flight complete and are
    written when the consumer resumes us, so the overshoot is at most
    C{depth * chunkSize} bytes.

    Use: C{d = DownloadProducer(...).start()}. The producer registers itself
    with the consumer (streaming) and unregisters when it is done, whatever
    the outcome, unless the consumer stopped it.

    @ivar written: bytes written to the consumer so far.
    @ivar _slots: reads in flight or waiting to be written, in offset order;
        each a C{[length, result, started]} list, C{result} C{None} until
        the read completes, C{started} the clock when it was issued.
    """

    _log = Logger()

    def __init__(self, backend, consumer, offset: int, length: int, *,
                 operation=None, depth: int | None = None,
                 chunkSize: int = CHUNK_SIZE, metrics=None):
        """
        @param backend: an L{imageio.backends.IBackend}.
        @param consumer: an L{IConsumer} (e.g. a L{twisted.web.http.Request}).
        @param operation: checked and told about progress at each chunk.
        @param depth: reads in flight; L{readDepth} of the backend if
            C{None}.
        @param chunkSize: bytes per read and per write (capped by the
            backend's C{maxRequest}).
        @param metrics: told about each backend read, or C{None}.
        """
        self._backend = backend
        self._consumer = consumer
        self._operation = operation
        self._meter = None if metrics is None else metrics.meter(backend)
        self._depth = max(1, depth if depth is not None
                          else readDepth(backend))
        maxRequest = backend.maxRequest or chunkSize
        self._chunkSize = max(1, min(chunkSize, maxRequest))
        self._next = offset
        self._end = offset + length
        self.length = length
        self.written = 0
        self._slots: deque[list] = deque()
        self._paused = False
        self._stopped = False
        self._finished = False
        self._registered = False
        self._pump = _Reentry()
        self._done: defer.Deferred[int] = defer.Deferred(
            lambda d: self._abandon())

    def start(self) -> defer.Deferred[int]:
        """
        Register with the consumer and start copying.

        @return: L{Deferred} firing with the number of bytes written when
            all were written, or failing with the first read error,
            L{imageio.errors.PartialContent} for a short read, the
            operation's cancel error, or L{ProducerStopped}. Cancelling it
            stops the copy.
        """
        self._consumer.registerProducer(self, True)
        self._registered = True
        self._pump.run(self._step)
        return self._done

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._finished:
            return
        self._paused = False
        self._pump.run(self._step)

    def stopProducing(self) -> None:
        # The consumer is gone: it must not be touched any more.
        self._registered = False
        self._fail(Failure(ProducerStopped("The consumer stopped the "
                                           "download")))

    # Internals

    def _step(self) -> None:
        # Write what is ready, in order, until paused.
        while (not self._finished and not self._paused and self._slots
               and self._slots[0][1] is not None):
            wanted, data, _ = self._slots.popleft()
            if len(data) < wanted:
                # The image ended (or shrank) before the requested range.
                self._fail(Failure(PartialContent(
                    self.length, self.written + len(data))))
                return
            if not _operationOK(self._operation, self._fail):
                return
            if not isinstance(data, (bytes, Region)):
                data = bytes(data)
            self.written += wanted
            # May call pauseProducing or stopProducing synchronously.
            self._consumer.write(data)
            if self._operation is not None:
                self._operation.progress(wanted)
        if self._finished:
            return
        if self.written == self.length:
            self._succeed()
            return
        # Issue reads while there is room, unless paused.
        while (not self._paused and self._next < self._end
               and len(self._slots) < self._depth):
            if not _operationOK(self._operation, self._fail):
                return
            n = min(self._chunkSize, self._end - self._next)
            slot = [n, None, time.monotonic()]
            self._slots.append(slot)
            offset = self._next
            self._next += n
            try:
                d = self._backend.read(offset, n)
            except Exception:
                self._fail(Failure())
                return
            d.addCallbacks(self._readDone, self._readFailed,
                           callbackArgs=(slot,))
            if self._finished:
                return

    def _readDone(self, data, slot) -> None:
        if self._meter is not None:
            # Counted even when the download ended meanwhile: the backend
            # did read them.
            self._meter.read(len(data), time.monotonic() - slot[2])
        if self._finished:
            return
        slot[1] = data
        self._pump.run(self._step)

    def _readFailed(self, failure: Failure) -> None:
        if self._finished:
            if not failure.check(defer.CancelledError):
                self._log.debug("Read failed after the download ended: "
                                "{error}", error=failure.value)
            return
        self._fail(failure)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()

    def _succeed(self) -> None:
        self._finished = True
        self._unregister()
        self._done.callback(self.written)

    def _fail(self, failure: Failure) -> None:
        if self._finished:
            return
        self._finished = True
        self._slots.clear()
        self._unregister()
        self._done.errback(failure)

    def _abandon(self) -> None:
        # The caller cancelled start()'s Deferred: stop, leave the consumer.
        self._finished = True
        self._slots.clear()
        self._unregister()


class Region:
    """
    A range of the image that the consumer reads and sends itself (the
    writer thread of L{imageio.web.bodywriter}): what a view of the backend
    returns from C{read} instead of bytes. L{DownloadProducer} passes it on
    as it is.

    @ivar offset: where the range starts.
    @ivar length: its size in bytes (also its C{len}).
    """

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int):
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


class Written:
    """
    Bytes of an upload that a body thread wrote to the backend itself
    (L{UploadSink.directTarget}); it stands for them in the stream, for the
    HTTP body decoder (which takes its length and the slices C{[:n]} and
    C{[n:]} at the end of a body) and the sink, which counts them.

    @ivar seconds: how long the write took.
    """

    __slots__ = ("length", "seconds")

    def __init__(self, length: int, seconds: float):
        self.length = length
        self.seconds = seconds

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        start, stop, step = index.indices(self.length)
        if start >= stop:
            return b""
        if start == 0 and stop == self.length and step == 1:
            return self
        raise ValueError("Written bytes cannot be split")


class UploadSink:
    """
    Write a stream of bytes to a backend, starting at C{offset}.

    Feed it with L{write} (any chunk sizes) and end the stream with
    L{finish}, or L{abort} if it broke. Bytes are written to the backend in
    order, in writes of up to C{writeSize} bytes, with up to C{depth} writes
    in flight. While the bytes buffered or being written reach
    C{highWater}, C{producer.pauseProducing()} is called (on every
    L{write}: a producer may be resumed by others), and
    C{producer.resumeProducing()} once they drop to C{lowWater}, so memory
    stays bounded by about C{highWater} plus one read of the producer.

    The backend may be given as a L{Deferred} (still opening): the stream is
    buffered, bounded the same way, until it fires.

    A stream longer than C{limit} fails with L{LimitExceeded}; no byte past
    the limit is written. After any failure further input is dropped, the
    producer is resumed (so its owner can drain or close it), and no new
    backend write starts.

    @ivar received: bytes received so far.
    @ivar written: bytes the backend acknowledged so far.
    @ivar backend: the backend, once known.
    """

    _log = Logger()

    def __init__(self, backend, offset: int, *, limit: int | None = None,
                 operation=None, producer=None, highWater: int = HIGH_WATER,
                 lowWater: int = LOW_WATER, writeSize: int | None = None,
                 depth: int | None = None, metrics=None):
        """
        @param backend: an L{imageio.backends.IBackend}, or a L{Deferred}
            firing with one.
        @param offset: where the first byte goes.
        @param limit: the most bytes the stream may carry, or C{None}.
        @param operation: checked before each backend write, told about
            the progress after it.
        @param producer: the L{IPushProducer} feeding us (e.g. the socket
            transport), or C{None}.
        @param writeSize: bytes per backend write; by default half of
            C{highWater}, capped by the backend's C{maxRequest}.
        @param depth: writes in flight; L{writeDepth} of the backend if
            C{None}.
        @param metrics: told about each backend write, or C{None}.
        """
        if lowWater >= highWater:
            raise ValueError("lowWater must be below highWater")
        self.backend = None
        self._offset = offset
        self._limit = limit
        self._operation = operation
        self._metrics = metrics
        self._meter = None
        self._producer = producer
        self._highWater = highWater
        self._lowWater = lowWater
        self._wantedWriteSize = writeSize or highWater // 2
        self._writeSize = self._wantedWriteSize
        self._wantedDepth = depth
        self._depth = 1
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._inFlight = 0
        self._writes = 0
        self.received = 0
        self.written = 0
        self._ended = False
        self._failure: Failure | None = None
        self._result: Failure | int | None = None
        self._waiters: list[defer.Deferred] = []
        self._pump = _Reentry()
        self.maxPending = 0
        self._attachWaiters: list[defer.Deferred] = []
        self._drainWaiters: list[defer.Deferred] = []
        if isinstance(backend, defer.Deferred):
            backend.addCallbacks(self._attach, self._openFailed)
        else:
            self._attach(backend)

    # Stream side.

    def write(self, data) -> None:
        """
        Take the next bytes of the stream. Never blocks; may pause the
        producer.
        """
        n = self._admit(data)
        if not n:
            return
        if type(data) is Written:
            self._wroteDirect(data)
            return
        self._buffer(data, n)
        self._pump.run(self._step)

    def _admit(self, data) -> int:
        """
        Count the next bytes of the stream.

        @return: their number, or 0 if they are dropped: the upload failed
            or ended, or they pass C{limit} (which fails it).
        """
        if self._failure is not None or self._result is not None:
            return 0
        n = len(data)
        if n and self._limit is not None and self.received + n > self._limit:
            self.received += n
            self._fail(Failure(LimitExceeded(self._limit)))
            return 0
        self.received += n
        return n

    def _buffer(self, data, n: int) -> None:
        # Keep n bytes for a later write; pause the producer at the mark.
        self._chunks.append(data)
        self._buffered += n
        pending = self._buffered + self._inFlight
        if pending > self.maxPending:
            self.maxPending = pending
        if pending >= self._highWater and self._producer is not None:
            self._producer.pauseProducing()

    def whenAttached(self) -> defer.Deferred:
        """
        @return: L{Deferred} firing with C{None} once the backend is open
            (or failed to open), at once if it is already.
        """
        if self.backend is not None or self._failure is not None \
                or self._result is not None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._attachWaiters.append(d)
        return d

    def drain(self) -> defer.Deferred:
        """
        Write what is buffered now, whatever its size.

        @return: L{Deferred} firing with C{None} once no write is in
            flight (the upload may have failed meanwhile).
        """
        if (self._buffered and self._failure is None
                and self.backend is not None):
            self._issue(self._buffered)
        if not self._writes:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drainWaiters.append(d)
        return d

    def _drained(self) -> None:
        if not self._writes and self._drainWaiters:
            waiters, self._drainWaiters = self._drainWaiters, []
            fireWaiters(waiters, None)

    def _attached(self) -> None:
        waiters, self._attachWaiters = self._attachWaiters, []
        fireWaiters(waiters, None)

    def directTarget(self):
        """
        Let a body thread write the rest of the stream to the backend
        itself (the file backend's L{threadTarget}), reporting each piece
        with L{write}C{(}L{Written}C{)}. Call after L{drain}, so that the
        bytes before the thread's are on the backend first.

        @return: C{(target, offset)}, the backend's thread target and where
            the thread's first byte goes, or C{None} (the backend cannot,
            or the upload failed).
        """
        if (self._failure is not None or self._result is not None
                or self._ended or self.backend is None):
            return None
        if not IThreadTarget.providedBy(self.backend):
            return None
        target = self.backend.threadTarget()
        if target is None:
            return None
        return target, self._offset + self._buffered

    def _wroteDirect(self, written: Written) -> None:
        # Bytes buffered before these go out now, whatever their size, so
        # that the offsets stay in stream order.
        if self._buffered:
            self._issue(self._buffered)
            if self._failure is not None:
                return
        n = written.length
        self._offset += n
        self.written += n
        if self._meter is not None:
            self._meter.write(n, written.seconds)
        if not _operationOK(self._operation, self._fail):
            return
        if self._operation is not None:
            self._operation.progress(n)

    def finish(self) -> None:
        """
        The stream ended normally: write what is buffered, then fire.
        """
        self._ended = True
        self._pump.run(self._step)

    def abort(self, reason=None) -> None:
        """
        The stream broke (e.g. the connection was lost): drop what is
        buffered and fail with C{reason} once the writes in flight return.
        """
        if self._result is not None or self._failure is not None:
            return
        if reason is None:
            reason = Failure(ProducerStopped("The upload stream was aborted"))
        elif not isinstance(reason, Failure):
            reason = Failure(reason)
        self._producer = None
        self._fail(reason)

    def whenDone(self) -> defer.Deferred[int]:
        """
        @return: a new L{Deferred} firing with the number of bytes written
            once the stream ended and every byte is written, or failing
            with the first error once no write is in flight any more.
        """
        return whenResult(self._result, self._waiters)

    @property
    def failed(self) -> bool:
        """
        True once the upload failed (even if writes are still in flight).
        """
        return self._failure is not None

    # Backend side.

    def _attach(self, backend) -> None:
        if self._result is not None:
            self._attached()
            return
        self.backend = backend
        self._attached()
        if self._metrics is not None:
            self._meter = self._metrics.meter(backend)
        maxRequest = backend.maxRequest
        size = self._wantedWriteSize
        if maxRequest:
            size = min(size, maxRequest)
        depth = self._wantedDepth
        self._depth = max(1, depth if depth is not None
                          else writeDepth(backend))
        # Never wait for more than the high-water mark: we would pause the
        # producer before a write could start, and stall. With several
        # writes in flight, make them small enough that all of them fit
        # under the mark (else only two ever run).
        self._writeSize = max(1, min(size, self._highWater // max(
            2, self._depth)))
        if self._failure is not None:
            self._settle()
        else:
            self._pump.run(self._step)

    def _openFailed(self, failure: Failure) -> None:
        self._fail(failure)
        self._attached()

    def _step(self) -> None:
        if self._failure is not None:
            self._settle()
            return
        if self.backend is None:
            return
        while self._writes < self._depth and (
                self._buffered >= self._writeSize
                or (self._ended and self._buffered)):
            if not _operationOK(self._operation, self._fail):
                return
            self._issue(min(self._writeSize, self._buffered))
            if self._failure is not None:
                return
        if (self._ended and not self._buffered and not self._writes
                and self._result is None):
            self._result = self.written
            self._notify()

    def _issue(self, n: int) -> None:
        # Write the next n buffered bytes.
        offset = self._offset
        self._offset += n
        self._inFlight += n
        self._writes += 1
        started = time.monotonic()
        try:
            if IVectoredWrite.providedBy(self.backend):
                # The pieces as they arrived: joining them cost a copy
                # into a fresh allocation (page faults included) in the
                # reactor thread, and the backend copies them anyway.
                d = self.backend.writev(offset, self._takeParts(n))
            else:
                d = self.backend.write(offset, self._take(n))
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._written, self._writeFailed,
                       callbackArgs=(n, started), errbackArgs=(n,))

    def _take(self, n: int) -> bytes:
        parts = self._takeParts(n)
        if len(parts) == 1:
            part = parts[0]
            return part if isinstance(part, bytes) else bytes(part)
        return b"".join(parts)

    def _takeParts(self, n: int) -> list:
        """
        Remove the next C{n} buffered bytes.

        @return: the chunks (or memoryviews of them) holding them, in order.
        """
        parts = []
        need = n
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                parts.append(self._chunks.popleft())
                need -= len(chunk)
            else:
                view = memoryview(chunk)
                parts.append(view[:need])
                self._chunks[0] = view[need:]
                need = 0
        self._buffered -= n
        return parts

    def _written(self, _, n: int, started: float) -> None:
        self._inFlight -= n
        self._writes -= 1
        self._drained()
        self.written += n
        if self._meter is not None:
            self._meter.write(n, time.monotonic() - started)
        if self._operation is not None:
            self._operation.progress(n)
        if (self._producer is not None and self._failure is None
                and self._buffered + self._inFlight <= self._lowWater):
            self._producer.resumeProducing()
        self._pump.run(self._step)

    def _writeFailed(self, failure: Failure, n: int) -> None:
        self._inFlight -= n
        self._writes -= 1
        self._drained()
        self._fail(failure)

    def _fail(self, failure: Failure) -> None:
        if self._failure is None:
            self._failure = failure
            self._chunks.clear()
            self._buffered = 0
            if self._producer is not None:
                # Let the owner of the stream drain or close it.
                self._producer.resumeProducing()
        self._settle()

    def _settle(self) -> None:
        # Report the failure once nothing is being written any more: the
        # caller may then close the backend or finish the operation.
        if self._writes or self._result is not None:
            return
        self._result = self._failure
        self._notify()

    def _notify(self) -> None:
        fireWaiters(self._waiters, self._result)
