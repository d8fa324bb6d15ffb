# -*- test-case-name: test.test_client_cli -*-
"""
The C{imageio} command: upload, download and inspect disk images.

  imageio upload FILE URL
  imageio download URL FILE [-f raw|qcow2] [--incremental]
  imageio info FILE
  imageio measure FILE -f FMT
  imageio checksum FILE|URL
  imageio extents FILE|URL

Common options: C{--cafile}, C{--insecure}, C{--buffer-size} (size
suffixes k, m, g), C{--max-workers}, C{--proxy-url}, C{--output
text|json}, C{--verify}. A progress bar is drawn on a terminal; with
C{--output json} progress is printed as JSON lines. Errors are one line on
stderr. Exit status: 0 on success, 1 on error, 128+N when killed by signal
N (SIGINT, SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from twisted.internet import defer

from imageio.client import aio
from imageio.client._progress import ProgressBar
from imageio.units import GiB, KiB, MiB, TiB

__all__ = ["main", "parse_size"]

PROG = "imageio"

_SUFFIXES = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


def parse_size(text: str) -> int:
    """
    C{"4m"} -> 4194304; suffixes k, m, g, t (binary units, any case,
    optional C{"ib"}).
    """
    s = text.strip().lower()
    if s.endswith("ib"):
        s = s[:-2]
    unit = s[-1:] if s[-1:].isalpha() else ""
    number = s[:-1] if unit else s
    if unit not in _SUFFIXES or not number.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    return int(number) * _SUFFIXES[unit]


def _buffer_size(text: str) -> int:
    n = parse_size(text)
    if not 4 * KiB <= n <= 32 * MiB:
        raise argparse.ArgumentTypeError(
            f"buffer size must be between 4k and 32m: {text!r}")
    return n


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 16:
        raise argparse.ArgumentTypeError(
            f"max workers must be between 1 and 16: {text!r}")
    return n


def _is_url(text: str) -> bool:
    return text.startswith(("https://", "http://"))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", "-o", choices=("text", "json"),
                        default="text",
                        help="output format (default text)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--cafile", "-c",
                        help="CA certificates (PEM) to verify the server")
    remote.add_argument("--insecure", action="store_true",
                        help="do not verify the server certificate")
    remote.add_argument("--proxy-url",
                        help="url to use when URL cannot be reached")
    transfer = argparse.ArgumentParser(add_help=False)
    transfer.add_argument("--buffer-size", "-b", type=_buffer_size,
                          default=aio.BUFFER_SIZE,
                          help="bytes per chunk, suffixes k, m, g "
                               "(default 4m)")
    transfer.add_argument("--max-workers", "-w", type=_workers,
                          default=None,
                          help="connections to use (default: as many as "
                               "the server offers, at most "
                               f"{aio.WORKERS_LIMIT})")
    transfer.add_argument("--verify", action="store_true",
                          help="compare the server's checksum with the "
                               "local image's after the transfer")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Transfer disk images to and from an "
                               "imageio server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("upload", parents=[common, remote, transfer],
                       help="upload a local image to a transfer url")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("url", metavar="URL")
    p.add_argument("--member", help="image member of an OVA file")
    p.add_argument("--no-backing-chain", dest="backing_chain",
                   action="store_false",
                   help="upload only the top layer of a qcow2 image")
    p.add_argument("--disk-is-zero", action="store_true",
                   help="the target reads as zeroes: skip zero extents")

    p = sub.add_parser("download", parents=[common, remote, transfer],
                       help="download a transfer url to a new local image")
    p.add_argument("url", metavar="URL")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("--format", "-f", dest="fmt", choices=("raw", "qcow2"),
                   default="qcow2", help="image format (default qcow2)")
    p.add_argument("--incremental", action="store_true",
                   help="download only dirty extents (needs qcow2)")
    p.add_argument("--backing-file", help="backing file of the new image")
    p.add_argument("--backing-format", help="format of the backing file")

    p = sub.add_parser("info", parents=[common], help="image information")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("--member", help="image member of an OVA file")

    p = sub.add_parser("measure", parents=[common],
                       help="size needed to convert an image")
    p.add_argument("filename", metavar="FILE")
    p.add_argument("--format", "-f", dest="fmt", required=True,
                   help="target format")
    p.add_argument("--member", help="image member of an OVA file")

    p = sub.add_parser("checksum", parents=[common, remote],
                       help="blkhash checksum of a local image or url")
    p.add_argument("target", metavar="FILE|URL")
    p.add_argument("--member", help="image member of an OVA file")
    p.add_argument("--algorithm", "-a", default="blake2b")
    p.add_argument("--block-size", type=parse_size, default=4 * MiB)

    p = sub.add_parser("extents", parents=[common, remote],
                       help="extents of a local image or url")
    p.add_argument("target", metavar="FILE|URL")
    p.add_argument("--member", help="image member of an OVA file")
    p.add_argument("--bitmap", help="report dirty extents of this bitmap "
                                    "(local image)")
    p.add_argument("--context", choices=("zero", "dirty"), default="zero",
                   help="extents context (url)")
    return parser


class _Output:
    def __init__(self, fmt, stream):
        self.format = fmt
        self.stream = stream

    def result(self, value):
        if self.format == "json":
            self.stream.write(json.dumps(value) + "\n")
        else:
            self.stream.write(json.dumps(value, indent=2) + "\n")
        self.stream.flush()

    def progress(self, phase):
        if self.format == "json":
            return ProgressBar(phase=phase, output=self.stream,
                               format="json")
        if self.stream.isatty():
            return ProgressBar(phase=phase, output=self.stream)
        return None


async def _verify(reactor, args, url, filename, out):
    local = await aio.checksum(filename, reactor=reactor)
    remote = await aio.remote_checksum(url, args.cafile, not args.insecure,
                                       reactor=reactor)
    if local["checksum"] != remote["checksum"]:
        raise aio.TransferError(
            f"Checksum mismatch: local {local['checksum']}, server "
            f"{remote['checksum']}")
    if out.format == "json":
        out.result({"verified": True, "checksum": local["checksum"]})


async def _transfer(reactor, args, out):
    upload = args.command == "upload"
    if args.verify and not upload and args.incremental:
        raise aio.TransferError("--verify cannot check an incremental "
                                "download")
    bar = out.progress("uploading image" if upload
                       else "downloading image")
    try:
        if upload:
            await aio.upload(
                args.filename, args.url, args.cafile,
                buffer_size=args.buffer_size, secure=not args.insecure,
                progress=bar, proxy_url=args.proxy_url,
                max_workers=args.max_workers, member=args.member,
                backing_chain=args.backing_chain,
                disk_is_zero=args.disk_is_zero, reactor=reactor)
        else:
            await aio.download(
                args.url, args.filename, args.cafile, fmt=args.fmt,
                incremental=args.incremental, buffer_size=args.buffer_size,
                secure=not args.insecure, progress=bar,
                proxy_url=args.proxy_url, max_workers=args.max_workers,
                backing_file=args.backing_file,
                backing_format=args.backing_format, reactor=reactor)
        if args.verify:
            if bar is not None:
                bar.phase = "verifying checksum"
            await _verify(reactor, args, args.url, args.filename, out)
        if bar is not None:
            bar.phase = ("upload completed" if upload
                         else "download completed")
    except BaseException:
        if bar is not None:
            bar.phase = "command failed"
        raise
    finally:
        if bar is not None:
            bar.close()


async def _run(reactor, args, out):
    cmd = args.command
    if cmd in ("upload", "download"):
        await _transfer(reactor, args, out)
    elif cmd == "info":
        out.result(await aio.info(args.filename, member=args.member,
                                  reactor=reactor))
    elif cmd == "measure":
        out.result(await aio.measure(args.filename, args.fmt,
                                     member=args.member, reactor=reactor))
    elif cmd == "checksum":
        if _is_url(args.target):
            result = await aio.remote_checksum(
                args.target, args.cafile, not args.insecure,
                algorithm=args.algorithm, block_size=args.block_size,
                reactor=reactor)
        else:
            result = await aio.checksum(
                args.target, member=args.member, block_size=args.block_size,
                algorithm=args.algorithm, reactor=reactor)
        out.result(result)
    elif cmd == "extents":
        if _is_url(args.target):
            client = await aio.ImageioClient.open(
                args.target, args.cafile, not args.insecure,
                proxy_url=args.proxy_url, reactor=reactor)
            try:
                result = await client.extents(args.context)
            finally:
                await client.close()
        else:
            result = await aio.extents(args.target, member=args.member,
                                       bitmap=args.bitmap, reactor=reactor)
        out.result([e.toDict() for e in result])


def _message(failure) -> str:
    """
    The one line printed for a failed command: the client's error as it
    reads (it names what failed and why), never an exception's class name.
    """
    from imageio.client._errors import ClientError, translate
    exc = failure.value
    if not isinstance(exc, (ClientError, ValueError)):
        exc = translate(exc, f"{PROG} command")
    text = " ".join(str(exc).split())
    return text or "the command failed (IMAGEIO_DEBUG=1 shows details)"


def main(argv=None) -> int:
    """
    Entry point of the C{imageio} console script.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0

    from twisted.internet import reactor
    out = _Output(args.output, sys.stdout)
    state: dict = {"signal": None, "failure": None}

    def interrupted(signo, frame):
        if state["signal"] is None:
            state["signal"] = signo
            reactor.callFromThread(cancel)

    def cancel():
        d = state.get("deferred")
        if d is not None and not d.called:
            d.cancel()

    def start():
        for signo in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signo, interrupted)
        d = defer.ensureDeferred(_run(reactor, args, out))
        state["deferred"] = d

        def failed(failure):
            state["failure"] = failure
            reactor.stop()

        d.addCallbacks(lambda _: reactor.stop(), failed)

    reactor.callWhenRunning(start)
    reactor.run()

    if state["signal"] is not None:
        name = signal.Signals(state["signal"]).name
        sys.stderr.write(f"{PROG}: interrupted by {name}\n")
        return 128 + state["signal"]
    failure = state["failure"]
    if failure is not None:
        if os.environ.get("IMAGEIO_DEBUG"):
            failure.printTraceback(file=sys.stderr)
        sys.stderr.write(f"{PROG}: error: {_message(failure)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
