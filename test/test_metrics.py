"""
C{GET /metrics} (SPEC A14): bytes by backend, requests by service, method
and status, ticket gauges and operation latencies, scraped from the control
service after real transfers.

Most tests run an images Site (remote, TCP), a second images Site (local,
unix socket) and a control Site in this process, sharing one ticket store
and one L{Metrics}, as the daemon wires them. The last test runs a real
daemon (twistd) over TLS.
"""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor

from imageio.metrics import NO_METRICS, Metrics
from imageio.units import KiB, MiB
from imageio.web.http import Root, makeSite
from imageio.operations import MAX_ZERO_STEP
from imageio.web.metrics import MetricsPage
from imageio.web.request import ImageioChannel, StreamingRequest
from imageio.web.tickets import Tickets
from test.support import (
    Daemon, UnixHTTPConnection, controlRequest, daemonConf, httpsConnection,
    makePKI, writeConf)
from test.test_images import (
    Server, connect, pattern, request, sleep)


# ---------------------------------------------------------------------------
# Helpers


class Scrape:
    """
    One parsed exposition: C{scrape.value(name, **labels)} is the sample's
    value, 0 when the series is absent.
    """

    def __init__(self, text: str):
        self.text = text
        self.samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                self.samples[key] = s.value

    def value(self, name, **labels):
        return self.samples.get((name, frozenset(labels.items())), 0)

    def requests(self, service, method, status):
        return self.value("imageio_requests_total", service=service,
                          method=method, status=status)

    def bytes(self, backend, direction):
        return self.value("imageio_bytes_total", backend=backend,
                          direction=direction)

    def count(self, op):
        return self.value("imageio_operation_seconds_count", op=op)


class Servers(Server):
    """
    The images Sites of test_images' L{Server} as the remote service (TCP)
    plus a local service (its own Site on a unix socket) and a control
    service, one store, one L{Metrics}.
    """

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.metrics = Metrics(self.store)
        # As imagesSite: the handlers get the metrics, the Sites count the
        # requests.
        self.resource.metrics = self.metrics
        self.metrics.instrument(self.site, "remote")
        local = Root()
        local.putChild(b"images", self.resource)
        self.localSite = makeSite(local, reactor=reactor,
                                  requestFactory=StreamingRequest,
                                  channelFactory=ImageioChannel)
        self.metrics.instrument(self.localSite, "local")
        self.localPath = str(tmp_path / "local.sock")
        self.localPort = reactor.listenUNIX(self.localPath, self.localSite)
        self.local = ("unix", self.localPath)
        control = Root()
        control.putChild(b"tickets", Tickets(self.store, 60))
        control.putChild(b"metrics", MetricsPage(self.metrics))
        self.controlSite = makeSite(control, reactor=reactor)
        self.metrics.instrument(self.controlSite, "control")
        self.controlPort = reactor.listenTCP(0, self.controlSite,
                                             interface="127.0.0.1")
        self.control = ("tcp", self.controlPort.getHost().port)

    async def scrape(self) -> Scrape:
        r = await request(self.control, "GET", "/metrics")
        assert r.status == 200, r
        return Scrape(r.text)

    async def addTicketViaControl(self, uuid, url, size, ops=("read",
                                                               "write")):
        body = json.dumps({"uuid": uuid, "size": size, "ops": list(ops),
                           "timeout": 300, "url": url}).encode()
        r = await request(self.control, "PUT", f"/tickets/{uuid}", body=body)
        assert r.status == 200, r

    async def close(self):
        await self.localPort.stopListening()
        await self.controlPort.stopListening()
        await super().close()


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    pytest_twisted.blockon(defer.ensureDeferred(s.close()))


