# -*- test-case-name: test.test_endpoints -*-
"""
Every service listens on an endpoint described by a strports string.

Twisted's own C{tcp:}, C{tcp6:} and C{unix:} cover plain HTTP, the local
service (abstract names included: the NUL goes through the string as is)
and the control service. C{ssl:} cannot set the minimum TLS version or be
reloaded, so the remote service uses our C{imageio-tls:} endpoint, whose
parser plugin lives in C{twisted/plugins/imageio_endpoints.py}::

    imageio-tls:54322:interface=\\:\\::backlog=40:certKey=/etc/pki/cert.pem:privateKey=/etc/pki/key.pem[:tls1_1=yes]

An operator can read (and a test can write) the whole listening setup as
these strings; the daemon logs them.
"""

from __future__ import annotations

import socket

from twisted.internet import endpoints
from twisted.internet.interfaces import (
    IStreamServerEndpoint, IStreamServerEndpointStringParser)
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from imageio.tls import ReloadableTLS, TLSFiles

__all__ = ["quote", "tcpDescription", "tlsDescription", "unixDescription",
           "TLSServerEndpoint", "TLSServerParser"]

LISTEN_BACKLOG = 40


def quote(value) -> str:
    """
    Escape a value for a strports string (C{\\}, C{:} and C{=}; Twisted's
    C{quoteStringArgument} leaves C{=} alone, which breaks keyword values).
    """
    return (str(value).replace("\\", "\\\\").replace(":", "\\:")
            .replace("=", "\\="))


def _tcpPrefix(address: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6, address)
        return "tcp6"
    except OSError:
        return "tcp"


def tcpDescription(address: str, port: int) -> str:
    """
    Plain TCP on a numeric C{address}.
    """
    return (f"{_tcpPrefix(address)}:{port}:interface={quote(address)}"
            f":backlog={LISTEN_BACKLOG}")


def tlsDescription(address: str, port: int, tls) -> str:
    """
    Our TLS endpoint on a numeric C{address}, from the C{[tls]} section.
    """
    desc = (f"imageio-tls:{port}:interface={quote(address)}"
            f":backlog={LISTEN_BACKLOG}:certKey={quote(tls.cert_file)}"
            f":privateKey={quote(tls.key_file)}")
    if tls.enable_tls1_1:
        desc += ":tls1_1=yes"
    return desc


def unixDescription(path: str, mode: int | None = None) -> str:
    """
    A unix socket; a C{path} starting with NUL is abstract. No lock file
    (it cannot exist for abstract names; TWISTED-NOTES §3).
    """
    desc = f"unix:{quote(path)}:lockfile=0:backlog={LISTEN_BACKLOG}"
    if mode is not None:
        desc += f":mode={mode:o}"
    return desc


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    TLS over a TCP server endpoint, with a reloadable certificate.

    @ivar tls: the L{ReloadableTLS}; C{tls.reload()} on SIGHUP.
    """

    def __init__(self, inner, tls: ReloadableTLS):
        self._inner = inner
        self.tls = tls

    def listen(self, factory):
        return self._inner.listen(TLSMemoryBIOFactory(self.tls, False,
                                                      factory))


_YES = ("yes", "true", "1", "on")


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TLSServerParser:
    """
    Parses C{imageio-tls:PORT[:interface=ADDR][:backlog=N]:certKey=CERT
    :privateKey=KEY[:tls1_1=yes]}.
    """

    prefix = "imageio-tls"

    def parseStreamServer(self, reactor, port, interface="",
                          backlog=LISTEN_BACKLOG, certKey=None,
                          privateKey=None, tls1_1="no"):
        tls = ReloadableTLS(TLSFiles(
            key_file=privateKey or "", cert_file=certKey or "",
            enable_tls1_1=tls1_1.lower() in _YES))
        cls = (endpoints.TCP6ServerEndpoint
               if _tcpPrefix(interface) == "tcp6"
               else endpoints.TCP4ServerEndpoint)
        inner = cls(reactor, int(port), backlog=int(backlog),
                    interface=interface)
        return TLSServerEndpoint(inner, tls)
