# -*- test-case-name: test.test_metrics -*-
"""
C{GET /metrics}: the daemon's metrics in the Prometheus text format
(SPEC A14). Only the control service mounts it.
"""

from __future__ import annotations

from imageio import errors
from imageio.metrics import CONTENT_TYPE
from imageio.web.http import Resource, asyncRender, requestPath

__all__ = ["MetricsPage"]


class MetricsPage(Resource):
    """
    Mount as C{root.putChild(b"metrics", MetricsPage(metrics))}.

    @ivar metrics: the daemon's L{imageio.metrics.Metrics}.
    @ivar gather: C{None}, or a callable returning a L{Deferred} firing
        with the L{imageio.metrics.Metrics.samples} of the worker
        processes (a list of them), added to this process's.
    """

    isLeaf = True

    def __init__(self, metrics, gather=None):
        super().__init__()
        self.metrics = metrics
        self.gather = gather

    @asyncRender
    async def render_GET(self, request):
        if request.postpath:
            # /metrics/ and anything below: not ours.
            raise errors.NotFound(f"No handler for {requestPath(request)!r}")
        others = await self.gather() if self.gather is not None else ()
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self.metrics.exposition(others)
