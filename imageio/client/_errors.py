# -*- test-case-name: test.test_client_errors -*-
"""
The exceptions of the client library, and the one place where whatever
failed inside a transfer becomes one of them.

Every function of L{imageio.client} and L{imageio.client.aio} fails with a
L{ClientError} (or C{CancelledError} / C{KeyboardInterrupt} when the caller
stopped it, C{ValueError} for invalid arguments). C{str()} of a
L{ClientError} is one line naming what failed (C{"upload of 'disk.qcow2'
to https://..."}) and why: the server's status and text, the connection
or TLS problem, or the local image's problem.

  - L{ServerError}: the server answered an error status (also an
    L{imageio.errors.HTTPError}: C{code}, and C{text} as the server sent
    it);
  - L{TransferError}: the client could not talk to the server (refused,
    reset, TLS verification, timeout) or found the transfer impossible
    (image larger than the target, checksum mismatch);
  - L{ImageError}: the local image is missing, unreadable, of an unknown
    format, or cannot be written (no space left);
  - L{QemuError}: C{qemu-img} or C{qemu-nbd} failed for another reason
    (for example C{qemu-nbd} could not start).
"""

from __future__ import annotations

import os
from http import HTTPStatus

from twisted.internet import defer, error as net_error
from twisted.python.failure import Failure

from imageio.errors import BackendError, HTTPError
from imageio.logs import Logger

__all__ = ["ClientError", "ServerError", "TransferError", "ImageError",
           "QemuError", "translate"]

_log = Logger()


class ClientError(Exception):
    """
    Base class of the client's errors.

    @ivar what: what failed (C{"upload of 'a.raw' to https://..."}), or
        C{None} when not known where the error was raised.
    @ivar detail: why it failed, one line.
    """

    def __init__(self, detail: str, *, what: str | None = None):
        super().__init__(detail)
        self.detail = _one_line(detail)
        self.what = what

    def __str__(self) -> str:
        if self.what:
            return f"{self.what} failed: {self.detail}"
        return self.detail


class TransferError(ClientError):
    """
    The client could not talk to the server (connection refused or reset,
    TLS verification failed, timeout) or found the transfer impossible.
    """


class ServerError(ClientError, HTTPError):
    """
    The server answered an error status.

    @ivar code: the HTTP status.
    @ivar text: the server's error text (also C{message}, as for every
        L{HTTPError}).
    @ivar method: the request that got the answer (C{"PUT"}), if known.
    """

    def __init__(self, code: int, text: str, *, method: str | None = None,
                 what: str | None = None):
        HTTPError.__init__(self, text, code=code)
        self.text = text
        self.method = method
        self.what = what
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        status = f"{code} {phrase}".rstrip()
        verb = f" {method}" if method else ""
        self.detail = _one_line(
            f"the server answered{verb} with {status}: "
            f"{text.strip() or 'no details'}")

    __str__ = ClientError.__str__


class ImageError(ClientError):
    """
    The local image is missing, unreadable, of an unknown format, or
    cannot be written.

    @ivar filename: the local image.
    @ivar errno: the C{errno} value when the system gave one, else C{None}.
    """

    def __init__(self, detail: str, *, filename: str | None = None,
                 errno: int | None = None, what: str | None = None):
        super().__init__(detail, what=what)
        self.filename = filename
        self.errno = errno


class QemuError(ClientError):
    """
    A qemu tool (C{qemu-img}, C{qemu-nbd}) failed; the message carries its
    own error text.
    """


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _chain(exc: BaseException):
    """
    C{exc}, its causes, and the failures Twisted wraps in C{reasons}
    (C{ResponseFailed}, C{ResponseNeverReceived}), depth first.
    """
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for r in getattr(e, "reasons", None) or ():
            todo.append(r.value if isinstance(r, Failure) else r)
        todo.append(e.__cause__)
        todo.append(e.__context__)


_NETWORK = {
    net_error.ConnectionRefusedError: "connection refused",
    net_error.TCPTimedOutError: "connection timed out",
    net_error.TimeoutError: "timed out",
    net_error.DNSLookupError: "host name not found",
    net_error.NoRouteError: "no route to host",
}


