# -*- test-case-name: test.test_workers -*-
"""
A worker process's side: the replica of the main process's tickets
(L{ReplicaStore}), the reports of what the web layer does with them, and
the L{WorkerService} serving C{/images} and C{/info} on the adopted
listening sockets. L{main} is the entry point (C{python -m
imageio.workers}).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import weakref

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import (
    FilteringLogObserver, LogLevelFilterPredicate, globalLogBeginner,
    textFileLogObserver)
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory

from imageio import config as _config
from imageio import iopool, logs, malloc, tickets
from imageio.logs import Logger
from imageio.metrics import Metrics
from imageio.tls import ReloadableTLS
from imageio.web.site import imagesSite, reclaim
from imageio.workers.commands import (
    FD_AMP, FD_LOCAL, FD_REMOTE, AddTicket, CancelTicket, ClearTickets,
    CloseContext, ContextBound, ContextUnbound, GetMetrics, Hello,
    OperationFinished, OperationsProgress, OperationStarted, ReloadTLS,
    RemoveTicket, SetExpires, Touched)

__all__ = ["ReplicaStore", "WorkerService", "PROGRESS_INTERVAL", "main"]

_log = Logger()

PROGRESS_INTERVAL = 0.1
"""
Seconds between a worker's progress reports (one message for all its
running operations).
"""


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
        # Daemon threads, and a stop that waits for them a bounded time
        # (as in one process): a thread stuck in storage must not hold
        # the worker's exit, nor its main process's.
        self.threadpool = iopool.ioThreadPool(cfg, reactor, self)
        self.tls = None
        self.ports: list = []
        reclaim().setServiceParent(self)
        # This worker's requests, bytes and latencies; the main process
        # adds them to its /metrics. No ticket gauges (the main process's
        # store has them) and no process_* series (the main process's).
        self.metrics = Metrics(process=False)

    def startService(self):
        super().startService()
        self.reactor.adoptStreamConnection(
            FD_AMP, socket.AF_UNIX,
            protocol.Factory.forProtocol(lambda: _WorkerSide(self)))
        os.close(FD_AMP)

    def serve(self) -> None:
        cfg = self.config
        for n, fd in enumerate([FD_REMOTE, FD_LOCAL][:self.listeners]):
            remote = n == 0
            factory = imagesSite(self.store, cfg, self.reactor,
                                 self.threadpool, withInfo=remote,
                                 metrics=self.metrics,
                                 name="remote" if remote else "local")
            if remote and cfg.tls.enable:
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
        # The children: the I/O pool (its stop bounded) and reclaim.
        ds = [super().stopService()]
        self.reporter.stop()
        ports, self.ports = self.ports, []
        ds += [defer.maybeDeferred(p.stopListening) for p in ports]
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
