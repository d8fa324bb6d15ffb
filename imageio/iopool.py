# -*- test-case-name: test.test_daemon -*-
"""
The I/O thread pool of a daemon or worker process: blocking storage calls
and hashing run there. One builder (L{ioThreadPool}) for both kinds of
process, so that they cannot drift apart.
"""

from __future__ import annotations

import threading

from twisted.application import service
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from imageio.logs import Logger

__all__ = ["IOThreadPool", "ThreadPoolService", "ioThreadPool",
           "POOL_STOP_TIMEOUT"]

_log = Logger()


class IOThreadPool(ThreadPool):
    """
    The pool for blocking storage calls. Its threads are daemon threads: a
    thread blocked for good in storage (a hung NFS mount) must not keep
    the process from exiting (Python joins every other thread at exit).
    """

    def threadFactory(self, *args, **kwargs):
        thread = threading.Thread(*args, **kwargs)
        thread.daemon = True
        return thread


POOL_STOP_TIMEOUT = 5
"""
Seconds the daemon's stop waits for the I/O threads to end.
"""


class ThreadPoolService(service.Service):
    """
    Runs the bounded thread pool for blocking file I/O and hashing.
    """

    def __init__(self, pool, reactor=None, timeout=POOL_STOP_TIMEOUT):
        self.setName("threadpool")
        self.pool = pool
        self.reactor = reactor
        self.timeout = timeout

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        """
        Stop the pool, waiting at most C{timeout} seconds: C{pool.stop()}
        joins its threads, and one blocked in storage would hold the stop
        (and SIGTERM) forever. The join runs in a daemon thread of its own.
        """
        super().stopService()
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        done = defer.Deferred()

        def stop():
            self.pool.stop()
            reactor.callFromThread(finish, True)

        def finish(stopped):
            if done.called:
                return
            if timer.active():
                timer.cancel()
            if not stopped:
                _log.warn("I/O threads still busy after {timeout} s "
                          "(storage not answering?); stopping without them",
                          timeout=self.timeout)
            done.callback(None)

        timer = reactor.callLater(self.timeout, finish, False)
        threading.Thread(target=stop, daemon=True,
                         name="imageio-io-stop").start()
        return done


def ioThreadPool(cfg, reactor, parent) -> IOThreadPool:
    """
    The I/O pool for C{cfg} (twice C{[daemon] max_connections} threads, at
    least 4), started and stopped (within L{POOL_STOP_TIMEOUT} seconds)
    with the service C{parent}.
    """
    pool = IOThreadPool(
        minthreads=0, maxthreads=max(4, 2 * cfg.daemon.max_connections),
        name="imageio-io")
    ThreadPoolService(pool, reactor).setServiceParent(parent)
    return pool
