# -*- test-case-name: test.test_backend_http -*-
"""
The http(s) backend: an image served by another imageio daemon.

This is what the daemon uses when it runs as a proxy (on the engine host):
a ticket url C{https://host:54322/images/<id>} makes every request on that
ticket go to the daemon of C{host}, speaking the same images API (SPEC B §3
"http", C §2.2, C §2.3).

Opening a backend:

  1. Builds an L{Agent} with its own L{HTTPConnectionPool}. TLS is verified
     with L{BrowserLikePolicyForHTTPS}: the trust root is
     C{[backend_http] ca_file}, else C{[tls] ca_file}, else the platform's
     store; the host name is always checked (service_identity).
  2. Sends C{OPTIONS <path>} to learn the features (C{extents}, C{zero},
     C{flush}), C{max_readers}/C{max_writers} and C{unix_socket}. Legacy
     answers (405, 204) and a 200 without valid JSON mean "no features";
     any other error status reaches our client with the same status and
     text.
  3. Moves to HTTP over the remote's unix socket when it advertises one and
     the TCP connection is local (our address equals the peer's).
  4. Learns the image size (L{IBackend.size} is synchronous): the end of
     the last zero extent, or, without extents, the content-length of a GET
     without Range whose connection is then dropped.

Besides L{IBackend}, two streaming methods let the images layer relay a
whole client request as one upstream request, with backpressure end to end:
L{HTTPBackend.readTo} (downloads) and L{HTTPBackend.writeFrom} (uploads).

The package's modules, by responsibility:

  - L{imageio.backends.http._upstream}: reaching and trusting the remote
    (endpoints, pool, CA file), its failures, small bodies;
  - L{imageio.backends.http._backend}: L{open}, L{splitURL} and
    L{HTTPBackend} (L{HTTPBackend.connect} is how the client opens one);
  - L{imageio.backends.http._relay}: the two streaming relays
    (L{HTTPBackend.readTo}'s response body, L{UploadStream}) and
    L{ProducerRelay}.
"""

from __future__ import annotations

from imageio.backends.http._backend import (
    DEFAULT_BUFFER_SIZE, DEFAULT_MAX_CONNECTIONS, OPTIONS_TIMEOUT,
    HTTPBackend, InvalidURL, open, splitURL)
from imageio.backends.http._relay import (
    STREAM_WRITE_SIZE, UPLOAD_HIGH_WATER, ProducerRelay, UploadStream,
    uploadStream)
from imageio.backends.http._upstream import (
    CONNECT_TIMEOUT, ERROR_TEXT_LIMIT, IDLE_TIMEOUT, ZERO_CHUNK,
    UpstreamTLSError, trustRoot)

__all__ = ["open", "HTTPBackend", "UploadStream", "uploadStream",
           "ProducerRelay", "splitURL", "InvalidURL",
           "UpstreamTLSError", "trustRoot", "CONNECT_TIMEOUT",
           "OPTIONS_TIMEOUT", "IDLE_TIMEOUT", "DEFAULT_BUFFER_SIZE",
           "DEFAULT_MAX_CONNECTIONS", "ERROR_TEXT_LIMIT", "ZERO_CHUNK",
           "UPLOAD_HIGH_WATER", "STREAM_WRITE_SIZE"]
