"""
Pieces of C{bench/run.py}: the test images, the two daemons with the same
configuration, the ceilings (nginx, nbdcopy), and the measuring tools
(server CPU from /proc, peak RSS, small clients).

Not part of C{make test}.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


class Skip(Exception):
    """
    A scenario cannot run here; the message says why ("not yet", ...).
    """


def findRefvenv(explicit=None):
    for path in (explicit, os.environ.get("IMAGEIO_REFVENV"),
                 os.path.join(REPO, ".refvenv"), "/tmp/refvenv"):
        if path and os.access(os.path.join(path, "bin", "ovirt-imageio"),
                              os.X_OK):
            return path
    sys.exit("reference virtualenv not found: run `make refvenv` or pass "
             "--refvenv")


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def makeCert(directory):
    """
    A self-signed certificate for localhost, its own CA.

    @return: C{(key, cert)} paths.
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


# ---------------------------------------------------------------------------
# /proc


def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def processTree(pid):
    """
    C{pid} and all its descendants alive now.
    """
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat(name)[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpuSeconds(pid):
    """
    user + system CPU seconds of C{pid} (threads included).
    """
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status(pid, key):
    """
    A C{/proc/PID/status} value in bytes (C{VmHWM}, C{VmRSS}), or 0.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------
# HTTP helpers


class UnixHTTPConnection(http.client.HTTPConnection):

    def __init__(self, path, timeout=600):
        super().__init__("localhost", timeout=timeout)
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


# ---------------------------------------------------------------------------
# Daemons


class Daemon:
    """
    One imageio daemon (ours or the reference) with its own conf dir; the
    settings are the same for both, plus C{extra} INI text.

    CPU and memory are read for the whole process tree, so worker
    processes count.
    """

    def __init__(self, name, argv, workdir, cert, key, level="WARNING",
                 extra=""):
        self.name = name
        self.dir = os.path.join(workdir, "daemon-" + name)
        run = os.path.join(self.dir, "run")
        os.makedirs(os.path.join(self.dir, "conf.d"))
        os.makedirs(run)
        self.port = freePort()
        self.localSocket = os.path.join(self.dir, "local.sock")
        self.controlSocket = os.path.join(run, "sock")
        self.cert = cert
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
        if extra:
            with open(os.path.join(self.dir, "conf.d", "zz-bench.conf"),
                      "w") as f:
                f.write(extra)
        self.logPath = os.path.join(self.dir, "daemon.log")
        self.log = open(self.logPath, "wb")
        self.proc = subprocess.Popen(
            argv + ["--conf-dir", self.dir], stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} daemon exited, see {self.logPath}")
            try:
                code, _ = control(self.controlSocket, "GET",
                                  "/tickets/no-such-ticket")
                if code == 404 and os.path.exists(self.localSocket):
                    if self._remoteUp():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} daemon not ready, see "
                                   f"{self.logPath}")
            time.sleep(0.1)

    def _remoteUp(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
            return True
        except OSError:
            return False

    @property
    def pid(self):
        return self.proc.pid

    def url(self, tid, transport="tls"):
        if transport == "tls":
            return f"https://localhost:{self.port}/images/{tid}"
        return f"http://localhost/images/{tid}"

    def addTicket(self, url, size, ops=("read", "write"), sparse=False):
        tid = str(uuid.uuid4())
        code, body = control(self.controlSocket, "PUT", f"/tickets/{tid}", {
            "uuid": tid, "size": size, "url": url, "ops": list(ops),
            "timeout": 36000, "inactivity_timeout": 3600, "sparse": sparse,
            "dirty": False, "transfer_id": f"bench-{tid}"})
        if code != 200:
            raise RuntimeError(f"{self.name}: adding ticket failed: {code} "
                               f"{body!r}")
        return tid

    def removeTicket(self, tid):
        control(self.controlSocket, "DELETE", f"/tickets/{tid}")

    def cpu(self):
        return sum(cpuSeconds(p) for p in processTree(self.pid))

    def peakRSS(self):
        """
        @return: C{{pid: VmHWM bytes}} for the process and its workers.
        """
        return {p: status(p, "VmHWM") for p in processTree(self.pid)}

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class QemuNBD:
    """
    qemu-nbd serving one image on a unix socket, with the cache options
    oVirt hosts give it (C{--cache=none --aio=native}: O_DIRECT, as vdsm
    starts it and as the reference's own tests do).

    Not through the page cache: with C{--cache=writeback} the nbd rows
    measured whatever the scenario before had left there. A file row
    drops the cache before each run, so the first daemon measured after
    it read the image from disk through qemu-nbd and the second read it
    from memory: the same code measured 568 and 1,395 MB/s, and the
    ratio ranged 0.80-4.72 depending on which side went first.
    """

    def __init__(self, image, fmt, sock, extra=()):
        self.sock = sock
        self.argv = ["qemu-nbd", "--persistent", "--shared=16", "-f", fmt,
                     "--cache=none", "--aio=native", "--discard=unmap",
                     *extra, "-k", sock, image]
        self.restarts = 0
        self._start(image)

    def ensure(self):
        """
        Start qemu-nbd again if it died (on a shared machine other jobs
        may kill every qemu-nbd); the daemons reconnect per connection.
        """
        if self.proc.poll() is None:
            return False
        self.restarts += 1
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self._start(self.argv[-1])
        return True

    def _start(self, image):
        sock = self.sock
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd did not start for {image}")
            time.sleep(0.02)

    @property
    def url(self):
        return f"nbd:unix:{self.sock}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Nginx:
    """
    nginx serving C{root} over TLS (the ceiling for TLS downloads), one
    worker process, as a single stream uses one anyway.
    """

    def __init__(self, workdir, root, cert, key):
        exe = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if exe is None:
            raise Skip("nginx not installed")
        self.dir = os.path.join(workdir, "nginx")
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self.port = freePort()
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = f"""\
{user}worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
    }}
}}
"""
        path = os.path.join(self.dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.log = open(os.path.join(self.dir, "out.log"), "wb")
        self.proc = subprocess.Popen(
            [exe, "-p", self.dir, "-c", path], stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if self.proc.poll() is not None or \
                        time.monotonic() > deadline:
                    raise Skip("nginx did not start, see "
                               f"{self.dir}/logs/error.log")
                time.sleep(0.05)

    def cpu(self):
        return sum(cpuSeconds(p) for p in processTree(self.proc.pid))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def ensureNginx():
    """
    Install nginx (Debian) if it is missing and we may; never fails.
    """
    if shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-qq", "nginx-light"],
                ["apt-get", "install", "-y", "-qq", "nginx"]):
        r = subprocess.run(cmd, capture_output=True, env=env)
        if r.returncode == 0:
            break
    else:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True,
                       env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"],
                       capture_output=True, env=env)
    # The package starts a system nginx on port 80; we run our own.
    subprocess.run(["systemctl", "stop", "nginx"], capture_output=True)
    return bool(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"))


# ---------------------------------------------------------------------------
# Images


def _fill(path, size, dataEvery=None, seed=0):
    """
    Write C{path} of C{size} bytes: all data, or data in the first half of
    every C{dataEvery} bytes and holes in the second half.
    """
    rnd = random.Random(seed)
    block = 16 * MiB
    pool = [rnd.randbytes(block) for _ in range(4)]
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            if dataEvery:
                n = min(dataEvery // 2, size - pos)
                f.seek(pos)
                left = n
                while left:
                    k = min(left, block)
                    f.write(os.urandom(4096) + pool[rnd.randrange(4)][
                        4096:k] if k > 4096 else os.urandom(k))
                    left -= k
                pos += dataEvery
            else:
                n = min(block, size - pos)
                f.write(os.urandom(n))
                pos += n


def makeImages(directory, scale=1.0, log=print):
    """
    Create (or reuse, when their stamp matches) the test images.

    @return: a dict of name -> path.
    """
    os.makedirs(directory, exist_ok=True)
    sizes = {"sparse": int(4 * GiB * scale) // MiB * MiB,
             "random": int(2 * GiB * scale) // MiB * MiB}
    stamp = os.path.join(directory, "stamp.json")
    want = {"version": 2, **sizes}
    images = {
        "sparse": os.path.join(directory, "sparse.raw"),
        "random": os.path.join(directory, "random.raw"),
        "sparse.qcow2": os.path.join(directory, "sparse.qcow2"),
        "random.qcow2": os.path.join(directory, "random.qcow2"),
        "extents.qcow2": os.path.join(directory, "extents-8t.qcow2"),
    }
    try:
        with open(stamp) as f:
            if json.load(f) == want and all(
                    os.path.exists(p) for p in images.values()):
                log(f"Reusing test images in {directory}")
                return images, sizes
    except (OSError, ValueError):
        pass
    t = time.monotonic()
    log(f"Creating test images in {directory} ...")
    _fill(images["sparse"], sizes["sparse"], dataEvery=16 * MiB, seed=1)
    _fill(images["random"], sizes["random"])
    for name in ("sparse", "random"):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                        images[name], images[name + ".qcow2"]], check=True)
    # 8 TiB with 32,768 extents: 16,384 data clusters 512 MiB apart.
    raw = os.path.join(directory, "extents-8t.raw")
    with open(raw, "wb") as f:
        f.truncate(8 * TiB)
        data = b"\xa5" * 4096
        for i in range(16384):
            os.pwrite(f.fileno(), data, i * 512 * MiB)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                    raw, images["extents.qcow2"]], check=True)
    os.unlink(raw)
    with open(stamp, "w") as f:
        json.dump(want, f)
    log(f"Images ready in {time.monotonic() - t:.0f} s")
    return images, sizes


# ---------------------------------------------------------------------------
# Clients


class CurlSink:
    """
    The fastest server a curl upload over a unix socket can have: one
    connection, the request head read, the body received into one 4 MiB
    buffer with C{MSG_WAITALL} and thrown away, then C{200}. What curl
    reaches against it is the most any daemon can reach on this machine
    (curl's 64 KiB writes and its socket's send buffer set the pace).
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, "sink.sock")
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.path)
        self._listener.listen(1)

    def upload(self, source):
        """
        Upload C{source} with curl; return its MB/s.
        """
        size = os.path.getsize(source)
        errors = []
        t = threading.Thread(target=self._serve, args=(size, errors))
        t.start()
        try:
            seconds, code, _, up = curl(
                ["--unix-socket", self.path, "-T", source, "-H", "Expect:",
                 "http://localhost/sink"])
        finally:
            t.join(60)
        if errors or code != 200 or up != size:
            raise RuntimeError(f"sink upload failed: {code} {errors}")
        return size / seconds / 1e6, seconds

    def _serve(self, size, errors):
        try:
            self._listener.settimeout(60)
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(60)
                head = b""
                while b"\r\n\r\n" not in head:
                    more = conn.recv(65536)
                    if not more:
                        raise OSError("closed in the head")
                    head += more
                left = size - len(head.split(b"\r\n\r\n", 1)[1])
                buf = memoryview(bytearray(4 * MiB))
                while left:
                    n = conn.recv_into(buf[:min(left, len(buf))],
                                       min(left, len(buf)),
                                       socket.MSG_WAITALL)
                    if not n:
                        raise OSError("closed in the body")
                    left -= n
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
                             b"\r\n")
        except OSError as e:
            errors.append(str(e))

    def close(self):
        self._listener.close()


