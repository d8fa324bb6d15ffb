# -*- test-case-name: test.test_endpoints -*-
"""
Server TLS: options from the C{[tls]} section, and a connection creator
whose key and certificate can be replaced while running.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from imageio.logs import Logger

__all__ = ["TLSError", "TLSFiles", "tlsOptions", "ReloadableTLS"]

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
    return opts


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    Server TLS whose key and certificate can be replaced while running
    (SIGHUP, SPEC A3): each new connection takes the options current at its
    handshake; connections already open keep theirs.

    @ivar options: the current L{ssl.CertificateOptions}.
    """

    def __init__(self, tls):
        self._tls = tls
        self.options = tlsOptions(tls)

    def reload(self) -> bool:
        """
        Read the key and certificate files again. On failure the old ones
        stay in use and the error is logged.

        @return: whether the new files are in use.
        """
        try:
            self.options = tlsOptions(self._tls)
        except TLSError as e:
            _log.error("TLS reload failed, keeping the old certificate: "
                       "{error}", error=e)
            return False
        _log.info("TLS key and certificate reloaded from {cert}",
                  cert=self._tls.cert_file)
        return True

    def serverConnectionForTLS(self, protocol):
        return self.options.serverConnectionForTLS(protocol)
