"""
The least work a client of the imageio API can do for a transfer: the
"ideal client" ceiling of the client matrix (bench/client_bench.py).

    python bench/_idealclient.py upload|download URL CAFILE EXTENTS_JSON

It sends the requests a real client sends (one C{PUT} per data extent of
at most 128 MiB with C{?flush=n}, one C{PATCH} zero per zero extent, a
flush per connection at the end; or one C{GET} per data extent), on as
many TLS connections as the server offers (at most 8), from threads with
blocking sockets (OpenSSL encrypting outside the GIL), but never touches
a local image: an upload sends the same 4 MiB of random bytes over and
over, a download reads into one buffer and drops it. So it does strictly
less than any client that reads or writes an image, and its time is a
ceiling for the row's daemon on this host.

EXTENTS_JSON: the image's extents as C{qemu-img map --output=json}
gives them (for an upload, the local image; for a download, the same as
the ticket's source). Prints the seconds from the first connection to
the last answer.
"""

import http.client
import json
import os
import ssl
import sys
import threading
import time
from urllib.parse import urlsplit

MiB = 1 << 20
COPY = 128 * MiB
CHUNK = 4 * MiB
WORKERS = 8


def plan(extents, upload):
    for e in extents:
        start, length = e["start"], e["length"]
        if e.get("data") and not e.get("zero"):
            while length:
                n = min(COPY, length)
                yield "copy", start, n
                start += n
                length -= n
        elif upload:
            yield "zero", start, length


def main():
    op, url, cafile, extentsFile = sys.argv[1:5]
    upload = op == "upload"
    with open(extentsFile) as f:
        extents = json.load(f)
    u = urlsplit(url)
    context = ssl.create_default_context(cafile=cafile)
    start = time.monotonic()

    def connect():
        return http.client.HTTPSConnection(u.hostname, u.port,
                                           context=context)

    first = connect()
    first.request("OPTIONS", u.path)
    r = first.getresponse()
    options = json.loads(r.read() or b"{}")
    offer = options.get("max_writers" if upload else "max_readers", 1)
    workers = max(1, min(offer, WORKERS))
    requests = iter(list(plan(extents, upload)))
    lock = threading.Lock()
    payload = memoryview(os.urandom(CHUNK))
    errors = []

    def work(conn):
        buf = bytearray(CHUNK)
        try:
            while True:
                with lock:
                    item = next(requests, None)
                if item is None:
                    break
                kind, offset, length = item
                if kind == "copy" and upload:
                    conn.putrequest("PUT", u.path + "?flush=n")
                    conn.putheader("Content-Length", str(length))
                    conn.putheader("Content-Range", f"bytes {offset}-"
                                   f"{offset + length - 1}/*")
                    conn.endheaders()
                    left = length
                    while left:
                        n = min(CHUNK, left)
                        conn.send(payload[:n])
                        left -= n
                elif kind == "copy":
                    conn.request("GET", u.path, headers={
                        "Range": f"bytes={offset}-{offset + length - 1}"})
                else:
                    body = json.dumps({"op": "zero", "offset": offset,
                                       "size": length, "flush": False})
                    conn.request("PATCH", u.path, body=body, headers={
                        "Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status not in (200, 206):
                    raise RuntimeError(f"{kind} {offset}: {resp.status} "
                                       f"{resp.read()[:200]!r}")
                if kind == "copy" and not upload:
                    while resp.readinto(buf):
                        pass
                else:
                    resp.read()
            if upload:
                conn.request("PATCH", u.path,
                             body=json.dumps({"op": "flush"}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"flush: {resp.status}")
        except Exception as e:
            errors.append(e)
        finally:
            conn.close()

    conns = [first] + [connect() for _ in range(workers - 1)]
    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(time.monotonic() - start)


if __name__ == "__main__":
    main()
