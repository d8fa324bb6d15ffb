# -*- test-case-name: test.test_endpoints -*-
"""
Server TLS: options from the C{[tls]} section, and a connection creator
whose key and certificate can be replaced while running.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from OpenSSL import SSL, crypto
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.logs import Logger

__all__ = ["TLSError", "TLSFiles", "tlsOptions", "ReloadableTLS",
           "RELOAD_TIMEOUT"]

RELOAD_TIMEOUT = 10
"""
Seconds a reload may take to read the key and certificate files before it
is given up (the old ones stay in use).
"""

_log = Logger()


class TLSError(Exception):
    """
    The TLS configuration cannot be used; the message says why, for the
    operator.
    """


@dataclass(frozen=True)
class TLSFiles:
    """
    What a TLS server needs: the C{[tls]} options that matter here.
    """
    key_file: str
    cert_file: str
    enable_tls1_1: bool = False


def _readPEM(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read TLS {what} {path!r}: {e.strerror}")


CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""
The TLS 1.2 suites offered: forward secret (ECDHE) and AEAD (AES-GCM,
ChaCha20-Poly1305) only, as the reference's. Twisted's default list also
takes RSA key exchange, finite-field DHE and CBC suites. TLS 1.3 suites are
OpenSSL's (all forward secret and AEAD); this list does not touch them.
"""

CIPHERS_TLS1_1 = CIPHERS + ":ECDHE+AES:@SECLEVEL=0"
"""
The suites with C{[tls] enable_tls1_1}: TLS 1.1 has no AEAD suite, so the
ECDHE CBC suites are added (still forward secret); the security level is
lowered, or OpenSSL refuses TLS 1.1 whatever the minimum version.
"""


def tlsOptions(tls) -> ssl.CertificateOptions:
    """
    Server TLS options: minimum TLS 1.2, or 1.1 with C{enable_tls1_1};
    never TLS 1.0 (SPEC A3). TLS 1.2 suites from L{CIPHERS}, server
    preference.

    @param tls: the C{[tls]} section, or a L{TLSFiles}.
    @raise TLSError: the key or certificate is missing or unreadable.
    """
    if not tls.key_file or not tls.cert_file:
        raise TLSError(
            "TLS is enabled, but [tls] key_file or cert_file is not set")
    keyPEM = _readPEM(tls.key_file, "key file")
    certPEM = _readPEM(tls.cert_file, "certificate file")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, keyPEM)
    except crypto.Error:
        raise TLSError(f"invalid TLS key file {tls.key_file!r}")
    certs = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for part in certPEM.split(marker)[1:]:
        try:
            certs.append(crypto.load_certificate(crypto.FILETYPE_PEM,
                                                 marker + part))
        except crypto.Error:
            raise TLSError(f"invalid TLS certificate file {tls.cert_file!r}")
    if not certs:
        raise TLSError(
            f"no certificate in TLS certificate file {tls.cert_file!r}")
    kw = {}
    if tls.enable_tls1_1:
        kw["insecurelyLowerMinimumTo"] = ssl.TLSVersion.TLSv1_1
    else:
        kw["raiseMinimumTo"] = ssl.TLSVersion.TLSv1_2
    try:
        opts = ssl.CertificateOptions(
            privateKey=key.to_cryptography_key(),
            certificate=certs[0].to_cryptography(),
            extraCertChain=[c.to_cryptography() for c in certs[1:]] or None,
            **kw)
        ctx = opts.getContext()
        # CertificateOptions keeps only the suites it knows and drops
        # @SECLEVEL from a cipher string: set the list on the (cached)
        # context itself.
        ctx.set_cipher_list(
            (CIPHERS_TLS1_1 if tls.enable_tls1_1 else CIPHERS).encode())
    except Exception as e:
        raise TLSError(f"invalid TLS configuration: {e}")
    # No renegotiation: a body thread may own a connection's OpenSSL
    # object (imageio.web.handoff), and nothing may make the reactor
    # rekey it meanwhile. TLS 1.3 has none; the reference's Python ssl
    # refuses client renegotiation too.
    ctx.set_options(SSL.OP_NO_RENEGOTIATION)
    return opts


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    Server TLS whose key and certificate can be replaced while running
    (SIGHUP, SPEC A3): each new connection takes the options current at its
    handshake; connections already open keep theirs.

    @ivar options: the current L{ssl.CertificateOptions}.
    @ivar _reader: the thread of the last reload, or C{None}.
    """

    def __init__(self, tls):
        self._tls = tls
        self.options = tlsOptions(tls)
        self._reader: threading.Thread | None = None

    def reload(self, reactor=None,
               timeout: float = RELOAD_TIMEOUT) -> defer.Deferred:
        """
        Read the key and certificate files again, in a thread of its own:
        a file that blocks (a FIFO, a hung mount) must not stop the
        reactor. On failure, or if reading takes more than C{timeout}
        seconds, the old files stay in use and the error is logged. While
        a reload that timed out is still blocked, later ones fail at once
        (one stuck thread at most).

        @return: L{Deferred} firing with whether the new files are in use.
        """
        if reactor is None:
            from twisted.internet import reactor
        if self._reader is not None and self._reader.is_alive():
            _log.error("TLS reload failed, keeping the old certificate: an "
                       "earlier reload is still reading {key} or {cert}",
                       key=self._tls.key_file, cert=self._tls.cert_file)
            return defer.succeed(False)
        done = defer.Deferred()

        def read():
            try:
                result = tlsOptions(self._tls)
            except Exception:
                result = Failure()
            reactor.callFromThread(finish, result)

        def finish(result):
            if done.called:
                _log.info("TLS reload that timed out ended; its result is "
                          "ignored")
                return
            timer.cancel()
            if isinstance(result, Failure):
                error = (result.value if result.check(TLSError)
                         else result.getErrorMessage())
                _log.error("TLS reload failed, keeping the old certificate: "
                           "{error}", error=error)
                done.callback(False)
                return
            self.options = result
            _log.info("TLS key and certificate reloaded from {cert}",
                      cert=self._tls.cert_file)
            done.callback(True)

        def timedOut():
            _log.error("TLS reload failed, keeping the old certificate: "
                       "reading {key} and {cert} took more than {timeout} s",
                       key=self._tls.key_file, cert=self._tls.cert_file,
                       timeout=timeout)
            done.callback(False)

        timer = reactor.callLater(timeout, timedOut)
        # A daemon thread: a read that never returns must not keep the
        # process from exiting (a pool thread would be joined on stop).
        self._reader = threading.Thread(target=read, daemon=True,
                                        name="imageio-tls-reload")
        self._reader.start()
        return done

    def serverConnectionForTLS(self, protocol):
        return self.options.serverConnectionForTLS(protocol)
