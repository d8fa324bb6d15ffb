# -*- test-case-name: test.test_bodyreader -*-
"""
Request bodies read by a thread from the connection's socket.

A request body arrives in reads of about 64 KiB on a unix socket and in
16 KiB TLS records decrypted one by one (C{recv(32 KiB)}) over TLS, and each
piece went through Twisted's transport, the TLS layer, the HTTP parser and
the upload sink in the reactor thread: 0.5 s of CPU per GiB in Python
alone on a plain socket, the reference spending 0.05-0.15 s per GiB in
all. A L{SocketReader} takes the connection over for the rest of one large
C{Content-Length} body: a thread fills 2 MiB buffers with blocking reads
(over TLS it also decrypts, C{SSL_read} straight into the buffer; no GIL
held while it waits, copies or decrypts) and hands each full buffer to the
reactor, which feeds it to Twisted's body decoder exactly as if Twisted had
read it. The decoder, the request, the sink (limits, backpressure, the
ticket's operation, metrics) and the end of the body work as before; only
the reads, and their per-piece cost, move.

The hand-off follows the rules of L{imageio.web.handoff}: it is decided
inside C{handleContentChunk} (which may run inside the TLS layer's
C{dataReceived}), Twisted stops reading there, and the thread takes the
connection on the next reactor turn, from a clean stack, with what the
decoder still expects. Bytes Twisted had not sent (a C{100 Continue}) go
first. Over TLS a guard stands in for the Connection while the thread owns
it, and at the hand-back whatever the thread read past the body (a
pipelined request) is delivered through the TLS layer.

Backpressure: the sink pauses and resumes its producer, the transport;
while the thread owns the socket those calls pause the thread instead
(shadowed on the transport instance), and at most two buffers wait for the
reactor. Closes and aborts of the transport stop the thread first; an
early error response stops it before answering (L{SocketReader.stop}).

This module touches private Twisted attributes; each use names the version
it was checked against and the test of C{test/test_bodyreader.py} that
fails if an upgrade changes it.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from twisted.internet import defer

from imageio import compat, malloc, transfer
from imageio.errors import BackendError
from imageio.logs import Logger
from imageio.deferreds import fireWaiters, whenResult
from imageio.units import MiB
from imageio.web import handoff, readahead

__all__ = ["SocketReader", "DirectWrites", "MIN_SIZE", "MAX_READERS",
           "BUFFER_SIZE", "running"]

MIN_SIZE = 4 * MiB
"""
Bodies with less left to read stay on Twisted's path.
"""

MAX_READERS = 64
"""
Bodies read by threads at once; more take Twisted's path.
"""

BUFFER_SIZE = malloc.HEAP_BUFFER
"""
Bytes per hand-over to the reactor (a proxy upload's body): below
malloc's mmap threshold (L{imageio.malloc.tune}), so that each buffer
comes from the heap. As 2 MiB mappings, faulted in page by page, they
took a proxy upload from 0.82 to 1.44 s of CPU per GiB.
"""

DIRECT_SIZE = 4 * MiB
"""
Bytes per write when the thread writes a file itself. Two such buffers
per upload (one receiving while the other is written): half the
reference's 8 MiB each, to keep the daemon under 200 MiB with 16
transfers at once.
"""

_WAKE = 0.2
"""
Seconds a blocked read waits before the thread looks at its stop flag.
"""

_slots = handoff.Slots(MAX_READERS)

_diskBuffers = readahead.Buffers(DIRECT_SIZE, keep=2)
"""
The disk writers' buffers, one upload's worth kept from one body to the
next: a client's upload is a series of 8 MiB PUTs, and two new mappings
per body cost a page fault and a zeroed page per 4 KiB written (517,000
faults and 2 s of system time for 2 GiB).
"""


def running() -> int:
    """
    @return: how many reader threads own (or are taking) a connection now.
    """
    return _slots.running


class DirectWrites:
    """
    A reader thread that writes the body to the backend itself when the
    body's sink lets it (L{transfer.UploadSink.directTarget}: a file or an
    nbd backend), with a second thread (L{_DiskWriter}) so that receiving
    one buffer overlaps writing the one before; otherwise it hands its
    buffers to the reactor. The daemon's request bodies (L{SocketReader})
    and the client's download bodies
    (L{imageio.client._bodythread.ResponseReader}) read this way.

    The class it is mixed into is a L{handoff.BodyThread} that sets
    C{_remaining} before the thread starts, and calls L{_useTarget} in the
    reactor once the sink has written everything received before.

    @cvar targets: bodies written to a backend by their threads, per
        class (for tests).
    @cvar bufferSize: bytes per hand-over to the reactor.
    @cvar directSize: bytes per buffer the thread writes itself.
    @cvar diskBuffers: where those buffers come from.
    """

    targets = 0
    bufferSize = BUFFER_SIZE
    directSize = DIRECT_SIZE
    diskBuffers = _diskBuffers
    _target = None
    _disk = None
    _offset = 0
    _remaining = 0

    def _useTarget(self, sink) -> None:
        """
        Take C{sink}'s direct target, if it has one (in the reactor, with
        no write of the sink in flight).
        """
        directTarget = getattr(sink, "directTarget", None)
        direct = directTarget() if directTarget is not None else None
        if direct is not None:
            self._target, self._offset = direct
            type(self).targets += 1

    # The thread.

    # Blocking reads that wait for a whole buffer (MSG_WAITALL on a plain
    # socket): one system call and one GIL hand-off per buffer instead of
    # one per ~48 KiB the socket has queued (see handoff.BodyThread._run).

    def _read(self, fill) -> None:
        if self._target is not None:
            self._disk = _DiskWriter(self, self._target)
        disk = self._disk
        remaining = self._remaining
        for size, direct in self._pieces():
            while size:
                self._waitCredit()
                n = min(self.directSize if direct else self.bufferSize,
                        size)
                if direct:
                    buf = disk.take()
                    with memoryview(buf)[:n] as view:
                        fill(view)
                else:
                    buf = bytearray(n)
                    fill(buf)
                size -= n
                remaining -= n
                if not remaining:
                    # Twisted may read again as soon as the last buffer
                    # is delivered.
                    handoff.setNonBlocking(self._sock.sock)
                if disk is not None:
                    # In stream order, after the writes before it.
                    disk.put(buf, n, self._offset, direct, remaining == 0)
                else:
                    self._reactor.callFromThread(self._deliver, buf,
                                                 remaining == 0)
                self._offset += n
        if disk is not None:
            disk.finish()

    def _cleanUp(self, error):
        if self._disk is not None:
            # Nothing is written once the thread reports.
            error = self._disk.stop() or error
        if self._target is not None:
            self._target.close()
        return error

    def _pieces(self):
        """
        The rest of the body as C{(size, direct)} pieces: bytes for the
        reactor, or whole blocks the thread writes itself (an unaligned
        head and tail go to the reactor, the sink writes them with its
        read-modify-write).
        """
        remaining = self._remaining
        if self._target is None:
            return [(remaining, False)]
        bs = self._target.blockSize
        head = min(remaining, -self._offset % bs)
        blocks = (remaining - head) // bs * bs
        return [(head, False), (blocks, True),
                (remaining - head - blocks, False)]


class SocketReader(DirectWrites, handoff.BodyThread):
    """
    The reader of the rest of one request body, in a thread.

    @ivar active: the thread owns (or is about to own) the connection.
    @cvar bodies: bodies taken over so far in this process (for tests).
    """

    _log = Logger()
    bodies = 0
    slots = _slots
    stopped = "Upload from"
    peer = "the client"
    WAKE = _WAKE
    blockingWrites = False

    def __init__(self, reactor, tls, raw, conn, request, decoder, timeout):
        super().__init__(reactor, tls, raw, conn)
        self._request = request
        self._channel = request.channel
        self._decoder = decoder
        self._timeout = timeout
        self._result = None
        self._waiters: list[defer.Deferred] = []
        self.active = True
        # Rule 1: no reads from here on, the thread takes over on a clean
        # stack (this runs inside handleContentChunk). Twisted must not
        # read the socket while the thread does: every way of starting or
        # stopping its reads resumes or pauses the thread instead; output
        # waits until the socket is handed back.
        raw.stopReading()
        self._shadow()
        self._scheduled = reactor.callLater(0, self._handOff)

    @classmethod
    def takeOver(cls, request, reactor=None):
        """
        Decide to take the connection of C{request} over for the rest of
        its body, from inside C{handleContentChunk} (Twisted has delivered
        what it read; the decoder counts what is left).

        @return: a L{SocketReader}, or C{None} when the body stays on
            Twisted's path: chunked, less than L{MIN_SIZE} left, not a
            socket, a TLS connection that cannot be taken, or too many
            readers.
        """
        channel = request.channel
        if channel is None:
            return None
        # A Content-Length body: the decoder counts the bytes still
        # expected in contentLength.
        decoder = compat.bodyDecoder(channel)
        if (not compat.identityDecoder(decoder)
                or decoder.contentLength is None
                or decoder.contentLength < MIN_SIZE):
            return None
        if reactor is None:
            from twisted.internet import reactor
        return cls._create(reactor, channel.transport, request, decoder,
                           channel.timeOut)

    def stop(self) -> defer.Deferred:
        """
        Stop reading now (an early response is coming) and give the socket
        back. Bytes read and not delivered are dropped: the body is being
        refused.

        @return: L{Deferred} firing once Twisted owns the socket again.
        """
        # The thread sees it within _WAKE seconds (its receive timeout); a
        # shutdown would wake it at once, but only an abort may do that.
        self._stopThread(shutdown=self._abortAfter)
        return whenResult(self._result, self._waiters)

    def whenDone(self) -> defer.Deferred:
        """
        @return: L{Deferred} firing once Twisted owns the socket again.
        """
        return whenResult(self._result, self._waiters)

    def _ended(self) -> bool:
        return self._result is not None

    def _handOff(self) -> None:
        """
        Take the connection over and start the thread, on a clean stack.
        """
        self._scheduled = None
        decoder = self._decoder
        channel = self._channel
        if (self._result is not None
                or compat.bodyDecoder(channel) is not decoder
                or not decoder.contentLength
                or not self._stillOurs()):
            # The body ended (or the connection is going) meanwhile.
            if self._result is None:
                self._handBack()
            return
        sink = self._request.streamSink
        whenReady = getattr(sink, "whenReady", None)
        if whenReady is not None:
            # The backend may still be opening: it decides whether the
            # thread writes the body itself. Twisted does not read the
            # socket meanwhile, but the TLS layer may still deliver
            # plaintext it holds, which the sink may start writing: asked
            # again after each wait, until nothing is in flight.
            # (Not d.called: a Deferred waiting on a Deferred returned by
            # its callback is called already.)
            ready: list = []
            d = whenReady().addBoth(ready.append)
            if not ready:
                d.addBoth(lambda _: self._reactor.callLater(
                    0, self._handOffLater))
                return
        self._remaining = decoder.contentLength
        # A file or nbd upload is written by the thread itself (the sink
        # counts it); anything else is handed to the reactor buffer by
        # buffer.
        self._useTarget(sink)
        self._take()
        SocketReader.bodies += 1
        self._log.debug("Body from {peer} handed to a reader thread",
                        peer=str(self._raw.getPeer()))
        self._thread = threading.Thread(target=self._run,
                                        name="imageio-reader", daemon=True)
        self._thread.start()

    def _handOffLater(self) -> None:
        if self._result is None and not self._stopping:
            self._handOff()

    # The thread.

    def _idle(self, lastData: float) -> None:
        if self._stopping:
            raise handoff.Stopped()
        if self._timeout and time.monotonic() - lastData > self._timeout:
            raise OSError(f"No data from the client for "
                          f"{self._timeout} seconds")

    # Back in the reactor.

    def _feed(self, buf) -> bool:
        # (Ending the body makes the channel pause the transport and,
        # after the response, resume it: the socket is Twisted's again
        # before the last buffer.)
        self._channel.resetTimeout()
        self._decoder.dataReceived(buf)
        return True

    def _failed(self, error) -> None:
        if isinstance(error, BackendError):
            # Writing the file failed: answered as the sink's failures are.
            self._log.info("Upload from {peer} stopped: {error}",
                           peer=str(self._raw.getPeer()), error=error)
            self._request.bodyFailed(error)
            return
        super()._failed(error)

    def _handBack(self) -> None:
        # Bytes the thread read past the body (a pipelined request) are
        # delivered too.
        self.active = False
        super()._handBack()
        self._result = True
        fireWaiters(self._waiters, True)


class _DiskWriter:
    """
    The second thread of an upload to a file: it writes the buffers the
    reader thread fills, so that receiving the next one overlaps writing
    this one (an C{O_DIRECT} write waits for the disk), and delivers
    everything (L{transfer.Written} markers, and the unaligned head and
    tail as bytes) to the reactor in stream order.
    """

    def __init__(self, reader: DirectWrites, target):
        self._reader = reader
        self._target = target
        self._cond = threading.Condition()
        self._buffers = reader.diskBuffers
        self._free = [self._buffers.take() for _ in range(reader.CREDITS)]
        self._all = list(self._free)
        self._queue: deque = deque()
        self._stopping = False
        self._ended = False
        self.error = None
        self._thread = threading.Thread(target=self._run,
                                        name="imageio-disk", daemon=True)
        self._thread.start()

    def take(self):
        """
        A free aligned buffer (in the reader thread; waits for one).

        @raise BackendError: a write failed.
        """
        with self._cond:
            while not self._free and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            return self._free.pop()

    def put(self, buf, n: int, offset: int, direct: bool,
            last: bool) -> None:
        """
        Write C{buf[:n]} at C{offset} (C{direct}) or deliver C{buf} as
        bytes, after everything put before.
        """
        with self._cond:
            if self.error is not None:
                raise self.error
            self._queue.append((buf, n, offset, direct, last))
            self._cond.notify_all()

    def finish(self) -> None:
        """
        Wait until everything put is written and delivered.

        @raise BackendError: a write failed.
        """
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self):
        """
        Drop what is queued, wait for a write in flight, free the buffers.

        @return: the write error, if one happened.
        """
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()
        for buf in self._all:
            # Nothing views them any more: the thread is gone, the reader
            # released its views, and errors were stripped of frames.
            self._buffers.give(buf)
        self._all = self._free = []
        return self.error

    def _run(self) -> None:
        reader = self._reader
        callFromThread = reader._reactor.callFromThread
        while True:
            with self._cond:
                while not self._queue and not self._ended and \
                        not self._stopping:
                    self._cond.wait()
                if self._stopping or not self._queue:
                    return
                buf, n, offset, direct, last = self._queue.popleft()
            if not direct:
                callFromThread(reader._deliver, buf, last)
                continue
            started = time.monotonic()
            try:
                with memoryview(buf)[:n] as view:
                    self._target.write(view, offset)
            except BackendError as e:
                with self._cond:
                    self.error = e.with_traceback(None)
                    self._cond.notify_all()
                # The reader may wait for a credit this write would have
                # given back: it stops, and reports the error.
                with reader._cond:
                    reader._stopping = True
                    reader._cond.notify()
                return
            written = transfer.Written(n, time.monotonic() - started)
            with self._cond:
                self._free.append(buf)
                self._cond.notify_all()
            callFromThread(reader._deliver, written, last)
