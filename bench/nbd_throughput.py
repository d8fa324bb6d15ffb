#!/usr/bin/env python3
"""
Throughput of the nbd backend: our daemon against the reference daemon.

One qemu-nbd serves a random raw image; both daemons, with the same
configuration file, get a read-write ticket for it. curl downloads
(C{curl -o /dev/null}) and uploads (C{curl -T FILE}, a PUT without
Content-Range) the whole image over TLS (remote service) and over the
local unix socket, the runs of both daemons interleaved. C{nbdcopy
nbd+unix:///?socket=S null:} reading the same export gives the ceiling.

Prints a table (median and min-max of N runs, MB/s = 10**6 bytes/s, and
the daemon's CPU seconds per run) and writes the results as JSON.

Usage: .venv/bin/python bench/nbd_throughput.py [--size-mib 1024]
       [--runs 5] [--refvenv DIR] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def findRefvenv(explicit):
    for path in (explicit, os.environ.get("IMAGEIO_REFVENV"),
                 os.path.join(REPO, ".refvenv"), "/tmp/refvenv"):
        if path and os.access(os.path.join(path, "bin", "ovirt-imageio"),
                              os.X_OK):
            return path
    sys.exit("reference virtualenv not found (--refvenv)")


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def makeCert(directory):
    """
    A self-signed certificate for localhost (it is its own CA).
    """
    key = os.path.join(directory, "key.pem")
    cert = os.path.join(directory, "cert.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext",
         "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True)
    return key, cert


class UnixHTTPConnection(http.client.HTTPConnection):

    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def control(sock, method, path, body=None):
    con = UnixHTTPConnection(sock)
    try:
        con.request(method, path,
                    body=None if body is None else json.dumps(body))
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


class Daemon:
    """
    A daemon process with its own conf dir (the same settings for both).
    """

    def __init__(self, name, argv, workdir, cert, key, level):
        self.name = name
        self.dir = os.path.join(workdir, name)
        run = os.path.join(self.dir, "run")
        os.makedirs(os.path.join(self.dir, "conf.d"))
        os.makedirs(run)
        self.port = freePort()
        self.localSocket = os.path.join(self.dir, "local.sock")
        self.controlSocket = os.path.join(run, "sock")
        conf = f"""\
[daemon]
drop_privileges = false
systemd_enable = false
run_dir = {run}

[tls]
enable = true
key_file = {key}
cert_file = {cert}
ca_file = {cert}

[remote]
host = 127.0.0.1
port = {self.port}

[local]
enable = true
socket = {self.localSocket}

[control]
transport = unix
socket = {self.controlSocket}

[handlers]
keys = stderr

