# -*- test-case-name: test.test_workers -*-
"""
Worker processes: C{[daemon] workers = N} with N > 1.

The main process binds the listening sockets (remote, local) and keeps the
control service and the authoritative ticket store
(L{SharedTicketStore}). It never accepts on the images sockets: N worker
processes (C{python -m imageio.workers}, spawned and restarted by
L{WorkerPool}) adopt them (C{reactor.adoptStreamPort}) and serve C{/images}
and C{/info}, so TLS and HTTP parsing use N cores.

Each worker talks AMP with the main process over a socketpair:

    main -> worker   AddTicket, SetExpires, CancelTicket, RemoveTicket,
                     ClearTickets, CloseContext, ReloadTLS
    worker -> main   Hello (answered after the ticket snapshot),
                     OperationStarted, OperationsProgress (batched),
                     OperationFinished, ContextBound, ContextUnbound,
                     Touched

A worker authorizes against its replica (L{ReplicaStore}) without asking
the main process; the web layer sees the ordinary L{ITicketStore} /
L{Ticket} / L{Operation} API. Replica operations and bindings are reported
to the main process, which mirrors them on its tickets
(L{Ticket.adoptOperation}, L{Ticket.adoptContext}), so C{GET /tickets}
shows exact C{active}, C{connections}, C{transferred}, C{expires} and
C{idle_time} once an operation's finish report arrived; a running
operation's progress lags by at most L{PROGRESS_INTERVAL}.

Ordering carries the consistency: AMP is one ordered stream per worker.
A cancel in the main process marks the ticket canceled, sends
CancelTicket to every worker and waits for the answers; each worker
answers after it flagged its operations and after every report it sent
before, so when the answers are in the main process knows every
operation that can still touch the image, and waits for those
(C{remove_timeout}, 409) exactly as one process does. Control requests
that change tickets answer only once every worker acknowledged the change
(L{SharedTicketStore.flush}).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import weakref
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import (
    FilteringLogObserver, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver)
from twisted.protocols import amp
from twisted.python.threadpool import ThreadPool

from imageio import logs
from imageio.logs import Logger
from imageio import tickets
from imageio.errors import Conflict

__all__ = ["SharedTicketStore", "ReplicaStore", "WorkerPool",
           "PROGRESS_INTERVAL", "main"]

_log = Logger()

PROGRESS_INTERVAL = 0.1
"""
Seconds between a worker's progress reports (one message for all its
running operations).
"""

# How long a control request waits for workers to acknowledge a change,
# and a cancel with remove_timeout = 0 for their answers. Only a hung
# worker makes these matter.
_SYNC_TIMEOUT = 5.0

# Restart backoff: the first restart is quick, repeated quick deaths wait
# up to _MAX_BACKOFF; a worker that lived _STABLE seconds resets it.
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
_STABLE = 10.0

# Seconds a stopping worker gets between SIGTERM and SIGKILL.
_STOP_TIMEOUT = 10.0

# File descriptors in a worker.
_FD_AMP, _FD_REMOTE, _FD_LOCAL = 3, 4, 5


# ---------------------------------------------------------------------------
# AMP commands

class _NoAnswer(amp.Command):
    requiresAnswer = False


class _BigUnicode(amp.Argument):
    """
    A text of any length. An AMP value holds at most 64 KiB
    (C{amp.MAX_VALUE_LENGTH}), and a ticket is as long as the control API
    accepts (a 70 kB url or filename made C{AddTicket} fail with
    C{TooLong}): the UTF-8 bytes are split over the keys C{name},
    C{name.1}, C{name.2}...
    """

    def fromBox(self, name, strings, objects, proto):
        parts = [strings[name]]
        i = 1
        while True:
            key = b"%s.%d" % (name, i)
            if key not in strings:
                break
            parts.append(strings[key])
            i += 1
        objects[name.decode("ascii")] = b"".join(parts).decode("utf-8")

    def toBox(self, name, strings, objects, proto):
        data = objects[name.decode("ascii")].encode("utf-8")
        size = amp.MAX_VALUE_LENGTH
        strings[name] = data[:size]
        for i, start in enumerate(range(size, len(data), size), 1):
            strings[b"%s.%d" % (name, i)] = data[start:start + size]


class AddTicket(amp.Command):
    arguments = [(b"gen", amp.Integer()), (b"ticket", _BigUnicode()),
                 (b"expires", amp.Integer()), (b"canceled", amp.Boolean())]


class SetExpires(amp.Command):
    arguments = [(b"gen", amp.Integer()), (b"expires", amp.Integer())]


class CancelTicket(amp.Command):
    arguments = [(b"gen", amp.Integer())]


class RemoveTicket(amp.Command):
    arguments = [(b"gen", amp.Integer())]


class ClearTickets(amp.Command):
    arguments: list = []


class CloseContext(amp.Command):
    arguments = [(b"gen", amp.Integer()), (b"context", amp.Integer())]


class ReloadTLS(amp.Command):
    arguments: list = []
    response = [(b"reloaded", amp.Boolean())]


class GetMetrics(amp.Command):
    arguments: list = []
    response = [(b"samples", _BigUnicode())]


class Hello(amp.Command):
    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]


class OperationStarted(_NoAnswer):
    arguments = [(b"gen", amp.Integer()), (b"op", amp.Integer()),
                 (b"offset", amp.Integer()), (b"length", amp.Integer())]


class OperationsProgress(_NoAnswer):
    arguments = [(b"progress", amp.AmpList(
        [(b"op", amp.Integer()), (b"done", amp.Integer())]))]


class OperationFinished(_NoAnswer):
    arguments = [(b"op", amp.Integer()), (b"done", amp.Integer())]


class ContextBound(_NoAnswer):
    arguments = [(b"gen", amp.Integer()), (b"context", amp.Integer())]


class ContextUnbound(_NoAnswer):
    arguments = [(b"gen", amp.Integer()), (b"context", amp.Integer())]


class Touched(_NoAnswer):
    arguments = [(b"gen", amp.Integer())]


def _ticketFields(ticket: tickets.Ticket) -> str:
    return json.dumps({
        "uuid": ticket.uuid, "size": ticket.size, "ops": ticket.ops,
        "timeout": ticket.timeout, "url": ticket.url,
        "inactivityTimeout": ticket.inactivityTimeout,
        "transferId": ticket.transferId, "filename": ticket.filename,
        "sparse": ticket.sparse, "dirty": ticket.dirty})


# ---------------------------------------------------------------------------
# Main process: the authoritative store


class _SharedTicket(tickets.Ticket):
    """
    A ticket of the main process whose changes reach the workers.

    @ivar gen: the generation: a number unique to this ticket object, so
        that reports about a replaced ticket do not land on its successor.
    @ivar _hub: the L{_Hub}.
    """

    gen = 0
    _hub: _Hub | None = None

    def _touchNow(self) -> None:
        old = self.expires
        super()._touchNow()
        if self.expires != old and self._hub is not None:
            # Whole seconds: at most one message a second per ticket.
            self._hub.broadcast(SetExpires, gen=self.gen,
                                expires=self.expires)

    def extend(self, timeout: int) -> None:
        super().extend(timeout)
        if self._hub is not None:
            self._hub.broadcast(SetExpires, gen=self.gen,
                                expires=self.expires)

    def cancel(self, timeout: float = 60) -> defer.Deferred[bool]:
        if self._hub is None:
            return super().cancel(timeout)
        self.canceled = True
        clock = self._clock
        start = clock.seconds()
        acks = self._hub.broadcast(CancelTicket, gen=self.gen)
        acks.addTimeout(timeout or _SYNC_TIMEOUT, clock)

        def answered(_: object) -> defer.Deferred[bool]:
            if not timeout:
                return tickets.Ticket.cancel(self, 0)
            remaining = max(timeout - (clock.seconds() - start), 0.001)
            return tickets.Ticket.cancel(self, remaining)

        def noAnswer(failure):
            failure.trap(defer.CancelledError, defer.TimeoutError)
            _log.warn("Workers did not answer the cancel of transfer "
                      "{transfer}", transfer=self.transferId)
            if not timeout:
                return False
            raise Conflict(f"Timeout cancelling transfer {self.transferId}")

        return acks.addCallbacks(answered, noAnswer)


class SharedTicketStore(tickets.TicketStore):
    """
    The main process's L{tickets.TicketStore}: every change is sent to the
    workers' replicas, and the workers' operations and bindings are
    mirrored on its tickets.
    """

    ticketClass = _SharedTicket

    def __init__(self, clock, inactivityTimeout: int = 60):
        super().__init__(clock, inactivityTimeout)
        self.hub = _Hub(self, clock)
        self._gen = 0

    def add(self, ticketDict: Any) -> tickets.Ticket:
        ticket = super().add(ticketDict)
        self._gen += 1
        ticket.gen = self._gen
        ticket._hub = self.hub
        self.hub.register(ticket)
        self.hub.broadcast(AddTicket, **_addArgs(ticket))
        return ticket

    def remove(self, ticketId: str, timeout: float = 60):
        ticket = self._tickets.get(ticketId)
        d = super().remove(ticketId, timeout)

        def removed(result):
            if ticket is not None and self._tickets.get(ticketId) \
                    is not ticket:
                self.hub.broadcast(RemoveTicket, gen=ticket.gen)
            return result

        return d.addCallback(removed)

    def clear(self) -> None:
        super().clear()
        self.hub.broadcast(ClearTickets)

    def flush(self) -> defer.Deferred[None]:
        return self.hub.flush()

    def snapshot(self):
        return list(self._tickets.values())


def _addArgs(ticket: _SharedTicket) -> dict:
    return dict(gen=ticket.gen, ticket=_ticketFields(ticket),
                expires=ticket.expires, canceled=ticket.canceled)


class _RemoteContext:
    """
    A connection bound to a ticket in a worker; a cancel closes it there.
    """

    def __init__(self, worker: _MainSide, ticket, gen: int, cid: int):
        self.worker = worker
        self.ticket = ticket
        self.gen = gen
        self.cid = cid

    def close(self) -> defer.Deferred:
        d = self.worker.callRemote(CloseContext, gen=self.gen,
                                   context=self.cid)
        # A dead worker closed everything already.
        return d.addErrback(lambda _: None)


class _Hub:
    """
    The main process's side of the workers' AMP connections.

    @ivar workers: the L{_MainSide} connections that said Hello.
    @ivar _tickets: generation to ticket, for reports.
    @ivar _pending: broadcasts not yet acknowledged (see L{flush}).
    """

    def __init__(self, store: SharedTicketStore, clock):
        self.store = store
        self.clock = clock
        self.workers: set[_MainSide] = set()
        self._tickets: weakref.WeakValueDictionary[int, tickets.Ticket] = \
            weakref.WeakValueDictionary()
        self._pending: set[defer.Deferred] = set()
        self._readyWaiters: list[tuple[int, defer.Deferred]] = []

    def register(self, ticket) -> None:
        self._tickets[ticket.gen] = ticket

    def ticket(self, gen: int):
        return self._tickets.get(gen)

    def broadcast(self, command, track: bool = True,
                  **kw) -> defer.Deferred:
        """
        Send C{command} to every worker.

        @param track: L{flush} waits for the answers (ticket changes);
            false for commands that may take long and that no control
            request waits for (L{ReloadTLS}).
        @return: L{Deferred} firing when every worker answered or went
            away.
        """
        ds = [self._send(w, command, kw) for w in list(self.workers)]
        d = defer.DeferredList(ds)
        if track and not d.called:
            self._pending.add(d)
            d.addBoth(lambda r: (self._pending.discard(d), r)[1])
        return d

    def flush(self) -> defer.Deferred[None]:
        if not self._pending:
            return defer.succeed(None)
        d = defer.DeferredList(list(self._pending))
        d.addTimeout(_SYNC_TIMEOUT, self.clock)
        d.addErrback(lambda f: _log.warn(
            "Workers did not acknowledge a ticket change: {error}",
            error=f.getErrorMessage()))
        return d.addCallback(lambda _: None)

    def _send(self, worker: _MainSide, command, kw: dict) -> defer.Deferred:
        # A worker that went away answers nothing, and that is fine; any
        # other failure (sending raises synchronously for a value AMP
        # cannot carry) is logged, never raised into the caller (a control
        # request or a worker's Hello).
        try:
            d = worker.callRemote(command, **kw)
        except Exception:
            _log.failure("Sending {command} to worker {index} failed",
                         command=command.__name__, index=worker.index)
            return defer.succeed(None)
        return d.addErrback(lambda _: None)

    def hello(self, worker: _MainSide) -> None:
        # The snapshot goes out before the Hello answer, and the worker is
        # a broadcast target from now on: it misses nothing.
        for ticket in self.store.snapshot():
            self._send(worker, AddTicket, _addArgs(ticket))
        self.workers.add(worker)
        waiters, self._readyWaiters = self._readyWaiters, []
        for n, d in waiters:
            if len(self.workers) >= n:
                d.callback(None)
            else:
                self._readyWaiters.append((n, d))

    def whenConnected(self, n: int) -> defer.Deferred:
        """
        @return: L{Deferred} firing once C{n} workers said Hello.
        """
        d = defer.Deferred()
        if len(self.workers) >= n:
            d.callback(None)
        else:
            self._readyWaiters.append((n, d))
        return d


class _MainSide(amp.AMP):
    """
    The main process's end of one worker's AMP connection.

    @ivar ops: the worker's running operations, by its operation id, as
        operations on the main process's tickets.
    @ivar contexts: the worker's bound connections, by C{(gen, id)}.
    """

    def __init__(self, hub: _Hub, index: int):
        super().__init__()
        self.hub = hub
        self.index = index
        self.ops: dict[int, tickets.Operation] = {}
        self.contexts: dict[tuple[int, int], _RemoteContext] = {}

    @Hello.responder
    def _hello(self, index, pid):
        _log.info("worker {index} (pid {pid}) connected", index=index,
                  pid=pid)
        self.hub.hello(self)
        return {}

    @OperationStarted.responder
    def _started(self, gen, op, offset, length):
        ticket = self.hub.ticket(gen)
        if ticket is not None:
            self.ops[op] = ticket.adoptOperation(offset, length)
        return {}

    @OperationsProgress.responder
    def _progress(self, progress):
        for item in progress:
            op = self.ops.get(item["op"])
            if op is not None:
                op.done = item["done"]
        return {}

    @OperationFinished.responder
    def _finished(self, op, done):
        operation = self.ops.pop(op, None)
        if operation is not None:
            operation.done = done
            operation.finish()
        return {}

    @ContextBound.responder
    def _bound(self, gen, context):
        ticket = self.hub.ticket(gen)
        if ticket is not None:
            ctx = _RemoteContext(self, ticket, gen, context)
            self.contexts[(gen, context)] = ctx
            ticket.adoptContext(ctx)
        return {}

    @ContextUnbound.responder
    def _unbound(self, gen, context):
        ctx = self.contexts.pop((gen, context), None)
        if ctx is not None:
            ctx.ticket.unbind(ctx)
        return {}

    @Touched.responder
    def _touched(self, gen):
        ticket = self.hub.ticket(gen)
        if ticket is not None:
            ticket.touch()
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.hub.workers.discard(self)
        # The worker is gone, and its connections with it: unbind them,
        # and release its operations (not counted as transferred).
        contexts, self.contexts = self.contexts, {}
        for ctx in contexts.values():
            ctx.ticket.unbind(ctx)
        ops, self.ops = self.ops, {}
        for op in ops.values():
            op.release()
        if ops or contexts:
            _log.warn("worker {index} lost: released {ops} operations and "
                      "{contexts} connections", index=self.index,
                      ops=len(ops), contexts=len(contexts))


# ---------------------------------------------------------------------------
# Main process: spawning and supervising


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int):
        self.pool = pool
        self.index = index
        self.pid = None
        self.started = 0.0
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason):
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Spawns C{count} workers, restarts those that die (with backoff) and
    stops them with the service (SIGTERM, then SIGKILL after
    L{_STOP_TIMEOUT}).

    @ivar procs: the running L{_WorkerProcess}es by index.
    """

    def __init__(self, reactor, hub: _Hub, count: int, confDir: str,
                 listeners: list):
        self.setName("workers")
        self.reactor = reactor
        self.hub = hub
        self.count = count
        self.confDir = confDir
        self.listeners = listeners
        self.procs: dict[int, _WorkerProcess] = {}
        self._failures = [0] * count
        self._restarts: dict[int, Any] = {}
        self._stopping = False

    def startService(self):
        super().startService()
        for listener in self.listeners:
            # Bound and listening, but the main process never accepts:
            # only the workers do.
            listener.port.stopReading()
        for index in range(self.count):
            self._spawn(index)

    def whenReady(self) -> defer.Deferred:
        return self.hub.whenConnected(self.count)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        import imageio
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs = {0: 0, 1: 1, 2: 2, _FD_AMP: theirs.fileno()}
        fds = [_FD_REMOTE, _FD_LOCAL]
        for fd, listener in zip(fds, self.listeners):
            childFDs[fd] = listener.port.fileno()
        path = os.path.dirname(os.path.dirname(imageio.__file__))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [path, env.get("PYTHONPATH")] if p)
        args = [sys.executable, "-m", "imageio.workers",
                "--conf-dir", self.confDir, "--index", str(index),
                "--listeners", str(len(self.listeners))]
        proc = _WorkerProcess(self, index)
        try:
            transport = self.reactor.spawnProcess(
                proc, sys.executable, args, env=env, childFDs=childFDs)
        finally:
            theirs.close()
        proc.pid = transport.pid
        proc.started = self.reactor.seconds()
        self.procs[index] = proc
        factory = protocol.Factory.forProtocol(
            lambda: _MainSide(self.hub, index))
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           factory)
        ours.close()
        _log.info("worker {index} started (pid {pid})", index=index,
                  pid=proc.pid)

    def _ended(self, proc: _WorkerProcess, reason) -> None:
        if self.procs.get(proc.index) is proc:
            del self.procs[proc.index]
        if self._stopping:
            _log.info("worker {index} (pid {pid}) stopped", index=proc.index,
                      pid=proc.pid)
            return
        index = proc.index
        lived = self.reactor.seconds() - proc.started
        if lived >= _STABLE:
            self._failures[index] = 0
        delay = min(_MAX_BACKOFF, _MIN_BACKOFF * 2 ** self._failures[index])
        self._failures[index] += 1
        _log.error("worker {index} (pid {pid}) died ({status}); restarting "
                   "in {delay} s", index=index, pid=proc.pid,
                   status=reason.getErrorMessage(), delay=delay)
        self._restarts[index] = self.reactor.callLater(
            delay, self._spawn, index)

    def metricsSamples(self) -> defer.Deferred:
        """
        @return: L{Deferred} firing with the L{Metrics.samples} of every
            worker that answered within L{_SYNC_TIMEOUT} seconds (a list of
            them); a worker that does not is left out and logged.
        """
        def ask(worker):
            try:
                d = worker.callRemote(GetMetrics)
            except Exception:
                _log.failure("Asking worker {index} for metrics failed",
                             index=worker.index)
                return defer.succeed(None)
            d.addTimeout(_SYNC_TIMEOUT, self.reactor)
            d.addCallback(lambda r: json.loads(r["samples"]))
            d.addErrback(lambda f: _log.warn(
                "Worker {index} sent no metrics: {error}",
                index=worker.index, error=f.getErrorMessage()))
            return d
        ds = [ask(w) for w in list(self.hub.workers)]
        d = defer.gatherResults(ds) if ds else defer.succeed([])
        return d.addCallback(lambda results: [r for r in results if r])

    def reloadTLS(self) -> defer.Deferred:
        # Each worker reads the files off its reactor thread, within
        # tls.RELOAD_TIMEOUT; ticket changes do not wait for it.
        return self.hub.broadcast(ReloadTLS, track=False)

    def stopService(self):
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        procs = list(self.procs.values())
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        def kill():
            for proc in procs:
                if not proc.ended.called:
                    _log.warn("worker {index} (pid {pid}) did not stop; "
                              "killing it", index=proc.index, pid=proc.pid)
                    try:
                        os.kill(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        killer = self.reactor.callLater(_STOP_TIMEOUT, kill)
        d = defer.DeferredList([p.ended for p in procs])

        def done(_):
            if killer.active():
                killer.cancel()

        return d.addCallback(done)


# ---------------------------------------------------------------------------
# Worker process: the replica


class _ReplicaOperation(tickets.Operation):
    """
    An operation in a worker: its start, progress and finish reach the
    main process. C{progress} is the hot path (every chunk): it only
    marks the operation for the next batched report.
    """

    __slots__ = ("id", "_dirty")

    def __init__(self, ticket, offset: int, length: int):
        super().__init__(ticket, offset, length)
        self.id = 0
        self._dirty = False

    def progress(self, n: int) -> None:
        self.done += n
        if not self._dirty:
            self._dirty = True
            self.ticket._reporter.progressed(self)

    def finish(self) -> None:
        if self.finished:
            return
        super().finish()
        self.ticket._reporter.finished(self)


class _ReplicaTicket(tickets.Ticket):
    """
    A worker's copy of a main-process ticket; reports what the web layer
    does with it.
    """

    operationClass = _ReplicaOperation
    gen = 0
    _reporter: _Reporter

    def startOperation(self, offset: int, length: int) -> tickets.Operation:
        op = super().startOperation(offset, length)
        self._reporter.started(op)
        return op

    def bind(self, context) -> None:
        new = id(context) not in self._contexts
        super().bind(context)
        if new:
            self._reporter.send(ContextBound, gen=self.gen,
                                context=id(context))

    def unbind(self, context) -> None:
        if id(context) in self._contexts:
            super().unbind(context)
            self._reporter.send(ContextUnbound, gen=self.gen,
                                context=id(context))

    def touch(self) -> None:
        super().touch()
        self._reporter.send(Touched, gen=self.gen)

    def context(self, cid: int):
        return self._contexts.get(cid)


class ReplicaStore(tickets.TicketStore):
    """
    A worker's tickets: what the main process sent, authorized locally.
    """

    ticketClass = _ReplicaTicket

    def __init__(self, clock, reporter: _Reporter,
                 inactivityTimeout: int = 60):
        super().__init__(clock, inactivityTimeout)
        self._reporter = reporter
        self._byGen: weakref.WeakValueDictionary[int, _ReplicaTicket] = \
            weakref.WeakValueDictionary()

    def install(self, gen: int, fields: dict, expires: int,
                canceled: bool) -> None:
        ticket = _ReplicaTicket(self._clock, **fields)
        ticket.gen = gen
        ticket._reporter = self._reporter
        ticket.expires = expires
        if canceled:
            ticket.markCanceled()
        self._tickets[ticket.uuid] = ticket
        self._byGen[gen] = ticket

    def byGen(self, gen: int):
        return self._byGen.get(gen)

    def drop(self, gen: int) -> None:
        ticket = self._byGen.get(gen)
        if ticket is not None and self._tickets.get(ticket.uuid) is ticket:
            del self._tickets[ticket.uuid]


class _Reporter:
    """
    Sends a worker's reports to the main process. Progress is batched:
    one message per L{PROGRESS_INTERVAL} for every operation that moved.
    """

    def __init__(self, clock):
        self.clock = clock
        self.protocol: amp.AMP | None = None
        self._nextId = 0
        self._dirty: dict[int, _ReplicaOperation] = {}
        self._timer = None

    def send(self, command, **kw) -> None:
        if self.protocol is not None:
            self.protocol.callRemote(command, **kw)

    def started(self, op: _ReplicaOperation) -> None:
        self._nextId += 1
        op.id = self._nextId
        self.send(OperationStarted, gen=op.ticket.gen, op=op.id,
                  offset=op.offset, length=op.length)

    def progressed(self, op: _ReplicaOperation) -> None:
        self._dirty[op.id] = op
        if self._timer is None:
            self._timer = self.clock.callLater(PROGRESS_INTERVAL,
                                               self.flushProgress)

    def finished(self, op: _ReplicaOperation) -> None:
        self._dirty.pop(op.id, None)
        self.send(OperationFinished, op=op.id, done=op.done)

    def flushProgress(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        dirty, self._dirty = self._dirty, {}
        items = []
        for op in dirty.values():
            op._dirty = False
            items.append({"op": op.id, "done": op.done})
        # An AMP value holds at most 64 KiB.
        for i in range(0, len(items), 1000):
            self.send(OperationsProgress, progress=items[i:i + 1000])

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _WorkerSide(amp.AMP):
    """
    A worker's end of the AMP connection.
    """

    def __init__(self, worker: WorkerService):
        super().__init__()
        self.worker = worker

    def connectionMade(self):
        super().connectionMade()
        self.worker.reporter.protocol = self
        d = self.callRemote(Hello, index=self.worker.index, pid=os.getpid())
        d.addCallbacks(lambda _: self.worker.serve(),
                       lambda f: _log.failure("Hello failed", f))

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.worker.reporter.protocol = None
        self.worker.mainLost()

    @AddTicket.responder
    def _add(self, gen, ticket, expires, canceled):
        self.worker.store.install(gen, json.loads(ticket), expires, canceled)
        return {}

    @GetMetrics.responder
    def _metrics(self):
        return {"samples": json.dumps(self.worker.metrics.samples())}

    @SetExpires.responder
    def _setExpires(self, gen, expires):
        ticket = self.worker.store.byGen(gen)
        if ticket is not None:
            ticket.expires = expires
        return {}

    @CancelTicket.responder
    def _cancel(self, gen):
        ticket = self.worker.store.byGen(gen)
        if ticket is not None:
            ticket.markCanceled()
        self.worker.reporter.flushProgress()
        return {}

    @RemoveTicket.responder
    def _remove(self, gen):
        self.worker.store.drop(gen)
        return {}

    @ClearTickets.responder
    def _clear(self):
        self.worker.store.clear()
        return {}

    @CloseContext.responder
    def _closeContext(self, gen, context):
        ticket = self.worker.store.byGen(gen)
        ctx = ticket.context(context) if ticket is not None else None
        if ctx is None:
            return {}
        return defer.maybeDeferred(ctx.close).addBoth(lambda _: {})

    @ReloadTLS.responder
    def _reloadTLS(self):
        tls = self.worker.tls
        if tls is None:
            return {"reloaded": False}
        return tls.reload().addCallback(lambda ok: {"reloaded": ok})


class WorkerService(service.MultiService):
    """
    One worker process: the replica store, the I/O thread pool and the
    adopted listening sockets (adopted once the main process sent the
    tickets).
    """

    def __init__(self, cfg, reactor, index: int, listeners: int):
        super().__init__()
        self.config = cfg
        self.reactor = reactor
        self.index = index
        self.listeners = listeners
        self.clock = tickets.MonotonicClock(reactor)
        self.reporter = _Reporter(reactor)
        self.store = ReplicaStore(
            self.clock, self.reporter,
            inactivityTimeout=cfg.daemon.inactivity_timeout)
        self.threadpool = ThreadPool(
            minthreads=0, maxthreads=max(4, 2 * cfg.daemon.max_connections),
            name="imageio-io")
        self.tls = None
        self.ports: list = []
        from imageio.web.site import reclaim
        reclaim().setServiceParent(self)
        # This worker's requests, bytes and latencies; the main process
        # adds them to its /metrics. No ticket gauges (the main process's
        # store has them) and no process_* series (the main process's).
        from imageio.metrics import Metrics
        self.metrics = Metrics(process=False)

    def startService(self):
        super().startService()
        self.threadpool.start()
        self.reactor.adoptStreamConnection(
            _FD_AMP, socket.AF_UNIX,
            protocol.Factory.forProtocol(lambda: _WorkerSide(self)))
        os.close(_FD_AMP)

    def serve(self) -> None:
        from imageio.web.site import imagesSite
        cfg = self.config
        for n, fd in enumerate([_FD_REMOTE, _FD_LOCAL][:self.listeners]):
            remote = n == 0
            factory = imagesSite(self.store, cfg, self.reactor,
                                 self.threadpool, withInfo=remote,
                                 metrics=self.metrics,
                                 name="remote" if remote else "local")
            if remote and cfg.tls.enable:
                from twisted.protocols.tls import TLSMemoryBIOFactory
                from imageio.tls import ReloadableTLS
                self.tls = ReloadableTLS(cfg.tls)
                factory = TLSMemoryBIOFactory(self.tls, False, factory)
            sock = socket.socket(fileno=fd)
            try:
                self.ports.append(self.reactor.adoptStreamPort(
                    sock.fileno(), sock.family, factory))
            finally:
                sock.close()
        _log.info("worker {index} serving", index=self.index)

    def mainLost(self) -> None:
        # The main process is gone (or stopping): stop too.
        if self.running and self.reactor.running:
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:
                pass    # already stopping (SIGTERM)

    def stopService(self):
        super().stopService()
        self.reporter.stop()
        ports, self.ports = self.ports, []
        ds = [defer.maybeDeferred(p.stopListening) for p in ports]
        self.threadpool.stop()
        return defer.DeferredList(ds)


def _observer(cfg, index: int):
    level = logs.LEVEL_NAMES.get(cfg.logger_root.level.upper())
    out = textFileLogObserver(sys.stdout)
    system = f"worker-{index}"

    def observe(event):
        if "log_system" not in event:
            level_ = event.get("log_level")
            event["log_system"] = (
                f"{system} {event.get('log_namespace', '-')}"
                f"#{level_.name if level_ else '-'}")
        out(event)

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(observe, [predicate])


def main(argv=None) -> None:
    """
    C{python -m imageio.workers --conf-dir DIR --index I --listeners N}:
    the listening sockets are fds 4 (remote) and 5 (local), the AMP
    connection to the main process fd 3. Spawned by L{WorkerPool} only.
    """
    parser = argparse.ArgumentParser(prog="imageio.workers")
    parser.add_argument("--conf-dir", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listeners", type=int, required=True)
    args = parser.parse_args(argv)

    from imageio import config as _config
    from imageio import malloc
    malloc.tune()
    cfg = _config.load(args.conf_dir)
    globalLogBeginner.beginLoggingTo([_observer(cfg, args.index)],
                                     redirectStandardIO=False)
    logs.configureLogging(cfg)

    from twisted.internet import reactor
    svc = WorkerService(cfg, reactor, args.index, args.listeners)

    def ignoreSignals():
        # The main process forwards what matters (SIGHUP as ReloadTLS);
        # a terminal's ^C or hangup to the process group must not kill
        # workers behind the main process's back.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    reactor.callWhenRunning(ignoreSignals)
    reactor.callWhenRunning(svc.startService)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
