# -*- test-case-name: test.test_images -*-
"""
What C{PATCH} and the extents and checksum requests do to an image, with
no HTTP in it: L{zero}, L{flush}, L{extents}, L{checksum}.

The web layer (L{imageio.web.images}) validates the request, authorizes it
against the ticket and opens the backend; the functions here run the work
on the backend. Those that read or write image data run as a ticket
operation (L{imageio.tickets.Operation}): they count in the ticket's
C{transferred}, stop at the next step when the ticket is canceled (the
operation's C{check} raises), and touch the ticket when they end.

Each takes the L{imageio.metrics.Metrics} to report to (L{NO_METRICS} by
default): bytes and latencies by backend, and the time of the whole
operation.
"""

from __future__ import annotations

import time
from collections import deque

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from imageio import blkhash, errors, malloc, transfer
from imageio.abilities import IPieceReads, IZeroSteps
from imageio.metrics import NO_METRICS
from imageio.units import MiB

__all__ = ["zero", "flush", "extents", "checksum", "clip", "MAX_ZERO_STEP",
           "CHECKSUM_BUFFER", "CHECKSUM_READ_SIZE", "CHECKSUM_READS"]

# The reference zeroes in steps of at most 128 MiB, checking for cancel
# between steps (some storage times out on larger requests).
MAX_ZERO_STEP = 128 * MiB

# The checksum reads ahead and hashes data blocks on several pool threads
# at once, holding at most this many bytes of blocks (and at least two).
# The daemon's peak RSS during the bench's checksums: 58 MiB idle, 90 MiB
# (file) and 100 MiB (nbd) with 16 MiB; 104 and 127 MiB with 32 MiB.
CHECKSUM_BUFFER = 16 * MiB

# Reads of a checksum in flight, and their size. Each read's result is a
# new bytes object: below malloc's mmap threshold (imageio.malloc) it comes
# from the heap instead of a fresh mapping faulted in page by page (reads
# of twice the threshold cost 25% more CPU on the bench's 4 GiB mixed
# image, and the checksum ran 1.15x the reference's speed instead of 1.7x).
# Two reads in flight keep the file backend on its idle aligned buffers
# instead of mapping new ones (4 cost more CPU), and already keep the
# hashing threads fed.
CHECKSUM_READ_SIZE = malloc.HEAP_BUFFER
CHECKSUM_READS = 2

# Runs of zero blocks longer than this are added in the pool: an 8 TiB hole
# is two million digests for the outer hash (~0.1 s).
_ZERO_RUN_IN_REACTOR = 64 * 1024 * MiB


async def zero(backend, ticket, offset: int, size: int, *,
               flush: bool = False, metrics=NO_METRICS) -> None:
    """
    Make C{[offset, offset + size)} read as zeroes, then flush if asked.

    @param ticket: the L{imageio.tickets.Ticket} the range was authorized
        on (and checked against).
    @raise errors.HTTPError: the ticket was canceled meanwhile.
    """
    meter = metrics.meter(backend)
    op = ticket.startOperation(offset, size)
    # Steps as large as the backend says zeroing stays cheap *now* (a
    # sparse file punches 64 GiB holes at once, once it did one; asked
    # again before each step, since the first steps tell the backend
    # what the filesystem can do), else ordinary steps a cancel can
    # stop between; as many in flight as its writes (an NBD connection
    # keeps them in order).
    depth = transfer.writeDepth(backend)
    pending: deque = deque()
    try:
        pos, end = offset, offset + size
        while pos < end or pending:
            while pos < end and len(pending) < depth:
                op.check()
                maxStep = ((IZeroSteps.providedBy(backend)
                            and backend.maxZeroStep) or MAX_ZERO_STEP)
                step = min(end - pos, maxStep)
                pending.append((backend.zero(pos, step), step,
                                time.monotonic()))
                pos += step
            d, step, started = pending.popleft()
            await d
            meter.zero(step, time.monotonic() - started)
            op.progress(step)
        if flush:
            with metrics.timed("flush"):
                await backend.flush()
    finally:
        for d, _, _ in pending:
            # Failed or stopped early: the others' outcome is moot.
            d.addErrback(lambda _: None)
        op.finish()
    op.check()


async def flush(backend, ticket, *, metrics=NO_METRICS) -> None:
    """
    Make what was written to C{backend} durable, as an operation of
    C{ticket}.
    """
    op = ticket.startOperation(0, 0)
    try:
        with metrics.timed("flush"):
            await backend.flush()
    finally:
        op.finish()
    op.check()


async def extents(backend, context: str = "zero", *,
                  start: int | None = None, length: int | None = None,
                  metrics=NO_METRICS) -> list:
    """
    The extents of the image (C{context} C{"zero"} or C{"dirty"}), or of
    C{[start, start + length)} of it when either is given (see L{clip}).
    Not a ticket operation.
    """
    with metrics.timed("extents"):
        result = await backend.extents(context)
    if start is not None or length is not None:
        result = clip(result, start or 0, length)
    return result


