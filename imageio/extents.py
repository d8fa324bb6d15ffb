# -*- test-case-name: test.test_extents -*-
"""
Extent records reported by backends and by C{/images/{id}/extents}.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ZeroExtent", "DirtyExtent"]


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
