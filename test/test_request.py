"""
The streaming request and the images channel (imageio.web.request), driven
in memory: C{site.buildProtocol(None)} over a L{StringTransport}, with the
real Images resource, a TicketStore on a fake clock and memory backends.

The C{PrivateAPITests} guard every private Twisted attribute the module
relies on: if a Twisted upgrade changes one, they fail here, loudly.
"""

from __future__ import annotations

import inspect

from twisted.internet import abstract, defer, tcp
from twisted.internet.testing import MemoryReactorClock, StringTransport

from imageio.backends.memory import MemoryBackend
from imageio.config import Config
from imageio.tickets import TicketStore
from imageio.units import MiB
from imageio.web.http import Root, makeSite
from imageio.web.images import Images
from imageio.web.request import (
    MAX_BUFFERED_BODY, PLAIN_RECEIVE_SIZE, ImageioChannel, StreamingRequest)


class Env:
    def __init__(self, size=64 * MiB, hold=()):
        self.reactor = MemoryReactorClock()
        self.store = TicketStore(self.reactor)
        self.image = bytearray(size)
        self.backends = []
        self.hold = hold
        self.store.add({"uuid": "t", "size": size, "ops": ["write"],
                        "timeout": 300, "url": "file:///x",
                        "inactivity_timeout": 1234})
        root = Root()
        root.putChild(b"images", Images(
            self.store, Config(), self.reactor, None,
            openBackend=self.open))
        self.site = makeSite(root, reactor=self.reactor,
                             requestFactory=StreamingRequest,
                             channelFactory=ImageioChannel)

    def open(self, reactor, url, **kw):
        b = MemoryBackend(data=self.image, mode=kw["mode"])
        for op in self.hold:
            b.hold(op)
        self.backends.append(b)
        return defer.succeed(b)

    def connect(self):
        proto = self.site.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


def status(transport):
    return transport.value().split(b"\r\n", 1)[0]


def test_body_streams_before_end():
    env = Env(hold=("write",))
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 12582912\r\n\r\n")
    proto.dataReceived(b"a" * (5 * MiB))
    # The body did not end, yet a backend write of the first bytes started.
    assert env.backends[0].pending == 1
    assert t.value() == b""
    env.backends[0].release()
    proto.dataReceived(b"b" * (7 * MiB))
    assert status(t) == b"HTTP/1.1 200 OK"
    assert bytes(env.image[:5 * MiB]) == b"a" * (5 * MiB)
    assert bytes(env.image[5 * MiB:12 * MiB]) == b"b" * (7 * MiB)
    assert b"content-length: 0" in t.value().lower()


def test_backpressure():
    env = Env(hold=("write",))
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 33554432\r\n\r\n")
    for _ in range(9):
        proto.dataReceived(b"x" * MiB)
    assert t.producerState == "paused"
    b = env.backends[0]
    # One 4 MiB write in flight, 5 MiB buffered: nothing more was read.
    assert b.pending == 1
    b.release()
    assert t.producerState == "producing"
    for _ in range(23):
        proto.dataReceived(b"x" * MiB)
    assert status(t) == b"HTTP/1.1 200 OK"


def test_chunked():
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\n")
    proto.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    assert status(t) == b"HTTP/1.1 200 OK"
    assert bytes(env.image[:5]) == b"abcde"


def test_early_error_mid_body():
    env = Env(size=64 * MiB, hold=("write",))
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 33554432\r\n\r\n")
    proto.dataReceived(b"x" * (6 * MiB))
    b = env.backends[0]
    waiting, b._waiting = b._waiting, []
    for d, _ in waiting:
        d.errback(RuntimeError("boom"))
    # Not answered from inside the failure: on the next reactor turn.
    assert t.value() == b""
    assert t.producerState == "producing"
    env.reactor.advance(0)
    assert status(t) == b"HTTP/1.1 500 Internal Server Error"
    assert b"connection: close" in t.value().lower()
    assert t.disconnecting
    # The rest of the body is dropped, no second response, no traceback.
    t.clear()
    proto.dataReceived(b"x" * (26 * MiB))
    assert t.value() == b""
    env.reactor.advance(ImageioChannel.LINGER)
    proto.connectionLost(None)