async def until(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if await predicate():
            return
        await sleep(0.01)
    raise AssertionError("condition not reached")


# ---------------------------------------------------------------------------
# Transfers: bytes, requests by status, latency histograms


@pytest_twisted.ensureDeferred
async def test_upload_download_bytes_and_statuses(servers, tmp_path):
    # An odd size: exact counts, not chunk multiples.
    size = 3 * MiB + 12345
    data = pattern(size)
    image = tmp_path / "image.raw"
    image.write_bytes(b"")
    await servers.addTicketViaControl("t1", f"file://{image}", size)

    r = await request(servers.address, "PUT", "/images/t1", body=data)
    assert r.status == 200, r
    r = await request(servers.address, "GET", "/images/t1")
    assert r.status == 200 and r.body == data
    r = await request(servers.address, "GET", "/images/t1",
                      {"Range": "bytes=100-199"})
    assert r.status == 206 and r.body == data[100:200]
    r = await request(servers.address, "GET", "/images/no-such-ticket")
    assert r.status == 403
    r = await request(servers.address, "GET", "/images/t1/no/such")
    assert r.status == 404
    r = await request(servers.address, "GET", "/images/t1",
                      {"Range": f"bytes=0-{size}"})
    assert r.status == 416
    # The local service counts as itself.
    r = await request(servers.local, "GET", "/images/t1",
                      {"Range": "bytes=0-4095"})
    assert r.status == 206 and r.body == data[:4096]
    # (Direct I/O pads an unaligned end of file to the next block.)
    assert image.read_bytes()[:size] == data

    m = await servers.scrape()
    assert m.bytes("file", "write") == size
    assert m.bytes("file", "read") == size + 100 + 4096
    assert m.bytes("file", "zero") == 0
    assert m.bytes("nbd", "read") == 0  # present before first use
    assert m.requests("remote", "PUT", "200") == 1
    assert m.requests("remote", "GET", "200") == 1
    assert m.requests("remote", "GET", "206") == 1
    assert m.requests("remote", "GET", "403") == 1
    assert m.requests("remote", "GET", "404") == 1
    assert m.requests("remote", "GET", "416") == 1
    assert m.requests("local", "GET", "206") == 1
    assert m.requests("control", "PUT", "200") == 1
    # The scrape itself is counted once it is answered.
    assert m.requests("control", "GET", "200") == 0
    assert (await servers.scrape()).requests("control", "GET", "200") == 1

    # One observation per backend read (1 MiB chunks: 4 for the whole
    # image, 1 per small range) and at least one per backend write; the
    # PUT's flush is timed too.
    assert m.count("read") == 4 + 1 + 1
    assert m.count("write") >= 1
    assert m.count("flush") == 1
    assert m.value("imageio_operation_seconds_bucket", op="read",
                   le="+Inf") == m.count("read")
    assert m.value("imageio_operation_seconds_sum", op="read") > 0
    assert m.count("checksum") == 0
    assert 'imageio_operation_seconds_bucket{le="0.001",op="zero"} 0.0' \
        in m.text


@pytest_twisted.ensureDeferred
async def test_chunked_upload_counts_bytes(servers):
    size = 2 * MiB + 7
    servers.addTicket("t1", size=size)
    data = pattern(size, seed=3)
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in
                    (data[i:i + 300 * KiB] for i in range(0, size,
                                                          300 * KiB)))
    r = await request(servers.address, "PUT", "/images/t1",
                      {"Transfer-Encoding": "chunked"}, body + b"0\r\n\r\n")
    assert r.status == 200, r
    m = await servers.scrape()
    assert m.bytes("memory", "write") == size
    assert m.requests("remote", "PUT", "200") == 1


@pytest_twisted.ensureDeferred
async def test_zero_flush_extents_checksum(servers):
    size = 5 * MiB
    servers.addTicket("t1", data=pattern(size))
    zero = {"op": "zero", "offset": 0, "size": 2 * MiB, "flush": True}
    r = await request(servers.address, "PATCH", "/images/t1",
                      body=json.dumps(zero).encode())
    assert r.status == 200, r
    r = await request(servers.address, "PATCH", "/images/t1",
                      body=b'{"op": "flush"}')
    assert r.status == 200, r
    r = await request(servers.address, "GET", "/images/t1/extents")
    assert r.status == 200, r
    r = await request(servers.address, "GET", "/images/t1/checksum")
    assert r.status == 200, r
    r = await request(servers.address, "GET",
                      "/images/t1/checksum?algorithm=nope")
    assert r.status == 400

    m = await servers.scrape()
    # Zeroing is counted apart from written data.
    assert m.bytes("memory", "zero") == 2 * MiB
    assert m.bytes("memory", "write") == 0
    # The memory backend reports one data extent: checksum reads it all.
    assert m.bytes("memory", "read") == size
    assert m.count("zero") == 1
    assert m.count("flush") == 2
    assert m.count("extents") == 2  # the request, and the checksum's own
    assert m.count("checksum") == 1
    assert m.count("read") >= 1
    assert m.requests("remote", "PATCH", "200") == 2
    assert m.requests("remote", "GET", "200") == 2
    assert m.requests("remote", "GET", "400") == 1


