# -*- test-case-name: test.test_readsession -*-
"""
Small Range GETs served by the connection's own thread.

Random reads (backup software reading changed blocks, qemu-img through
nbdkit's curl plugin, the reference client's random I/O) send one small
Range GET after another on a keep-alive connection. Through Twisted each
cost about 0.2 ms of reactor CPU (TLS, HTTP parsing, a pool hop for the
read, the response), twice the reference's thread per connection. Once a
connection has had L{STREAK} small GETs of a file ticket answered, a
thread takes it over (the rules of L{imageio.web.handoff}) and serves the
requests that follow itself: it reads the request head, checks it against
the ticket, reads the file with C{pread} and sends the response, as the
reference does.

The thread serves only the plain case: C{GET} of the same ticket's URL,
HTTP/1.1, a single C{Range: bytes=a-b} under L{MAX_SIZE} bytes inside the
ticket and the image, and no header beyond L{_HARMLESS}. Anything else (another
method or ticket, a query, a C{Connection: close}, a bad range, a failed or
short read, a canceled or expired ticket) ends the session: the connection
goes back to Twisted with the unanswered request fed to the channel as if
it had just arrived, and Twisted answers it, errors included. So does a
connection idle for L{IDLE} seconds: Twisted's idle timeout then runs.

What the thread touches: the connection (taken, rule 2), a duplicate of
the backend's descriptor with a buffer of its own (L{imageio.backends.file
.ThreadReader}), and the ticket read-only. The ticket's bookkeeping
(C{transferred}, the expiry it extends) and the metrics are done in the
reactor, from batches the thread posts with C{callFromThread}. A session
holds an operation of the ticket, so a cancel waits for the thread to hand
the connection back (it looks at the cancel before each request and every
L{handoff.BodyThread.WAKE} seconds while it waits for one).
"""

from __future__ import annotations

import re
import threading
import time

from imageio import errors
from imageio.abilities import IThreadReads
from imageio.logs import Logger
from imageio.web import bodywriter, handoff
from imageio.web.http import SERVER, httpDate

__all__ = ["ReadSession", "offer", "STREAK", "MAX_SIZE", "IDLE"]

STREAK = 2
"""
Small GETs answered on a connection before its thread takes it.
"""

MAX_SIZE = bodywriter.MIN_SIZE
"""
Ranges of this size or more take the download path (the writer thread of
L{imageio.web.bodywriter} streams them).
"""

IDLE = 1.0
"""
Seconds without a request after which the connection goes back to Twisted.
"""

MAX_HEAD = 8192
"""
A request head longer than this goes to Twisted (which enforces the
limits and answers).
"""

MAX_LINES = 16
"""
A request head of more lines goes to Twisted (which enforces the limits).
"""

MAX_SESSIONS = 64

GIVE_UPS = 3
"""
Sessions a connection may end on a request the thread cannot serve before
it gets no more: a client whose every request needs Twisted would pay for
a hand-off per request.
"""

# Responses up to this size go out as one SSL_write of head and body.
_JOIN_LIMIT = 64 * 1024

# The session's encryption buffer: its responses are small, a body
# thread's 1 MiB would sit idle.
SEND_SIZE = 256 * 1024

POST_INTERVAL = 0.05
"""
Seconds between the batches of bookkeeping a session posts to the reactor
(the last batch goes with the hand-back).
"""

# Request headers that do not change the answer.
_HARMLESS = frozenset((b"host", b"user-agent", b"accept", b"accept-encoding",
                       b"connection", b"range"))

_RANGE = re.compile(rb"bytes=(\d{1,19})-(\d{1,19})")

_slots = handoff.Slots(MAX_SESSIONS)


class _GiveBack(Exception):
    """
    The session ends without an error (idle, or the ticket canceled).
    """


def offer(channel, request, store, ticket, backend, stats, reactor) -> None:
    """
    A small Range GET of C{ticket} was just answered on C{channel}, the
    connection of C{request}: after L{STREAK} of them, a thread takes the
    connection on the next reactor turn (from a clean stack, rule 1), if
    nothing else happened on it meanwhile.

    @param store: the ticket store (a ticket replaced there is not
        served by the thread any more).
    @param stats: the images service's L{imageio.metrics.Metrics}.
    """
    if (channel is None or not IThreadReads.providedBy(backend)
            or getattr(channel, "readSessionGiveUps", GIVE_UPS) >= GIVE_UPS):
        return
    channel.readStreak += 1
    if channel.readStreak < STREAK:
        return
    if (request.method != b"GET" or request.clientproto != b"HTTP/1.1"
            or b"?" in request.uri or not channel.persistent
            or request.code != 206):
        return
    disposition = request.responseHeaders.getRawHeaders(
        b"content-disposition", [None])[0]
    if disposition is None:
        return
    reactor.callLater(0, ReadSession.start, reactor, channel, request.uri,
                      store, ticket, backend, disposition, stats,
                      request.metrics, request.service)


