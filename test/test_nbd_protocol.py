# -*- test-case-name: test.test_nbd_protocol -*-
"""
Tests for L{imageio.protocols.nbd.NBDClient} without a real server: the
test plays the server, feeding bytes through a L{StringTransport}.
"""

from __future__ import annotations

import errno
import struct

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imageio.protocols import nbd
from imageio.protocols import nbdwire as wire
from imageio.protocols.nbd import (
    NBDClient, NBDConnectionLost, NBDOptionError, NBDOptionUnsupported,
    NBDProtocolError, NBDReplyError)

FLAGS = (wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH
         | wire.FLAG_SEND_WRITE_ZEROES | wire.FLAG_CAN_MULTI_CONN)
SIZE = 1 << 30


# Server side messages.

def greeting(flags=wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES,
             magic=wire.NBDMAGIC):
    return struct.pack("!QQH", magic, wire.IHAVEOPT, flags)


def optReply(option, rtype, payload=b""):
    return struct.pack("!QIII", wire.OPTION_REPLY_MAGIC, option, rtype,
                       len(payload)) + payload


def metaContext(option, cid, name):
    return optReply(option, wire.REP_META_CONTEXT,
                    struct.pack("!I", cid) + name.encode())


def infoExport(size=SIZE, flags=FLAGS):
    return optReply(wire.OPT_GO, wire.REP_INFO,
                    struct.pack("!HQH", wire.INFO_EXPORT, size, flags))


def infoBlockSize(mn=1, pref=4096, mx=32 << 20):
    return optReply(wire.OPT_GO, wire.REP_INFO,
                    struct.pack("!HIII", wire.INFO_BLOCK_SIZE, mn, pref, mx))


def goReplies(size=SIZE, flags=FLAGS, mx=32 << 20):
    return (infoExport(size, flags)
            # An info we do not know (NBD_INFO_NAME) is skipped.
            + optReply(wire.OPT_GO, wire.REP_INFO, struct.pack("!H", 1) + b"x")
            + infoBlockSize(mx=mx)
            + optReply(wire.OPT_GO, wire.REP_ACK))


def setMetaReplies(names=("base:allocation", "qemu:allocation-depth")):
    out = b""
    for cid, name in enumerate(names):
        out += metaContext(wire.OPT_SET_META_CONTEXT, cid, name)
    return out + optReply(wire.OPT_SET_META_CONTEXT, wire.REP_ACK)


def standardHandshake(mx=32 << 20, flags=FLAGS, size=SIZE):
    return (greeting()
            + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
            + setMetaReplies()
            + goReplies(mx=mx, flags=flags, size=size))


def simpleReply(handle, error=0, data=b""):
    return struct.pack("!IIQ", wire.SIMPLE_REPLY_MAGIC, error, handle) + data


def chunk(handle, rtype, payload=b"", done=False):
    return struct.pack("!IHHQI", wire.STRUCTURED_REPLY_MAGIC,
                       wire.REPLY_FLAG_DONE if done else 0, rtype, handle,
                       len(payload)) + payload


def dataChunk(handle, offset, data, done=False):
    return chunk(handle, wire.REPLY_TYPE_OFFSET_DATA,
                 struct.pack("!Q", offset) + data, done)


def holeChunk(handle, offset, size, done=False):
    return chunk(handle, wire.REPLY_TYPE_OFFSET_HOLE,
                 struct.pack("!QI", offset, size), done)


def noneChunk(handle):
    return chunk(handle, wire.REPLY_TYPE_NONE, done=True)


def statusChunk(handle, cid, extents, done=False):
    payload = struct.pack("!I", cid)
    for length, flags in extents:
        payload += struct.pack("!II", length, flags)
    return chunk(handle, wire.REPLY_TYPE_BLOCK_STATUS, payload, done)


def errorChunk(handle, code, message=b"", done=True, offset=None):
    payload = struct.pack("!IH", code, len(message)) + message
    rtype = wire.REPLY_TYPE_ERROR
    if offset is not None:
        payload += struct.pack("!Q", offset)
        rtype = wire.REPLY_TYPE_ERROR_OFFSET
    return chunk(handle, rtype, payload, done)


# Client side messages.

def parseOptions(data):
    """
    Split what the client wrote during the handshake.

    @return: (client flags, [(option, payload)])
    """
    (clientFlags,) = struct.unpack("!I", data[:4])
    pos = 4
    options = []
    while pos < len(data):
        magic, opt, length = struct.unpack("!QII", data[pos:pos + 16])
        assert magic == wire.IHAVEOPT
        pos += 16
        options.append((opt, data[pos:pos + length]))
        pos += length
    return clientFlags, options


