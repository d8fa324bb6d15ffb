"""
Backend abilities (L{imageio.abilities}): each backend declares what it
can do, the declarations hold, and nothing in the package asks for an
ability by looking for a method or by a backend's name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from zope.interface.verify import verifyClass

from imageio import abilities
from imageio.abilities import (
    IPageCacheFreeSource, IPieceReads, IPipelined, IStreamingRelay,
    IThreadSource, IThreadTarget, IVectoredWrite, IZeroSteps)
from imageio.backends import IBackend
from imageio.backends.file import FileBackend
from imageio.backends.http import HTTPBackend
from imageio.backends.memory import MemoryBackend
from imageio.backends.nbd import NBDBackend

PACKAGE = Path(__file__).resolve().parent.parent / "imageio"

DECLARED = {
    FileBackend: {IVectoredWrite, IZeroSteps, IThreadTarget,
                  IPageCacheFreeSource},
    NBDBackend: {IPipelined, IPieceReads, IThreadSource, IThreadTarget},
    HTTPBackend: {IPipelined, IStreamingRelay},
    MemoryBackend: set(),
}

ALL = {IPageCacheFreeSource, IPieceReads, IPipelined, IStreamingRelay,
       IThreadSource, IThreadTarget, IVectoredWrite, IZeroSteps}


@pytest.mark.parametrize("cls", list(DECLARED), ids=lambda c: c.__name__)
def test_declared(cls):
    assert IBackend.implementedBy(cls)
    for iface in ALL:
        assert iface.implementedBy(cls) == (iface in DECLARED[cls]), iface
    for iface in DECLARED[cls]:
        # The methods exist with the declared signatures (attributes are
        # set per instance, so only methods are checked here).
        verifyClass(iface, cls)


def test_pipelined_depths():
    for cls in (NBDBackend, HTTPBackend):
        backend = cls.__new__(cls)
        assert abilities.readDepth(backend) == cls.readDepth
        assert abilities.writeDepth(backend) == cls.writeDepth
    memory = MemoryBackend()
    assert abilities.readDepth(memory) == abilities.DEFAULT_READ_DEPTH
    assert abilities.writeDepth(memory) == abilities.DEFAULT_WRITE_DEPTH


def _methods():
    names = set()
    for iface in ALL:
        names |= {n for n in iface.names()
                  if callable(getattr(iface[n], "getSignatureInfo", None))}
    return names


def test_no_probing():
    # Abilities are asked with providedBy: no getattr/hasattr of an ability
    # method anywhere in the package, and no decision on a backend's name.
    methods = _methods() | {"maxZeroStep"}
    assert {"threadTarget", "threadSource", "pageCacheSource", "readPieces",
            "writev", "readTo"} <= methods
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in methods):
                found.append(f"{path.name}:{node.lineno} "
                             f"{node.func.id}(..., {node.args[1].value!r})")
            elif (isinstance(node, ast.Compare)
                    and isinstance(node.left, ast.Attribute)
                    and node.left.attr == "name"
                    and any(isinstance(c, ast.Constant)
                            and c.value in ("file", "nbd", "http", "memory")
                            for c in node.comparators)):
                found.append(f"{path.name}:{node.lineno} .name compared")
    assert not found, "\n".join(found)
