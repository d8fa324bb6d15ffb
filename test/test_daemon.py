"""
The daemon as operators run it: a real C{twistd -n imageio} process, its
configuration, TLS, the control API over a unix socket (vdsm) and TCP
(engine), signals, privilege drop and C{imageioctl}.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys

import pytest

from imageio import __version__
from test.support import (
    BIN, REPO, Daemon, controlRequest, daemonConf, freePort, httpsConnection,
    makePKI, request, writeConf)

# The ticket vdsm sends (SPEC C §2.1), and the engine's proxy ticket
# (C §2.2).
VDSM_TICKET = {
    "dirty": False, "ops": ["write"], "size": 8796093022208,
    "sparse": False, "inactivity_timeout": 60,
    "transfer_id": "3a8a64d4-8a4a-4a3b-bcd7-6c6f2e0b2f45",
    "uuid": "7b8a8f64-0c13-4b3f-a3d0-2b3a9e1b9d01", "timeout": 300,
    "url": "nbd:unix:/run/vdsm/nbd/3a8a64d4.sock",
}
ENGINE_TICKET = {
    "uuid": "a1b2c3d4-0000-4000-8000-000000000001", "timeout": 300,
    "size": 1073741824,
    "url": "https://host1.example.com:54322/images/"
           "a1b2c3d4-0000-4000-8000-000000000001",
    "ops": ["read"], "sparse": False,
    "transfer_id": "e5f6a7b8-0000-4000-8000-000000000002",
    "filename": "disk.qcow2", "dirty": False, "inactivity_timeout": 120,
}

STATUS_FIELDS = {
    "active", "canceled", "connections", "expires", "idle_time",
    "inactivity_timeout", "ops", "size", "sparse", "dirty", "timeout", "url",
    "uuid", "transfer_id", "transferred",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return makePKI(str(tmp_path_factory.mktemp("pki")))


def start(tmp_path, pki=None, control="unix", extra=None, args=(), **kw):
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), pki, control=control,
                               extra=extra))
    return Daemon(conf, args=args, **kw)


@pytest.fixture
def daemon(tmp_path, pki):
    d = start(tmp_path, pki)
    yield d
    d.stop()


@pytest.fixture
def tcpDaemon(tmp_path, pki):
    d = start(tmp_path, pki, control="tcp")
    yield d
    d.stop()


def controlSocket(tmp_path):
    return str(tmp_path / "run" / "sock")


# Start-up and TLS.

def test_info_over_tls(daemon, pki):
    con = httpsConnection(daemon.remotePort, pki.ca)
    for path in ("/info/", "/info"):
        status, headers, body = request(con, "GET", path)
        assert status == 200
        assert json.loads(body) == {"version": __version__}
        assert headers["server"] == f"imageio/{__version__}"
    con.close()


def test_port_zero_logged(daemon):
    assert daemon.remotePort > 0
    assert re.search(r"remote service listening on 127\.0\.0\.1:\d+",
                     daemon.output())
    assert "local service listening on @/org/tximageio/test/" in \
        daemon.output()


def test_show_config(tmp_path):
    conf = str(tmp_path / "conf")
    writeConf(conf, {"remote": {"port": 54323}, "control": {
        "transport": "tcp", "port": 54324}})
    out = subprocess.run(
        [os.path.join(BIN, "twistd"), "--pidfile=", "-n", "imageio",
         "--conf-dir", conf, "--show-config"],
        capture_output=True, check=True, cwd=str(tmp_path), timeout=60)
    cfg = json.loads(out.stdout)
    assert cfg["remote"]["port"] == 54323
    assert cfg["control"]["transport"] == "tcp"
    assert cfg["local"]["socket"] == "\0/org/ovirt/imageio"


def test_empty_conf_dir_fails_fast(tmp_path):
    (tmp_path / "conf" / "conf.d").mkdir(parents=True)
    out = subprocess.run(
        [os.path.join(BIN, "twistd"), "--pidfile=", "-n", "imageio",
         "--conf-dir", str(tmp_path / "conf")],
        capture_output=True, cwd=str(tmp_path), timeout=60)
    assert out.returncode != 0
    assert b"conf.d/*.conf" in out.stdout + out.stderr


def test_missing_cert_fails_clearly(tmp_path):
    conf = str(tmp_path / "conf")
    sections = daemonConf(str(tmp_path), None)
    sections["tls"] = {"enable": True, "key_file": "", "cert_file": ""}
    writeConf(conf, sections)
    with pytest.raises(RuntimeError) as e:
        Daemon(conf)
    assert "TLS is enabled, but [tls] key_file or cert_file is not set" in \
        str(e.value)
    assert "Traceback" not in str(e.value)


def test_unreadable_cert_fails_clearly(tmp_path, pki):
    conf = str(tmp_path / "conf")
    sections = daemonConf(str(tmp_path), pki)
    sections["tls"]["cert_file"] = str(tmp_path / "missing.pem")
    writeConf(conf, sections)
    with pytest.raises(RuntimeError) as e:
        Daemon(conf)
    assert "cannot read TLS certificate file" in str(e.value)
    assert "No such file or directory" in str(e.value)


def s_client(port, *args):
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief",
         *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_old_versions_refused(daemon, version):
    # The client side allows old versions, so the refusal is the server's.
    out = s_client(daemon.remotePort, version, "-cipher",
                   "DEFAULT:@SECLEVEL=0")
    assert out.returncode != 0, out.stderr


@pytest.mark.parametrize("version,name", [("-tls1_2", "TLSv1.2"),
                                          ("-tls1_3", "TLSv1.3")])
def test_tls_current_versions_accepted(daemon, version, name):
    out = s_client(daemon.remotePort, version)
    assert out.returncode == 0, out.stderr
    assert f"Protocol version: {name}" in out.stderr.decode()


def test_tls1_1_enabled(tmp_path, pki):
    d = start(tmp_path, pki, extra={"tls": {"enable_tls1_1": True}})
    try:
        out = s_client(d.remotePort, "-tls1_1", "-cipher",
                       "DEFAULT:@SECLEVEL=0")
        assert out.returncode == 0, out.stderr
        assert "Protocol version: TLSv1.1" in out.stderr.decode()
        # TLS 1.0 stays refused.
        out = s_client(d.remotePort, "-tls1", "-cipher",
                       "DEFAULT:@SECLEVEL=0")
        assert out.returncode != 0
    finally:
        d.stop()


def test_plain_http_when_tls_disabled(tmp_path):
    import http.client
    d = start(tmp_path, None)
    try:
        con = http.client.HTTPConnection("127.0.0.1", d.remotePort,
                                         timeout=30)
        status, _, body = request(con, "GET", "/info/")
        assert status == 200
        con.close()
    finally:
        d.stop()


# Control API, vdsm style: unix socket, a new connection per request,
# no Content-Type.

def test_tickets_life_cycle_unix(daemon, tmp_path):
    sock = controlSocket(tmp_path)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    tid = VDSM_TICKET["uuid"]

    status, headers, body = controlRequest(sock, "PUT", "/tickets/" + tid,
                                           VDSM_TICKET)
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "0"

    status, headers, body = controlRequest(sock, "GET", "/tickets/" + tid)
    assert status == 200
    info = json.loads(body)
    assert set(info) == STATUS_FIELDS
    assert info["uuid"] == tid
    assert info["ops"] == ["write"]
    assert info["size"] == VDSM_TICKET["size"]
    assert info["url"] == VDSM_TICKET["url"]
    assert info["transfer_id"] == VDSM_TICKET["transfer_id"]
    assert info["active"] is False and info["canceled"] is False
    assert info["connections"] == 0 and info["transferred"] == 0
    assert info["timeout"] == 300 and info["inactivity_timeout"] == 60
    assert isinstance(info["expires"], int)
    assert isinstance(info["idle_time"], int)
    expires = info["expires"]

    status, headers, body = controlRequest(
        sock, "PATCH", "/tickets/" + tid, {"timeout": 3000})
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "0"
    info = json.loads(controlRequest(sock, "GET", "/tickets/" + tid)[2])
    assert info["expires"] >= expires + 2700
    assert info["timeout"] == 300

    for _ in range(2):  # idempotent
        status, headers, body = controlRequest(sock, "DELETE",
                                               "/tickets/" + tid)
        assert (status, body) == (204, b"")
        assert headers["content-length"] == "0"

    status, _, body = controlRequest(sock, "GET", "/tickets/" + tid)
    assert status == 404
    assert body == f"No such ticket '{tid}'\n".encode()
    status, _, body = controlRequest(sock, "PATCH", "/tickets/" + tid,
                                     {"timeout": 3})
    assert status == 404
    assert body == f"No such ticket: {tid}\n".encode()


def test_delete_all_tickets(daemon, tmp_path):
    sock = controlSocket(tmp_path)
    for i in range(3):
        t = dict(VDSM_TICKET, uuid=f"t{i}")
        assert controlRequest(sock, "PUT", f"/tickets/t{i}", t)[0] == 200
    status, headers, _ = controlRequest(sock, "DELETE", "/tickets/")
    assert status == 204 and headers["content-length"] == "0"
    for i in range(3):
        assert controlRequest(sock, "GET", f"/tickets/t{i}")[0] == 404


@pytest.mark.parametrize("body,text", [
    (b"{not json", "Ticket is not in a json format: "),
    (b"[]", "Invalid ticket: "),
    (json.dumps({k: v for k, v in VDSM_TICKET.items() if k != "size"}),
     "Invalid ticket: Required ticket parameter is missing: size"),
    (json.dumps(dict(VDSM_TICKET, size="1")),
     "Invalid ticket: Invalid value for 'size'"),
    (json.dumps(dict(VDSM_TICKET, ops="read")),
     "Invalid ticket: Invalid value for 'ops'"),
    (json.dumps(dict(VDSM_TICKET, url="ftp://x/y")),
     "Unsupported url scheme"),
])
def test_put_invalid_ticket(daemon, tmp_path, body, text):
    status, _, data = controlRequest(controlSocket(tmp_path), "PUT",
                                     "/tickets/x", body)
    assert status == 400
    assert text in data.decode()
    assert data.endswith(b"\n")


@pytest.mark.parametrize("method,path,status,text", [
    ("GET", "/tickets/", 400, "Ticket id is required"),
    ("PUT", "/tickets/", 400, "Ticket id is required"),
    ("PATCH", "/tickets/", 400, "Ticket id is required"),
    ("POST", "/tickets/x", 405, "Method 'POST' not defined"),
    ("FOO", "/tickets/x", 405, "Invalid method 'FOO'"),
    ("GET", "/images/x", 404, "No handler for '/images/x'"),
    ("GET", "/info/", 404, "No handler for '/info/'"),
])
def test_control_errors(daemon, tmp_path, method, path, status, text):
    got, _, data = controlRequest(controlSocket(tmp_path), method, path)
    assert got == status
    assert text in data.decode()


@pytest.mark.parametrize("body,text", [
    ({}, "Missing required value for 'timeout'"),
    ({"timeout": "3"}, "Integer required '3'"),
    ({"timeout": -1}, "Invalid value -1 < 0"),
    ([], "Invalid patch"),
])
def test_patch_invalid(daemon, tmp_path, body, text):
    sock = controlSocket(tmp_path)
    controlRequest(sock, "PUT", "/tickets/x", dict(VDSM_TICKET, uuid="x"))
    status, _, data = controlRequest(sock, "PATCH", "/tickets/x", body)
    assert status == 400
    assert text in data.decode()


# Control API, engine style: localhost TCP, new connection per request,
# Content-Length set, no Content-Type.

def engineRequest(port, method, path, body=b""):
    with socket.create_connection(("localhost", port), timeout=30) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                  f"Content-Length: {len(body)}\r\n"
                  "Connection: Keep-Alive\r\n\r\n".encode() + body)
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        headers = {}
        while True:
            line = f.readline().strip()
            if not line:
                break
            k, v = line.decode().split(":", 1)
            headers[k.lower()] = v.strip()
        data = f.read(int(headers["content-length"]))
        return status, headers, data


def test_tickets_life_cycle_tcp(tcpDaemon):
    port = int(tcpDaemon.addresses["control"].rsplit(":", 1)[1])
    assert tcpDaemon.addresses["control"].startswith("127.0.0.1:")
    tid = ENGINE_TICKET["uuid"]
    body = json.dumps(ENGINE_TICKET).encode()
    assert engineRequest(port, "PUT", "/tickets/" + tid, body)[:3:2] == \
        (200, b"")
    status, headers, data = engineRequest(port, "GET", "/tickets/" + tid)
    assert status == 200
    info = json.loads(data)
    assert set(info) == STATUS_FIELDS | {"filename"}
    assert info["filename"] == "disk.qcow2"
    assert info["url"] == ENGINE_TICKET["url"]
    status, headers, data = engineRequest(
        port, "PATCH", "/tickets/" + tid, b'{"timeout": 600}')
    assert (status, data, headers["content-length"]) == (200, b"", "0")
    status, headers, data = engineRequest(port, "DELETE", "/tickets/" + tid)
    assert (status, data, headers["content-length"]) == (204, b"", "0")
    assert engineRequest(port, "GET", "/tickets/" + tid)[0] == 404


# Startup ticket, signals, privileges.

def test_initial_ticket(tmp_path, pki):
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(dict(VDSM_TICKET, uuid="boot")))
    d = start(tmp_path, pki, args=["--ticket", str(path)])
    try:
        status, _, body = controlRequest(controlSocket(tmp_path), "GET",
                                         "/tickets/boot")
        assert status == 200
        assert json.loads(body)["uuid"] == "boot"
    finally:
        d.stop()


def test_invalid_initial_ticket(tmp_path, pki):
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps({"uuid": "x"}))
    with pytest.raises(RuntimeError) as e:
        start(tmp_path, pki, args=["--ticket", str(path)])
    assert "invalid ticket file" in str(e.value)


@pytest.mark.parametrize("sig", [15, 2])
def test_signal_stops_cleanly(tmp_path, pki, sig):
    d = start(tmp_path, pki)
    sock = controlSocket(tmp_path)
    assert os.path.exists(sock)
    # twistd re-raises SIGINT after shutting down ("killed by SIGINT");
    # a clean stop on SIGTERM exits 0 (test_sigterm_exit_0).
    assert d.stop(sig) == (0 if sig == 15 else -sig)
    assert "Main loop terminated." in d.output()
    assert "Traceback" not in d.output()
    assert not os.path.exists(sock)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_exit_0(tmp_path, pki, workers):
    # Scripts and supervisors other than systemd read "killed by SIGTERM"
    # as a failure; the reference exits 0.
    d = start(tmp_path, pki, extra={"daemon": {"workers": workers}})
    sock = controlSocket(tmp_path)
    assert controlRequest(sock, "PUT", "/tickets/t",
                          dict(VDSM_TICKET, uuid="t"))[0] == 200
    assert d.stop(15) == 0, d.output()
    assert "Main loop terminated." in d.output()
    assert "Traceback" not in d.output()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_drop_privileges(tmp_path, pki):
    nobody = pwd.getpwnam("nobody")
    for p in (tmp_path, tmp_path / "pki"):
        os.chmod(p, 0o755) if os.path.exists(p) else None
    d = start(tmp_path, pki, extra={"daemon": {
        "drop_privileges": True, "user_name": "nobody",
        "group_name": "nogroup"}})
    try:
        status = open(f"/proc/{d.proc.pid}/status").read()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        assert set(map(int, uids)) == {nobody.pw_uid}
        sock = controlSocket(tmp_path)
        assert os.stat(sock).st_uid == nobody.pw_uid
        # Still serving after the drop.
        assert controlRequest(sock, "PUT", "/tickets/t",
                              dict(VDSM_TICKET, uuid="t"))[0] == 200
    finally:
        d.stop()
    assert "Traceback" not in d.output()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_drop_privileges_missing_user(tmp_path, pki):
    with pytest.raises(RuntimeError) as e:
        start(tmp_path, pki, extra={"daemon": {
            "drop_privileges": True, "user_name": "no-such-user-here"}})
    assert "no user 'no-such-user-here'" in str(e.value)


def test_log_file_from_ini(tmp_path, pki):
    log = tmp_path / "log" / "daemon.log"
    d = start(tmp_path, pki, extra={
        "handlers": {"keys": "logfile"},
        "logger_root": {"handlers": "logfile", "level": "INFO"},
        "handler_logfile": {
            "class": "logging.handlers.RotatingFileHandler",
            "args": f'("{log}",)'},
    })
    try:
        assert "imageio ready" in log.read_text()
    finally:
        d.stop()


# imageioctl.

def ctl(conf, *args):
    return subprocess.run([os.path.join(BIN, "imageioctl"), "-c", conf,
                           *args], capture_output=True, timeout=60)


@pytest.mark.parametrize("control", ["unix", "tcp"])
def test_imageioctl(tmp_path, pki, control):
    d = start(tmp_path, pki, control=control)
    conf = str(tmp_path / "conf")
    try:
        path = tmp_path / "t.json"
        path.write_text(json.dumps(ENGINE_TICKET))
        tid = ENGINE_TICKET["uuid"]
        assert ctl(conf, "add-ticket", str(path)).returncode == 0
        out = ctl(conf, "show-ticket", tid)
        assert out.returncode == 0
        assert json.loads(out.stdout)["uuid"] == tid
        assert ctl(conf, "mod-ticket", tid, "--timeout", "900"
                   ).returncode == 0
        assert ctl(conf, "del-ticket", tid).returncode == 0
        out = ctl(conf, "show-ticket", tid)
        assert out.returncode == 1
        assert out.stderr.decode().startswith("imageioctl: ")
        assert "404" in out.stderr.decode()
    finally:
        d.stop()


def test_imageioctl_no_command(tmp_path):
    out = ctl(str(tmp_path), )
    assert out.returncode == 0
    assert b"add-ticket" in out.stdout


def test_imageioctl_daemon_down(tmp_path):
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path)))
    out = ctl(conf, "show-ticket", "x")
    assert out.returncode == 1
    assert b"imageioctl: cannot reach the control service" in out.stderr


# Installation.

@pytest.mark.slow
def test_pip_install_into_new_venv(tmp_path, pki):
    """
    `pip install .` into a new virtualenv gives a working twistd plugin.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                   timeout=120)
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".refvenv", ".git", "dev", "build", "*.egg-info",
        "__pycache__", "dropin.cache", ".pytest_cache", ".hypothesis"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)],
                   check=True, timeout=600, capture_output=True)
    d = start(tmp_path, pki, twistd=str(venv / "bin" / "twistd"))
    try:
        con = httpsConnection(d.remotePort, pki.ca)
        status, _, body = request(con, "GET", "/info/")
        assert status == 200
        assert json.loads(body) == {"version": __version__}
    finally:
        d.stop()