@pytest_twisted.ensureDeferred
async def test_zero_in_steps(servers):
    size = MAX_ZERO_STEP + MiB
    servers.addTicket("t1", size=size)
    r = await request(servers.address, "PATCH", "/images/t1",
                      body=json.dumps({"op": "zero", "size": size}).encode())
    assert r.status == 200, r
    m = await servers.scrape()
    assert m.bytes("memory", "zero") == size
    assert m.count("zero") == 2


@pytest_twisted.ensureDeferred
async def test_proxy_streams_count_bytes(servers, tmp_path):
    # Through the http backend's streams (one upstream request per client
    # request, no pump): counted from the operation's progress.
    (tmp_path / "host").mkdir()
    host = Server(tmp_path / "host")
    try:
        size = 2 * MiB + 99
        host.addTicket("h1", size=size)
        servers.addTicket("p1", size=size, url=f"{host.url}/images/h1")
        data = pattern(size, seed=5)
        r = await request(servers.address, "PUT", "/images/p1", body=data)
        assert r.status == 200, r
        assert bytes(host.images["h1"]) == data
        r = await request(servers.address, "GET", "/images/p1",
                          {"Range": "bytes=10-1048585"})
        assert r.status == 206 and r.body == data[10:1048586]
        m = await servers.scrape()
        assert m.bytes("http", "write") == size
        assert m.bytes("http", "read") == MiB
    finally:
        await host.close()


# ---------------------------------------------------------------------------
# Gauges, aborted requests


@pytest_twisted.ensureDeferred
async def test_ticket_and_connection_gauges(servers):
    servers.addTicket("idle", size=MiB)
    servers.addTicket("t1", data=pattern(2 * MiB))
    servers.holds["t1"] = ["read"]
    m = await servers.scrape()
    assert m.value("imageio_tickets") == 2
    assert m.value("imageio_active_tickets") == 0
    assert m.value("imageio_active_connections") == 0

    client = await connect(servers.address)
    download = client.request("GET", "/images/t1")
    while not servers.opened:
        await sleep(0.01)
    backend = servers.opened[0]
    await backend.whenHeld()
    m = await servers.scrape()
    assert m.value("imageio_tickets") == 2
    assert m.value("imageio_active_tickets") == 1
    assert m.value("imageio_active_connections") == 1

    backend.release()
    r = await download
    assert r.status == 200 and len(r.body) == 2 * MiB
    # Done, but the keep-alive connection still holds the backend.
    m = await servers.scrape()
    assert m.value("imageio_active_tickets") == 0
    assert m.value("imageio_active_connections") == 1

    client.transport.loseConnection()
    await client.closed

    async def released():
        m = await servers.scrape()
        return m.value("imageio_active_connections") == 0
    await until(released)


@pytest_twisted.ensureDeferred
async def test_aborted_download(servers):
    servers.addTicket("t1", data=pattern(4 * MiB))
    servers.holds["t1"] = ["read"]
    client = await connect(servers.address)
    download = client.request("GET", "/images/t1")
    while not servers.opened:
        await sleep(0.01)
    backend = servers.opened[0]
    await backend.whenHeld()
    client.transport.abortConnection()
    await download.addErrback(lambda _: None)
    backend.release()

    async def counted():
        m = await servers.scrape()
        return m.requests("remote", "GET", "aborted") == 1
    await until(counted)
    m = await servers.scrape()
    assert m.requests("remote", "GET", "200") == 0


@pytest_twisted.ensureDeferred
async def test_early_error_response_counted(servers):
    # A PUT refused from its headers is answered by StreamingRequest
    # before the body arrives: it still counts.
    servers.addTicket("ro", size=MiB, ops=["read"])
    client = await connect(servers.address)
    r = await client.request("PUT", "/images/ro",
                             {"Content-Length": str(MiB)}, b"x" * 100)
    assert r.status == 403
    await client.closed
    m = await servers.scrape()
    assert m.requests("remote", "PUT", "403") == 1


@pytest_twisted.ensureDeferred
async def test_unknown_method_label(servers):
    r = await request(servers.address, "BREW", "/images/t1")
    assert r.status == 405
    m = await servers.scrape()
    assert m.requests("remote", "other", "405") == 1


# ---------------------------------------------------------------------------
# The resource