def parseRequests(data):
    """
    @return: [(flags, type, handle, offset, length, payload)]
    """
    pos = 0
    out = []
    while pos < len(data):
        magic, flags, cmd, handle, offset, length = struct.unpack(
            "!IHHQQI", data[pos:pos + 28])
        assert magic == wire.REQUEST_MAGIC
        pos += 28
        payload = b""
        if cmd == wire.CMD_WRITE:
            payload = data[pos:pos + length]
            pos += length
        out.append((flags, cmd, handle, offset, length, payload))
    return out


def parseQuery(payload):
    (n,) = struct.unpack("!I", payload[:4])
    name = payload[4:4 + n].decode()
    pos = 4 + n
    (count,) = struct.unpack("!I", payload[pos:pos + 4])
    pos += 4
    queries = []
    for _ in range(count):
        (n,) = struct.unpack("!I", payload[pos:pos + 4])
        queries.append(payload[pos + 4:pos + 4 + n].decode())
        pos += 4 + n
    return name, queries


def feed(client, data, step=None):
    if step is None:
        client.dataReceived(data)
    else:
        for i in range(0, len(data), step):
            client.dataReceived(data[i:i + step])


def makeClient(exportName="", dirty=False):
    client = NBDClient(exportName, dirty)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


def disconnect(client, transport, reason=None):
    """
    What the reactor does after abortConnection/loseConnection.
    """
    client.connectionLost(Failure(reason or ConnectionDone()))


STEPS = [1, 2, 3, 7, 13, None]


