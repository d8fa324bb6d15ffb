# -*- test-case-name: test.test_metrics -*-
"""
The daemon's Prometheus metrics (SPEC A14), served by the control service
at C{GET /metrics} (L{imageio.web.metrics}).

One L{Metrics} object per daemon holds its own L{CollectorRegistry} (never
the process-wide default one: tests run several daemons in one process).
The images handlers get it when their Site is built
(L{imageio.web.site.imagesSite} passes it to L{imageio.web.images.Images},
which passes it to L{imageio.operations} and the pumps);
L{Metrics.instrument} gives a Site's request factory the metrics and the
service's name for the request counts, which the web layer's Request base
makes. Code built
without metrics (unit tests' Sites, the client library) gets
L{NO_METRICS}, which records nothing.

Series:

  - C{imageio_bytes_total{backend, direction}}: bytes read from and
    written to backends (C{direction} C{read} or C{write}), and bytes
    zeroed (C{zero}: no data crosses the wire, so they are kept apart from
    C{write}, whose rate is the transfer throughput).
  - C{imageio_requests_total{service, method, status}}: requests by the
    service that answered, the method (C{other} for a method the daemon
    does not know) and the status sent; C{aborted} when the connection was
    lost before the response was complete.
  - C{imageio_tickets}, C{imageio_active_tickets},
    C{imageio_active_connections}: gauges read from the ticket store at
    scrape time (all tickets, tickets with operations running, connections
    bound to tickets).
  - C{imageio_operation_seconds{op}}: latency of each backend call
    (C{read}, C{write}: one chunk; C{zero}: one step; C{flush};
    C{extents}) and of each whole C{checksum} computation.
  - C{process_*}: the daemon process (RSS, open fds, CPU), from /proc.

With C{[daemon] workers} > 1 the worker processes count their own
requests, bytes and latencies; the main process asks each for its samples
at scrape time (L{Metrics.samples}) and adds them to its own
(L{Metrics.exposition}): counters and histograms are sums over the
processes, ticket gauges come from the main process's store, and
C{process_*} describes the main process only.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, ProcessCollector,
    disable_created_metrics)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

__all__ = ["Metrics", "NO_METRICS", "OPERATIONS",
           "BACKENDS", "CONTENT_TYPE"]

BACKENDS = ("file", "nbd", "http")
"""
Backends whose byte counters exist (at 0) before their first use.
"""

OPERATIONS = ("read", "write", "zero", "flush", "checksum", "extents")

DIRECTIONS = ("read", "write", "zero")

METHODS = frozenset(
    ["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "HEAD"])

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
"""
Latency buckets: from a page-cache hit (well under a millisecond) to a
checksum of a large image (minutes).
"""

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
"""
The text format version every Prometheus server reads (the output for our
plain metric names is the same in format 1.0.0, which newer clients
announce).
"""

# The _created series double the output and say nothing a daemon's
# start time does not: off (a process-wide switch; the daemon owns its
# process).
disable_created_metrics()


class _BackendMeter:
    """
    Counts one backend's bytes and times its calls: what the transfer
    pumps (L{imageio.transfer}) and the images handlers report to.
    """

    __slots__ = ("_metrics", "_name", "_readBytes", "_writeBytes",
                 "_zeroBytes", "_readSeconds", "_writeSeconds",
                 "_zeroSeconds")

    def __init__(self, metrics: Metrics, name: str):
        self._metrics = metrics
        self._name = name
        self._readBytes = metrics.bytes.labels(name, "read")
        self._writeBytes = metrics.bytes.labels(name, "write")
        self._zeroBytes = metrics.bytes.labels(name, "zero")
        self._readSeconds = metrics.seconds.labels("read")
        self._writeSeconds = metrics.seconds.labels("write")
        self._zeroSeconds = metrics.seconds.labels("zero")

    def read(self, nbytes: int, seconds: float) -> None:
        """
        A backend read returned C{nbytes} after C{seconds}.
        """
        self._readBytes.inc(nbytes)
        self._readSeconds.observe(seconds)

    def write(self, nbytes: int, seconds: float) -> None:
        """
        A backend write of C{nbytes} completed after C{seconds}.
        """
        self._writeBytes.inc(nbytes)
        self._writeSeconds.observe(seconds)

    def zero(self, nbytes: int, seconds: float) -> None:
        """
        A backend zero of C{nbytes} completed after C{seconds}.
        """
        self._zeroBytes.inc(nbytes)
        self._zeroSeconds.observe(seconds)

    def readBytes(self, nbytes: int) -> None:
        """
        C{nbytes} read without a backend call to time (a proxy stream).
        """
        self._readBytes.inc(nbytes)

    def writeBytes(self, nbytes: int) -> None:
        """
        C{nbytes} written without a backend call to time (a proxy stream).
        """
        self._writeBytes.inc(nbytes)


class _NullMeter:
    """
    A meter recording nothing.
    """

    def read(self, nbytes, seconds):
        pass

    write = zero = read

    def readBytes(self, nbytes):
        pass

    writeBytes = readBytes


class _StoreCollector:
    """
    Ticket gauges, computed from the store at each scrape.
    """

    def __init__(self, store):
        self._store = store

    def _families(self):
        return (
            GaugeMetricFamily("imageio_tickets", "Tickets installed"),
            GaugeMetricFamily("imageio_active_tickets",
                              "Tickets with operations running"),
            GaugeMetricFamily("imageio_active_connections",
                              "Connections bound to a ticket (each holds "
                              "an open backend)"),
        )

    def describe(self):
        return self._families()

    def collect(self):
        tickets = active = connections = 0
        for ticket in self._store:
            tickets += 1
            if ticket.active:
                active += 1
            connections += ticket.connections
        families = self._families()
        for family, value in zip(families, (tickets, active, connections)):
            family.add_metric([], value)
        return families


class Metrics:
    """
    The metrics of one daemon.

    @ivar registry: the daemon's own L{CollectorRegistry}.
    @ivar bytes: the C{imageio_bytes_total} counter.
    @ivar requests: the C{imageio_requests_total} counter.
    @ivar seconds: the C{imageio_operation_seconds} histogram.
    """

    enabled = True

    def __init__(self, store=None, *, process: bool = True):
        """
        @param store: the L{imageio.tickets.ITicketStore} whose tickets the
            gauges count, or C{None} for no ticket gauges.
        @param process: export the C{process_*} series of this process.
        """
        self.registry = CollectorRegistry(auto_describe=True)
        self.bytes = Counter(
            "imageio_bytes", "Bytes read from, written to and zeroed on "
            "backends", ["backend", "direction"], registry=self.registry)
        self.requests = Counter(
            "imageio_requests", "HTTP requests answered, by service, method "
            "and status (aborted: the connection was lost first)",
            ["service", "method", "status"], registry=self.registry)
        self.seconds = Histogram(
            "imageio_operation_seconds", "Latency of backend calls (read, "
            "write: one chunk; zero: one step; flush; extents) and of whole "
            "checksum computations", ["op"], buckets=BUCKETS,
            registry=self.registry)
        for name in BACKENDS:
            for direction in DIRECTIONS:
                self.bytes.labels(name, direction)
        for op in OPERATIONS:
            self.seconds.labels(op)
        if store is not None:
            self.registry.register(_StoreCollector(store))
        if process:
            ProcessCollector(registry=self.registry)
        self._meters: dict[str, _BackendMeter] = {}
        # Label children of the requests counter by (service, raw method,
        # status): labels() costs a lock and a tuple per request.
        self._requestCounters: dict = {}

    def instrument(self, site, service: str) -> None:
        """
        Make C{site}'s requests count as C{service}'s: its request factory
        passes them to each request (L{imageio.web.http.Request}).
        """
        site.requestFactory = functools.partial(
            site.requestFactory, metrics=self, service=service)

    def meter(self, backend) -> _BackendMeter:
        """
        @return: the meter of C{backend} (by its C{name}).
        """
        name = getattr(backend, "name", None) or "unknown"
        meter = self._meters.get(name)
        if meter is None:
            meter = self._meters[name] = _BackendMeter(self, name)
        return meter

    def observe(self, op: str, seconds: float) -> None:
        """
        Record one C{op} that took C{seconds}.
        """
        self.seconds.labels(op).observe(seconds)

    @contextmanager
    def timed(self, op: str):
        """
        Time the block as one C{op}; nothing is recorded if it raises.
        (Usable around C{await}.)
        """
        start = time.monotonic()
        yield
        self.observe(op, time.monotonic() - start)

    def trackRequest(self, request, service: str) -> None:
        """
        Count C{request} once its response is finished, or as C{aborted}
        if its connection is lost first.
        """
        request.notifyFinish().addCallbacks(
            lambda _: self.countRequest(service, request.method,
                                        request.code),
            lambda _: self.countRequest(service, request.method,
                                        "aborted"))

    def countRequest(self, service: str, method: bytes, status) -> None:
        """
        Count one request of C{service} that ended with C{status} (a code,
        or C{"aborted"}).
        """
        children = self._requestCounters
        key = (service, method, status)
        child = children.get(key)
        if child is None:
            name = method.decode("ascii", "replace")
            if name not in METHODS:
                name = "other"
            child = self.requests.labels(service, name, str(status))
            if len(children) < 1000:
                children[key] = child
        child.inc()

    def samples(self) -> list:
        """
        @return: the samples of the L{SUMMED} families, as JSON-ready
            C{[name, labels, value]} lists (what a worker process sends to
            the main process).
        """
        out = []
        for family in self.registry.collect():
            if family.name in SUMMED:
                for sample in family.samples:
                    out.append([sample.name, dict(sample.labels),
                                sample.value])
        return out

    def exposition(self, others=()) -> bytes:
        """
        @param others: L{samples} of other processes (the workers), added
            to ours.
        @return: the Prometheus text exposition of every series.
        """
        if not others:
            return generate_latest(self.registry)
        added: dict = {}
        for samples in others:
            for name, labels, value in samples:
                key = _key(name, labels)
                added[key] = added.get(key, 0) + value
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self.registry, added))
        return generate_latest(registry)


SUMMED = ("imageio_bytes", "imageio_requests", "imageio_operation_seconds")
"""
The families whose samples are added up over the worker processes.
"""

_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _key(name: str, labels: dict) -> tuple:
    return name, tuple(sorted(labels.items()))


class _Merged:
    """
    A collector giving C{registry}'s families with C{added} (sample key to
    value) added to the L{SUMMED} ones.
    """

    def __init__(self, registry, added: dict):
        self._registry = registry
        self._added = added

    def collect(self):
        added = dict(self._added)
        for family in self._registry.collect():
            if family.name not in SUMMED:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type,
                            family.unit)
            for sample in family.samples:
                value = sample.value + added.pop(
                    _key(sample.name, sample.labels), 0)
                merged.add_sample(sample.name, sample.labels, value)
            # Label sets only the workers have (e.g. remote's statuses).
            names = {family.name + suffix for suffix in _SUFFIXES}
            for key in [k for k in added if k[0] in names]:
                merged.add_sample(key[0], dict(key[1]), added.pop(key))
            yield merged


class _NullMetrics:
    """
    What code finds when no metrics are configured: records nothing.
    """

    enabled = False
    _meter = _NullMeter()

    def meter(self, backend):
        return self._meter

    def observe(self, op, seconds):
        pass

    @contextmanager
    def timed(self, op):
        yield

    def trackRequest(self, request, service):
        pass


NO_METRICS = _NullMetrics()
