"""
The shared HTTP layer (imageio.web.http): the reference's routing and
error semantics, driven in memory through a real Site and HTTPChannel.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from imageio import __version__, errors
from imageio.web import http as ihttp
from imageio.web.info import Info

from test.test_images_ref import refvenv  # noqa: F401 (fixture)


class Boom(ihttp.Resource):
    isLeaf = True

    def render_GET(self, request):
        raise RuntimeError("secret detail /etc/passwd")

    def render_PUT(self, request):
        raise errors.Forbidden("You are not allowed to access this resource: "
                               "No such ticket x")

    def render_PATCH(self, request):
        raise errors.RangeNotSatisfiable("Requested range out of allowed "
                                         "range", 100)


class Async(ihttp.Resource):
    isLeaf = True

    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    @ihttp.asyncRender
    async def render_GET(self, request):
        await task.deferLater(self.clock, 1, lambda: None)
        return ihttp.jsonBody(request, {"ok": True})

    @ihttp.asyncRender
    async def render_PUT(self, request):
        await task.deferLater(self.clock, 1, lambda: None)
        raise errors.NotFound("gone")

    @ihttp.asyncRender
    async def render_DELETE(self, request):
        await task.deferLater(self.clock, 1, lambda: None)
        raise ValueError("internal")

    @ihttp.asyncRender
    async def render_PATCH(self, request):
        await task.deferLater(self.clock, 1, lambda: None)
        ihttp.emptyResponse(request, 204)


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def site(clock):
    root = ihttp.Root()
    root.putChild(b"info", Info())
    root.putChild(b"boom", Boom())
    root.putChild(b"async", Async(clock))
    return ihttp.makeSite(root, reactor=clock)


class Response:
    def __init__(self, raw):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            k, v = line.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()


def exchange(site, raw, clock=None, advance=0):
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    if clock is not None and advance:
        clock.advance(advance)
    value = transport.value()
    proto.connectionLost(Failure(ConnectionDone()))
    return Response(value), transport


def get(site, method, path, headers=b"", body=b"", **kw):
    raw = (method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers +
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return exchange(site, raw, **kw)


def test_unknown_method_checked_before_routing(site):
    resp, _ = get(site, b"FOO", b"/no/such")
    assert resp.status == 405
    assert resp.body == b"Invalid method 'FOO'\n"
    assert resp.headers["content-type"] == "text/plain; charset=UTF-8"
    assert resp.headers["content-length"] == str(len(resp.body))


def test_unknown_path(site):
    resp, _ = get(site, b"GET", b"/no/such")
    assert resp.status == 404
    assert resp.body == b"No handler for '/no/such'\n"


def test_unknown_path_percent_decoded(site):
    resp, _ = get(site, b"PUT", b"/no%20such")
    assert resp.status == 404
    assert resp.body == b"No handler for '/no such'\n"


def test_root_is_not_a_handler(site):
    resp, _ = get(site, b"GET", b"/")
    assert resp.status == 404


@pytest.mark.parametrize("path", [b"/info", b"/info/"])
def test_info(site, path):
    resp, _ = get(site, b"GET", path)
    assert resp.status == 200
    assert json.loads(resp.body) == {"version": __version__}
    assert resp.body.endswith(b"\n")
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["server"] == f"imageio/{__version__}"
    assert "date" in resp.headers
    assert "access-control-allow-origin" not in resp.headers


def test_info_cors(site):
    resp, _ = get(site, b"GET", b"/info/", headers=(
        b"Origin: https://engine\r\n"
        b"Access-Control-Request-Headers: content-type\r\n"
        b"Access-Control-Request-Method: GET\r\n"))
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["access-control-allow-headers"] == "*"
    assert resp.headers["access-control-allow-methods"] == "*"
    assert resp.headers["access-control-max-age"] == "86400"


def test_method_not_defined(site):
    resp, _ = get(site, b"PUT", b"/info/")
    assert resp.status == 405
    assert resp.body == b"Method 'PUT' not defined for '/info/'\n"


def test_head_not_mapped_to_get(site):
    # Twisted's HEAD-to-GET fallback must not leak (SPEC A6).
    resp, _ = get(site, b"HEAD", b"/info/")
    assert resp.status == 405


def test_unexpected_error_hides_details(site):
    resp, transport = get(site, b"GET", b"/boom")
    assert resp.status == 500
    assert resp.body == b"Server failed to perform the request, check logs\n"
    assert not transport.disconnecting


def test_forbidden_closes_connection(site):
    resp, transport = get(site, b"PUT", b"/boom")
    assert resp.status == 403
    assert resp.headers["connection"] == "close"
    assert transport.disconnecting


def test_range_error_header(site):
    resp, _ = get(site, b"PATCH", b"/boom")
    assert resp.status == 416
    assert resp.headers["content-range"] == "bytes */100"
    assert resp.body == b"Requested range out of allowed range\n"


def test_async_ok(site, clock):
    resp, _ = get(site, b"GET", b"/async", clock=clock, advance=1)
    assert resp.status == 200
    assert json.loads(resp.body) == {"ok": True}
    assert resp.headers["content-length"] == str(len(resp.body))


def test_async_http_error(site, clock):
    resp, _ = get(site, b"PUT", b"/async", clock=clock, advance=1)
    assert resp.status == 404
    assert resp.body == b"gone\n"


def test_async_unexpected_error(site, clock):
    resp, _ = get(site, b"DELETE", b"/async", clock=clock, advance=1)
    assert resp.status == 500
    assert b"internal" not in resp.body


def test_async_empty_reply_has_length(site, clock):
    resp, _ = get(site, b"PATCH", b"/async", clock=clock, advance=1)
    assert resp.status == 204
    assert resp.headers["content-length"] == "0"


def test_async_cancelled_when_client_leaves(site, clock):
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /async HTTP/1.1\r\nHost: x\r\n\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    # The pending deferLater was cancelled: advancing fires nothing.
    assert clock.getDelayedCalls() == [] or all(
        not c.active() for c in clock.getDelayedCalls())


def test_keep_alive_after_error(site):
    raw = (b"GET /no/such HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n")
    proto = site.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    value = transport.value()
    assert value.count(b"HTTP/1.1 404") == 1
    assert value.count(b"HTTP/1.1 200") == 1
    assert not transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))


def test_query_args_last_wins_blank_kept():
    class R:
        args = {b"a": [b"1", b"2"], b"b": [b""]}
    assert ihttp.queryArgs(R()) == {"a": "2", "b": ""}


def test_query_args_bad_utf8():
    class R:
        args = {b"a": [b"\xff"]}
    with pytest.raises(errors.BadRequest):
        ihttp.queryArgs(R())


# ---------------------------------------------------------------------------
# Reason phrases, texts and request targets as the reference


class Coded(ihttp.Resource):
    isLeaf = True

    def render_GET(self, request):
        code = int(request.args[b"code"][0])
        if code >= 400:
            raise errors.HTTPError("text", code=code)
        request.setResponseCode(code)
        return b""


def test_reason_phrases(refvenv):
    # Every status line we can send carries the phrase the reference's
    # http.server sends for it.
    import subprocess
    out = subprocess.run(
        [refvenv, "-c", "import json, sys\n"
         "from http.server import BaseHTTPRequestHandler as H\n"
         "print(json.dumps({c: H.responses[c][0] for c in "
         "json.loads(sys.argv[1])}))", json.dumps(list(ihttp.REASONS))],
        capture_output=True, check=True).stdout
    theirs = {int(k): v.encode("ascii") for k, v in json.loads(out).items()}
    assert ihttp.REASONS == theirs
    root = ihttp.Root()
    root.putChild(b"coded", Coded())
    site = ihttp.makeSite(root, reactor=task.Clock())
    for code, phrase in ihttp.REASONS.items():
        if code == 100:
            continue
        proto = site.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"GET /coded?code=%d HTTP/1.1\r\nHost: x\r\n\r\n"
                           % code)
        status = transport.value().split(b"\r\n", 1)[0]
        proto.connectionLost(Failure(ConnectionDone()))
        assert status == b"HTTP/1.1 %d %s" % (code, phrase)


@pytest.mark.parametrize("method,target", [
    (b"GET", b"Xinfo/"), (b"GET", b"*info/"), (b"OPTIONS", b"*"),
    (b"GET", b"*"), (b"GET", b"info/"), (b"PUT", b"Xinfo/"),
    (b"GET", b"http://x/info/")])
def test_target_without_slash(site, method, target):
    # Never routed without its first byte (a path filter in front of the
    # daemon would see something else): 404 as the reference.
    resp, _ = get(site, method, target)
    assert resp.status == 404
    assert resp.body == b"No handler for '%s'\n" % target


def test_tickets_without_slash():
    from imageio.tickets import TicketStore
    from imageio.web.tickets import Tickets
    clock = task.Clock()
    root = ihttp.Root()
    root.putChild(b"tickets", Tickets(TicketStore(clock)))
    site = ihttp.makeSite(root, reactor=clock)
    for method in (b"GET", b"PUT", b"PATCH", b"DELETE"):
        resp, _ = get(site, method, b"/tickets")
        assert resp.status == 404
        assert resp.body == b"No handler for '/tickets'\n"
    resp, _ = get(site, b"GET", b"/tickets/")
    assert resp.status == 400
    assert resp.body == b"Ticket id is required\n"
    resp, _ = get(site, b"PUT", b"/tickets/t", body=b"{")
    assert resp.body.startswith(b"Ticket is not in a json format: Expecting")
    resp, _ = get(site, b"PATCH", b"/tickets/t", body=b"{")
    assert resp.body.startswith(b"Invalid patch: Expecting")


def test_negative_ticket_timeout():
    # As the reference: accepted, and the (expired) ticket reads back.
    from imageio.tickets import TicketStore
    from imageio.web.tickets import Tickets
    clock = task.Clock()
    clock.advance(1000)
    store = TicketStore(clock)
    root = ihttp.Root()
    root.putChild(b"tickets", Tickets(store))
    site = ihttp.makeSite(root, reactor=clock)
    body = json.dumps({"uuid": "t", "size": 1, "ops": ["read"],
                       "timeout": -1, "url": "file:///x"}).encode()
    resp, _ = get(site, b"PUT", b"/tickets/t", body=body)
    assert resp.status == 200, resp.body
    resp, _ = get(site, b"GET", b"/tickets/t")
    assert resp.status == 200
    info = json.loads(resp.body)
    assert info["timeout"] == -1 and info["expires"] == 999
    with pytest.raises(errors.Forbidden):
        store.authorize("t", "read")
