# -*- test-case-name: test.test_blkhash -*-
"""
The "blkhash" image checksum (SPEC B §5).

The image is cut into consecutive blocks of C{blockSize} bytes starting at
offset 0 (the last block may be shorter). Each block is hashed on its own,
and the checksum is the hash of the concatenated block digests, as lowercase
hex. Both levels use the same algorithm and digest size.

L{Hasher} computes it incrementally: feed the image in order, in chunks of
any size, with L{Hasher.update} for bytes and L{Hasher.zero} for ranges known
to read as zeroes. Whole zero blocks cost one precomputed digest instead of
hashing C{blockSize} zero bytes; the result is always the same as hashing
every byte.

Nothing here has shared mutable state: one L{Hasher} may be fed from any
thread (hashlib releases the GIL for large inputs), as long as the calls on
one instance are made one after the other.

Blocks are independent, so their digests may be computed out of order and
on several threads: L{blocks} cuts an image into data blocks and runs of
zero blocks from its extents, L{Hasher.blockDigest} (safe on any thread,
any number at once) hashes one data block, and L{Hasher.addBlock} /
L{Hasher.zero} add the results in image order.
"""

from __future__ import annotations

import functools
import hashlib

from imageio.units import KiB, MiB

__all__ = [
    "ALGORITHM", "ALGORITHMS", "BLOCK_SIZE", "DIGEST_SIZE", "Hasher",
    "blocks", "digestSizeFor", "isZero",
]

BLOCK_SIZE = 4 * MiB
ALGORITHM = "blake2b"
DIGEST_SIZE = 32

# isZero compares slices of this size: the temporary copies stay in cache,
# and it stops early on data (measured ~16 GB/s on all-zero input).
_ZERO_CHUNK = 256 * KiB
_ZEROS = bytes(_ZERO_CHUNK)

# Upper bound on the bytes handed to the outer hash in one call when many
# zero blocks are added at once.
_MAX_DIGEST_BATCH = 1 * MiB


def digestSizeFor(algorithm: str) -> int | None:
    """
    The digest size the daemon uses for C{algorithm}.

    @return: L{DIGEST_SIZE} for the C{blake2*} family (the only ones with a
        variable size), C{None} (the algorithm's own size) for the others.
    """
    return DIGEST_SIZE if algorithm.startswith("blake2") else None


def _constructor(algorithm: str, digestSize: int | None):
    """
    A callable returning a fresh hash object. Works for the names hashlib
    has as attributes and for the OpenSSL-only ones (C{sha512_224},
    C{sm3}, ...) that only C{hashlib.new} knows.
    """
    kwargs = {} if digestSize is None else {"digest_size": digestSize}
    builtin = getattr(hashlib, algorithm, None)
    if callable(builtin):
        return functools.partial(builtin, **kwargs)
    return functools.partial(hashlib.new, algorithm, **kwargs)


def _usable(algorithm: str) -> bool:
    """
    Whether C{algorithm} can really hash here with our digest size.
    """
    try:
        h = _constructor(algorithm, digestSizeFor(algorithm))()
        h.update(b"x")
        h.hexdigest()
    except (ValueError, TypeError):
        return False
    return True


# hashlib.algorithms_available can list names the OpenSSL build refuses. The
# shake_* XOFs need a length for hexdigest() and are never offered (SPEC A11).
ALGORITHMS: list[str] = sorted(
    name for name in hashlib.algorithms_available
    if not name.startswith("shake_") and _usable(name))


def isZero(buf) -> bool:
    """
    Whether a bytes-like object holds only zero bytes.

    Compares slices with a preallocated zero buffer, so it runs at memory
    speed with no per-byte Python work, and returns early on data.
    """
    with memoryview(buf) as view, view.cast("B") as flat:
        length = len(flat)
        # Data usually differs from zero in its first bytes: look there
        # before walking the whole buffer. bytes == bytes is one memcmp,
        # while comparing memoryviews goes item by item (40 times slower).
        first = min(length, 4 * KiB)
        if flat[:first].tobytes() != _ZEROS[:first]:
            return False
        pos = first
        while pos < length:
            end = min(pos + _ZERO_CHUNK, length)
            chunk = flat[pos:end].tobytes()
            if len(chunk) == _ZERO_CHUNK:
                if chunk != _ZEROS:
                    return False
            elif chunk != _ZEROS[:len(chunk)]:
                return False
            pos = end
    return True


