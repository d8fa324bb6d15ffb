"""
What a backend can do beyond L{imageio.backends.IBackend}, declared with
C{@implementer} and asked with C{providedBy}: the pumps, the body threads
and the operations never look for a method by name or recognise a backend
by its C{name} or its URL scheme.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IPipelined", "IVectoredWrite", "IPieceReads", "IZeroSteps",
           "IThreadTarget", "IThreadSource", "IPageCacheFreeSource",
           "IStreamingRelay", "IThreadReads", "readDepth", "writeDepth"]

DEFAULT_READ_DEPTH = 2
"""
Reads in flight per download on a backend that is not L{IPipelined}
(a file backend reads in a thread pool: two reads give read-ahead without
hogging the pool).
"""

DEFAULT_WRITE_DEPTH = 1
"""
Writes in flight per upload on a backend that is not L{IPipelined} (with
several, a qcow2 file behind a file backend would grow out of order).
"""


class IPipelined(Interface):
    """
    Requests are pipelined on one connection and answered in order (NBD,
    HTTP): the pumps keep several in flight.
    """

    readDepth = Attribute("C{int}: reads a download keeps in flight.")
    writeDepth = Attribute("C{int}: writes an upload keeps in flight.")


class IVectoredWrite(Interface):
    """
    Writes a list of buffers at once, without joining them first.
    """

    def writev(offset, buffers):
        """
        Write the bytes-like C{buffers}, one after the other, at C{offset}.

        @return: L{Deferred} firing with C{None}.
        """


class IPieceReads(Interface):
    """
    Reads a range as the pieces the server sent (NBD structured replies),
    without joining them.
    """

    def readPieces(offset, length):
        """
        @return: L{Deferred} firing with a list of bytes-like pieces whose
            concatenation is the data.
        """


class IZeroSteps(Interface):
    """
    Knows how much it can zero in one call right now (fast zeroing found
    to work, or not yet).
    """

    maxZeroStep = Attribute(
        "C{int} or C{None}: the largest range one C{zero} call should "
        "cover now; C{None} for the caller's default step.")


class IThreadTarget(Interface):
    """
    Lets a body thread write an upload itself, with blocking calls.
    """

    def threadTarget():
        """
        @return: an object with C{blockSize}, C{write(view, offset)} (of
            views of page-aligned buffers the thread brings) and
            C{close()}, owned by the calling thread until closed; or
            C{None} when not possible now.
        """


class IThreadReads(Interface):
    """
    A file a connection's own thread may read small ranges of itself
    (L{imageio.web.readsession}): no pool thread and no reactor turn per
    request.
    """

    def threadReader():
        """
        @return: an object with C{read(offset, length)} (blocking, in the
            calling thread, returning a view valid until the next call)
            and C{close()}, owned by the calling thread until closed; or
            C{None} when not possible now.
        """


class IThreadSource(Interface):
    """
    Lends its connection to a body thread for the reads of a download.
    """

    def threadSource():
        """
        @return: an object with C{conn} (blocking C{startRead},
            C{finishRead}) and C{giveBack()}; or C{None} when the
            connection cannot be lent now.
        """


class IPageCacheFreeSource(Interface):
    """
    A file a body thread may read itself, without leaving it in the page
    cache (C{O_DIRECT} where the backend found it to work).
    """

    direct = Attribute("C{bool}: the backend's own I/O uses O_DIRECT.")
    blockSize = Attribute("C{int}: the alignment O_DIRECT needs.")

    def pageCacheSource():
        """
        @return: a new descriptor of the file, owned by the caller, or
            C{None}.
        """


class IStreamingRelay(Interface):
    """
    Relays whole HTTP bodies to another daemon (the proxy): downloads are
    streamed straight into the client's response, uploads straight from
    the client's request.
    """

    def readTo(offset, length, consumer):
        """
        Copy the range to C{consumer} (a response whose headers are set)
        with backpressure end to end; the keyword C{operation} (optional)
        is checked before each piece.

        @return: L{Deferred} firing with C{length} once it is sent.
        """


def readDepth(backend) -> int:
    """
    @return: the number of reads a download keeps in flight on C{backend}.
    """
    if IPipelined.providedBy(backend):
        return backend.readDepth
    return DEFAULT_READ_DEPTH


def writeDepth(backend) -> int:
    """
    @return: the number of writes an upload keeps in flight on C{backend}.
    """
    if IPipelined.providedBy(backend):
        return backend.writeDepth
    return DEFAULT_WRITE_DEPTH
