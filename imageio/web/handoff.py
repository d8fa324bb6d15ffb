# -*- test-case-name: test.test_bodywriter,test.test_bodyreader -*-
"""
Taking a connection from Twisted for a thread, and giving it back: what
the body threads (L{imageio.web.bodywriter}, L{imageio.web.bodyreader})
share.

The rules (C{TLS-HANDOFF.md}; each broke a soak when missing):

  1. A hand-off starts from a clean reactor stack (C{callLater(0)}),
     never from code that may run inside C{TLSMemoryBIOProtocol
     .dataReceived}: the TLS layer goes on using the OpenSSL object in
     that same frame (C{recv}, then C{bio_read}).
  2. At the hand-off, in the reactor (L{takeOutput}, L{Guard}): the TLS
     layer's small-write aggregator is flushed, Twisted stops reading and
     writing the socket, its unsent bytes and everything left in the send
     BIO (drained until C{WantReadError}) go to the thread to send first,
     and a L{Guard} takes the place of the TLS layer's Connection: any use
     from the reactor is logged and raises, so a path we missed fails
     loudly instead of corrupting the stream.
  3. In the thread: OpenSSL's partial-write mode is off (one C{SSL_write}
     per MiB, not per 16 KiB record); a duplicate descriptor; reused
     buffers.
  4. Aborts from the reactor shut the duplicate down under the lock the
     thread closes it with (L{ThreadSocket}).
  5. The connection comes back through C{callFromThread}: modes restored,
     the Connection put back (L{restoreConnection}), writes made meanwhile
     replayed, reading resumed, and plaintext the thread left in OpenSSL's
     buffers delivered (L{flushReceived}).
  6. Renegotiation is off on the context (L{imageio.tls}), and the reactor
     never reads while a thread owns the connection.

The private Twisted and pyOpenSSL attributes this needs are reached
through L{imageio.compat}.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from OpenSSL import SSL
from twisted.protocols.tls import TLSMemoryBIOProtocol

from imageio import compat
from imageio.compat import ffi, lib
from imageio.logs import Logger

__all__ = ["Guard", "GuardTripped", "Shadows", "ThreadSocket", "tlsConnection",
           "usable", "split", "takeOutput", "restoreConnection",
           "flushReceived", "pending", "clearPending", "Receiver", "Sender",
           "setBlocking", "setNonBlocking", "Slots", "Stopped", "BodyThread",
           "ffi", "lib"]

_DRAIN_SIZE = 1024 * 1024


class GuardTripped(RuntimeError):
    """
    The reactor used a TLS connection's OpenSSL object while a thread
    owned it (a bug: see the rules in this module's docstring).
    """


class Guard:
    """
    Stands in for a TLS layer's C{OpenSSL.SSL.Connection} while a thread
    owns it: any use from the reactor is logged and raises
    L{GuardTripped} instead of racing with the thread.

    @cvar trips: uses caught so far in this process (for tests).
    """

    _log = Logger()
    trips = 0

    def __init__(self, peer: str):
        object.__setattr__(self, "_peer", peer)

    def __getattr__(self, name):
        Guard.trips += 1
        self._log.critical(
            "TLS connection of {peer} used by the reactor ({name}) while "
            "a body thread owns it", peer=self._peer, name=name)
        raise GuardTripped(f"TLS connection in use by a body thread "
                           f"({name})")

    def __setattr__(self, name, value):
        self.__getattr__(name)


class ThreadSocket:
    """
    A duplicate of a connection's socket for a thread, with a close that
    the reactor's abort cannot race with (rule 4): the reactor shuts it
    down only while the thread has not closed it, under one lock.

    @ivar fd: the duplicate's descriptor, C{-1} once closed.
    """

    def __init__(self, fileno: int):
        self.sock = socket.socket(fileno=os.dup(fileno))
        self.fd = self.sock.fileno()
        self._lock = threading.Lock()
        self._closed = False

    def shutdown(self) -> None:
        """
        Wake the thread from any wait and fail its next read or write
        (from the reactor).
        """
        with self._lock:
            if not self._closed:
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """
        Close the duplicate (from the thread, when it is done).
        """
        with self._lock:
            self._closed = True
            self.sock.close()
            self.fd = -1


class Shadows:
    """
    Instance attributes standing in for a connection's transport methods
    while a thread owns it (rule 6): starting and stopping the socket's
    reads, closing and aborting call the thread's owner instead, and
    writes wait, to be replayed by L{restore}. The channel resumes its
    transport after a request, and a TLS transport passes pause and
    resume on to the socket's (Twisted 26.10, C{ProtocolWrapper
    .__getattr__}), so the socket's own methods are shadowed too.
    """

    _NAMES = ("abortConnection", "loseConnection", "startReading",
              "resumeProducing", "stopReading", "pauseProducing", "write",
              "writeSequence")

    def __init__(self, tls, raw, *, startReading, stopReading, abort,
                 lose, write=None):
        """
        @param write: takes the writes instead of keeping them for
            L{restore} (a thread that sends them); optional.
        """
        self._tls = tls
        self._raw = raw
        self._later: list[bytes] = []
        if write is not None:
            self._write = write
        for target in {id(tls): tls, id(raw): raw}.values():
            target.abortConnection = abort
            target.loseConnection = lose
        raw.startReading = raw.resumeProducing = startReading
        raw.stopReading = raw.pauseProducing = stopReading
        # BufferingTLSTransport's write is an instance attribute of its own
        # (Twisted 26.10): kept, and put back.
        self._savedWrite = tls.__dict__.get("write")
        tls.write = self._write
        tls.writeSequence = self._writeSequence

    def _write(self, data) -> None:
        self._later.append(bytes(data))

    def _writeSequence(self, seq) -> None:
        self._write(b"".join(seq))

    def restore(self) -> None:
        """
        Take the shadows away and send the writes made meanwhile.
        """
        for target in (self._tls, self._raw):
            for name in self._NAMES:
                target.__dict__.pop(name, None)
        if self._savedWrite is not None:
            self._tls.write = self._savedWrite
        later, self._later = self._later, []
        for data in later:
            self._tls.write(data)


def pending(raw) -> bytes | None:
    """
    The bytes Twisted has not sent yet on C{raw} (a socket transport), or
    C{None} if its buffers are not the ones this module knows.
    """
    return compat.pendingOutput(raw)


def clearPending(raw) -> None:
    """
    Forget C{raw}'s unsent bytes (taken by L{pending}) and stop writing.
    """
    compat.clearPendingOutput(raw)
    raw.stopWriting()


def drainBIO(conn) -> bytes:
    """
    Everything the TLS layer left in C{conn}'s send BIO (Twisted reads at
    most 32 KiB per flush; TLS 1.3 session tickets can wait there).
    """
    out = []
    while True:
        try:
            out.append(conn.bio_read(_DRAIN_SIZE))
        except SSL.WantReadError:
            return b"".join(out)


def tlsConnection(transport):
    """
    The pyOpenSSL Connection of a TLS transport that a thread may take
    over, or C{None}: still handshaking (writes queued in
    C{_appSendBuffer}), closing, already owned by a thread, or a pyOpenSSL
    without the bindings used.
    """
    if isinstance(compat.currentConnection(transport), Guard):
        return None
    return compat.tlsConnection(transport)


def usable(raw) -> bool:
    """
    Whether a thread may take C{raw} (a socket transport) over: a
    connected socket whose buffers this module knows.
    """
    return (pending(raw) is not None and hasattr(raw, "fileno")
            and not getattr(raw, "disconnecting", True)
            and getattr(raw, "connected", False))


def split(transport):
    """
    The parts of a connection a thread may take over: C{(tls, raw, conn)}
    with C{tls} the transport the protocol writes to (the TLS layer, or
    the socket itself), C{raw} the socket transport and C{conn} the
    pyOpenSSL Connection (C{None} on a plain socket); or C{None} when it
    cannot be taken (still handshaking, closing, not a socket).
    """
    tls = raw = transport
    conn = None
    if isinstance(transport, TLSMemoryBIOProtocol):
        conn = tlsConnection(transport)
        if conn is None:
            return None
        raw = transport.transport
    if not hasattr(raw, "stopReading") or not usable(raw):
        return None
    return tls, raw, conn


def takeOutput(tls, raw, conn) -> bytes:
    """
    Rule 2: stop Twisted on the socket and take what it has not sent yet.
    Over TLS (C{conn} not C{None}, C{tls} the TLS transport) the
    aggregator is flushed first, the send BIO drained after, and a
    L{Guard} put in place of the Connection.

    @return: the bytes the thread must send before anything else.
    """
    if conn is not None:
        # BufferingTLSTransport's small-write aggregator (Twisted 26.10)
        # may hold the headers or a 100 Continue.
        compat.flushAggregator(tls)
    # The class's method: the reader thread shadows the instance's.
    type(raw).stopReading(raw)
    out = pending(raw)
    clearPending(raw)
    if conn is not None:
        out += drainBIO(conn)
        compat.swapConnection(tls, Guard(str(raw.getPeer())))
    return out


class Receiver:
    """
    Fills buffers from a connection a thread owns (blocking reads): a
    plain socket with C{recv(MSG_WAITALL)}, one system call per buffer;
    over TLS with C{SSL_read} straight into the buffer, a blocking C{recv}
    feeding the read BIO when OpenSSL wants more ciphertext. Ciphertext
    read past the buffer stays in OpenSSL for the TLS layer (L{flushReceived}
    after the hand-back).

    @ivar sock: the L{ThreadSocket} (blocking, with a short C{SO_RCVTIMEO}
        so the thread wakes to look at its stop flag).
    @ivar conn: the pyOpenSSL Connection, or C{None} on a plain socket.
    """

    CIPHER_SIZE = 256 * 1024

    def __init__(self, sock: ThreadSocket, conn, idle, peer: str):
        """
        @param idle: C{idle(lastData)}, called while a read waits; raises
            to stop the thread (a stop request, an idle timeout).
        @param peer: who is at the other end, for errors ("the client").
        """
        self.sock = sock
        self.conn = conn
        self._idle = idle
        self._peer = peer
        self._cipher = None
        self._cipherPtr = None

    def _closed(self) -> OSError:
        return OSError(f"{self._peer.capitalize()} closed the connection "
                       f"in the middle of the body")

    def fill(self, buf) -> None:
        """
        Fill C{buf} (a writable buffer) completely, or raise.
        """
        if self.conn is None:
            self._fillPlain(buf)
            return
        self._ensureCipher()
        # Released at the end: the buffer may be a view that its owner
        # releases next.
        with ffi.from_buffer(buf, require_writable=True) as target:
            self._decrypt(target, len(buf))

    def some(self, buf) -> int:
        """
        Read what has arrived into C{buf} (a writable buffer), waiting for
        at least one byte.

        @return: the number of bytes read, 0 if the peer closed.
        """
        lastData = time.monotonic()
        if self.conn is None:
            sock = self.sock.sock
            while True:
                self._idle(lastData)
                try:
                    return sock.recv_into(buf)
                except (BlockingIOError, TimeoutError, InterruptedError):
                    continue
        self._ensureCipher()
        with ffi.from_buffer(buf, require_writable=True) as target:
            return self._readTLS(target, len(buf), lastData)

    def _ensureCipher(self) -> None:
        if self._cipher is None:
            self._cipher = bytearray(self.CIPHER_SIZE)
            self._cipherPtr = ffi.from_buffer(self._cipher)

    def _readTLS(self, target, size: int, lastData: float) -> int:
        """
        Decrypt at most C{size} bytes into C{target} (a cffi pointer),
        feeding OpenSSL ciphertext from the socket until it has some.

        @return: the number of bytes, 0 if the peer closed.
        """
        conn = self.conn
        ssl = compat.ssl(conn)
        while True:
            n = lib.SSL_read(ssl, target, size)
            if n > 0:
                return n
            error = lib.SSL_get_error(ssl, n)
            if error == lib.SSL_ERROR_ZERO_RETURN:
                return 0
            if error != lib.SSL_ERROR_WANT_READ:
                compat.raiseSSLError(conn, ssl, n)
                raise OSError(f"TLS error {error}")
            while True:
                self._idle(lastData)
                try:
                    got = self.sock.sock.recv_into(self._cipher)
                except (BlockingIOError, TimeoutError, InterruptedError):
                    continue
                break
            if got == 0:
                return 0
            lastData = time.monotonic()
            if lib.BIO_write(compat.readBIO(conn), self._cipherPtr,
                             got) != got:
                raise OSError("TLS read buffer refused the data")

    def _fillPlain(self, buf) -> None:
        view = memoryview(buf)
        filled = 0
        lastData = time.monotonic()
        sock = self.sock.sock
        while filled < len(view):
            self._idle(lastData)
            try:
                n = sock.recv_into(view[filled:], len(view) - filled,
                                   socket.MSG_WAITALL)
            except (BlockingIOError, TimeoutError):
                continue
            if n == 0:
                raise self._closed()
            filled += n
            lastData = time.monotonic()

    def _decrypt(self, target, size: int) -> None:
        filled = 0
        lastData = time.monotonic()
        while filled < size:
            n = self._readTLS(target + filled, size - filled, lastData)
            if n == 0:
                raise self._closed()
            filled += n
            lastData = time.monotonic()


class Sender:
    """
    Sends through a connection a thread owns (blocking writes that wake
    every few tenths of a second, see L{setBlocking}): a plain socket
    with C{sendall}; over TLS encrypted through the connection's own
    OpenSSL object with partial-write mode off (one C{SSL_write} per MiB,
    not per 16 KiB record), the ciphertext drained from the write BIO
    into one reused buffer and sent from there.

    Call L{start} and L{stop} in the thread.
    """

    SEND_SIZE = 1024 * 1024
    _SLACK = 64 * 1024

    def __init__(self, sock: ThreadSocket, conn, idle):
        """
        @param idle: C{idle(lastProgress)}, called whenever a send waits;
            raises to stop the thread.
        """
        self.sock = sock
        self.conn = conn
        self._idle = idle
        self._out = None
        self._outView = None
        self._outPtr = None

    def start(self) -> None:
        if self.conn is not None:
            self._out = bytearray(self.SEND_SIZE + self._SLACK)
            self._outView = memoryview(self._out)
            self._outPtr = ffi.from_buffer(self._out)
            # pyOpenSSL turns partial writes on (rule 3).
            lib.SSL_clear_mode(compat.ssl(self.conn),
                               lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def stop(self) -> None:
        if self._outPtr is not None:
            lib.SSL_set_mode(compat.ssl(self.conn),
                             lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
            ffi.release(self._outPtr)
            self._outView.release()
            self._out = self._outView = self._outPtr = None

    def sendRaw(self, data) -> None:
        """
        Send bytes as they are (ciphertext Twisted had not sent yet).
        """
        view = memoryview(data)
        last = time.monotonic()
        sock = self.sock.sock
        while view:
            try:
                n = sock.send(view[:self.SEND_SIZE])
            except (BlockingIOError, TimeoutError, InterruptedError):
                self._idle(last)
                continue
            view = view[n:]
            last = time.monotonic()

    def send(self, data) -> None:
        """
        Send plaintext (encrypted first over TLS).
        """
        if self.conn is None:
            self.sendRaw(data)
            return
        conn = self.conn
        view = memoryview(data)
        while view:
            # Partial writes are off and memory BIOs never refuse a
            # write: this encrypts all of the piece at once.
            n = conn.send(view[:self.SEND_SIZE])
            view = view[n:]
            while True:
                got = lib.BIO_read(compat.writeBIO(conn), self._outPtr,
                                   len(self._out))
                if got <= 0:
                    break
                self.sendRaw(self._outView[:got])

    def peerSpoke(self) -> bool:
        """
        Whether the peer sent application data (or closed) while we send:
        for an HTTP client, an early answer to its request. Over TLS the
        ciphertext that arrived is fed to OpenSSL, which takes in what
        carries no data (TLS 1.3 session tickets); data stays in OpenSSL
        for the TLS layer (L{flushReceived} after the hand-back).
        """
        sock = self.sock.sock
        try:
            if self.conn is None:
                # Data or the end of the stream: either way Twisted reads.
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                return True
            buf = bytearray(64 * 1024)
            n = sock.recv_into(buf, len(buf), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            return True
        conn = self.conn
        with ffi.from_buffer(buf) as ptr:
            if lib.BIO_write(compat.readBIO(conn), ptr, n) != n:
                raise OSError("TLS read buffer refused the data")
        one = ffi.new("char[1]")
        n = lib.SSL_peek(compat.ssl(conn), one, 1)
        if n > 0:
            return True
        # A close or an error is Twisted's to see too.
        return lib.SSL_get_error(compat.ssl(conn), n) not in (
            lib.SSL_ERROR_WANT_READ, lib.SSL_ERROR_WANT_WRITE)


def setBlocking(sock: socket.socket, wake: float,
                writes: bool = True) -> None:
    """
    Make a thread's duplicate blocking, reads (and C{writes}) waking every
    C{wake} seconds. The descriptor shares its flags and options with
    Twisted's: L{setNonBlocking} puts them back before the socket is
    handed back.
    """
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(wake))
    if writes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        _timeval(wake))


def setNonBlocking(sock: socket.socket) -> None:
    """
    Undo L{setBlocking}; errors (a closed socket) are ignored.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
        sock.setblocking(False)
    except OSError:
        pass


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def restoreConnection(tls, conn) -> None:
    """
    Rule 5: give the TLS layer its Connection back.
    """
    if conn is not None:
        compat.swapConnection(tls, conn)


