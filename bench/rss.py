"""
Daemon memory and throughput for a large upload and download over TLS.

    .venv/bin/python bench/rss.py [--size-gib 4] [--dir /var/tmp]

Starts a real daemon (file backend), uploads a SIZE image with curl
(Content-Length, then chunked), downloads it back, and prints MB/s, the
daemon's peak RSS (VmHWM) and whether any deleted (temporary) file was
open in the daemon during the uploads. Not part of `make test`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from test.support import (  # noqa: E402
    Daemon, controlRequest, daemonConf, makePKI, writeConf)
from test.test_memory import deletedFiles, vm  # noqa: E402


def curl(args, size):
    start = time.monotonic()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", *args],
                         capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"curl failed: {out.stderr.decode()}")
    return size / (time.monotonic() - start) / 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size-gib", type=int, default=4)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    size = args.size_gib << 30
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pki = makePKI(os.path.join(tmp, "pki"))
        conf = os.path.join(tmp, "conf")
        writeConf(conf, daemonConf(tmp, pki))
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        target = os.path.join(tmp, "target.raw")
        open(target, "wb").close()
        d = Daemon(conf)
        try:
            sock = os.path.join(tmp, "run", "sock")
            controlRequest(sock, "PUT", "/tickets/b", {
                "uuid": "b", "size": size, "ops": ["read", "write"],
                "timeout": 3600, "url": "file://" + target})
            url = f"https://127.0.0.1:{d.remotePort}/images/b"
            tls = ["--cacert", pki.ca]
            seen, stop = [], threading.Event()

            def watch():
                while not stop.wait(0.1):
                    seen.extend(deletedFiles(d.proc.pid))

            w = threading.Thread(target=watch)
            w.start()
            results = {}
            try:
                results["upload MB/s"] = curl([*tls, "-T", src, url], size)
                results["upload chunked MB/s"] = curl(
                    [*tls, "-H", "Transfer-Encoding: chunked", "-T", src,
                     url], size)
            finally:
                stop.set()
                w.join()
            results["download MB/s"] = curl([*tls, "-o", os.devnull, url],
                                            size)
            results["peak RSS MiB"] = vm(d.proc.pid, "VmHWM") / (1 << 20)
            results["temporary files seen"] = len(seen)
        finally:
            d.stop()
        same = subprocess.run(["cmp", src, target]).returncode == 0
        results["data identical"] = same
        results["size GiB"] = args.size_gib
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
