# -*- test-case-name: test.test_nbd_daemon -*-
"""
NBD commands sent by a thread on a connection lent by
L{imageio.protocols.nbd.NBDClient.lend}: blocking system calls straight
from and into the thread's buffers (no copy in the reactor, no join of
Twisted's write buffer).

Only what a body thread needs: C{WRITE}, and C{READ} with simple or
structured replies (data and hole chunks). Reads may be pipelined
(L{ThreadConnection.startRead} ahead of L{ThreadConnection.finishRead}):
the server reads the next piece from its disk while the thread sends this
one. Replies may come in any order; each goes where its handle says.
"""

from __future__ import annotations

import socket
import struct

from imageio.protocols.nbdwire import (
    _REQUEST, _SIMPLE_REPLY, _STRUCTURED_REPLY, _U32, CMD_READ, CMD_WRITE,
    REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, _replyError)

__all__ = ["ThreadConnection", "Broken"]

_U64 = struct.Struct("!Q")
_HOLE = struct.Struct("!QI")
_ERROR = struct.Struct("!IH")


class Broken(Exception):
    """
    The connection failed in the middle of a request (a socket error, a
    timeout, a reply that makes no sense): it cannot be used again.
    """


class _Request:
    __slots__ = ("view", "offset", "done", "error")

    def __init__(self, view, offset):
        self.view = view        # where a read's payload goes, or None
        self.offset = offset
        self.done = False
        self.error = None


class ThreadConnection:
    """
    Requests on a lent NBD socket, in the one thread that owns it.

    @ivar broken: whether a request failed half way (give the connection
        back as broken).
    """

    def __init__(self, sock: socket.socket, maxRequest: int,
                 structured: bool, timeout: float = 60.0):
        self._sock = sock
        self.maxRequest = maxRequest
        self._structured = structured
        self._handle = 1 << 63  # apart from the reactor client's handles
        self._requests: dict[int, _Request] = {}
        self._header = memoryview(bytearray(_STRUCTURED_REPLY.size + 4))
        self.broken = False
        sock.settimeout(timeout)

    @property
    def inFlight(self) -> int:
        """
        Requests sent and not finished.
        """
        return len(self._requests)

    def write(self, view: memoryview, offset: int) -> None:
        """
        Write all of C{view} at C{offset}.

        @raise NBDReplyError: the server failed the write (the connection
            stays usable).
        @raise Broken: the connection failed.
        """
        done = 0
        while done < len(view):
            n = min(self.maxRequest, len(view) - done)
            handle = self._send(CMD_WRITE, offset + done, n, None,
                                view[done:done + n])
            self._finish(handle)
            done += n

    def readInto(self, view: memoryview, offset: int) -> None:
        """
        Fill C{view} from C{offset}.

        @raise NBDReplyError: the server failed the read.
        @raise Broken: the connection failed.
        """
        done = 0
        while done < len(view):
            n = min(self.maxRequest, len(view) - done)
            self.finishRead(self.startRead(view[done:done + n],
                                           offset + done))
            done += n

    def startRead(self, view: memoryview, offset: int) -> int:
        """
        Ask for C{len(view)} bytes (at most L{maxRequest}) at C{offset},
        to go into C{view}.

        @return: the request's handle, for L{finishRead}.
        @raise Broken: the connection failed.
        """
        return self._send(CMD_READ, offset, len(view), view, None)

    def finishRead(self, handle: int) -> None:
        """
        Wait until the read C{handle} has filled its view.

        @raise NBDReplyError: the server failed the read.
        @raise Broken: the connection failed.
        """
        self._finish(handle)

    # Internals.

    def _send(self, cmd, offset, length, view, payload) -> int:
        if self.broken:
            raise Broken("NBD connection unusable after an earlier failure")
        self._handle += 1
        handle = self._handle
        header = _REQUEST.pack(REQUEST_MAGIC, 0, cmd, handle, offset, length)
        self._requests[handle] = _Request(view, offset)
        try:
            if payload is None:
                self._sock.sendall(header)
            else:
                parts = [memoryview(header), payload]
                while parts:
                    sent = self._sock.sendmsg(parts)
                    while parts and sent >= len(parts[0]):
                        sent -= len(parts[0])
                        parts.pop(0)
                    if parts and sent:
                        parts[0] = parts[0][sent:]
        except OSError as e:
            self._fail(f"NBD connection failed: {e}")
        return handle

    def _finish(self, handle: int) -> None:
        req = self._requests[handle]
        while not req.done:
            self._reply()
        del self._requests[handle]
        if req.error is not None:
            raise req.error

    def _fail(self, message: str):
        self.broken = True
        raise Broken(message)

    def _recvInto(self, view: memoryview) -> None:
        try:
            while len(view):
                n = self._sock.recv_into(view)
                if n == 0:
                    self._fail("NBD server closed the connection")
                view = view[n:]
        except OSError as e:
            self._fail(f"NBD connection failed: {e}")

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recvInto(memoryview(buf))
        return bytes(buf)

    def _request(self, handle: int) -> _Request:
        req = self._requests.get(handle)
        if req is None or req.done:
            self._fail(f"NBD reply for unknown handle {handle}")
        return req

    def _reply(self) -> None:
        """
        Read one simple reply or one structured reply chunk, into the
        request it belongs to.
        """
        view = self._header
        self._recvInto(view[:4])
        magic = _U32.unpack_from(view)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            self._recvInto(view[4:4 + _SIMPLE_REPLY.size])
            code, handle = _SIMPLE_REPLY.unpack_from(view, 4)
            req = self._request(handle)
            if code:
                # No payload follows an error.
                req.error = _replyError(code)
            elif req.view is not None:
                self._recvInto(req.view)
            req.done = True
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self._structured:
            self._fail(f"Bad NBD reply magic {magic:#x}")
        self._recvInto(view[4:4 + _STRUCTURED_REPLY.size])
        flags, rtype, handle, length = _STRUCTURED_REPLY.unpack_from(view, 4)
        req = self._request(handle)
        target = req.view
        if rtype == REPLY_TYPE_NONE:
            if length:
                self._fail("NBD_REPLY_TYPE_NONE with a payload")
        elif rtype == REPLY_TYPE_OFFSET_DATA and target is not None:
            if length < _U64.size:
                self._fail(f"Bad data chunk length {length}")
            start = _U64.unpack(self._recv(_U64.size))[0] - req.offset
            size = length - _U64.size
            if start < 0 or start + size > len(target):
                self._fail("NBD data chunk outside the request")
            self._recvInto(target[start:start + size])
        elif rtype == REPLY_TYPE_OFFSET_HOLE and target is not None:
            if length != _HOLE.size:
                self._fail(f"Bad hole chunk length {length}")
            start, size = _HOLE.unpack(self._recv(_HOLE.size))
            start -= req.offset
            if start < 0 or start + size > len(target):
                self._fail("NBD hole chunk outside the request")
            target[start:start + size] = bytes(size)
        elif rtype & REPLY_TYPE_ERROR_BIT:
            if length < _ERROR.size:
                self._fail(f"Bad error chunk length {length}")
            payload = self._recv(length)
            code, size = _ERROR.unpack_from(payload)
            message = payload[6:6 + size].decode("utf-8", "replace")
            if req.error is None:
                req.error = _replyError(code, message)
        else:
            self._fail(f"Unexpected NBD reply chunk type {rtype}")
        if flags & REPLY_FLAG_DONE:
            req.done = True
