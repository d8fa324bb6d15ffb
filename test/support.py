"""
Helpers shared by the tests: a test PKI, conf dirs in the reference's
format, a daemon run as a real twistd process, and small blocking HTTP
clients (TCP, TLS, unix and abstract unix sockets).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def referencePython() -> str:
    """
    The python of the reference's virtualenv (ovirt-imageio 2.5.1):
    C{$IMAGEIO_REFVENV}, else the repository's C{.refvenv} (what C{make
    test} installs), else C{/tmp/refvenv}. Missing: a failure in CI
    (C{CI=true}: C{make test} installs it, so a skip there would hide a
    broken set-up), a skip elsewhere.
    """
    import pytest
    path = os.environ.get("IMAGEIO_REFVENV")
    if not path:
        path = os.path.join(REPO, ".refvenv")
        if not os.path.exists(path) and os.path.exists("/tmp/refvenv"):
            path = "/tmp/refvenv"
    python = os.path.join(path, "bin", "python")
    if not os.access(python, os.X_OK):
        message = f"reference virtualenv missing: {path}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


@dataclass
class PKI:
    ca: str
    cert: str
    key: str


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def makePKI(directory, hosts=("localhost", "127.0.0.1", "::1"),
            caName="imageio test CA", prefix="", keyType="ec"):
    """
    A CA and a server certificate for C{hosts} (DNS and IP SANs), written
    as PEM files in C{directory}. The server key is EC P-256, or RSA 2048
    with C{keyType="rsa"}.
    """
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=1)
    end = now + datetime.timedelta(days=30)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caCert = (
        x509.CertificateBuilder()
        .subject_name(_name(caName)).issuer_name(_name(caName))
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                       critical=True)
        .sign(caKey, hashes.SHA256()))
    if keyType == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
        .sign(caKey, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return PKI(
        ca=_write(os.path.join(directory, prefix + "ca.pem"),
                  caCert.public_bytes(pem)),
        cert=_write(os.path.join(directory, prefix + "cert.pem"),
                    cert.public_bytes(pem)),
        key=_write(os.path.join(directory, prefix + "key.pem"),
                   key.private_bytes(
                       pem, serialization.PrivateFormat.TraditionalOpenSSL,
                       serialization.NoEncryption())),
    )


def writeConf(confDir, sections, name="daemon.conf"):
    """
    Write C{sections} ({section: {option: value}}) as an INI file in
    C{confDir}/conf.d/. Values are written literally (a str value starting
    with NUL is written with the NUL byte, as the reference reads it).
    """
    d = os.path.join(confDir, "conf.d")
    os.makedirs(d, exist_ok=True)
    lines = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        for k, v in options.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            lines.append(f"{k} = {v}")
        lines.append("")
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def daemonConf(tmp, pki=None, control="unix", localSocket=None,
               extra=None):
    """
    A typical test configuration: remote on a free port of 127.0.0.1 (TLS
    when C{pki} is given), local on a unique abstract socket, control on a
    unix socket in C{tmp} (or TCP on a free port), no privilege drop, no
    systemd, logging to stderr only.
    """
    run = os.path.join(tmp, "run")
    os.makedirs(run, exist_ok=True)
    sections = {
        "daemon": {"drop_privileges": False, "systemd_enable": False,
                   "run_dir": run, "inactivity_timeout": 60},
        "tls": ({"enable": True, "key_file": pki.key,
                 "cert_file": pki.cert, "ca_file": pki.ca}
                if pki else {"enable": False}),
        "remote": {"host": "127.0.0.1", "port": 0},
        "local": {"enable": True,
                  "socket": localSocket or
                  f"\0/org/tximageio/test/{os.getpid()}/{time.monotonic_ns()}"},
        "control": ({"transport": "unix",
                     "socket": os.path.join(run, "sock")}
                    if control == "unix" else
                    {"transport": "tcp", "port": freePort()}),
        "logger_root": {"level": "DEBUG", "handlers": "stderr"},
        "handlers": {"keys": "stderr"},
    }
    for section, options in (extra or {}).items():
        sections.setdefault(section, {}).update(options)
    return sections


def freePort(host="127.0.0.1"):
    """
    A TCP port free right now (for options that cannot take 0, such as
    the control port, which the reference requires to be set).
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Daemon:
    """
    A real C{twistd -n imageio} process.

    Readiness is the daemon's own "imageio ready" log line, printed after
    every listener is bound; the addresses come from its "listening on"
    lines.
    """

    def __init__(self, confDir, args=(), env=None, timeout=30, twistd=None,
                 cmd=None, cwd=None):
        self.confDir = confDir
        self.lines = []
        self.addresses = {}
        self._ready = threading.Event()
        self._exited = threading.Event()
        if cmd is None:
            cmd = [twistd or os.path.join(BIN, "twistd"), "--pidfile=",
                   "-n", "imageio", "--conf-dir", confDir, *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=cwd or confDir,
            env=dict(os.environ, **(env or {})))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._exited.is_set() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("daemon did not start:\n" + self.output())

    def _read(self):
        pattern = re.compile(r"(\w+) service listening on (\S+)")
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            # The substring test first: the pattern backtracks
            # quadratically on a long line of word characters (a 70 kB
            # transfer id in a log line held the GIL for minutes).
            m = pattern.search(line) if "service listening on" in line \
                else None
            if m:
                self.addresses[m.group(1)] = m.group(2)
            if "imageio ready" in line:
                self._ready.set()
        self._exited.set()

    def output(self):
        return "\n".join(self.lines)

    @property
    def remotePort(self):
        return int(self.addresses["remote"].rsplit(":", 1)[1])

    def stop(self, sig=15, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._exited.wait(5)
        return self.proc.returncode


class UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP over a unix socket; a path starting with NUL is abstract.
    """

    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def httpsConnection(port, ca, host="127.0.0.1", timeout=30):
    ctx = ssl.create_default_context(cafile=ca)
    return http.client.HTTPSConnection(host, port, context=ctx,
                                       timeout=timeout)


def request(con, method, path, body=None, headers=None):
    """
    Send one request; return (status, headers dict (lower-case), body).
    """
    con.request(method, path, body=body, headers=headers or {})
    resp = con.getresponse()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def controlRequest(path, method, urlPath, body=None, headers=None):
    """
    One request on a new connection to the control unix socket, as vdsm
    does (no Content-Type).
    """
    con = UnixHTTPConnection(path)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        return request(con, method, urlPath, body, headers)
    finally:
        con.close()


def readResponse(sock, buf):
    """
    One HTTP/1.1 response from C{sock} (C{buf}: bytes already read past
    the previous one): C{(status, body, bytes read past this one)}.
    """
    buf = bytearray(buf)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = buf[:end].decode("latin-1").split("\r\n")
    del buf[:end + 4]
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    return int(lines[0].split()[1]), bytes(buf[:length]), bytes(buf[length:])
