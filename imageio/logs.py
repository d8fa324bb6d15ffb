# -*- test-case-name: test.test_logs -*-
"""
Our loggers drop events below the configured level where they are made.

twistd installs its own observer (stdout, or its log file) after the
plugin built the service, and that observer has no level filter: every
per-request debug event would be formatted and written (14-21 % of the
reactor thread on small requests, with nobody reading them). The level of
C{[logger_root]} is therefore applied here, for every observer at once.
"""

from __future__ import annotations

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

__all__ = ["Logger", "setLevel", "enabled"]

_LEVELS = list(LogLevel.iterconstants())  # debug, info, warn, error, critical
_enabled = frozenset(_LEVELS)


def setLevel(level: LogLevel) -> None:
    """
    Emit only events at C{level} or above from now on.
    """
    global _enabled
    _enabled = frozenset(_LEVELS[_LEVELS.index(level):])


def enabled(level: LogLevel) -> bool:
    return level in _enabled


class Logger(_TwistedLogger):
    """
    A L{twisted.logger.Logger} that drops events below the level set with
    L{setLevel} before they are built.
    """

    def emit(self, level, format=None, **kwargs):
        if level not in _enabled:
            return
        super().emit(level, format, **kwargs)
