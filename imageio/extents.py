# -*- test-case-name: test.test_extents -*-
"""
Extent records reported by backends and by C{/images/{id}/extents}.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ZeroExtent", "DirtyExtent", "encode"]


@dataclass(frozen=True)
class ZeroExtent:
    """
    A range of the image in the C{zero} context.

    @ivar zero: the range reads as zeroes.
    @ivar hole: the range is unallocated in the top layer (exposes backing).
    """
    start: int
    length: int
    zero: bool
    hole: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    def toDict(self) -> dict:
        return {"start": self.start, "length": self.length,
                "zero": self.zero, "hole": self.hole}


@dataclass(frozen=True)
class DirtyExtent:
    """
    A range of the image in the C{dirty} context.

    @ivar dirty: the range changed since the bitmap was started.
    @ivar zero: the range reads as zeroes.
    """
    start: int
    length: int
    dirty: bool
    zero: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    def toDict(self) -> dict:
        return {"start": self.start, "length": self.length,
                "dirty": self.dirty, "zero": self.zero}


# The JSON text of each extent after its start and length, by its two flags;
# the same text json.dumps gives for toDict(), keys in the same order.
_TAILS = {
    cls: {(a, b): f'"{names[0]}": {str(a).lower()}, '
          f'"{names[1]}": {str(b).lower()}}}'
          for a in (False, True) for b in (False, True)}
    for cls, names in ((ZeroExtent, ("zero", "hole")),
                       (DirtyExtent, ("dirty", "zero")))}


def encode(extents) -> bytes:
    """
    The JSON list of C{extents} (L{ZeroExtent} or L{DirtyExtent}, integer
    starts and lengths) and a newline: byte for byte what
    C{json.dumps([e.toDict() for e in extents]) + "\\n"} gives, about 6
    times faster (32,768 extents: ~13 ms instead of ~85 ms).
    """
    parts = []
    append = parts.append
    for e in extents:
        if isinstance(e, ZeroExtent):
            tail = _TAILS[ZeroExtent][e.zero, e.hole]
        else:
            tail = _TAILS[DirtyExtent][e.dirty, e.zero]
        append('{"start": %d, "length": %d, %s' % (e.start, e.length, tail))
    return ("[" + ", ".join(parts) + "]\n").encode("ascii")
