"""
Proxy throughput: our daemon as the engine-host proxy against the
reference's, on the same setup.

Two hosts (our daemon and the reference, TLS with CA A, local service off)
serve a raw file ticket; two proxies (ours and the reference, TLS with CA B,
trusting CA A, configured as engine-setup does) relay to either host. curl
downloads the whole image (to /dev/null) and uploads it (-T, with a
Content-Length) through each proxy, and straight from the host as a
baseline. Runs are interleaved (run 1 of every case, then run 2, ...), so
drift in the machine's load hits every case alike.

Usage::

    .venv/bin/python bench/proxy_throughput.py [--size-mib 512] [--runs 5]
        [--json results.json] [--refvenv /tmp/refvenv]

Prints a table of MB/s (median, min-max) and of the ratios ours/reference
(per run, paired; median, min-max), and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from test.support import makePKI  # noqa: E402
from test.test_proxy import (  # noqa: E402
    CURL, Node, hostConf, proxyConf, sparseFile)

MiB = 1024**2


def refPython(path):
    for candidate in (path, os.environ.get("IMAGEIO_REFVENV"),
                      os.path.join(os.path.dirname(os.path.dirname(
                          os.path.abspath(__file__))), ".refvenv"),
                      "/tmp/refvenv"):
        if candidate:
            python = os.path.join(candidate, "bin", "python")
            if os.access(python, os.X_OK):
                return python
    sys.exit("reference virtualenv not found (--refvenv)")


def makeSource(path, size):
    # Incompressible data, written once.
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MiB, left)
            f.write(os.urandom(n))
            left -= n
    return path


def curl(node, tid, op, source, size):
    url = node.imageURL(tid)
    cmd = [CURL, "-sS", "--fail", "--cacert", node.ca, "-o", "/dev/null",
           "-w", "%{http_code}"]
    if op == "upload":
        cmd += ["-T", source]
    cmd.append(url)
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if r.returncode != 0 or r.stdout != "200":
        raise RuntimeError(f"{op} via {node.name} failed: {r.stdout} "
                           f"{r.stderr}")
    return size / elapsed / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default="proxy_throughput.json")
    parser.add_argument("--refvenv")
    parser.add_argument("--tmp", help="work directory (default: a new one "
                        "under $TMPDIR)")
    args = parser.parse_args()
    # Stop the daemons on SIGTERM too (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    python = refPython(args.refvenv)
    size = args.size_mib * MiB

    tmp = args.tmp or tempfile.mkdtemp(prefix="proxy-bench-")
    pkiA = makePKI(os.path.join(tmp, "pki-a"), caName="host CA")
    pkiB = makePKI(os.path.join(tmp, "pki-b"), caName="engine CA")
    source = makeSource(os.path.join(tmp, "source.raw"), size)

    nodes = []

    def start(name, conf, ca, reference):
        d = os.path.join(tmp, name)
        node = Node(name, d, conf(d), ca,
                    reference=python if reference else None)
        nodes.append(node)
        return node

    try:
        hosts = {
            "ours": start("host-ours", lambda d: hostConf(d, pkiA),
                          pkiA.ca, False),
            "ref": start("host-ref", lambda d: hostConf(d, pkiA),
                         pkiA.ca, True),
        }
        proxies = {
            "ours": start("proxy-ours",
                          lambda d: proxyConf(d, pkiB, pkiA.ca),
                          pkiB.ca, False),
            "ref": start("proxy-ref",
                         lambda d: proxyConf(d, pkiB, pkiA.ca),
                         pkiB.ca, True),
        }
        # One image per host, a ticket id per host shared by host and both
        # proxies (as the engine does).
        tickets = {}
        for hname, host in hosts.items():
            tid = str(uuid.uuid4())
            image = sparseFile(os.path.join(tmp, f"image-{hname}.raw"),
                               size)
            host.addTicket(tid, f"file://{image}", size)
            for proxy in proxies.values():
                proxy.addTicket(tid, host.imageURL(tid), size)
            tickets[hname] = tid
            # Fill the image once, so downloads read data.
            curl(host, tid, "upload", source, size)

        results: dict = {}
        for run in range(args.runs):
            for hname, host in hosts.items():
                tid = tickets[hname]
                for op in ("download", "upload"):
                    for via, node in (("direct", host),
                                      ("ours", proxies["ours"]),
                                      ("ref", proxies["ref"])):
                        mbs = curl(node, tid, op, source, size)
                        results.setdefault(f"{hname} host/{op}", {}) \
                            .setdefault(via, []).append(mbs)
                        print(f"run {run + 1} host={hname} {op} via "
                              f"{via}: {mbs:.0f} MB/s", file=sys.stderr)
    finally:
        for node in reversed(nodes):
            node.stop()

    table = []
    print(f"\nproxy throughput, {args.size_mib} MiB, {args.runs} "
          f"interleaved runs, curl client, TLS on every hop")
    print(f"{'case':<22} {'direct MB/s':>16} {'our proxy MB/s':>16} "
          f"{'ref proxy MB/s':>16} {'ours/ref':>18}")
    for case, vias in results.items():
        ratios = [o / r for o, r in zip(vias["ours"], vias["ref"])]
        row = {"case": case, "runs": vias, "ratios": ratios}
        cells = []
        for via in ("direct", "ours", "ref"):
            v = vias[via]
            row[f"{via}_median"] = statistics.median(v)
            cells.append(f"{statistics.median(v):.0f} "
                         f"({min(v):.0f}-{max(v):.0f})")
        row["ratio_median"] = statistics.median(ratios)
        table.append(row)
        print(f"{case:<22} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
              f"{statistics.median(ratios):>6.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")
    with open(args.json, "w") as f:
        json.dump({"size": size, "runs": args.runs, "cases": table}, f,
                  indent=2)
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