def clip(extents, start: int, length: int | None):
    """
    The part of C{extents} inside C{[start, start + length)}.
    """
    end = None if length is None else start + length
    result = []
    for e in extents:
        if e.end <= start:
            continue
        if end is not None and e.start >= end:
            break
        first = max(e.start, start)
        last = e.end if end is None else min(e.end, end)
        if first == e.start and last == e.end:
            result.append(e)
        else:
            result.append(type(e)(**{**e.__dict__, "start": first,
                                     "length": last - first}))
    return result


async def checksum(backend, ticket, algorithm: str, blockSize: int, *,
                   reactor, threadpool, metrics=NO_METRICS) -> dict:
    """
    The checksum of the whole image (L{blkhash}), as an operation of
    C{ticket}.

    Zero blocks (from the zero extents) are never read. Data blocks are
    read ahead and hashed in C{threadpool}, several at once, and their
    digests added in image order: at most L{CHECKSUM_BUFFER} bytes of data
    blocks (and never fewer than two blocks) are in flight, so memory does
    not grow with the image.

    @return: the checksum as the reference's JSON object.
    """
    size = backend.size()
    op = ticket.startOperation(0, size)
    try:
        with metrics.timed("checksum"):
            result = await _compute(backend, op, algorithm, blockSize, size,
                                    reactor, threadpool, metrics)
    finally:
        op.finish()
    op.check()
    return result


async def _compute(backend, op, algorithm, blockSize, size, reactor,
                   threadpool, metrics):
    hasher = blkhash.Hasher(algorithm, blockSize)
    meter = metrics.meter(backend)

    def inThread(f, *args):
        return deferToThreadPool(reactor, threadpool, f, *args)

    # A backend that can hand over a read's pieces as they arrived (nbd)
    # saves joining them: the hash takes a list of buffers.
    readPieces = (backend.readPieces if IPieceReads.providedBy(backend)
                  else None)

    def readPart(offset, n):
        started = time.monotonic()

        def got(pieces):
            total = sum(len(p) for p in pieces)
            meter.read(total, time.monotonic() - started)
            if total < n:
                raise errors.PartialContent(n, total)
            return pieces

        if readPieces is not None:
            d = readPieces(offset, n)
        else:
            d = backend.read(offset, n).addCallback(lambda data: [data])
        return d.addCallback(got)

    reads = defer.DeferredSemaphore(CHECKSUM_READS)

    def digestOf(start, length):
        # A block is read in parts of at most readSize, hashed as one.
        parts = [reads.run(readPart, offset,
                           min(readSize, start + length - offset))
                 for offset in range(start, start + length, readSize)]
        if len(parts) == 1:
            d = parts[0]
        else:
            d = defer.gatherResults(parts, consumeErrors=True)
            d.addCallbacks(lambda lists: [p for ps in lists for p in ps],
                           lambda f: f.value.subFailure)
        return d.addCallback(lambda pieces: inThread(hasher.blockDigest,
                                                     pieces))

    with metrics.timed("extents"):
        zeroExtents = await backend.extents("zero")
    readSize = min(blockSize, CHECKSUM_READ_SIZE,
                   backend.maxRequest or blockSize)
    window = max(2, CHECKSUM_BUFFER // blockSize)
    # _Block items in image order; a zero run has no Deferred.
    pending: deque[_Block] = deque()
    reading = 0

    async def addNext():
        nonlocal reading
        block = pending.popleft()
        if block.digest is None:
            if block.length > _ZERO_RUN_IN_REACTOR:
                # Many digests to feed the outer hash.
                await inThread(hasher.zero, block.length)
            else:
                hasher.zero(block.length)
        else:
            reading -= 1
            hasher.addBlock(await block.digest, block.length)
        op.progress(block.length)

    try:
        for start, length, isZero in blkhash.blocks(zeroExtents, size,
                                                    blockSize):
            op.check()
            if isZero:
                pending.append(_Block(length))
            else:
                pending.append(_Block(length, digestOf(start, length)))
                reading += 1
            # Add what is ready; wait for the oldest block while the
            # window is full.
            while pending and (reading >= window or pending[0].ready):
                await addNext()
        while pending:
            op.check()
            await addNext()
    except BaseException:
        # Let the blocks in flight end (cancelling an NBD read aborts
        # the connection, and a pool thread cannot be stopped); their
        # own errors are dropped: the first one is the answer.
        left = [b.digest for b in pending if b.digest is not None]
        pending.clear()
        await defer.DeferredList(left, consumeErrors=True)
        raise
    return hasher.result()


class _Block:
    """
    One item of a checksum in progress: a data block being read and
    hashed, or a run of zero blocks.

    @ivar length: bytes of image it covers.
    @ivar digest: L{Deferred} firing with the block's digest, or L{None}
        for a zero run.
    @ivar ready: the digest (or its failure) is there.
    """

    __slots__ = ("length", "digest", "ready")

    def __init__(self, length: int, digest: defer.Deferred | None = None):
        self.length = length
        self.digest = digest
        self.ready = digest is None
        if digest is not None:
            digest.addBoth(self._done)

    def _done(self, result):
        self.ready = True
        return result
