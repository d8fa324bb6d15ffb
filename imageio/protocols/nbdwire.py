# -*- test-case-name: test.test_nbd_protocol -*-
"""
The NBD wire format, as L{imageio.protocols.nbd} and
L{imageio.protocols.nbdthread} speak it: the numbers of the NBD spec
(handshake, options, commands, replies, meta contexts), the structures of
requests and replies, the errors, and the assembly of a read's payload
from its reply chunks.

The C{_}-prefixed names are private to C{imageio.protocols}.
"""

from __future__ import annotations

import errno as _errno
import os
import struct

__all__ = [
    "NBDError", "NBDProtocolError", "NBDOptionError", "NBDOptionUnsupported",
    "NBDReplyError", "NBDConnectionLost", "ERRNO",
    "BASE_ALLOCATION", "ALLOCATION_DEPTH", "DIRTY_BITMAP_PREFIX",
    "STATE_HOLE", "STATE_ZERO", "STATE_DIRTY", "MAX_ZERO",
]

# Handshake magic numbers.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT + 1
REP_ERR_POLICY = REP_ERR_BIT + 2
REP_ERR_INVALID = REP_ERR_BIT + 3
REP_ERR_PLATFORM = REP_ERR_BIT + 4
REP_ERR_TLS_REQD = REP_ERR_BIT + 5
REP_ERR_UNKNOWN = REP_ERR_BIT + 6
REP_ERR_SHUTDOWN = REP_ERR_BIT + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT + 8
REP_ERR_TOO_BIG = REP_ERR_BIT + 9

# Info types (NBD_OPT_GO).
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_NO_HOLE = 1 << 1

# Reply magic numbers and structured reply chunk types.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT + 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2

# Meta contexts and their flags.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# Block sizes assumed when the server sends no INFO_BLOCK_SIZE (NBD spec).
DEFAULT_MINIMUM_BLOCK_SIZE = 1
DEFAULT_PREFERRED_BLOCK_SIZE = 4096
DEFAULT_MAXIMUM_BLOCK_SIZE = 32 * 1024 * 1024

# Commands carry a 32 bit length.
MAX_LENGTH = 2**32 - 1

# Zeroing is done in steps of this size so a huge zero request does not
# hold the server for long (qemu-nbd also refuses lengths >= 2 GiB).
MAX_ZERO = 1 << 30

# Upper bounds for replies we buffer whole (everything but read payloads),
# so a broken server cannot make us allocate without limit.
MAX_OPTION_REPLY = 16 * 1024 * 1024
MAX_CHUNK = 64 * 1024 * 1024

# The NBD errno values (NBD spec "Error values") to the local errno.
ERRNO = {
    1: _errno.EPERM,
    5: _errno.EIO,
    12: _errno.ENOMEM,
    22: _errno.EINVAL,
    28: _errno.ENOSPC,
    75: _errno.EOVERFLOW,
    95: _errno.EOPNOTSUPP,
    108: _errno.ESHUTDOWN,
}

# Built-in texts for option errors the server sends without a message.
_OPTION_ERRORS = {
    REP_ERR_UNSUP: "option not supported by the server",
    REP_ERR_POLICY: "option forbidden by server policy",
    REP_ERR_INVALID: "option invalid",
    REP_ERR_PLATFORM: "option not supported on the server's platform",
    REP_ERR_TLS_REQD: "server requires TLS",
    REP_ERR_UNKNOWN: "export not available",
    REP_ERR_SHUTDOWN: "server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "server requires block size negotiation",
    REP_ERR_TOO_BIG: "request or reply too large",
}

