"""
One client process of the TLS stress test (test/test_tls_stress.py).

    python -m test.stressclient PORT CA IMAGE TICKET COUNT SEED
        [--upload TICKET2 PATH2 OFFSET LENGTH]

Runs COUNT keep-alive Range GETs of 1 byte to 24 MiB on TICKET, with a raw
HTTP/1.1 client over Python's ssl (so that requests can be pipelined and
connections cut exactly where the test wants): a quarter of the bodies are
cut in the middle by a close or a TCP reset, and a third of the next
requests are sent while the current body still streams. Every byte read is
compared with IMAGE, a local copy of the ticket's data. With --upload it
also PUTs random pieces into its own region of TICKET2 (keeping a model),
and at the end compares the file PATH2 with the model.

Prints one JSON line: counts and the list of errors (empty when all went
well). Bounded: every socket has a timeout, every loop a count.
"""

from __future__ import annotations

import json
import math
import mmap
import random
import socket
import ssl
import struct
import sys
import time

MiB = 1024 * 1024
MAX_RANGE = 24 * MiB
TIMEOUT = 60


class Connection:
    """
    A TLS connection with a receive buffer, speaking just enough HTTP/1.1.
    """

    def __init__(self, port: int, ctx: ssl.SSLContext):
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 * MiB)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buf += chunk

    def head(self):
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > 65536:
                raise ValueError("response head too large")
            self._fill()
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[:end + 4]
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def body(self, length: int, expected=None) -> int:
        """
        Read C{length} body bytes, comparing them with C{expected} (a
        buffer of that length) as they come.

        @return: the number of mismatching chunks (0 when all is well).
        """
        done = 0
        bad = 0
        while done < length:
            if not self.buf:
                self._fill()
            n = min(len(self.buf), length - done)
            if expected is not None and \
                    self.buf[:n] != expected[done:done + n]:
                bad += 1
            del self.buf[:n]
            done += n
        return bad

    def close(self, reset: bool = False) -> None:
        if reset:
            # A TCP reset instead of a close: SO_LINGER with no time.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        self.sock.close()


def pickRange(rng: random.Random, size: int):
    if rng.random() < 0.3:
        # Large enough for the writer thread.
        length = rng.randint(4 * MiB, MAX_RANGE)
    else:
        # Log-uniform from 1 byte to 24 MiB.
        length = int(math.exp(rng.uniform(0, math.log(MAX_RANGE))))
    length = max(1, min(length, size))
    start = rng.randint(0, size - length)
    return start, length


def getRequest(ticket: str, start: int, length: int) -> bytes:
    return (f"GET /images/{ticket} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Range: bytes={start}-{start + length - 1}\r\n\r\n").encode()


def main(argv):
    port, ca, imagePath, ticket, count, seed = argv[:6]
    port, count, seed = int(port), int(count), int(seed)
    upload = None
    if len(argv) > 6:
        assert argv[6] == "--upload"
        upload = (argv[7], argv[8], int(argv[9]), int(argv[10]))
    rng = random.Random(seed)
    ctx = ssl.create_default_context(cafile=ca)
    with open(imagePath, "rb") as f:
        image = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    size = len(image)
    stats = {"gets": 0, "cut": 0, "reset": 0, "pipelined": 0, "puts": 0,
             "bytes": 0, "errors": []}
    model = None
    if upload is not None:
        model = bytearray(upload[3])
    con = None
    pending = None  # a request already sent on con: (start, length)
    started = time.monotonic()
    for i in range(count):
        try:
            if con is None:
                con = Connection(port, ctx)
                pending = None
            if pending is None:
                start, length = pickRange(rng, size)
                con.send(getRequest(ticket, start, length))
            else:
                start, length = pending
                pending = None
            stats["gets"] += 1
            status, headers = con.head()
            if status != 206 or int(headers["content-length"]) != length:
                stats["errors"].append(
                    f"GET {start}+{length}: {status} {headers}")
                con.close()
                con = None
                continue
            expected = memoryview(image)[start:start + length]
            roll = rng.random()
            if roll < 0.25 and length > 1:
                # Cut in the middle of the body.
                part = rng.randint(0, length - 1)
                if con.body(part, expected[:part]):
                    stats["errors"].append(f"mismatch in {start}+{part}")
                reset = rng.random() < 0.5
                stats["reset" if reset else "cut"] += 1
                stats["bytes"] += part
                con.close(reset=reset)
                con = None
                continue
            if roll < 0.25 + 0.33 and i + 1 < count:
                # The next request goes out while this body streams.
                part = rng.randint(0, length)
                bad = con.body(part, expected[:part])
                nextRange = pickRange(rng, size)
                con.send(getRequest(ticket, *nextRange))
                pending = nextRange
                stats["pipelined"] += 1
                bad += con.body(length - part, expected[part:])
            else:
                bad = con.body(length, expected)
            stats["bytes"] += length
            if bad:
                stats["errors"].append(f"mismatch in {start}+{length}")
            if upload is not None and rng.random() < 0.1:
                stats["puts"] += 1
                if pending is not None:
                    # Finish the pipelined GET first.
                    start, length = pending
                    pending = None
                    status, headers = con.head()
                    expected = memoryview(image)[start:start + length]
                    if status != 206 or con.body(
                            int(headers["content-length"]), expected):
                        stats["errors"].append(
                            f"pipelined GET {start}+{length} failed")
                ticket2, _, regionStart, regionLength = upload
                n = rng.choice([rng.randint(1, 64 * 1024),
                                rng.randint(4 * MiB, 8 * MiB)])
                n = min(n, regionLength)
                off = rng.randint(0, regionLength - n)
                data = rng.randbytes(n)
                con.send((f"PUT /images/{ticket2}?flush=n HTTP/1.1\r\n"
                          f"Host: 127.0.0.1\r\nContent-Length: {n}\r\n"
                          f"Content-Range: bytes {regionStart + off}-"
                          f"{regionStart + off + n - 1}/*\r\n\r\n").encode()
                         + data)
                status, headers = con.head()
                con.body(int(headers.get("content-length", 0)))
                if status != 200:
                    stats["errors"].append(f"PUT {off}+{n}: {status}")
                else:
                    model[off:off + n] = data
        except (OSError, EOFError, ValueError, KeyError) as e:
            stats["errors"].append(f"request {i}: {e!r}")
            if con is not None:
                con.close()
            con = None
    if con is not None:
        if pending is not None:
            try:
                start, length = pending
                status, headers = con.head()
                con.body(length, memoryview(image)[start:start + length])
            except (OSError, EOFError, ValueError) as e:
                stats["errors"].append(f"last pipelined GET: {e!r}")
        con.close()
    if upload is not None:
        _, path, regionStart, regionLength = upload
        with open(path, "rb") as f:
            f.seek(regionStart)
            if f.read(regionLength) != bytes(model):
                stats["errors"].append("uploaded region differs from model")
    stats["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
