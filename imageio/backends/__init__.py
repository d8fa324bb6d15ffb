# -*- test-case-name: test.test_backends -*-
"""
Backends: where image bytes live.

A backend is opened per (HTTP connection, ticket) from the ticket's C{url}
and closed when the connection closes. Every data method returns a
L{Deferred}; nothing here blocks the reactor thread (file I/O runs in a
thread pool, NBD and HTTP are asynchronous protocols).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from zope.interface import Attribute, Interface

from imageio import schemes
from imageio.errors import BadRequest

__all__ = ["IBackend", "open", "backendClass"]


class IBackend(Interface):
    """
    Random access to one image.

    Offsets and lengths are in bytes. C{read} and C{write} accept at most
    C{maxRequest} bytes per call; callers split larger transfers.
    """

    name = Attribute("C{str}: 'file', 'nbd', 'http' or 'memory'.")
    blockSize = Attribute("C{int}: alignment the backend prefers (1 if any).")
    maxReaders = Attribute("C{int}: advised concurrent reading connections.")
    maxWriters = Attribute("C{int}: advised concurrent writing connections.")
    maxRequest = Attribute("C{int}: the largest read or write per call.")

    def size():
        """
        @return: the current image size in bytes (C{int}, synchronous).
        """

    def read(offset, length):
        """
        Read C{length} bytes at C{offset}.

        @return: L{Deferred} firing with a bytes-like object of C{length}
            bytes, or fewer only when the image ends first.
        """

    def write(offset, data):
        """
        Write C{data} (bytes-like) at C{offset}.

        @return: L{Deferred} firing with C{None} once the data is with the
            backend (not necessarily durable: see C{flush}).
        """

    def zero(offset, length):
        """
        Make the range read as zeroes; deallocate only if the backend was
        opened sparse.

        @return: L{Deferred} firing with C{None}.
        """

    def flush():
        """
        Make written data durable.

        @return: L{Deferred} firing with C{None}.
        """

    def extents(context="zero"):
        """
        Describe the whole image, C{[0, size())}, in order, without gaps.

        @param context: C{"zero"} or C{"dirty"}.
        @return: L{Deferred} firing with a C{list} of
            L{imageio.extents.ZeroExtent} (or L{DirtyExtent}).
        @raise imageio.errors.UnsupportedOperation: via the Deferred, when
            the context is not available.
        """

    def close():
        """
        Release everything the backend holds. Idempotent.

        @return: L{Deferred} firing with C{None}.
        """


def backendClass(url):
    """
    The class of the backend a ticket's C{url} names, to ask what it can
    do (L{imageio.abilities}) before it is open.
    """
    scheme = urlsplit(url).scheme
    if scheme in schemes.FILE:
        from imageio.backends.file import FileBackend
        return FileBackend
    if scheme in schemes.NBD:
        from imageio.backends.nbd import NBDBackend
        return NBDBackend
    if scheme in schemes.HTTP:
        from imageio.backends.http import HTTPBackend
        return HTTPBackend
    raise BadRequest(f"Unsupported url scheme: {url!r}")


def open(reactor, url, *, mode, sparse=False, dirty=False, config=None,
         threadpool=None):
    """
    Open the backend a ticket's C{url} names.

    @param mode: C{"r"} or C{"r+"}.
    @param config: the daemon L{imageio.config.Config} (buffer sizes,
        max_connections, CA files).
    @param threadpool: a started L{twisted.python.threadpool.ThreadPool}
        for blocking file I/O.
    @return: L{Deferred} firing with an L{IBackend}.
    """
    scheme = urlsplit(url).scheme
    if scheme in schemes.FILE:
        from imageio.backends import file
        return file.open(reactor, url, mode=mode, sparse=sparse,
                         config=config, threadpool=threadpool)
    if scheme in schemes.NBD:
        from imageio.backends import nbd
        return nbd.open(reactor, url, mode=mode, sparse=sparse, dirty=dirty,
                        config=config)
    if scheme in schemes.HTTP:
        from imageio.backends import http
        return http.open(reactor, url, mode=mode, sparse=sparse,
                         dirty=dirty, config=config)
    raise BadRequest(f"Unsupported url scheme: {url!r}")
