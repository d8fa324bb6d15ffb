# -*- test-case-name: test.test_logs -*-
"""
Logging: our loggers drop events below the configured level where they
are made, and the C{[logger_root]} / C{[handler_*]} sections of the
configuration become observers (L{configureLogging}).

twistd installs its own observer (stdout, or its log file) after the
plugin built the service, and that observer has no level filter: every
per-request debug event would be formatted and written (14-21 % of the
reactor thread on small requests, with nobody reading them). The level of
C{[logger_root]} is therefore applied here, for every observer at once.
"""

from __future__ import annotations

import ast
import os

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
    globalLogPublisher, textFileLogObserver)
from twisted.logger import Logger as _TwistedLogger

from imageio.errors import StartupError

__all__ = ["Logger", "setLevel", "enabled", "LEVEL_NAMES", "logFiles",
           "configureLogging"]

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


# Logging: the reference configures Python logging from the INI sections;
# we honour the same sections with twisted.logger observers.

LEVEL_NAMES = {
    "DEBUG": LogLevel.debug, "INFO": LogLevel.info,
    "WARNING": LogLevel.warn, "WARN": LogLevel.warn,
    "ERROR": LogLevel.error, "CRITICAL": LogLevel.critical,
}


def _rootHandlers(cfg):
    names = [n.strip() for n in cfg.logger_root.handlers.split(",")]
    return [n for n in names if n]


def _handlerSection(cfg, name):
    return getattr(cfg, "handler_" + name, None)


def _handlerClass(section) -> str:
    for attr in ("keyword__class", "class_", "klass"):
        if hasattr(section, attr):
            return getattr(section, attr)
    return ""


def _handlerFile(section):
    """
    The log file a file handler section names, or None.
    """
    if "FileHandler" not in _handlerClass(section):
        return None
    try:
        args = ast.literal_eval(section.args)
    except (ValueError, SyntaxError):
        return None
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def logFiles(cfg):
    files = []
    for name in _rootHandlers(cfg):
        section = _handlerSection(cfg, name)
        if section is not None:
            path = _handlerFile(section)
            if path:
                files.append(path)
    return files


def configureLogging(cfg, publisher=globalLogPublisher):
    """
    Apply C{[logger_root]}: its level drops our events below it at the
    source (L{imageio.logs}: twistd's own observer has no filter), and a
    file handler it names gets an observer writing to its file; a stream
    handler is left to twistd, which already logs to stdout/stderr (or its
    own log file).
    """
    level = LEVEL_NAMES.get(cfg.logger_root.level.upper(), LogLevel.info)
    setLevel(level)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    for path in logFiles(cfg):
        directory = os.path.dirname(path)
        try:
            if directory:
                os.makedirs(directory, exist_ok=True)
            f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise StartupError(f"cannot open log file {path!r}: "
                               f"{e.strerror}")
        publisher.addObserver(FilteringLogObserver(
            textFileLogObserver(f), [predicate]))