class ReadSession(handoff.BodyThread):
    """
    A connection taken over by a thread that serves its small Range GETs
    (see the module docstring).
    """

    slots = _slots
    stopped = "Range GETs of"
    peer = "the client"
    _log = Logger()

    @classmethod
    def start(cls, reactor, channel, uri, store, ticket, backend,
              disposition, stats, metrics, service) -> ReadSession | None:
        """
        Take C{channel}'s connection for a session if it is idle between
        requests with nothing received and unparsed (in the reactor, on a
        clean stack).
        """
        if not channel.betweenRequests():
            return None
        transport = channel.transport
        ctx = channel.openContext(ticket)
        if ctx is None or ctx.backend is not backend:
            return None
        try:
            op = ticket.startOperation(0, 0)
        except errors.HTTPError:
            return None
        session = None
        reader = backend.threadReader()
        if reader is not None:
            session = cls._create(reactor, transport, channel, uri, store,
                                  ticket, ctx, reader, disposition, stats,
                                  metrics, service, op)
        if session is None:
            op.finish()
            if reader is not None:
                reader.close()
            return None
        session._begin()
        return session

    def __init__(self, reactor, tls, raw, conn, channel, uri, store, ticket,
                 ctx, reader, disposition, stats, metrics, service, op):
        super().__init__(reactor, tls, raw, conn)
        self._channel = channel
        self._store = store
        self._requestLine = b"GET " + uri + b" HTTP/1.1"
        self._ticket = ticket
        self._ctx = ctx
        self._backend = ctx.backend
        self._reader = reader
        self._disposition = disposition
        self._stats = stats
        self._metrics = metrics
        self._service = service
        self._op = op
        self._done = False
        self._posted = False
        self._lastPost = 0.0
        self._servedHere: list[tuple[int, int, float]] = []
        self._savedTimeout = None
        self._stallTimeout = channel.timeOut or 60
        self._unservable = False
        self._count = 0

    # In the reactor.

    def _begin(self) -> None:
        self._shadow()
        self._take()
        self._savedTimeout = self._channel.setTimeout(None)
        self._log.debug("Range GETs of {peer} served by a thread",
                        peer=str(self._raw.getPeer()))
        try:
            threading.Thread(target=self._run, name="imageio-reads",
                             daemon=True).start()
        except RuntimeError as e:
            # No thread to be had: the connection goes back at once.
            self._threadDone(e, b"")

    def _ended(self) -> bool:
        return self._done

    def _handBack(self) -> None:
        self._record()
        self._done = True
        # finish, not release: a worker's replica reports only finish to
        # the main process, whose cancel waits for it. The range is empty.
        self._op.finish()
        self._log.debug("Range GETs of {peer}: {count} answered by the "
                        "thread", peer=str(self._raw.getPeer()),
                        count=self._count)
        if not self._started:
            self._reader.close()
        super()._handBack()
        if not self._abortAfter and not self._channel.lost:
            self._channel.setTimeout(self._savedTimeout)

    def _record(self) -> None:
        """
        The ticket's bookkeeping and the metrics of the requests the thread
        answered since the last batch.
        """
        with self._cond:
            served, self._servedHere = self._servedHere, []
            self._posted = False
        if not served:
            return
        self._count += len(served)
        ticket = self._ticket
        stats = self._stats
        meter = stats.meter(self._backend) if stats.enabled else None
        log = self._log
        for offset, size, seconds in served:
            # Through startOperation, which a worker's replica reports to
            # the main process. Refused once the ticket is canceled: a
            # canceled operation is not recorded anyway.
            try:
                op = ticket.startOperation(offset, size)
            except errors.HTTPError:
                op = None
            if op is not None:
                op.progress(size)
                op.finish()
            log.debug("READ size={size} offset={offset} transfer={tid}",
                      size=size, offset=offset, tid=ticket.transferId)
            if meter is not None:
                meter.read(size, seconds)
            if self._metrics is not None:
                self._metrics.countRequest(self._service, b"GET", 206)

    def _threadDone(self, error, leftover: bytes) -> None:
        if self._done:
            return
        channel = self._channel
        if self._unservable:
            channel.readSessionGiveUps += 1
            channel.readStreak = 0
        self._handBack()
        if self._abortAfter:
            return
        if error is not None:
            self._failed(error)
            return
        if leftover and not channel.lost:
            # The request the thread did not answer, as if it had just
            # arrived (a clean stack: this runs from callFromThread).
            channel.dataReceived(leftover)

    # In the thread.

    def _run(self) -> None:
        error = None
        leftover = b""
        sock = self._sock.sock
        sender = handoff.Sender(self._sock, self._conn, self._idleSend)
        # Responses are small: a smaller encryption buffer than a body's.
        sender.SEND_SIZE = SEND_SIZE
        receiver = handoff.Receiver(self._sock, self._conn, self._idleRecv,
                                    self.peer)
        try:
            handoff.setBlocking(sock, self.WAKE)
            sender.start()
            if self._pendingOutput:
                sender.sendRaw(self._pendingOutput)
                self._pendingOutput = b""
            leftover = self._serve(receiver, sender)
        except handoff.Stopped:
            if not self._abortAfter:
                error = OSError("stopped in the middle of a response")
        except Exception as e:
            error = e.with_traceback(None)
        finally:
            self._giveUpSocket(sender)
            self._reader.close()
        self._reactor.callFromThread(self._threadDone, error, leftover)

    def _serve(self, receiver, sender) -> bytes:
        """
        Answer requests until one cannot be answered here.

        @return: the bytes received and not answered (for Twisted).
        """
        buf = bytearray()
        chunk = bytearray(16 * 1024)
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD:
                    self._unservable = True
                    return bytes(buf)
                try:
                    n = receiver.some(chunk)
                except _GiveBack:
                    return bytes(buf)
                if n == 0:
                    # The client closed: Twisted sees it too.
                    return bytes(buf)
                buf += memoryview(chunk)[:n]
                end = buf.find(b"\r\n\r\n")
            head = bytes(buf[:end])
            wanted = self._parse(head)
            if wanted is None:
                self._unservable = True
                return bytes(buf)
            offset, size = wanted
            if not self._servable(offset, size):
                return bytes(buf)
            started = time.monotonic()
            try:
                data = self._reader.read(offset, size)
            except errors.BackendError:
                # Twisted reads again, and answers the error.
                return bytes(buf)
            seconds = time.monotonic() - started
            if len(data) != size or self._op.canceled:
                return bytes(buf)
            del buf[:end + 4]
            head = self._head(offset, size)
            try:
                if size <= _JOIN_LIMIT:
                    sender.send(b"".join((head, data)))
                else:
                    sender.send(head)
                    sender.send(data)
            except handoff.Stopped:
                raise
            except Exception as e:
                raise OSError(f"sending a response failed: {e}") from None
            self._account(offset, size, seconds)

    def _parse(self, head: bytes) -> tuple[int, int] | None:
        """
        The range of a request head the thread may answer, or C{None}.
        """
        lines = head.split(b"\r\n")
        if lines[0] != self._requestLine or len(lines) > MAX_LINES:
            return None
        wanted = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            name = name.lower()
            if not sep or name not in _HARMLESS:
                return None
            value = value.strip(b" \t")
            if name == b"range":
                match = _RANGE.fullmatch(value)
                if wanted is not None or match is None:
                    return None
                first, last = int(match.group(1)), int(match.group(2))
                if last < first or last - first + 1 >= MAX_SIZE:
                    return None
                wanted = (first, last - first + 1)
            elif name == b"connection" and value.lower() != b"keep-alive":
                return None
        return wanted

    def _servable(self, offset: int, size: int) -> bool:
        """
        Whether the ticket allows the range now, as the handler would find
        (the ticket and the context are the reactor's: only read here).
        """
        ticket = self._ticket
        if (self._op.canceled or self._stopping or ticket.canceled
                or self._ctx.closed or ticket.expired()
                or not ticket.may("read")):
            return False
        try:
            if self._store.get(ticket.uuid) is not ticket:
                # Replaced (PUT /tickets with the same uuid).
                return False
            available = min(ticket.size, self._backend.size())
        except Exception:
            return False
        return offset + size <= available

    def _head(self, offset: int, size: int) -> bytes:
        return b"".join((
            b"HTTP/1.1 206 Partial Content\r\nServer: ", SERVER,
            b"\r\nDate: ", httpDate(),
            b"\r\nContent-Length: %d\r\n" % size,
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Disposition: ", self._disposition,
            b"\r\nAccept-Ranges: bytes\r\nContent-Range: bytes %d-%d/%d"
            b"\r\n\r\n" % (offset, offset + size - 1, self._ticket.size)))

    def _account(self, offset: int, size: int, seconds: float) -> None:
        # A batch at most every POST_INTERVAL seconds: a callFromThread
        # per request cost the reactor a wake-up and 0.02 ms of CPU each.
        # The rest goes with the hand-back.
        now = time.monotonic()
        with self._cond:
            self._servedHere.append((offset, size, seconds))
            if self._posted or now - self._lastPost < POST_INTERVAL:
                return
            self._posted = True
            self._lastPost = now
        self._reactor.callFromThread(self._record)

    def _idleRecv(self, lastData: float) -> None:
        if self._stopping:
            raise handoff.Stopped()
        if (self._op.canceled
                or time.monotonic() - lastData >= IDLE):
            raise _GiveBack()

    def _idleSend(self, lastProgress: float) -> None:
        if self._stopping:
            raise handoff.Stopped()
        if time.monotonic() - lastProgress >= self._stallTimeout:
            raise OSError("the client stopped reading")
