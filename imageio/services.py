# -*- test-case-name: test.test_daemon -*-
"""
The daemon's services: one L{MultiService} with a listener per service
(remote, local, control), the ticket store, and the I/O thread pool.

Listeners bind in C{privilegedStartService}, so that privileges can be
dropped right after (SPEC B §6: bind, then drop, then serve).
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import sys
import uuid

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger as TwistedLogger
from twisted.python.failure import Failure

from imageio.logs import Logger
from imageio import endpoints as endpoints_
from imageio import logs
from imageio import compat, iopool, tickets
from imageio.errors import StartupError
from imageio.metrics import Metrics
from imageio.tls import TLSError
from imageio.web.http import Root, makeSite
from imageio.web.metrics import MetricsPage
from imageio.web.site import imagesSite, reclaim
from imageio.web.tickets import Tickets
from imageio.workers.mainside import SharedTicketStore, WorkerPool

__all__ = ["ImageioService", "StartupError", "bindAddress"]

_log = Logger()

# Where the services listen and when they are ready is logged whatever the
# configured level: with port 0 it is the only way to learn the port.
_lifecycle = TwistedLogger(namespace=__name__)


def bindAddress(host: str, port: int, preferIPv4: bool = False):
    """
    Resolve where a TCP service binds, as the reference does: C{""} means
    IPv4 any, IPv6 link-local results are dropped, and with C{preferIPv4}
    IPv4 results come first.

    @return: C{(family, address)}.
    """
    if host == "":
        host = "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot resolve {host!r}: {e.strerror}")
    results = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET6 and sockaddr[0].lower().startswith(
                "fe80:"):
            continue
        if family in (socket.AF_INET, socket.AF_INET6):
            results.append((family, sockaddr[0]))
    if not results:
        raise StartupError(f"no usable address for {host!r}")
    if preferIPv4:
        results.sort(key=lambda r: r[0] != socket.AF_INET)
    return results[0]


def _tcpDescription(host, port, preferIPv4=False, tls=None):
    """
    The strports string of a TCP service, bound as the reference binds.
    """
    _, address = bindAddress(host, port, preferIPv4)
    if tls is not None:
        return endpoints_.tlsDescription(address, port, tls)
    return endpoints_.tcpDescription(address, port)


def _unixDescription(path, mode=None):
    if not path.startswith("\0"):
        # A stale pathname socket from an earlier run would make bind fail.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return endpoints_.unixDescription(path, mode)


def _serverEndpoint(reactor, description):
    try:
        return endpoints.serverFromString(reactor, description)
    except TLSError as e:
        raise StartupError(str(e))


class _Listener(service.Service):
    """
    One service's listening socket: a L{Site} on the endpoint a strports
    string describes. Binds in C{privilegedStartService} and fails
    synchronously, so startup errors stop the daemon at once.

    @ivar description: the strports string.
    @ivar endpoint: the endpoint parsed from it.
    @ivar port: the L{IListeningPort}, once bound.
    """

    port = None

    def __init__(self, name, reactor, description, factory):
        self.setName(name)
        self.description = description
        self.endpoint = _serverEndpoint(reactor, description)
        self.factory = factory

    def _listen(self):
        results = []
        self.endpoint.listen(self.factory).addBoth(results.append)
        if not results:
            raise StartupError(f"{self.name}: listening did not complete")
        if isinstance(results[0], Failure):
            raise StartupError(
                f"cannot listen for the {self.name} service: "
                f"{results[0].getErrorMessage()}")
        self.port = results[0]
        _lifecycle.info("{name} service listening on {address} "
                        "({description})",
                        name=self.name, address=self.address(),
                        description=self.description.replace("\0", "@"))

    def address(self) -> str:
        host = self.port.getHost()
        if hasattr(host, "port"):
            if ":" in host.host:
                return f"[{host.host}]:{host.port}"
            return f"{host.host}:{host.port}"
        name = host.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return name.replace("\0", "@") if name.startswith("\0") else name

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.port is None:
            self._listen()

    def startService(self):
        super().startService()
        if self.port is None:
            self._listen()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)


class _RefuseFactory(protocol.ServerFactory):
    """
    The factory of a listener only workers accept on (see L{WorkerPool}):
    the main process never reads from it; if it did, it would refuse.
    """

    def buildProtocol(self, addr):
        return None


class ImageioService(service.MultiService):
    """
    The whole daemon.

    @ivar config: the L{imageio.config.Config} (with a random local socket
        name filled in when the configured one is empty).
    @ivar store: the L{tickets.TicketStore}.
    @ivar metrics: the L{Metrics} every service of this process reports to.
    @ivar threadpool: the I/O L{ThreadPool}.
    @ivar tls: the remote service's L{ReloadableTLS}, or C{None}.
    @ivar workers: the number of worker processes serving the remote and
        local services, or 1 when this process serves them.
    @ivar pool: the L{WorkerPool}, or C{None} with one process.
    """

    tls = None
    pool = None

    def __init__(self, cfg, *, reactor, initialTicket=None, confDir=None):
        super().__init__()
        self.reactor = reactor
        if cfg.local.enable and cfg.local.socket == "":
            # The reference binds a random abstract name and reports it.
            cfg = cfg.replace("local", socket=f"\0{uuid.uuid4()}")
        self.config = cfg
        self.workers = cfg.daemon.workers
        if self.workers > 1 and confDir is None:
            # Workers load the configuration from the conf dir.
            _log.warn("[daemon] workers = {n} needs --conf-dir; serving "
                      "from one process", n=self.workers)
            self.workers = 1
        self.confDir = confDir
        self.initialTicket = initialTicket
        self.clock = tickets.MonotonicClock(reactor)
        storeClass = (SharedTicketStore if self.workers > 1
                      else tickets.TicketStore)
        self.store = storeClass(
            self.clock, inactivityTimeout=cfg.daemon.inactivity_timeout)
        # With workers, /metrics adds the workers' counters and histograms
        # (asked at scrape time) to the main process's (control requests,
        # ticket gauges).
        self.metrics = Metrics(self.store)
        self.threadpool = iopool.ioThreadPool(cfg, reactor, self)
        reclaim().setServiceParent(self)

        imageListeners = [self._addRemote()]
        if cfg.local.enable:
            imageListeners.append(self._addLocal())
        if cfg.control.enable:
            self._addControl()
        if self.workers > 1:
            # Added last: started after the listeners are bound, stopped
            # (workers terminated) before they close.
            self.pool = WorkerPool(
                reactor, self.store.hub, self.workers, confDir,
                imageListeners)
            self.pool.setServiceParent(self)

    def _workerSamples(self) -> defer.Deferred:
        if self.pool is None:
            return defer.succeed([])
        return self.pool.metricsSamples()

    def _imagesSite(self, name, withInfo):
        if self.workers > 1:
            return _RefuseFactory()
        return imagesSite(self.store, self.config, self.reactor,
                          self.threadpool, withInfo, self.metrics, name)

    def _addRemote(self):
        cfg = self.config
        description = _tcpDescription(
            cfg.remote.host, cfg.remote.port,
            tls=cfg.tls if cfg.tls.enable else None)
        listener = _Listener("remote", self.reactor, description,
                             self._imagesSite("remote", withInfo=True))
        listener.setServiceParent(self)
        self.tls = getattr(listener.endpoint, "tls", None)
        return listener

    def _addLocal(self):
        listener = _Listener("local", self.reactor,
                             _unixDescription(self.config.local.socket),
                             self._imagesSite("local", withInfo=False))
        listener.setServiceParent(self)
        return listener

    def _addControl(self):
        cfg = self.config
        root = Root()
        root.putChild(b"tickets", Tickets(
            self.store, removeTimeout=cfg.control.remove_timeout))
        root.putChild(b"metrics", MetricsPage(
            self.metrics, gather=self._workerSamples))
        site = makeSite(root, reactor=self.reactor, timeout=60)
        self.metrics.instrument(site, "control")
        if cfg.control.transport == "tcp":
            description = _tcpDescription(
                "localhost", cfg.control.port,
                preferIPv4=cfg.control.prefer_ipv4)
        else:
            description = _unixDescription(cfg.control.socket, mode=0o660)
        _Listener("control", self.reactor, description,
                  site).setServiceParent(self)

    def listener(self, name):
        """
        @return: the bound L{IListeningPort} of service C{name}.
        """
        return self.getServiceNamed(name).port

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
            if os.geteuid() == 0 and self.config.daemon.drop_privileges:
                self._dropPrivileges()
        except StartupError as e:
            # twistd would print a traceback; the operator needs one line.
            _log.critical("Cannot start: {error}", error=e)
            sys.stderr.write(f"imageio: {e}\n")
            raise SystemExit(1)

    def reloadTLS(self) -> defer.Deferred:
        """
        Reload the remote service's key and certificate (on SIGHUP), here
        and in the worker processes; the files are read off the reactor
        thread (L{ReloadableTLS.reload}).

        @return: L{Deferred} firing with whether this process uses the new
            files.
        """
        if self.tls is None:
            return defer.succeed(False)
        if self.pool is not None:
            self.pool.reloadTLS().addErrback(lambda f: _log.failure(
                "Reloading TLS in the workers failed", f))
        return self.tls.reload(self.reactor)

    def installSignalHandlers(self) -> None:
        """
        SIGHUP reloads the TLS files, and a clean stop on SIGTERM exits
        with status 0. Only the twistd plugin calls this: signal handlers
        are process-global.
        """
        def onSIGHUP(signum, frame):
            self.reactor.callFromThread(self.reloadTLS)
        signal.signal(signal.SIGHUP, onSIGHUP)
        self.reactor.addSystemEventTrigger(
            "after", "shutdown", self._cleanExit)

    def _cleanExit(self) -> None:
        # twistd kills itself with the signal that stopped the reactor,
        # so a stop that went well read as "killed by SIGTERM" (status
        # -15/143) to anything but systemd. This trigger runs only once
        # every service stopped: SIGTERM is then the normal way to stop
        # (as the reference, which exits 0). SIGINT keeps Twisted's
        # behaviour. Tested by test_daemon.test_sigterm_exit_0.
        compat.clearExitSignal(self.reactor, signal.SIGTERM)

    def startService(self):
        super().startService()
        if self.initialTicket is not None:
            ticket = self.store.add(self.initialTicket)
            _log.info("Installed ticket {uuid} from --ticket",
                      uuid=ticket.uuid)
        # twistd starts services before the reactor runs and installs its
        # signal handlers; ready means a SIGTERM from now on stops cleanly.
        self.reactor.callWhenRunning(self._whenServing)

    def _whenServing(self):
        if self.pool is None:
            self._announceReady()
            return
        # Ready once every worker has the tickets and accepts.
        d = self.pool.whenReady()
        d.addTimeout(30, self.reactor)
        d.addErrback(lambda f: _log.warn(
            "Workers did not all start in time: {error}",
            error=f.getErrorMessage()))
        d.addCallback(lambda _: self._announceReady())

    def _announceReady(self):
        if self.config.daemon.systemd_enable:
            _notifySystemd(b"READY=1")
        _lifecycle.info("imageio ready")

    def _dropPrivileges(self):
        cfg = self.config.daemon
        try:
            user = pwd.getpwnam(cfg.user_name)
        except KeyError:
            raise StartupError(
                f"cannot drop privileges: no user {cfg.user_name!r} "
                "([daemon] user_name)")
        try:
            group = grp.getgrnam(cfg.group_name)
        except KeyError:
            raise StartupError(
                f"cannot drop privileges: no group {cfg.group_name!r} "
                "([daemon] group_name)")
        paths = [cfg.run_dir]
        if (self.config.control.enable
                and self.config.control.transport == "unix"):
            paths.append(self.config.control.socket)
        paths.extend(logs.logFiles(self.config))
        for path in paths:
            try:
                os.chown(path, user.pw_uid, group.gr_gid)
            except FileNotFoundError:
                pass
        os.initgroups(cfg.user_name, group.gr_gid)
        os.setgid(group.gr_gid)
        os.setuid(user.pw_uid)
        _log.info("Dropped privileges to {user}:{group}",
                  user=cfg.user_name, group=cfg.group_name)


def _notifySystemd(message: bytes) -> None:
    """
    Tell systemd (Type=notify) about our state, if it is listening.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message)
    except OSError as e:
        _log.warn("Cannot notify systemd: {error}", error=e)