def test_port_in_use_fails_clearly(tmp_path, pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError) as e:
            start(tmp_path, pki, extra={"remote": {"port": port}})
    out = str(e.value)
    assert "imageio: cannot listen for the remote service" in out
    assert "Address already in use" in out
    assert "Traceback" not in out


def test_sighup_reloads_certificate(tmp_path, pki):
    """
    After the key and certificate files are replaced and the daemon gets
    SIGHUP, new TLS connections see the new certificate while a running
    download completes (SPEC A3).
    """
    import ssl
    import time
    files = makePKI(str(tmp_path / "live"))
    other = makePKI(str(tmp_path / "other"), caName="another test CA")
    image = tmp_path / "image.raw"
    size = 96 << 20
    with open(image, "wb") as f:
        f.truncate(size)
    conf = str(tmp_path / "conf")
    sections = daemonConf(str(tmp_path), files)
    writeConf(conf, sections)
    d = Daemon(conf)
    try:
        sock = controlSocket(tmp_path)
        controlRequest(sock, "PUT", "/tickets/t", {
            "uuid": "t", "size": size, "ops": ["read"], "timeout": 300,
            "url": f"file://{image}"})
        url = f"https://127.0.0.1:{d.remotePort}/images/t"
        # About 3 s at this rate: still running when the reload happens.
        download = subprocess.Popen(
            ["curl", "-sS", "--fail-with-body", "--cacert", files.ca,
             "--limit-rate", "32M", "-o", str(tmp_path / "out"), url],
            stderr=subprocess.PIPE)
        out = tmp_path / "out"
        deadline = time.monotonic() + 20
        while not (out.exists() and out.stat().st_size > 0):
            assert time.monotonic() < deadline
            assert download.poll() is None, download.stderr.read()
            time.sleep(0.02)
        for name in ("cert", "key"):
            shutil.copy(getattr(other, name), getattr(files, name))
        d.proc.send_signal(1)
        deadline = time.monotonic() + 20
        while "TLS key and certificate reloaded" not in d.output():
            assert time.monotonic() < deadline, d.output()
            assert d.proc.poll() is None
            time.sleep(0.05)
        assert download.poll() is None, "download ended before the reload"
        # New connections: the new certificate, and only it.
        con = httpsConnection(d.remotePort, other.ca)
        assert request(con, "GET", "/info/")[0] == 200
        con.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            con = httpsConnection(d.remotePort, files.ca)
            request(con, "GET", "/info/")
        # The download that started before completes.
        assert download.wait(60) == 0, download.stderr.read()
        assert os.path.getsize(tmp_path / "out") == size
    finally:
        d.stop()