def test_error_when_body_ends_in_same_read():
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/nope HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 3\r\n\r\nabc"
                       b"GET /images/t/checksum/algorithms HTTP/1.1\r\n"
                       b"Host: x\r\n\r\n")
    env.reactor.advance(0)
    assert status(t) == b"HTTP/1.1 403 Forbidden"
    assert t.value().count(b"HTTP/1.1") == 1


def test_expect_continue():
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert t.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    proto.dataReceived(b"abc")
    assert t.value().count(b"100 Continue") == 1
    assert t.value().split(b"\r\n\r\n")[1].startswith(b"HTTP/1.1 200")


def test_expect_continue_refused():
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"PUT /images/nope HTTP/1.1\r\nHost: x\r\n"
                       b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    env.reactor.advance(0)
    value = t.value()
    assert value.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 ")
    assert value.count(b"100 Continue") == 1
    assert t.disconnecting


def test_buffered_body_cap():
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"PATCH /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: %d\r\n\r\n" % (MAX_BUFFERED_BODY + 1))
    env.reactor.advance(0)
    assert status(t) == b"HTTP/1.1 413 Request Entity Too Large"
    proto, t = env.connect()
    proto.dataReceived(b"PATCH /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        proto.dataReceived(b"8000\r\n" + b" " * 0x8000 + b"\r\n")
    env.reactor.advance(0)
    assert status(t) == b"HTTP/1.1 413 Request Entity Too Large"


def test_patch_buffered():
    env = Env()
    proto, t = env.connect()
    body = b'{"op": "zero", "size": 10}'
    env.image[:10] = b"z" * 10
    proto.dataReceived(b"PATCH /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert status(t) == b"HTTP/1.1 200 OK"
    assert env.image[:10] == bytes(10)


def test_idle_timeout_becomes_ticket_inactivity():
    env = Env()
    proto, t = env.connect()
    assert proto.timeOut == 60
    proto.dataReceived(b"OPTIONS /images/t HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(t) == b"HTTP/1.1 200 OK"
    assert proto.timeOut == 1234
    ticket = env.store.get("t")
    assert ticket.connections == 1
    proto.connectionLost(None)
    assert ticket.connections == 0
    assert env.backends[0].closed


def test_cancel_closes_context():
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"OPTIONS /images/t HTTP/1.1\r\nHost: x\r\n\r\n")
    d = env.store.remove("t", 10)
    assert d.called
    assert env.backends[0].closed
    t.clear()
    proto.dataReceived(b"GET /images/t HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(t) == b"HTTP/1.1 403 Forbidden"


def test_receive_size():
    env = Env()
    proto = env.site.buildProtocol(None)

    class Transport(StringTransport):
        bufferSize = 65536
    t = Transport()
    proto.makeConnection(t)
    proto.dataReceived(b"PUT /images/t HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 10\r\n\r\n")
    # A plain connection (TLS: test_upload_fast.test_receive_size_tls).
    assert t.bufferSize == PLAIN_RECEIVE_SIZE


def test_bufferSize():
    # FileDescriptor.bufferSize is the recv size of TCP and UNIX reads.
    assert abstract.FileDescriptor.bufferSize == 2 ** 16
    assert "self.bufferSize" in inspect.getsource(tcp.Connection.doRead)


def test_callLater_on_channel():
    # HTTPFactory.buildProtocol gives the channel the site reactor's
    # callLater (used for the lingering close).
    reactor = MemoryReactorClock()
    site = makeSite(Root(), reactor=reactor, channelFactory=ImageioChannel)
    proto = site.buildProtocol(None)
    assert proto.callLater == reactor.callLater

