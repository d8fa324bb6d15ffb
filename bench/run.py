#!/usr/bin/env python3
"""
Side-by-side benchmark: tximageio against the reference ovirt-imageio.

    make bench                      # or: .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --runs 5 --only download,reads
    .venv/bin/python bench/run.py --scale 0.125 --runs 1   # quick smoke

Sets up everything it needs: the reference virtualenv must exist (`make
bench` creates it), nginx is installed with apt-get when missing and we are
root (it only gives a ceiling; without it that row says so), the test images
are created once and reused from --images (4 GiB raw half data half holes,
2 GiB random raw, their qcow2 versions, and an 8 TiB qcow2 with 32,768
extents).

Both daemons get the same configuration (TLS remote service, unix local
service, unix control socket) and run for the whole benchmark; every
scenario runs on both, alternating which goes first, --runs times. Prints
one table (ours and reference: median (min-max); the ratio ours/reference
paired per run: median (min-max); the daemons' CPU seconds per GiB from
/proc/PID/stat, worker processes included), the ceilings (nginx TLS,
nbdcopy, curl uploading to a do-nothing unix socket server, 4 parallel
O_DIRECT readers of the image, nginx serving the 4 parallel ranges from
the page cache) and the room each leaves above the
reference, the peak RSS of every daemon process, and whether each target of
the performance issue is met. Writes everything as JSON to bench/results/.

File tickets are measured with a cold page cache on both sides: before
every run of a scenario that reads or writes a file ticket, on either
daemon, the page cache is dropped (C{sync}, then C{/proc/sys/vm/drop_caches});
a warm cache flatters whichever side reads through it, and on a host that
runs VMs the image is not cached. Without root that is impossible, and the
table header says that the file rows are warm-cache. For uploads the
client's source file is then read back into the cache: it is the client's
file, not the daemon's, and curl reading it cold is slower (about 380 MB/s
here) than either daemon writes.

The proxy rows run our proxy and the reference's in front of the same
upstream host (the reference daemon, TLS with its own CA, as on a
hypervisor), each proxy configured as engine-setup does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    BIN, GiB, MiB, REF_CLIENT, OUR_CLIENT, REPO, TiB, Daemon, Nginx,
    CurlSink, KeepAliveReader, QemuNBD, Skip, UnixHTTPConnection,
    cpuSeconds, curl, directReads,
    ensureNginx, findRefvenv, makeCert, makeImages, ourClientAvailable,
    processTree)

MB = 1e6
HERE = os.path.dirname(os.path.abspath(__file__))
CONNECTIONS = 8


class Result:
    """
    One measurement: C{value} in the scenario's unit, the daemon CPU
    seconds it took, and the bytes it moved (for CPU/GiB).
    """

    def __init__(self, value, cpu=None, nbytes=0, seconds=None):
        self.value = value
        self.cpu = cpu
        self.nbytes = nbytes
        self.seconds = seconds

    def cpuPerGiB(self):
        if self.cpu is None or not self.nbytes:
            return None
        return self.cpu / (self.nbytes / GiB)


class Scenario:
    """
    @ivar measure: C{measure(daemon) -> Result}.
    @ivar target: C{(op, threshold, text)}, op ">=" or "<=" on the ratio
        ours / reference, or C{None}.
    @ivar cpuTarget: the most CPU/GiB ours may use relative to the
        reference, or C{None}.
    @ivar cold: the scenario moves a file ticket's data: the page cache is
        dropped before each of its runs.
    @ivar source: the client's file for an upload, read into the page
        cache after the drop, or C{None}.
    """

    def __init__(self, name, unit, measure, target=None, cpuTarget=None,
                 higher=True, ours="ours", setup=None, cold=False,
                 source=None):
        self.name = name
        self.cold = cold
        self.source = source
        self.unit = unit
        self.measure = measure
        self.target = target
        self.cpuTarget = cpuTarget
        self.higher = higher
        self.ours = ours
        self.setup = setup
        self.results = {}
        self.skip = None
        self.errors = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def canDropCaches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def dropCaches(source=None) -> None:
    """
    Write back dirty pages, then drop the page cache (root only); then
    read C{source} (the client's file) back into it.
    """
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    if source is not None:
        with open(source, "rb", buffering=0) as f:
            buf = bytearray(8 * MiB)
            while f.readinto(buf):
                pass


# ---------------------------------------------------------------------------
# Scenario builders


class Bench:

    def __init__(self, args):
        self.args = args
        self.refvenv = findRefvenv(args.refvenv)
        self.workdir = tempfile.mkdtemp(prefix="tximageio-bench-",
                                        dir=args.workdir)
        self.procs = []
        self.nodes = []
        self._proxyNodes = None
        self._proxyHost = None
        self.daemons = {}
        self.scenarios = []
        self.ceilings = {}
        self.sink = None

    # Set-up.

    def setUp(self):
        a = self.args
        self.images, self.sizes = makeImages(a.images, a.scale, log)
        self.key, self.cert = makeCert(self.workdir)
        # Writable copies: uploads go to these.
        self.nbdImage = os.path.join(self.workdir, "nbd-random.raw")
        shutil.copyfile(self.images["random"], self.nbdImage)
        self.nbd = self._qemu(self.nbdImage, "raw", "nbd-random.sock")
        self.nbdExtents = self._qemu(self.images["extents.qcow2"], "qcow2",
                                     "nbd-extents.sock", ("--read-only",))
        ours = [os.path.join(BIN, "twistd"), "--pidfile=", "-n", "imageio"]
        ref = [os.path.join(self.refvenv, "bin", "ovirt-imageio")]
        level = a.log_level
        workers = ""
        if a.workers > 1:
            workers = f"[daemon]\nworkers = {a.workers}\n"
        self.daemons["ours"] = Daemon("ours", ours, self.workdir, self.cert,
                                      self.key, level, workers)
        self.daemons["ref"] = Daemon("ref", ref, self.workdir, self.cert,
                                     self.key, level)
        self.parallelOurs = "ours"
        if (a.parallel_workers > 1 and a.parallel_workers != a.workers
                and _haveWorkers()):
            try:
                self.daemons["ours-w%d" % a.parallel_workers] = Daemon(
                    "ours-w%d" % a.parallel_workers, ours, self.workdir,
                    self.cert, self.key, level,
                    f"[daemon]\nworkers = {a.parallel_workers}\n")
                self.parallelOurs = "ours-w%d" % a.parallel_workers
            except RuntimeError as e:
                log(f"workers={a.parallel_workers} daemon: {e}; the "
                    f"parallel scenario uses ours with workers="
                    f"{a.workers}")
        self.nginx = None
        if not a.no_nginx:
            try:
                if ensureNginx():
                    self.nginx = Nginx(
                        self.workdir,
                        os.path.dirname(self.images["random"]), self.cert,
                        self.key)
                else:
                    self.nginxSkip = "nginx not installed (and not root)"
            except Skip as e:
                self.nginxSkip = str(e)

    def _qemu(self, image, fmt, name, extra=()):
        q = QemuNBD(image, fmt, os.path.join(self.workdir, name), extra)
        self.procs.append(q)
        return q

    def tearDown(self):
        for node in reversed(self.nodes):
            node.stop()
        for d in self.daemons.values():
            d.stop()
        if self.nginx is not None:
            self.nginx.stop()
        for p in self.procs:
            p.stop()
        if self.sink is not None:
            self.sink.close()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # Scenarios.

    def build(self):
        size = self.sizes["random"]
        for backend in ("file", "nbd"):
            for op in ("download", "upload"):
                for transport in ("tls", "unix"):
                    self.scenarios.append(self._curlScenario(
                        backend, op, transport, size))
        for op in ("download", "upload"):
            self.scenarios.append(self._clientScenario(op))
        self.scenarios.append(self._parallelScenario(size))
        for n in (4096, 65536, MiB):
            self.scenarios.append(self._readsScenario(n))
        for n in (4096, 65536, MiB):
            self.scenarios.append(self._readsScenario(n, CONNECTIONS))
        self.scenarios.append(self._v2vScenario())
        self.scenarios.append(self._extentsScenario())
        for backend in ("nbd", "file"):
            self.scenarios.append(self._zeroScenario(backend))
        for backend in ("file", "nbd"):
            self.scenarios.append(self._checksumScenario(backend))
        for op in ("download", "upload"):
            self.scenarios.append(self._proxyScenario(op))
        import client_bench  # the client matrix (--only client-matrix)
        self.scenarios += client_bench.scenarios(self, Scenario, Result)
        only = [w for w in (self.args.only or "").split(",") if w]
        if only:
            self.scenarios = [s for s in self.scenarios
                              if any(w in s.name for w in only)]

    def _tickets(self, url, size, **kw):
        return {name: d.addTicket(url(name) if callable(url) else url, size,
                                  **kw)
                for name, d in self.daemons.items()}

    def _curlScenario(self, backend, op, transport, size):
        name = f"{op} {transport} {backend} curl"
        s = Scenario(name, "MB/s", None, target=(">=", 1.25, "single stream"),
                     cpuTarget=1.0, cold=backend == "file",
                     source=self.images["random"] if op == "upload"
                     else None)
        state = {}

        def setup():
            if backend == "file" and op == "download":
                url = "file://" + self.images["random"]
            elif backend == "file":
                targets = {n: os.path.join(self.workdir, f"target-{n}.raw")
                           for n in self.daemons}
                for path in targets.values():
                    open(path, "wb").close()
                state["targets"] = targets
                url = lambda n: "file://" + targets[n]  # noqa: E731
            else:
                url = self.nbd.url
            state["tickets"] = self._tickets(url, size)

        def measure(d):
            if "targets" in state:
                # The same starting point for both: an empty sparse file.
                path = state["targets"][d.name]
                os.truncate(path, 0)
                os.truncate(path, size)
            args = [d.url(state["tickets"][d.name], transport)]
            if transport == "tls":
                args += ["--cacert", d.cert]
            else:
                args += ["--unix-socket", d.localSocket]
            return self._curlTransfer(args, op, size, d.cpu)

        s.setup = setup
        s.measure = measure
        return s

    def _curlTransfer(self, args, op, size, cpu):
        """
        One curl download or upload of the random image (C{args}: the URL
        and TLS or socket options); C{cpu()} gives the server's CPU
        seconds.
        """
        if op == "upload":
            # No 100-continue round trip: the same for both daemons.
            args = args + ["-T", self.images["random"], "-H", "Expect:"]
        before = cpu()
        seconds, code, down, up = curl(args)
        used = cpu() - before
        moved = down if op == "download" else up
        if code != 200 or moved != size:
            raise RuntimeError(f"status {code}, {moved} of {size} bytes")
        return Result(size / seconds / MB, used, size, seconds)

    def _clientScenario(self, op):
        # Both clients find the daemon on their host (OPTIONS names its
        # unix socket) and move there: no TLS in these rows (the client
        # matrix, bench/client_bench.py, runs daemons without it).
        name = f"{op} file client, local socket"
        s = Scenario(name, "MB/s", None, cold=True,
                     source=self.images["sparse.qcow2"] if op == "upload"
                     else None)
        virtual = self.sizes["sparse"]
        state = {}
        ourClient = ourClientAvailable()

        def setup():
            if not ourClient:
                s.skip = "not yet (imageio.client not importable)"
                return
            if op == "download":
                state["tickets"] = self._tickets(
                    "file://" + self.images["sparse"], virtual)
            else:
                targets = {n: os.path.join(self.workdir,
                                           f"client-target-{n}.raw")
                           for n in self.daemons}
                for path in targets.values():
                    open(path, "wb").close()
                state["targets"] = targets
                state["tickets"] = self._tickets(
                    lambda n: "file://" + targets[n], virtual)

        def measure(d):
            tid = state["tickets"][d.name]
            if d.name == "ref":
                python = os.path.join(self.refvenv, "bin", "python")
                script = REF_CLIENT
            else:
                python = sys.executable
                script = OUR_CLIENT
            if op == "download":
                path = os.path.join(self.workdir, f"client-{d.name}.qcow2")
                if os.path.exists(path):
                    os.unlink(path)
            else:
                target = state["targets"][d.name]
                os.truncate(target, 0)
                os.truncate(target, virtual)
                path = self.images["sparse.qcow2"]
            cpu = d.cpu()
            start = time.monotonic()
            out = subprocess.run(
                [python, "-c", script, op, d.url(tid), path, d.cert],
                capture_output=True, text=True, timeout=1800, cwd=REPO)
            seconds = time.monotonic() - start
            cpu = d.cpu() - cpu
            if out.returncode != 0:
                raise RuntimeError(f"client failed: {out.stderr[-2000:]}")
            if op == "download":
                os.unlink(path)
            return Result(virtual / seconds / MB, cpu, virtual, seconds)

        s.setup = setup
        s.measure = measure
        return s

    @staticmethod
    def _fourRanges(url, cert, size):
        """
        Download C{url} as 4 parallel curl Range requests over TLS; return
        the seconds taken.
        """
        part = size // 4
        procs = []
        start = time.monotonic()
        for i in range(4):
            last = size - 1 if i == 3 else (i + 1) * part - 1
            procs.append(subprocess.Popen(
                ["curl", "-sS", "--fail", "-o", "/dev/null",
                 "--cacert", cert, "-r", f"{i * part}-{last}", url],
                stderr=subprocess.PIPE))
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(p.stderr.read().decode())
        return time.monotonic() - start

    def _parallelScenario(self, size):
        ours = self.parallelOurs
        label = ours if ours != "ours" else f"ours-w{self.args.workers}"
        s = Scenario(f"download tls file 4x range {label}", "MB/s", None,
                     target=(">=", 1.0, "workers=2"), ours=ours, cold=True)
        state = {}

        def setup():
            state["tickets"] = self._tickets(
                "file://" + self.images["random"], size)

        def measure(d):
            tid = state["tickets"][d.name]
            cpu = d.cpu()
            seconds = self._fourRanges(d.url(tid), d.cert, size)
            cpu = d.cpu() - cpu
            return Result(size / seconds / MB, cpu, size, seconds)

        s.setup = setup
        s.measure = measure
        return s

    def _proxyScenario(self, op):
        s = Scenario(f"proxy {op} tls", "MB/s", None,
                     target=(">=", 1.25, "single stream"), cold=True,
                     source=self.images["random"] if op == "upload"
                     else None)
        size = self.sizes["random"]
        state = {}

        def setup():
            state["proxies"] = proxies = self._proxies()
            host = state["host"] = self._proxyHost
            tid = f"proxy-{op}"
            if op == "download":
                url = "file://" + self.images["random"]
            else:
                target = os.path.join(self.workdir, "proxy-target.raw")
                open(target, "wb").close()
                os.truncate(target, size)
                state["target"] = target
                url = "file://" + target
            host.addTicket(tid, url, size)
            for node in proxies.values():
                node.addTicket(tid, host.imageURL(tid), size)
            state["tid"] = tid

        def measure(d):
            node = state["proxies"][d.name]
            args = [node.imageURL(state["tid"]), "--cacert", node.ca]
            pids = processTree(node.pid)
            return self._curlTransfer(
                args, op, size, lambda: sum(cpuSeconds(p) for p in pids))

        s.setup = setup
        s.measure = measure
        return s

    def _proxies(self):
        """
        The upstream host (the reference daemon, with its own CA) and the
        two proxies in front of it, started once for both proxy rows.
        """
        if self._proxyNodes is None:
            # The project's test package, not the standard library's.
            sys.path.insert(0, REPO)
            if not getattr(sys.modules.get("test"), "__file__", "") \
                    .startswith(REPO):
                for name in [m for m in sys.modules
                             if m == "test" or m.startswith("test.")]:
                    del sys.modules[name]
            from test.support import makePKI
            from test.test_proxy import Node, hostConf, proxyConf
            python = os.path.join(self.refvenv, "bin", "python")
            pkiA = makePKI(os.path.join(self.workdir, "pki-host"),
                           caName="host CA")
            pkiB = makePKI(os.path.join(self.workdir, "pki-engine"),
                           caName="engine CA")

            def start(name, sections, ca, reference):
                node = Node(name, os.path.join(self.workdir, name),
                            sections, ca, reference=reference)
                self.nodes.append(node)
                return node

            self._proxyHost = start(
                "proxy-host",
                hostConf(os.path.join(self.workdir, "proxy-host"), pkiA),
                pkiA.ca, python)
            self._proxyNodes = {
                name: start(f"proxy-{name}",
                            proxyConf(os.path.join(self.workdir,
                                                   f"proxy-{name}"),
                                      pkiB, pkiA.ca),
                            pkiB.ca, python if name == "ref" else None)
                for name in ("ours", "ref")}
        return self._proxyNodes

    def _readsScenario(self, n, connections=1):
        label = {4096: "4k", 65536: "64k", MiB: "1m"}[n]
        if connections == 1:
            s = Scenario(f"random reads {label} tls keep-alive", "req/s",
                         None, target=(">=", 1.0, "one connection"),
                         cold=True)
        else:
            s = Scenario(f"random reads {label} tls {connections} "
                         f"connections", "req/s", None,
                         target=(">=", 1.5, f"{connections} connections"),
                         cold=True)
        size = self.sizes["random"]
        state = {}
        duration = self.args.reads_seconds

        def setup():
            state["tickets"] = self._tickets(
                "file://" + self.images["random"], size)

        def measureMany(d):
            tid = state["tickets"][d.name]
            count, moved, seconds, cpu = self._load(
                d, lambda i: ("reads", d.port, d.cert, tid, size, n,
                              duration, i), connections)
            return Result(count / seconds, cpu, moved, seconds)

        def measure(d):
            r = KeepAliveReader(d, state["tickets"][d.name], "tls")
            try:
                rnd = random.Random(n)
                r.get(0, n)   # opens the backend
                count = 0
                cpu = d.cpu()
                start = time.monotonic()
                deadline = start + duration
                while True:
                    r.get(rnd.randrange(0, (size - n) // 4096) * 4096, n)
                    count += 1
                    if count % 16 == 0 and time.monotonic() >= deadline:
                        break
                seconds = time.monotonic() - start
                cpu = d.cpu() - cpu
            finally:
                r.close()
            return Result(count / seconds, cpu, count * n, seconds)

        s.setup = setup
        s.measure = measure if connections == 1 else measureMany
        return s

    def _load(self, d, argsFor, connections=CONNECTIONS):
        """
        Run C{connections} client processes (bench/loadclient.py, the
        arguments of each from C{argsFor(i)}), started together once all
        are connected; the total requests and bytes, the seconds, the
        daemon CPU.
        """
        procs = [subprocess.Popen(
            [sys.executable, os.path.join(HERE, "loadclient.py"),
             *map(str, argsFor(i))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE) for i in range(connections)]
        try:
            time.sleep(1)
            cpu = d.cpu()
            start = time.monotonic()
            for p in procs:
                p.stdin.write(b"go\n")
                p.stdin.flush()
            results = []
            for p in procs:
                out, err = p.communicate(timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(err.decode()[-2000:])
                results.append(json.loads(out))
            seconds = time.monotonic() - start
            cpu = d.cpu() - cpu
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return (sum(r["requests"] for r in results),
                sum(r["bytes"] for r in results), seconds, cpu)

    def _v2vScenario(self):
        s = Scenario(f"virt-v2v upload load tls {CONNECTIONS} connections",
                     "req/s", None, target=(">=", 1.5, "8 connections"))
        size = self.sizes["random"]
        state = {}
        duration = self.args.reads_seconds

        def setup():
            paths = {}
            for name in self.daemons:
                path = os.path.join(self.workdir, f"v2v-{name}.raw")
                with open(path, "wb") as f:
                    f.truncate(size)
                paths[name] = path
            state["tickets"] = self._tickets(
                lambda name: "file://" + paths[name], size)

        def measure(d):
            tid = state["tickets"][d.name]
            count, moved, seconds, cpu = self._load(
                d, lambda i: ("v2v", d.port, d.cert, tid, size, duration,
                              i))
            return Result(count / seconds, cpu, moved, seconds)

        s.setup = setup
        s.measure = measure
        return s

    def _extentsScenario(self):
        # qemu-nbd reads the image's 1 GiB of L2 tables for each listing.
        # Whoever came first after another scenario dropped the page cache
        # read them from disk (20 s instead of 10 s): both sides now start
        # with the cache dropped and the image read back in (source).
        s = Scenario("extents 8 TiB qcow2 nbd (32,768)", "s", None,
                     target=("<=", 0.8, "time"), higher=False, cold=True,
                     source=self.images["extents.qcow2"])
        state = {}

        def setup():
            state["tickets"] = self._tickets(self.nbdExtents.url, 8 * TiB,
                                             ops=("read",))

        def measure(d):
            con = UnixHTTPConnection(d.localSocket)
            try:
                cpu = d.cpu()
                start = time.monotonic()
                con.request("GET",
                            f"/images/{state['tickets'][d.name]}/extents")
                resp = con.getresponse()
                body = resp.read()
                seconds = time.monotonic() - start
                cpu = d.cpu() - cpu
            finally:
                con.close()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}: {body[:200]!r}")
            count = len(json.loads(body))
            if count != 32768:
                raise RuntimeError(f"{count} extents, expected 32768")
            return Result(seconds, cpu, 0, seconds)

        s.setup = setup
        s.measure = measure
        return s

    def _zeroScenario(self, backend):
        s = Scenario(f"zero 8 TiB {backend}", "s", None,
                     target=("<=", 1 / 1.25, "time"), higher=False)
        state = {}

        def setup():
            urls = {}
            for name in self.daemons:
                # A sparse raw file (a qcow2 target makes qemu write 1 GiB
                # of L2 tables, and that, not the daemon, takes a minute).
                path = os.path.join(self.workdir, f"zero-{name}.raw")
                with open(path, "wb") as f:
                    f.truncate(8 * TiB)
                if backend == "nbd":
                    urls[name] = self._qemu(path, "raw",
                                            f"zero-{name}.sock").url
                else:
                    urls[name] = "file://" + path
            state["tickets"] = self._tickets(lambda n: urls[n], 8 * TiB,
                                             sparse=True)

        def measure(d):
            con = UnixHTTPConnection(d.localSocket)
            try:
                cpu = d.cpu()
                start = time.monotonic()
                con.request("PATCH", f"/images/{state['tickets'][d.name]}",
                            body=json.dumps({"op": "zero", "offset": 0,
                                             "size": 8 * TiB}),
                            headers={"content-type": "application/json"})
                resp = con.getresponse()
                body = resp.read()
                seconds = time.monotonic() - start
                cpu = d.cpu() - cpu
            finally:
                con.close()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}: {body[:200]!r}")
            return Result(seconds, cpu, 0, seconds)

        s.setup = setup
        s.measure = measure
        return s

    def _checksumScenario(self, backend):
        """
        C{/checksum} of the 4 GiB mixed image (8 MiB of data, 8 MiB of
        hole, repeated) on a file or an nbd ticket. Every run's digest must
        equal the reference's.
        """
        size = self.sizes["sparse"]
        s = Scenario(f"checksum {backend} mixed", "MB/s", None,
                     target=(">=", 1.5, "checksum"), cold=True)
        state = {}

        def setup():
            if backend == "nbd":
                url = self._qemu(self.images["sparse"], "raw",
                                 "nbd-sparse.sock", ("--read-only",)).url
            else:
                url = "file://" + self.images["sparse"]
            state["tickets"] = self._tickets(url, size, ops=("read",))

        def measure(d):
            con = UnixHTTPConnection(d.localSocket)
            try:
                cpu = d.cpu()
                start = time.monotonic()
                con.request("GET",
                            f"/images/{state['tickets'][d.name]}/checksum")
                resp = con.getresponse()
                body = resp.read()
                seconds = time.monotonic() - start
                cpu = d.cpu() - cpu
            finally:
                con.close()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}: {body[:200]!r}")
            result = json.loads(body)
            other = state.setdefault("sums", {}).setdefault(
                "checksum", result["checksum"])
            if result["checksum"] != other:
                raise RuntimeError(f"{d.name} checksum {result['checksum']} "
                                   f"!= {other}")
            return Result(size / seconds / MB, cpu, size, seconds)

        s.setup = setup
        s.measure = measure
        return s

    # Ceilings.

    def measureCeilings(self):
        size = self.sizes["random"]
        want = set(s.name for s in self.scenarios)
        if any("download tls file curl" == n for n in want):
            if self.nginx is not None:
                cpu = self.nginx.cpu()
                seconds, code, down, _ = curl(
                    ["--cacert", self.cert,
                     f"https://localhost:{self.nginx.port}/random.raw"])
                cpu = self.nginx.cpu() - cpu
                if code != 200 or down != size:
                    raise RuntimeError("nginx download failed")
                self.ceilings.setdefault("nginx tls download", []).append(
                    Result(size / seconds / MB, cpu, size, seconds))
        if "upload unix file curl" in want:
            if self.sink is None:
                self.sink = CurlSink(self.workdir)
            if self.coldCache:
                dropCaches(self.images["random"])
            value, seconds = self.sink.upload(self.images["random"])
            self.ceilings.setdefault("curl unix upload to a sink", []).append(
                Result(value, None, size, seconds))
        if any("4x range" in n for n in want) and self.nginx is not None:
            # The same 4 TLS streams from nginx, the image in the page
            # cache: what the machine's CPUs allow (curl decrypting 4
            # streams, the server encrypting them).
            with open(self.images["random"], "rb", buffering=0) as f:
                buf = bytearray(8 * MiB)
                while f.readinto(buf):
                    pass
            seconds = self._fourRanges(
                f"https://localhost:{self.nginx.port}/random.raw",
                self.cert, size)
            self.ceilings.setdefault("nginx tls 4x range, warm", []).append(
                Result(size / seconds / MB, None, size, seconds))
        if any("4x range" in n for n in want) and self.coldCache:
            dropCaches()
            value = directReads(self.images["random"])
            self.ceilings.setdefault("disk, 4 parallel direct reads",
                                     []).append(
                Result(value, None, size, size / MB / value))
        if any("download unix nbd curl" == n for n in want):
            start = time.monotonic()
            subprocess.run(["nbdcopy", f"nbd+unix:///?socket={self.nbd.sock}",
                            "null:"], check=True)
            seconds = time.monotonic() - start
            self.ceilings.setdefault("nbdcopy nbd download", []).append(
                Result(size / seconds / MB, None, size, seconds))

    # Running.

    def run(self):
        self.coldCache = canDropCaches()
        if not self.coldCache:
            log("not root: cannot drop the page cache; file rows are "
                "warm-cache")
        for s in self.scenarios:
            if s.skip is None and s.setup is not None:
                try:
                    s.setup()
                except Exception as e:
                    s.skip = f"setup failed: {e}"
                    traceback.print_exc()
        for r in range(self.args.runs):
            try:
                self.measureCeilings()
            except Exception as e:
                log(f"ceiling failed: {e}")
            for i, s in enumerate(self.scenarios):
                if s.skip is not None:
                    continue
                names = [s.ours, "ref"]
                if (r + i) % 2:
                    names.reverse()
                for name in names:
                    for q in self.procs:
                        if q.ensure():
                            log(f"restarted qemu-nbd on {q.sock}")
                    d = self.daemons[name]
                    if s.cold and self.coldCache:
                        dropCaches(s.source)
                    try:
                        res = s.measure(d)
                    except Exception as e:
                        s.errors.append(f"{name}: {e}")
                        log(f"run {r + 1}: {s.name}: {name} FAILED: {e}")
                        if not d.alive():
                            raise SystemExit(f"{name} daemon died, see "
                                             f"{d.logPath}")
                        continue
                    s.results.setdefault(name, []).append(res)
                    cpu = res.cpuPerGiB()
                    log(f"run {r + 1}: {s.name:40} {name:7} "
                        f"{res.value:10.2f} {s.unit}"
                        + (f"  cpu {cpu:.2f} s/GiB" if cpu is not None
                           else ""))

    # Reporting.

    def report(self):
        rows = []
        for s in self.scenarios:
            row = {"name": s.name, "unit": s.unit, "ours_daemon": s.ours}
            if s.skip is not None:
                row["skip"] = s.skip
                rows.append(row)
                continue
            for who, name in (("ours", s.ours), ("ref", "ref")):
                res = s.results.get(name, [])
                row[who] = _stats([x.value for x in res])
                cpus = [x.cpuPerGiB() for x in res
                        if x.cpuPerGiB() is not None]
                row[who + "_cpu_per_gib"] = _stats(cpus)
                row[who + "_cpu_s"] = _stats([x.cpu for x in res
                                              if x.cpu is not None])
            ours = [x.value for x in s.results.get(s.ours, [])]
            ref = [x.value for x in s.results.get("ref", [])]
            pairs = list(zip(ours, ref))
            if pairs:
                row["ratio"] = _stats([a / b for a, b in pairs if b])
            oc = row.get("ours_cpu_per_gib") or {}
            rc = row.get("ref_cpu_per_gib") or {}
            if oc.get("median") and rc.get("median"):
                row["cpu_ratio"] = oc["median"] / rc["median"]
            row["target"] = _verdict(s, row)
            row["errors"] = s.errors
            rows.append(row)
        ceilings = {name: _stats([x.value for x in res])
                    for name, res in self.ceilings.items()}
        if self.nginx is None:
            ceilings["nginx tls download"] = {
                "skip": getattr(self, "nginxSkip", "disabled")}
        extra = _ceilingTargets(rows, ceilings)
        rss = {}
        for name, d in self.daemons.items():
            rss[name] = {str(pid): hwm for pid, hwm in d.peakRSS().items()}
        return {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(),
            "runs": self.args.runs, "scale": self.args.scale,
            "cold_cache": self.coldCache,
            "sizes": self.sizes, "workers": self.args.workers,
            "rows": rows, "ceilings": ceilings,
            "ceiling_targets": extra, "peak_rss": rss,
        }


def _haveWorkers():
    """
    Whether our daemon implements C{[daemon] workers} (imageio/workers/).
    """
    r = subprocess.run([sys.executable, "-c", "import imageio.workers"],
                       capture_output=True, cwd=REPO)
    return r.returncode == 0


def _stats(values):
    if not values:
        return {}
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0],
            "max": values[-1], "runs": values}


def _verdict(s, row):
    parts = []
    ratio = row.get("ratio", {}).get("median")
    if s.target is not None and ratio is not None:
        op, limit, _ = s.target
        ok = ratio >= limit if op == ">=" else ratio <= limit
        parts.append(f"{'ok' if ok else 'FAIL'} ratio {op} {limit:.2f}")
    cpu = row.get("cpu_ratio")
    if s.cpuTarget is not None and cpu is not None:
        ok = cpu <= s.cpuTarget
        parts.append(f"{'ok' if ok else 'FAIL'} cpu <= {s.cpuTarget}")
    return ", ".join(parts)


def _ceilingTargets(rows, ceilings):
    out = {}
    byName = {r["name"]: r for r in rows}
    nginx = ceilings.get("nginx tls download", {}).get("median")
    tls = byName.get("download tls file curl", {}).get("ours", {})
    if nginx and tls.get("median"):
        f = tls["median"] / nginx
        out["tls download / nginx"] = {
            "value": f, "target": ">= 0.85",
            "ok": f >= 0.85}
    nbdcopy = ceilings.get("nbdcopy nbd download", {}).get("median")
    unix = byName.get("download unix nbd curl", {}).get("ours", {})
    if nbdcopy and unix.get("median"):
        f = unix["median"] / nbdcopy
        out["nbd unix download / nbdcopy"] = {
            "value": f, "target": ">= 0.80", "ok": f >= 0.80}
    # Room: how far above the reference the machine lets anyone go. A
    # ratio target above it cannot be met by any daemon here.
    for ceiling, scenario, target in (
            ("curl unix upload to a sink", "upload unix file curl", 1.25),
            ("disk, 4 parallel direct reads",
             "download tls file 4x range", 1.25),
            ("nginx tls 4x range, warm", "download tls file 4x range",
             1.25)):
        top = ceilings.get(ceiling, {}).get("median")
        row = next((r for r in rows if r["name"].startswith(scenario)), {})
        ref = row.get("ref", {}).get("median")
        if top and ref:
            f = top / ref
            out[f"room: {ceiling} / ref"] = {
                "value": f, "target": f">= {target:.2f} for a {target:.2f} "
                                      f"ratio to be possible",
                "ok": f >= target}
    return out


def _fmt(st, unit):
    if not st or "median" not in st:
        return "-"
    p = 3 if unit == "s" else (0 if st["median"] >= 100 else 2)
    return f"{st['median']:.{p}f} ({st['min']:.{p}f}-{st['max']:.{p}f})"


def printTable(report, out=sys.stdout):
    w = out.write
    w(f"\ntximageio vs ovirt-imageio 2.5.1 -- {report['date']}, "
      f"{report['runs']} runs, {report['cpus']} cpus, load at end "
      f"{report['loadavg_end'][0]:.2f}\n")
    w(f"images: random {report['sizes']['random'] / GiB:g} GiB, sparse "
      f"{report['sizes']['sparse'] / GiB:g} GiB; ours workers="
      f"{report['workers']}\n")
    w("values: median (min-max); ratio = ours/ref paired per run; "
      "cpu = daemon CPU s/GiB\n")
    if report.get("cold_cache"):
        w("file tickets: page cache dropped before every run, both sides "
          "(an upload's source file read back in after)\n\n")
    else:
        w("file tickets: WARM page cache (not root: cannot drop caches)\n\n")
    head = (f"{'scenario':42} {'unit':5} {'ours':>20} {'ref':>20} "
            f"{'ratio':>17} {'cpu ours':>8} {'cpu ref':>8}  target\n")
    w(head)
    w("-" * (len(head) + 20) + "\n")
    for row in report["rows"]:
        if "skip" in row:
            w(f"{row['name']:42} {row['unit']:5} {row['skip']}\n")
            continue
        oc = row.get("ours_cpu_per_gib", {}).get("median")
        rc = row.get("ref_cpu_per_gib", {}).get("median")
        ratio = row.get("ratio", {})
        rtxt = (f"{ratio['median']:.2f} ({ratio['min']:.2f}-"
                f"{ratio['max']:.2f})" if ratio else "-")
        w(f"{row['name']:42} {row['unit']:5} {_fmt(row['ours'], row['unit']):>20} "
          f"{_fmt(row['ref'], row['unit']):>20} {rtxt:>17} "
          f"{'' if oc is None else f'{oc:.2f}':>8} "
          f"{'' if rc is None else f'{rc:.2f}':>8}  {row['target']}\n")
        for e in row.get("errors", [])[:3]:
            w(f"    error: {e[:150]}\n")
    w("\nceilings:\n")
    for name, st in report["ceilings"].items():
        w(f"  {name:30} {st.get('skip') or _fmt(st, 'MB/s') + ' MB/s'}\n")
    for name, t in report["ceiling_targets"].items():
        w(f"  {name:30} {t['value']:.2f} (target {t['target']}: "
          f"{'ok' if t['ok'] else 'FAIL'})\n")
    w("\npeak RSS (VmHWM) per process:\n")
    for name, procs in report["peak_rss"].items():
        vals = ", ".join(f"{int(v) / MiB:.0f}" for v in procs.values())
        worst = max((int(v) for v in procs.values()), default=0) / MiB
        w(f"  {name:8} {vals} MiB  "
          f"({'ok' if worst < 150 else 'FAIL'} < 150 MiB per process)\n")


def main():
    p = argparse.ArgumentParser(
        description="tximageio vs the reference ovirt-imageio")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0,
                   help="image size factor (0.125 for a quick smoke run)")
    p.add_argument("--only", help="comma separated substrings of scenario "
                   "names to run")
    p.add_argument("--images", default="/var/tmp/tximageio-bench-images",
                   help="where the test images are made (reused)")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--refvenv")
    p.add_argument("--workers", type=int, default=1,
                   help="[daemon] workers of our daemon")
    p.add_argument("--parallel-workers", type=int, default=2,
                   help="workers of our daemon for the 4x range scenario")
    p.add_argument("--reads-seconds", type=float, default=3.0)
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (daemon logs)")
    p.add_argument("--json", help="output file (default "
                   "bench/results/run-DATE.json)")
    args = p.parse_args()
    if args.images == p.get_default("images") and args.scale != 1.0:
        args.images += f"-{args.scale:g}"

    started = time.monotonic()
    bench = Bench(args)
    try:
        bench.setUp()
        bench.build()
        bench.run()
        report = bench.report()
    finally:
        bench.tearDown()
    report["elapsed_s"] = time.monotonic() - started
    path = args.json or os.path.join(
        REPO, "bench", "results",
        "run-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    printTable(report)
    print(f"\nJSON: {path}  ({report['elapsed_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
