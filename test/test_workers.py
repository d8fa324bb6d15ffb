"""
C{[daemon] workers = N}: the main process keeps the control service and
the tickets, N worker processes serve the images over the same listening
sockets. Real twistd processes, real TLS, curl for slow transfers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from imageio.units import MiB
from test import test_daemon
from test.support import (
    Daemon, controlRequest, daemonConf, httpsConnection, makePKI, request,
    writeConf)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return makePKI(str(tmp_path_factory.mktemp("pki")))


def start(tmp_path, pki=None, workers=2, extra=None, **kw):
    extra = dict(extra or {})
    extra.setdefault("daemon", {})["workers"] = workers
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki, extra=extra))
    return Daemon(conf, **kw)


def sock(tmp_path):
    return str(tmp_path / "run" / "sock")


def ticketInfo(tmp_path, tid):
    status, _, body = controlRequest(sock(tmp_path), "GET", "/tickets/" + tid)
    assert status == 200, body
    return json.loads(body)


def waitFor(predicate, timeout=10, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(interval)


def workerPids(daemon):
    """
    {index: pid} of the workers running now, from the main process's log.
    """
    pids = {}
    for line in daemon.lines:
        m = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
    return pids


def served(daemon, what):
    """
    How many requests of kind C{what} ("READ", "WRITE") each worker logged.
    """
    counts = {}
    for line in daemon.lines:
        m = re.search(r"\[worker-(\d+) imageio\.web\.images\S*\] " + what,
                      line)
        if m:
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def makeImage(tmp_path, size):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def slowCurl(daemon, pki, tid, rate="100k"):
    return subprocess.Popen(
        ["curl", "--silent", "--cacert", pki.ca, "--limit-rate", rate,
         "-o", "/dev/null",
         f"https://127.0.0.1:{daemon.remotePort}/images/{tid}"])


# The control API behaves the same with one process and with workers.

@pytest.mark.parametrize("workers", [1, 2])
def test_control_life_cycle(tmp_path, pki, workers):
    d = start(tmp_path, pki, workers=workers)
    try:
        assert len(workerPids(d)) == (workers if workers > 1 else 0)
        test_daemon.test_tickets_life_cycle_unix(d, tmp_path)
        test_daemon.test_delete_all_tickets(d, tmp_path)
        test_daemon.test_info_over_tls(d, pki)
    finally:
        d.stop()


# Transfers through both workers; the main process's view stays exact.

def test_transfers_through_both_workers(tmp_path, pki):
    d = start(tmp_path, pki)
    try:
        n = 16
        path = makeImage(tmp_path, n * MiB)
        ticket = {"uuid": "t1", "size": n * MiB, "ops": ["write"],
                  "timeout": 300, "url": "file://" + path}
        assert controlRequest(sock(tmp_path), "PUT", "/tickets/t1",
                              ticket)[0] == 200
        ticket = dict(ticket, uuid="t2", ops=["read"])
        assert controlRequest(sock(tmp_path), "PUT", "/tickets/t2",
                              ticket)[0] == 200

        def run(method, tid, body=None):
            # n connections at once, each one request on its own MiB,
            # all kept open until the checks are done.
            barrier = threading.Barrier(n + 1)
            release = threading.Event()
            results = [None] * n

            def one(i):
                con = httpsConnection(d.remotePort, pki.ca)
                try:
                    barrier.wait(10)
                    headers = {"Range": f"bytes={i * MiB}-{(i + 1) * MiB - 1}"}
                    if method == "PUT":
                        headers = {"Content-Range":
                                   f"bytes {i * MiB}-{(i + 1) * MiB - 1}/*"}
                    results[i] = request(
                        con, method, f"/images/{tid}",
                        bytes([i]) * MiB if body else None, headers)
                    barrier.wait(10)
                    release.wait(10)
                finally:
                    con.close()

            threads = [threading.Thread(target=one, args=(i,))
                       for i in range(n)]
            for t in threads:
                t.start()
            barrier.wait(10)    # all connected
            barrier.wait(20)    # all answered
            return results, release, threads

        results, release, threads = run("PUT", "t1", body=True)
        assert [r[0] for r in results] == [200] * n
        # Finished operations are exact once reported (no batching lag).
        info = waitFor(lambda: (lambda i: i if i["transferred"] == n * MiB
                                else None)(ticketInfo(tmp_path, "t1")))
        assert info["active"] is False
        assert info["connections"] == n
        release.set()
        for t in threads:
            t.join()
        waitFor(lambda: ticketInfo(tmp_path, "t1")["connections"] == 0)
        assert ticketInfo(tmp_path, "t1")["transferred"] == n * MiB

        results, release, threads = run("GET", "t2")
        for i, r in enumerate(results):
            assert r[0] == 206 and r[2] == bytes([i]) * MiB
        info = waitFor(lambda: (lambda i: i if i["transferred"] == n * MiB
                                else None)(ticketInfo(tmp_path, "t2")))
        assert info["connections"] == n and info["active"] is False
        release.set()
        for t in threads:
            t.join()
        waitFor(lambda: ticketInfo(tmp_path, "t2")["connections"] == 0)

        # Both workers served: their own log lines say so.
        writes, reads = served(d, "WRITE"), served(d, "READ")
        assert sum(writes.values()) == n and sum(reads.values()) == n
        assert set(writes) | set(reads) == {0, 1}, (writes, reads)
    finally:
        d.stop()


# Cancel: DELETE waits for the workers' operations.

def test_delete_waits_for_worker_operation(tmp_path, pki):
    d = start(tmp_path, pki, extra={"control": {"remove_timeout": 2}})
    try:
        path = makeImage(tmp_path, 256 * MiB)
        ticket = {"uuid": "t1", "size": 256 * MiB, "ops": ["read"],
                  "timeout": 300, "url": "file://" + path,
                  "transfer_id": "transfer-1"}
        assert controlRequest(sock(tmp_path), "PUT", "/tickets/t1",
                              ticket)[0] == 200
        curl = slowCurl(d, pki, "t1")
        try:
            waitFor(lambda: ticketInfo(tmp_path, "t1")["active"])
            assert ticketInfo(tmp_path, "t1")["connections"] == 1
            # Let the socket buffers fill: from now on the next chunk
            # waits for curl to read 1 MiB at 100 KiB/s.
            time.sleep(1.5)
            # The held transfer does not reach its next chunk in 2 s:
            # 409 after remove_timeout, and the ticket stays, canceled.
            started = time.monotonic()
            status, _, body = controlRequest(sock(tmp_path), "DELETE",
                                             "/tickets/t1")
            elapsed = time.monotonic() - started
            assert status == 409
            assert body == b"Timeout cancelling transfer transfer-1\n"
            assert 1.8 < elapsed < 5
            info = ticketInfo(tmp_path, "t1")
            assert info["canceled"] is True and info["active"] is True
            # New requests on the canceled ticket are refused (both workers
            # have the cancel: try several connections).
            for _ in range(4):
                con = httpsConnection(d.remotePort, pki.ca)
                try:
                    status, _, body = request(con, "GET", "/images/t1",
                                              None, {"Range": "bytes=0-99"})
                finally:
                    con.close()
                assert status == 403 and b"canceled" in body
        finally:
            curl.kill()
            curl.wait()
        # The client went away: the operation ends, not counted.
        waitFor(lambda: not ticketInfo(tmp_path, "t1")["active"])
        waitFor(lambda: ticketInfo(tmp_path, "t1")["connections"] == 0)
        assert controlRequest(sock(tmp_path), "DELETE",
                              "/tickets/t1")[0] == 204
        assert controlRequest(sock(tmp_path), "GET", "/tickets/t1")[0] == 404

        # A DELETE returns as soon as the operation ends, before the timeout.
        ticket = dict(ticket, uuid="t2")
        assert controlRequest(sock(tmp_path), "PUT", "/tickets/t2",
                              ticket)[0] == 200
        curl = slowCurl(d, pki, "t2")
        try:
            waitFor(lambda: ticketInfo(tmp_path, "t2")["active"])
            time.sleep(1.5)
            result = []
            deleting = threading.Thread(target=lambda: result.append(
                controlRequest(sock(tmp_path), "DELETE", "/tickets/t2")))
            started = time.monotonic()
            deleting.start()
            time.sleep(0.5)
            assert not result
        finally:
            curl.kill()
            curl.wait()
        deleting.join(10)
        assert result[0][0] == 204
        assert time.monotonic() - started < 1.8
        assert controlRequest(sock(tmp_path), "GET", "/tickets/t2")[0] == 404
    finally:
        d.stop()


# A worker dies: restarted, its operations released; SIGTERM stops all.

def test_killed_worker_restarted_then_sigterm_stops_all(tmp_path, pki):
    d = start(tmp_path, pki)
    try:
        path = makeImage(tmp_path, 256 * MiB)
        ticket = {"uuid": "t1", "size": 256 * MiB, "ops": ["read"],
                  "timeout": 300, "url": "file://" + path}
        assert controlRequest(sock(tmp_path), "PUT", "/tickets/t1",
                              ticket)[0] == 200
        pids = workerPids(d)
        assert len(pids) == 2
        curl = slowCurl(d, pki, "t1")
        try:
            waitFor(lambda: ticketInfo(tmp_path, "t1")["active"])
            # Some progress reached the main process (batched).
            waitFor(lambda: ticketInfo(tmp_path, "t1")["transferred"] > 0)
            (index,) = served(d, "READ")
            os.kill(pids[index], signal.SIGKILL)
            waitFor(lambda: workerPids(d)[index] != pids[index])
            info = waitFor(lambda: (lambda i: i if not i["active"] else None)(
                ticketInfo(tmp_path, "t1")))
            # Released: counted as canceled, not transferred.
            assert info["connections"] == 0
            assert info["transferred"] == 0
            assert info["canceled"] is False
        finally:
            curl.kill()
            curl.wait()
        assert f"worker {index} (pid {pids[index]}) died" in d.output()
        # The restarted worker has the ticket; the daemon serves.
        waitFor(lambda: f"worker {index} (pid {workerPids(d)[index]}) "
                        "connected" in d.output())
        for _ in range(4):
            con = httpsConnection(d.remotePort, pki.ca)
            try:
                status, _, body = request(con, "GET", "/images/t1", None,
                                          {"Range": "bytes=0-1048575"})
            finally:
                con.close()
            assert status == 206 and len(body) == MiB
        waitFor(lambda: ticketInfo(tmp_path, "t1")["transferred"] == MiB)
        assert controlRequest(sock(tmp_path), "DELETE",
                              "/tickets/t1")[0] == 204

        pids = workerPids(d)
        assert all(alive(p) for p in pids.values())
    finally:
        status = d.stop(signal.SIGTERM)
    assert status in (0, -signal.SIGTERM)
    assert "Traceback" not in d.output()
    for pid in pids.values():
        assert not alive(pid), pid


# Tickets of any size reach every worker (an AMP value holds 64 KiB).

def test_big_ticket_reaches_every_worker(tmp_path, pki):
    d = start(tmp_path, pki)
    try:
        path = makeImage(tmp_path, MiB)
        big = "x" * 70000
        ticket = {"uuid": "t1", "size": MiB, "ops": ["read"],
                  "timeout": 300, "url": "file://" + path,
                  "transfer_id": big}
        status, _, body = controlRequest(sock(tmp_path), "PUT",
                                         "/tickets/t1", ticket)
        assert status == 200, body
        assert ticketInfo(tmp_path, "t1")["transfer_id"] == big

        def readAll(n=12):
            for _ in range(n):
                con = httpsConnection(d.remotePort, pki.ca)
                try:
                    status, _, body = request(con, "GET", "/images/t1", None,
                                              {"Range": "bytes=0-4095"})
                finally:
                    con.close()
                assert status == 206, body
        readAll()
        # A restarted worker gets it in its Hello snapshot, and serves.
        pids = workerPids(d)
        os.kill(pids[0], signal.SIGKILL)
        waitFor(lambda: workerPids(d)[0] != pids[0])
        waitFor(lambda: f"worker 0 (pid {workerPids(d)[0]}) connected"
                in d.output())
        waitFor(lambda: d.output().count("worker 0 serving") >= 2)
        readAll()
        assert "Hello failed" not in d.output()
        assert "No such ticket" not in d.output()
        assert "TooLong" not in d.output()
    finally:
        assert d.stop(signal.SIGTERM) == 0
    assert "Traceback" not in d.output()


def test_hub_survives_send_failures():
    # A command a worker cannot be sent (AMP raises while encoding) is
    # logged; it never fails the worker's Hello or the control request.
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from imageio.workers.commands import AddTicket, _BigUnicode
    from imageio.workers.mainside import SharedTicketStore

    class Broken:
        index = 7

        def callRemote(self, command, **kw):
            raise RuntimeError("cannot encode")

    failures = []
    observer = failures.append
    globalLogPublisher.addObserver(observer)
    try:
        store = SharedTicketStore(Clock())
        store.add({"uuid": "t", "size": 1, "ops": ["read"], "timeout": 1,
                   "url": "file:///x"})
        worker = Broken()
        store.hub.hello(worker)
        assert worker in store.hub.workers
        d = store.hub.broadcast(AddTicket, gen=1, ticket="{}", expires=0,
                                canceled=False)
        assert d.called
    finally:
        globalLogPublisher.removeObserver(observer)
    logged = [e for e in failures if "log_failure" in e]
    assert len(logged) == 2
    assert all(e["index"] == 7 for e in logged)
    # And the big value round-trips.
    arg = _BigUnicode()
    strings = {}
    text = "é" * 100000
    arg.toBox(b"ticket", strings, {"ticket": text}, None)
    assert max(len(v) for v in strings.values()) <= 0xFFFF
    objects = {}
    arg.fromBox(b"ticket", strings, objects, None)
    assert objects["ticket"] == text


def test_stop_is_one_bound_for_all_workers(monkeypatch):
    # The workers get SIGTERM at once, SIGKILL together after _KILL_AFTER,
    # and the stop ends after _STOP_TIMEOUT in all even if one never ends
    # (a thread stuck in storage can outlive SIGKILL); one that ends in
    # time ends the stop at once.
    from twisted.internet.task import Clock

    from imageio.workers import mainside as workers

    def pool():
        clock = Clock()
        p = workers.WorkerPool(clock, None, 2, "/nonexistent", [])
        for i in range(2):
            proc = workers._WorkerProcess(p, i)
            proc.pid = 1000 + i
            p.procs[i] = proc
        return clock, p

    signals = []
    monkeypatch.setattr(workers.os, "kill",
                        lambda pid, sig: signals.append((pid, sig)))
    clock, p = pool()
    procs = list(p.procs.values())
    d = p.stopService()
    assert signals == [(1000, signal.SIGTERM), (1001, signal.SIGTERM)]
    procs[0].ended.callback(None)
    clock.advance(workers._KILL_AFTER)
    assert signals[2:] == [(1001, signal.SIGKILL)]
    assert not d.called
    clock.advance(workers._STOP_TIMEOUT - workers._KILL_AFTER)
    assert d.called and d.result is None
    assert workers._STOP_TIMEOUT < 10
    assert not clock.getDelayedCalls()

    signals.clear()
    clock, p = pool()
    d = p.stopService()
    for proc in p.procs.values():
        proc.ended.callback(None)
    assert d.called
    assert not clock.getDelayedCalls()
    assert [s for _, s in signals] == [signal.SIGTERM] * 2


# /metrics adds up the workers' counters and histograms.

def _metric(text, name, **labels):
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(
                name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def test_metrics_aggregated_over_workers(tmp_path, pki):
    d = start(tmp_path, pki)
    try:
        path = makeImage(tmp_path, 4 * MiB)
        ticket = {"uuid": "t1", "size": 4 * MiB, "ops": ["read", "write"],
                  "timeout": 300, "url": "file://" + path}
        assert controlRequest(sock(tmp_path), "PUT", "/tickets/t1",
                              ticket)[0] == 200
        n = 16
        for _ in range(n):
            con = httpsConnection(d.remotePort, pki.ca)
            try:
                status, _, body = request(con, "GET", "/images/t1", None,
                                          {"Range": "bytes=0-65535"})
                assert status == 206
                status, _, _ = request(con, "PUT", "/images/t1?flush=n",
                                       b"x" * 4096)
                assert status == 200
            finally:
                con.close()
        status, headers, body = controlRequest(sock(tmp_path), "GET",
                                               "/metrics")
        assert status == 200
        text = body.decode()
        assert _metric(text, "imageio_requests_total", service="remote",
                       method="GET", status="206") == n
        assert _metric(text, "imageio_requests_total", service="remote",
                       method="PUT", status="200") == n
        assert _metric(text, "imageio_bytes_total", backend="file",
                       direction="read") == n * 65536
        assert _metric(text, "imageio_bytes_total", backend="file",
                       direction="write") == n * 4096
        assert _metric(text, "imageio_operation_seconds_count",
                       op="write") >= n
        # The main process's own series are still there, once each.
        assert _metric(text, "imageio_tickets") == 1
        assert text.count("# TYPE imageio_requests_total counter") == 1
        assert text.count("# TYPE imageio_bytes_total counter") == 1
    finally:
        assert d.stop(signal.SIGTERM) == 0
