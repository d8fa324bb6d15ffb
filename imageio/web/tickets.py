# -*- test-case-name: test.test_control -*-
"""
C{/tickets/{id}}: the control API used by vdsm (unix socket) and the engine
(TCP). Only the control service mounts it.
"""

from __future__ import annotations


from imageio.logs import Logger
from imageio import errors
from imageio.web import validate
from imageio.web.http import (
    Resource, asyncRender, emptyResponse, jsonBody, readJSON, requestPath)

__all__ = ["Tickets"]


def _ticketId(request) -> str:
    # "/tickets/(.*)": the id is the rest of the path, slashes included.
    return "/".join(p.decode("utf-8", "replace") for p in request.postpath)


class Tickets(Resource):
    """
    PUT/GET/PATCH/DELETE C{/tickets/{id}} and DELETE C{/tickets/}.

    @ivar store: the L{imageio.tickets.ITicketStore}.
    @ivar removeTimeout: seconds a DELETE waits for running operations.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, store, removeTimeout: float = 60):
        super().__init__()
        self.store = store
        self.removeTimeout = removeTimeout

    def render(self, request):
        if not request.postpath:
            # "/tickets" without the slash: the reference's route is
            # "/tickets/(.*)".
            raise errors.NotFound(f"No handler for {requestPath(request)!r}")
        return super().render(request)

    def _requireId(self, request) -> str:
        ticketId = _ticketId(request)
        if not ticketId:
            raise errors.BadRequest("Ticket id is required")
        return ticketId

    def render_GET(self, request):
        ticketId = self._requireId(request)
        ticket = self.store.get(ticketId)
        return jsonBody(request, ticket.info())

    # PUT, PATCH and DELETE answer once the change reached every worker
    # process (store.flush), so a client may use the ticket at once.

    @asyncRender
    async def render_PUT(self, request):
        self._requireId(request)
        obj = readJSON(request, "Ticket is not in a json format: ")
        ticket = self.store.add(obj)
        self._log.info("Ticket {uuid} added: transfer={transfer} ops={ops} "
                       "size={size} url={url}", uuid=ticket.uuid,
                       transfer=ticket.transferId, ops=ticket.ops,
                       size=ticket.size, url=ticket.url)
        await self.store.flush()
        return b""

    @asyncRender
    async def render_PATCH(self, request):
        ticketId = self._requireId(request)
        obj = readJSON(request, "Invalid patch: ")
        validate.requireObject(obj, "patch")
        timeout = validate.integer(obj, "timeout", minval=0)
        try:
            ticket = self.store.get(ticketId)
        except errors.NotFound:
            # The reference words this one differently from GET.
            raise errors.NotFound(f"No such ticket: {ticketId}")
        ticket.extend(timeout)
        self._log.info("Ticket {uuid} extended by {timeout} s",
                       uuid=ticketId, timeout=timeout)
        await self.store.flush()
        return b""

    @asyncRender
    async def render_DELETE(self, request):
        ticketId = _ticketId(request)
        if not ticketId:
            self.store.clear()
            self._log.info("All tickets removed")
        else:
            await self.store.remove(ticketId, self.removeTimeout)
            self._log.info("Ticket {uuid} removed", uuid=ticketId)
        await self.store.flush()
        emptyResponse(request, 204)
