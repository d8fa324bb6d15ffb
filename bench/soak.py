"""
Soak test: a real daemon under 16 concurrent transfers for a while.

    .venv/bin/python bench/soak.py [--minutes 10] [--workers 16]
        [--region-mib 16] [--dir /var/tmp] [--seed N]

Starts a daemon (test.support.Daemon: twistd, TLS remote, abstract unix
local, unix control) and a qemu-nbd (--shared=16) serving a raw image over
a unix socket. Each worker owns a ticket and a region of an image: workers
alternate file and nbd backends, and TLS and unix transports, so the four
combinations run side by side. A worker loops on random uploads (with
Expect: 100-continue), ranged downloads and zeroes within its region,
keeping a model of the region's bytes; every download is checked against
the model. Injected faults:

  - random disconnects: a transfer is aborted mid-body (TCP reset);
  - ticket cancels: a canceller DELETEs a random worker's ticket via the
    control service (vdsm style: retried on 409) and re-adds it shortly
    after.

A transfer interrupted by either leaves its range unknown; the worker waits
until its ticket has no operation running any more (the ticket's C{active}
flag) and rewrites the range before it reads the region again.

Every 10 s it prints the daemon's RSS and open fds (from /proc), the
requests and bytes done so far (and the daemon's own counts when it serves
C{/metrics}). At the end each worker rewrites unknown ranges and downloads
its whole region; the daemon must still answer; after it stops, the image
files are compared with the models too.

Exit status 1 on any checksum mismatch, an HTTP 5xx or a traceback in the
daemon's log, a daemon that stopped answering, or growth after warm-up
(the first 60 s): last RSS sample > warm-up max + 16 MiB, or last fd
sample > warm-up max + 8. Loopback only; every loop is bounded by the
deadline or a retry limit. Also fails if the idle daemon holds more than
8 fds more after the run than before it, if its RSS under load ever
reaches 200 MiB, or if its idle RSS 15 s after the run (SOAK_IDLE_WAIT
seconds; the daemon collects and trims within a second of the last
transfer) is more than 64 MiB above its idle RSS before. SOAK_MAPPINGS=1
logs the daemon's largest mappings with every sample. Not part of
C{make test}.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from test.support import (  # noqa: E402
    Daemon, controlRequest, daemonConf, makePKI, writeConf)

MiB = 1 << 20
KiB = 1 << 10

WARMUP = 60.0
SAMPLE_EVERY = 10.0
RSS_SLACK = 16 * MiB
FD_SLACK = 8
PEAK_RSS = 200 * MiB
IDLE_SLACK = 64 * MiB
IDLE_WAIT = float(os.environ.get("SOAK_IDLE_WAIT", "15"))

ABORT_RATE = 0.08
ZERO_RATE = 0.06
RECONNECT_RATE = 0.05
CANCEL_EVERY = (2.0, 6.0)
SOCKET_TIMEOUT = 120
BARRIER_TIMEOUT = 120.0
REPAIR_ATTEMPTS = 20


def log(msg):
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# The daemon, with a bounded log


class SoakDaemon(Daemon):
    """
    L{Daemon} keeping only the last lines of its output (a soak produces
    many), and counting tracebacks and unhandled errors.
    """

    KEEP = 2000

    def _read(self):
        self.tracebacks = 0
        self.errorLines = collections.deque(maxlen=20)
        pattern = re.compile(r"(\w+) service listening on (\S+)")
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if len(self.lines) > 2 * self.KEEP:
                del self.lines[:-self.KEEP]
            if ("Traceback" in line or "Unhandled" in line
                    or "Fatal Python error" in line):
                self.tracebacks += 1
                self.errorLines.append(line)
            m = pattern.search(line)
            if m:
                self.addresses[m.group(1)] = m.group(2)
            if "imageio ready" in line:
                self._ready.set()
        dump = os.environ.get("SOAK_DAEMON_LOG")
        if dump:
            with open(dump, "w") as f:
                f.write("\n".join(self.lines) + "\n")
        self._exited.set()


def procStatus(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


# ---------------------------------------------------------------------------
# A small blocking HTTP/1.1 client that can abort mid-body


class Aborted(Exception):
    """
    We reset the connection on purpose.
    """


class ConnectionFailed(Exception):
    """
    The connection broke (reset, EOF, timeout) before a full response.
    """


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body


class Connection:
    """
    One keep-alive connection to the remote (TLS) or local (unix) service.
    """

    def __init__(self, transport, address, ca=None):
        self.transport = transport
        self.address = address
        self.ca = ca
        self.sock = None
        self.rfile = None

    def open(self):
        if self.transport == "tls":
            raw = socket.create_connection(self.address,
                                           timeout=SOCKET_TIMEOUT)
            ctx = ssl.create_default_context(cafile=self.ca)
            self.sock = ctx.wrap_socket(raw, server_hostname=self.address[0])
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(SOCKET_TIMEOUT)
            self.sock.connect(self.address)
        self.rfile = self.sock.makefile("rb", buffering=256 * KiB)

    @property
    def isOpen(self):
        return self.sock is not None

    def close(self):
        if self.sock is not None:
            try:
                self.rfile.close()
                self.sock.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    def reset(self):
        """
        Abort: close with a TCP reset, as a crashed client would.
        """
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.close()

    def _send(self, data):
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise ConnectionFailed(f"send: {e}") from None

    def _head(self, method, path, headers):
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _readHead(self):
        try:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionFailed("EOF before status line")
            status = int(line.split()[1])
            headers = {}
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionFailed("EOF in headers")
                if line in (b"\r\n", b"\n"):
                    break
                name, value = line.decode("latin-1").split(":", 1)
                headers[name.strip().lower()] = value.strip()
        except (OSError, ssl.SSLError, ValueError, IndexError) as e:
            raise ConnectionFailed(f"read head: {e}") from None
        return status, headers

    def _readBody(self, headers, abortAt=None):
        length = int(headers.get("content-length", "0"))
        body = bytearray()
        try:
            while len(body) < length:
                want = min(1 * MiB, length - len(body))
                if abortAt is not None and len(body) + want > abortAt:
                    want = abortAt - len(body)
                    if want <= 0:
                        self.reset()
                        raise Aborted()
                chunk = self.rfile.read(want)
                if not chunk:
                    raise ConnectionFailed("EOF in body")
                body += chunk
                if abortAt is not None and len(body) >= abortAt:
                    self.reset()
                    raise Aborted()
        except (OSError, ssl.SSLError) as e:
            raise ConnectionFailed(f"read body: {e}") from None
        return bytes(body)

    def _finish(self, status, headers, body):
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, body)

    def request(self, method, path, headers=None, body=b""):
        if not self.isOpen:
            self.open()
        headers = dict(headers or {})
        headers["Content-Length"] = str(len(body))
        self._head(method, path, headers)
        if body:
            self._send(body)
        status, rh = self._readHead()
        return self._finish(status, rh, self._readBody(rh))

    def get(self, path, first, last, abortAt=None):
        if not self.isOpen:
            self.open()
        self._head("GET", path, {"Range": f"bytes={first}-{last}"})
        status, rh = self._readHead()
        body = self._readBody(rh, abortAt if status == 206 else None)
        return self._finish(status, rh, body)

    def put(self, path, offset, data, abortAt=None):
        """
        PUT with Expect: 100-continue: the body is sent only once the
        daemon accepted the headers (its ticket operation has started).
        """
        if not self.isOpen:
            self.open()
        end = offset + len(data) - 1
        self._head("PUT", path, {
            "Content-Length": str(len(data)),
            "Content-Range": f"bytes {offset}-{end}/*",
            "Expect": "100-continue"})
        status, rh = self._readHead()
        if status != 100:
            # Refused from the headers (e.g. 403 after a cancel).
            return self._finish(status, rh, self._readBody(rh))
        view = memoryview(data)
        sent = 0
        while sent < len(data):
            n = min(1 * MiB, len(data) - sent)
            if abortAt is not None and sent + n > abortAt:
                self._send(view[sent:abortAt])
                self.reset()
                raise Aborted()
            try:
                self.sock.sendall(view[sent:sent + n])
            except (OSError, ssl.SSLError) as e:
                # The daemon may have answered early (a cancel) and closed.
                try:
                    status, rh = self._readHead()
                    return self._finish(status, rh, self._readBody(rh))
                except ConnectionFailed:
                    raise ConnectionFailed(f"send body: {e}") from None
            sent += n
        status, rh = self._readHead()
        return self._finish(status, rh, self._readBody(rh))


# ---------------------------------------------------------------------------
# Shared state


class Stats:
    """
    Counters shared by the workers, the canceller and the monitor.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.bytesUp = 0
        self.bytesDown = 0
        self.completed = collections.Counter()
        self.events = collections.Counter()
        self.errors = collections.Counter()
        self.examples = {}

    def count(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def event(self, kind):
        with self.lock:
            self.events[kind] += 1

    def error(self, kind, detail=""):
        with self.lock:
            self.errors[kind] += 1
            self.examples.setdefault(kind, detail)

    def done(self, kind):
        with self.lock:
            self.completed[kind] += 1


class Tickets:
    """
    The tickets of the workers, and their cancel epochs: bumped when a
    cancel starts (odd: the ticket is being removed or is gone) and again
    once it is back (even), so a worker can tell a failure caused by a
    cancel.
    """

    def __init__(self, sock):
        self.sock = sock
        self.defs = {}
        self.epochs = collections.Counter()
        self.lock = threading.Lock()

    def add(self, tid, url, size):
        self.defs[tid] = {"uuid": tid, "size": size, "url": url,
                          "ops": ["read", "write"], "timeout": 7200,
                          "transfer_id": f"transfer-{tid}"}
        self.put(tid)

    def put(self, tid):
        status, _, body = controlRequest(self.sock, "PUT", f"/tickets/{tid}",
                                         self.defs[tid])
        if status != 200:
            raise RuntimeError(f"PUT ticket {tid}: {status} {body!r}")

    def info(self, tid):
        status, _, body = controlRequest(self.sock, "GET", f"/tickets/{tid}")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET ticket {tid}: {status} {body!r}")
        return json.loads(body)

    def epoch(self, tid):
        with self.lock:
            return self.epochs[tid]

    def bump(self, tid):
        with self.lock:
            self.epochs[tid] += 1


# ---------------------------------------------------------------------------
# Workers


class Worker(threading.Thread):
    """
    Transfers within one region of one image, through one ticket.

    @ivar model: the bytes the region must hold.
    @ivar unknown: ranges (relative to the region) whose content is not
        known (an interrupted write), to be rewritten before reading.
    """

    def __init__(self, index, backend, transport, address, ca, tid,
                 regionStart, regionSize, tickets, stats, deadline, seed):
        super().__init__(name=f"worker-{index}", daemon=True)
        self.index = index
        self.backend = backend
        self.transport = transport
        self.tid = tid
        self.path = f"/images/{tid}"
        self.start_ = regionStart
        self.size = regionSize
        self.tickets = tickets
        self.stats = stats
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.conn = Connection(transport, address, ca)
        self.model = bytearray(regionSize)
        self.unknown: list[tuple[int, int]] = []
        self.final = None

    @property
    def kind(self):
        return f"{self.backend}/{self.transport}"

    # Helpers

    def _range(self):
        length = self.rng.choice([
            self.rng.randint(1, 64 * KiB),
            self.rng.randint(64 * KiB, 1 * MiB),
            self.rng.randint(1 * MiB, self.size)])
        length = min(length, self.size)
        offset = self.rng.randint(0, self.size - length)
        if self.rng.random() < 0.5:
            # Many real clients write aligned ranges.
            offset -= offset % 4096
            length = max(4096, length - length % 4096)
            length = min(length, self.size - offset)
        return offset, length

    def _markUnknown(self, offset, length):
        self.unknown.append((offset, offset + length))

    def _failed(self, what, epoch, exc_or_status, detail=""):
        """
        Classify a failed transfer: expected after a cancel, else an error.
        """
        canceled = epoch % 2 or self.tickets.epoch(self.tid) != epoch
        if isinstance(exc_or_status, int):
            status = exc_or_status
            if status == 403 and canceled:
                self.stats.event("refused after cancel (403)")
                # The ticket comes back soon; do not spin meanwhile.
                time.sleep(0.05)
            elif status >= 500:
                self.stats.error(f"{what} HTTP {status}", detail)
            else:
                self.stats.error(f"{what} unexpected HTTP {status}", detail)
        else:
            if canceled:
                self.stats.event("connection closed by cancel")
            else:
                self.stats.error(f"{what} connection failed",
                                 f"{self.kind}: {exc_or_status}")
        self.conn.close()

    def _waitIdle(self):
        """
        Wait until the ticket exists and no operation runs on it: the
        writes of an interrupted upload are over.
        """
        end = time.monotonic() + BARRIER_TIMEOUT
        while time.monotonic() < end:
            try:
                info = self.tickets.info(self.tid)
            except (OSError, RuntimeError) as e:
                self.stats.error("control failed", str(e))
                info = None
            if info is not None and not info["active"]:
                return True
            time.sleep(0.02)
        self.stats.error("ticket stayed active", self.tid)
        return False

    # Operations

    def upload(self, offset, length, data=None, abort=False):
        if data is None:
            data = os.urandom(length)
        abortAt = self.rng.randint(0, length - 1) if abort else None
        epoch = self.tickets.epoch(self.tid)
        try:
            r = self.conn.put(self.path, self.start_ + offset, data,
                              abortAt=abortAt)
        except Aborted:
            self.stats.event("disconnect injected (upload)")
            self._markUnknown(offset, length)
            return False
        except ConnectionFailed as e:
            self._failed("upload", epoch, e)
            self._markUnknown(offset, length)
            return False
        self.stats.count(requests=1)
        if r.status != 200:
            self._failed("upload", epoch, r.status, r.body[:200])
            self._markUnknown(offset, length)
            return False
        self.model[offset:offset + length] = data
        self.stats.count(bytesUp=length)
        self.stats.done("upload")
        return True

    def download(self, offset, length, abort=False):
        abortAt = self.rng.randint(0, length - 1) if abort else None
        epoch = self.tickets.epoch(self.tid)
        first = self.start_ + offset
        try:
            r = self.conn.get(self.path, first, first + length - 1,
                              abortAt=abortAt)
        except Aborted:
            self.stats.event("disconnect injected (download)")
            return None
        except ConnectionFailed as e:
            self._failed("download", epoch, e)
            return None
        self.stats.count(requests=1)
        if r.status != 206:
            self._failed("download", epoch, r.status, r.body[:200])
            return None
        self.stats.count(bytesDown=length)
        self.stats.done("download")
        if (hashlib.sha256(r.body).digest() != hashlib.sha256(
                self.model[offset:offset + length]).digest()):
            self.stats.error(
                "checksum mismatch", f"{self.kind} {self.tid} "
                f"offset={offset} length={length}")
            return False
        return True

    def zero(self, offset, length):
        epoch = self.tickets.epoch(self.tid)
        msg = json.dumps({"op": "zero", "offset": self.start_ + offset,
                          "size": length, "flush": False}).encode()
        try:
            if not self.conn.isOpen:
                self.conn.open()
            r = self.conn.request("PATCH", self.path,
                                  {"Content-Type": "application/json"}, msg)
        except (ConnectionFailed, OSError) as e:
            self._failed("zero", epoch, e)
            self._markUnknown(offset, length)
            return False
        self.stats.count(requests=1)
        if r.status != 200:
            self._failed("zero", epoch, r.status, r.body[:200])
            self._markUnknown(offset, length)
            return False
        self.model[offset:offset + length] = bytes(length)
        self.stats.done("zero")
        return True

    def repair(self):
        """
        Rewrite the unknown ranges (after the daemon finished with them).
        """
        if not self._waitIdle():
            return False
        pending, self.unknown = self.unknown, []
        ok = True
        for start, end in pending:
            if not self.upload(start, end - start):
                ok = False
        return ok

    # The loop

    def step(self):
        if self.unknown:
            self.repair()
            return
        if not self.conn.isOpen or self.rng.random() < RECONNECT_RATE:
            self.conn.close()
        r = self.rng.random()
        offset, length = self._range()
        abort = self.rng.random() < ABORT_RATE
        if r < ZERO_RATE:
            self.zero(offset, length)
        elif r < 0.5:
            self.upload(offset, length, abort=abort)
        else:
            self.download(offset, length, abort=abort)

    def run(self):
        try:
            while time.monotonic() < self.deadline:
                try:
                    self.step()
                except OSError as e:
                    self.stats.error("connect failed", f"{self.kind}: {e}")
                    self.conn.close()
                    time.sleep(0.1)
            self.finish()
        except Exception as e:  # a bug in this script: report, do not hang
            self.stats.error("worker crashed", repr(e))
            self.final = False
        finally:
            self.conn.close()

    def finish(self):
        """
        Make every byte of the region known, then read it all back.
        """
        for _ in range(REPAIR_ATTEMPTS):
            if not self.unknown:
                break
            self.repair()
        if self.unknown:
            self.stats.error("could not rewrite unknown ranges", self.tid)
            self.final = False
            return
        for _ in range(REPAIR_ATTEMPTS):
            result = self.download(0, self.size)
            if result is not None:
                self.final = result
                return
            self.conn.close()
            time.sleep(0.2)
        self.stats.error("final download failed", self.tid)
        self.final = False


class Canceller(threading.Thread):
    """
    Cancels a random worker's ticket now and then: DELETE (retried on 409
    as vdsm does), then PUT it again.
    """

    def __init__(self, tickets, tids, stats, deadline, seed):
        super().__init__(name="canceller", daemon=True)
        self.tickets = tickets
        self.tids = tids
        self.stats = stats
        self.deadline = deadline
        self.rng = random.Random(seed)

    def run(self):
        while time.monotonic() < self.deadline - 5:
            time.sleep(self.rng.uniform(*CANCEL_EVERY))
            tid = self.rng.choice(self.tids)
            self.tickets.bump(tid)
            try:
                for _ in range(10):
                    status, _, body = controlRequest(
                        self.tickets.sock, "DELETE", f"/tickets/{tid}")
                    if status == 204:
                        break
                    if status == 409:
                        self.stats.event("cancel 409 (retried)")
                        continue
                    self.stats.error(f"cancel HTTP {status}", body[:200])
                    break
                else:
                    self.stats.error("cancel never completed", tid)
                self.stats.event("ticket canceled")
                time.sleep(self.rng.uniform(0.05, 0.5))
                self.tickets.put(tid)
                self.tickets.bump(tid)
            except (OSError, RuntimeError) as e:
                self.stats.error("control failed", str(e))


# ---------------------------------------------------------------------------
# The daemon's own counts


def serverCounts(sock):
    """
    @return: (requests, bytes read, bytes written) from /metrics, or None
        when the daemon does not serve it.
    """
    try:
        status, _, body = controlRequest(sock, "GET", "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    requests = read = written = 0.0
    for line in body.decode().splitlines():
        if line.startswith("imageio_requests_total{"):
            requests += float(line.rsplit(" ", 1)[1])
        elif line.startswith("imageio_bytes_total{"):
            value = float(line.rsplit(" ", 1)[1])
            if 'direction="read"' in line:
                read += value
            elif 'direction="write"' in line:
                written += value
    return int(requests), int(read), int(written)


class Monitor(threading.Thread):
    """
    Samples the daemon every 10 s.
    """

    def __init__(self, daemon, stats, sock, started, stop):
        super().__init__(name="monitor", daemon=True)
        self.daemon_ = daemon
        self.stats = stats
        self.sock = sock
        self.started = started
        self.stop = stop
        self.samples = []  # (elapsed, rss, fds)

    def sample(self, label=""):
        elapsed = time.monotonic() - self.started
        rss, fds = procStatus(self.daemon_.proc.pid)
        self.samples.append((elapsed, rss, fds))
        s = self.stats
        server = serverCounts(self.sock)
        extra = ""
        if server is not None:
            extra = (f" | daemon: {server[0]} req, read "
                     f"{server[1] / MiB:.0f} MiB, wrote "
                     f"{server[2] / MiB:.0f} MiB")
        with s.lock:
            errors = sum(s.errors.values())
            log(f"t={elapsed:5.0f}s rss={rss / MiB:6.1f} MiB fds={fds:4d} "
                f"requests={s.requests} up={s.bytesUp / MiB:.0f} MiB "
                f"down={s.bytesDown / MiB:.0f} MiB errors={errors}"
                f"{extra}{label}")

    def mappings(self, top=6):
        """
        Log the daemon's largest resident mappings (where RSS is).
        """
        pid = self.daemon_.proc.pid
        rows = []
        try:
            with open(f"/proc/{pid}/smaps") as f:
                head = None
                for line in f:
                    if line[0] in "0123456789abcdef" and "-" in \
                            line.split()[0]:
                        parts = line.split()
                        start, end = (int(x, 16) for x in
                                      parts[0].split("-"))
                        head = [end - start,
                                parts[5] if len(parts) > 5 else "[anon]"]
                    elif line.startswith("Rss:") and head is not None:
                        rows.append((int(line.split()[1]) * 1024, *head))
        except OSError:
            return
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        anon = sum(r[0] for r in rows if r[2].startswith("["))
        log(f"mappings: {len(rows)}, rss {total / MiB:.1f} MiB, anonymous/"
            f"heap {anon / MiB:.1f} MiB; largest: " + ", ".join(
                f"{r[2]} {r[0] / MiB:.1f}/{r[1] / MiB:.1f} MiB"
                for r in rows[:top]))

    def run(self):
        while not self.stop.wait(SAMPLE_EVERY):
            try:
                self.sample()
                if os.environ.get("SOAK_MAPPINGS"):
                    self.mappings()
            except OSError as e:
                log(f"sampling failed: {e}")


# ---------------------------------------------------------------------------
# Main


def regionDigests(path, count, size):
    digests = []
    with open(path, "rb") as f:
        for i in range(count):
            f.seek(i * size)
            data = f.read(size)
            data += bytes(size - len(data))
            digests.append(hashlib.sha256(data).digest())
    return digests


def daemonAnswers(d, pki, sock):
    """
    The three services still answer.
    """
    status, _, _ = controlRequest(sock, "GET", "/tickets/no-such-ticket")
    if status != 404:
        return f"control answered {status}"
    c = Connection("tls", ("127.0.0.1", d.remotePort), pki.ca)
    try:
        r = c.request("OPTIONS", "/images/*")
        if r.status != 200:
            return f"remote OPTIONS answered {r.status}"
    finally:
        c.close()
    local = d.addresses["local"]
    c = Connection("unix", "\0" + local[1:] if local.startswith("@")
                   else local)
    try:
        r = c.request("OPTIONS", "/images/*")
        if r.status != 200:
            return f"local OPTIONS answered {r.status}"
    finally:
        c.close()
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--region-mib", type=int, default=16)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if shutil.which("qemu-nbd") is None:
        raise SystemExit("qemu-nbd is required")
    region = args.region_mib * MiB
    n = args.workers
    imageSize = n * region
    duration = args.minutes * 60
    log(f"soak: {n} workers, {args.minutes:g} min, region "
        f"{args.region_mib} MiB, seed {seed}")

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="soak-") as tmp:
        pki = makePKI(os.path.join(tmp, "pki"))
        conf = os.path.join(tmp, "conf")
        writeConf(conf, daemonConf(tmp, pki, extra={
            "logger_root": {"level": "INFO"}}))
        fileImage = os.path.join(tmp, "file.raw")
        nbdImage = os.path.join(tmp, "nbd.raw")
        for path in (fileImage, nbdImage):
            with open(path, "wb") as f:
                f.truncate(imageSize)
        nbdSock = os.path.join(tmp, "nbd.sock")
        qemu = subprocess.Popen(
            ["qemu-nbd", "--shared=16", "--persistent", "--format=raw",
             "--socket", nbdSock, nbdImage],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        for _ in range(200):
            if os.path.exists(nbdSock):
                break
            time.sleep(0.05)
        else:
            qemu.kill()
            raise SystemExit("qemu-nbd did not start: " +
                             qemu.stderr.read().decode())

        d = SoakDaemon(conf)
        stats = Stats()
        failures = []
        server = None
        tracebacks = 0
        try:
            sock = os.path.join(tmp, "run", "sock")
            tickets = Tickets(sock)
            local = d.addresses["local"]
            localAddress = ("\0" + local[1:] if local.startswith("@")
                            else local)
            started = time.monotonic()
            deadline = started + duration
            workers = []
            for i in range(n):
                backend = "file" if i % 2 == 0 else "nbd"
                transport = "tls" if (i // 2) % 2 == 0 else "unix"
                url = (f"file://{fileImage}" if backend == "file"
                       else f"nbd:unix:{nbdSock}")
                tid = f"soak-{i}"
                tickets.add(tid, url, imageSize)
                address = (("127.0.0.1", d.remotePort) if transport == "tls"
                           else localAddress)
                workers.append(Worker(
                    i, backend, transport, address, pki.ca, tid, i * region,
                    region, tickets, stats, deadline, seed + i))
            stop = threading.Event()
            monitor = Monitor(d, stats, sock, started, stop)
            monitor.sample(" (start)")
            monitor.start()
            canceller = Canceller(tickets, [w.tid for w in workers], stats,
                                  deadline, seed - 1)
            canceller.start()
            for w in workers:
                w.start()
            for w in workers:
                # Bounded: the deadline, then at most the final checks.
                w.join(duration + 900)
                if w.is_alive():
                    failures.append(f"{w.name} did not finish")
            canceller.join(60)
            stop.set()
            monitor.join(30)

            problem = daemonAnswers(d, pki, sock)
            if problem:
                failures.append(f"daemon does not answer: {problem}")
            server = serverCounts(sock)
            # Idle now: give the daemon's reclaim its turn.
            time.sleep(IDLE_WAIT)
            monitor.sample(" (end)")
            monitor.mappings()
            for w in workers:
                status, _, _ = controlRequest(sock, "DELETE",
                                              f"/tickets/{w.tid}")
                if status != 204:
                    failures.append(f"final DELETE {w.tid}: {status}")
            tracebacks = d.tracebacks
        finally:
            d.stop()
            qemu.terminate()
            try:
                qemu.wait(30)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()

        # The images on disk, after both servers stopped.
        digests = {"file": regionDigests(fileImage, n, region),
                   "nbd": regionDigests(nbdImage, n, region)}
        for w in workers:
            if w.final is None or w.unknown:
                continue
            if digests[w.backend][w.index] != hashlib.sha256(
                    w.model).digest():
                stats.error("checksum mismatch on disk",
                            f"{w.kind} region {w.index}")

    # Report.
    s = stats
    log("=" * 60)
    log(f"requests completed: {s.requests} "
        f"({dict(s.completed)})")
    log(f"bytes: uploaded {s.bytesUp / MiB:.0f} MiB, downloaded "
        f"{s.bytesDown / MiB:.0f} MiB")
    if server is not None:
        log(f"daemon /metrics: {server[0]} requests, read "
            f"{server[1] / MiB:.0f} MiB, wrote {server[2] / MiB:.0f} MiB")
    log(f"injected/expected events: {dict(s.events)}")
    log(f"errors by kind: {dict(s.errors) or 'none'}")
    for kind, example in s.examples.items():
        log(f"  {kind}: e.g. {example!r}")
    log(f"daemon log tracebacks/unhandled: {tracebacks}")
    for line in d.errorLines:
        log(f"  | {line}")
    finals = collections.Counter(str(w.final) for w in workers)
    log(f"final region checks: {dict(finals)}")

    # The first sample is before any transfer, the last one after all of
    # them (idle); "last" for the growth check is the last one under load,
    # comparable with the warm-up samples.
    samples = monitor.samples
    idleStart, idleEnd = samples[0], samples[-1]
    loaded = samples[1:-1] or samples
    warm = [x for x in loaded if x[0] <= WARMUP]
    rssFirst, rssPeak, rssLast = (loaded[0][1], max(x[1] for x in loaded),
                                  loaded[-1][1])
    fdFirst, fdPeak, fdLast = (loaded[0][2], max(x[2] for x in loaded),
                               loaded[-1][2])
    log(f"under load: RSS MiB first/peak/last: {rssFirst / MiB:.1f}/"
        f"{rssPeak / MiB:.1f}/{rssLast / MiB:.1f}; fds first/peak/last: "
        f"{fdFirst}/{fdPeak}/{fdLast}")
    log(f"idle before/after: RSS {idleStart[1] / MiB:.1f}/"
        f"{idleEnd[1] / MiB:.1f} MiB, fds {idleStart[2]}/{idleEnd[2]}")
    if rssPeak >= PEAK_RSS:
        failures.append(f"peak RSS under load {rssPeak / MiB:.1f} MiB >= "
                        f"{PEAK_RSS / MiB:.0f} MiB")
    if idleEnd[1] > idleStart[1] + IDLE_SLACK:
        failures.append(f"idle RSS after {idleEnd[1] / MiB:.1f} MiB > "
                        f"before {idleStart[1] / MiB:.1f} + 64 MiB")
    if idleEnd[2] > idleStart[2] + FD_SLACK:
        failures.append(f"fds leaked: {idleEnd[2]} open when idle, "
                        f"{idleStart[2]} before")
    if warm and loaded[-1][0] > WARMUP:
        rssWarm = max(x[1] for x in warm)
        fdWarm = max(x[2] for x in warm)
        log(f"warm-up max: RSS {rssWarm / MiB:.1f} MiB, fds {fdWarm}")
        if rssLast > rssWarm + RSS_SLACK:
            failures.append(f"RSS grew: {rssLast / MiB:.1f} MiB > "
                            f"{rssWarm / MiB:.1f} + 16 MiB")
        if fdLast > fdWarm + FD_SLACK:
            failures.append(f"fds grew: {fdLast} > {fdWarm} + 8")
    else:
        log("run shorter than the warm-up: no growth check")

    mismatches = sum(v for k, v in s.errors.items() if "mismatch" in k)
    if mismatches:
        failures.append(f"{mismatches} checksum mismatches")
    serverErrors = sum(v for k, v in s.errors.items() if "HTTP 5" in k)
    if serverErrors:
        failures.append(f"{serverErrors} HTTP 5xx answers")
    if tracebacks:
        failures.append(f"{tracebacks} tracebacks in the daemon log")
    if any(w.final is not True for w in workers):
        failures.append("some final region checks failed")
    if failures:
        for f in failures:
            log(f"FAIL: {f}")
        return 1
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
