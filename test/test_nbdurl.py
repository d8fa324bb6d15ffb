# -*- test-case-name: test.test_nbdurl -*-
"""
Tests for L{imageio.protocols.nbdurl}.
"""

from __future__ import annotations

import pytest
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.testing import MemoryReactor

from imageio.protocols.nbdurl import (
    NBDURL, TCPAddress, UnixAddress, clientEndpoint, parse)


@pytest.mark.parametrize("url,expected", [
    # The reference's colon forms.
    ("nbd:unix:/run/vdsm/nbd/x.sock",
     NBDURL(UnixAddress("/run/vdsm/nbd/x.sock"), "")),
    ("nbd:unix:/tmp/s.sock:exportname=sda",
     NBDURL(UnixAddress("/tmp/s.sock"), "sda")),
    ("nbd:unix:/tmp/s.sock:exportname=",
     NBDURL(UnixAddress("/tmp/s.sock"), "")),
    ("nbd:unix:/tmp/s.sock:exportname=/a/b:c",
     NBDURL(UnixAddress("/tmp/s.sock"), "/a/b:c")),
    ("nbd:localhost:10809", NBDURL(TCPAddress("localhost", 10809), "")),
    ("nbd:example.com:2000:exportname=disk",
     NBDURL(TCPAddress("example.com", 2000), "disk")),
    ("nbd:[::1]:10809:exportname=x", NBDURL(TCPAddress("::1", 10809), "x")),
    ("nbd:127.0.0.1:1", NBDURL(TCPAddress("127.0.0.1", 1), "")),
    # The reference's nice form (no percent-decoding, like the reference).
    ("nbd://localhost:10809/sda", NBDURL(TCPAddress("localhost", 10809),
                                         "sda")),
    ("nbd://localhost:10809/", NBDURL(TCPAddress("localhost", 10809), "")),
    ("nbd://localhost:10809", NBDURL(TCPAddress("localhost", 10809), "")),
    ("nbd://localhost:10809//abs", NBDURL(TCPAddress("localhost", 10809),
                                          "/abs")),
    ("nbd://h:1/a%20b", NBDURL(TCPAddress("h", 1), "a%20b")),
    ("nbd://[::1]:2000/x", NBDURL(TCPAddress("::1", 2000), "x")),
    # Standard NBD URIs.
    ("nbd://example.com/disk", NBDURL(TCPAddress("example.com", 10809),
                                      "disk")),
    ("nbd://example.com", NBDURL(TCPAddress("example.com", 10809), "")),
    ("nbd://[fe80::1]/e", NBDURL(TCPAddress("fe80::1", 10809), "e")),
    ("nbd+unix:///?socket=/tmp/s.sock", NBDURL(UnixAddress("/tmp/s.sock"),
                                               "")),
    ("nbd+unix:///sda?socket=/tmp/s.sock",
     NBDURL(UnixAddress("/tmp/s.sock"), "sda")),
    ("nbd+unix:///a%20b?socket=/tmp/my%20dir/s.sock",
     NBDURL(UnixAddress("/tmp/my dir/s.sock"), "a b")),
    ("nbd+unix://?socket=rel.sock", NBDURL(UnixAddress("rel.sock"), "")),
    ("NBD:unix:/x", NBDURL(UnixAddress("/x"), "")),
])
def test_parse(url, expected):
    assert parse(url) == expected


@pytest.mark.parametrize("url", [
    "",
    "nbd",
    "http://host:80/x",
    "file:///tmp/img",
    "nbds://host/x",
    "nbd+vsock:///x",
    "nbd:unix:relative/path",
    "nbd:unix:",
    "nbd:unix:/",
    "nbd:unix:/a:b",
    "nbd:unix:/a:exportnam=x",
    "nbd:host",
    "nbd:host:",
    "nbd:host:port",
    "nbd:host:0",
    "nbd:host:65536",
    "nbd::10809",
    "nbd:::1:10809",
    "nbd:[::1:10809",
    "nbd://host:notaport/x",
    "nbd://host:99999/x",
    "nbd://:10809/x",
    "nbd://host:10809/x?socket=/s",
    "nbd://user@host:10809/x",
    "nbd://[::1/x",
    "nbd://[::1]x/y",
    "nbd+unix:///x",
    "nbd+unix:///x?socket=",
    "nbd+unix:///x?socket=/a&socket=/b",
    "nbd+unix:///x?socket=/a&tls=on",
    "nbd+unix://host/x?socket=/a",
])
def test_parse_bad(url):
    with pytest.raises(ValueError) as e:
        parse(url)
    assert str(e.value)


def test_parse_not_string():
    with pytest.raises(ValueError):
        parse(b"nbd:unix:/x")


@pytest.mark.parametrize("addr,name,url", [
    (UnixAddress("/s"), "", "nbd:unix:/s"),
    (UnixAddress("/s"), "e", "nbd:unix:/s:exportname=e"),
    (TCPAddress("h", 1), "", "nbd:h:1"),
    (TCPAddress("::1", 2), "e", "nbd:[::1]:2:exportname=e"),
])
def test_url_round_trip(addr, name, url):
    assert addr.url(name) == url
    assert parse(url) == NBDURL(addr, name)


def test_endpoint_unix():
    reactor = MemoryReactor()
    ep = clientEndpoint(reactor, UnixAddress("/tmp/s.sock"))
    assert isinstance(ep, UNIXClientEndpoint)
    ep.connect(None)
    assert reactor.unixClients[0][0] == "/tmp/s.sock"


def test_endpoint_tcp():
    ep = clientEndpoint(MemoryReactor(), TCPAddress("::1", 10809))
    assert isinstance(ep, HostnameEndpoint)


def test_endpoint_bad():
    with pytest.raises(TypeError):
        clientEndpoint(MemoryReactor(), "nbd:unix:/x")