def directReads(path, parts=4, block=8 * MiB):
    """
    Read C{path} as C{parts} parallel C{dd iflag=direct} readers of its
    consecutive parts (the page cache should be dropped first): what the
    disk gives 4 parallel Range downloads. Returns MB/s.
    """
    size = os.path.getsize(path)
    blocks = size // block
    each = blocks // parts
    start = time.monotonic()
    procs = []
    for i in range(parts):
        count = blocks - i * each if i == parts - 1 else each
        procs.append(subprocess.Popen(
            ["dd", f"if={path}", "of=/dev/null", f"bs={block}",
             f"skip={i * each}", f"count={count}", "iflag=direct"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("dd failed")
    return blocks * block / (time.monotonic() - start) / 1e6


def curl(args, timeout=1800):
    """
    Run curl; return (seconds, http code, bytes down, bytes up).
    """
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
            "%{http_code} %{size_download} %{size_upload}", *args]
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=timeout)
    elapsed = time.monotonic() - start
    if out.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {out.stderr}"
                           f"{out.stdout}")
    code, down, up = out.stdout.split()
    return elapsed, int(code), int(float(down)), int(float(up))


def readHead(f):
    """
    The head of one HTTP/1.1 response from the buffered file C{f}: its
    status line and C{Content-Length} (0 if none).
    """
    status = f.readline()
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, length
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])


