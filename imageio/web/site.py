# -*- test-case-name: test.test_daemon -*-
"""
What a process serving C{/images} runs: the images L{Site} (the remote
and local services, in the daemon or in a worker process) and the
L{malloc.Reclaim} service fed by the web layer's counters.
"""

from __future__ import annotations

from imageio import malloc
from imageio.metrics import NO_METRICS
from imageio.web.bodyreader import SocketReader
from imageio.web.bodywriter import SocketWriter
from imageio.web.http import Root, makeSite
from imageio.web.images import Images
from imageio.web.info import Info
from imageio.web.request import ImageioChannel, StreamingRequest

__all__ = ["imagesSite", "reclaim"]


def imagesSite(store, cfg, reactor, threadpool, withInfo, metrics=None,
               name=None):
    """
    The Site serving C{/images} (and C{/info} when C{withInfo}): the
    remote and local services, in the daemon or in a worker process.

    @param metrics: the L{Metrics} to report to as service C{name}, or
        C{None}. The images handlers get it here; the Site carries it for
        the request counts (L{Metrics.instrument}).
    """
    root = Root()
    root.putChild(b"images", Images(
        store, cfg, reactor, threadpool,
        metrics=NO_METRICS if metrics is None else metrics))
    if withInfo:
        root.putChild(b"info", Info())
    site = makeSite(root, reactor=reactor,
                    requestFactory=StreamingRequest,
                    channelFactory=ImageioChannel,
                    timeout=60)
    if metrics is not None:
        metrics.instrument(site, name)
    return site


def reclaim() -> malloc.Reclaim:
    """
    The service giving the memory of finished transfers and closed
    connections back (L{malloc.Reclaim}), for a daemon or worker process.
    """
    return malloc.Reclaim(
        activity=lambda: (SocketWriter.bodies + SocketReader.bodies
                          + ImageioChannel.closed))