def flushReceived(tls, conn) -> None:
    """
    Deliver plaintext a thread left in the Connection's buffers (bytes it
    read past the body: a pipelined request) through the TLS layer, as if
    they had just arrived. Call on a clean reactor stack, after
    L{restoreConnection}.
    """
    if (compat.currentConnection(tls) is conn
            and not compat.tlsLost(tls)):
        compat.flushReceiveBIO(tls)


class Slots:
    """
    How many bodies one kind of thread owns at once, with an optional
    limit (beyond it, bodies take Twisted's path).
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.running = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """
        @return: whether a slot was free (and is now taken).
        """
        with self._lock:
            if self.limit is not None and self.running >= self.limit:
                return False
            self.running += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.running -= 1


class Stopped(Exception):
    """
    A body thread was asked to stop (raised in the thread).
    """


class BodyThread:
    """
    One body moved by a thread on a connection taken from Twisted: what
    the daemon's request body reader and the client's response reader and
    request writer share. The subclass runs the thread (C{_run}) and
    decides when the connection goes back (C{_handBack}, which calls
    L{_restoreTransport} and L{_resumeTransport}).

    In the reactor: L{_shadow} puts the transport's shadows in place
    (rule 6), L{_take} takes the connection (rule 2), L{_stopThread} and
    L{_abortFromOutside} stop the thread. In the thread, readers wait for
    a credit (L{_waitCredit}) before each buffer they fill; the reactor
    gives it back once the buffer is delivered (L{_giveCredit}).

    @cvar CREDITS: buffers a reader fills ahead of the reactor.
    @cvar slots: the L{Slots} of the subclass's kind of thread.
    @cvar stopped: how the log names a body whose thread failed
        ("Upload from").
    @cvar peer: who is at the other end, for errors ("the client").
    @cvar WAKE: seconds a blocked read (or write, with C{blockingWrites})
        waits before the thread looks at its stop flag.
    """

    CREDITS = 2
    slots: Slots
    stopped = "Body of"
    peer = "the peer"
    WAKE = 0.2
    blockingWrites = True
    _log = Logger()

    def __init__(self, reactor, tls, raw, conn):
        self._reactor = reactor
        self._tls = tls
        self._raw = raw
        self._conn = conn
        self._cond = threading.Condition()
        self._paused = False
        self._credits = self.CREDITS
        self._stopping = False
        self._abortAfter = False
        self._started = False
        self._scheduled = None
        self._sock = None
        self._pendingOutput = b""
        self._shadows = None

    @classmethod
    def _create(cls, reactor, transport, *args):
        """
        Make one for C{transport}'s connection if it can be taken and a
        slot is free: C{cls(reactor, tls, raw, conn, *args)}, or C{None}.
        """
        parts = split(transport)
        if parts is None or not cls.slots.take():
            return None
        try:
            return cls(reactor, *parts, *args)
        except BaseException:
            cls.slots.give()
            raise

    def _ended(self) -> bool:
        """
        Whether the connection went back already.
        """
        raise NotImplementedError()

    def _handBack(self) -> None:
        """
        Give the connection back to Twisted (in the reactor, once): the
        slot freed, the transport restored, then aborted if somebody
        closed it meanwhile, else read again.
        """
        self.slots.give()
        self._restoreTransport()
        if self._abortAfter:
            self._tls.abortConnection()
        else:
            self._resumeTransport()

    # In the reactor.

    def _shadow(self, **kw) -> None:
        """
        Shadow the transport's methods (L{Shadows}): by default starting
        and stopping reads resume and pause the thread, closing and
        aborting stop it and abort the connection once it is back.
        """
        kw.setdefault("startReading", self._resume)
        kw.setdefault("stopReading", self._pause)
        self._shadows = Shadows(self._tls, self._raw,
                                abort=self._abortFromOutside,
                                lose=self._abortFromOutside, **kw)

    def _stillOurs(self) -> bool:
        """
        Whether the connection can still be taken (on the turn after the
        decision: it may have closed meanwhile).
        """
        return usable(self._raw) and (
            self._conn is None or tlsConnection(self._tls) is self._conn)

    def _take(self) -> None:
        """
        Take the connection for the thread (rule 2).
        """
        self._pendingOutput = takeOutput(self._tls, self._raw, self._conn)
        self._sock = ThreadSocket(self._raw.fileno())
        self._started = True

    def _restoreTransport(self) -> None:
        """
        Give the TLS layer its Connection and the transport its methods
        back (rule 5).
        """
        if self._started:
            restoreConnection(self._tls, self._conn)
        self._shadows.restore()

    def _resumeTransport(self) -> None:
        """
        Let Twisted read again (unless paused meanwhile) and deliver what
        the thread left in OpenSSL, on a clean stack.
        """
        if not self._paused:
            self._raw.startReading()
        if self._conn is not None and self._started:
            self._reactor.callLater(0, flushReceived, self._tls,
                                    self._conn)

    def _stopThread(self, shutdown: bool = True) -> None:
        """
        Ask the thread to stop; before the hand-off, give the connection
        back at once.

        @param shutdown: wake the thread from a blocked read or write at
            once (rule 4), failing it; otherwise it sees the request
            within its wake interval.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if not self._started:
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            if not self._ended():
                self._handBack()
            return
        if shutdown:
            self._sock.shutdown()

    def _abortFromOutside(self) -> None:
        # Somebody closes or aborts the transport while the thread owns
        # it: the body will not complete (a graceful close would wait for
        # it). Stop the thread; the connection is aborted once it is back.
        self._abortAfter = True
        self._stopThread()

    def _pause(self) -> None:
        with self._cond:
            self._paused = True

    def _resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def _giveCredit(self) -> None:
        with self._cond:
            self._credits += 1
            self._cond.notify()

    def _deliver(self, buf, last: bool) -> None:
        """
        A buffer a reader thread filled, in the reactor: fed to Twisted as
        if Twisted had read it (L{_feed}), and its credit given back.
        """
        if self._ended():
            return
        if self._stopping:
            # Dropped: the body is being given up. The thread ended
            # without a report if this was its last buffer.
            if last:
                self._threadStopped(None)
            return
        if last:
            # The connection goes back before the body ends: ending it
            # may let Twisted use the connection at once.
            self._handBack()
        if self._feed(buf) and not last:
            self._giveCredit()

    def _feed(self, buf) -> bool:
        """
        Give C{buf} to Twisted's body decoder.

        @return: whether the reader goes on.
        """
        raise NotImplementedError()

    def _threadStopped(self, error) -> None:
        """
        The thread ended early (stopped, or C{error}): the connection goes
        back, and an error aborts it.
        """
        if self._ended():
            return
        self._handBack()
        if error is not None:
            self._failed(error)

    def _failed(self, error) -> None:
        self._log.info("{what} {peer} stopped: {error}", what=self.stopped,
                       peer=str(self._raw.getPeer()), error=error)
        if not self._abortAfter:
            self._tls.abortConnection()

    # In the thread.

    def _waitCredit(self) -> None:
        """
        Wait until the reactor is not paused and a buffer may be filled.

        @raise Stopped: the thread is asked to stop.
        """
        with self._cond:
            while (self._paused or not self._credits) and \
                    not self._stopping:
                self._cond.wait()
            if self._stopping:
                raise Stopped()
            self._credits -= 1

    def _run(self) -> None:
        """
        A reader's thread: the socket made blocking, what Twisted had not
        sent sent, the body read (L{_read}), the socket handed back; the
        reactor hears of an early end (L{_threadStopped}).
        """
        error = None
        sock = self._sock.sock
        try:
            setBlocking(sock, self.WAKE, writes=self.blockingWrites)
            self._sendPending()
            self._read(Receiver(self._sock, self._conn, self._idle,
                                self.peer).fill)
        except Stopped:
            pass
        except Exception as e:
            # Without the frames, whose views of a buffer would keep it
            # from closing.
            error = e.with_traceback(None)
        finally:
            self._giveUpSocket()
            error = self._cleanUp(error)
        if error is not None or self._stopping:
            self._reactor.callFromThread(self._threadStopped, error)

    def _read(self, fill) -> None:
        """
        Read the body with C{fill(buffer)} (in the thread).
        """
        raise NotImplementedError()

    def _cleanUp(self, error):
        """
        After the thread's last read, before it reports.

        @return: the error to report.
        """
        return error

    def _idle(self, lastData: float) -> None:
        raise NotImplementedError()

    def _giveUpSocket(self, sender: Sender | None = None) -> None:
        """
        In the thread, at its end: OpenSSL's modes back (C{sender}), the
        socket's flags back, the duplicate closed.
        """
        if sender is not None:
            sender.stop()
        setNonBlocking(self._sock.sock)
        self._sock.close()

    def _sendPending(self) -> None:
        """
        Send what Twisted had not sent when the connection was taken.
        """
        if self._pendingOutput:
            self._sock.sock.sendall(self._pendingOutput)
            self._pendingOutput = b""