class HandshakeTests(SynchronousTestCase):

    def assertAborted(self, client, transport, exc):
        f = self.failureResultOf(client.whenReady, exc)
        self.assertTrue(transport.disconnecting)
        disconnect(client, transport)
        return f

    def test_handshake_every_split(self):
        for step in STEPS:
            client, transport = makeClient("sda")
            feed(client, standardHandshake(mx=8 << 20), step)
            self.assertIs(self.successResultOf(client.whenReady), client)
            self.assertEqual(client.exportSize, SIZE)
            self.assertEqual(client.flags, FLAGS)
            self.assertEqual((client.minimumBlockSize,
                              client.preferredBlockSize,
                              client.maximumBlockSize), (1, 4096, 8 << 20))
            self.assertTrue(client.structuredReplies)
            self.assertEqual(client.metaContexts,
                             {"base:allocation": 0,
                              "qemu:allocation-depth": 1})
            self.assertTrue(client.canFlush)
            self.assertTrue(client.canZero)
            self.assertTrue(client.canMultiConn)
            self.assertFalse(client.readOnly)
            self.assertIsNone(client.dirtyBitmap)
            self.assertFalse(transport.disconnecting)

            clientFlags, options = parseOptions(transport.value())
            self.assertEqual(clientFlags, wire.FLAG_FIXED_NEWSTYLE
                             | wire.FLAG_NO_ZEROES)
            self.assertEqual([o for o, _ in options],
                             [wire.OPT_STRUCTURED_REPLY,
                              wire.OPT_SET_META_CONTEXT, wire.OPT_GO])
            self.assertEqual(parseQuery(options[1][1]),
                             ("sda", ["base:allocation",
                                      "qemu:allocation-depth"]))
            self.assertEqual(options[2][1], struct.pack(
                "!I3sHH", 3, b"sda", 1, wire.INFO_BLOCK_SIZE))

    def test_no_zeroes_not_offered(self):
        client, transport = makeClient()
        feed(client, greeting(flags=wire.FLAG_FIXED_NEWSTYLE))
        self.assertEqual(transport.value()[:4],
                         struct.pack("!I", wire.FLAG_FIXED_NEWSTYLE))

    def test_default_block_sizes(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies()
             + infoExport() + optReply(wire.OPT_GO, wire.REP_ACK))
        self.successResultOf(client.whenReady)
        self.assertEqual((client.minimumBlockSize, client.preferredBlockSize,
                          client.maximumBlockSize), (1, 4096, 32 << 20))

    def test_dirty_one_bitmap(self):
        client, transport = makeClient(dirty=True)
        names = ("base:allocation", "qemu:allocation-depth",
                 "qemu:dirty-bitmap:b0")
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + metaContext(wire.OPT_LIST_META_CONTEXT, 0,
                           "qemu:dirty-bitmap:b0")
             + optReply(wire.OPT_LIST_META_CONTEXT, wire.REP_ACK)
             + setMetaReplies(names) + goReplies(), 1)
        self.successResultOf(client.whenReady)
        self.assertEqual(client.dirtyBitmap, "qemu:dirty-bitmap:b0")
        self.assertEqual(client.metaContexts["qemu:dirty-bitmap:b0"], 2)
        _, options = parseOptions(transport.value())
        self.assertEqual([o for o, _ in options],
                         [wire.OPT_STRUCTURED_REPLY,
                          wire.OPT_LIST_META_CONTEXT,
                          wire.OPT_SET_META_CONTEXT, wire.OPT_GO])
        self.assertEqual(parseQuery(options[1][1]),
                         ("", ["qemu:dirty-bitmap:"]))
        self.assertEqual(parseQuery(options[2][1])[1], list(names))

    def test_dirty_two_bitmaps(self):
        client, transport = makeClient(dirty=True)
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + metaContext(wire.OPT_LIST_META_CONTEXT, 0,
                           "qemu:dirty-bitmap:b0")
             + metaContext(wire.OPT_LIST_META_CONTEXT, 0,
                           "qemu:dirty-bitmap:b1")
             + optReply(wire.OPT_LIST_META_CONTEXT, wire.REP_ACK)
             + setMetaReplies() + goReplies())
        self.successResultOf(client.whenReady)
        self.assertIsNone(client.dirtyBitmap)
        _, options = parseOptions(transport.value())
        self.assertEqual(parseQuery(options[2][1])[1],
                         ["base:allocation", "qemu:allocation-depth"])

    def test_dirty_list_unsupported(self):
        client, transport = makeClient(dirty=True)
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + optReply(wire.OPT_LIST_META_CONTEXT, wire.REP_ERR_UNSUP)
             + optReply(wire.OPT_SET_META_CONTEXT, wire.REP_ERR_UNSUP)
             + goReplies())
        self.successResultOf(client.whenReady)
        self.assertIsNone(client.dirtyBitmap)
        self.assertEqual(client.metaContexts, {})
        self.assertFalse(client.hasBaseAllocation)

    def test_structured_unsupported(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ERR_UNSUP,
                        b"no structured replies here")
             + goReplies(), 1)
        self.successResultOf(client.whenReady)
        self.assertFalse(client.structuredReplies)
        self.assertEqual(client.metaContexts, {})
        _, options = parseOptions(transport.value())
        self.assertEqual([o for o, _ in options],
                         [wire.OPT_STRUCTURED_REPLY, wire.OPT_GO])

    def test_structured_other_error(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ERR_POLICY))
        f = self.assertAborted(client, transport, NBDOptionError)
        self.assertIn("NBD_OPT_STRUCTURED_REPLY", str(f.value))
        self.assertIn("forbidden by server policy", str(f.value))

    def test_go_unknown_export_message(self):
        client, transport = makeClient("nope")
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies()
             + optReply(wire.OPT_GO, wire.REP_ERR_UNKNOWN, b"export 'nope' not"
                        b" present"), 1)
        f = self.assertAborted(client, transport, NBDOptionError)
        self.assertEqual(f.value.code, wire.REP_ERR_UNKNOWN)
        self.assertEqual(f.value.option, wire.OPT_GO)
        self.assertEqual(f.value.message, "export 'nope' not present")
        self.assertIn("NBD_OPT_GO failed: export 'nope' not present",
                      str(f.value))

    def test_go_error_builtin_text(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies()
             + optReply(wire.OPT_GO, wire.REP_ERR_TLS_REQD))
        f = self.assertAborted(client, transport, NBDOptionError)
        self.assertEqual(f.value.message, "server requires TLS")

    def test_go_unsupported(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies()
             + optReply(wire.OPT_GO, wire.REP_ERR_UNSUP))
        self.assertAborted(client, transport, NBDOptionUnsupported)

    def test_go_without_export_info(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies() + optReply(wire.OPT_GO, wire.REP_ACK))
        self.assertAborted(client, transport, NBDProtocolError)

    def test_bad_info_length(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies()
             + optReply(wire.OPT_GO, wire.REP_INFO,
                        struct.pack("!HQ", wire.INFO_EXPORT, 1)))
        self.assertAborted(client, transport, NBDProtocolError)

    def test_unexpected_meta_context(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + metaContext(wire.OPT_SET_META_CONTEXT, 5, "evil:context"))
        f = self.assertAborted(client, transport, NBDProtocolError)
        self.assertIn("evil:context", str(f.value))

    def test_missing_meta_context(self):
        client, transport = makeClient()
        feed(client, greeting()
             + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
             + setMetaReplies(["base:allocation"]) + goReplies())
        self.successResultOf(client.whenReady)
        self.assertTrue(client.hasBaseAllocation)
        self.assertFalse(client.hasAllocationDepth)

    def test_reply_for_other_option(self):
        client, transport = makeClient()
        feed(client, greeting() + optReply(wire.OPT_GO, wire.REP_ACK))
        self.assertAborted(client, transport, NBDProtocolError)

    def test_bad_option_reply_magic(self):
        client, transport = makeClient()
        feed(client, greeting() + b"\0" * 20)
        self.assertAborted(client, transport, NBDProtocolError)

    def test_bad_magic(self):
        client, transport = makeClient()
        feed(client, greeting(magic=0x1234))
        self.assertAborted(client, transport, NBDProtocolError)

    def test_oldstyle_server(self):
        client, transport = makeClient()
        feed(client, struct.pack("!QQ", wire.NBDMAGIC, 0x00420281861253)
             + b"\0" * 10)
        f = self.assertAborted(client, transport, NBDProtocolError)
        self.assertIn("newstyle", str(f.value))

    def test_not_fixed_newstyle(self):
        client, transport = makeClient()
        feed(client, greeting(flags=0))
        f = self.assertAborted(client, transport, NBDProtocolError)
        self.assertIn("fixed newstyle", str(f.value))
        self.assertEqual(transport.value(), b"")

    def test_option_reply_too_long(self):
        client, transport = makeClient()
        feed(client, greeting() + struct.pack(
            "!QIII", wire.OPTION_REPLY_MAGIC, wire.OPT_STRUCTURED_REPLY,
            wire.REP_ACK, 1 << 30))
        self.assertAborted(client, transport, NBDProtocolError)

    def test_closed_during_handshake(self):
        client, transport = makeClient()
        feed(client, greeting()[:10])
        disconnect(client, transport)
        self.failureResultOf(client.whenReady, NBDConnectionLost)

    def test_commands_before_ready(self):
        client, transport = makeClient()
        self.failureResultOf(client.read(0, 10), nbd.NBDError)

    def test_close_during_handshake_aborts_option(self):
        client, transport = makeClient()
        feed(client, greeting())
        transport.clear()
        d = client.close()
        self.assertEqual(transport.value(), struct.pack(
            "!QII", wire.IHAVEOPT, wire.OPT_ABORT, 0))
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        disconnect(client, transport)
        self.successResultOf(d)
        self.failureResultOf(client.whenReady, NBDConnectionLost)


