# -*- test-case-name: test.test_nbd_protocol -*-
"""
An asynchronous NBD client (fixed newstyle handshake, structured replies).

L{NBDClient} negotiates one export and then carries any number of requests
in flight: every command returns its own L{Deferred}, replies may come in
any order and are matched by handle.

Request sizes: L{NBDClient.read} and L{NBDClient.write} accept any length
and split it transparently into requests of at most the server's maximum
block size (the pieces are pipelined and the caller sees one result);
L{NBDClient.zero} is split into steps of at most L{MAX_ZERO}. Callers that
want to bound memory should still keep requests small (the NBD backend
limits them to its C{maxRequest}).

Cancelling a command's Deferred aborts the connection: NBD has no way to
cancel one request, and a half-read reply cannot be skipped safely.
"""

from __future__ import annotations

import socket
import struct
from typing import Callable

from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from imageio import malloc
from imageio.deferreds import fire
from imageio.logs import Logger
from imageio.protocols import nbdurl
from imageio.protocols.nbdwire import (
    ALLOCATION_DEPTH, BASE_ALLOCATION, CMD_BLOCK_STATUS, CMD_DISC,
    CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES,
    DEFAULT_MAXIMUM_BLOCK_SIZE, DEFAULT_MINIMUM_BLOCK_SIZE,
    DEFAULT_PREFERRED_BLOCK_SIZE, DIRTY_BITMAP_PREFIX, FLAG_CAN_MULTI_CONN,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_FLUSH,
    FLAG_SEND_WRITE_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, MAX_CHUNK,
    MAX_LENGTH, MAX_OPTION_REPLY, MAX_ZERO, NBDConnectionLost, NBDError,
    NBDMAGIC, NBDOptionError, NBDOptionUnsupported, NBDProtocolError,
    NBDReplyError, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_GO,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT,
    REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, REP_ACK, REP_ERR_BIT, REP_ERR_UNSUP, REP_INFO,
    REP_META_CONTEXT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STATE_DIRTY,
    STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC, _GREETING, _OPTION,
    _OPTION_ERRORS, _OPTION_REPLY, _REQUEST, _Request, _SIMPLE_REPLY,
    _STRUCTURED_REPLY, _U16, _U32, _U64, _join, _ordered, _replyError)

__all__ = [
    "NBDError", "NBDProtocolError", "NBDOptionError", "NBDOptionUnsupported",
    "NBDReplyError", "NBDConnectionLost", "NBDClient", "connect",
    "BASE_ALLOCATION", "ALLOCATION_DEPTH", "DIRTY_BITMAP_PREFIX",
    "STATE_HOLE", "STATE_ZERO", "STATE_DIRTY", "MAX_ZERO",
]



