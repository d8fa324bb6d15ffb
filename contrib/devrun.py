"""
`make run`: a development daemon in the foreground.

Makes (once) a development PKI, a sample image with data and holes, a
conf dir and a read-write ticket for the sample image under ./dev, prints
ready-to-paste curl commands, then runs `twistd -n imageio` until Ctrl-C.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from test.support import makePKI, writeConf  # noqa: E402

# Overridable so that the test suite can run this script as printed.
DEV = os.environ.get("IMAGEIO_DEV_DIR", os.path.join(REPO, "dev"))
PORT = int(os.environ.get("IMAGEIO_PORT", "54322"))
LOCAL = os.environ.get("IMAGEIO_LOCAL_SOCKET", "/org/tximageio/dev")
TICKET = "sample"
MiB = 1 << 20


def sampleImage(path, size=64 * MiB):
    """
    A raw image: 1 MiB of text every 8 MiB, holes in between.
    """
    if os.path.exists(path):
        return
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 8 * MiB):
            f.seek(off)
            line = f"tximageio sample image, block at offset {off}\n"
            f.write((line * (MiB // len(line) + 1))[:MiB].encode())


def main():
    os.makedirs(DEV, exist_ok=True)
    pkiDir = os.path.join(DEV, "pki")
    if not os.path.exists(os.path.join(pkiDir, "cert.pem")):
        makePKI(pkiDir)
    ca = os.path.join(pkiDir, "ca.pem")
    image = os.path.join(DEV, "sample.raw")
    sampleImage(image)
    run = os.path.join(DEV, "run")
    os.makedirs(run, exist_ok=True)
    control = os.path.join(run, "sock")
    conf = os.path.join(DEV, "conf")
    writeConf(conf, {
        "daemon": {"drop_privileges": False, "systemd_enable": False,
                   "run_dir": run},
        "tls": {"enable": True, "key_file": os.path.join(pkiDir, "key.pem"),
                "cert_file": os.path.join(pkiDir, "cert.pem"),
                "ca_file": ca},
        "remote": {"host": "::", "port": PORT},
        "local": {"enable": True, "socket": "@" + LOCAL},
        "control": {"transport": "unix", "socket": control},
        "logger_root": {"level": "INFO", "handlers": "stderr"},
        "handlers": {"keys": "stderr"},
    })
    ticket = os.path.join(DEV, "ticket.json")
    with open(ticket, "w") as f:
        json.dump({"uuid": TICKET, "size": os.path.getsize(image),
                   "url": "file://" + image, "ops": ["read", "write"],
                   "timeout": 86400, "inactivity_timeout": 3600,
                   "filename": "sample.raw", "sparse": True}, f)

    url = f"https://localhost:{PORT}"
    imageioctl = os.path.join(os.path.dirname(sys.executable), "imageioctl")
    print(f"""
tximageio development daemon
  conf dir : {conf}
  CA       : {ca}
  image    : {image}  (ticket "{TICKET}", read-write)

Try, in another shell:

  curl --cacert {ca} {url}/info/
  curl --cacert {ca} -X OPTIONS {url}/images/{TICKET}
  curl --cacert {ca} {url}/images/{TICKET}/extents
  curl --cacert {ca} {url}/images/{TICKET}/checksum
  curl --cacert {ca} -H 'Range: bytes=0-99' {url}/images/{TICKET}
  curl --cacert {ca} -o /tmp/sample.raw {url}/images/{TICKET}
  curl --cacert {ca} -X PUT -H 'Content-Range: bytes 0-4/*' --data-binary hello {url}/images/{TICKET}
  curl --cacert {ca} -X PATCH --data-binary '{{"op":"zero","offset":0,"size":1048576}}' {url}/images/{TICKET}
  curl --cacert {ca} -X PATCH --data-binary '{{"op":"flush"}}' {url}/images/{TICKET}
  curl --abstract-unix-socket {LOCAL} http://localhost/images/{TICKET}/extents
  curl --unix-socket {control} http://localhost/tickets/{TICKET}
  curl --unix-socket {control} -X PATCH --data-binary '{{"timeout":3600}}' http://localhost/tickets/{TICKET}
  {imageioctl} -c {conf} show-ticket {TICKET}
  curl --unix-socket {control} -X DELETE http://localhost/tickets/{TICKET}

Ctrl-C stops the daemon.
""", flush=True)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    os.execv(twistd, [twistd, "--pidfile=", "-n", "imageio",
                      "--conf-dir", conf, "--ticket", ticket])


if __name__ == "__main__":
    main()
