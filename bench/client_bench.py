#!/usr/bin/env python3
"""
Client matrix: our client library against the reference client on the
same daemon, in the same run (issue 15).

    .venv/bin/python bench/client_bench.py [--runs 5] [--scale 1]
        [--only "down qcow2"] [--json out.json]
    .venv/bin/python bench/run.py --only client-matrix     # inside make bench

Rows: for each daemon (ours, the reference), upload and download, a raw
and a qcow2 local image, the dense image (random data) and the mixed one
(half data, half holes), a file ticket and an nbd ticket (qemu-nbd over a
unix socket). Every transfer is over TLS: the daemons here run without
their local unix service, else both clients would move to its socket (as
they do when the daemon is on their host) and TLS would not be measured.

Each transfer runs in a new process with that client's Python: ours
(C{imageio.client.upload/download}) with this virtualenv's, the
reference's (C{ovirt_imageio.client.upload/download}) with the reference
virtualenv's, both with their defaults (buffer size, connections). The
time is the library call's, measured in that process (the interpreter's
start and imports are left out). The page cache is dropped before every
transfer (root only), so the local image, the ticket's file and qemu-nbd's
image are all read cold. The two clients alternate which goes first.

The ratio is reference time / our time, paired per run (above 1: ours is
faster). Targets: median >= 1.25 and min >= 1.0 in every row.

Once per run and row, after the reference client, two ceilings, each
doing strictly less than any client must:
  - L{_ceiling}: the row's copy by C{qemu-img convert} while nginx sends
    the row's data bytes over TLS to 4 curls (the disk and TLS work,
    without HTTP, a daemon or Python);
  - L{_ideal}: C{_idealclient.py} sending the row's requests to the row's
    daemon without reading or writing a local image.
The room (reference time over a ceiling's, paired per run) is the most
any client could gain over the reference on this host; a failing row
whose median room is below 1.25 for either ceiling says so ("no room").

Built on run.py's L{Bench} (images, the run loop with its interleaving and
cache drops, the report); L{scenarios} is the hook run.py calls.

Measured 2026-12-07 (2 cores; full size, 5 runs; /tmp/cm9.json): ratio
medians 0.93-1.38 over the 32 rows, 4 rows at the target (uploads of the
dense images to file tickets); 3 rows have no room (the downloads of the
dense raw image from a file ticket: their first ceiling leaves 1.17 and
1.21; the mixed raw download from an nbd ticket of our daemon: the ideal
client leaves 1.23). Our client used 2.6-3.5 s of CPU per transfer
(process and its qemu-nbd, imports included), the reference's 2.5-3.6 s
(6.3-6.5 s both on the mixed file downloads from the reference daemon).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import REPO, MiB, Nginx, QemuNBD, Skip  # noqa: E402

ROWS = "client-matrix"

_CLIENT = """
import sys, time
op, url, path, cafile, fmt = sys.argv[1:6]
from {package} import client
start = time.monotonic()
if op == "upload":
    client.upload(path, url, cafile)
else:
    client.download(url, path, cafile, fmt=fmt)
