"""
A FUSE filesystem that can stop answering, as a dead NFS server does: a
real hang in the kernel, for the tests of hung storage.

L{HungFS} mounts a read-only directory of a few files of fixed size
(C{/dev/fuse} and mount(2) through ctypes: no libfuse, no fusermount, no
new dependency) and answers the kernel from a thread of the test process.
After L{HungFS.hang} it never answers a READ again (nor the other
requests named in C{hang}: C{"open"}, C{"getattr"}, C{"flush"}): the
caller waits in the kernel, as on a hard NFS mount whose server went away.

Like NFS (C{TASK_KILLABLE} since Linux 2.6.25), and unlike a FUSE request
the server has already read (which the kernel waits for uninterruptibly),
a fatal signal ends the wait: the server watches the threads it holds and
answers C{EINTR} to one with C{SIGKILL} pending (C{/proc/<tid>/status}).
So a process killed, or exiting (which kills its other threads), ends.
With C{killable=False} it does not: the process stays (in D state, even
after SIGKILL) until L{HungFS.close}, as with storage whose driver waits
uninterruptibly.

Cleanup always works: L{HungFS.close} detaches the mount (C{umount -l}),
aborts the connection (C{/sys/fs/fuse/connections/<dev>/abort} where
fusectl is mounted) and closes the device, which aborts it as well: every
waiting reader gets C{ENOTCONN}. If the test process dies, the kernel closes
the device and the same happens; only an empty detached mount can remain.

The protocol: C{<linux/fuse.h>}, 7.38 structures (the kernel accepts a
server of any 7.x minor).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct
import threading
import time

__all__ = ["HungFS", "unavailable"]

# Opcodes.
_LOOKUP, _FORGET, _GETATTR, _SETATTR = 1, 2, 3, 4
_OPEN, _READ, _STATFS, _RELEASE, _FSYNC = 14, 15, 17, 18, 20
_FLUSH, _INIT, _OPENDIR, _READDIR, _RELEASEDIR = 25, 26, 27, 28, 29
_ACCESS, _INTERRUPT, _DESTROY, _BATCH_FORGET = 34, 36, 38, 42

_IN_HEADER = struct.Struct("<IIQQIIIHH")        # fuse_in_header, 40 bytes
_OUT_HEADER = struct.Struct("<IiQ")             # fuse_out_header, 16 bytes
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")      # fuse_attr, 88 bytes
_READ_IN = struct.Struct("<QQIIQII")            # fuse_read_in, 40 bytes
_INIT_IN = struct.Struct("<IIII")               # fuse_init_in (head)
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")    # fuse_init_out, 64 bytes
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")    # fuse_kstatfs, 80 bytes
_DIRENT = struct.Struct("<QQII")                # fuse_dirent head

_FOPEN_DIRECT_IO = 1    # every read reaches the server: no page cache
_ROOT = 1
_VALID = 3600           # seconds the kernel may cache names
_HANGABLE = {"read": _READ, "open": _OPEN, "getattr": _GETATTR,
             "flush": _FLUSH}
_MAX_WRITE = 128 * 1024
_BUFFER = 1024 * 1024 + 4096

_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2
_SIGKILL_BIT = 1 << (9 - 1)

_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """
    Why a L{HungFS} cannot be mounted here, or C{None}.
    """
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if os.geteuid() != 0:
        return "mounting FUSE needs root"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["fuse"] for line in f):
                return "no fuse in /proc/filesystems"
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    return None


def content(name: str, offset: int, length: int) -> bytes:
    """
    The bytes of file C{name} at C{offset}: a pattern that differs per
    file and per position, so a test can check what it read.
    """
    seed = sum(name.encode()) % 251
    return bytes((seed + i) % 251 for i in range(offset, offset + length))


class HungFS:
    """
    A mounted FUSE filesystem of files C{files} ({name: size}) that hangs
    on demand.

    @ivar mountpoint: where it is mounted.
    @ivar held: the requests never answered, by unique id: (opcode, tid
        of the waiting thread).
    @ivar served: how many READ requests were answered.
    @ivar killable: whether a fatal signal ends a held request.
    @ivar hangs: the opcodes never answered once hanging.
    @ivar attrTimeout: seconds the kernel may cache attributes (0: every
        stat asks the server, as NFS does once its attribute cache
        expired).
    """

    def __init__(self, mountpoint: str, files: dict[str, int],
                 hang=("read",), killable: bool = True,
                 attrTimeout: int = _VALID):
        self.mountpoint = os.path.abspath(mountpoint)
        self.files = dict(files)
        self.hangs = {_HANGABLE[name] for name in hang}
        self.killable = killable
        self.attrTimeout = attrTimeout
        self.held: dict[int, tuple[int, int]] = {}
        self.served = 0
        self._names = list(self.files)
        self._hanging = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._mounted = False
        self._conn: str | None = None
        self.error: BaseException | None = None

    # -- life cycle

    def mount(self) -> HungFS:
        os.makedirs(self.mountpoint, exist_ok=True)
        self._fd = os.open("/dev/fuse",
                           os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        options = (f"fd={self._fd},rootmode=40000,user_id={os.getuid()},"
                   f"group_id={os.getgid()},allow_other").encode()
        if _libc.mount(b"hungfs", self.mountpoint.encode(), b"fuse.hungfs",
                       _MS_RDONLY | _MS_NOSUID | _MS_NODEV, options) != 0:
            e = ctypes.get_errno()
            os.close(self._fd)
            self._fd = None
            raise OSError(e, f"mount fuse on {self.mountpoint}: "
                          f"{os.strerror(e)}")
        self._mounted = True
        # The kernel queued INIT; whatever touches the mount waits until
        # the thread answered it (the device polls as an error until
        # mounted: the thread starts now).
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="hungfs")
        self._thread.start()
        dev = os.stat(self.mountpoint).st_dev
        self._conn = str(os.major(dev) << 20 | os.minor(dev))
        return self

    def hang(self) -> None:
        """
        From now on, never answer a READ (nor the other requests named in
        C{hang}).
        """
        self._hanging.set()

    def close(self) -> None:
        """
        Unmount and abort: every reader still waiting gets C{ENOTCONN}.
        Safe to call more than once and after a failed L{mount}.
        """
        if self._mounted:
            self._mounted = False
            if _libc.umount2(self.mountpoint.encode(), _MNT_DETACH) != 0:
                e = ctypes.get_errno()
                if e not in (errno.EINVAL, errno.ENOENT):
                    raise OSError(e, f"umount -l {self.mountpoint}: "
                                  f"{os.strerror(e)}")
        abort = f"/sys/fs/fuse/connections/{self._conn}/abort"
        if self._conn is not None and os.path.exists(abort):
            try:
                with open(abort, "w") as f:
                    f.write("1")
            except OSError:
                pass    # gone already
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._fd is not None:
            # The last reference to the connection: closing it aborts it.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HungFS:
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def heldBy(self) -> set[int]:
        """
        The processes (thread group ids) of the threads held.
        """
        pids = set()
        for _, tid in list(self.held.values()):
            try:
                with open(f"/proc/{tid}/status") as f:
                    for line in f:
                        if line.startswith("Tgid:"):
                            pids.add(int(line.split()[1]))
            except OSError:
                pass
        return pids

    def waitHeld(self, n: int, timeout: float = 10) -> bool:
        """
        Wait until at least C{n} requests are held.
        """
        deadline = time.monotonic() + timeout
        while len(self.held) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # -- the server thread

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            while not self._stopping.is_set():
                if poller.poll(50):
                    try:
                        data = os.read(self._fd, _BUFFER)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EINTR,
                                       errno.ENOENT):
                            continue
                        if e.errno == errno.ENODEV:
                            return      # unmounted or aborted
                        raise
                    self._dispatch(data)
                if self.killable:
                    self._reapKilled()
        except BaseException as e:
            self.error = e
            raise

    def _reply(self, unique: int, error: int = 0,
               payload: bytes = b"") -> None:
        out = _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), -error,
                               unique) + payload
        try:
            os.write(self._fd, out)
        except OSError as e:
            # ENOENT: the request was interrupted or aborted meanwhile.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN,
                               errno.ECONNABORTED):
                raise

    def _hold(self, unique: int, opcode: int, pid: int) -> None:
        with self._lock:
            self.held[unique] = (opcode, pid)

    def _reapKilled(self) -> None:
        # A fatal signal ends the wait, as on NFS (see the module doc).
        for unique, (opcode, tid) in list(self.held.items()):
            try:
                with open(f"/proc/{tid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f
                                  if ":" in line)
                pending = (int(fields["SigPnd"], 16)
                           | int(fields["ShdPnd"], 16))
                killed = bool(pending & _SIGKILL_BIT)
            except (OSError, KeyError, ValueError):
                killed = True
            if killed:
                with self._lock:
                    self.held.pop(unique, None)
                self._reply(unique, errno.EINTR)

    def _attr(self, node: int) -> bytes:
        now = int(time.time())
        if node == _ROOT:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            name = self._names[node - 2]
            mode, size, nlink = stat.S_IFREG | 0o644, self.files[name], 1
        return _ATTR.pack(node, size, (size + 511) // 512, now, now, now,
                          0, 0, 0, mode, nlink, os.getuid(), os.getgid(),
                          0, 4096, 0)

    def _node(self, name: str) -> int | None:
        try:
            return self._names.index(name) + 2
        except ValueError:
            return None

    def _dispatch(self, data: bytes) -> None:
        (length, opcode, unique, node, uid, gid, pid, extlen,
         _) = _IN_HEADER.unpack_from(data)
        body = data[_IN_HEADER.size:length]
        if opcode in self.hangs and self._hanging.is_set():
            self._hold(unique, opcode, pid)
            return
        if opcode == _INIT:
            major, minor, readahead, flags = _INIT_IN.unpack_from(body)
            self._reply(unique, payload=_INIT_OUT.pack(
                7, 38, readahead, 0, 12, 9, _MAX_WRITE, 1, 0, 0, 0))
        elif opcode in (_FORGET, _BATCH_FORGET, _INTERRUPT):
            pass    # no answer expected (an interrupt changes nothing)
        elif opcode == _LOOKUP:
            found = self._node(body.split(b"\0", 1)[0].decode()) \
                if node == _ROOT else None
            if found is None:
                self._reply(unique, errno.ENOENT)
            else:
                self._reply(unique, payload=struct.pack(
                    "<QQQQII", found, 1, _VALID, self.attrTimeout, 0, 0)
                    + self._attr(found))
        elif opcode == _GETATTR:
            self._reply(unique, payload=struct.pack("<QII", self.attrTimeout,
                                                    0, 0)
                        + self._attr(node))
        elif opcode == _OPEN:
            self._reply(unique, payload=struct.pack(
                "<QII", node, _FOPEN_DIRECT_IO, 0))
        elif opcode == _OPENDIR:
            self._reply(unique, payload=struct.pack("<QII", 0, 0, 0))
        elif opcode == _READ:
            _, offset, size, *_ = _READ_IN.unpack_from(body)
            name = self._names[node - 2]
            end = min(offset + size, self.files[name])
            self.served += 1
            self._reply(unique, payload=content(name, offset,
                                                max(0, end - offset)))
        elif opcode == _READDIR:
            _, offset, size, *_ = _READ_IN.unpack_from(body)
            self._reply(unique, payload=self._readdir(offset, size))
        elif opcode == _STATFS:
            self._reply(unique, payload=_STATFS_OUT.pack(
                1 << 20, 1 << 19, 1 << 19, 1000, 900, 4096, 255, 4096, 0))
        elif opcode in (_RELEASE, _RELEASEDIR, _FLUSH, _FSYNC, _ACCESS):
            self._reply(unique)
        elif opcode == _DESTROY:
            self._reply(unique)
        elif opcode == _SETATTR:
            self._reply(unique, errno.EROFS)
        else:
            self._reply(unique, errno.ENOSYS)

    def _readdir(self, offset: int, size: int) -> bytes:
        entries = [(_ROOT, ".", stat.S_IFDIR), (_ROOT, "..", stat.S_IFDIR)]
        entries += [(i + 2, name, stat.S_IFREG)
                    for i, name in enumerate(self._names)]
        out = b""
        for index in range(offset, len(entries)):
            ino, name, kind = entries[index]
            raw = name.encode()
            entry = _DIRENT.pack(ino, index + 1, len(raw), kind >> 12) + raw
            entry += b"\0" * (-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out