@pytest_twisted.ensureDeferred
async def test_metrics_only_on_control(servers):
    r = await request(servers.control, "GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"] == \
        "text/plain; version=0.0.4; charset=utf-8"
    assert int(r.headers["content-length"]) == len(r.body)
    assert "# TYPE imageio_bytes_total counter" in r.text
    assert "# TYPE imageio_operation_seconds histogram" in r.text
    assert "process_resident_memory_bytes" in r.text
    assert "_created" not in r.text

    for address in (servers.address, servers.local):
        r = await request(address, "GET", "/metrics")
        assert r.status == 404
        assert r.text == "No handler for '/metrics'\n"
    r = await request(servers.control, "GET", "/metrics/")
    assert r.status == 404
    r = await request(servers.control, "GET", "/metrics/x")
    assert r.status == 404
    r = await request(servers.control, "PUT", "/metrics", body=b"{}")
    assert r.status == 405
    r = await request(servers.control, "HEAD", "/metrics")
    assert r.status == 405


def test_registries_are_per_daemon():
    a, b = Metrics(), Metrics()
    a.bytes.labels("file", "read").inc(7)
    assert b"imageio_bytes_total" in b.exposition()
    text = b.exposition().decode()
    assert 'imageio_bytes_total{backend="file",direction="read"} 0.0' in text
    assert 'imageio_bytes_total{backend="file",direction="read"} 7.0' in \
        a.exposition().decode()


def test_no_metrics_records_nothing():
    meter = NO_METRICS.meter(object())
    meter.read(1, 0.1)
    meter.write(1, 0.1)
    meter.zero(1, 0.1)
    with NO_METRICS.timed("flush"):
        pass


# ---------------------------------------------------------------------------
# End to end: a real daemon


def _abstract(address):
    # The daemon logs an abstract socket name with "@" for the NUL.
    return "\0" + address[1:] if address.startswith("@") else address


@pytest.mark.slow
def test_daemon_metrics(tmp_path):
    pki = makePKI(str(tmp_path / "pki"))
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki))
    size = 5 * MiB + 777
    data = os.urandom(size)
    image = tmp_path / "image.raw"
    image.write_bytes(b"")
    d = Daemon(conf)
    try:
        sock = str(tmp_path / "run" / "sock")
        ticket = {"uuid": "m", "size": size, "ops": ["read", "write"],
                  "timeout": 300, "url": f"file://{image}"}
        assert controlRequest(sock, "PUT", "/tickets/m", ticket)[0] == 200

        con = httpsConnection(d.remotePort, pki.ca)
        try:
            con.request("PUT", "/images/m", body=data)
            resp = con.getresponse()
            resp.read()
            assert resp.status == 200
            con.request("GET", "/images/m")
            resp = con.getresponse()
            assert resp.status == 200
            assert resp.read() == data
            con.request("GET", "/images/m", headers={"Range": "bytes=0-9"})
            resp = con.getresponse()
            assert resp.status == 206 and resp.read() == data[:10]
            con.request("GET", "/metrics")
            resp = con.getresponse()
            resp.read()
            assert resp.status == 404
            # While this connection is open it holds the ticket's backend.
            status, headers, body = controlRequest(sock, "GET", "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            m = Scrape(body.decode())
            assert m.value("imageio_tickets") == 1
            assert m.value("imageio_active_tickets") == 0
            assert m.value("imageio_active_connections") == 1
        finally:
            con.close()

        local = UnixHTTPConnection(_abstract(d.addresses["local"]))
        try:
            local.request("GET", "/metrics")
            resp = local.getresponse()
            resp.read()
            assert resp.status == 404
        finally:
            local.close()

        status, _, body = controlRequest(sock, "GET", "/metrics")
        assert status == 200
        m = Scrape(body.decode())
        assert m.bytes("file", "write") == size
        assert m.bytes("file", "read") == size + 10
        assert m.requests("remote", "PUT", "200") == 1
        assert m.requests("remote", "GET", "200") == 1
        assert m.requests("remote", "GET", "206") == 1
        assert m.requests("remote", "GET", "404") == 1
        assert m.requests("local", "GET", "404") == 1
        assert m.requests("control", "PUT", "200") == 1
        assert m.requests("control", "GET", "200") == 1
        assert m.count("read") >= 2
        assert m.count("write") >= 1
        assert m.count("flush") == 1
        assert m.value("process_resident_memory_bytes") > 0
        assert m.value("process_open_fds") > 0
    finally:
        d.stop()
    assert image.read_bytes()[:size] == data
