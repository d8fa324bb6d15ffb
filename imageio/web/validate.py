# -*- test-case-name: test.test_validate -*-
"""
Validation of JSON request messages, with the reference's error texts
(clients show them to users).

Unlike the reference, a message that is not a JSON object, and numbers too
large for any image, are the client's fault: 400, never 500 (SPEC A17).
"""

from __future__ import annotations

from imageio.errors import BadRequest

__all__ = ["requireObject", "enum", "integer", "boolean"]

# Nothing we handle is larger than a signed 64-bit offset.
MAX_INT = 2**63 - 1

_MISSING = object()

# Client values are echoed in error texts at most this long: a huge value
# must not come back whole in the reply (test_properties).
_MAX_REPR = 64


def _shortRepr(value) -> str:
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[:_MAX_REPR] + "..."
    return text


def requireObject(obj, what: str = "message") -> dict:
    if not isinstance(obj, dict):
        raise BadRequest(f"Invalid {what}: expecting a JSON object, got "
                         f"{_shortRepr(obj)}")
    return obj


def enum(d: dict, name: str, values, default=None):
    val = d.get(name, _MISSING)
    if val is _MISSING:
        if default is not None:
            return default
        raise BadRequest(f"Missing required value for {name}")
    if not isinstance(val, str) or val not in values:
        raise BadRequest(
            f"Unsupported value {_shortRepr(val)} for {name!r}, expecting "
            f"one of "
            f"{sorted(values)}")
    return val


def integer(d: dict, name: str, minval=None, maxval=MAX_INT, default=None):
    """
    As the reference, JSON C{true} passes as an integer (a Python bool is an
    int); callers relied on it for years, so it stays.
    """
    val = d.get(name, _MISSING)
    if val is _MISSING:
        if default is not None:
            return default
        raise BadRequest(f"Missing required value for {name!r}")
    if not isinstance(val, int):
        raise BadRequest(f"Integer required {_shortRepr(val)}")
    if minval is not None and val < minval:
        raise BadRequest(f"Invalid value {_shortRepr(val)} < {minval}")
    if maxval is not None and val > maxval:
        raise BadRequest(f"Invalid value {_shortRepr(val)} > {maxval}")
    return int(val)


def boolean(d: dict, name: str, default=False):
    val = d.get(name, _MISSING)
    if val is _MISSING:
        if default is not None:
            return default
        raise BadRequest(f"Missing required value for {name!r}")
    if not isinstance(val, bool):
        raise BadRequest(f"Boolean required {_shortRepr(val)}")
    return val
