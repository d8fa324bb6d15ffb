# -*- test-case-name: test.test_workers -*-
"""
The main process's side of the workers: the authoritative ticket store
(L{SharedTicketStore}), whose changes reach every worker and which mirrors
the workers' operations and bindings, and the L{WorkerPool} that spawns,
restarts and stops the worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import weakref
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.protocols import amp

import imageio
from imageio import tickets
from imageio.errors import Conflict
from imageio.logs import Logger
from imageio.workers.commands import (
    FD_AMP, FD_LOCAL, FD_REMOTE, AddTicket, CancelTicket, ClearTickets,
    CloseContext, ContextBound, ContextUnbound, GetMetrics, Hello,
    OperationFinished, OperationsProgress, OperationStarted, ReloadTLS,
    RemoveTicket, SetExpires, Touched)

__all__ = ["SharedTicketStore", "WorkerPool"]

_log = Logger()

# How long a control request waits for workers to acknowledge a change,
# and a cancel with remove_timeout = 0 for their answers. Only a hung
# worker makes these matter.
_SYNC_TIMEOUT = 5.0

# Restart backoff: the first restart is quick, repeated quick deaths wait
# up to _MAX_BACKOFF; a worker that lived _STABLE seconds resets it.
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
_STABLE = 10.0

# Stopping the workers: SIGTERM to all of them at once, SIGKILL to those
# still running after _KILL_AFTER seconds, and the stop ends after
# _STOP_TIMEOUT seconds whether they ended or not: a worker with a thread
# stuck in storage (a hung NFS mount) may outlive even SIGKILL for a while,
# and the daemon must exit within 10 s of SIGTERM. A worker bounds its own
# stop (its I/O pool, iopool.POOL_STOP_TIMEOUT = 5 s) below _KILL_AFTER.
_KILL_AFTER = 6.5
_STOP_TIMEOUT = 8.0


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


def _ticketFields(ticket: tickets.Ticket) -> str:
    return json.dumps({
        "uuid": ticket.uuid, "size": ticket.size, "ops": ticket.ops,
        "timeout": ticket.timeout, "url": ticket.url,
        "inactivityTimeout": ticket.inactivityTimeout,
        "transferId": ticket.transferId, "filename": ticket.filename,
        "sparse": ticket.sparse, "dirty": ticket.dirty})


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
    L{_KILL_AFTER}; the stop ends after L{_STOP_TIMEOUT} in all).

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
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        childFDs = {0: 0, 1: 1, 2: 2, FD_AMP: theirs.fileno()}
        fds = [FD_REMOTE, FD_LOCAL]
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

        def giveUp():
            left = [p for p in procs if not p.ended.called]
            _log.warn("workers {indexes} did not end {timeout} s after "
                      "SIGTERM (storage not answering?); stopping without "
                      "them", indexes=[p.index for p in left],
                      timeout=_STOP_TIMEOUT)
            done()

        def done(_=None):
            for call in (killer, limit):
                if call.active():
                    call.cancel()
            if not stopped.called:
                stopped.callback(None)

        # One bound for all: the workers stop in parallel, and the stop
        # ends after _STOP_TIMEOUT even if one never ends.
        stopped: defer.Deferred[None] = defer.Deferred()
        killer = self.reactor.callLater(_KILL_AFTER, kill)
        limit = self.reactor.callLater(_STOP_TIMEOUT, giveUp)
        defer.DeferredList([p.ended for p in procs]).addCallback(done)
        return stopped
