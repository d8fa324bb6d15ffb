# -*- test-case-name: test.test_http -*-
"""
Errors that cross layers.

Every failure a client may see is an L{HTTPError} (or subclass); anything
else reaching the web layer is answered with a generic 500 and logged with
its traceback (SPEC A15). Backends raise L{BackendError} subclasses, which
the web layer maps in one place (L{imageio.web.http.errorResponse}).
"""

from __future__ import annotations

__all__ = [
    "HTTPError", "BadRequest", "Forbidden", "NotFound", "MethodNotAllowed",
    "Conflict", "RangeNotSatisfiable", "InternalError", "BackendError",
    "UnsupportedOperation", "PartialContent", "Canceled", "StartupError",
]


class HTTPError(Exception):
    """
    A failure with an HTTP status and a short text for the client.

    @ivar code: HTTP status code.
    @ivar message: text sent to the client (a newline is appended).
    @ivar headers: extra response headers, C{dict} of C{str} to C{str}.
    @ivar close: if true, the connection is closed after the reply.
    """

    code = 500
    close = False

    def __init__(self, message: str, *, headers: dict | None = None,
                 close: bool | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if close is not None:
            self.close = close
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class BadRequest(HTTPError):
    code = 400


class Forbidden(HTTPError):
    """
    Authorization failure: the reference closes the connection after it,
    and clients (and ticket cancellation) rely on that.
    """
    code = 403
    close = True


class NotFound(HTTPError):
    code = 404


class MethodNotAllowed(HTTPError):
    code = 405


class Conflict(HTTPError):
    code = 409


class RangeNotSatisfiable(HTTPError):
    """
    416, with C{content-range: bytes */<available>}.
    """
    code = 416

    def __init__(self, message: str, available: int, **kw):
        super().__init__(message, **kw)
        self.headers["content-range"] = f"bytes */{available}"


class InternalError(HTTPError):
    code = 500


class BackendError(Exception):
    """
    A backend I/O failure. Mapped to 500 with the text below; the details
    go to the log only.
    """


class UnsupportedOperation(BackendError):
    """
    The backend cannot do this (e.g. dirty extents): mapped to 404.
    """


class PartialContent(BackendError):
    """
    The backend returned fewer bytes than asked (e.g. file shrank): mapped
    to 400 before the response started.
    """

    def __init__(self, requested: int, available: int):
        super().__init__(
            f"Requested {requested} bytes, available {available} bytes")
        self.requested = requested
        self.available = available


class Canceled(Exception):
    """
    The operation's ticket was canceled while it ran.
    """


class StartupError(Exception):
    """
    The daemon cannot start; the message says why, for the operator.
    """
