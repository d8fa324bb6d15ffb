"""
The control API and the images API sharing one ticket store, over real
sockets: cancellation of a ticket whose transfer is in flight (SPEC B §2
cancel, C §2.1: 409 after remove_timeout, then a retried DELETE works).

The store's clock is a task.Clock, so remove_timeout passes when the test
says so, not by sleeping.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from imageio.backends.memory import MemoryBackend
from imageio.config import Config
from imageio.tickets import TicketStore
from imageio.units import MiB
from imageio.web.http import Root, makeSite
from imageio.web.images import Images
from imageio.web.request import ImageioChannel, StreamingRequest
from imageio.web.tickets import Tickets
from test.test_images import connect, request

REMOVE_TIMEOUT = 60


class Servers:
    """
    An images site and a control site on 127.0.0.1, one store.
    """

    def __init__(self):
        self.clock = task.Clock()
        self.store = TicketStore(self.clock)
        self.backends = []
        self.data = bytearray(b"x" * (8 * MiB))
        images = Root()
        images.putChild(b"images", Images(
            self.store, Config().replace("local", enable=False), reactor,
            None, openBackend=self.openBackend))
        control = Root()
        control.putChild(b"tickets", Tickets(self.store, REMOVE_TIMEOUT))
        self.imagesPort = reactor.listenTCP(0, makeSite(
            images, reactor=reactor, requestFactory=StreamingRequest,
            channelFactory=ImageioChannel), interface="127.0.0.1")
        self.controlPort = reactor.listenTCP(
            0, makeSite(control, reactor=reactor), interface="127.0.0.1")
        self.images = ("tcp", self.imagesPort.getHost().port)
        self.control = ("tcp", self.controlPort.getHost().port)

    def openBackend(self, reactor_, url, *, mode, **kw):
        b = MemoryBackend(data=self.data, mode=mode, maxRequest=1 * MiB)
        b.hold("read")
        self.backends.append(b)
        return defer.succeed(b)

    async def close(self):
        await self.imagesPort.stopListening()
        await self.controlPort.stopListening()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    pytest_twisted.blockon(defer.ensureDeferred(s.close()))


TICKET = {"uuid": "t1", "size": 8 * MiB, "ops": ["read"], "timeout": 300,
          "url": "file:///held", "transfer_id": "transfer-1"}


@pytest_twisted.ensureDeferred
async def test_delete_waits_then_409_then_succeeds(servers):
    r = await request(servers.control, "PUT", "/tickets/t1",
                      body=json.dumps(TICKET).encode())
    assert r.status == 200

    # A download whose first backend read is held: an operation in flight.
    downloader = await connect(servers.images)
    download = downloader.request("GET", "/images/t1")
    backend = None
    while backend is None:
        await task.deferLater(reactor, 0.01, lambda: None)
        if servers.backends:
            backend = servers.backends[0]
    await backend.whenHeld()
    info = (await request(servers.control, "GET", "/tickets/t1")).json()
    assert info["active"] is True
    assert info["connections"] == 1

    # DELETE waits for the operation...
    deleting = defer.ensureDeferred(
        request(servers.control, "DELETE", "/tickets/t1"))
    for _ in range(5):
        await task.deferLater(reactor, 0.01, lambda: None)
    assert not deleting.called
    # ...until remove_timeout passes: 409, and the ticket stays, canceled.
    servers.clock.advance(REMOVE_TIMEOUT)
    r = await deleting
    assert r.status == 409
    assert r.text == "Timeout cancelling transfer transfer-1\n"
    info = (await request(servers.control, "GET", "/tickets/t1")).json()
    assert info["canceled"] is True

    # New requests on a canceled ticket are refused and closed.
    r = await request(servers.images, "GET", "/images/t1",
                      {"Range": "bytes=0-99"})
    assert r.status == 403
    assert "canceled" in r.text

    # The held read completes; the transfer stops at its next chunk.
    backend.release()
    await download.addErrback(lambda _: None)
    await downloader.closed

    # The caller retries the DELETE (vdsm does): now it succeeds.
    r = await request(servers.control, "DELETE", "/tickets/t1")
    assert r.status == 204
    assert r.headers["content-length"] == "0"
    r = await request(servers.control, "GET", "/tickets/t1")
    assert r.status == 404


@pytest_twisted.ensureDeferred
async def test_delete_returns_when_operation_finishes(servers):
    await request(servers.control, "PUT", "/tickets/t1",
                  body=json.dumps(TICKET).encode())
    downloader = await connect(servers.images)
    download = downloader.request("GET", "/images/t1",
                                  {"Range": "bytes=0-1048575"})
    while not servers.backends:
        await task.deferLater(reactor, 0.01, lambda: None)
    backend = servers.backends[0]
    await backend.whenHeld()
    deleting = defer.ensureDeferred(
        request(servers.control, "DELETE", "/tickets/t1"))
    await task.deferLater(reactor, 0.05, lambda: None)
    assert not deleting.called
    backend.release()
    r = await deleting
    assert r.status == 204
    # The backend was closed and the ticket removed, without the timeout.
    assert servers.clock.getDelayedCalls() == [] or all(
        not c.active() for c in servers.clock.getDelayedCalls())
    assert "t1" not in servers.store
    await download.addErrback(lambda _: None)


@pytest_twisted.ensureDeferred
async def test_delete_all_does_not_cancel(servers):
    await request(servers.control, "PUT", "/tickets/t1",
                  body=json.dumps(TICKET).encode())
    r = await request(servers.control, "DELETE", "/tickets/")
    assert r.status == 204
    assert len(servers.store) == 0