print(time.monotonic() - start)
"""

OURS = _CLIENT.format(package="imageio")
REFERENCE = _CLIENT.format(package="ovirt_imageio")


def _testPackage():
    """
    Import the project's C{test} package (not the standard library's).
    """
    sys.path.insert(0, REPO)
    if not getattr(sys.modules.get("test"), "__file__", "").startswith(REPO):
        for name in [m for m in sys.modules
                     if m == "test" or m.startswith("test.")]:
            del sys.modules[name]


class _Matrix:
    """
    What the rows share, started on the first row's set-up: one TLS-only
    daemon of each kind, qemu-nbd exports of the two source images
    (read-only) and of two upload targets.
    """

    def __init__(self, bench):
        self.bench = bench
        self.daemons = None

    def start(self):
        if self.daemons is not None:
            return
        b = self.bench
        _testPackage()
        from test.support import makePKI
        from test.test_proxy import Node, hostConf
        work = os.path.join(b.workdir, "client-matrix")
        self.work = work
        os.makedirs(work, exist_ok=True)
        self.pki = makePKI(os.path.join(work, "pki"))
        python = os.path.join(b.refvenv, "bin", "python")
        self.daemons = {}
        for name in ("ours", "ref"):
            conf = os.path.join(work, "daemon-" + name)
            sections = hostConf(conf, self.pki)
            sections["logger_root"]["level"] = "WARNING"
            node = Node("cm-" + name, conf, sections, self.pki.ca,
                        reference=python if name == "ref" else None)
            b.nodes.append(node)
            self.daemons[name] = node
        self.sources = {"dense": b.images["random"],
                        "mixed": b.images["sparse"]}
        self.sizes = {"dense": b.sizes["random"], "mixed": b.sizes["sparse"]}
        self.locals = {("dense", "raw"): b.images["random"],
                       ("dense", "qcow2"): b.images["random.qcow2"],
                       ("mixed", "raw"): b.images["sparse"],
                       ("mixed", "qcow2"): b.images["sparse.qcow2"]}
        self.exports = {}
        self.targets = {}
        for density, path in self.sources.items():
            self.exports[("down", density)] = self._qemu(
                path, f"src-{density}", ("--read-only",))
            for backend in ("file", "nbd"):
                target = os.path.join(work, f"target-{density}-{backend}.raw")
                with open(target, "wb") as f:
                    f.truncate(self.sizes[density])
                self.targets[(density, backend)] = target
            self.exports[("up", density)] = self._qemu(
                self.targets[(density, "nbd")], f"dst-{density}")
        self.dataBytes = {density: _dataBytes(path)
                          for density, path in self.sources.items()}
        self.tls = _TLSStreams.start(self.work, self.pki,
                                     max(self.dataBytes.values()))
        if self.tls is not None:
            b.procs.append(self.tls)

    def _qemu(self, image, name, extra=()):
        q = QemuNBD(image, "raw", os.path.join(self.work, name + ".sock"),
                    extra)
        self.bench.procs.append(q)
        return q

    def ticket(self, daemon, op, density, backend):
        """
        A ticket on C{daemon} for one row, as engine would make it: read
        only for a download, write only for an upload.
        """
        node = self.daemons[daemon]
        if backend == "file":
            path = (self.sources[density] if op == "down"
                    else self.targets[(density, backend)])
            url = "file://" + path
        else:
            url = self.exports[(op, density)].url
        tid = f"cm-{daemon}-{op}-{density}-{backend}"
        ops = ["read"] if op == "down" else ["write"]
        node.addTicket(tid, url, self.sizes[density], ops=ops, sparse=True,
                       inactivity_timeout=3600, timeout=36000)
        return node.imageURL(tid)


def scenarios(bench, Scenario, Result):
    """
    The client matrix as run.py scenarios (the hook in C{Bench.build}).

    run.py measures each scenario once per run with the "ours" and the
    "ref" daemon; here that name picks the client, and the row's daemon
    is fixed. A value is MB/s of the image's virtual size, so run.py's
    ratio (ours / ref) is the reference's time over ours.
    """
    matrix = _Matrix(bench)
    rows = []
    for daemon in ("ours", "ref"):
        for op in ("up", "down"):
            for fmt in ("raw", "qcow2"):
                for density in ("dense", "mixed"):
                    for backend in ("file", "nbd"):
                        rows.append(_scenario(
                            bench, matrix, Scenario, Result, daemon, op,
                            fmt, density, backend))
    return rows


def _scenario(bench, matrix, Scenario, Result, daemon, op, fmt, density,
              backend):
    name = f"{ROWS} {op:4} {fmt:5} {density} {backend:4} @{daemon}"
    s = Scenario(name, "MB/s", None, target=(">=", 1.25, "client"),
                 cold=True)
    state = {}

    def setup():
        matrix.start()
        state["url"] = matrix.ticket(daemon, op, density, backend)
        state["size"] = matrix.sizes[density]

    def measure(d):
        client = d.name  # which client; the daemon is the row's
        size = state["size"]
        if client == "ref":
            python = os.path.join(bench.refvenv, "bin", "python")
            script = REFERENCE
        else:
            python = sys.executable
            script = OURS
        if op == "up":
            target = matrix.targets.get((density, backend))
            # The same starting point for both clients: an empty target.
            os.truncate(target, 0)
            os.truncate(target, size)
            path = matrix.locals[(density, fmt)]
        else:
            path = os.path.join(matrix.work, f"download.{fmt}")
            if os.path.exists(path):
                os.unlink(path)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        out = subprocess.run(
            [python, "-c", script, "upload" if op == "up" else "download",
             state["url"], path, matrix.pki.ca, fmt],
            capture_output=True, text=True, timeout=1800, cwd=REPO)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            raise RuntimeError(f"{client} client failed: "
                               f"{out.stderr[-2000:]}")
        seconds = float(out.stdout.strip().splitlines()[-1])
        if op == "down":
            got = _virtualSize(path, fmt)
            os.unlink(path)
            if got != size:
                raise RuntimeError(f"downloaded {got} bytes of {size}")
        r = Result(size / seconds / 1e6, None, size, seconds)
        # The client process and its qemu-nbd and qemu-img.
        r.clientCpu = (after.ru_utime - before.ru_utime
                       + after.ru_stime - before.ru_stime)
        r.wall = wall
        if client == "ref":
            # Once per run: the row's ceilings (below).
            s.copies.append(_ceiling(matrix, op, fmt, density, backend))
            s.ideals.append(_ideal(matrix, state, op, fmt, density,
                                   backend))
        return r

    s.setup = setup
    s.measure = measure
    s.copies = []
    s.ideals = []
    return s


def _ideal(matrix, state, op, fmt, density, backend) -> float:
    """
    The row's other ceiling: C{bench/_idealclient.py}, a client that sends
    the row's requests to the row's daemon (same ticket, connections,
    extents) but never reads or writes a local image, the page cache
    dropped first. The reference's time over this one is the most any
    client could gain over the reference against that daemon.

    @return: seconds.
    """
    import run
    if "extents" not in state:
        image = (matrix.locals[(density, fmt)] if op == "up"
                 else matrix.sources[density])
        out = subprocess.run(
            ["qemu-img", "map", "--output=json", "-f",
             fmt if op == "up" else "raw", image],
            capture_output=True, text=True, check=True)
        path = os.path.join(matrix.work, f"extents-{op}-{fmt}-{density}"
                                         f".json")
        with open(path, "w") as f:
            f.write(out.stdout)
        state["extents"] = path
    if op == "up":
        target = matrix.targets[(density, backend)]
        os.truncate(target, 0)
        os.truncate(target, matrix.sizes[density])
    if run.canDropCaches():
        run.dropCaches()
    out = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "_idealclient.py"),
         "upload" if op == "up" else "download", state["url"],
         matrix.pki.ca, state["extents"]],
        capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"ideal client failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _ceiling(matrix, op, fmt, density, backend) -> float:
    """
    The row's ceiling, the page cache dropped first: the work any client
    and daemon must do for the row, done at once by the fastest tools on
    this host, with no HTTP, no daemon and no Python:

      - the copy between the same local image and the ticket's file or
        qemu-nbd export, by C{qemu-img convert} (16 requests in flight,
        out of order writes, O_DIRECT where the clients and daemons use
        it): both disks' work;
      - meanwhile, the row's data bytes over TLS from nginx (from memory)
        to 4 curls (to /dev/null): both ends' encryption.

    A transfer does both on the same cores and disk, and more (HTTP,
    NBD, copies between processes); so the reference's time over this one
    is the most any client could gain over the reference here (the
    "room"). Without nginx, only the copy is timed.

    @return: seconds until both are done.
    """
    import run
    size = matrix.sizes[density]
    if op == "up":
        source = matrix.locals[(density, fmt)]
        if backend == "file":
            target = matrix.targets[(density, backend)]
            os.truncate(target, 0)
            os.truncate(target, size)
            cache, dst = ["-t", "none"], target
        else:
            export = matrix.exports[("up", density)]
            cache, dst = [], f"nbd+unix:///?socket={export.sock}"
        argv = ["qemu-img", "convert", "-n", "-W", "-m", "16", "-T", "none",
                *cache, "-f", fmt, "-O", "raw", source, dst]
    else:
        if backend == "file":
            cache, src = ["-T", "none"], matrix.sources[density]
        else:
            export = matrix.exports[("down", density)]
            cache, src = [], f"nbd+unix:///?socket={export.sock}"
        target = os.path.join(matrix.work, f"copy.{fmt}")
        if os.path.exists(target):
            os.unlink(target)
        argv = ["qemu-img", "convert", "-W", "-m", "16", "-t", "none",
                *cache, "-f", "raw", "-O", fmt, src, target]
    if run.canDropCaches():
        run.dropCaches()
    start = time.monotonic()
    copy = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if matrix.tls is not None:
        matrix.tls.fetch(matrix.dataBytes[density])
    err = copy.communicate(timeout=1800)[1]
    seconds = time.monotonic() - start
    if copy.returncode != 0:
        raise RuntimeError(f"qemu-img convert failed: {err[-500:]!r}")
    if op == "down":
        os.unlink(target)
    return seconds


def _dataBytes(path) -> int:
    """
    Bytes of data (not holes or zeroes) in the raw image C{path}.
    """
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw",
                          path], capture_output=True, text=True, check=True)
    return sum(e["length"] for e in json.loads(out.stdout)
               if e.get("data") and not e.get("zero"))


class _TLSStreams:
    """
    nginx serving a blob from memory (tmpfs) over TLS, and 4 curls
    fetching ranges of it: the TLS half of the rows' ceiling.
    """

    STREAMS = 4

    @classmethod
    def start(cls, work, pki, size):
        root = tempfile.mkdtemp(prefix="tximageio-cm-", dir="/dev/shm")
        with open(os.path.join(root, "blob"), "wb") as f:
            for _ in range(0, size, 8 * MiB):
                f.write(os.urandom(8 * MiB))
        try:
            nginx = Nginx(work, root, pki.cert, pki.key)
        except Skip:
            shutil.rmtree(root, ignore_errors=True)
            return None
        return cls(nginx, root, pki.ca)

    def __init__(self, nginx, root, ca):
        self.nginx = nginx
        self.root = root
        self.ca = ca

    def fetch(self, length: int) -> None:
        part = length // self.STREAMS
        url = f"https://localhost:{self.nginx.port}/blob"
        curls = []
        for i in range(self.STREAMS):
            end = length if i == self.STREAMS - 1 else (i + 1) * part
            curls.append(subprocess.Popen(
                ["curl", "-sS", "-o", "/dev/null", "--cacert", self.ca,
                 "-r", f"{i * part}-{end - 1}", url]))
        if any([c.wait() != 0 for c in curls]):
            raise RuntimeError("curl from nginx failed")

    def ensure(self) -> bool:
        return False

    def stop(self) -> None:
        self.nginx.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _virtualSize(path, fmt):
    if fmt == "raw":
        return os.path.getsize(path)
    out = subprocess.run(["qemu-img", "info", "--output=json", path],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["virtual-size"]


# ---------------------------------------------------------------------------
# Running on its own


def _stats(values):
    values = sorted(values)
    if not values:
        return None
    return {"median": statistics.median(values), "min": values[0],
            "max": values[-1], "runs": values}


def table(bench, out=sys.stdout):
    """
    Print the matrix: times (s) and ratios (reference time / ours) per
    row, median (min-max), and the client CPU seconds (medians).
    """
    rows = []
    w = out.write
    w(f"\nclient matrix -- {datetime.datetime.now():%Y-%m-%d %H:%M}, "
      f"{bench.args.runs} runs, scale {bench.args.scale:g} (dense "
      f"{bench.sizes['random'] / MiB:.0f} MiB, mixed "
      f"{bench.sizes['sparse'] / MiB:.0f} MiB virtual), TLS, caches "
      f"dropped before each transfer\n")
    w("ratio = reference time / our time, paired per run; cpu = client "
      "process + its qemu, s\n")
    w("ceiling = the same copy by qemu-img convert on this host while "
      "nginx sends the row's data bytes to 4 curls over TLS (no HTTP "
      "server, daemon or Python); room = reference time / ceiling, "
      "paired per run\n")
    w("ideal client = bench/_idealclient.py: the row's requests to the "
      "row's daemon, without a local image; room = reference time / its "
      "time, paired per run\n")
    w("verdict: ok = median ratio >= 1.25 and min >= 1.0; \"no room\" = "
      "a median room is below 1.25 too\n\n")
    head = (f"{'row':42} {'ours s':>20} {'ref s':>20} {'ratio':>18} "
            f"{'cpu us':>6} {'cpu ref':>7} {'ceiling s':>18} "
            f"{'room':>18} {'ideal client s':>18} {'room':>18}  "
            f"verdict\n")
    w(head)
    w("-" * len(head) + "\n")
    for s in bench.scenarios:
        if not s.name.startswith(ROWS):
            continue
        ours = s.results.get("ours", [])
        ref = s.results.get("ref", [])
        row = {"name": s.name, "errors": s.errors, "skip": s.skip}
        if s.skip:
            w(f"{s.name:42} {s.skip}\n")
            rows.append(row)
            continue
        row["ours_s"] = _stats([r.seconds for r in ours])
        row["ref_s"] = _stats([r.seconds for r in ref])
        row["ratio"] = _stats([b.seconds / a.seconds
                               for a, b in zip(ours, ref)])
        row["ours_cpu"] = _stats([r.clientCpu for r in ours])
        row["ref_cpu"] = _stats([r.clientCpu for r in ref])
        # The ceiling's time, and the reference's time over it in the same
        # run (how much faster than the reference any client could be).
        copies = getattr(s, "copies", [])
        row["copy_s"] = _stats(copies)
        row["room"] = _stats([b.seconds / c for b, c in zip(ref, copies)])
        ideals = getattr(s, "ideals", [])
        row["ideal_s"] = _stats(ideals)
        row["room_ideal"] = _stats([b.seconds / c
                                    for b, c in zip(ref, ideals)])
        rows.append(row)

        def fmt(st, p=2):
            if not st:
                return "-"
            return (f"{st['median']:.{p}f} ({st['min']:.{p}f}-"
                    f"{st['max']:.{p}f})")

        ratio = row["ratio"]
        room = row["room"]
        ideal = row["room_ideal"]
        verdict = "-"
        if ratio:
            ok = ratio["median"] >= 1.25 and ratio["min"] >= 1.0
            verdict = "ok" if ok else "FAIL"
            rooms = [x["median"] for x in (room, ideal) if x]
            if not ok and rooms and min(rooms) < 1.25:
                # Even a ceiling is not 1.25x the reference.
                verdict = "FAIL, no room"
        w(f"{s.name:42} {fmt(row['ours_s']):>20} {fmt(row['ref_s']):>20} "
          f"{fmt(ratio):>18} "
          f"{row['ours_cpu']['median'] if row['ours_cpu'] else 0:6.1f} "
          f"{row['ref_cpu']['median'] if row['ref_cpu'] else 0:7.1f} "
          f"{fmt(row['copy_s']):>18} {fmt(room):>18} "
          f"{fmt(row['ideal_s']):>18} {fmt(ideal):>18}  {verdict}\n")
        for e in s.errors[:3]:
            w(f"    error: {e[:200]}\n")
    return rows


def main():
    import run
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0,
                   help="image size factor (0.25: 512 MiB dense, 1 GiB "
                        "mixed)")
    p.add_argument("--only", default="",
                   help="comma separated substrings of row names")
    p.add_argument("--images", default="/var/tmp/tximageio-bench-images")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--refvenv")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if args.images == p.get_default("images") and args.scale != 1.0:
        args.images += f"-{args.scale:g}"
    only = [w for w in args.only.split(",") if w] or [""]
    # run.Bench's options; its own daemons start too (the run loop
    # passes them to measure(), which uses only their names).
    args.only = None
    args.workers = 1
    args.parallel_workers = 1
    args.log_level = "WARNING"
    args.no_nginx = True
    args.reads_seconds = 0
    bench = run.Bench(args)
    try:
        bench.setUp()
        bench.scenarios = [s for s in scenarios(bench, run.Scenario,
                                                run.Result)
                           if any(w in s.name for w in only)]
        bench.run()
    finally:
        bench.tearDown()
    rows = table(bench)
    path = args.json or os.path.join(
        REPO, "bench", "results",
        "client-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"runs": args.runs, "scale": args.scale, "rows": rows},
                  f, indent=2)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
