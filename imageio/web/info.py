# -*- test-case-name: test.test_control -*-
"""
C{/info}: the daemon's version, used by the engine as a connectivity check.
"""

from __future__ import annotations

from imageio import __version__
from imageio.web.http import Resource, cors, jsonBody

__all__ = ["Info"]


class Info(Resource):
    """
    C{GET /info} and C{GET /info/} (SPEC A4) answer C{{"version": ...}},
    without authorization and with CORS.
    """

    isLeaf = True

    def render_GET(self, request):
        cors(request)
        return jsonBody(request, {"version": __version__})
