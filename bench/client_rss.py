"""
Client memory for a large upload and download (issue 15: under 200 MiB
for a 4 GiB transfer).

    .venv/bin/python bench/client_rss.py [--size-gib 4] [--dir /var/tmp]
        [--fmt raw|qcow2] [--unix] [--workers N] [--cli]

Starts our daemon (TLS; with --unix the client may switch to the daemon's
local unix socket, as it does on the same host), writes a dense SIZE image
of random data, uploads it to a file ticket with imageio.client.upload and
downloads it back with imageio.client.download (or, with --cli, the
`imageio` command's main()), each in a fresh Python process that prints
its own peak RSS (VmHWM: the client process only; the private qemu-nbd
is a separate process). With --nbd the ticket is an nbd ticket (qemu-nbd
serving the target), so the client uses up to 8 connections, each body
sent or received by a thread of its own. Checks that the copies are identical. Not part of
`make test`.

Measured 2026-12-07 (2 shared cores, 8 connections, TLS, raw): peak
client RSS upload 70 MiB (library) / 68 MiB (command), download 112 /
100 MiB. With --nbd (8 connections writing): upload 178 MiB (175 MiB
before the bodies on new connections went to threads), download 90 MiB.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from test.support import (  # noqa: E402
    Daemon, controlRequest, daemonConf, makePKI, writeConf)

# VmHWM starts afresh at exec; ru_maxrss would carry over the peak of the
# process that forked us.
_RUN = textwrap.dedent("""
    import json, sys, time
    from imageio import client
    from imageio.client import cli
    op, args, kw = json.loads(sys.argv[1])
    start = time.monotonic()
    if op == "cli":
        if cli.main(args[0]) != 0:
            sys.exit(1)
    else:
        getattr(client, op)(*args, **kw)
    elapsed = time.monotonic() - start
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM:")][0]
    print(json.dumps({"elapsed": elapsed,
                      "client_rss_kib": int(hwm.split()[1])}))
""")


def client_run(op, *args, **kw):
    """
    Run C{imageio.client.<op>(*args, **kw)} in a new process.

    @return: its report: elapsed seconds and the client's peak RSS in
        KiB.
    """
    r = subprocess.run([sys.executable, "-c", _RUN,
                        json.dumps([op, args, kw])],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{op} failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_dense(path, size):
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size-gib", type=int, default=4)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--fmt", choices=("raw", "qcow2"), default="raw",
                   help="format of the local images")
    p.add_argument("--unix", action="store_true",
                   help="let the client use the daemon's unix socket")
    p.add_argument("--workers", type=int, default=None,
                   help="max_workers (default: the client's default)")
    p.add_argument("--nbd", action="store_true",
                   help="serve the ticket's image with qemu-nbd (an nbd "
                        "ticket: the server offers 8 connections) "
                        "instead of a file ticket (1 writer)")
    p.add_argument("--cli", action="store_true",
                   help="run the imageio command (in-process main()) "
                        "instead of the library functions")
    args = p.parse_args()
    size = args.size_gib << 30
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pki = makePKI(os.path.join(tmp, "pki"))
        conf = os.path.join(tmp, "conf")
        writeConf(conf, daemonConf(tmp, pki, extra={
            "local": {"enable": args.unix},
            "logger_root": {"level": "WARNING"}}))
        raw = os.path.join(tmp, "src.raw")
        make_dense(raw, size)
        src = raw
        if args.fmt == "qcow2":
            src = os.path.join(tmp, "src.qcow2")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O",
                            "qcow2", raw, src], check=True)
            os.unlink(raw)
        target = os.path.join(tmp, "target.raw")
        with open(target, "wb") as f:
            f.truncate(size)
        d = Daemon(conf)
        nbd = None
        try:
            ticketURL = "file://" + target
            if args.nbd:
                nbdSock = os.path.join(tmp, "nbd.sock")
                nbd = subprocess.Popen(
                    ["qemu-nbd", "-f", "raw", "-k", nbdSock, "-t", "-e",
                     "8", "--cache=none", "--aio=native", "-x", "",
                     target])
                deadline = time.monotonic() + 10
                while not os.path.exists(nbdSock):
                    if time.monotonic() > deadline:
                        raise SystemExit("qemu-nbd did not start")
                    time.sleep(0.05)
                ticketURL = f"nbd:unix:{nbdSock}"
            sock = os.path.join(tmp, "run", "sock")
            controlRequest(sock, "PUT", "/tickets/b", {
                "uuid": "b", "size": size, "ops": ["read", "write"],
                "timeout": 3600, "url": ticketURL})
            url = f"https://localhost:{d.remotePort}/images/b"
            kw = {}
            if args.workers:
                kw["max_workers"] = args.workers
            back = os.path.join(tmp, f"back.{args.fmt}")
            subprocess.run(["sync"])
            if args.cli:
                workers = ["--max-workers", str(args.workers)] \
                    if args.workers else []
                up = client_run("cli", ["upload", src, url, "--cafile",
                                        pki.ca, *workers])
                subprocess.run(["sync"])
                down = client_run("cli", ["download", url, back, "-f",
                                          args.fmt, "--cafile", pki.ca,
                                          *workers])
            else:
                up = client_run("upload", src, url, pki.ca, **kw)
                subprocess.run(["sync"])
                down = client_run("download", url, back, pki.ca,
                                  fmt=args.fmt, **kw)
            t0 = time.monotonic()
            same = subprocess.run(["qemu-img", "compare", "-q", src, back])
            compare = time.monotonic() - t0
        finally:
            d.stop()
            if nbd is not None:
                nbd.terminate()
                nbd.wait()
        print(json.dumps({
            "size_gib": args.size_gib, "fmt": args.fmt,
            "ticket": "nbd" if args.nbd else "file",
            "transport": "unix" if args.unix else "tls",
            "client": "imageio command" if args.cli else "library",
            "upload": {"MB/s": round(size / up["elapsed"] / 1e6),
                       "client_rss_mib": round(up["client_rss_kib"] / 1024,
                                               1)},
            "download": {"MB/s": round(size / down["elapsed"] / 1e6),
                         "client_rss_mib": round(
                             down["client_rss_kib"] / 1024, 1)},
            "identical": same.returncode == 0,
            "compare_s": round(compare, 1),
        }, indent=2))
        if same.returncode != 0:
            raise SystemExit("the downloaded image differs")


if __name__ == "__main__":
    main()
