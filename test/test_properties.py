# -*- test-case-name: test.test_properties -*-
"""
Property tests (hypothesis) for every parser of untrusted input: each one
either returns a well-formed result or raises its documented error, never
anything else (SPEC A17: malformed input is the client's fault, a 4xx,
never a 500).

Each test is bounded (C{max_examples}, no deadline) so the module runs in
well under a minute.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone

from imageio import config, errors
from imageio.protocols import nbd, nbdurl, nbdwire
from imageio.tickets import Ticket, TicketStore
from imageio.web import http, request, validate
from imageio.web.images import parseContentRange, parseRange

from test import test_nbd_protocol as nbdtest

FAST = settings(max_examples=500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Longest error text we accept in a reply (the reference cuts error bodies
# at 512 bytes on the client side; ours must never echo megabytes back).
MAX_MESSAGE = 1024

digits = st.text("0123456789", max_size=25)
hugeDigits = st.integers(4000, 5000).map(lambda n: "1" * n)
anyText = st.text(max_size=60)


def assertShort(exc: errors.HTTPError) -> None:
    assert 400 <= exc.code < 500, exc.code
    assert len(exc.message) <= MAX_MESSAGE, len(exc.message)


# ---------------------------------------------------------------------------
# Range / Content-Range


rangeValues = st.one_of(
    anyText,
    st.builds(lambda a, b: f"bytes={a}-{b}", digits, digits),
    st.builds(lambda a, sep, b: f"bytes={a}{sep}{b}", digits,
              st.sampled_from(["-", " - ", "--", ",", "-,"]), anyText),
    st.builds(lambda t: "bytes=" + t, anyText),
)


@FAST
@given(st.one_of(st.none(), rangeValues))
def test_parseRange(value):
    try:
        result = parseRange(value)
    except errors.HTTPError as e:
        assert e.code == 416
        return
    if value is None:
        assert result is None
        return
    first, last = result
    assert isinstance(first, int) and first >= 0
    assert last is None or (isinstance(last, int) and last >= first)


contentRangeValues = st.one_of(
    anyText,
    st.builds(lambda a, b, c: f"bytes {a}-{b}/{c}",
              digits, st.one_of(digits, st.just("*")),
              st.one_of(digits, st.just("*"))),
    st.builds(lambda t: "bytes " + t, anyText),
)


@FAST
@given(st.one_of(st.none(), contentRangeValues))
def test_parseContentRange(value):
    try:
        first = parseContentRange(value)
    except errors.BadRequest as e:
        assertShort(e)
        return
    assert isinstance(first, int) and first >= 0


# Python refuses int() of more than 4300 digits with ValueError: a huge
# number in a header must still be the client's fault (416 / 400).
@pytest.mark.parametrize("value", [
    "bytes=" + "1" * 4301 + "-", "bytes=0-" + "1" * 4301])
def test_parseRange_huge_number(value):
    with pytest.raises(errors.HTTPError) as e:
        parseRange(value)
    assert e.value.code == 416


@pytest.mark.parametrize("value", [
    "bytes " + "1" * 4301 + "-*/*", "bytes 0-" + "1" * 4301 + "/*",
    "bytes 0-1/" + "1" * 4301])
def test_parseContentRange_huge_number(value):
    with pytest.raises(errors.BadRequest):
        parseContentRange(value)


# ---------------------------------------------------------------------------
# Query strings


class _QueryRequest:
    def __init__(self, query: bytes):
        # What StreamingRequest.gotLength does (and, the same way,
        # twisted.web.http.Request.requestReceived).
        self.args = request._queryArgs(b"/images/t?" + query)


queryBytes = st.one_of(
    st.binary(max_size=80),
    st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)),
             max_size=6).map(
        lambda kv: b"&".join(k + b"=" + v for k, v in kv)),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"%ff=1", b"a=%c3%28", b"close=y&close=n", b"=&=",
                     b"flush=%80", b"a=%", b";;;"]),
)


@FAST
@given(queryBytes)
def test_queryArgs(query):
    try:
        args = http.queryArgs(_QueryRequest(query))
    except errors.BadRequest as e:
        assertShort(e)
        return
    assert all(isinstance(k, str) and isinstance(v, str)
               for k, v in args.items())
    # The validators used on query arguments hold too.
    for name in ("flush", "context", "algorithm", "close"):
        try:
            validate.enum(args, name, ("y", "n", "zero", "dirty"),
                          default="y")
        except errors.BadRequest as e:
            assertShort(e)


# ---------------------------------------------------------------------------
# JSON documents: tickets and PATCH messages


jsonScalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20))
jsonValues = st.recursive(
    jsonScalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=12)

TICKET_KEYS = ["uuid", "size", "ops", "timeout", "url", "inactivity_timeout",
               "transfer_id", "filename", "sparse", "dirty"]
goodTicket = {"uuid": "u", "size": 1024, "ops": ["read"], "timeout": 300,
              "url": "file:///tmp/x"}

ticketDicts = st.one_of(
    jsonValues,
    st.dictionaries(st.sampled_from(TICKET_KEYS), jsonValues, max_size=10),
    # A valid ticket with one or two fields replaced.
    st.dictionaries(st.sampled_from(TICKET_KEYS), jsonValues,
                    max_size=2).map(lambda d: {**goodTicket, **d}),
    st.dictionaries(
        st.sampled_from(TICKET_KEYS),
        st.one_of(jsonScalars, st.sampled_from(
            ["nbd:unix:/x", "http://[::1", "https://h/", "file:", "",
             ["read", "write"], ["write"], [1, None], "\udcff"])),
        max_size=10).map(lambda d: {**goodTicket, **d}),
)


@SLOW
@given(ticketDicts)
def test_ticket_add(doc):
    store = TicketStore(task.Clock())
    try:
        ticket = store.add(doc)
    except errors.BadRequest as e:
        assertShort(e)
        return
    assert isinstance(ticket, Ticket)
    # A ticket we accepted can be reported (GET /tickets) and authorized.
    json.dumps(ticket.info())
    for op in ("read", "write"):
        try:
            store.authorize(ticket.uuid, op)
        except errors.Forbidden:
            pass


@SLOW
@given(st.one_of(jsonValues, st.binary(max_size=40)))
def test_ticket_json_roundtrip(value):
    # What PUT /tickets does with a body: readJSON, then add.
    body = value if isinstance(value, bytes) else json.dumps(value).encode()

    class R:
        content = __import__("io").BytesIO(body)
    try:
        doc = http.readJSON(R())
        TicketStore(task.Clock()).add(doc)
    except errors.BadRequest as e:
        assertShort(e)


patchMessages = st.one_of(
    jsonValues,
    st.dictionaries(st.sampled_from(["op", "size", "offset", "flush"]),
                    st.one_of(jsonValues, st.sampled_from(["zero", "flush"])),
                    max_size=4),
    st.fixed_dictionaries(
        {"op": st.just("zero")},
        optional={"size": jsonScalars, "offset": jsonScalars,
                  "flush": jsonScalars}),
)


def _validatePatch(msg):
    # The order of imageio.web.images._Image.render_PATCH / _zero.
    msg = validate.requireObject(msg)
    op = validate.enum(msg, "op", ("zero", "flush"))
    if op == "zero":
        size = validate.integer(msg, "size", minval=0)
        offset = validate.integer(msg, "offset", minval=0, default=0)
        flush = validate.boolean(msg, "flush", default=False)
        assert 0 <= size <= validate.MAX_INT
        assert 0 <= offset <= validate.MAX_INT
        assert isinstance(flush, bool)


@FAST
@given(patchMessages)
def test_patch_validation(msg):
    try:
        _validatePatch(msg)
    except errors.BadRequest as e:
        assertShort(e)


@pytest.mark.parametrize("value", [10**4000, -10**4000, 2**63, -1])
def test_patch_validation_big_integers(value):
    for msg in ({"op": "zero", "size": value},
                {"op": "zero", "size": 1, "offset": value}):
        with pytest.raises(errors.BadRequest) as e:
            _validatePatch(msg)
        assertShort(e.value)


@FAST
@given(st.integers(1, 6), st.integers(0, 4))
def test_patch_validation_big_values(depth, which):
    # Huge values must not be echoed back whole.
    big = "x" * 100000
    nested = big
    for _ in range(depth):
        nested = [nested]
    msg = [{"op": nested}, {"op": "zero", "size": nested},
           {"op": "zero", "size": 1, "offset": {"a": nested}},
           {"op": "zero", "size": 1, "flush": nested}, [nested]][which]
    with pytest.raises(errors.BadRequest) as e:
        _validatePatch(msg)
    assertShort(e.value)


# ---------------------------------------------------------------------------
# NBD URLs


nbdURLs = st.one_of(
    st.text(max_size=60),
    st.builds(lambda p, t: p + t,
              st.sampled_from(["nbd:", "nbd:unix:", "nbd://", "nbd+unix://",
                               "nbd+unix:///", "NBD:", "nbd:localhost:",
                               "nbd://[", "nbd://[::1]:", "nbd://h:"]),
              st.text(max_size=40)),
    st.builds(lambda h, port, e: f"nbd:{h}:{port}:exportname={e}",
              st.text(max_size=10), st.one_of(digits, hugeDigits,
                                               st.text(max_size=6)),
              st.text(max_size=10)),
    st.builds(lambda e, q: f"nbd+unix:///{e}?{q}", st.text(max_size=10),
              st.text(max_size=30)),
)


@FAST
@given(nbdURLs)
def test_nbdurl_parse(url):
    try:
        result = nbdurl.parse(url)
    except ValueError as e:
        assert len(str(e)) < MAX_MESSAGE + 2 * len(url)
        return
    assert isinstance(result, nbdurl.NBDURL)
    address = result.address
    assert isinstance(address, (nbdurl.UnixAddress, nbdurl.TCPAddress))
    if isinstance(address, nbdurl.TCPAddress):
        assert 0 <= address.port <= 65535


# ---------------------------------------------------------------------------
# Configuration values


def _allOptions():
    out = []
    for section, cls in config._SECTIONS.items():
        for attr, name, default in config._options(cls):
            out.append((section, name, default))
    return out


OPTIONS = _allOptions()

iniValues = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.sampled_from(["", "true", "FALSE", "yes", "0", "-1", "65536",
                     "1e400", "nan", "inf", "-inf", "1_000", "0x10",
                     " 5 ", "\0abc", "@x", "%(x)s", "[x]", "a\n b",
                     "99999999999999999999999999", "1" * 5000]),
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(str),
)


@SLOW
@given(st.lists(st.tuples(st.sampled_from(OPTIONS), iniValues),
                min_size=1, max_size=4))
def test_config_values(assignments):
    sections: dict[str, dict[str, str]] = {}
    for (section, name, _), value in assignments:
        sections.setdefault(section, {})[name] = value
    lines = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        for name, value in options.items():
            lines.append(f"{name} = {value}")
    fd, path = tempfile.mkstemp(suffix=".conf")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        try:
            cfg = config.loadFiles([path])
        except config.ConfigError as e:
            assert str(e)
            return
        assert isinstance(cfg, config.Config)
        # A loaded configuration can be shown (--show-config).
        config.dumps(cfg)
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------
# NBD replies


def _nbdErrors(client):
    """
    Record the errors the client aborts with (the exception it logs);
    anything but an NBD error is a parser bug.
    """
    seen = []
    original = client._abort

    def _abort(exc):
        seen.append(exc)
        return original(exc)
    client._abort = _abort
    return seen


replyHeaders = st.one_of(
    st.binary(max_size=200),
    # A plausible reply header for one of our handles, then junk.
    st.builds(
        lambda handle, error, rest: struct.pack(
            "!IIQ", nbdwire.SIMPLE_REPLY_MAGIC, error, handle) + rest,
        st.integers(0, 6), st.integers(0, 2**32 - 1),
        st.binary(max_size=100)),
    st.builds(
        lambda flags, rtype, handle, length, rest: struct.pack(
            "!IHHQI", nbdwire.STRUCTURED_REPLY_MAGIC, flags, rtype, handle,
            length) + rest,
        st.integers(0, 3), st.sampled_from(
            [0, 1, 2, 3, 5, 32769, 32770, 32768, 7, 65535]),
        st.integers(0, 6),
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
        st.binary(max_size=100)),
)


def _knownStrerrorBug(exc) -> bool:
    # NBDReplyError calls os.strerror() on the server's raw error code; a
    # code past a C int raises OverflowError inside the parser, which then
    # aborts the connection (requests fail with NBDConnectionLost instead
    # of NBDReplyError). Patch proposed to the owner of
    # imageio/protocols/nbd.py; test_nbd_reply_huge_error_code guards it.
    return isinstance(exc, (OverflowError, ValueError)) and "int" in str(exc)


@pytest.mark.parametrize("code", [2**31, 2**32 - 1])
def test_nbd_reply_huge_error_code(code):
    client, transport = nbdtest.readyClient(structured=False)
    d = client.read(0, 100)
    client.dataReceived(nbdtest.simpleReply(0, error=code))
    f = d.result
    d.addErrback(lambda _: None)
    assert isinstance(f, Failure) and f.check(nbd.NBDReplyError), f
    assert not transport.disconnecting


@SLOW
@given(st.booleans(), st.lists(replyHeaders, min_size=1, max_size=4),
       st.sampled_from([None, 1, 3, 17]), st.booleans())
def test_nbd_replies(structured, chunks, step, close):
    client, transport = nbdtest.readyClient(structured=structured)
    seen = _nbdErrors(client)
    ds = [client.read(0, 100), client.write(4096, b"x" * 10),
          client.zero(0, 8192), client.flush(),
          client.read(1 << 20, 4096)]
    if structured:
        ds.append(client.blockStatus(0, 65536))
    results = []
    for d in ds:
        d.addBoth(results.append)
    for data in chunks:
        nbdtest.feed(client, data, step)
    if close or transport.disconnecting:
        client.connectionLost(Failure(ConnectionDone()))
    for exc in seen:
        if _knownStrerrorBug(exc):
            continue
        assert isinstance(exc, nbd.NBDError), repr(exc)
    for r in results:
        if isinstance(r, Failure):
            assert r.check(nbd.NBDError), r
    if close or transport.disconnecting:
        # Every request has an answer once the connection is gone.
        assert len(results) == len(ds)
