"""
Endpoints from strports strings: our imageio-tls: parser plugin, the
description builders (quoting, abstract sockets), and reloadable TLS.
"""

from __future__ import annotations

import socket
import ssl

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet import endpoints, reactor, threads
from twisted.web import resource, server

from imageio import endpoints as iendpoints
from imageio.tls import ReloadableTLS, TLSError, TLSFiles
from test.support import makePKI


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


def site():
    return server.Site(Hello())


def tlsGet(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := t.recv(4096):
                data += chunk
            return data, t.version()


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\0"),
               min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_quote_round_trips(path):
    path = "/" + path
    ep = endpoints.serverFromString(reactor,
                                    iendpoints.unixDescription(path, 0o660))
    assert ep._address == path
    assert ep._mode == 0o660
    assert ep._wantPID is False


def test_abstract_unix_description():
    ep = endpoints.serverFromString(
        reactor, iendpoints.unixDescription("\0/org/ovirt/imageio"))
    assert ep._address == "\0/org/ovirt/imageio"


@pytest.mark.parametrize("address,cls", [
    ("::", endpoints.TCP6ServerEndpoint),
    ("127.0.0.1", endpoints.TCP4ServerEndpoint),
    ("0.0.0.0", endpoints.TCP4ServerEndpoint),
    ("::1", endpoints.TCP6ServerEndpoint)])
def test_tcp_description(address, cls):
    ep = endpoints.serverFromString(
        reactor, iendpoints.tcpDescription(address, 54322))
    assert isinstance(ep, cls)
    assert ep._interface == address
    assert ep._port == 54322
    assert ep._backlog == 40


def test_tls_description_parsed_by_plugin(tmp_path):
    pki = makePKI(str(tmp_path / "a:b=c"))  # paths needing quoting
    desc = iendpoints.tlsDescription("::", 54322, TLSFiles(pki.key, pki.cert))
    assert desc.startswith("imageio-tls:54322:")
    ep = endpoints.serverFromString(reactor, desc)
    assert isinstance(ep, iendpoints.TLSServerEndpoint)
    assert isinstance(ep._inner, endpoints.TCP6ServerEndpoint)


def test_tls_missing_files():
    with pytest.raises(TLSError) as e:
        endpoints.serverFromString(reactor, "imageio-tls:0")
    assert "key_file or cert_file is not set" in str(e.value)
    with pytest.raises(TLSError) as e:
        ReloadableTLS(TLSFiles("/no/key.pem", "/no/cert.pem"))
    assert "cannot read TLS key file '/no/key.pem'" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_tls_listen_and_reload(tmp_path):
    first = makePKI(str(tmp_path / "first"))
    second = makePKI(str(tmp_path / "second"), caName="second CA")
    ep = endpoints.serverFromString(reactor, iendpoints.tlsDescription(
        "127.0.0.1", 0, TLSFiles(first.key, first.cert)))
    port = await ep.listen(site())
    try:
        n = port.getHost().port
        body, version = await threads.deferToThread(tlsGet, n, first.ca)
        assert body.endswith(b"hello")
        assert version in ("TLSv1.2", "TLSv1.3")
        # Replace the files; the old certificate serves until reload.
        for name in ("key", "cert"):
            with open(getattr(second, name), "rb") as src, \
                    open(getattr(first, name), "wb") as dst:
                dst.write(src.read())
        assert await ep.tls.reload() is True
        body, _ = await threads.deferToThread(tlsGet, n, second.ca)
        assert body.endswith(b"hello")
        with pytest.raises(ssl.SSLCertVerificationError):
            await threads.deferToThread(tlsGet, n, first.ca)
        # Broken files: reload fails, the current certificate stays.
        with open(first.cert, "w") as f:
            f.write("garbage")
        assert await ep.tls.reload() is False
        body, _ = await threads.deferToThread(tlsGet, n, second.ca)
        assert body.endswith(b"hello")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tls_reload_fifo_times_out(tmp_path):
    # A key file that blocks on open: the reload gives up after its
    # timeout, the reactor serves meanwhile, a second reload fails at once
    # while the first still blocks, and the old certificate stays.
    import os
    import time
    first = makePKI(str(tmp_path / "first"))
    ep = endpoints.serverFromString(reactor, iendpoints.tlsDescription(
        "127.0.0.1", 0, TLSFiles(first.key, first.cert)))
    port = await ep.listen(site())
    key = open(first.key, "rb").read()
    try:
        os.unlink(first.key)
        os.mkfifo(first.key)
        started = time.monotonic()
        d = ep.tls.reload(reactor, timeout=0.5)
        assert not d.called
        # Served while the reload blocks.
        body, _ = await threads.deferToThread(tlsGet, port.getHost().port,
                                              first.ca)
        assert body.endswith(b"hello")
        assert await d is False
        assert time.monotonic() - started < 5
        assert await ep.tls.reload(reactor, timeout=0.5) is False
        body, _ = await threads.deferToThread(tlsGet, port.getHost().port,
                                              first.ca)
        assert body.endswith(b"hello")
    finally:
        # Let the blocked thread go.
        fd = os.open(first.key, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, key)
        os.close(fd)
        await port.stopListening()
