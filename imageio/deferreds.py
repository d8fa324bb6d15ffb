# -*- test-case-name: test.test_deferreds -*-
"""
Firing L{Deferred}s with a result that may be a L{Failure}: the one-shot
waiters of a result that is not known yet (a backend opening, a body
ending, an NBD reply).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["fire", "whenResult", "fireWaiters"]


def fire(d: defer.Deferred, result) -> None:
    """
    Errback C{d} with C{result} if it is a L{Failure}, else callback it.
    A Deferred that has fired already (a cancelled one) is left alone.
    """
    if d.called:
        return
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def whenResult(result, waiters: list) -> defer.Deferred:
    """
    A new L{Deferred} for a one-shot C{result}: fired now if the result is
    known (a value, or a L{Failure} to errback with), else added to
    C{waiters} for L{fireWaiters}. C{None} means not known yet.
    """
    d: defer.Deferred = defer.Deferred()
    if result is not None:
        fire(d, result)
    else:
        waiters.append(d)
    return d


def fireWaiters(waiters: list, result) -> None:
    """
    Fire and empty the C{waiters} (of L{whenResult}, or any list of
    Deferreds) with C{result}, in the order they were added.
    """
    pending = list(waiters)
    waiters.clear()
    for d in pending:
        fire(d, result)
