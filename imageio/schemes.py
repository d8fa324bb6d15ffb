# -*- test-case-name: test.test_tickets -*-
"""
The ticket url schemes, and which backend serves each.

The control API accepts only these (the reference's set; SPEC B §2:
anything else is 400 "Unsupported url scheme"); L{imageio.backends.open}
opens the backend the scheme names. nbd+unix is our addition (SPEC A7).
Kept apart from the backends, so that L{imageio.tickets} validates urls
without importing them.
"""

from __future__ import annotations

__all__ = ["FILE", "NBD", "HTTP", "SCHEMES"]

FILE = ("file",)
NBD = ("nbd", "nbd+unix")
HTTP = ("http", "https")

SCHEMES = FILE + NBD + HTTP
