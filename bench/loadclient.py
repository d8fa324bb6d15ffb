"""
One client connection of the many-connection scenarios of bench/run.py,
run as its own process (so that eight of them are not held by one GIL):

  loadclient.py reads PORT CAFILE TICKET IMAGE_SIZE SIZES SECONDS SEED
  loadclient.py v2v PORT CAFILE TICKET IMAGE_SIZE SECONDS SEED

C{reads}: random Range GETs of the sizes in C{SIZES} (comma separated
bytes) on one keep-alive TLS connection. C{v2v}: the request shapes of
virt-v2v's upload plugin on one keep-alive TLS connection: C{PUT
?flush=n} with C{Content-Range} of 64 KiB to 2 MiB, C{PATCH} zero of 1 to
32 MiB without flush, and a C{PATCH} flush every 64 requests.

Waits for a line on stdin before it starts (so that every process starts
together), then prints one JSON line: requests and bytes.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import sys
import time

from _harness import readHead

KiB = 1024
MiB = 1024 * KiB


class Connection:
    def __init__(self, port, cafile):
        raw = socket.create_connection(("127.0.0.1", port))
        ctx = ssl.create_default_context(cafile=cafile)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb", buffering=1 << 20)

    def request(self, head, body=b""):
        self.sock.sendall(head)
        if body:
            self.sock.sendall(body)
        f = self.file
        status, length = readHead(f)
        data = f.read(length)
        code = int(status.split()[1])
        if code >= 300:
            raise RuntimeError(f"{status!r} {data[:200]!r}")
        return data


def reads(conn, tid, size, sizes, deadline, rnd):
    count = moved = 0
    head = (f"GET /images/{tid} HTTP/1.1\r\nHost: localhost\r\n"
            "Range: bytes=%d-%d\r\n\r\n")
    while time.monotonic() < deadline:
        n = rnd.choice(sizes)
        offset = rnd.randrange(0, (size - n) // 4096) * 4096
        data = conn.request((head % (offset, offset + n - 1)).encode())
        if len(data) != n:
            raise RuntimeError("short read")
        count += 1
        moved += n
    return count, moved


def v2v(conn, tid, size, deadline, rnd):
    count = moved = 0
    payload = os.urandom(2 * MiB)
    while time.monotonic() < deadline:
        count += 1
        if count % 64 == 0:
            body = json.dumps({"op": "flush"}).encode()
            conn.request(
                f"PATCH /images/{tid} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode(), body)
        elif rnd.random() < 0.25:
            n = rnd.randrange(1, 33) * MiB
            offset = rnd.randrange(0, (size - n) // MiB) * MiB
            body = json.dumps({"op": "zero", "offset": offset, "size": n,
                               "flush": False}).encode()
            conn.request(
                f"PATCH /images/{tid} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode(), body)
            moved += n
        else:
            n = rnd.choice((64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB, 2 * MiB))
            offset = rnd.randrange(0, (size - n) // (64 * KiB)) * 64 * KiB
            conn.request(
                f"PUT /images/{tid}?flush=n HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Range: bytes {offset}-{offset + n - 1}/*\r\n"
                f"Content-Length: {n}\r\n\r\n".encode(), payload[:n])
            moved += n
    return count, moved


def main():
    mode = sys.argv[1]
    port, cafile, tid = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    size = int(sys.argv[5])
    conn = Connection(port, cafile)
    sys.stdin.readline()
    if mode == "reads":
        sizes = [int(x) for x in sys.argv[6].split(",")]
        seconds, seed = float(sys.argv[7]), int(sys.argv[8])
        rnd = random.Random(seed)
        count, moved = reads(conn, tid, size, sizes,
                             time.monotonic() + seconds, rnd)
    else:
        seconds, seed = float(sys.argv[6]), int(sys.argv[7])
        rnd = random.Random(seed)
        count, moved = v2v(conn, tid, size, time.monotonic() + seconds, rnd)
    print(json.dumps({"requests": count, "bytes": moved}))


if __name__ == "__main__":
    main()
