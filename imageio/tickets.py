# -*- test-case-name: test.test_tickets -*-
"""
Transfer tickets and the in-memory ticket store.

A ticket grants access to one image (its C{url}) for a limited time. vdsm or
the engine add it through the control API (C{PUT /tickets/{id}}), clients
then use its C{uuid} in C{/images/{uuid}} until it expires or is removed.

This module is pure: it does no I/O and never looks at the global reactor.
Every time it reads comes from the L{IReactorTime} given to L{TicketStore};
tests pass a L{twisted.internet.task.Clock}, the daemon a L{MonotonicClock}.

Life of a ticket, as the web layer drives it::

    store.add(ticketDict)                       PUT /tickets/{id}
    ticket = store.authorize(id, "read")        each /images request
    ticket.bind(context)                        first request on a connection
    op = ticket.startOperation(offset, length)
    op.progress(n); op.check()                  after every chunk
    op.finish()                                 always, success or failure
    ticket.unbind(context)                      the connection closed
    store.remove(id, timeout)                   DELETE /tickets/{id}

See SPEC B §2 for the semantics kept from the reference implementation.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse, urlunparse

from twisted.internet.defer import (
    Deferred, DeferredList, maybeDeferred, succeed)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import Attribute, Interface, implementer

from imageio.errors import BadRequest, Canceled, Conflict, Forbidden, NotFound
from imageio.logs import Logger
from imageio.schemes import SCHEMES

__all__ = [
    "ITicketStore", "TicketStore", "Ticket", "Operation", "RangeList",
    "MonotonicClock", "TransferCanceled", "MAX_INTEGER",
]

MAX_INTEGER = 2**63 - 1
"""
The largest size or timeout a ticket may carry. JSON numbers are unbounded
in Python; anything past a signed 64-bit value cannot describe a real image
or a real delay, and would break the NBD protocol and timer arithmetic
further down (SPEC A17).
"""

# How much of a rejected value an error message quotes back.
_MAX_REPR = 200

_JSON_NAMES = {
    dict: "object", list: "array", str: "string", int: "number",
    float: "number", bool: "boolean", type(None): "null",
}


def _notAllowed(reason: str) -> str:
    return f"You are not allowed to access this resource: {reason}"


class TransferCanceled(Forbidden, Canceled):
    """
    The ticket was canceled (by C{DELETE /tickets/{id}}).

    Both a L{Forbidden} (the web layer answers 403 with the reference's text
    and closes the connection) and a L{Canceled} (transfer loops stop on it).

    @ivar transferId: the canceled ticket's transfer id.
    """

    def __init__(self, transferId: str):
        super().__init__(_notAllowed(f"Transfer {transferId} was canceled"))
        self.transferId = transferId


# ---------------------------------------------------------------------------
# Ranges


class RangeList:
    """
    A union of half-open byte ranges C{[start, end)}.

    Kept as two parallel sorted lists of starts and ends, with no two ranges
    overlapping or touching, so adding a range is two binary searches and
    one slice replacement: transfers made of thousands of requests stay
    cheap. The total length is maintained as ranges are added.
    """

    __slots__ = ("_starts", "_ends", "_total")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._total = 0
        for start, end in ranges:
            self.add(start, end)

    @property
    def total(self) -> int:
        """
        The number of bytes covered by the union.
        """
        return self._total

    def add(self, start: int, end: int) -> None:
        """
        Add C{[start, end)}. Empty ranges are ignored.
        """
        if end <= start:
            return
        starts, ends = self._starts, self._ends
        # Every range k that overlaps or touches the new one has
        # ends[k] >= start and starts[k] <= end; both lists are sorted, so
        # those ranges are exactly the slice [first, last).
        first = bisect_left(ends, start)
        last = bisect_right(starts, end, first)
        removed = 0
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
            for k in range(first, last):
                removed += ends[k] - starts[k]
        starts[first:last] = [start]
        ends[first:last] = [end]
        self._total += (end - start) - removed

    def covered(self, start: int, end: int) -> int:
        """
        @return: how many bytes of C{[start, end)} the union covers.
        """
        if end <= start:
            return 0
        starts, ends = self._starts, self._ends
        k = bisect_right(ends, start)
        count = 0
        while k < len(starts) and starts[k] < end:
            count += min(end, ends[k]) - max(start, starts[k])
            k += 1
        return count

    def totalWith(self, ranges: Iterable[tuple[int, int]]) -> int:
        """
        The size of the union of this list and C{ranges}, without changing
        this list.
        """
        extra = RangeList(ranges)
        total = self._total
        for start, end in extra:
            total += (end - start) - self.covered(start, end)
        return total

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._ends)

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"RangeList({list(self)!r})"


# ---------------------------------------------------------------------------
# Validation of PUT /tickets bodies


def _invalid(reason: str) -> BadRequest:
    return BadRequest(f"Invalid ticket: {reason}")


def _shortRepr(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[:_MAX_REPR] + "..."
    return text


def _invalidValue(key: str, value: Any, reason: str) -> BadRequest:
    # The reference's wording: clients and vdsm show it to users.
    return _invalid(
        f"Invalid value for {key!r}: {_shortRepr(value)}: {reason}")


def _checkType(key: str, value: Any, kind: type, minval: int = 0) -> Any:
    # isinstance, like the reference: a JSON true or false passes as an
    # integer (SPEC B §2 "Python bools pass the int checks").
    if not isinstance(value, kind):
        raise _invalidValue(key, value, f"expecting a {kind!r} value")
    if kind is int and not minval <= value <= MAX_INTEGER:
        # The reference takes any integer; negative sizes or numbers past
        # 64 bits are nonsense that fails later (SPEC A17).
        raise _invalidValue(
            key, value,
            f"expecting a value between {minval} and {MAX_INTEGER}")
    return value


def _required(d: dict, key: str, kind: type, minval: int = 0) -> Any:
    if key not in d:
        raise _invalid(f"Required ticket parameter is missing: {key}")
    return _checkType(key, d[key], kind, minval)


def _optional(d: dict, key: str, kind: type, default: Any = None) -> Any:
    if key not in d:
        return default
    return _checkType(key, d[key], kind)


# ---------------------------------------------------------------------------
# Tickets


class Operation:
    """
    One running transfer on a ticket: a GET, a PUT, a PATCH zero or flush,
    or a checksum.

    Created by L{Ticket.startOperation}; the caller reports progress after
    each chunk, calls L{check} at each chunk boundary and L{finish} exactly
    once at the end, whatever happened (a second call does nothing).

    @ivar ticket: the L{Ticket}.
    @ivar offset: the first byte of the operation.
    @ivar length: the number of bytes the operation means to process.
    @ivar done: bytes processed so far.
    @ivar canceled: true once the ticket was canceled while this ran.
    @ivar finished: true once L{finish} was called.
    """

    __slots__ = ("ticket", "offset", "length", "done", "canceled",
                 "finished")

    def __init__(self, ticket: Ticket, offset: int, length: int):
        self.ticket = ticket
        self.offset = offset
        self.length = length
        self.done = 0
        self.canceled = False
        self.finished = False

    def progress(self, n: int) -> None:
        """
        Record C{n} more bytes processed. Visible in the ticket's
        C{transferred} while the operation runs.
        """
        self.done += n

    def check(self) -> None:
        """
        Stop here if the ticket was canceled.

        @raise TransferCanceled: the ticket was canceled. It is a
            L{Canceled} for transfer loops and a L{Forbidden} carrying the
            reference's text for the client; the caller must still call
            L{finish}. Callers that complete the work while the ticket is
            canceled call this after L{finish} too: the reference answers
            such a request with 403.
        """
        if self.canceled:
            raise TransferCanceled(self.ticket.transferId)

    def finish(self) -> None:
        """
        End the operation: record its range in the ticket's transferred
        bytes and extend the ticket, unless the ticket was canceled
        meanwhile, in which case a pending cancel may now complete.
        Never raises.
        """
        if self.finished:
            return
        self.finished = True
        self.ticket._operationFinished(self)

    def release(self) -> None:
        """
        End the operation without recording its range or extending the
        ticket, as if it had been canceled: its worker process died, so
        nobody knows how much of it really happened. A pending cancel may
        now complete. Never raises.
        """
        if self.finished:
            return
        self.finished = True
        self.ticket._operationFinished(self, record=False)

    @property
    def range(self) -> tuple[int, int]:
        """
        The bytes processed so far, C{(offset, offset + done)}.
        """
        return (self.offset, self.offset + self.done)

    def __repr__(self) -> str:
        return (f"<Operation transfer={self.ticket.transferId} "
                f"offset={self.offset} length={self.length} "
                f"done={self.done} canceled={self.canceled}>")


class Ticket:
    """
    A validated ticket and its run-time state.

    Build one with L{Ticket.fromDict} (or through L{TicketStore.add}).
    Times are whole seconds on the store's clock (C{int(clock.seconds())}).

    @ivar uuid: the ticket id, used in C{/images/{uuid}}.
    @ivar size: the accessible byte range is C{[0, size)}.
    @ivar ops: the allowed operations as given (C{"read"}, C{"write"}).
    @ivar timeout: seconds added to the expiry time by L{touch}.
    @ivar inactivityTimeout: idle seconds before a bound connection is
        dropped.
    @ivar url: the image url as given.
    @ivar parsedURL: C{urllib.parse.urlparse(url)}.
    @ivar transferId: the engine's transfer id, for logs and error texts.
    @ivar filename: the Content-Disposition file name, or C{None}.
    @ivar sparse: zeroing may deallocate.
    @ivar dirty: dirty extents are available.
    @ivar expires: the clock second at which the ticket expires.
    @ivar canceled: true once L{cancel} was called.
    @ivar _clock: the L{IReactorTime} giving the time and timers.
    @ivar _accessTime: the clock second of the creation or the last touch.
    @ivar _ongoing: the running L{Operation}s.
    @ivar _completed: L{RangeList} of the completed operations' ranges.
    @ivar _contexts: bound connection contexts, by C{id()}.
    @ivar _waiters: C{(Deferred, IDelayedCall)} pairs of cancels waiting
        for the last operation.
    """

    _log = Logger()

    operationClass: type[Operation] = Operation
    """
    What L{startOperation} builds (a worker's replica reports its
    operations to the main process through a subclass).
    """

    def __init__(self, clock: IReactorTime, *, uuid: str, size: int,
                 ops: list, timeout: int, url: str,
                 inactivityTimeout: int = 60, transferId: str | None = None,
                 filename: str | None = None, sparse: bool = False,
                 dirty: bool = False):
        self._clock = clock
        self.uuid = uuid
        self.size = size
        self.ops = list(ops)
        self.timeout = timeout
        self.inactivityTimeout = inactivityTimeout
        self.url = url
        self.parsedURL = urlparse(url)
        if transferId is None:
            # Engines before 4.2.7 send no transfer id; the reference derives
            # one from the first half of the uuid.
            transferId = f"(ticket/{uuid[:18]})"
        self.transferId = transferId
        self.filename = filename
        self.sparse = sparse
        self.dirty = dirty

        now = self._now()
        self.expires = now + timeout
        self._accessTime = now
        self.canceled = False
        self._ongoing: set[Operation] = set()
        self._completed = RangeList()
        self._contexts: dict[int, Any] = {}
        self._waiters: list[tuple[Deferred, IDelayedCall]] = []

    @classmethod
    def fromDict(cls, d: Any, clock: IReactorTime,
                 inactivityTimeout: int = 60) -> Ticket:
        """
        Validate a decoded C{PUT /tickets} body and build the ticket.

        Fields are checked in the reference's order, so the first error
        reported is the same.

        @param d: the decoded JSON document.
        @param inactivityTimeout: the default for C{inactivity_timeout}.
        @raise BadRequest: C{Invalid ticket: <reason>}.
        """
        if not isinstance(d, dict):
            # The reference rejects this too, with a meaningless text.
            kind = _JSON_NAMES.get(type(d), type(d).__name__)
            raise _invalid(f"expecting a JSON object, got {kind}")
        uuid = _required(d, "uuid", str)
        size = _required(d, "size", int)
        ops = _required(d, "ops", list)
        # A negative timeout is taken, as the reference takes it: the
        # ticket is born expired, and can be read back (and extended).
        timeout = _required(d, "timeout", int, minval=-MAX_INTEGER)
        inactivity = _optional(d, "inactivity_timeout", int,
                               default=inactivityTimeout)
        url = _required(d, "url", str)
        try:
            scheme = urlparse(url).scheme
        except ValueError as e:
            # e.g. "http://[1.2.3.4:33": "Invalid IPv6 URL".
            raise _invalidValue("url", url, str(e))
        if scheme not in SCHEMES:
            raise _invalidValue(
                "url", url, f"Unsupported url scheme: {scheme}")
        return cls(
            clock, uuid=uuid, size=size, ops=ops, timeout=timeout, url=url,
            inactivityTimeout=inactivity,
            transferId=_optional(d, "transfer_id", str),
            filename=_optional(d, "filename", str),
            sparse=_optional(d, "sparse", bool, default=False),
            dirty=_optional(d, "dirty", bool, default=False))

    def _now(self) -> int:
        # The reference keeps whole seconds; expires and idle_time are
        # integers in the status JSON.
        return int(self._clock.seconds())

    # -- state ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """
        True while operations run.
        """
        return bool(self._ongoing)

    @property
    def idleTime(self) -> int:
        """
        0 while active, else whole seconds since the last access.
        """
        if self._ongoing:
            return 0
        return self._now() - self._accessTime

    @property
    def connections(self) -> int:
        """
        The number of bound connection contexts.
        """
        return len(self._contexts)

    def expired(self) -> bool:
        """
        True when the expiry time has been reached.
        """
        # Compared with the unrounded clock, like the reference.
        return self.expires <= self._clock.seconds()

    def may(self, op: str) -> bool:
        """
        Whether C{op} is allowed; C{"write"} implies C{"read"}.
        """
        if op == "read":
            return "read" in self.ops or "write" in self.ops
        return op in self.ops

    def transferred(self) -> int | None:
        """
        Bytes transferred: the union of the completed operations' ranges
        and the ongoing operations' progress. C{None} for tickets with more
        than one op, where a sum of reads and writes means nothing.
        """
        if len(self.ops) > 1:
            return None
        return self._completed.totalWith(op.range for op in self._ongoing)

    def info(self) -> dict:
        """
        The status document of C{GET /tickets/{id}}.
        """
        info = {
            "active": self.active,
            "canceled": self.canceled,
            "connections": self.connections,
            "expires": self.expires,
            "idle_time": self.idleTime,
            "inactivity_timeout": self.inactivityTimeout,
            "ops": list(self.ops),
            "size": self.size,
            "sparse": self.sparse,
            "dirty": self.dirty,
            "timeout": self.timeout,
            "url": self._statusURL(),
            "uuid": self.uuid,
        }
        # The reference omits empty strings here.
        if self.transferId:
            info["transfer_id"] = self.transferId
        if self.filename:
            info["filename"] = self.filename
        transferred = self.transferred()
        if transferred is not None:
            info["transferred"] = transferred
        return info

    def _statusURL(self) -> str:
        # The reference re-serialises the url ("FILE:/x?" -> "file:///x").
        # Doing that to our own nbd+unix scheme would drop the empty
        # authority ("nbd+unix:///sda?socket=..." -> "nbd+unix:/sda?..."),
        # since urllib does not know the scheme uses one: show it as given.
        if self.parsedURL.scheme == "nbd+unix":
            return self.url
        return urlunparse(self.parsedURL)

    # -- time ----------------------------------------------------------------

    def touch(self) -> None:
        """
        Extend by C{timeout} and reset the idle time. Called by the web
        layer (OPTIONS on the ticket); completed operations do the same
        through L{_touchNow}.
        """
        self._touchNow()

    def _touchNow(self) -> None:
        now = self._now()
        self.expires = now + self.timeout
        self._accessTime = now

    def extend(self, timeout: int) -> None:
        """
        Expire C{timeout} seconds from now (C{PATCH /tickets/{id}}). The
        stored C{timeout}, used by later touches, is unchanged, and so is
        the idle time.
        """
        self.expires = self._now() + timeout

    # -- connections ---------------------------------------------------------

    def bind(self, context: Any) -> None:
        """
        Attach a connection's context (anything with C{close()}, which may
        return a L{Deferred}); a cancel closes it. Binding twice counts once.

        @raise TransferCanceled: the ticket was canceled.
        """
        if self.canceled:
            raise TransferCanceled(self.transferId)
        self._contexts[id(context)] = context

    def adoptContext(self, context: Any) -> None:
        """
        Like L{bind}, but never refused: for a connection that is already
        bound in a worker process, which may have bound it before it
        learned about a cancel. A cancel closes it like any other.
        """
        self._contexts[id(context)] = context

    def unbind(self, context: Any) -> None:
        """
        Detach a context. It is not closed: its owner closes it. Unknown
        contexts are ignored.
        """
        self._contexts.pop(id(context), None)

    # -- operations ----------------------------------------------------------

    def startOperation(self, offset: int, length: int) -> Operation:
        """
        Register a running operation on C{[offset, offset + length)}.

        @raise TransferCanceled: the ticket was canceled.
        """
        if self.canceled:
            raise TransferCanceled(self.transferId)
        op = self.operationClass(self, offset, length)
        self._ongoing.add(op)
        return op

    def adoptOperation(self, offset: int, length: int) -> Operation:
        """
        Register an operation that already runs elsewhere (in a worker
        process, which authorized it against its replica of this ticket).
        Never refused: the worker may have started it before it learned
        about a cancel; it is flagged canceled then, and a cancel waits
        for it like for any other.
        """
        op = Operation(self, offset, length)
        op.canceled = self.canceled
        self._ongoing.add(op)
        return op

    def markCanceled(self) -> None:
        """
        Refuse new operations and bindings and flag the running operations
        canceled, without waiting or closing anything: what a worker's
        replica does when the main process cancels the ticket (the main
        process waits and closes).
        """
        self.canceled = True
        for op in self._ongoing:
            op.canceled = True

    def _operationFinished(self, op: Operation, record: bool = True) -> None:
        self._ongoing.discard(op)
        if self.canceled or not record:
            # A canceled operation is not recorded and does not extend the
            # ticket. The last one lets a waiting cancel complete.
            if self.canceled and not self._ongoing and self._waiters:
                self._log.debug(
                    "Last operation of transfer {transfer} finished",
                    transfer=self.transferId)
                self._wakeWaiters()
            return
        if len(self.ops) == 1:
            self._completed.add(op.offset, op.offset + op.done)
        self._touchNow()

    # -- cancel --------------------------------------------------------------

    def cancel(self, timeout: float = 60) -> Deferred[bool]:
        """
        Cancel the ticket: new operations and bindings are refused and
        running operations stop at their next L{Operation.check}.

        @param timeout: seconds to wait for running operations. With 0,
            do not wait: the caller polls C{active} and cancels again.
        @return: L{Deferred} firing with C{True} once no operation runs and
            the bound contexts were closed (the ticket may be dropped), or
            with C{False} at once when C{timeout} is 0 and operations still
            run. Fails with L{Conflict} if they still run after C{timeout}
            seconds; the ticket stays canceled.
        """
        self.canceled = True
        if not self._ongoing:
            self._log.debug("Transfer {transfer} canceled",
                            transfer=self.transferId)
            return self._closeContexts().addCallback(lambda _: True)

        self._log.debug("Canceling {n} operations of transfer {transfer}",
                        n=len(self._ongoing), transfer=self.transferId)
        for op in self._ongoing:
            op.canceled = True
        if not timeout:
            return succeed(False)

        self._log.info("Waiting until transfer {transfer} operations finish",
                       transfer=self.transferId)
        waiter: Deferred[bool] = Deferred(self._forgetWaiter)
        call = self._clock.callLater(timeout, self._timedOut, waiter)
        self._waiters.append((waiter, call))
        return waiter

    def _takeWaiter(self, waiter: Deferred) -> IDelayedCall | None:
        for i, (d, call) in enumerate(self._waiters):
            if d is waiter:
                del self._waiters[i]
                return call
        return None

    def _forgetWaiter(self, waiter: Deferred) -> None:
        # The caller gave up (e.g. the DELETE request's client went away).
        call = self._takeWaiter(waiter)
        if call is not None and call.active():
            call.cancel()

    def _timedOut(self, waiter: Deferred) -> None:
        self._takeWaiter(waiter)
        self._log.warn("Timeout cancelling transfer {transfer}",
                       transfer=self.transferId)
        waiter.errback(Conflict(f"Timeout cancelling transfer "
                                f"{self.transferId}"))

    def _wakeWaiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for _, call in waiters:
            if call.active():
                call.cancel()

        def wake(_: object) -> None:
            self._log.info("Transfer {transfer} canceled",
                           transfer=self.transferId)
            for d, _call in waiters:
                d.callback(True)

        self._closeContexts().addCallback(wake)

    def _closeContexts(self) -> Deferred[None]:
        """
        Close every bound context (the reference closes idle connections'
        backends here) and wait for them, so that the image is released
        when the cancel completes (vdsm deactivates the volume next).
        Close failures are logged, not raised.
        """
        closing = []
        for context in list(self._contexts.values()):
            d = maybeDeferred(context.close)
            d.addErrback(
                lambda f: self._log.failure(
                    "Closing context of transfer {transfer} failed", f,
                    transfer=self.transferId))
            closing.append(d)
        if not closing:
            return succeed(None)
        return DeferredList(closing).addCallback(lambda _: None)

    def __repr__(self) -> str:
        return (f"<Ticket uuid={self.uuid!r} transfer={self.transferId!r} "
                f"ops={self.ops!r} size={self.size!r} "
                f"expires={self.expires} active={self.active} "
                f"canceled={self.canceled} connections={self.connections}>")


# ---------------------------------------------------------------------------
# The store


class ITicketStore(Interface):
    """
    Where tickets live: the control API adds and removes them, the images
    API authorizes requests against them.
    """

    inactivityTimeout = Attribute(
        "C{int}: default C{inactivity_timeout} of new tickets.")

    def add(ticketDict):
        """
        Validate a decoded C{PUT /tickets} body and store the ticket under
        its C{uuid}, replacing (without cancelling) any ticket with that id.

        @return: the new L{Ticket}.
        @raise BadRequest: C{Invalid ticket: <reason>}.
        """

    def get(ticketId):
        """
        @return: the L{Ticket}, expired or not.
        @raise NotFound: C{No such ticket '<id>'}.
        """

    def remove(ticketId, timeout):
        """
        Cancel and delete a ticket (C{DELETE /tickets/{id}}); unknown ids
        succeed.

        @return: L{Deferred} firing with C{None}, or failing with
            L{Conflict} when operations still run after C{timeout} seconds.
        """

    def clear():
        """
        Drop every ticket without cancelling (C{DELETE /tickets/}).
        """

    def authorize(ticketId, op):
        """
        Check that C{op} (C{"read"} or C{"write"}) may run now.

        @return: the L{Ticket}.
        @raise Forbidden: with the reference's text.
        """

    def __len__():
        """
        The number of tickets.
        """

    def __iter__():
        """
        Iterate over the L{Ticket}s (for metrics).
        """

    def flush():
        """
        Wait until the changes made so far are visible wherever requests
        are authorized (the worker processes' replicas).

        @return: L{Deferred} firing with C{None}; it never fails.
        """


@implementer(ITicketStore)
class TicketStore:
    """
    The daemon's tickets, in memory, keyed by uuid.

    @ivar inactivityTimeout: default C{inactivity_timeout} of new tickets
        (the daemon's C{daemon.inactivity_timeout}).
    @ivar _clock: the L{IReactorTime} the tickets use.
    @ivar _tickets: C{dict} of uuid to L{Ticket}.
    """

    _log = Logger()

    ticketClass: type[Ticket] = Ticket
    """
    What L{add} builds.
    """

    def __init__(self, clock: IReactorTime, inactivityTimeout: int = 60):
        self._clock = clock
        self.inactivityTimeout = inactivityTimeout
        self._tickets: dict[str, Ticket] = {}

    def add(self, ticketDict: Any) -> Ticket:
        ticket = self.ticketClass.fromDict(ticketDict, self._clock,
                                           self.inactivityTimeout)
        self._tickets[ticket.uuid] = ticket
        return ticket

    def get(self, ticketId: str) -> Ticket:
        try:
            return self._tickets[ticketId]
        except KeyError:
            raise NotFound(f"No such ticket {ticketId!r}") from None

    def remove(self, ticketId: str, timeout: float = 60) -> Deferred[None]:
        ticket = self._tickets.get(ticketId)
        if ticket is None:
            self._log.debug("Ticket {uuid} does not exist", uuid=ticketId)
            return succeed(None)

        def canceled(unused: bool) -> None:
            # Delete only this object: a PUT may have replaced it while the
            # cancel waited.
            if unused and self._tickets.get(ticketId) is ticket:
                del self._tickets[ticketId]

        return ticket.cancel(timeout).addCallback(canceled)

    def clear(self) -> None:
        self._tickets.clear()

    def authorize(self, ticketId: str, op: str) -> Ticket:
        ticket = self._tickets.get(ticketId)
        if ticket is None:
            raise Forbidden(_notAllowed(f"No such ticket {ticketId}"))
        tid = ticket.transferId
        if ticket.canceled:
            raise Forbidden(_notAllowed(f"Transfer={tid} was canceled"))
        if ticket.expired():
            raise Forbidden(_notAllowed(f"Transfer={tid} expired"))
        if not ticket.may(op):
            raise Forbidden(_notAllowed(f"Transfer={tid} forbids {op}"))
        return ticket

    def __len__(self) -> int:
        return len(self._tickets)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(list(self._tickets.values()))

    def __contains__(self, ticketId: object) -> bool:
        return ticketId in self._tickets

    def flush(self) -> Deferred[None]:
        # One process: every change is visible at once.
        return succeed(None)


# ---------------------------------------------------------------------------
# Production clock


@implementer(IReactorTime)
class MonotonicClock:
    """
    An L{IReactorTime} whose C{seconds()} is C{time.monotonic()}.

    Ticket expiry must not move when the system time is set (NTP steps, an
    administrator, a VM resumed from suspend): C{reactor.seconds()} is the
    wall clock, so a step backwards would keep tickets alive for hours and a
    step forwards would expire running transfers (SPEC A12). The reference
    uses a monotonic source for the same reason.

    Timers are delegated to the reactor unchanged: C{callLater} takes a
    delay relative to now, which means the same on either clock. The
    L{IDelayedCall}s it returns report times (C{getTime}) on the reactor's
    clock, not on this one.

    @ivar _reactor: the L{IReactorTime} that runs the timers.
    """

    def __init__(self, reactor: IReactorTime,
                 monotonic: Callable[[], float] = time.monotonic):
        self._reactor = reactor
        self._monotonic = monotonic

    def seconds(self) -> float:
        return self._monotonic()

    def callLater(self, delay: float, callable: Callable[..., Any],
                  *args: object, **kw: object) -> IDelayedCall:
        return self._reactor.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self):
        return self._reactor.getDelayedCalls()