_OPTION_NAMES = {
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

_GREETING = struct.Struct("!QQH")
_OPTION = struct.Struct("!QII")
_OPTION_REPLY = struct.Struct("!QIII")
_REQUEST = struct.Struct("!IHHQQI")
_SIMPLE_REPLY = struct.Struct("!IQ")          # after the 4 byte magic
_STRUCTURED_REPLY = struct.Struct("!HHQI")    # after the 4 byte magic
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class NBDError(Exception):
    """
    Base class of the errors this module raises.
    """


class NBDProtocolError(NBDError):
    """
    The server broke the protocol; the connection is aborted.
    """


class NBDOptionError(NBDError):
    """
    The server refused an option during the handshake.

    @ivar option: the option number.
    @ivar code: the NBD reply type (C{2**31 + N}).
    @ivar message: the server's message, or a built-in text.
    """

    def __init__(self, option: int, code: int, message: str):
        self.option = option
        self.code = code
        self.message = message
        name = _OPTION_NAMES.get(option, f"option {option}")
        super().__init__(
            f"{name} failed: {message} (error {code - REP_ERR_BIT})")


class NBDOptionUnsupported(NBDOptionError):
    """
    The server does not know the option (C{NBD_REP_ERR_UNSUP}).
    """


class NBDReplyError(NBDError):
    """
    The server failed a command.

    @ivar errno: the local errno value for the NBD error code (or the raw
        code if it is not one the NBD spec defines).
    @ivar message: the server's message (C{""} for simple replies).
    """

    def __init__(self, errno: int, message: str = ""):
        self.errno = errno
        self.message = message
        try:
            text = os.strerror(errno)
        except (ValueError, OverflowError):
            # A raw code from the server that is no C int.
            text = "Unknown error"
        if message:
            super().__init__(f"{message}: [Error {errno}] {text}")
        else:
            super().__init__(f"[Error {errno}] {text}")


class NBDConnectionLost(NBDError):
    """
    The connection ended before the request completed.
    """


class _Request:
    """
    A request waiting for its reply.

    @ivar buf: for reads into a caller's buffer, the memoryview the
        payload goes into; L{None} for reads that collect their payload.
    @ivar parts: for collecting reads, C{[(start, bytes-like)]}: the
        payload pieces as received (memoryviews of the received data, or
        zeroes for holes), joined into one C{bytes} when the reply is
        complete.
    @ivar pieces: for collecting reads, fire with the pieces in image
        order instead of joining them (L{NBDClient.readPieces}).
    @ivar received: payload bytes received so far (reads).
    @ivar extents: for block status, C{{context name: [(length, flags)]}}.
    @ivar error: the first error chunk (an L{NBDReplyError}) or L{None}.
    """

    __slots__ = ("handle", "cmd", "offset", "length", "deferred", "buf",
                 "parts", "pieces", "received", "extents", "error")

    def __init__(self, handle, cmd, offset, length, deferred, buf=None):
        self.handle = handle
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.deferred = deferred
        self.buf = buf
        self.parts = None
        self.pieces = False
        self.received = 0
        self.extents = None
        self.error = None


def _replyError(code: int, message: str = "") -> NBDReplyError:
    return NBDReplyError(ERRNO.get(code, code), message)


def _ordered(parts: list, length: int) -> list:
    """
    The payload pieces of a read in image order, without copying them.

    @param parts: as for L{_join}.
    @return: bytes-like objects whose concatenation is the payload (one
        joined C{bytes} if the pieces do not tile the range exactly).
    """
    ordered = sorted(parts, key=lambda part: part[0])
    pos = 0
    for start, piece in ordered:
        if start != pos:
            return [_join(parts, length)]
        pos += len(piece)
    if pos != length:
        return [_join(parts, length)]
    return [piece for _, piece in ordered]


def _join(parts: list, length: int) -> bytes:
    """
    Join the payload pieces of a read into C{length} bytes.

    @param parts: C{[(start, bytes-like)]}, not overlapping and covering
        C{[0, length)} (the reply parser checked the total); in order
        unless the server sent its chunks out of order.
    """
    if len(parts) == 1:
        piece = parts[0][1]
        return piece if isinstance(piece, bytes) else bytes(piece)
    pos = 0
    for start, piece in parts:
        if start != pos:
            break
        pos += len(piece)
    else:
        return b"".join(piece for _, piece in parts)
    buf = bytearray(length)
    for start, piece in parts:
        buf[start:start + len(piece)] = piece
    return bytes(buf)
