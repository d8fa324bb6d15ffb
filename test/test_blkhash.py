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
