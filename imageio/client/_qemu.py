# -*- test-case-name: test.test_client -*-
"""
Private helpers running C{qemu-img} and a private C{qemu-nbd} for local
images, all through the reactor (C{spawnProcess}), so nothing here blocks
the reactor thread.

The client never opens a local image itself: C{qemu-nbd} understands every
format, follows backing chains and reports allocation, and the NBD client
(L{imageio.protocols.nbd}) talks to it with several requests in flight.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tarfile
import tempfile

from twisted.internet import defer, protocol, task
from twisted.internet.error import ProcessDone, ProcessTerminated

from imageio.client._errors import ImageError, QemuError
from imageio.logs import Logger

__all__ = ["QemuError", "info", "measure", "create", "QemuNBD", "start_nbd",
           "QEMU_IMG", "QEMU_NBD"]

_log = Logger()

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
"""
The C{qemu-img} program (environment C{QEMU_IMG} overrides).
"""

QEMU_NBD = os.environ.get("QEMU_NBD", "qemu-nbd")
"""
The C{qemu-nbd} program (environment C{QEMU_NBD} overrides).
"""

START_TIMEOUT = 10.0
"""
Seconds C{qemu-nbd} may take to create and listen on its socket.
"""

STOP_TIMEOUT = 10.0
"""
Seconds C{qemu-nbd} may take to exit after SIGTERM before it is killed.
"""

_POLL_FIRST = 0.002
_POLL_MAX = 0.05


def _program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise QemuError(f"{name} is not installed (not found in PATH)")
    return path


class _Collect(protocol.ProcessProtocol):
    """
    Collect stdout and stderr of a short-lived process.
    """

    def __init__(self):
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred[int] = defer.Deferred(self._kill)

    def connectionMade(self):
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        if self.done.called:
            return
        code = reason.value.exitCode if reason.check(ProcessTerminated) \
            else 0
        if reason.check(ProcessTerminated) and code is None:
            code = 128 + (reason.value.signal or 0)
        self.done.callback(code)

    def _kill(self, d):
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass


async def _run(reactor, args: list[str]) -> bytes:
    """
    Run C{args}; return its stdout, or raise L{QemuError} with its stderr.
    """
    exe = _program(args[0])
    proc = _Collect()
    reactor.spawnProcess(proc, exe, [args[0], *args[1:]], env=os.environ)
    code = await proc.done
    if code != 0:
        err = b"".join(proc.err).decode("utf-8", "replace").strip()
        raise QemuError(err or f"{args[0]} {args[1]} failed with exit "
                               f"code {code}")
    return b"".join(proc.out)


def _find_member(filename: str, member: str) -> tuple[int, int]:
    """
    @return: C{(offset, size)} of C{member}'s data inside the tar file
        C{filename} (an OVA).
    """
    try:
        with tarfile.open(filename) as tar:
            m = tar.getmember(member)
            return m.offset_data, m.size
    except KeyError:
        raise ImageError(f"No member {member!r} in {filename!r}",
                         filename=filename) from None
    except OSError as e:
        raise ImageError(f"Cannot read {filename!r}: {e.strerror or e}",
                         filename=filename, errno=e.errno) from e
    except tarfile.TarError as e:
        raise ImageError(f"Cannot read {filename!r}: {e}",
                         filename=filename) from e


def _member_uri(filename: str, offset: int, size: int) -> str:
    # Only the raw window is described; the format on top is probed.
    node = {"file": {"driver": "raw", "offset": offset, "size": size,
                     "file": {"driver": "file", "filename": filename}}}
    return "json:" + json.dumps(node)


async def info(reactor, filename: str, member: str | None = None) -> dict:
    """
    C{qemu-img info --output json} of C{filename}, or of the image
    C{member} inside the tar file C{filename}; then the result also has
    C{member-offset} and C{member-size}.
    """
    if member:
        offset, size = _find_member(filename, member)
        out = await _run(reactor, [QEMU_IMG, "info", "--output", "json",
                                   _member_uri(filename, offset, size)])
        result = json.loads(out)
        result["member-offset"] = offset
        result["member-size"] = size
        return result
    _check_readable(filename)
    try:
        out = await _run(reactor, [QEMU_IMG, "info", "--output", "json",
                                   filename])
    except QemuError as e:
        # The file is there and readable: qemu cannot make sense of it.
        raise ImageError(f"{filename!r} is not an image qemu can read: "
                         f"{e.detail}", filename=filename) from e
    return json.loads(out)


def _check_readable(filename: str) -> None:
    """
    Raise L{ImageError} if C{filename} is missing or cannot be opened for
    reading (before qemu-img reports it in its own words).
    """
    try:
        fd = os.open(filename, os.O_RDONLY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            text = f"No such file: {filename!r}"
        else:
            text = f"Cannot read {filename!r}: {e.strerror}"
        raise ImageError(text, filename=filename, errno=e.errno) from None
    os.close(fd)


async def measure(reactor, filename: str, dst_fmt: str,
                  member: str | None = None) -> dict:
    """
    C{qemu-img measure --output json -O dst_fmt} of C{filename} (or of its
    tar C{member}, adding C{member-offset} and C{member-size}).
    """
    if member:
        offset, size = _find_member(filename, member)
        target = _member_uri(filename, offset, size)
    else:
        _check_readable(filename)
        target = filename
    out = await _run(reactor, [QEMU_IMG, "measure", "--output", "json",
                               "-O", dst_fmt, target])
    result = json.loads(out)
    if member:
        result["member-offset"] = offset
        result["member-size"] = size
    return result


async def create(reactor, filename: str, fmt: str, size: int | None = None,
                 backing_file: str | None = None,
                 backing_format: str | None = None) -> None:
    """
    C{qemu-img create -f fmt [-b backing_file [-F backing_format]] -q
    filename [size]}.
    """
    args = [QEMU_IMG, "create", "-f", fmt]
    if backing_file:
        args += ["-b", backing_file]
        if backing_format:
            args += ["-F", backing_format]
    args += ["-q", filename]
    if size is not None:
        args.append(str(size))
    await _run(reactor, args)


def _can_use_direct_io(filename: str, read_only: bool) -> bool:
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_DIRECT
    try:
        fd = os.open(filename, flags)
    except OSError:
        return False
    os.close(fd)
    return True


def _is_block_device(filename: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(filename).st_mode)
    except OSError:
        return False


_SO_ACCEPTCON = 0x10000


def _socket_ready(path: str) -> bool:
    """
    Whether a unix socket listens at C{path}. On Linux this reads
    C{/proc/net/unix}, so qemu-nbd does not see (and log) a probe
    connection; elsewhere it connects.
    """
    try:
        with open("/proc/net/unix", "rb") as f:
            table = f.read()
    except OSError:
        return _connect_probe(path)
    wanted = os.fsencode(path)
    for line in table.splitlines()[1:]:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == wanted:
            if int(fields[3], 16) & _SO_ACCEPTCON:
                return True
    return False


def _connect_probe(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class QemuNBD(protocol.ProcessProtocol):
    """
    A private C{qemu-nbd} serving one local image on a unix socket in a new
    temporary directory. Start it with L{start_nbd}; always call L{stop}.

    @ivar url: the NBD URL of the export (C{nbd:unix:/tmp/.../sock}).
    @ivar args: the command line.
    """

    def __init__(self, reactor, args: list[str], directory: str):
        self._reactor = reactor
        self.args = args
        self._dir = directory
        self.socket = os.path.join(directory, "sock")
        self.url = f"nbd:unix:{self.socket}"
        self._err: list[bytes] = []
        self._ended: defer.Deferred[None] = defer.Deferred()
        self.exit_code: int | None = None
        self.running = False

    # ProcessProtocol

    def connectionMade(self):
        self.running = True
        self.transport.closeStdin()

    def errReceived(self, data):
        if sum(map(len, self._err)) < 64 * 1024:
            self._err.append(data)

    def processEnded(self, reason):
        self.running = False
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.check(ProcessTerminated):
            value = reason.value
            self.exit_code = value.exitCode if value.exitCode is not None \
                else -(value.signal or 0)
        self._ended.callback(None)

    @property
    def error_text(self) -> str:
        return b"".join(self._err).decode("utf-8", "replace").strip()

    # Life cycle

    async def _wait_ready(self, timeout: float) -> None:
        # Poll for the listening socket with a short growing interval,
        # bounded by timeout (qemu-nbd tells nothing when it is ready).
        deadline = self._reactor.seconds() + timeout
        delay = _POLL_FIRST
        while True:
            if not self.running:
                reason = self.error_text or f"exit code {self.exit_code}"
                raise QemuError(f"qemu-nbd failed to start: {reason}")
            if os.path.exists(self.socket) and _socket_ready(self.socket):
                return
            if self._reactor.seconds() >= deadline:
                raise QemuError(f"qemu-nbd did not create its socket in "
                                f"{timeout} seconds")
            await task.deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, _POLL_MAX)

    async def stop(self) -> None:
        """
        Terminate C{qemu-nbd} (SIGTERM, SIGKILL after L{STOP_TIMEOUT}) and
        remove the temporary directory. Idempotent.
        """
        if self.running:
            try:
                self.transport.signalProcess("TERM")
            except Exception:
                pass
            timer = self._reactor.callLater(STOP_TIMEOUT, self._kill)
            try:
                await _uncancellable(self._ended)
            finally:
                if timer.active():
                    timer.cancel()
        if self.exit_code not in (None, 0, -15):
            _log.warn("qemu-nbd exited with {code}: {err}",
                      code=self.exit_code, err=self.error_text)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _kill(self):
        _log.warn("qemu-nbd did not stop in time, killing it")
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass


def _uncancellable(d: defer.Deferred) -> defer.Deferred:
    """
    A Deferred following C{d} that ignores cancellation of the waiter (so a
    cancelled caller still waits for the cleanup it started).
    """
    out: defer.Deferred = defer.Deferred(lambda _: None)
    d.addBoth(lambda r: (out.callback(None) if not out.called else None, r)[1])
    return out


def nbd_args(filename: str, fmt: str, sock: str, *, read_only: bool = False,
             shared: int = 1, bitmap: str | None = None,
             backing_chain: bool = True, offset: int | None = None,
             size: int | None = None, cache: str | None = None,
             aio: str | None = None) -> list[str]:
    """
    The C{qemu-nbd} command line for serving C{filename}.
    """
    if cache is None:
        cache = "none" if _can_use_direct_io(filename, read_only) \
            else "writeback"
    if aio is None:
        aio = "native" if cache == "none" else "threads"
    args = [QEMU_NBD, "--export-name=", "--persistent", f"--shared={shared}",
            f"--socket={sock}", f"--cache={cache}", f"--aio={aio}",
            "--discard=unmap", "--detect-zeroes=unmap"]
    if read_only:
        args.append("--read-only")
    if bitmap:
        args.append(f"--bitmap={bitmap}")
    if fmt != "raw":
        # Raw images have a single allocation depth; some qemu-nbd
        # versions report wrong allocation for raw with this option.
        args.append("--allocation-depth")
    driver = "host_device" if _is_block_device(filename) else "file"
    node: dict = {"driver": driver, "filename": filename}
    if offset is not None or size is not None:
        node = {"driver": "raw", "file": node}
        if offset is not None:
            node["offset"] = offset
        if size is not None:
            node["size"] = size
        if fmt != "raw":
            node = {"driver": fmt, "file": node}
    else:
        node = {"driver": fmt, "file": node}
        if fmt == "qcow2" and not backing_chain:
            node["backing"] = None
    args.append("json:" + json.dumps(node))
    return args


async def start_nbd(reactor, filename: str, fmt: str, *,
                    read_only: bool = False, shared: int = 1,
                    bitmap: str | None = None, backing_chain: bool = True,
                    offset: int | None = None, size: int | None = None,
                    timeout: float = START_TIMEOUT) -> QemuNBD:
    """
    Start a private C{qemu-nbd} for C{filename} and wait (bounded poll)
    until it listens.

    @return: the running L{QemuNBD}; the caller must L{QemuNBD.stop} it.
    """
    exe = _program(QEMU_NBD)
    try:
        directory = tempfile.mkdtemp(prefix="imageio-")
    except OSError as e:
        raise QemuError(f"Cannot create a directory for qemu-nbd's socket "
                        f"in {tempfile.gettempdir()!r}: {e.strerror}") \
            from e
    args = nbd_args(filename, fmt, os.path.join(directory, "sock"),
                    read_only=read_only, shared=shared, bitmap=bitmap,
                    backing_chain=backing_chain, offset=offset, size=size)
    server = QemuNBD(reactor, args, directory)
    _log.debug("Starting {args}", args=args)
    try:
        reactor.spawnProcess(server, exe, args, env=os.environ)
        await server._wait_ready(timeout)
    except BaseException:
        await server.stop()
        raise
    return server