def readyClient(structured=True, mx=32 << 20, flags=FLAGS, size=SIZE,
                names=("base:allocation", "qemu:allocation-depth")):
    client, transport = makeClient()
    if structured:
        data = (greeting()
                + optReply(wire.OPT_STRUCTURED_REPLY, wire.REP_ACK)
                + setMetaReplies(names))
    else:
        data = greeting() + optReply(wire.OPT_STRUCTURED_REPLY,
                                     wire.REP_ERR_UNSUP)
    client.dataReceived(data + goReplies(size=size, flags=flags, mx=mx))
    assert client.whenReady.called
    transport.clear()
    return client, transport


class TransmissionTests(SynchronousTestCase):

    def test_read_simple_reply(self):
        for step in STEPS:
            client, transport = readyClient(structured=False)
            d = client.read(4096, 100)
            [(flags, cmd, handle, offset, length, _)] = parseRequests(
                transport.value())
            self.assertEqual((flags, cmd, offset, length),
                             (0, wire.CMD_READ, 4096, 100))
            feed(client, simpleReply(handle, data=bytes(range(100))), step)
            self.assertEqual(self.successResultOf(d), bytes(range(100)))

    def test_simple_reply_error(self):
        client, transport = readyClient(structured=False)
        d = client.read(0, 10)
        [req] = parseRequests(transport.value())
        feed(client, simpleReply(req[2], error=5), 1)
        f = self.failureResultOf(d, NBDReplyError)
        self.assertEqual(f.value.errno, errno.EIO)
        self.assertEqual(str(f.value), "[Error 5] Input/output error")
        # The connection is still usable.
        d = client.read(0, 3)
        req = parseRequests(transport.value())[-1]
        feed(client, simpleReply(req[2], data=b"abc"))
        self.assertEqual(self.successResultOf(d), b"abc")

    def test_simple_reply_to_read_when_structured(self):
        client, transport = readyClient()
        d = client.read(0, 3)
        [req] = parseRequests(transport.value())
        feed(client, simpleReply(req[2], data=b"abc"))
        self.assertTrue(transport.disconnecting)
        disconnect(client, transport)
        self.failureResultOf(d, NBDProtocolError)

    def test_structured_read_every_split(self):
        data = bytes(range(256)) * 16
        for step in STEPS:
            client, transport = readyClient()
            d = client.read(1 << 20, 8192)
            [req] = parseRequests(transport.value())
            h = req[2]
            stream = (dataChunk(h, (1 << 20) + 4096, data)
                      + holeChunk(h, (1 << 20) + 1024, 3072)
                      + dataChunk(h, 1 << 20, data[:1024])
                      + noneChunk(h))
            feed(client, stream, step)
            self.assertEqual(self.successResultOf(d),
                             data[:1024] + bytes(3072) + data)

    def test_structured_read_done_on_data(self):
        client, transport = readyClient()
        d = client.read(0, 10)
        [req] = parseRequests(transport.value())
        feed(client, dataChunk(req[2], 0, b"0123456789", done=True))
        self.assertEqual(self.successResultOf(d), b"0123456789")

    def test_read_split_by_max_block_size(self):
        client, transport = readyClient(mx=4096)
        d = client.read(100, 10000)
        reqs = parseRequests(transport.value())
        self.assertEqual([(r[1], r[3], r[4]) for r in reqs],
                         [(wire.CMD_READ, 100, 4096),
                          (wire.CMD_READ, 4196, 4096),
                          (wire.CMD_READ, 8292, 1808)])
        payload = bytes(i % 251 for i in range(10000))
        # Answer in reverse order.
        for _, _, h, off, n, _ in reversed(reqs):
            feed(client, dataChunk(h, off, payload[off - 100:off - 100 + n],
                                   done=True), 5)
        self.assertEqual(self.successResultOf(d), payload)

    def test_read_split_failure(self):
        client, transport = readyClient(mx=4096)
        d = client.read(0, 8192)
        reqs = parseRequests(transport.value())
        feed(client, dataChunk(reqs[0][2], 0, bytes(4096), done=True))
        feed(client, errorChunk(reqs[1][2], 22, b"bad"))
        f = self.failureResultOf(d, NBDReplyError)
        self.assertEqual(f.value.errno, errno.EINVAL)

    def test_read_into(self):
        client, transport = readyClient()
        buf = bytearray(8)
        d = client.readInto(16, memoryview(buf)[2:6])
        [req] = parseRequests(transport.value())
        self.assertEqual(req[3:5], (16, 4))
        feed(client, dataChunk(req[2], 16, b"abcd", done=True))
        self.successResultOf(d)
        self.assertEqual(buf, b"\0\0abcd\0\0")

    def test_read_pieces(self):
        """
        readPieces gives the payload as it arrived, in image order, holes
        as zeroes, without joining: the same bytes as read.
        """
        data = bytes(range(256)) * 16
        for step in STEPS:
            client, transport = readyClient()
            d = client.readPieces(1 << 20, 8192)
            [req] = parseRequests(transport.value())
            self.assertEqual(req[1:5][0], wire.CMD_READ)
            h = req[2]
            stream = (dataChunk(h, (1 << 20) + 4096, data)
                      + holeChunk(h, (1 << 20) + 1024, 3072)
                      + dataChunk(h, 1 << 20, data[:1024])
                      + noneChunk(h))
            feed(client, stream, step)
            pieces = self.successResultOf(d)
            self.assertIsInstance(pieces, list)
            self.assertEqual(b"".join(bytes(p) for p in pieces),
                             data[:1024] + bytes(3072) + data)
            if step == len(stream):
                # One dataReceived: each chunk is one piece, not a copy.
                self.assertEqual(len(pieces), 3)
                self.assertIsInstance(pieces[0], memoryview)

    def test_read_pieces_simple_reply(self):
        client, transport = readyClient(structured=False)
        d = client.readPieces(0, 100)
        [req] = parseRequests(transport.value())
        feed(client, simpleReply(req[2], data=bytes(range(100))), 7)
        pieces = self.successResultOf(d)
        self.assertEqual(len(pieces), 15)
        self.assertEqual(b"".join(pieces), bytes(range(100)))

    def test_read_pieces_overlapping_chunks_joined(self):
        # A server sending overlapping chunks (against the spec) still
        # gives the bytes read() would: one joined piece.
        client, transport = readyClient()
        d = client.readPieces(0, 8)
        [req] = parseRequests(transport.value())
        h = req[2]
        feed(client, dataChunk(h, 0, b"abcd") + dataChunk(h, 2, b"XY")
             + dataChunk(h, 6, b"gh", done=True))
        self.assertEqual(self.successResultOf(d), [b"abXY\0\0gh"])

    def test_read_pieces_limits(self):
        client, transport = readyClient(mx=4096)
        self.assertEqual(self.successResultOf(client.readPieces(0, 0)), [])
        self.failureResultOf(client.readPieces(0, 4097), ValueError)
        self.assertEqual(transport.value(), b"")
        d = client.readPieces(0, 16)
        [req] = parseRequests(transport.value())
        feed(client, errorChunk(req[2], 5, b"broken"))
        self.failureResultOf(d, NBDReplyError)

    def test_read_empty(self):
        client, transport = readyClient()
        self.assertEqual(self.successResultOf(client.read(0, 0)), b"")
        self.assertEqual(transport.value(), b"")

    def test_pipelined_out_of_order(self):
        for step in STEPS:
            client, transport = readyClient()
            ds = [client.read(i * 100, 100) for i in range(5)]
            st = client.blockStatus(0, 1 << 20)
            fl = client.flush()
            reqs = parseRequests(transport.value())
            self.assertEqual(len({r[2] for r in reqs}), 7)
            self.assertEqual(client.inFlight, 7)
            stream = b""
            # Interleave: chunks of different requests mixed, out of order.
            stream += dataChunk(reqs[3][2], 300, b"d" * 50)
            stream += simpleReply(reqs[6][2])
            stream += dataChunk(reqs[1][2], 100, b"b" * 100, done=True)
            stream += statusChunk(reqs[5][2], 0, [(4096, 0), (4096, 3)])
            stream += dataChunk(reqs[3][2], 350, b"D" * 50, done=True)
            stream += holeChunk(reqs[0][2], 0, 100, done=True)
            stream += statusChunk(reqs[5][2], 1, [(1 << 20, 1)], done=True)
            stream += dataChunk(reqs[4][2], 400, b"e" * 100, done=True)
            stream += dataChunk(reqs[2][2], 200, b"c" * 100, done=True)
            feed(client, stream, step)
            results = [self.successResultOf(d) for d in ds]
            self.assertEqual(results, [bytes(100), b"b" * 100, b"c" * 100,
                                       b"d" * 50 + b"D" * 50, b"e" * 100])
            self.assertEqual(self.successResultOf(st), {
                "base:allocation": [(4096, 0), (4096, 3)],
                "qemu:allocation-depth": [(1 << 20, 1)]})
            self.assertIsNone(self.successResultOf(fl))
            self.assertEqual(client.inFlight, 0)

    def test_block_status_request(self):
        client, transport = readyClient()
        client.blockStatus(512, 2 << 30)
        [req] = parseRequests(transport.value())
        self.assertEqual((req[0], req[1], req[3], req[4]),
                         (0, wire.CMD_BLOCK_STATUS, 512, 2 << 30))

    def test_block_status_without_contexts(self):
        client, transport = readyClient(structured=False)
        self.failureResultOf(client.blockStatus(0, 10), nbd.NBDError)

    def test_block_status_invalid_length(self):
        client, transport = readyClient()
        self.failureResultOf(client.blockStatus(0, 0), ValueError)
        self.failureResultOf(client.blockStatus(0, 1 << 32), ValueError)

    def test_block_status_unknown_context(self):
        client, transport = readyClient()
        d = client.blockStatus(0, 4096)
        [req] = parseRequests(transport.value())
        feed(client, statusChunk(req[2], 7, [(4096, 0)], done=True))
        self.assertTrue(transport.disconnecting)
        disconnect(client, transport)
        self.failureResultOf(d, NBDProtocolError)

    def test_block_status_bad_payload(self):
        for payload in [b"\0\0\0\0", b"\0" * 8, b"\0" * 13,
                        struct.pack("!III", 0, 0, 0)]:
            client, transport = readyClient()
            d = client.blockStatus(0, 4096)
            [req] = parseRequests(transport.value())
            feed(client, chunk(req[2], wire.REPLY_TYPE_BLOCK_STATUS, payload,
                               done=True))
            self.assertTrue(transport.disconnecting)
            disconnect(client, transport)
            self.failureResultOf(d, NBDProtocolError)

    def test_error_chunk(self):
        for step in STEPS:
            client, transport = readyClient()
            d = client.read(0, 10)
            [req] = parseRequests(transport.value())
            feed(client, errorChunk(req[2], 5, b"disk on fire"), step)
            f = self.failureResultOf(d, NBDReplyError)
            self.assertEqual(f.value.errno, errno.EIO)
            self.assertEqual(f.value.message, "disk on fire")
            self.assertEqual(str(f.value),
                             "disk on fire: [Error 5] Input/output error")
            self.assertFalse(transport.disconnecting)

    def test_error_offset_then_done(self):
        client, transport = readyClient()
        d = client.read(0, 8192)
        [req] = parseRequests(transport.value())
        h = req[2]
        feed(client, dataChunk(h, 0, b"x" * 4096)
             + errorChunk(h, 5, b"bad sector", done=False, offset=4096)
             + errorChunk(h, 28, b"later", done=False, offset=6000)
             + noneChunk(h), 3)
        f = self.failureResultOf(d, NBDReplyError)
        self.assertEqual((f.value.errno, f.value.message),
                         (errno.EIO, "bad sector"))

    def test_unknown_error_type(self):
        client, transport = readyClient()
        d = client.flush()
        [req] = parseRequests(transport.value())
        feed(client, chunk(req[2], wire.REPLY_TYPE_ERROR_BIT + 99,
                           struct.pack("!IH", 1, 0), done=True))
        self.assertEqual(self.failureResultOf(d, NBDReplyError).value.errno,
                         errno.EPERM)

    def test_errno_mapping(self):
        cases = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM,
                 22: errno.EINVAL, 28: errno.ENOSPC, 75: errno.EOVERFLOW,
                 108: errno.ESHUTDOWN, 95: errno.EOPNOTSUPP}
        for code, expected in cases.items():
            for structured in (True, False):
                client, transport = readyClient(structured=structured)
                d = client.write(0, b"x")
                [req] = parseRequests(transport.value())
                if structured:
                    feed(client, errorChunk(req[2], code))
                else:
                    feed(client, simpleReply(req[2], error=code))
                f = self.failureResultOf(d, NBDReplyError)
                self.assertEqual(f.value.errno, expected)
                self.assertIn(f"[Error {expected}]", str(f.value))

    def test_bad_error_chunks(self):
        bad = [
            chunk(0, wire.REPLY_TYPE_ERROR, b"\0\0\0\5\0", done=True),
            chunk(0, wire.REPLY_TYPE_ERROR, struct.pack("!IH", 5, 10) + b"x",
                  done=True),
            chunk(0, wire.REPLY_TYPE_ERROR, struct.pack("!IH", 0, 0),
                  done=True),
            chunk(0, wire.REPLY_TYPE_ERROR_OFFSET, struct.pack("!IH", 5, 0),
                  done=True),
        ]
        for stream in bad:
            client, transport = readyClient()
            d = client.flush()
            feed(client, stream)
            self.assertTrue(transport.disconnecting)
            disconnect(client, transport)
            self.failureResultOf(d, NBDProtocolError)

    def test_protocol_errors_in_replies(self):
        cases = [
            # Unknown handle.
            lambda h: dataChunk(h + 1, 0, b"x" * 10, done=True),
            lambda h: simpleReply(h + 1),
            # Bad magic.
            lambda h: b"\xde\xad\xbe\xef" + b"\0" * 28,
            # Data outside the request.
            lambda h: dataChunk(h, 5, b"x" * 10, done=True),
            lambda h: holeChunk(h, 8, 4, done=True),
            lambda h: holeChunk(h, 0, 0, done=True),
            # Data chunk without data.
            lambda h: chunk(h, wire.REPLY_TYPE_OFFSET_DATA,
                            struct.pack("!Q", 0), done=True),
            # Short read: DONE before all data arrived.
            lambda h: dataChunk(h, 0, b"x" * 5, done=True),
            # NONE without DONE, NONE with payload.
            lambda h: chunk(h, wire.REPLY_TYPE_NONE),
            lambda h: chunk(h, wire.REPLY_TYPE_NONE, b"x", done=True),
            # Unknown non-error chunk type.
            lambda h: chunk(h, 77, b"", done=True),
            # Block status for a read.
            lambda h: statusChunk(h, 0, [(10, 0)], done=True),
            # Huge chunk.
            lambda h: struct.pack("!IHHQI", wire.STRUCTURED_REPLY_MAGIC, 1,
                                  wire.REPLY_TYPE_BLOCK_STATUS, h, 1 << 31),
        ]
        for make in cases:
            client, transport = readyClient()
            d1 = client.read(0, 10)
            d2 = client.read(100, 10)
            h = parseRequests(transport.value())[0][2]
            feed(client, make(h))
            self.assertTrue(transport.disconnecting, make(h))
            # Nothing more is parsed after the error.
            client.dataReceived(dataChunk(h, 0, b"y" * 10, done=True))
            disconnect(client, transport)
            self.failureResultOf(d1, NBDProtocolError)
            self.failureResultOf(d2, NBDProtocolError)
            self.failureResultOf(client.read(0, 1), NBDProtocolError)

    def test_connection_lost_mid_reply(self):
        stream_parts = None
        for cut in range(1, 88):
            client, transport = readyClient()
            d1 = client.read(0, 16)
            d2 = client.write(0, b"data")
            d3 = client.read(16, 16)
            reqs = parseRequests(transport.value())
            stream_parts = (dataChunk(reqs[0][2], 0, b"a" * 16, done=True)
                            + dataChunk(reqs[2][2], 16, b"b" * 16, done=True))
            feed(client, stream_parts[:cut], 1)
            disconnect(client, transport)
            self.assertEqual(client.inFlight, 0)
            if cut >= 44:
                self.successResultOf(d1)
            else:
                f = self.failureResultOf(d1, NBDConnectionLost)
                self.assertIn("requests in flight", str(f.value))
            self.failureResultOf(d2, NBDConnectionLost)
            self.failureResultOf(d3, NBDConnectionLost)
            self.failureResultOf(client.read(0, 1), NBDConnectionLost)

    def test_write(self):
        client, transport = readyClient()
        d = client.write(4096, bytearray(b"hello"))
        [req] = parseRequests(transport.value())
        self.assertEqual((req[0], req[1], req[3], req[4], req[5]),
                         (0, wire.CMD_WRITE, 4096, 5, b"hello"))
        feed(client, simpleReply(req[2]))
        self.assertIsNone(self.successResultOf(d))

    def test_write_split(self):
        client, transport = readyClient(mx=4)
        data = memoryview(b"0123456789")
        d = client.write(10, data)
        reqs = parseRequests(transport.value())
        self.assertEqual([(r[3], r[4], r[5]) for r in reqs],
                         [(10, 4, b"0123"), (14, 4, b"4567"), (18, 2, b"89")])
        for r in reqs:
            self.assertNoResult(d)
            feed(client, chunk(r[2], wire.REPLY_TYPE_NONE, done=True))
        self.assertIsNone(self.successResultOf(d))

    def test_write_empty(self):
        client, transport = readyClient()
        self.successResultOf(client.write(0, b""))
        self.assertEqual(transport.value(), b"")

    def test_zero(self):
        for noHole, flags in [(False, 0), (True, wire.CMD_FLAG_NO_HOLE)]:
            client, transport = readyClient()
            d = client.zero(0, 1 << 20, noHole=noHole)
            [req] = parseRequests(transport.value())
            self.assertEqual(req[:2], (flags, wire.CMD_WRITE_ZEROES))
            self.assertEqual(req[3:5], (0, 1 << 20))
            feed(client, noneChunk(req[2]))
            self.successResultOf(d)

    def test_zero_steps(self):
        client, transport = readyClient(size=8 << 30)
        d = client.zero(512, (5 << 29) + 100)
        reqs = parseRequests(transport.value())
        self.assertEqual([(r[3], r[4]) for r in reqs],
                         [(512, 1 << 30), (512 + (1 << 30), 1 << 30),
                          (512 + (2 << 30), (1 << 29) + 100)])
        for r in reqs:
            feed(client, simpleReply(r[2]))
        self.successResultOf(d)

    def test_zero_unsupported(self):
        client, transport = readyClient(flags=wire.FLAG_HAS_FLAGS)
        self.assertFalse(client.canZero)
        self.failureResultOf(client.zero(0, 10), nbd.NBDError)
        self.assertEqual(transport.value(), b"")

    def test_flush(self):
        client, transport = readyClient()
        d = client.flush()
        [req] = parseRequests(transport.value())
        self.assertEqual(req[1], wire.CMD_FLUSH)
        feed(client, noneChunk(req[2]))
        self.successResultOf(d)

    def test_flush_not_advertised(self):
        client, transport = readyClient(flags=wire.FLAG_HAS_FLAGS
                                        | wire.FLAG_READ_ONLY)
        self.assertTrue(client.readOnly)
        self.assertFalse(client.canFlush)
        self.successResultOf(client.flush())
        self.assertEqual(transport.value(), b"")

    def test_close(self):
        client, transport = readyClient()
        d = client.read(0, 1)
        transport.clear()
        c1 = client.close()
        c2 = client.close()
        [req] = parseRequests(transport.value())
        self.assertEqual(req[1], wire.CMD_DISC)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(c1)
        self.failureResultOf(client.read(0, 1), NBDConnectionLost)
        disconnect(client, transport)
        self.successResultOf(c1)
        self.successResultOf(c2)
        self.successResultOf(client.close())
        self.failureResultOf(d, NBDConnectionLost)

    def test_cancel_aborts(self):
        client, transport = readyClient()
        d1 = client.read(0, 1)
        d2 = client.read(1, 1)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertTrue(transport.disconnecting)
        disconnect(client, transport)
        self.failureResultOf(d2, CancelledError)

    def test_handles_unique(self):
        client, transport = readyClient()
        for _ in range(100):
            client.read(0, 1)
        reqs = parseRequests(transport.value())
        self.assertEqual(len({r[2] for r in reqs}), 100)