def _network_reason(exc: BaseException) -> str | None:
    """
    A short text for the network failure behind C{exc}, or C{None}.
    """
    for e in _chain(exc):
        for kind, text in _NETWORK.items():
            if isinstance(e, kind):
                return text
        if isinstance(e, net_error.ConnectionLost):
            return "the connection was reset"
        if isinstance(e, net_error.ConnectionDone):
            return "the server closed the connection"
        if isinstance(e, ConnectionResetError):
            return "the connection was reset"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
    return None


def _nbd_errno(exc: BaseException) -> int | None:
    from imageio.protocols.nbd import NBDReplyError
    for e in _chain(exc):
        if isinstance(e, NBDReplyError):
            return e.errno
    return None


def translate(exc: BaseException, what: str, *,
              local: str | None = None,
              writing_local: bool = False) -> BaseException:
    """
    The exception the caller of a client function sees for C{exc}, raised
    while doing C{what}.

    @param local: the local image of the operation; a failure of the
        private C{qemu-nbd} serving it (an NBD error reply) is then an
        L{ImageError} about it.
    @param writing_local: the local image was being written (download):
        NBD errors are write errors (C{ENOSPC}: no space left).
    @return: a L{ClientError} with C{what} set, or C{exc} itself when the
        caller cancelled (C{CancelledError}, C{KeyboardInterrupt}) or
        passed invalid arguments (C{ValueError}, C{TypeError}; the
        C{RuntimeError} of L{ImageioClient}'s bounds checks).
    """
    if isinstance(exc, (defer.CancelledError, KeyboardInterrupt,
                        SystemExit, ValueError, TypeError, RuntimeError)) \
            and not isinstance(exc, ClientError):
        return exc
    if isinstance(exc, ClientError):
        if exc.what is None:
            exc.what = what
        return exc
    if isinstance(exc, HTTPError):
        out: ClientError = ServerError(
            exc.code, exc.message, method=getattr(exc, "method", None),
            what=what)
    elif local is not None and _nbd_errno(exc) is not None:
        code = _nbd_errno(exc)
        verb = "writing" if writing_local else "reading"
        try:
            reason = os.strerror(code)
        except (ValueError, OverflowError):
            reason = f"error {code}"
        out = ImageError(f"{verb} {local!r}: {reason}", filename=local,
                         errno=code, what=what)
    elif isinstance(exc, (BackendError, OSError, net_error.ConnectError,
                          net_error.ConnectionLost,
                          net_error.ConnectionDone)) \
            or _network_reason(exc) is not None:
        out = TransferError(_backend_text(exc), what=what)
    else:
        # A bug of ours: say so without leaking the exception's name; the
        # traceback goes to the log (IMAGEIO_DEBUG=1 prints it in the
        # command).
        _log.failure("Unexpected error during {what}", Failure(exc),
                     what=what)
        text = _one_line(str(exc))
        out = ClientError(
            f"unexpected client error{': ' + text if text else ''} "
            f"(please report it)", what=what)
    out.__cause__ = exc
    return out


def _backend_text(exc: BaseException) -> str:
    """
    One line for a backend or network failure: the backend's own text
    (which names the request and the host), with Twisted's wrapped
    failures replaced by a short reason.
    """
    text = _one_line(str(exc))
    reason = _network_reason(exc)
    # Twisted's wrapped failures print as "[<twisted.python.failure...>]".
    cut = text.find("[<")
    if cut != -1:
        text = text[:cut].rstrip(" :")
        if text.endswith(" failed"):
            text = text[:-len(" failed")]
    if reason is None:
        if cut != -1:
            # Say what the wrapped failure was, in its own words.
            inner = [_one_line(str(e)) for e in _chain(exc)
                     if e is not exc and not getattr(e, "reasons", None)
                     and str(e)]
            if inner:
                return f"{text}: {inner[0]}" if text else inner[0]
        return text or "connection failed"
    head, sep, _ = text.partition(" failed: ")
    if sep:
        return f"{head}: {reason}"
    if not text:
        return reason
    return text if reason in text else f"{text}: {reason}"
