"""
imageio.deferreds: the waiters of a one-shot result.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imageio.deferreds import fire, fireWaiters, whenResult


class FireTests(SynchronousTestCase):

    def test_value(self):
        d = defer.Deferred()
        fire(d, 3)
        self.assertEqual(self.successResultOf(d), 3)

    def test_failure(self):
        d = defer.Deferred()
        fire(d, Failure(ValueError("no")))
        self.failureResultOf(d, ValueError)

    def test_cancelled_left_alone(self):
        d = defer.Deferred()
        d.cancel()
        fire(d, 3)
        fire(d, Failure(ValueError("late")))
        self.failureResultOf(d, defer.CancelledError)


class WaiterTests(SynchronousTestCase):

    def test_known_result_fires_now(self):
        waiters: list = []
        self.assertEqual(self.successResultOf(whenResult(5, waiters)), 5)
        self.assertEqual(waiters, [])

    def test_known_failure_fires_now(self):
        waiters: list = []
        self.failureResultOf(
            whenResult(Failure(KeyError("k")), waiters), KeyError)

    def test_unknown_waits_for_fire(self):
        waiters: list = []
        ds = [whenResult(None, waiters) for _ in range(3)]
        for d in ds:
            self.assertNoResult(d)
        order = []
        for i, d in enumerate(ds):
            d.addCallback(lambda r, i=i: order.append((i, r)))
        fireWaiters(waiters, "done")
        self.assertEqual(order, [(0, "done"), (1, "done"), (2, "done")])
        self.assertEqual(waiters, [])

    def test_waiters_errback(self):
        waiters: list = []
        d = whenResult(None, waiters)
        fireWaiters(waiters, Failure(OSError("gone")))
        self.failureResultOf(d, OSError)

    def test_waiter_added_while_firing_stays(self):
        waiters: list = []
        late = []
        d = whenResult(None, waiters)
        d.addCallback(lambda _: late.append(whenResult(None, waiters)))
        fireWaiters(waiters, 1)
        self.assertEqual(waiters, late)