def _feedZeros(h, count: int) -> None:
    """
    Add C{count} zero bytes to hash object C{h} without allocating them.
    """
    while count:
        n = min(count, _ZERO_CHUNK)
        h.update(_ZEROS if n == _ZERO_CHUNK else _ZEROS[:n])
        count -= n


@functools.lru_cache(maxsize=64)
def _zeroBlockDigest(algorithm: str, blockSize: int,
                     digestSize: int | None) -> bytes:
    """
    The digest of C{blockSize} zero bytes (cached; the result is immutable).
    """
    h = _constructor(algorithm, digestSize)()
    _feedZeros(h, blockSize)
    return h.digest()


def blocks(extents, size: int, blockSize: int):
    """
    Cut an image into what L{Hasher} needs, from its zero extents.

    A block that holds any byte of a data extent is a data block: it must
    be read (as a whole) and hashed. Every other block reads as zeroes and
    needs no read. Consecutive zero blocks come as one run, so an 8 TiB
    hole is one item, not two million.

    @param extents: L{ZeroExtent}-like objects (C{start}, C{end}, C{zero})
        in image order, not overlapping. Ranges no extent covers, and
        anything past C{size}, read as zeroes.
    @param size: the image size.
    @param blockSize: the block size.
    @return: an iterator of C{(start, length, zero)} covering C{[0, size)}
        in order: data items are one block each (the last block of the
        image may be short), zero items whole runs of blocks.
    """
    done = 0                       # blocks [0, done) were given out
    count = -(-size // blockSize)  # blocks in the image

    def item(first, last, zero):
        start = first * blockSize
        return start, min(last * blockSize, size) - start, zero

    for e in extents:
        if e.zero:
            continue
        end = min(e.end, size)
        if e.start >= end:
            continue
        first = max(e.start // blockSize, done)
        last = (end - 1) // blockSize + 1
        if first >= last:
            continue
        if first > done:
            yield item(done, first, True)
        for i in range(first, last):
            yield item(i, i + 1, False)
        done = last
    if done < count:
        yield item(done, count, True)


class Hasher:
    """
    Incremental blkhash of one image.

    Feed the image from offset 0 to its end, in order, with L{update} and
    L{zero}; chunk boundaries do not matter. Then read L{hexdigest} (or
    L{result}). Reading the digest does not end the computation.

    Full blocks are hashed straight from the caller's buffer. Only a block
    split across calls is hashed incrementally, so the instance never keeps
    image data.

    @ivar algorithm: the hashlib name.
    @ivar blockSize: the block size in bytes.
    @ivar digestSize: the digest size given to the hash (C{None}: default).
    @ivar position: bytes consumed so far.
    @ivar _new: returns a fresh hash object.
    @ivar _outer: hash of the block digests so far.
    @ivar _block: hash of the current partial block, or C{None}.
    @ivar _filled: bytes in the current partial block.
    @ivar _detectZeroes: check full data blocks with L{isZero} first.
    @ivar _ended: a short (last) block was added with L{addBlock}.
    """

    def __init__(self, algorithm: str = ALGORITHM,
                 blockSize: int = BLOCK_SIZE, digestSize: int | None = -1,
                 detectZeroes: bool = True):
        """
        @param algorithm: one of L{ALGORITHMS}.
        @param blockSize: positive block size in bytes.
        @param digestSize: digest size in bytes; by default
            L{digestSizeFor}C{(algorithm)}, as the daemon does.
        @param detectZeroes: use the zero-block digest for all-zero blocks
            given to L{update} (same result, faster on sparse images).
        @raise ValueError: for an unknown algorithm or a bad block size.
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Unsupported algorithm: {algorithm!r}")
        if not isinstance(blockSize, int) or blockSize <= 0:
            raise ValueError(f"Invalid block size: {blockSize!r}")
        if digestSize == -1:
            digestSize = digestSizeFor(algorithm)
        self.algorithm = algorithm
        self.blockSize = blockSize
        self.digestSize = digestSize
        self.position = 0
        self._new = _constructor(algorithm, digestSize)
        self._outer = self._new()
        self._block = None
        self._filled = 0
        self._detectZeroes = detectZeroes
        self._ended = False

    def _checkOpen(self) -> None:
        if self._ended:
            raise ValueError("Data added after the short last block")

    def _zeroDigest(self) -> bytes:
        return _zeroBlockDigest(self.algorithm, self.blockSize,
                                self.digestSize)

    def _endBlock(self) -> None:
        self._outer.update(self._block.digest())
        self._block = None
        self._filled = 0

    def update(self, data) -> None:
        """
        Add the next bytes of the image.

        @param data: a bytes-like object of any length.
        """
        self._checkOpen()
        bs = self.blockSize
        with memoryview(data) as view, view.cast("B") as flat:
            length = len(flat)
            pos = 0
            if self._filled:
                pos = min(length, bs - self._filled)
                self._block.update(flat[:pos])
                self._filled += pos
                if self._filled == bs:
                    self._endBlock()
            while length - pos >= bs:
                with flat[pos:pos + bs] as block:
                    if self._detectZeroes and isZero(block):
                        self._outer.update(self._zeroDigest())
                    else:
                        self._outer.update(self._new(block).digest())
                pos += bs
            if pos < length:
                self._block = self._new()
                self._block.update(flat[pos:])
                self._filled = length - pos
        self.position += length

    def blockDigest(self, data) -> bytes:
        """
        The digest of one block, for L{addBlock}.

        Touches no state of the instance, so any number of calls may run at
        once on any threads (hashlib releases the GIL while it hashes).

        @param data: the block: a bytes-like object, or a list of them
            whose concatenation is the block. Its length is C{blockSize},
            or less for the last block of the image.
        """
        parts = data if isinstance(data, list) else [data]
        length = sum(memoryview(p).nbytes for p in parts)
        if self._detectZeroes and all(isZero(p) for p in parts):
            return _zeroBlockDigest(self.algorithm, length, self.digestSize)
        h = self._new()
        for p in parts:
            h.update(p)
        return h.digest()

    def addBlock(self, digest: bytes, length: int) -> None:
        """
        Add the next block of the image by its digest (L{blockDigest}).

        @param length: the block's length: C{blockSize}, or less for the
            last block of the image.
        @raise ValueError: if the image so far does not end on a block
            boundary, or C{length} is out of range.
        """
        self._checkOpen()
        if self._filled:
            raise ValueError(
                f"Block added at {self.position}, inside a block")
        if not 0 < length <= self.blockSize:
            raise ValueError(f"Invalid block length: {length}")
        if length < self.blockSize:
            # Only the image's last block is short: nothing may follow.
            self._ended = True
        self._outer.update(digest)
        self.position += length

    def zero(self, count: int) -> None:
        """
        Add C{count} zero bytes (a range known to read as zeroes).

        Whole blocks use the precomputed digest. The parts of blocks shared
        with data (a range starting or ending mid-block) are hashed as
        zeroes, so the result equals L{update} with the same zeroes.
        """
        if count < 0:
            raise ValueError(f"Invalid count: {count}")
        self._checkOpen()
        self.position += count
        bs = self.blockSize
        if self._filled:
            n = min(count, bs - self._filled)
            _feedZeros(self._block, n)
            self._filled += n
            count -= n
            if self._filled == bs:
                self._endBlock()
        blocks, rest = divmod(count, bs)
        if blocks:
            digest = self._zeroDigest()
            batch = max(1, _MAX_DIGEST_BATCH // len(digest))
            while blocks:
                n = min(blocks, batch)
                self._outer.update(digest * n)
                blocks -= n
        if rest:
            self._block = self._new()
            _feedZeros(self._block, rest)
            self._filled = rest

    def digest(self) -> bytes:
        """
        @return: the checksum of the bytes added so far.
        """
        outer = self._outer.copy()
        if self._filled:
            outer.update(self._block.digest())
        return outer.digest()

    def hexdigest(self) -> str:
        """
        @return: the checksum of the bytes added so far, lowercase hex.
        """
        return self.digest().hex()

    def result(self) -> dict:
        """
        @return: the checksum as the C{/checksum} resource reports it:
            C{{"algorithm", "block_size", "checksum"}}.
        """
        return {"algorithm": self.algorithm, "block_size": self.blockSize,
                "checksum": self.hexdigest()}