class ConnectTests(SynchronousTestCase):

    def test_connect_bad_url(self):
        from twisted.internet.testing import MemoryReactor
        self.failureResultOf(nbd.connect(MemoryReactor(), "nbd:bad"),
                             ValueError)

    def test_connect_unix(self):
        from twisted.internet.testing import MemoryReactor
        reactor = MemoryReactor()
        d = nbd.connect(reactor, "nbd:unix:/tmp/x.sock:exportname=e",
                        dirty=True)
        path, factory = reactor.unixClients[0][:2]
        self.assertEqual(path, "/tmp/x.sock")
        proto = factory.buildProtocol(None)
        proto = getattr(proto, "_wrappedProtocol", proto)
        self.assertEqual((proto.exportName, proto.dirty), ("e", True))
        self.assertNoResult(d)


@pytest.mark.parametrize("code", [1, 5, 12, 22, 28, 75, 108, 4242])
def test_reply_error_text(code):
    e = wire._replyError(code, "msg")
    assert str(e).startswith("msg: [Error ")
    assert e.message == "msg"


class HandshakeTimeoutTests(SynchronousTestCase):

    def test_handshake_timeout(self):
        from twisted.internet.testing import MemoryReactorClock
        reactor = MemoryReactorClock()
        d = nbd.connect(reactor, "nbd:unix:/tmp/x.sock", timeout=5)
        factory = reactor.unixClients[0][1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertNoResult(d)
        reactor.advance(4)
        self.assertNoResult(d)
        reactor.advance(1)
        f = self.failureResultOf(d, nbd.NBDError)
        self.assertIn("timed out", str(f.value))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])
