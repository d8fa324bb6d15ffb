# -*- test-case-name: test.test_daemon -*-
"""
The twistd plugin's options and service maker:
C{twistd -n imageio --conf-dir DIR [--show-config] [--ticket FILE]}.

This is the only module that touches the global reactor.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import task
from twisted.python import usage

from imageio import config as _config
from imageio import errors, logs, malloc, tickets

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """
    Command line of the C{imageio} twistd plugin (the reference's
    C{ovirt-imageio} options).
    """

    synopsis = "[--conf-dir DIR] [--show-config] [--ticket FILE]"

    optParameters = [
        ["conf-dir", "c", "/etc/ovirt-imageio",
         "configuration directory; reads DIR/conf.d/*.conf"],
        ["ticket", "t", None,
         "install the ticket in this JSON file at startup (container mode)"],
    ]
    optFlags = [
        ["show-config", None, "print the merged configuration as JSON "
         "and exit"],
    ]

    compData = usage.Completions(
        optActions={"conf-dir": usage.CompleteDirs(),
                    "ticket": usage.CompleteFiles("*.json")})

    def postOptions(self):
        try:
            self["config"] = _config.load(self["conf-dir"])
        except _config.ConfigError as e:
            raise usage.UsageError(str(e))
        if self["show-config"]:
            sys.stdout.write(_config.dumps(self["config"]) + "\n")
            sys.stdout.flush()
            raise SystemExit(0)
        self["initial-ticket"] = None
        if self["ticket"]:
            self["initial-ticket"] = _loadTicket(self["ticket"])


def _loadTicket(path: str) -> dict:
    """
    Read and validate a ticket file, so that a bad one fails at startup
    with a clear message.
    """
    try:
        with open(path, "rb") as f:
            ticket = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise usage.UsageError(f"cannot read ticket file {path}: "
                               f"{e.strerror}")
    except ValueError as e:
        raise usage.UsageError(f"invalid ticket file {path}: {e}")
    try:
        # A throwaway store validates exactly as the control API does.
        tickets.TicketStore(task.Clock()).add(ticket)
    except errors.HTTPError as e:
        raise usage.UsageError(f"invalid ticket file {path}: {e}")
    return ticket


def makeService(options, reactor=None):
    """
    Build the daemon's L{imageio.services.ImageioService}.
    """
    if reactor is None:
        from twisted.internet import reactor
    from imageio import services
    malloc.tune()
    cfg = options["config"]
    try:
        logs.configureLogging(cfg)
        svc = services.ImageioService(
            cfg, reactor=reactor, initialTicket=options["initial-ticket"],
            confDir=options["conf-dir"])
        svc.installSignalHandlers()
        return svc
    except errors.StartupError as e:
        # An operator's mistake, not a bug: one clear line, no traceback.
        sys.stderr.write(f"imageio: {e}\n")
        raise SystemExit(1)