def test_sighup_with_broken_files_keeps_old_certificate(tmp_path, pki):
    import time
    files = makePKI(str(tmp_path / "live"))
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), files))
    d = Daemon(conf)
    try:
        with open(files.cert, "w") as f:
            f.write("not a certificate\n")
        d.proc.send_signal(1)
        deadline = time.monotonic() + 20
        while "TLS reload failed" not in d.output():
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.05)
        con = httpsConnection(d.remotePort, files.ca)
        assert request(con, "GET", "/info/")[0] == 200
        con.close()
    finally:
        d.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_fifo_key_does_not_hang(tmp_path, pki, workers):
    """
    A key_file replaced by a FIFO blocks whoever opens it. The reload reads
    it off the reactor thread: the control API and TLS keep answering, and
    once the FIFO gives the key the reload completes.
    """
    import time
    files = makePKI(str(tmp_path / "live"))
    conf = str(tmp_path / "conf")
    writeConf(conf, daemonConf(str(tmp_path), files,
                               extra={"daemon": {"workers": workers}}))
    d = Daemon(conf)
    key = open(files.key, "rb").read()
    try:
        # Workers read the files when they start: wait until they did.
        deadline = time.monotonic() + 20
        while workers > 1 and d.output().count(" serving") < workers:
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.05)
        os.unlink(files.key)
        os.mkfifo(files.key)
        d.proc.send_signal(1)
        sock = controlSocket(tmp_path)
        started = time.monotonic()
        for _ in range(3):
            status, _, _ = controlRequest(sock, "GET", "/tickets/nosuch")
            assert status == 404
            con = httpsConnection(d.remotePort, files.ca, timeout=5)
            assert request(con, "GET", "/info/")[0] == 200
            con.close()
        assert time.monotonic() - started < 5
        assert d.proc.poll() is None
        # Feed the key to the readers (one per process serving TLS) until
        # each reload ended (two readers of one FIFO may share a write, so
        # one of them may read a broken key: a failed reload, logged).
        def ended():
            out = d.output()
            return (out.count("TLS key and certificate reloaded")
                    + out.count("TLS reload failed"))
        deadline = time.monotonic() + 20
        while ended() < workers:
            assert time.monotonic() < deadline, d.output()
            try:
                fd = os.open(files.key, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                # No reader yet.
                time.sleep(0.05)
                continue
            try:
                os.write(fd, key)
            finally:
                os.close(fd)
            time.sleep(0.05)
        con = httpsConnection(d.remotePort, files.ca, timeout=5)
        assert request(con, "GET", "/info/")[0] == 200
        con.close()
    finally:
        assert d.stop() == 0, d.output()


@pytest.mark.parametrize("abstract", [False, True])
def test_systemd_ready_notification(tmp_path, pki, abstract):
    """
    With systemd_enable, the daemon sends READY=1 to $NOTIFY_SOCKET once
    every listener is bound (Type=notify in contrib/imageio.service).
    """
    if abstract:
        address = f"\0/tximageio/test/notify/{os.getpid()}/{id(tmp_path)}"
        env = "@" + address[1:]
    else:
        address = env = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(address)
        s.settimeout(30)
        d = start(tmp_path, pki,
                  extra={"daemon": {"systemd_enable": True}},
                  env={"NOTIFY_SOCKET": env})
        try:
            assert s.recv(4096) == b"READY=1"
            # By then the services answer.
            con = httpsConnection(d.remotePort, pki.ca)
            assert request(con, "GET", "/info/")[0] == 200
            con.close()
        finally:
            d.stop()


def test_log_level_applies_to_stdout(tmp_path, pki):
    """
    [logger_root] level = WARNING: no per-request lines reach twistd's
    stdout observer (it has no filter of its own), while the lifecycle
    lines (listening on, ready) still do.
    """
    d = start(tmp_path, pki, extra={"logger_root": {"level": "WARNING"}})
    try:
        con = httpsConnection(d.remotePort, pki.ca)
        for _ in range(3):
            assert request(con, "GET", "/info/")[0] == 200
            assert request(con, "GET", "/images/nope")[0] == 403
        con.close()
        sock = controlSocket(tmp_path)
        assert controlRequest(sock, "PUT", "/tickets/t",
                              dict(VDSM_TICKET, uuid="t"))[0] == 200
    finally:
        d.stop()
    out = d.output()
    assert "imageio ready" in out
    assert "remote service listening on" in out
    assert "/info/" not in out
    assert "/images/nope" not in out
    assert "Ticket t added" not in out


def test_fifo_tickets_do_not_stall(tmp_path, pki):
    """
    Twenty tickets on FIFOs (which block whoever opens or reads them) are
    answered at once with an error, never holding the I/O threads: a
    regular ticket is still served, and SIGTERM stops the daemon within
    10 s with status 0.
    """
    import time

    from imageio.units import MiB
    d = start(tmp_path, pki)
    try:
        sock = controlSocket(tmp_path)
        for i in range(20):
            fifo = tmp_path / f"fifo{i}"
            os.mkfifo(fifo)
            for op in ("read", "write"):
                t = f"f{op}{i}"
                assert controlRequest(sock, "PUT", f"/tickets/{t}", {
                    "uuid": t, "size": MiB, "ops": [op], "timeout": 300,
                    "url": f"file://{fifo}"})[0] == 200
        image = tmp_path / "image.raw"
        image.write_bytes(b"x" * MiB)
        assert controlRequest(sock, "PUT", "/tickets/ok", {
            "uuid": "ok", "size": MiB, "ops": ["read"], "timeout": 300,
            "url": f"file://{image}"})[0] == 200
        started = time.monotonic()
        for i in range(20):
            for op in ("read", "write"):
                con = httpsConnection(d.remotePort, pki.ca, timeout=5)
                try:
                    if op == "read":
                        status, _, body = request(con, "GET",
                                                  f"/images/f{op}{i}")
                    else:
                        status, _, body = request(con, "PUT",
                                                  f"/images/f{op}{i}",
                                                  b"y" * 4096)
                finally:
                    con.close()
                assert status == 500, body
                assert body == (b"Server failed to perform the request, "
                                b"check logs\n")
        con = httpsConnection(d.remotePort, pki.ca, timeout=5)
        status, _, body = request(con, "GET", "/images/ok")
        con.close()
        assert status == 200 and body == b"x" * MiB
        assert time.monotonic() - started < 20
        assert "Not a regular file or block device" in d.output()
    finally:
        stopping = time.monotonic()
        status = d.stop(15, timeout=30)
        assert time.monotonic() - stopping < 10
    assert status == 0, d.output()


def test_io_pool_stop_is_bounded():
    # A thread blocked for good in storage does not hold the stop.
    import threading
    import time

    from twisted.internet.task import Clock

    from imageio.iopool import IOThreadPool, ThreadPoolService
    clock = Clock()

    class Reactor:
        callLater = clock.callLater

        @staticmethod
        def callFromThread(f, *args):
            calls.append((f, args))

    calls = []
    pool = IOThreadPool(minthreads=0, maxthreads=2, name="test-io")
    svc = ThreadPoolService(pool, Reactor(), timeout=5)
    svc.startService()
    release = threading.Event()
    pool.callInThread(release.wait)
    d = svc.stopService()
    assert not d.called
    clock.advance(5)
    assert d.called
    # The blocked thread is a daemon thread: it cannot delay the exit.
    assert all(t.daemon for t in pool.threads)
    release.set()
    deadline = time.monotonic() + 10
    while not calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
