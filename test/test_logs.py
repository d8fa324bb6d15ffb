"""
imageio.logs: events below the configured level are dropped at the source,
for every observer (twistd's stdout observer has no filter of its own).
"""

from __future__ import annotations

import pytest
from twisted.logger import LogLevel, LogPublisher

from imageio import logs


@pytest.fixture(autouse=True)
def restore():
    yield
    logs.setLevel(LogLevel.debug)


def capture():
    events = []
    publisher = LogPublisher(events.append)
    return logs.Logger(observer=publisher), events


def test_all_levels_by_default():
    log, events = capture()
    log.debug("d")
    log.info("i")
    assert [e["log_level"] for e in events] == [LogLevel.debug, LogLevel.info]


@pytest.mark.parametrize("level,kept", [
    (LogLevel.info, ["info", "warn", "error", "critical"]),
    (LogLevel.warn, ["warn", "error", "critical"]),
    (LogLevel.critical, ["critical"]),
])
def test_level_drops_events_below(level, kept):
    logs.setLevel(level)
    log, events = capture()
    log.debug("debug")
    log.info("info")
    log.warn("warn")
    log.error("error")
    log.critical("critical")
    assert [e["log_format"] for e in events] == kept


def test_failure_kept_at_critical():
    logs.setLevel(LogLevel.critical)
    log, events = capture()
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("boom")
    assert len(events) == 1