class KeepAliveReader:
    """
    Range GETs on one keep-alive connection, with as little client work
    as possible (a raw socket, no http.client).
    """

    def __init__(self, daemon, tid, transport):
        if transport == "tls":
            raw = socket.create_connection(("127.0.0.1", daemon.port))
            ctx = ssl.create_default_context(cafile=daemon.cert)
            self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(daemon.localSocket)
        self.file = self.sock.makefile("rb", buffering=1 << 20)
        self.head = (f"GET /images/{tid} HTTP/1.1\r\nHost: localhost\r\n"
                     "Range: bytes=%d-%d\r\n\r\n")

    def get(self, offset, size):
        self.sock.sendall((self.head % (offset, offset + size - 1)).encode())
        f = self.file
        status, length = readHead(f)
        if not status.startswith(b"HTTP/1.1 206"):
            raise RuntimeError(f"unexpected reply {status!r}")
        data = f.read(length)
        if len(data) != size:
            raise RuntimeError("short read")

    def close(self):
        self.file.close()
        self.sock.close()


OUR_CLIENT = """
import sys, time
from imageio import client
op, url, path, cafile = sys.argv[1:5]
t = time.monotonic()
if op == "upload":
    client.upload(path, url, cafile)
else:
    client.download(url, path, cafile, fmt="qcow2")
print(time.monotonic() - t)
"""

REF_CLIENT = OUR_CLIENT.replace("from imageio import client",
                                "from ovirt_imageio import client")


def ourClientAvailable():
    r = subprocess.run([sys.executable, "-c", "import imageio.client; "
                        "imageio.client.upload; imageio.client.download"],
                       capture_output=True)
    return r.returncode == 0
