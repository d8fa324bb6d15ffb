# -*- test-case-name: test.test_blkhash -*-
"""
Tests for L{imageio.blkhash}.

The expected digests were computed with the reference daemon's own blkhash
(ovirt-imageio 2.5.1) over the same data.
"""

from __future__ import annotations

import hashlib
import mmap
import threading

import pytest
from hypothesis import given, settings, strategies as st

from imageio import blkhash
from imageio.blkhash import Hasher, isZero
from imageio.units import KiB, MiB


def image(size):
    """
    The reference's test image: b"data" and zeroes up to C{size}.
    """
    if not size:
        return b""
    data = bytearray(size)
    data[:4] = b"data"
    return bytes(data)


def plain(data, algorithm="blake2b", blockSize=blkhash.BLOCK_SIZE):
    """
    The definition, straight: hash of the concatenated block digests.
    """
    kw = {"digest_size": 32} if algorithm.startswith("blake2") else {}
    outer = hashlib.new(algorithm, **kw)
    for i in range(0, len(data), blockSize):
        outer.update(hashlib.new(algorithm, data[i:i + blockSize],
                                 **kw).digest())
    return outer.hexdigest()


VECTORS = [
    (4 * MiB, "blake2b",
     "f426bb2cf1e1901fe4e87423950944ecfed6d9d18a09e6e802aa4912e1c9b2d6"),
    (4 * MiB, "sha1", "3ed03b375b6658d99b63ced1867a95aeef080b79"),
    (3 * MiB, "blake2b",
     "42f3b76772a6d3dcffae2a24697721687975e2c60ddfd4ba7831ea9ce772ca71"),
    (5 * MiB, "blake2b",
     "0da53b583fc1fbbac7edea14454c79f84a8107613e614f2c7a47071dfdcf41a6"),
    (0, "blake2b",
     "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"),
    (0, "sha1", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
]


def test_defaults():
    assert blkhash.BLOCK_SIZE == 4 * MiB
    assert blkhash.ALGORITHM == "blake2b"
    assert blkhash.DIGEST_SIZE == 32
    h = Hasher()
    assert (h.algorithm, h.blockSize, h.digestSize) == ("blake2b", 4 * MiB,
                                                        32)


def test_digest_size_for():
    assert blkhash.digestSizeFor("blake2b") == 32
    assert blkhash.digestSizeFor("blake2s") == 32
    assert blkhash.digestSizeFor("sha256") is None
    assert Hasher("blake2s").digestSize == 32
    assert Hasher("sha256").digestSize is None


@pytest.mark.parametrize("size,algorithm,expected", VECTORS)
def test_vectors_update(size, algorithm, expected):
    h = Hasher(algorithm)
    h.update(image(size))
    assert h.hexdigest() == expected


@pytest.mark.parametrize("size,algorithm,expected", VECTORS)
def test_vectors_no_zero_detection(size, algorithm, expected):
    h = Hasher(algorithm, detectZeroes=False)
    h.update(image(size))
    assert h.hexdigest() == expected


@pytest.mark.parametrize("size,algorithm,expected", VECTORS)
def test_vectors_zero_shortcut(size, algorithm, expected):
    h = Hasher(algorithm)
    if size:
        h.update(b"data")
        h.zero(size - 4)
    assert h.hexdigest() == expected


def test_vector_ten_blocks():
    h = Hasher()
    for i in range(10):
        block = bytearray(4 * MiB)
        text = b"%02d\n" % i
        block[:len(text)] = text
        h.update(block)
    assert h.hexdigest() == (
        "7934079f80b53142d738d2bb7efaedf696a3d34d76a7865a24130bc7b4a7acfe")


def test_result():
    h = Hasher("sha1", 1 * MiB)
    assert h.result() == {"algorithm": "sha1", "block_size": 1 * MiB,
                          "checksum": hashlib.sha1().hexdigest()}


def test_digest_is_not_final():
    h = Hasher(blockSize=4096)
    h.update(b"x" * 5000)
    first = h.hexdigest()
    assert h.hexdigest() == first
    h.update(b"y" * 100)
    assert h.hexdigest() == plain(b"x" * 5000 + b"y" * 100,
                                  blockSize=4096)
    assert h.position == 5100


@pytest.mark.parametrize("segments", [
    # (kind, length): zero ranges starting and ending mid-block.
    [("d", 100), ("z", 5000), ("d", 10)],
    [("z", 4095), ("d", 1), ("z", 4096 * 3 + 1)],
    [("z", 1), ("z", 4095), ("z", 8192)],
    [("d", 4096), ("z", 4096 * 5), ("d", 4096)],
    [("d", 3000), ("z", 1096), ("z", 10), ("d", 9000), ("z", 20000)],
    [("z", 0), ("d", 0), ("z", 12288)],
])
def test_zero_equals_hashing_zeroes(segments):
    blockSize = 4096
    h = Hasher(blockSize=blockSize)
    data = bytearray()
    for i, (kind, length) in enumerate(segments):
        if kind == "d":
            chunk = bytes([i + 1]) * length
            h.update(chunk)
        else:
            chunk = bytes(length)
            h.zero(length)
        data += chunk
    assert h.hexdigest() == plain(bytes(data), blockSize=blockSize)


def test_zero_many_blocks():
    """
    A large zero range (batched digests) equals hashing every block.
    """
    blockSize = 4096
    count = 300000
    h = Hasher(blockSize=blockSize)
    h.zero(count * blockSize + 17)
    zeroDigest = hashlib.blake2b(bytes(blockSize), digest_size=32).digest()
    outer = hashlib.blake2b(digest_size=32)
    outer.update(zeroDigest * count)
    outer.update(hashlib.blake2b(bytes(17), digest_size=32).digest())
    assert h.hexdigest() == outer.hexdigest()


def test_zero_negative():
    with pytest.raises(ValueError):
        Hasher().zero(-1)


def test_algorithms():
    assert blkhash.ALGORITHMS == sorted(blkhash.ALGORITHMS)
    assert "blake2b" in blkhash.ALGORITHMS
    assert "sha256" in blkhash.ALGORITHMS
    assert not [a for a in blkhash.ALGORITHMS if a.startswith("shake_")]
    assert set(blkhash.ALGORITHMS) <= hashlib.algorithms_available


@pytest.mark.parametrize("algorithm", blkhash.ALGORITHMS)
def test_every_algorithm(algorithm):
    data = b"abc" * 5000 + bytes(9000)
    h = Hasher(algorithm, blockSize=4096)
    h.update(data[:7000])
    h.zero(9000)
    h.update(data[7000:15000])
    h = Hasher(algorithm, blockSize=4096)
    h.update(data)
    assert h.hexdigest() == plain(data, algorithm, 4096)
    hexdigest = h.hexdigest()
    assert hexdigest == hexdigest.lower()
    int(hexdigest, 16)


def test_unsupported_algorithm():
    for name in ("shake_128", "nope", ""):
        with pytest.raises(ValueError):
            Hasher(name)


@pytest.mark.parametrize("blockSize", [0, -1, 1.5])
def test_bad_block_size(blockSize):
    with pytest.raises(ValueError):
        Hasher(blockSize=blockSize)


def test_update_accepts_buffers():
    data = b"q" * 10000
    expected = plain(data, blockSize=4096)
    for buf in (bytearray(data), memoryview(data),
                memoryview(bytearray(data)).cast("c")):
        h = Hasher(blockSize=4096)
        h.update(buf)
        assert h.hexdigest() == expected
    m = mmap.mmap(-1, 10000)
    m[:] = data
    h = Hasher(blockSize=4096)
    h.update(m)
    assert h.hexdigest() == expected


def test_threads():
    """
    Independent hashers in threads give the same results as in one thread.
    """
    data = bytes(range(256)) * 8192
    expected = plain(data, blockSize=64 * KiB)
    results = []

    def run():
        h = Hasher(blockSize=64 * KiB)
        for i in range(0, len(data), 100000):
            h.update(data[i:i + 100000])
        results.append(h.hexdigest())
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=20000),
       cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=12),
       blockSize=st.sampled_from([1, 7, 512, 4096]))
