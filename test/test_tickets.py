# -*- test-case-name: test.test_tickets -*-
"""
Tests for L{imageio.tickets}: validation, status, authorization, expiry,
transferred bytes, connections and cancellation, all on a
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import json
import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio import errors
from imageio.tickets import (
    MAX_INTEGER, ITicketStore, MonotonicClock, RangeList, Ticket,
    TicketStore, TransferCanceled)

UUID = "2e8a5d5c-1d5a-4a56-a2a8-3c0c1b8f0a11"
TRANSFER = "0f7e7b5c-9a3b-4f0e-8e55-7a1f3c2d4e5b"
NOT_ALLOWED = "You are not allowed to access this resource: "


def ticketDict(**kw) -> dict:
    """
    A valid ticket body; keyword arguments override or add fields, and a
    value of C{None} for C{drop} names a field to remove.
    """
    d = {
        "uuid": UUID,
        "size": 1 << 30,
        "ops": ["read"],
        "timeout": 300,
        "url": "file:///var/tmp/image.raw",
        "transfer_id": TRANSFER,
    }
    d.update(kw)
    return d


def without(key: str, **kw) -> dict:
    d = ticketDict(**kw)
    del d[key]
    return d


class _Context:
    """
    A connection context: counts close() calls; may return a Deferred.
    """

    def __init__(self, result=None):
        self.closed = 0
        self.result = result

    def close(self):
        self.closed += 1
        return self.result


class _Base(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = TicketStore(self.clock)

    def add(self, **kw) -> Ticket:
        return self.store.add(ticketDict(**kw))

    def assertInvalid(self, body, text: str):
        e = self.assertRaises(errors.BadRequest, self.store.add, body)
        self.assertEqual(e.code, 400)
        self.assertEqual(str(e), text)
        self.assertEqual(len(self.store), 0)


class ValidationTests(_Base):
    """
    C{PUT /tickets} bodies: SPEC B §2 and the reference's error texts.
    """

    def test_interface(self):
        self.assertTrue(verifyObject(ITicketStore, self.store))

    def test_minimal(self):
        t = self.store.add(without("transfer_id"))
        self.assertIs(self.store.get(UUID), t)
        self.assertEqual(t.uuid, UUID)
        self.assertEqual(t.size, 1 << 30)
        self.assertEqual(t.ops, ["read"])
        self.assertEqual(t.timeout, 300)
        self.assertEqual(t.url, "file:///var/tmp/image.raw")
        self.assertEqual(t.inactivityTimeout, 60)
        self.assertEqual(t.transferId, "(ticket/" + UUID[:18] + ")")
        self.assertIsNone(t.filename)
        self.assertFalse(t.sparse)
        self.assertFalse(t.dirty)
        self.assertFalse(t.canceled)

    def test_storeInactivityDefault(self):
        store = TicketStore(self.clock, inactivityTimeout=30)
        self.assertEqual(store.add(ticketDict()).inactivityTimeout, 30)
        t = store.add(ticketDict(inactivity_timeout=3600))
        self.assertEqual(t.inactivityTimeout, 3600)

    def test_vdsmNBDTicket(self):
        # SPEC C §2.1, as seen in the daemon logs.
        body = json.loads(
            '{"dirty": false, "ops": ["write"], "size": 8796093022208, '
            '"sparse": false, "inactivity_timeout": 60, '
            f'"transfer_id": "{TRANSFER}", "uuid": "{UUID}", '
            '"timeout": 300, '
            f'"url": "nbd:unix:/run/vdsm/nbd/{TRANSFER}.sock"}}')
        t = self.store.add(body)
        self.assertEqual(t.size, 8796093022208)
        self.assertEqual(t.ops, ["write"])
        self.assertEqual(t.transferId, TRANSFER)
        self.assertEqual(t.info()["url"],
                         f"nbd:unix:/run/vdsm/nbd/{TRANSFER}.sock")

    def test_vdsmBackupTicket(self):
        t = self.add(dirty=True, ops=["read"], inactivity_timeout=3600,
                     sparse=False, url="nbd:unix:/run/vdsm/nbd/x.sock")
        self.assertTrue(t.dirty)
        self.assertEqual(t.inactivityTimeout, 3600)

    def test_vdsmFileAndFilename(self):
        t = self.add(url="file:///rhev/data-center/mnt/sd/images/i/v",
                     filename="disk.qcow2", dirty=False, sparse=True)
        self.assertEqual(t.filename, "disk.qcow2")
        self.assertTrue(t.sparse)
        self.assertEqual(t.info()["filename"], "disk.qcow2")

    def test_engineProxyTicket(self):
        # SPEC C §2.2: ImageTicket.toDict() of an older engine: no dirty,
        # no inactivity_timeout; the url points to the host daemon.
        body = {
            "uuid": UUID, "timeout": 300, "size": 6442450944,
            "url": f"https://host1.example.com:54322/images/{UUID}",
            "ops": ["read"], "sparse": False, "transfer_id": TRANSFER,
        }
        t = self.store.add(json.loads(json.dumps(body)))
        self.assertEqual(t.parsedURL.scheme, "https")
        self.assertEqual(t.inactivityTimeout, 60)
        self.assertFalse(t.dirty)

    def test_unknownKeysIgnored(self):
        t = self.add(colour="blue", nested={"a": [1]})
        self.assertNotIn("colour", t.info())

    def test_missingRequired(self):
        for key in ("uuid", "size", "ops", "timeout", "url"):
            self.assertInvalid(
                without(key),
                f"Invalid ticket: Required ticket parameter is missing: {key}")

    def test_wrongTypes(self):
        cases = [
            ("uuid", 1, "1", "str"),
            ("uuid", None, "None", "str"),
            ("size", "1", "'1'", "int"),
            ("size", 1.5, "1.5", "int"),
            ("size", None, "None", "int"),
            ("ops", "read", "'read'", "list"),
            ("ops", {"read": 1}, "{'read': 1}", "list"),
            ("timeout", "300", "'300'", "int"),
            ("timeout", 300.0, "300.0", "int"),
            ("url", ["file:///x"], "['file:///x']", "str"),
            ("inactivity_timeout", "60", "'60'", "int"),
            ("transfer_id", None, "None", "str"),
            ("transfer_id", 7, "7", "str"),
            ("filename", 1, "1", "str"),
            ("sparse", 1, "1", "bool"),
            ("sparse", "true", "'true'", "bool"),
            ("dirty", None, "None", "bool"),
        ]
        for key, value, shown, kind in cases:
            self.assertInvalid(
                ticketDict(**{key: value}),
                f"Invalid ticket: Invalid value for '{key}': {shown}: "
                f"expecting a <class '{kind}'> value")

    def test_boolPassesAsInt(self):
        # The reference's isinstance check lets JSON booleans through as
        # integers, and echoes them back.
        t = self.store.add(json.loads(json.dumps(ticketDict(size=True))))
        self.assertIs(t.info()["size"], True)
        self.assertIn('"size": true', json.dumps(t.info()))
        t = self.add(timeout=False, inactivity_timeout=True)
        self.assertEqual(t.expires, 1000)
        self.assertIs(t.inactivityTimeout, True)

    def test_outOfRange(self):
        # SPEC A17: the reference takes these; they are nonsense.
        for key, value in [("size", -1),
                           ("inactivity_timeout", -5),
                           ("size", MAX_INTEGER + 1),
                           ("timeout", 10**20)]:
            low = -MAX_INTEGER if key == "timeout" else 0
            self.assertInvalid(
                ticketDict(**{key: value}),
                f"Invalid ticket: Invalid value for '{key}': {value}: "
                f"expecting a value between {low} and {MAX_INTEGER}")

    def test_negativeTimeout(self):
        # As the reference: accepted, readable, expired.
        t = self.add(timeout=-1)
        self.assertEqual(t.info()["timeout"], -1)
        self.assertTrue(t.expired())
        self.assertIs(self.store.get(t.uuid), t)
        with self.assertRaises(errors.Forbidden) as e:
            self.store.authorize(t.uuid, "read")
        self.assertIn("expired", e.exception.message)
        t.extend(300)
        self.assertFalse(t.expired())

    def test_rangeLimitsAccepted(self):
        t = self.add(size=MAX_INTEGER, timeout=0, inactivity_timeout=0)
        self.assertEqual(t.size, MAX_INTEGER)
        t = self.add(size=0)
        self.assertEqual(t.size, 0)

    def test_notAnObject(self):
        for body, kind in [([], "array"), ([ticketDict()], "array"),
                           (None, "null"), ("x", "string"), (1, "number"),
                           (1.5, "number"), (True, "boolean")]:
            self.assertInvalid(
                body, f"Invalid ticket: expecting a JSON object, got {kind}")

    def test_unsupportedSchemes(self):
        for url, scheme in [("ftp://host/x", "ftp"),
                            ("/var/tmp/image", ""),
                            ("nbd+tcp://host/x", "nbd+tcp"),
                            ("nbds://host/x", "nbds"),
                            ("unix:/run/sock", "unix")]:
            self.assertInvalid(
                ticketDict(url=url),
                f"Invalid ticket: Invalid value for 'url': {url!r}: "
                f"Unsupported url scheme: {scheme}")

    def test_supportedSchemes(self):
        for url in ["file:///var/tmp/image",
                    "nbd:unix:/run/sock",
                    "nbd:unix:/run/sock:exportname=sda",
                    "nbd:localhost:10809",
                    "nbd://localhost:10809/sda",
                    "nbd+unix:///sda?socket=/run/sock",
                    "http://host:54322/images/x",
                    "https://[::1]:54322/images/x"]:
            t = self.add(url=url)
            self.assertEqual(t.url, url)
            self.assertEqual(t.info()["url"], url)

    def test_urlReserialised(self):
        # The status shows the url as urlunparse(urlparse(url)).
        t = self.add(url="FILE:/var/tmp/image?")
        self.assertEqual(t.url, "FILE:/var/tmp/image?")
        self.assertEqual(t.info()["url"], "file:///var/tmp/image")

    def test_nbdUnixURLAsGiven(self):
        # Re-serialising would lose the empty authority of our own scheme.
        url = "nbd+unix:///sda?socket=/run/sock"
        self.assertEqual(self.add(url=url).info()["url"], url)
        url = "NBD+UNIX:///sda?socket=/run/sock"
        self.assertEqual(self.add(url=url).info()["url"], url)

    def test_unparsableURL(self):
        self.assertInvalid(
            ticketDict(url="http://[1.2.3.4:33"),
            "Invalid ticket: Invalid value for 'url': 'http://[1.2.3.4:33': "
            "Invalid IPv6 URL")

    def test_checkOrder(self):
        # The first failing field in the reference's order is reported.
        self.assertInvalid(
            {"size": "x", "url": "ftp://x"},
            "Invalid ticket: Required ticket parameter is missing: uuid")
        self.assertInvalid(
            ticketDict(size="x", ops=None),
            "Invalid ticket: Invalid value for 'size': 'x': "
            "expecting a <class 'int'> value")
        self.assertInvalid(
            ticketDict(url="ftp://x", inactivity_timeout="x"),
            "Invalid ticket: Invalid value for 'inactivity_timeout': 'x': "
            "expecting a <class 'int'> value")
        self.assertInvalid(
            ticketDict(url="ftp://x", sparse="x"),
            "Invalid ticket: Invalid value for 'url': 'ftp://x': "
            "Unsupported url scheme: ftp")

    def test_longValueShortened(self):
        e = self.assertRaises(errors.BadRequest, self.store.add,
                              ticketDict(uuid=list(range(1000))))
        self.assertLess(len(str(e)), 400)
        self.assertTrue(str(e).endswith("...: expecting a <class 'str'> "
                                        "value"))

    def test_opsNotValidated(self):
        t = self.add(ops=[])
        self.assertEqual(t.info()["ops"], [])
        t = self.add(ops=["read", "fly"])
        self.assertTrue(t.may("fly"))

    def test_replace(self):
        old = self.add()
        op = old.startOperation(0, 10)
        ctx = _Context()
        old.bind(ctx)
        new = self.add(size=5, ops=["write"])
        self.assertIsNot(new, old)
        self.assertIs(self.store.get(UUID), new)
        self.assertEqual(len(self.store), 1)
        # The old object is dropped, not canceled.
        self.assertFalse(old.canceled)
        self.assertFalse(op.canceled)
        self.assertEqual(ctx.closed, 0)
        self.assertEqual(new.info()["connections"], 0)
        self.assertFalse(new.active)

    def test_ticketInfoIsJSON(self):
        t = self.add(filename="x.raw")
        self.assertEqual(json.loads(json.dumps(t.info())), t.info())


class InfoTests(_Base):
    """
    L{Ticket.info}: the C{GET /tickets/{id}} document.
    """

    def test_fresh(self):
        self.clock.advance(0.9)
        t = self.add(sparse=True, inactivity_timeout=120)
        self.assertEqual(t.info(), {
            "active": False,
            "canceled": False,
            "connections": 0,
            "expires": 1300,
            "idle_time": 0,
            "inactivity_timeout": 120,
            "ops": ["read"],
            "size": 1 << 30,
            "sparse": True,
            "dirty": False,
            "timeout": 300,
            "url": "file:///var/tmp/image.raw",
            "uuid": UUID,
            "transfer_id": TRANSFER,
            "transferred": 0,
        })
        self.assertEqual(list(t.info()), [
            "active", "canceled", "connections", "expires", "idle_time",
            "inactivity_timeout", "ops", "size", "sparse", "dirty",
            "timeout", "url", "uuid", "transfer_id", "transferred"])

    def test_transferIdDefault(self):
        t = self.store.add(without("transfer_id", uuid="short"))
        self.assertEqual(t.info()["transfer_id"], "(ticket/short)")

    def test_emptyStringsOmitted(self):
        # The reference only reports non-empty values.
        info = self.add(transfer_id="", filename="").info()
        self.assertNotIn("transfer_id", info)
        self.assertNotIn("filename", info)

    def test_filename(self):
        self.assertNotIn("filename", self.add().info())
        self.assertEqual(self.add(filename="é.img").info()["filename"],
                         "é.img")

    def test_multiOpOmitsTransferred(self):
        t = self.add(ops=["read", "write"])
        op = t.startOperation(0, 100)
        op.progress(100)
        op.finish()
        self.assertNotIn("transferred", t.info())
        self.assertIsNone(t.transferred())

    def test_opsCopied(self):
        ops = ["read"]
        t = self.add(ops=ops)
        ops.append("write")
        t.info()["ops"].append("write")
        self.assertEqual(t.ops, ["read"])

    def test_getUnknown(self):
        e = self.assertRaises(errors.NotFound, self.store.get, "nope")
        self.assertEqual(e.code, 404)
        self.assertEqual(str(e), "No such ticket 'nope'")

    def test_getExpired(self):
        t = self.add(timeout=1)
        self.clock.advance(10)
        self.assertIs(self.store.get(UUID), t)


class AuthorizeTests(_Base):
    """
    L{TicketStore.authorize}: SPEC B §1.13 and §2 authorization order.
    """

    def assertForbidden(self, ticketId, op, reason):
        e = self.assertRaises(errors.Forbidden, self.store.authorize,
                              ticketId, op)
        self.assertEqual(e.code, 403)
        self.assertTrue(e.close)
        self.assertEqual(str(e), NOT_ALLOWED + reason)

    def test_allowed(self):
        t = self.add()
        self.assertIs(self.store.authorize(UUID, "read"), t)

    def test_unknown(self):
        self.assertForbidden("nope", "read", "No such ticket nope")

    def test_forbids(self):
        self.add(ops=["read"])
        self.assertForbidden(UUID, "write", f"Transfer={TRANSFER} forbids "
                                            "write")

    def test_writeImpliesRead(self):
        t = self.add(ops=["write"])
        self.assertIs(self.store.authorize(UUID, "read"), t)
        self.assertIs(self.store.authorize(UUID, "write"), t)

    def test_noOps(self):
        self.add(ops=[])
        self.assertForbidden(UUID, "read", f"Transfer={TRANSFER} forbids "
                                           "read")

    def test_expiredAtExpires(self):
        self.clock.advance(0.5)
        t = self.add(timeout=10)
        self.assertEqual(t.expires, 1010)
        self.clock.advance(9.4)  # 1009.9
        self.store.authorize(UUID, "read")
        self.clock.advance(0.1)  # 1010.0: expires <= now
        self.assertForbidden(UUID, "read", f"Transfer={TRANSFER} expired")

    def test_zeroTimeoutExpiredAtOnce(self):
        self.add(timeout=0)
        self.assertForbidden(UUID, "read", f"Transfer={TRANSFER} expired")

    def test_canceledBeforeExpired(self):
        self.add(timeout=1)
        self.clock.advance(5)
        self.successResultOf(self.store.get(UUID).cancel(0))
        self.assertForbidden(UUID, "write", f"Transfer={TRANSFER} was "
                                            "canceled")

    def test_expiredBeforeForbidden(self):
        self.add(timeout=1, ops=["read"])
        self.clock.advance(5)
        self.assertForbidden(UUID, "write", f"Transfer={TRANSFER} expired")

    def test_expiryOnlyAtStart(self):
        # A running operation is not stopped by expiry.
        t = self.add(timeout=1)
        op = t.startOperation(0, 10)
        self.clock.advance(5)
        op.check()
        op.progress(10)
        op.finish()
        self.assertEqual(t.transferred(), 10)
        self.store.authorize(UUID, "read")


class TimeTests(_Base):
    """
    Expiry, touch, extend and idle time, in whole clock seconds.
    """

    def test_expiresRoundsDown(self):
        self.clock.advance(0.99)
        t = self.add(timeout=300)
        self.assertEqual(t.expires, 1300)

    def test_touch(self):
        t = self.add(timeout=300)
        self.clock.advance(100.7)
        self.assertEqual(t.idleTime, 100)
        t.touch()
        self.assertEqual(t.expires, 1400)
        self.assertEqual(t.idleTime, 0)
        self.clock.advance(0.5)
        self.assertEqual(t.idleTime, 1)

    def test_extend(self):
        t = self.add(timeout=300)
        self.clock.advance(50)
        t.extend(1000)
        self.assertEqual(t.expires, 2050)
        self.assertEqual(t.timeout, 300)
        self.assertEqual(t.info()["timeout"], 300)
        # Extending does not reset the idle time.
        self.assertEqual(t.idleTime, 50)
        # A later touch uses the stored timeout again.
        t.touch()
        self.assertEqual(t.expires, 1350)

    def test_extendShortens(self):
        t = self.add(timeout=300)
        t.extend(0)
        self.assertEqual(t.expires, 1000)
        self.assertRaises(errors.Forbidden, self.store.authorize, UUID,
                          "read")

    def test_extendRevivesExpired(self):
        t = self.add(timeout=10)
        self.clock.advance(20)
        self.assertRaises(errors.Forbidden, self.store.authorize, UUID,
                          "read")
        t.extend(30)
        self.assertIs(self.store.authorize(UUID, "read"), t)

    def test_idleTimeWhileActive(self):
        t = self.add(timeout=300)
        self.clock.advance(10)
        op = t.startOperation(0, 100)
        self.assertTrue(t.active)
        self.assertEqual(t.info()["idle_time"], 0)
        self.clock.advance(500)
        self.assertEqual(t.info()["idle_time"], 0)
        op.finish()
        # Finishing touches the ticket.
        self.assertFalse(t.active)
        self.assertEqual(t.info()["idle_time"], 0)
        self.assertEqual(t.expires, 1810)
        self.clock.advance(7)
        self.assertEqual(t.info()["idle_time"], 7)

    def test_idleTimeWithoutOperations(self):
        t = self.add()
        self.clock.advance(42)
        self.assertEqual(t.info()["idle_time"], 42)


class TransferredTests(_Base):
    """
    C{transferred}: the union of completed ranges plus ongoing progress.
    """

    def runOp(self, t, offset, length, done=None):
        op = t.startOperation(offset, length)
        op.progress(length if done is None else done)
        op.finish()
        return op

    def test_sequential(self):
        t = self.add()
        for i in range(10):
            self.runOp(t, i * 100, 100)
        self.assertEqual(t.transferred(), 1000)
        self.assertEqual(len(t._completed), 1)

    def test_adjacentOutOfOrder(self):
        t = self.add()
        self.runOp(t, 200, 100)
        self.runOp(t, 0, 100)
        self.runOp(t, 100, 100)
        self.assertEqual(t.transferred(), 300)
        self.assertEqual(list(t._completed), [(0, 300)])

    def test_overlapsCountedOnce(self):
        t = self.add()
        self.runOp(t, 0, 100)
        self.runOp(t, 50, 100)
        self.runOp(t, 0, 100)
        self.runOp(t, 500, 10)
        self.assertEqual(t.info()["transferred"], 160)

    def test_partialOperation(self):
        # A failed operation records what it did.
        t = self.add()
        self.runOp(t, 1000, 100, done=30)
        self.assertEqual(t.transferred(), 30)

    def test_ongoingProgress(self):
        t = self.add()
        self.runOp(t, 0, 100)
        op = t.startOperation(50, 200)
        self.assertEqual(t.transferred(), 100)
        op.progress(30)
        # [50, 80) is already counted.
        self.assertEqual(t.transferred(), 100)
        op.progress(70)
        self.assertEqual(t.info()["transferred"], 150)
        other = t.startOperation(1000, 10)
        other.progress(10)
        self.assertEqual(t.transferred(), 160)
        op.finish()
        other.finish()
        self.assertEqual(t.transferred(), 160)
        self.assertEqual(list(t._completed), [(0, 150), (1000, 1010)])

    def test_ongoingOverlapEachOther(self):
        t = self.add()
        a = t.startOperation(0, 100)
        b = t.startOperation(0, 100)
        a.progress(60)
        b.progress(40)
        self.assertEqual(t.transferred(), 60)

    def test_canceledNotRecorded(self):
        t = self.add()
        self.runOp(t, 0, 100)
        op = t.startOperation(100, 100)
        op.progress(50)
        d = self.store.remove(UUID, 60)
        self.assertEqual(t.transferred(), 150)
        expires = t.expires
        self.clock.advance(10)
        op.finish()
        self.successResultOf(d)
        self.assertEqual(t.transferred(), 100)
        # Not touched either.
        self.assertEqual(t.expires, expires)

    def test_finishTwice(self):
        t = self.add()
        op = self.runOp(t, 0, 100)
        self.clock.advance(10)
        op.finish()
        self.assertEqual(t.transferred(), 100)
        self.assertEqual(t.expires, 1300)

    def test_emptyOperation(self):
        t = self.add()
        self.runOp(t, 100, 0)
        self.assertEqual(t.transferred(), 0)
        self.assertEqual(len(t._completed), 0)

    def test_writeTicket(self):
        t = self.add(ops=["write"])
        self.runOp(t, 0, 4096)
        self.assertEqual(t.info()["transferred"], 4096)

    def test_manyRanges(self):
        # Thousands of requests in random order, some repeated, stay cheap.
        t = self.add()
        chunks = list(range(20000)) * 2
        random.Random(1).shuffle(chunks)
        start = time.monotonic()
        for i in chunks:
            self.runOp(t, i * 4096, 4096)
            if i % 1000 == 0:
                t.info()
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(t.transferred(), 20000 * 4096)
        self.assertEqual(list(t._completed), [(0, 20000 * 4096)])


class ConnectionTests(_Base):
    """
    L{Ticket.bind} and L{Ticket.unbind}.
    """

    def test_count(self):
        t = self.add()
        a, b = _Context(), _Context()
        t.bind(a)
        t.bind(b)
        t.bind(a)
        self.assertEqual(t.info()["connections"], 2)
        t.unbind(a)
        self.assertEqual(t.connections, 1)
        t.unbind(a)
        t.unbind(_Context())
        self.assertEqual(t.connections, 1)
        t.unbind(b)
        self.assertEqual(t.info()["connections"], 0)
        # Unbinding does not close: the owner does.
        self.assertEqual(a.closed + b.closed, 0)

    def test_bindCanceled(self):
        t = self.add()
        self.successResultOf(self.store.remove(UUID, 60))
        e = self.assertRaises(errors.Forbidden, t.bind, _Context())
        self.assertIsInstance(e, errors.Canceled)
        self.assertIsInstance(e, TransferCanceled)
        self.assertTrue(e.close)
        self.assertEqual(str(e), NOT_ALLOWED + f"Transfer {TRANSFER} was "
                                               "canceled")
        self.assertEqual(t.connections, 0)

    def test_startOperationCanceled(self):
        t = self.add()
        self.successResultOf(t.cancel(0))
        e = self.assertRaises(TransferCanceled, t.startOperation, 0, 1)
        self.assertEqual(str(e), NOT_ALLOWED + f"Transfer {TRANSFER} was "
                                               "canceled")
        self.assertFalse(t.active)


class CancelTests(_Base):
    """
    L{TicketStore.remove}: cancel, wait for operations, delete.
    """

    def assertGone(self):
        self.assertNotIn(UUID, self.store)
        self.assertRaises(errors.NotFound, self.store.get, UUID)

    def test_unknown(self):
        self.assertIsNone(self.successResultOf(self.store.remove("x", 60)))

    def test_idle(self):
        t = self.add()
        a, b = _Context(), _Context()
        t.bind(a)
        t.bind(b)
        self.assertIsNone(self.successResultOf(self.store.remove(UUID, 60)))
        self.assertTrue(t.canceled)
        self.assertEqual((a.closed, b.closed), (1, 1))
        self.assertGone()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Idempotent.
        self.successResultOf(self.store.remove(UUID, 60))

    def test_idleZeroTimeout(self):
        self.add()
        self.successResultOf(self.store.remove(UUID, 0))
        self.assertGone()

    def test_waitsForAsyncClose(self):
        t = self.add()
        closing = Deferred()
        ctx = _Context(closing)
        t.bind(ctx)
        d = self.store.remove(UUID, 60)
        self.assertNoResult(d)
        self.assertIn(UUID, self.store)
        closing.callback(None)
        self.successResultOf(d)
        self.assertGone()

    def test_closeFailureLogged(self):
        t = self.add()

        class Broken:
            def close(self):
                raise OSError("boom")

        t.bind(Broken())
        ok = _Context()
        t.bind(ok)
        self.successResultOf(self.store.remove(UUID, 60))
        self.assertEqual(ok.closed, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertGone()

    def test_operationFinishesInTime(self):
        t = self.add()
        ctx = _Context()
        t.bind(ctx)
        op = t.startOperation(0, 1000)
        op.progress(100)
        op.check()
        d = self.store.remove(UUID, 60)
        self.assertNoResult(d)
        self.assertTrue(op.canceled)
        self.assertTrue(t.canceled)
        self.assertTrue(t.info()["canceled"])
        self.assertEqual(ctx.closed, 0)
        e = self.assertRaises(errors.Canceled, op.check)
        self.assertIsInstance(e, errors.Forbidden)
        self.assertEqual(str(e), NOT_ALLOWED + f"Transfer {TRANSFER} was "
                                               "canceled")
        self.assertRaises(TransferCanceled, t.startOperation, 0, 1)
        e = self.assertRaises(errors.Forbidden, self.store.authorize, UUID,
                              "read")
        self.assertEqual(str(e), NOT_ALLOWED + f"Transfer={TRANSFER} was "
                                               "canceled")
        self.clock.advance(59)
        self.assertNoResult(d)
        op.finish()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(ctx.closed, 1)
        self.assertGone()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The operation still reports the cancel to its caller.
        self.assertRaises(TransferCanceled, op.check)

    def test_lastOperationCompletes(self):
        t = self.add()
        a = t.startOperation(0, 10)
        b = t.startOperation(10, 10)
        d = self.store.remove(UUID, 60)
        a.finish()
        self.assertNoResult(d)
        self.assertTrue(t.active)
        b.finish()
        self.successResultOf(d)
        self.assertGone()

    def test_timeout(self):
        t = self.add()
        ctx = _Context()
        t.bind(ctx)
        op = t.startOperation(0, 1000)
        d = self.store.remove(UUID, 60)
        self.clock.advance(59.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, errors.Conflict)
        self.assertEqual(f.value.code, 409)
        self.assertEqual(str(f.value), f"Timeout cancelling transfer "
                                       f"{TRANSFER}")
        # Kept, still canceled, contexts untouched.
        self.assertIs(self.store.get(UUID), t)
        self.assertTrue(t.info()["canceled"])
        self.assertTrue(t.info()["active"])
        self.assertEqual(ctx.closed, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(errors.Forbidden, self.store.authorize, UUID,
                          "read")
        # The operation ends later; nothing waits, the ticket stays.
        op.finish()
        self.assertIs(self.store.get(UUID), t)
        self.assertFalse(t.active)
        # The caller retries.
        self.successResultOf(self.store.remove(UUID, 60))
        self.assertEqual(ctx.closed, 1)
        self.assertGone()

    def test_retryWhileStillBusy(self):
        self.add()
        op = self.store.get(UUID).startOperation(0, 10)
        first = self.store.remove(UUID, 10)
        self.clock.advance(10)
        self.failureResultOf(first, errors.Conflict)
        d = self.store.remove(UUID, 10)
        self.clock.advance(5)
        op.finish()
        self.successResultOf(d)
        self.assertGone()

    def test_zeroTimeoutPolling(self):
        t = self.add()
        ctx = _Context()
        t.bind(ctx)
        op = t.startOperation(0, 10)
        # Returns at once, successfully, without deleting.
        self.assertIsNone(self.successResultOf(self.store.remove(UUID, 0)))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIs(self.store.get(UUID), t)
        self.assertTrue(op.canceled)
        info = t.info()
        self.assertTrue(info["canceled"])
        self.assertTrue(info["active"])
        self.assertEqual(ctx.closed, 0)
        op.finish()
        self.assertFalse(t.info()["active"])
        self.assertIs(self.store.get(UUID), t)
        self.successResultOf(self.store.remove(UUID, 0))
        self.assertEqual(ctx.closed, 1)
        self.assertGone()

    def test_concurrentRemoves(self):
        self.add()
        op = self.store.get(UUID).startOperation(0, 10)
        d1 = self.store.remove(UUID, 60)
        self.clock.advance(10)
        d2 = self.store.remove(UUID, 60)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        op.finish()
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertGone()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_callerGivesUp(self):
        t = self.add()
        op = t.startOperation(0, 10)
        d = self.store.remove(UUID, 60)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(t.canceled)
        op.finish()
        self.assertIs(self.store.get(UUID), t)

    def test_replacedWhileWaiting(self):
        old = self.add()
        op = old.startOperation(0, 10)
        d = self.store.remove(UUID, 60)
        new = self.add()
        op.finish()
        self.successResultOf(d)
        # Only the canceled object is dropped.
        self.assertIs(self.store.get(UUID), new)
        self.assertFalse(new.canceled)

    def test_clear(self):
        t = self.add()
        other = self.add(uuid="other")
        ctx = _Context()
        t.bind(ctx)
        op = t.startOperation(0, 10)
        self.assertEqual(len(self.store), 2)
        self.assertEqual(set(self.store), {t, other})
        self.store.clear()
        self.assertEqual(len(self.store), 0)
        self.assertEqual(list(self.store), [])
        self.assertFalse(t.canceled)
        self.assertFalse(op.canceled)
        self.assertEqual(ctx.closed, 0)
        op.progress(10)
        op.finish()
        self.assertEqual(t.transferred(), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_iterationSafeWhileRemoving(self):
        for i in range(3):
            self.add(uuid=f"t{i}")
        for t in self.store:
            self.successResultOf(self.store.remove(t.uuid, 60))
        self.assertEqual(len(self.store), 0)


class RangeListTests(SynchronousTestCase):
    """
    L{RangeList}: the merged range union.
    """

    def test_empty(self):
        r = RangeList()
        self.assertEqual((r.total, len(r), list(r)), (0, 0, []))
        self.assertEqual(r.totalWith([]), 0)
        self.assertEqual(r.covered(0, 10), 0)

    def test_merges(self):
        r = RangeList([(10, 20), (30, 40), (50, 60)])
        self.assertEqual(r.total, 30)
        r.add(20, 30)
        self.assertEqual(list(r), [(10, 40), (50, 60)])
        r.add(0, 100)
        self.assertEqual(list(r), [(0, 100)])
        self.assertEqual(r.total, 100)
        r.add(5, 5)
        r.add(9, 3)
        self.assertEqual(r.total, 100)

    def test_covered(self):
        r = RangeList([(10, 20), (30, 40)])
        self.assertEqual(r.covered(0, 100), 20)
        self.assertEqual(r.covered(15, 35), 10)
        self.assertEqual(r.covered(20, 30), 0)
        self.assertEqual(r.covered(39, 41), 1)

    def test_totalWithDoesNotChange(self):
        r = RangeList([(0, 10)])
        self.assertEqual(r.totalWith([(5, 15), (12, 20)]), 20)
        self.assertEqual(list(r), [(0, 10)])

    _ranges = st.lists(
        st.tuples(st.integers(0, 64), st.integers(0, 16)), max_size=40)

    @settings(max_examples=300, deadline=None)
    @given(_ranges, _ranges)
    def test_matchesByteSet(self, added, extra):
        r = RangeList()
        model: set[int] = set()
        for start, length in added:
            r.add(start, start + length)
            model.update(range(start, start + length))
            self.assertEqual(r.total, len(model))
        pairs = list(r)
        # Sorted, non-empty, neither overlapping nor touching.
        for (s1, e1), (s2, e2) in zip(pairs, pairs[1:]):
            self.assertLess(e1, s2)
        for s, e in pairs:
            self.assertLess(s, e)
        self.assertEqual({b for s, e in pairs for b in range(s, e)}, model)
        union = set(model)
        for start, length in extra:
            union.update(range(start, start + length))
        self.assertEqual(
            r.totalWith((s, s + n) for s, n in extra), len(union))
        self.assertEqual(list(r), pairs)
        for start, length in extra:
            self.assertEqual(
                r.covered(start, start + length),
                len(model & set(range(start, start + length))))


class MonotonicClockTests(SynchronousTestCase):
    """
    L{MonotonicClock}: monotonic seconds, reactor timers.
    """

    def test_interface(self):
        self.assertTrue(verifyObject(IReactorTime, MonotonicClock(Clock())))

    def test_secondsIsMonotonic(self):
        reactor = Clock()
        reactor.advance(1e9)
        clock = MonotonicClock(reactor)
        before = time.monotonic()
        now = clock.seconds()
        self.assertTrue(before <= now <= time.monotonic())

    def test_injectedSource(self):
        clock = MonotonicClock(Clock(), monotonic=lambda: 42.5)
        store = TicketStore(clock)
        t = store.add(ticketDict(timeout=10))
        self.assertEqual(t.expires, 52)

    def test_callLaterDelegates(self):
        reactor = Clock()
        clock = MonotonicClock(reactor)
        called = []
        call = clock.callLater(5, called.append, 1)
        self.assertEqual(clock.getDelayedCalls(), [call])
        reactor.advance(5)
        self.assertEqual(called, [1])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancelTimeoutOnMonotonicClock(self):
        reactor = Clock()
        store = TicketStore(MonotonicClock(reactor))
        store.add(ticketDict())
        store.get(UUID).startOperation(0, 1)
        d = store.remove(UUID, 30)
        reactor.advance(30)
        self.failureResultOf(d, errors.Conflict)