class NBDClient(Protocol):
    """
    One NBD connection: handshake, then pipelined commands.

    Create it with L{connect}, or build it yourself and wait on
    L{whenReady} (tests drive it through a L{StringTransport}).

    Parsing: L{dataReceived} walks the received bytes with a memoryview.
    Fixed-size records (headers, small payloads) are handed to the current
    handler as soon as enough bytes are there, buffered in C{_partial} only
    when a record spans reads. Read payloads are copied straight from the
    received data into the request's preallocated buffer, so a multi-MiB
    read costs one copy and no buffer reshuffling.

    @ivar exportName: the export asked for.
    @ivar exportSize: the export size in bytes.
    @ivar flags: the transmission flags.
    @ivar minimumBlockSize: the server's minimum block size.
    @ivar preferredBlockSize: the server's preferred block size.
    @ivar maximumBlockSize: the server's maximum block size (read and
        write payloads larger than this are split).
    @ivar structuredReplies: whether structured replies were negotiated.
    @ivar metaContexts: C{{name: context id}} of the negotiated contexts.
    @ivar dirtyBitmap: the negotiated C{qemu:dirty-bitmap:...} context
        name, or L{None}.

    @ivar _want: size of the record the parser waits for.
    @ivar _handler: called with a memoryview of exactly C{_want} bytes.
    @ivar _partial: bytes of a record that spans reads.
    @ivar _sink: a L{_Request} whose read payload is streaming in, or None.
    @ivar _sinkPos: where in C{_sink.buf} the next payload byte goes.
    @ivar _sinkRemaining: payload bytes of the current chunk still to come.
    @ivar _pending: C{{handle: _Request}} for requests awaiting replies.
    """

    _log = Logger()

    def __init__(self, exportName: str = "", dirty: bool = False):
        self.exportName = exportName
        self.dirty = dirty
        self.exportSize: int | None = None
        self.flags: int | None = None
        self.minimumBlockSize = DEFAULT_MINIMUM_BLOCK_SIZE
        self.preferredBlockSize = DEFAULT_PREFERRED_BLOCK_SIZE
        self.maximumBlockSize = DEFAULT_MAXIMUM_BLOCK_SIZE
        self.structuredReplies = False
        self.metaContexts: dict[str, int] = {}
        self.dirtyBitmap: str | None = None
        self.whenReady: defer.Deferred[NBDClient] = defer.Deferred()

        self._contextNames: dict[int, str] = {}
        self._listedBitmaps: list[str] = []
        self._wantedContexts: list[str] = []
        self._noZeroes = False
        self._option: int | None = None
        self._optionHandler: Callable[[int, memoryview], None] | None = None
        self._want = 0
        self._handler: Callable[[memoryview], None] | None = None
        self._partial = bytearray()
        self._sink: _Request | None = None
        self._sinkPos = 0
        self._sinkRemaining = 0
        self._chunk: tuple[int, int, _Request, int] | None = None
        self._simpleRead: _Request | None = None
        self._closeWaiters: list[defer.Deferred[None]] = []
        self._lost = False
        self._pending: dict[int, _Request] = {}
        self._nextHandle = 0
        self._ready = False
        self._closing = False
        self._failure: Failure | None = None
        self._lent: socket.socket | None = None
        self._waiting: list = []

    # Properties derived from the transmission flags.

    @property
    def readOnly(self) -> bool:
        return bool(self.flags and self.flags & FLAG_READ_ONLY)

    @property
    def canFlush(self) -> bool:
        return bool(self.flags and self.flags & FLAG_SEND_FLUSH)

    @property
    def canZero(self) -> bool:
        return bool(self.flags and self.flags & FLAG_SEND_WRITE_ZEROES)

    @property
    def canMultiConn(self) -> bool:
        return bool(self.flags and self.flags & FLAG_CAN_MULTI_CONN)

    @property
    def hasBaseAllocation(self) -> bool:
        return BASE_ALLOCATION in self.metaContexts

    @property
    def hasAllocationDepth(self) -> bool:
        return ALLOCATION_DEPTH in self.metaContexts

    @property
    def inFlight(self) -> int:
        """
        Number of requests waiting for replies.
        """
        return len(self._pending)

    # Connection

    def connectionMade(self):
        # Bigger reads from the socket: reads of MiBs arrive in fewer
        # dataReceived calls (TWISTED-NOTES §1/§4), each from malloc's
        # heap (malloc.RECEIVE_SIZE). bufferSize is an attribute of
        # twisted.internet.abstract.FileDescriptor (checked on Twisted
        # 26.10); other transports simply lack it.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = malloc.RECEIVE_SIZE
        if ITCPTransport.providedBy(self.transport):
            try:
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass
        self._expect(_GREETING.size, self._gotGreeting)

    def connectionLost(self, reason=None):
        self._lost = True
        self.connected = 0
        self._failAll(reason)
        waiters, self._closeWaiters = self._closeWaiters, []
        for d in waiters:
            d.callback(None)

    def _failAll(self, reason: Failure):
        """
        Fail the handshake (if still running) and every pending request.

        L{NBDError}s (protocol and option errors) are passed on as they
        are; anything else becomes L{NBDConnectionLost}.
        """
        if self._failure is not None:
            reason = self._failure
        if not self._ready:
            self._ready = True
            err = reason
            if not isinstance(reason.value, NBDError):
                err = Failure(NBDConnectionLost(
                    f"Connection closed during handshake: "
                    f"{reason.getErrorMessage()}"))
            fire(self.whenReady, err)
        pending, self._pending = self._pending, {}
        self._sink = None
        if pending:
            err = reason
            if not isinstance(reason.value, (NBDError,
                                             defer.CancelledError)):
                err = Failure(NBDConnectionLost(
                    f"Connection lost with {len(pending)} requests in "
                    f"flight: {reason.getErrorMessage()}"))
            for req in pending.values():
                fire(req.deferred, err)

    def _abort(self, exc: Exception):
        """
        Abort the connection because of C{exc}; the handshake and every
        pending request fail with it now, later commands fail with it too.
        """
        if self._failure is None:
            if isinstance(exc, defer.CancelledError):
                self._log.info("NBD request cancelled, closing connection")
            else:
                self._log.error("Aborting NBD connection: {error}", error=exc)
            self._failure = Failure(exc)
        self._want = 0
        self._handler = None
        self._sink = None
        self._failAll(self._failure)
        self.transport.abortConnection()

    # Parser

    def _expect(self, size: int, handler: Callable[[memoryview], None]):
        self._want = size
        self._handler = handler

    def dataReceived(self, data: bytes):
        if not isinstance(data, bytes):
            # Read payloads keep slices of the received data until the
            # reply is complete: it must not change under us.
            data = bytes(data)
        view = memoryview(data)
        pos = 0
        end = len(view)
        try:
            while self._failure is None:
                sink = self._sink
                if sink is not None:
                    if pos == end:
                        break
                    n = min(self._sinkRemaining, end - pos)
                    if sink.parts is not None:
                        # No copy: the slice keeps the received bytes.
                        sink.parts.append((self._sinkPos, view[pos:pos + n]))
                    else:
                        sink.buf[self._sinkPos:self._sinkPos + n] = \
                            view[pos:pos + n]
                    pos += n
                    self._sinkPos += n
                    self._sinkRemaining -= n
                    if self._sinkRemaining == 0:
                        self._sink = None
                        self._payloadDone()
                    continue
                want = self._want
                handler = self._handler
                if handler is None:
                    if pos < end:
                        raise NBDProtocolError(
                            f"Unexpected data from server: "
                            f"{bytes(view[pos:pos + 32])!r}")
                    break
                if self._partial:
                    need = want - len(self._partial)
                    take = min(need, end - pos)
                    self._partial += view[pos:pos + take]
                    pos += take
                    if take < need:
                        break
                    record = memoryview(bytes(self._partial))
                    self._partial.clear()
                elif end - pos >= want:
                    record = view[pos:pos + want]
                    pos += want
                else:
                    if pos == end:
                        break
                    self._partial += view[pos:end]
                    pos = end
                    break
                self._handler = None
                handler(record)
        except Exception as e:
            # NBDProtocolError, NBDOptionError, or a bug: the stream is in
            # an unknown state, so nothing on this connection can continue.
            self._abort(e)

    # Handshake

    def _gotGreeting(self, data):
        magic, opt, flags = _GREETING.unpack(data)
        if magic != NBDMAGIC:
            raise NBDProtocolError(f"Bad server magic {magic:#x}")
        if opt != IHAVEOPT:
            raise NBDProtocolError(
                f"Server does not speak the newstyle handshake "
                f"(magic {opt:#x})")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NBDProtocolError(
                f"Server does not support fixed newstyle (flags {flags:#x})")
        clientFlags = FLAG_FIXED_NEWSTYLE
        if flags & FLAG_NO_ZEROES:
            clientFlags |= FLAG_NO_ZEROES
        self.transport.write(_U32.pack(clientFlags))
        self._sendOption(OPT_STRUCTURED_REPLY, b"", self._gotStructuredReply)

    def _sendOption(self, option, payload, handler):
        self._option = option
        self._optionHandler = handler
        self.transport.write(_OPTION.pack(IHAVEOPT, option, len(payload))
                             + payload)
        self._expect(_OPTION_REPLY.size, self._gotOptionReplyHeader)

    def _gotOptionReplyHeader(self, data):
        magic, option, rtype, length = _OPTION_REPLY.unpack(data)
        if magic != OPTION_REPLY_MAGIC:
            raise NBDProtocolError(f"Bad option reply magic {magic:#x}")
        if option != self._option:
            raise NBDProtocolError(
                f"Reply for option {option}, expected {self._option}")
        if length > MAX_OPTION_REPLY:
            raise NBDProtocolError(f"Option reply too long: {length} bytes")
        self._expect(length, lambda payload: self._gotOptionReply(rtype,
                                                                  payload))

    def _gotOptionReply(self, rtype, payload):
        if rtype & REP_ERR_BIT:
            message = bytes(payload).decode("utf-8", "replace")
            message = message or _OPTION_ERRORS.get(rtype, "unknown error")
            cls = (NBDOptionUnsupported if rtype == REP_ERR_UNSUP
                   else NBDOptionError)
            self._optionHandler(rtype, cls(self._option, rtype, message))
        else:
            self._optionHandler(rtype, payload)

    def _nextReply(self):
        self._expect(_OPTION_REPLY.size, self._gotOptionReplyHeader)

    def _gotStructuredReply(self, rtype, payload):
        if rtype == REP_ACK:
            self.structuredReplies = True
        elif rtype == REP_ERR_UNSUP:
            # Old server: plain replies only, hence no block status.
            self._log.info("NBD server does not support structured replies")
        elif isinstance(payload, NBDOptionError):
            raise payload
        else:
            raise NBDProtocolError(
                f"Unexpected reply {rtype} to NBD_OPT_STRUCTURED_REPLY")
        if self.structuredReplies and self.dirty:
            self._sendOption(OPT_LIST_META_CONTEXT,
                             self._metaQuery([DIRTY_BITMAP_PREFIX]),
                             self._gotListMetaContext)
        elif self.structuredReplies:
            self._setMetaContext()
        else:
            self._sendGo()

    def _metaQuery(self, queries):
        name = self.exportName.encode("utf-8")
        parts = [_U32.pack(len(name)), name, _U32.pack(len(queries))]
        for q in queries:
            q = q.encode("utf-8")
            parts += [_U32.pack(len(q)), q]
        return b"".join(parts)

    def _parseMetaContext(self, payload):
        if len(payload) < 4:
            raise NBDProtocolError("Short NBD_REP_META_CONTEXT reply")
        (cid,) = _U32.unpack(payload[:4])
        try:
            name = bytes(payload[4:]).decode("utf-8")
        except UnicodeDecodeError:
            raise NBDProtocolError("Meta context name is not UTF-8")
        return cid, name

    def _gotListMetaContext(self, rtype, payload):
        if rtype == REP_META_CONTEXT:
            _, name = self._parseMetaContext(payload)
            self._listedBitmaps.append(name)
            self._nextReply()
            return
        if rtype == REP_ACK:
            pass
        elif isinstance(payload, NBDOptionUnsupported):
            self._listedBitmaps = []
        elif isinstance(payload, NBDOptionError):
            raise payload
        else:
            raise NBDProtocolError(
                f"Unexpected reply {rtype} to NBD_OPT_LIST_META_CONTEXT")
        bitmaps = [n for n in self._listedBitmaps
                   if n.startswith(DIRTY_BITMAP_PREFIX)]
        if len(bitmaps) == 1:
            self.dirtyBitmap = bitmaps[0]
        else:
            self._log.warn("Expected one dirty bitmap, server has {bitmaps}",
                           bitmaps=bitmaps)
        self._setMetaContext()

    def _setMetaContext(self):
        queries = [BASE_ALLOCATION, ALLOCATION_DEPTH]
        if self.dirtyBitmap:
            queries.append(self.dirtyBitmap)
        self._wantedContexts = queries
        self._sendOption(OPT_SET_META_CONTEXT, self._metaQuery(queries),
                         self._gotSetMetaContext)

    def _gotSetMetaContext(self, rtype, payload):
        if rtype == REP_META_CONTEXT:
            cid, name = self._parseMetaContext(payload)
            if name not in self._wantedContexts:
                raise NBDProtocolError(
                    f"Server selected meta context {name!r}, not asked for")
            self.metaContexts[name] = cid
            self._contextNames[cid] = name
            self._nextReply()
            return
        if rtype == REP_ACK:
            pass
        elif isinstance(payload, NBDOptionUnsupported):
            self.metaContexts.clear()
            self._contextNames.clear()
        elif isinstance(payload, NBDOptionError):
            raise payload
        else:
            raise NBDProtocolError(
                f"Unexpected reply {rtype} to NBD_OPT_SET_META_CONTEXT")
        if self.dirtyBitmap and self.dirtyBitmap not in self.metaContexts:
            self.dirtyBitmap = None
        self._sendGo()

    def _sendGo(self):
        name = self.exportName.encode("utf-8")
        payload = (_U32.pack(len(name)) + name + _U16.pack(1)
                   + _U16.pack(INFO_BLOCK_SIZE))
        self._sendOption(OPT_GO, payload, self._gotGo)

    def _gotGo(self, rtype, payload):
        if rtype == REP_INFO:
            if len(payload) < 2:
                raise NBDProtocolError("Short NBD_REP_INFO reply")
            (info,) = _U16.unpack(payload[:2])
            if info == INFO_EXPORT:
                if len(payload) != 12:
                    raise NBDProtocolError("Bad NBD_INFO_EXPORT length")
                self.exportSize, self.flags = struct.unpack("!QH",
                                                            payload[2:])
            elif info == INFO_BLOCK_SIZE:
                if len(payload) != 14:
                    raise NBDProtocolError("Bad NBD_INFO_BLOCK_SIZE length")
                mn, pref, mx = struct.unpack("!III", payload[2:])
                self.minimumBlockSize = mn or DEFAULT_MINIMUM_BLOCK_SIZE
                self.preferredBlockSize = pref or DEFAULT_PREFERRED_BLOCK_SIZE
                self.maximumBlockSize = mx or DEFAULT_MAXIMUM_BLOCK_SIZE
            # Other infos (name, description) are of no use to us.
            self._nextReply()
            return
        if isinstance(payload, NBDOptionError):
            raise payload
        if rtype != REP_ACK:
            raise NBDProtocolError(f"Unexpected reply {rtype} to NBD_OPT_GO")
        if self.exportSize is None:
            raise NBDProtocolError("Server sent no NBD_INFO_EXPORT")
        self._option = self._optionHandler = None
        self._ready = True
        self._expect(4, self._gotReplyMagic)
        self._log.debug(
            "NBD export {name!r} ready: size={size} flags={flags:#x} "
            "block sizes={mn}/{pref}/{mx} contexts={contexts}",
            name=self.exportName, size=self.exportSize, flags=self.flags,
            mn=self.minimumBlockSize, pref=self.preferredBlockSize,
            mx=self.maximumBlockSize, contexts=sorted(self.metaContexts))
        self.whenReady.callback(self)

    # Transmission: replies

    def _gotReplyMagic(self, data):
        (magic,) = _U32.unpack(data)
        if magic == SIMPLE_REPLY_MAGIC:
            self._expect(_SIMPLE_REPLY.size, self._gotSimpleReply)
        elif magic == STRUCTURED_REPLY_MAGIC and self.structuredReplies:
            self._expect(_STRUCTURED_REPLY.size, self._gotStructuredHeader)
        else:
            raise NBDProtocolError(f"Bad reply magic {magic:#x}")

    def _request(self, handle) -> _Request:
        req = self._pending.get(handle)
        if req is None:
            raise NBDProtocolError(f"Reply for unknown handle {handle}")
        return req

    def _gotSimpleReply(self, data):
        error, handle = _SIMPLE_REPLY.unpack(data)
        req = self._request(handle)
        if self.structuredReplies and req.cmd in (CMD_READ,
                                                  CMD_BLOCK_STATUS):
            raise NBDProtocolError(
                f"Simple reply to command {req.cmd} after structured "
                f"replies were negotiated")
        if error:
            self._finish(req, _replyError(error))
        elif req.cmd == CMD_READ and req.length:
            self._simpleRead = req
            self._startPayload(req, 0, req.length)
            return
        else:
            self._finish(req)
        self._expect(4, self._gotReplyMagic)

    def _startPayload(self, req, where, length):
        self._sink = req
        self._sinkPos = where
        self._sinkRemaining = length

    def _payloadDone(self):
        chunk, self._chunk = self._chunk, None
        if chunk is None:
            # A simple reply's read payload: the request is complete.
            req, self._simpleRead = self._simpleRead, None
            self._finish(req)
            self._expect(4, self._gotReplyMagic)
        else:
            self._endChunk(chunk[2], chunk[0])

    def _gotStructuredHeader(self, data):
        flags, rtype, handle, length = _STRUCTURED_REPLY.unpack(data)
        req = self._request(handle)
        if rtype == REPLY_TYPE_OFFSET_DATA:
            if req.cmd != CMD_READ or length <= 8:
                raise NBDProtocolError(
                    f"Bad OFFSET_DATA chunk (command {req.cmd}, length "
                    f"{length})")
            self._expect(8, lambda d: self._gotDataOffset(req, flags,
                                                          length - 8, d))
            return
        if length > MAX_CHUNK:
            raise NBDProtocolError(f"Reply chunk too long: {length} bytes")
        self._expect(length, lambda d: self._gotChunk(req, flags, rtype, d))

    def _gotDataOffset(self, req, flags, size, data):
        (offset,) = _U64.unpack(data)
        start = offset - req.offset
        if start < 0 or start + size > req.length:
            raise NBDProtocolError(
                f"OFFSET_DATA {offset}+{size} outside request "
                f"{req.offset}+{req.length}")
        req.received += size
        self._chunk = (flags, REPLY_TYPE_OFFSET_DATA, req, size)
        self._startPayload(req, start, size)

    def _gotChunk(self, req, flags, rtype, data):
        if rtype == REPLY_TYPE_NONE:
            if len(data) != 0 or not flags & REPLY_FLAG_DONE:
                raise NBDProtocolError("Bad NBD_REPLY_TYPE_NONE chunk")
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != CMD_READ or len(data) != 12:
                raise NBDProtocolError("Bad OFFSET_HOLE chunk")
            offset, size = struct.unpack("!QI", data)
            start = offset - req.offset
            if size == 0 or start < 0 or start + size > req.length:
                raise NBDProtocolError(
                    f"OFFSET_HOLE {offset}+{size} outside request "
                    f"{req.offset}+{req.length}")
            if req.parts is not None:
                req.parts.append((start, bytes(size)))
            else:
                # Chunks never overlap (NBD spec), but the caller's buffer
                # may hold anything.
                req.buf[start:start + size] = bytes(size)
            req.received += size
        elif rtype == REPLY_TYPE_BLOCK_STATUS:
            self._gotBlockStatus(req, data)
        elif rtype & REPLY_TYPE_ERROR_BIT:
            self._gotErrorChunk(req, rtype, data)
        else:
            raise NBDProtocolError(f"Unknown reply chunk type {rtype}")
        self._endChunk(req, flags)

    def _gotBlockStatus(self, req, data):
        if req.cmd != CMD_BLOCK_STATUS:
            raise NBDProtocolError("BLOCK_STATUS chunk for another command")
        n = len(data)
        if n < 12 or n % 8 != 4:
            raise NBDProtocolError(f"Bad BLOCK_STATUS length {n}")
        (cid,) = _U32.unpack(data[:4])
        name = self._contextNames.get(cid)
        if name is None:
            raise NBDProtocolError(f"Unknown meta context id {cid}")
        values = struct.unpack(f"!{(n - 4) // 4}I", data[4:])
        extents = list(zip(values[0::2], values[1::2]))
        for length, _ in extents:
            if length == 0:
                raise NBDProtocolError("Zero length extent")
        req.extents[name] = extents

    def _gotErrorChunk(self, req, rtype, data):
        if len(data) < 6:
            raise NBDProtocolError(f"Short error chunk ({len(data)} bytes)")
        code, msglen = struct.unpack("!IH", data[:6])
        if 6 + msglen > len(data):
            raise NBDProtocolError("Error message longer than the chunk")
        if rtype == REPLY_TYPE_ERROR_OFFSET and len(data) != 6 + msglen + 8:
            raise NBDProtocolError("Bad ERROR_OFFSET chunk length")
        if code == 0:
            raise NBDProtocolError("Error chunk with error code 0")
        message = bytes(data[6:6 + msglen]).decode("utf-8", "replace")
        if req.error is None:
            req.error = _replyError(code, message)

    def _endChunk(self, req, flags):
        if flags & REPLY_FLAG_DONE:
            if (req.error is None and req.cmd == CMD_READ
                    and req.received != req.length):
                raise NBDProtocolError(
                    f"Read reply covers {req.received} of {req.length} bytes")
            self._finish(req, req.error)
        self._expect(4, self._gotReplyMagic)

    def _finish(self, req, error=None):
        del self._pending[req.handle]
        if error is not None:
            fire(req.deferred, Failure(error))
        elif req.cmd == CMD_READ:
            if req.pieces:
                fire(req.deferred, _ordered(req.parts, req.length))
            elif req.parts is not None:
                fire(req.deferred, _join(req.parts, req.length))
            else:
                fire(req.deferred, req.buf)
        elif req.cmd == CMD_BLOCK_STATUS:
            fire(req.deferred, req.extents)
        else:
            fire(req.deferred, None)

    # Transmission: requests

    def _send(self, cmd, offset, length, flags=0, payload=None, buf=None,
              pieces=False):
        if self._failure is not None:
            return defer.fail(self._failure)
        if not self._ready or self.exportSize is None:
            return defer.fail(NBDError("NBD handshake not finished"))
        if self._closing or self._lost:
            return defer.fail(NBDConnectionLost("NBD connection closed"))
        if self._lent is not None:
            # A thread owns the connection: sent once it is given back.
            waiting: defer.Deferred = defer.Deferred()
            self._waiting.append(((cmd, offset, length, flags, payload, buf),
                                  waiting))
            return waiting
        handle = self._nextHandle
        self._nextHandle = (handle + 1) & 0xFFFFFFFFFFFFFFFF
        d = defer.Deferred(self._cancel)
        req = _Request(handle, cmd, offset, length, d, buf)
        if cmd == CMD_READ and buf is None:
            req.parts = []
            req.pieces = pieces
        if cmd == CMD_BLOCK_STATUS:
            req.extents = {}
        self._pending[handle] = req
        header = _REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset,
                               length)
        if payload is None:
            self.transport.write(header)
        else:
            self.transport.writeSequence([header, payload])
        return d

    def _cancel(self, d):
        self._abort(defer.CancelledError("NBD request cancelled"))

    def _parts(self, offset, length, step):
        done = 0
        while done < length:
            n = min(step, length - done)
            yield done, n
            done += n

    def _gather(self, ds, result):
        if len(ds) == 1:
            return ds[0].addCallback(lambda _: result)
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallbacks(lambda _: result,
                       lambda f: f.value.subFailure)
        return d

    def read(self, offset: int, length: int) -> defer.Deferred:
        """
        Read C{length} bytes at C{offset}.

        @return: L{Deferred} firing with C{length} bytes (C{bytes} when the
            read fits in one request, else a C{bytearray}), or failing with
            L{NBDReplyError} / L{NBDConnectionLost}.
        """
        if length == 0:
            return defer.succeed(b"")
        if length <= self.maximumBlockSize:
            # One request: the payload is collected as received and
            # joined once, so the result costs a single copy and is the
            # C{bytes} a transport write wants (no zero-filled buffer, no
            # bytearray-to-bytes copy by the caller).
            return self._send(CMD_READ, offset, length)
        buf = bytearray(length)
        view = memoryview(buf)
        ds = [self._send(CMD_READ, offset + start, n,
                         buf=view[start:start + n])
              for start, n in self._parts(offset, length,
                                          self.maximumBlockSize)]
        return self._gather(ds, buf)

    def readPieces(self, offset: int, length: int) -> defer.Deferred:
        """
        Read C{length} bytes at C{offset} as the pieces they arrived in,
        without joining them: for consumers that take a list of buffers
        (a hash), this saves the copy L{read} makes.

        @param length: at most L{maximumBlockSize} (one request).
        @return: L{Deferred} firing with a list of bytes-like objects
            (read-only memoryviews of the received data, or C{bytes})
            whose concatenation is the data.
        """
        if length == 0:
            return defer.succeed([])
        if length > self.maximumBlockSize:
            return defer.fail(ValueError(
                f"Read of {length} bytes larger than the server's maximum "
                f"{self.maximumBlockSize}"))
        return self._send(CMD_READ, offset, length, pieces=True)

    def readInto(self, offset: int, buf) -> defer.Deferred:
        """
        Read C{len(buf)} bytes at C{offset} into the writable buffer C{buf}.

        @return: L{Deferred} firing with C{buf}.
        """
        view = memoryview(buf).cast("B")
        if len(view) == 0:
            return defer.succeed(buf)
        ds = [self._send(CMD_READ, offset + start, n,
                         buf=view[start:start + n])
              for start, n in self._parts(offset, len(view),
                                          self.maximumBlockSize)]
        return self._gather(ds, buf)

    def write(self, offset: int, data) -> defer.Deferred[None]:
        """
        Write the bytes-like C{data} at C{offset}.

        @return: L{Deferred} firing with L{None}.
        """
        length = len(data)
        if length == 0:
            return defer.succeed(None)
        if length <= self.maximumBlockSize:
            if not isinstance(data, bytes):
                data = bytes(data)
            return self._send(CMD_WRITE, offset, length, payload=data)
        view = memoryview(data).cast("B")
        ds = [self._send(CMD_WRITE, offset + start, n,
                         payload=bytes(view[start:start + n]))
              for start, n in self._parts(offset, length,
                                          self.maximumBlockSize)]
        return self._gather(ds, None)

    def zero(self, offset: int, length: int,
             noHole: bool = False) -> defer.Deferred[None]:
        """
        Zero C{length} bytes at C{offset} with C{NBD_CMD_WRITE_ZEROES}.

        @param noHole: ask the server to keep the range allocated.
        @return: L{Deferred} firing with L{None}; fails with
            L{NBDError} if the server does not support the command.
        """
        if not self.canZero:
            return defer.fail(NBDError("Server does not support zero"))
        if length == 0:
            return defer.succeed(None)
        flags = CMD_FLAG_NO_HOLE if noHole else 0
        ds = [self._send(CMD_WRITE_ZEROES, offset + start, n, flags)
              for start, n in self._parts(offset, length, MAX_ZERO)]
        return self._gather(ds, None)

    def flush(self) -> defer.Deferred[None]:
        """
        Flush written data to stable storage; succeeds at once if the
        server does not advertise C{NBD_CMD_FLUSH}.
        """
        if not self.canFlush:
            return defer.succeed(None)
        return self._send(CMD_FLUSH, 0, 0)

    def blockStatus(self, offset: int, length: int) -> defer.Deferred[dict]:
        """
        Query the negotiated meta contexts for C{length} bytes at C{offset}.

        @param length: at most C{2**32 - 1}.
        @return: L{Deferred} firing with C{{context name: [(length,
            flags), ...]}}, with each context the server answered for.
        """
        if not self.metaContexts:
            return defer.fail(NBDError("No meta context negotiated"))
        if not 0 < length <= MAX_LENGTH:
            return defer.fail(ValueError(f"Invalid length {length}"))
        return self._send(CMD_BLOCK_STATUS, offset, length)

    def lend(self) -> socket.socket | None:
        """
        Lend the connection to one thread, which then sends requests and
        reads replies itself on the returned socket (the transport's own,
        L{ITransport.getHandle}; the thread sets a timeout on it) until it
        calls L{giveBack} in the reactor. In between the reactor does not
        read the connection; requests and a close asked for meanwhile wait
        for L{giveBack}.

        @return: the socket, or L{None} if the connection is not idle
            (requests in flight, a partial reply, closing, lost, failed,
            lent) or has no socket.
        """
        if (not self._ready or self._lost or self._closing
                or self._failure is not None or self._pending
                or self._partial or self._lent is not None
                or self._chunk is not None or self._sink is not None
                or self._simpleRead is not None):
            return None
        getHandle = getattr(self.transport, "getHandle", None)
        sock = getHandle() if getHandle is not None else None
        if not isinstance(sock, socket.socket):
            return None
        # Every request written got its reply, so nothing is left in the
        # transport's buffer either.
        self.transport.stopReading()
        self._lent = sock
        return sock

    def giveBack(self, broken: bool = False) -> None:
        """
        The thread is done with the connection lent by L{lend} (in the
        reactor). C{broken}: it stopped in the middle of a request, so the
        stream is out of step and the connection is dropped; requests
        that waited fail.
        """
        sock, self._lent = self._lent, None
        if sock is None:
            return
        if broken:
            self._abort(NBDConnectionLost(
                "NBD connection dropped in the middle of a request"))
        elif not self._lost:
            # Non-blocking again, as Twisted keeps it.
            sock.setblocking(False)
            self.transport.startReading()
        waiting, self._waiting = self._waiting, []
        for args, d in waiting:
            self._send(*args).chainDeferred(d)
        if self._closeWaiters and not self._closing:
            # close() was asked for while lent.
            waiters, self._closeWaiters = self._closeWaiters, []
            for d in waiters:
                self.close().chainDeferred(d)

    def close(self) -> defer.Deferred[None]:
        """
        Send C{NBD_CMD_DISC} and close the connection. Requests still in
        flight fail. Idempotent.

        @return: L{Deferred} firing with L{None} once the connection is
            closed.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if self._lost or self.transport is None:
            d.callback(None)
            return d
        self._closeWaiters.append(d)
        if self._lent is not None:
            # Closed once the thread gives the connection back.
            return d
        if not self._closing:
            self._closing = True
            if self._ready and self._failure is None:
                self.transport.write(_REQUEST.pack(
                    REQUEST_MAGIC, 0, CMD_DISC, self._nextHandle, 0, 0))
            elif self._option is not None:
                self.transport.write(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
            self.transport.loseConnection()
        return d


class _NBDClientFactory(Factory):
    """
    Builds one L{NBDClient} for one export.
    """

    def __init__(self, exportName: str, dirty: bool):
        self.exportName = exportName
        self.dirty = dirty

    def buildProtocol(self, addr):
        client = NBDClient(self.exportName, self.dirty)
        client.factory = self
        return client


def connect(reactor, url: str, *, dirty: bool = False,
            exportName: str | None = None,
            timeout: float = 30) -> defer.Deferred[NBDClient]:
    """
    Connect to the NBD server C{url} names and negotiate its export.

    @param reactor: the reactor to connect with.
    @param url: an NBD URL (see L{imageio.protocols.nbdurl}).
    @param dirty: also negotiate the export's dirty bitmap, if it has
        exactly one.
    @param exportName: the export to use instead of the URL's.
    @param timeout: seconds allowed for connecting, and again for the
        handshake (a server that accepts but never answers, such as
        qemu-nbd at its C{--shared} limit, fails with L{NBDError}).
    @return: L{Deferred} firing with the L{NBDClient} once the handshake is
        done, or failing with C{ValueError} (bad URL), a connection error,
        L{NBDOptionError} or L{NBDProtocolError}.
    """
    try:
        parsed = nbdurl.parse(url)
    except ValueError:
        return defer.fail()
    name = parsed.exportName if exportName is None else exportName
    endpoint = nbdurl.clientEndpoint(reactor, parsed.address, timeout)
    factory = _NBDClientFactory(name, dirty)

    def connected(client):
        timer = reactor.callLater(
            timeout, client._abort,
            NBDError(f"NBD handshake timed out after {timeout} seconds"))

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return client.whenReady.addBoth(done)

    d = endpoint.connect(factory)
    d.addCallback(connected)
    return d