def test_random_chunking(data, cuts, blockSize):
    h = Hasher(blockSize=blockSize)
    points = sorted({c for c in cuts if c <= len(data)} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        h.update(data[start:end])
    assert h.hexdigest() == plain(data, blockSize=blockSize)


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(
    st.tuples(st.booleans(), st.integers(min_value=0, max_value=10000)),
    max_size=10))
def test_random_zero_ranges(segments):
    h = Hasher(blockSize=4096)
    data = bytearray()
    for i, (isZeroRange, length) in enumerate(segments):
        if isZeroRange:
            h.zero(length)
            data += bytes(length)
        else:
            chunk = bytes([i % 255 + 1]) * length
            h.update(chunk)
            data += chunk
    assert h.hexdigest() == plain(bytes(data), blockSize=4096)


# isZero


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 256 * KiB,
                                  256 * KiB + 1, 1 * MiB + 3])
def test_is_zero(size):
    assert isZero(bytes(size))
    assert isZero(bytearray(size))
    if size:
        for pos in {0, size // 2, size - 1}:
            data = bytearray(size)
            data[pos] = 1
            assert not isZero(data)
            assert not isZero(memoryview(data))


def test_is_zero_mmap_and_views():
    m = mmap.mmap(-1, 1 * MiB)
    assert isZero(m)
    with memoryview(m) as view:
        assert isZero(view[100:200000])
    m[-1] = 7
    assert not isZero(m)
    assert isZero(memoryview(bytearray(16)).cast("I"))
    assert not isZero(memoryview(bytearray(b"\0\0\0\1")).cast("I"))


# blocks, blockDigest, addBlock: out-of-order block hashing


def _segmentsImage(segments):
    """
    The image and zero extents of C{[(zero, length)]} segments: data
    segments hold non-zero bytes, except that every third one is zeroes
    (data the extents do not know to be zero).
    """
    from imageio.extents import ZeroExtent
    data = bytearray()
    extents = []
    for i, (zero, length) in enumerate(segments):
        extents.append(ZeroExtent(len(data), length, zero))
        if zero or i % 3 == 2:
            data += bytes(length)
        else:
            data += bytes([i % 255 + 1]) * length
    return bytes(data), extents


def _hashByBlocks(data, extents, size, blockSize, split=False):
    h = Hasher(blockSize=blockSize)
    pos = 0
    for start, length, zero in blkhash.blocks(extents, size, blockSize):
        assert start == pos
        assert length > 0
        if zero:
            assert data[start:start + length] == bytes(length)
            h.zero(length)
        else:
            assert start % blockSize == 0
            assert length == min(blockSize, size - start)
            block = data[start:start + length]
            if split:
                block = [block[:length // 3], block[length // 3:]]
            h.addBlock(h.blockDigest(block), length)
        pos += length
    assert pos == size
    return h.hexdigest()


@settings(max_examples=150, deadline=None)
@given(segments=st.lists(
    st.tuples(st.booleans(), st.integers(min_value=1, max_value=5000)),
    max_size=10),
    tail=st.integers(min_value=-3000, max_value=3000),
    blockSize=st.sampled_from([512, 1024, 4096]),
    split=st.booleans())
def test_blocks_digest_equals_plain(segments, tail, blockSize, split):
    """
    Hashing the data blocks from L{blkhash.blocks} one by one (reading
    nothing for zero runs) gives the checksum of every byte, also when the
    extents end before the image (the rest is zeroes) or past it.
    """
    data, extents = _segmentsImage(segments)
    size = max(0, len(data) + tail)
    data = (data + bytes(max(0, tail)))[:size]
    assert _hashByBlocks(data, extents, size, blockSize, split) == \
        plain(data, blockSize=blockSize)


def test_blocks_shapes():
    from imageio.extents import ZeroExtent
    bs = 100
    extents = [ZeroExtent(0, 250, True), ZeroExtent(250, 10, False),
               ZeroExtent(260, 1000, True), ZeroExtent(1260, 1, False),
               ZeroExtent(1261, 100000, True)]
    assert list(blkhash.blocks(extents, 1500, bs)) == [
        (0, 200, True),        # two whole zero blocks: one run
        (200, 100, False),     # the block holding the data extent
        (300, 900, True),
        (1200, 100, False),
        (1300, 200, True),     # to the image end, past the extents' end
    ]
    # No extents: all zero; an empty image: nothing.
    assert list(blkhash.blocks([], 250, bs)) == [(0, 250, True)]
    assert list(blkhash.blocks([], 0, bs)) == []
    # A huge hole is one item, not a block each.
    huge = [ZeroExtent(0, 8 * 2**40, True)]
    assert list(blkhash.blocks(huge, 8 * 2**40, 4 * MiB)) == [
        (0, 8 * 2**40, True)]
    # A short last data block.
    assert list(blkhash.blocks([ZeroExtent(0, 150, False)], 150, bs)) == [
        (0, 100, False), (100, 50, False)]


def test_block_digest_zero_detection():
    h = Hasher(blockSize=4096)
    zero = hashlib.blake2b(bytes(4096), digest_size=32).digest()
    assert h.blockDigest(bytes(4096)) == zero
    assert h.blockDigest([bytes(1000), bytearray(3096)]) == zero
    short = hashlib.blake2b(bytes(10), digest_size=32).digest()
    assert h.blockDigest(memoryview(bytes(10))) == short
    data = b"x" + bytes(4095)
    assert h.blockDigest([data[:1], data[1:]]) == \
        hashlib.blake2b(data, digest_size=32).digest()
    sha = Hasher("sha1", blockSize=4096, detectZeroes=False)
    assert sha.blockDigest(bytes(4096)) == hashlib.sha1(bytes(4096)).digest()


def test_block_digest_threads():
    """
    blockDigest keeps no state: many at once on threads give the same
    digests as one by one.
    """
    h = Hasher(blockSize=1 * MiB)
    blocks = [bytes([i]) * MiB for i in range(16)]
    expected = [hashlib.blake2b(b, digest_size=32).digest() for b in blocks]
    results = [None] * len(blocks)

    def work(i):
        results[i] = h.blockDigest(blocks[i])

    threads = [threading.Thread(target=work, args=(i,))
               for i in range(len(blocks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_add_block_errors():
    h = Hasher(blockSize=4096)
    h.update(b"x")
    with pytest.raises(ValueError, match="inside a block"):
        h.addBlock(bytes(32), 4096)
    h = Hasher(blockSize=4096)
    with pytest.raises(ValueError, match="Invalid block length"):
        h.addBlock(bytes(32), 4097)
    with pytest.raises(ValueError, match="Invalid block length"):
        h.addBlock(bytes(32), 0)
    # Nothing may follow a short (last) block.
    h.addBlock(h.blockDigest(b"abc"), 3)
    assert h.hexdigest() == plain(b"abc", blockSize=4096)
    assert h.position == 3
    for call in (lambda: h.addBlock(bytes(32), 4096), lambda: h.zero(1),
                 lambda: h.update(b"x")):
        with pytest.raises(ValueError, match="after the short last block"):
            call()
    assert h.hexdigest() == plain(b"abc", blockSize=4096)
