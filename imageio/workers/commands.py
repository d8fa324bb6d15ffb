# -*- test-case-name: test.test_workers -*-
"""
The AMP commands between the main process and its workers, and the file
descriptors a worker finds its connections on.

    main -> worker   AddTicket, SetExpires, CancelTicket, RemoveTicket,
                     ClearTickets, CloseContext, ReloadTLS, GetMetrics
    worker -> main   Hello (answered after the ticket snapshot),
                     OperationStarted, OperationsProgress (batched),
                     OperationFinished, ContextBound, ContextUnbound,
                     Touched
"""

from __future__ import annotations

from twisted.protocols import amp

__all__ = [
    "AddTicket", "SetExpires", "CancelTicket", "RemoveTicket",
    "ClearTickets", "CloseContext", "ReloadTLS", "GetMetrics", "Hello",
    "OperationStarted", "OperationsProgress", "OperationFinished",
    "ContextBound", "ContextUnbound", "Touched",
    "FD_AMP", "FD_REMOTE", "FD_LOCAL",
]

# File descriptors in a worker: the AMP connection to the main process,
# the remote and the local listening sockets.
FD_AMP, FD_REMOTE, FD_LOCAL = 3, 4, 5


class _NoAnswer(amp.Command):
    requiresAnswer = False


class _BigUnicode(amp.Argument):
    """
    A text of any length. An AMP value holds at most 64 KiB
    (C{amp.MAX_VALUE_LENGTH}), and a ticket is as long as the control API
    accepts (a 70 kB url or filename made C{AddTicket} fail with
    C{TooLong}): the UTF-8 bytes are split over the keys C{name},
    C{name.1}, C{name.2}...
    """

    def fromBox(self, name, strings, objects, proto):
        parts = [strings[name]]
        i = 1
        while True:
            key = b"%s.%d" % (name, i)
            if key not in strings:
                break
            parts.append(strings[key])
            i += 1
        objects[name.decode("ascii")] = b"".join(parts).decode("utf-8")

    def toBox(self, name, strings, objects, proto):
        data = objects[name.decode("ascii")].encode("utf-8")
        size = amp.MAX_VALUE_LENGTH
        strings[name] = data[:size]
        for i, start in enumerate(range(size, len(data), size), 1):
            strings[b"%s.%d" % (name, i)] = data[start:start + size]


class AddTicket(amp.Command):
    arguments = [(b"gen", amp.Integer()), (b"ticket", _BigUnicode()),
                 (b"expires", amp.Integer()), (b"canceled", amp.Boolean())]


class SetExpires(amp.Command):
    arguments = [(b"gen", amp.Integer()), (b"expires", amp.Integer())]


class CancelTicket(amp.Command):
    arguments = [(b"gen", amp.Integer())]


class RemoveTicket(amp.Command):
    arguments = [(b"gen", amp.Integer())]


class ClearTickets(amp.Command):
    arguments: list = []


class CloseContext(amp.Command):
    arguments = [(b"gen", amp.Integer()), (b"context", amp.Integer())]


class ReloadTLS(amp.Command):
    arguments: list = []
    response = [(b"reloaded", amp.Boolean())]


class GetMetrics(amp.Command):
    arguments: list = []
    response = [(b"samples", _BigUnicode())]


class Hello(amp.Command):
    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]


class OperationStarted(_NoAnswer):
    arguments = [(b"gen", amp.Integer()), (b"op", amp.Integer()),
                 (b"offset", amp.Integer()), (b"length", amp.Integer())]


class OperationsProgress(_NoAnswer):
    arguments = [(b"progress", amp.AmpList(
        [(b"op", amp.Integer()), (b"done", amp.Integer())]))]


class OperationFinished(_NoAnswer):
    arguments = [(b"op", amp.Integer()), (b"done", amp.Integer())]


class ContextBound(_NoAnswer):
    arguments = [(b"gen", amp.Integer()), (b"context", amp.Integer())]


class ContextUnbound(_NoAnswer):
    arguments = [(b"gen", amp.Integer()), (b"context", amp.Integer())]


class Touched(_NoAnswer):
    arguments = [(b"gen", amp.Integer())]
