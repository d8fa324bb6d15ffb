# -*- test-case-name: test.test_nbdurl -*-
"""
NBD server addresses as written in ticket URLs (SPEC A7).

Accepted forms:

  - C{nbd:unix:/abs/path[:exportname=NAME]} (the reference's form)
  - C{nbd:HOST:PORT[:exportname=NAME]}, HOST may be C{[v6]}
  - C{nbd://HOST:PORT/NAME} (the reference's "nice" form)
  - C{nbd://HOST[:PORT]/NAME}, the standard NBD URI with the default port
    10809
  - C{nbd+unix:///NAME?socket=/path}, the standard NBD URI for a UNIX socket

The reference does not percent-decode the export name of C{nbd://} URLs
and neither do we (a ticket written for it must name the same export). The
C{nbd+unix} form is ours alone, so it follows the NBD URI standard and
decodes both the export name and the C{socket} parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = [
    "DEFAULT_PORT", "UnixAddress", "TCPAddress", "NBDURL", "parse",
    "clientEndpoint",
]

DEFAULT_PORT = 10809

# nbd:unix:/abs/path[:exportname=NAME]; the path cannot hold ":" since the
# colon separates the export name.
_UNIX_COLON = re.compile(r"unix:(?P<path>/[^:]*)(?::exportname=(?P<name>.*))?",
                         re.DOTALL)

# nbd:HOST:PORT[:exportname=NAME]; HOST is "[v6]" or has no ":".
_TCP_COLON = re.compile(
    r"(?P<host>\[[^\]]+\]|[^:\[\]]+):(?P<port>[0-9]+)"
    r"(?::exportname=(?P<name>.*))?",
    re.DOTALL)


def _withExport(url: str, exportName: str) -> str:
    # The reference's colon form names the export last.
    return f"{url}:exportname={exportName}" if exportName else url


@dataclass(frozen=True)
class UnixAddress:
    """
    A UNIX stream socket.

    @ivar path: the socket's filesystem path.
    """
    path: str

    def url(self, exportName: str = "") -> str:
        """
        @return: this address (and C{exportName}) in the reference's colon
            form, which both implementations accept.
        """
        return _withExport(f"nbd:unix:{self.path}", exportName)


@dataclass(frozen=True)
class TCPAddress:
    """
    A TCP server.

    @ivar host: host name or IP address (IPv6 without brackets).
    @ivar port: TCP port.
    """
    host: str
    port: int

    def url(self, exportName: str = "") -> str:
        """
        @return: this address (and C{exportName}) in the reference's colon
            form.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return _withExport(f"nbd:{host}:{self.port}", exportName)


@dataclass(frozen=True)
class NBDURL:
    """
    A parsed NBD URL.

    @ivar address: a L{UnixAddress} or a L{TCPAddress}.
    @ivar exportName: the export to ask for (C{""} is the default export).
    """
    address: UnixAddress | TCPAddress
    exportName: str = ""


def _port(text: str, url: str) -> int:
    if not text.isdigit():
        raise ValueError(f"Invalid port {text!r} in NBD URL {url!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"Port {port} out of range in NBD URL {url!r}")
    return port


def _host(text: str, url: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        raise ValueError(f"Missing host in NBD URL {url!r}")
    return text


def _exportFromPath(path: str) -> str:
    # The first "/" separates the authority; an export name that starts
    # with "/" is written with "//".
    return path[1:] if path.startswith("/") else path


def parse(url: str) -> NBDURL:
    """
    Parse an NBD URL.

    @param url: one of the forms in the module docstring.
    @return: the L{NBDURL}.
    @raise ValueError: if C{url} is not a supported NBD URL; the message
        names the URL and what is wrong with it.
    """
    if not isinstance(url, str):
        raise ValueError(f"NBD URL must be a string: {url!r}")
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("nbd", "nbd+unix"):
        raise ValueError(f"Unsupported NBD URL scheme in {url!r} "
                         f"(expected nbd: or nbd+unix:)")

    if scheme == "nbd+unix":
        parts = urlsplit(url)
        if parts.netloc:
            raise ValueError(f"nbd+unix URL must not name a host: {url!r}")
        query = parse_qs(parts.query, keep_blank_values=True)
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError(
                f"nbd+unix URL needs exactly one socket= parameter: {url!r}")
        if query:
            raise ValueError(f"Unsupported parameters {sorted(query)} in NBD "
                             f"URL {url!r}")
        if parts.fragment:
            raise ValueError(f"Unexpected fragment in NBD URL {url!r}")
        return NBDURL(UnixAddress(sockets[0]),
                      unquote(_exportFromPath(parts.path)))

    if rest.startswith("//"):
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise ValueError(f"Unexpected query or fragment in NBD URL "
                             f"{url!r}")
        netloc = parts.netloc
        if "@" in netloc:
            raise ValueError(f"User info not supported in NBD URL {url!r}")
        # Split HOST[:PORT] ourselves: urlsplit().port raises its own
        # messages, and "[v6]" needs care.
        if netloc.startswith("["):
            host, bracket, tail = netloc.partition("]")
            if not bracket or (tail and not tail.startswith(":")):
                raise ValueError(f"Invalid IPv6 host in NBD URL {url!r}")
            host = host[1:]
            portText = tail[1:] if tail else ""
            hasPort = bool(tail)
        else:
            host, colon, portText = netloc.rpartition(":")
            hasPort = bool(colon)
            if not hasPort:
                host = netloc
        port = _port(portText, url) if hasPort else DEFAULT_PORT
        if not host:
            raise ValueError(f"Missing host in NBD URL {url!r}")
        return NBDURL(TCPAddress(host, port), _exportFromPath(parts.path))

    m = _UNIX_COLON.fullmatch(rest)
    if m:
        if m.group("path") == "/":
            raise ValueError(f"Missing socket path in NBD URL {url!r}")
        return NBDURL(UnixAddress(m.group("path")), m.group("name") or "")
    if rest.startswith("unix:"):
        raise ValueError(f"Invalid NBD unix URL {url!r} (expected "
                         f"nbd:unix:/absolute/path[:exportname=NAME])")
    m = _TCP_COLON.fullmatch(rest)
    if m:
        return NBDURL(TCPAddress(_host(m.group("host"), url),
                                 _port(m.group("port"), url)),
                      m.group("name") or "")
    raise ValueError(f"Unsupported NBD URL {url!r}")


def clientEndpoint(reactor, address: UnixAddress | TCPAddress,
                   timeout: float = 30) -> IStreamClientEndpoint:
    """
    Build the client endpoint that reaches C{address}.

    TCP uses L{HostnameEndpoint}, which resolves names and tries IPv4 and
    IPv6 addresses.

    @param reactor: the reactor to connect with.
    @param address: a L{UnixAddress} or L{TCPAddress}.
    @param timeout: connect timeout in seconds.
    @return: an L{IStreamClientEndpoint}.
    """
    if isinstance(address, UnixAddress):
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    if isinstance(address, TCPAddress):
        return HostnameEndpoint(reactor, address.host, address.port,
                                timeout=timeout)
    raise TypeError(f"Not an NBD address: {address!r}")