[logger_root]
level = {level}
handlers = stderr
propagate = 0
"""
        with open(os.path.join(self.dir, "conf.d", "daemon.conf"), "w") as f:
            f.write(conf)
        self.log = open(os.path.join(self.dir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            argv + ["--conf-dir", self.dir], stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"{name} daemon exited, see {self.log.name}")
            try:
                status, _ = control(self.controlSocket, "GET",
                                    "/tickets/no-such-ticket")
                if status == 404:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{name} daemon not ready, see {self.log.name}")
            time.sleep(0.1)

    def addTicket(self, url, size):
        tid = str(uuid.uuid4())
        status, body = control(self.controlSocket, "PUT", f"/tickets/{tid}", {
            "uuid": tid, "size": size, "url": url,
            "ops": ["read", "write"], "timeout": 36000,
            "inactivity_timeout": 3600, "sparse": False, "dirty": False,
            "transfer_id": f"bench-{tid}"})
        if status != 200:
            sys.exit(f"{self.name}: adding ticket failed: {status} {body}")
        return tid

    def cpu(self):
        """
        CPU seconds (user + system) the daemon used so far.
        """
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def curl(daemon, tid, op, transport, cert, source, size):
    """
    One transfer with curl.

    @return: (seconds, daemon cpu seconds).
    """
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
            "%{http_code} %{size_download} %{size_upload}"]
    if transport == "tls":
        argv += ["--cacert", cert,
                 f"https://localhost:{daemon.port}/images/{tid}"]
    else:
        argv += ["--unix-socket", daemon.localSocket,
                 f"http://localhost/images/{tid}"]
    if op == "upload":
        # No "Expect: 100-continue" wait: the same for both daemons.
        argv += ["-T", source, "-H", "Expect:"]
    cpu = daemon.cpu()
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    cpu = daemon.cpu() - cpu
    if out.returncode != 0:
        sys.exit(f"{daemon.name} {op} {transport} failed: {out.stderr}")
    code, down, up = out.stdout.split()
    moved = int(float(down if op == "download" else up))
    if code != "200" or moved != size:
        sys.exit(f"{daemon.name} {op} {transport}: status {code}, "
                 f"{moved} of {size} bytes")
    return elapsed, cpu


def nbdcopy(sock):
    start = time.monotonic()
    subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"],
                   check=True)
    return time.monotonic() - start


def summary(seconds, size):
    rates = sorted(size / s / 1e6 for s in seconds)
    return {"median": statistics.median(rates), "min": rates[0],
            "max": rates[-1], "runs": rates}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--refvenv")
    parser.add_argument("--workdir",
                        help="where the images go (default: a new "
                             "directory in /dev/shm, so the disk does not "
                             "limit the flush of uploads)")
    parser.add_argument("--json", default=os.path.join(
        REPO, "bench", "nbd_throughput.json"))
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--only", choices=["ours", "ref"],
                        help="run one daemon only (for profiling)")
    parser.add_argument("--cases", default="download:tls,download:unix,"
                        "upload:tls,upload:unix",
                        help="comma separated OP:TRANSPORT pairs to run")
    args = parser.parse_args()

    refvenv = findRefvenv(args.refvenv)
    size = args.size_mib * 2**20
    base = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    workdir = tempfile.mkdtemp(prefix="nbd-bench-", dir=base)
    procs = []
    daemons = []
    try:
        image = os.path.join(workdir, "image.raw")
        source = os.path.join(workdir, "source.raw")
        with open(source, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(2**20))
        shutil.copyfile(source, image)
        key, cert = makeCert(workdir)

        sock = os.path.join(workdir, "nbd.sock")
        qemu = subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared=8", "-f", "raw",
             "--cache=writeback", "--aio=threads", "-k", sock, image],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(qemu)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or qemu.poll() is not None:
                sys.exit("qemu-nbd did not start")
            time.sleep(0.02)
        url = f"nbd:unix:{sock}"

        candidates = {
            "ours": [os.path.join(BIN, "twistd"), "--pidfile=", "-n",
                     "imageio"],
            "ref": [os.path.join(refvenv, "bin", "ovirt-imageio")],
        }
        if args.only:
            candidates = {args.only: candidates[args.only]}
        for name, argv in candidates.items():
            daemons.append(Daemon(name, argv, workdir, cert, key,
                                  args.log_level))
        tickets = {d.name: d.addTicket(url, size) for d in daemons}

        cases = [tuple(c.split(":")) for c in args.cases.split(",")]
        results = {(d.name, op, t): [] for d in daemons for op, t in cases}
        cpus = {key: [] for key in results}
        ceiling = []
        for r in range(args.runs):
            ceiling.append(nbdcopy(sock))
            for op, transport in cases:
                # Alternate which daemon goes first.
                order = daemons if r % 2 == 0 else daemons[::-1]
                for d in order:
                    seconds, cpu = curl(d, tickets[d.name], op, transport,
                                        cert, source, size)
                    results[(d.name, op, transport)].append(seconds)
                    cpus[(d.name, op, transport)].append(cpu)
                    print(f"run {r + 1}: {d.name:4} {op:8} {transport:4} "
                          f"{size / seconds / 1e6:7.0f} MB/s "
                          f"cpu {cpu:5.2f} s", file=sys.stderr, flush=True)

        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "size": size, "runs": args.runs, "cpus": os.cpu_count(),
            "image": "random raw, qemu-nbd --cache=writeback --aio=threads",
            "commands": {
                "download": "curl -o /dev/null URL",
                "upload": "curl -T FILE -H 'Expect:' URL",
                "ceiling": f"nbdcopy nbd+unix:///?socket=S null:",
            },
            "ceiling": summary(ceiling, size),
            "results": [],
        }
        rows = []
        for op, transport in cases:
            row = {"op": op, "transport": transport}
            for d in daemons:
                s = summary(results[(d.name, op, transport)], size)
                s["cpu_median"] = statistics.median(
                    cpus[(d.name, op, transport)])
                row[d.name] = s
            if "ours" in row and "ref" in row:
                ratios = sorted(
                    b / a for a, b in zip(results[("ours", op, transport)],
                                          results[("ref", op, transport)]))
                row["ratio"] = {
                    "median": row["ours"]["median"] / row["ref"]["median"],
                    "min": ratios[0], "max": ratios[-1]}
            rows.append(row)
        report["results"] = rows
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)

        c = report["ceiling"]
        print(f"\nnbd backend, {args.size_mib} MiB random raw image, "
              f"{args.runs} runs, MB/s median (min-max), daemon CPU s")
        print(f"ceiling nbdcopy null: {c['median']:.0f} "
              f"({c['min']:.0f}-{c['max']:.0f})")
        header = f"{'op':8} {'via':4}"
        for d in daemons:
            header += f" | {d.name:>20} {'cpu':>5}"
        if len(daemons) == 2:
            header += " | ours/ref (min-max, paired)"
        print(header)
        for row in rows:
            line = f"{row['op']:8} {row['transport']:4}"
            for d in daemons:
                s = row[d.name]
                cell = f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"
                line += f" | {cell:>20} {s['cpu_median']:5.2f}"
            if "ratio" in row:
                q = row["ratio"]
                line += (f" | {q['median']:.2f} "
                         f"({q['min']:.2f}-{q['max']:.2f})")
            print(line)
        print(f"\nJSON: {args.json}")
    finally:
        for d in daemons:
            d.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
