# -*- test-case-name: test.test_nbd_thread -*-
"""
NBD commands sent by a thread on a connection lent by
L{imageio.protocols.nbd.NBDClient.lend}: blocking system calls, one
request at a time, straight from and into the thread's buffers (no copy
in the reactor, no join of Twisted's write buffer).

Only what a body thread needs: C{WRITE}, and C{READ} with simple or
structured replies (data and hole chunks).
"""

from __future__ import annotations

import socket
import struct

from imageio.protocols.nbd import (
    _REQUEST, _SIMPLE_REPLY, _STRUCTURED_REPLY, _U32, CMD_READ, CMD_WRITE,
    REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, NBDProtocolError,
    _replyError)

__all__ = ["ThreadConnection", "Broken"]

_U64 = struct.Struct("!Q")
_HOLE = struct.Struct("!QI")
_ERROR = struct.Struct("!IH")


class Broken(Exception):
    """
    The connection failed in the middle of a request (a socket error, a
    timeout, a reply that makes no sense): it cannot be used again.
    """


class ThreadConnection:
    """
    Requests on a lent NBD socket, in the one thread that owns it.

    @ivar broken: whether a request failed half way (give the connection
        back as broken).
    """

    def __init__(self, sock: socket.socket, maxRequest: int,
                 structured: bool, timeout: float = 60.0):
        self._sock = sock
        self._maxRequest = maxRequest
        self._structured = structured
        self._handle = 1 << 63  # apart from the reactor client's handles
        self._requestOffset = 0
        self._header = bytearray(_STRUCTURED_REPLY.size + 4)
        self.broken = False
        sock.settimeout(timeout)

    def write(self, view: memoryview, offset: int) -> None:
        """
        Write all of C{view} at C{offset}.

        @raise NBDReplyError: the server failed the write (the connection
            stays usable).
        @raise Broken: the connection failed.
        """
        done = 0
        while done < len(view):
            n = min(self._maxRequest, len(view) - done)
            self._request(CMD_WRITE, offset + done, n, view[done:done + n])
            self._reply(None)
            done += n

    def readInto(self, view: memoryview, offset: int) -> None:
        """
        Fill C{view} from C{offset}.

        @raise NBDReplyError: the server failed the read.
        @raise Broken: the connection failed.
        """
        done = 0
        while done < len(view):
            n = min(self._maxRequest, len(view) - done)
            self._request(CMD_READ, offset + done, n)
            self._reply(view[done:done + n])
            done += n

    # Internals.

    def _request(self, cmd, offset, length, payload=None):
        self._handle += 1
        self._requestOffset = offset
        header = _REQUEST.pack(REQUEST_MAGIC, 0, cmd, self._handle, offset,
                               length)
        try:
            if payload is None:
                self._sock.sendall(header)
                return
            parts = [memoryview(header), payload]
            while parts:
                sent = self._sock.sendmsg(parts)
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if parts and sent:
                    parts[0] = parts[0][sent:]
        except OSError as e:
            self.broken = True
            raise Broken(f"NBD connection failed: {e}") from None

    def _recvInto(self, view: memoryview) -> None:
        try:
            while len(view):
                n = self._sock.recv_into(view)
                if n == 0:
                    raise Broken("NBD server closed the connection")
                view = view[n:]
        except OSError as e:
            self.broken = True
            raise Broken(f"NBD connection failed: {e}") from None
        except Broken:
            self.broken = True
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recvInto(memoryview(buf))
        return bytes(buf)

    def _fail(self, message: str):
        self.broken = True
        raise Broken(message)

    def _reply(self, target: memoryview | None) -> None:
        """
        Read the reply to the request just sent; a read's payload goes
        into C{target} (holes as zeroes).
        """
        view = memoryview(self._header)
        error = None
        while True:
            self._recvInto(view[:4])
            magic = _U32.unpack_from(view)[0]
            if magic == SIMPLE_REPLY_MAGIC:
                self._recvInto(view[4:4 + _SIMPLE_REPLY.size])
                code, handle = _SIMPLE_REPLY.unpack_from(view, 4)
                if handle != self._handle:
                    self._fail(f"Reply for handle {handle}, expected "
                               f"{self._handle}")
                if code:
                    # No payload follows an error.
                    raise _replyError(code)
                if target is not None:
                    self._recvInto(target)
                return
            if magic != STRUCTURED_REPLY_MAGIC or not self._structured:
                self._fail(f"Bad NBD reply magic {magic:#x}")
            self._recvInto(view[4:4 + _STRUCTURED_REPLY.size])
            flags, rtype, handle, length = _STRUCTURED_REPLY.unpack_from(
                view, 4)
            if handle != self._handle:
                self._fail(f"Reply for handle {handle}, expected "
                           f"{self._handle}")
            if rtype == REPLY_TYPE_NONE:
                if length:
                    self._fail("NBD_REPLY_TYPE_NONE with a payload")
            elif rtype == REPLY_TYPE_OFFSET_DATA and target is not None:
                start = self._chunkStart(length, 8, target)
                where = target[start:start + length - 8]
                self._recvInto(where)
            elif rtype == REPLY_TYPE_OFFSET_HOLE and target is not None:
                if length != _HOLE.size:
                    self._fail(f"Bad hole chunk length {length}")
                start, size = _HOLE.unpack(self._recv(_HOLE.size))
                start -= self._requestOffset
                if start < 0 or start + size > len(target):
                    self._fail("Hole chunk outside the request")
                target[start:start + size] = bytes(size)
            elif rtype & REPLY_TYPE_ERROR_BIT:
                if length < _ERROR.size:
                    self._fail(f"Bad error chunk length {length}")
                payload = self._recv(length)
                code, size = _ERROR.unpack_from(payload)
                message = payload[6:6 + size].decode("utf-8", "replace")
                if error is None:
                    error = _replyError(code, message)
            else:
                self._fail(f"Unexpected NBD reply chunk type {rtype}")
            if flags & REPLY_FLAG_DONE:
                if error is not None:
                    raise error
                return

    def _chunkStart(self, length, head, target) -> int:
        if length < head:
            self._fail(f"Bad data chunk length {length}")
        start = _U64.unpack(self._recv(8))[0] - self._requestOffset
        if start < 0 or start + length - head > len(target):
            self._fail("Data chunk outside the request")
        return start
