"""Hashing and splitting: the compiled kernels against python-xxhash and the Python fallbacks.

The compiled modules are imported directly, so these tests check them even when the process
runs with ``FASTCACHE_NO_EXT=1``; the ``_py`` functions of ``chunks`` are the fallbacks.
"""

from __future__ import annotations

import hashlib
import mmap
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xxhash

from fastcache import _chunker, _xxh, chunks
from fastcache.chunks import CdcParams, StreamChunker

MiB = 1 << 20
SIZES = [0, 1, 15, 16, 17, 128, 129, 240, 241, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1]
CHUNK = 64 * 1024  # the chunk size of the compiled-vs-fallback comparisons
# Public CDC has no Python fallback: under FASTCACHE_NO_EXT=1 those tests are skipped (the
# kernel itself is still tested through ``cdc_ends``).
needs_ext = pytest.mark.skipif(
    not chunks.HAVE_EXT, reason="FASTCACHE_NO_EXT=1: public CDC needs the extension"
)
BUFFER_KINDS = ["bytes", "bytearray", "memoryview-slice", "mmap", "numpy"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def as_kind(data: bytes, kind: str) -> Any:
    """``data`` as another buffer type holding the same bytes."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview-slice":
        return memoryview(b"\x00\x01\x02" + data + b"\xff")[3 : 3 + len(data)]
    if kind == "mmap":
        m = mmap.mmap(-1, max(len(data), 1))
        m[: len(data)] = data
        return memoryview(m)[: len(data)]
    if kind == "numpy":
        return np.frombuffer(data, dtype=np.uint8).copy()
    raise AssertionError(kind)


def chunks_of(data: bytes, ends: np.ndarray) -> list[bytes]:
    starts = [0, *ends[:-1].tolist()]
    return [data[s:e] for s, e in zip(starts, ends.tolist(), strict=True)]


def cdc_ends(data: Any, params: CdcParams, final: bool = True) -> np.ndarray:
    return _chunker.fastcdc(data, params.min, params.avg, params.max, final)


def releases_gil(call: Callable[[], object], attempts: int = 1000) -> bool:
    """Whether another thread runs while ``call`` is inside C code.

    With a huge switch interval the main thread never hands the GIL over between bytecodes,
    so the counter can only move during ``call`` if ``call`` releases the GIL.
    """
    count = 0
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        nonlocal count
        started.set()
        while not stop.is_set():
            count += 1
            time.sleep(0)  # drop the GIL between increments

    old = sys.getswitchinterval()
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    started.wait()
    sys.setswitchinterval(100.0)
    try:
        for _ in range(attempts):
            before = count
            call()
            if count != before:
                return True
        return False
    finally:
        sys.setswitchinterval(old)
        stop.set()
        thread.join()


# --- hashing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BUFFER_KINDS)
@pytest.mark.parametrize("size", [*SIZES, 777, 31337, 1_000_003])
def test_digests_match_python_xxhash(size: int, kind: str) -> None:
    data = _rng(size).bytes(size)
    buf = as_kind(data, kind)
    assert _xxh.xxh3_128_hex(buf) == xxhash.xxh3_128_hexdigest(data)
    assert _xxh.xxh3_128_digest(buf) == xxhash.xxh3_128_digest(data)
    assert _xxh.xxh3_64(buf) == xxhash.xxh3_64_intdigest(data)
    assert chunks.digest(buf) == xxhash.xxh3_128_hexdigest(data)
    assert chunks.xxh64(buf) == xxhash.xxh3_64_intdigest(data)


def test_hex_digest_is_canonical_big_endian() -> None:
    raw = _xxh.xxh3_128_digest(b"fastcache")
    assert len(raw) == 16
    assert _xxh.xxh3_128_hex(b"fastcache") == raw.hex()
    assert int(raw.hex(), 16) == xxhash.xxh3_128_intdigest(b"fastcache")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 12345])
def test_compiled_hashing_equals_fallback(size: int) -> None:
    data = _rng(size + 1).bytes(size)
    assert _xxh.xxh3_128_hex(data) == chunks._digest_py(data)
    assert _xxh.xxh3_64(data) == chunks._xxh64_py(data)
    ends = chunks._split_fixed_py(size, CHUNK)
    assert _xxh.xxh3_128_hex_many(data, ends) == chunks._digest_chunks_py(data, ends)


@pytest.mark.parametrize("kind", BUFFER_KINDS)
def test_hex_many_equals_per_chunk_digests(kind: str) -> None:
    rng = _rng(7)
    data = rng.bytes(3 * MiB + 17)
    cuts = np.sort(rng.integers(0, len(data), size=40, dtype=np.uint64))
    ends = np.append(cuts, np.uint64(len(data)))  # includes empty chunks (repeated cuts)
    expected = [xxhash.xxh3_128_hexdigest(c) for c in chunks_of(data, ends)]
    assert _xxh.xxh3_128_hex_many(as_kind(data, kind), ends) == expected
    assert chunks.digest_chunks(data, ends.tolist()) == expected


def test_hex_many_edge_cases() -> None:
    assert _xxh.xxh3_128_hex_many(b"abc", np.empty(0, dtype=np.uint64)) == []
    # ends need not reach the end of the buffer
    assert _xxh.xxh3_128_hex_many(b"abcdef", np.array([2, 4], dtype=np.uint64)) == [
        xxhash.xxh3_128_hexdigest(b"ab"),
        xxhash.xxh3_128_hexdigest(b"cd"),
    ]


@pytest.mark.parametrize("ends", [[7], [3, 2], [2, 6, 5], [2**63]])
def test_hex_many_rejects_bad_ends(ends: list[int]) -> None:
    # Bounds checks are compiled out: this validation is all that guards the reads.
    with pytest.raises(ValueError):
        _xxh.xxh3_128_hex_many(b"abcdef", np.array(ends, dtype=np.uint64))


def test_hashing_releases_the_gil() -> None:
    data = _rng(3).bytes(32 * MiB)
    ends = chunks._split_fixed_py(len(data), MiB)
    assert releases_gil(lambda: _xxh.xxh3_128_hex(data))
    assert releases_gil(lambda: _xxh.xxh3_64(data))
    assert releases_gil(lambda: _xxh.xxh3_128_hex_many(data, ends))


def test_is_digest() -> None:
    assert chunks.is_digest(_xxh.xxh3_128_hex(b"x"))
    assert not chunks.is_digest("A" * 32)
    assert not chunks.is_digest("a" * 31)


# --- fixed splitting ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 4096, CHUNK])
@pytest.mark.parametrize(
    "length", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 3, 987_654]
)
def test_fixed_split_covers_input(length: int, chunk_size: int) -> None:
    ends = _chunker.fixed(length, chunk_size)
    assert ends.dtype == np.uint64
    assert ends.tolist() == chunks._split_fixed_py(length, chunk_size).tolist()
    assert chunks.split_fixed(length, chunk_size).tolist() == ends.tolist()
    if length == 0:
        assert len(ends) == 0
        return
    sizes = np.diff(ends, prepend=np.uint64(0))
    assert int(ends[-1]) == length
    assert (sizes[:-1] == chunk_size).all()
    assert 0 < int(sizes[-1]) <= chunk_size


def test_fixed_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError):
        _chunker.fixed(10, 0)


# --- content-defined splitting ----------------------------------------------------------------
PARAMS = [
    CdcParams.for_average(256),
    CdcParams.for_average(4096),
    CdcParams(avg=8192, min=100, max=9000),
    CdcParams.for_average(64 * 1024),
]


def check_cdc_ends(ends: np.ndarray, length: int, params: CdcParams) -> None:
    assert ends.dtype == np.uint64
    if length == 0:
        assert len(ends) == 0
        return
    sizes = np.diff(ends.astype(np.int64), prepend=0)
    assert (sizes > 0).all(), "boundaries must be strictly increasing"
    assert int(ends[-1]) == length, "chunks must cover the input exactly"
    assert (sizes[:-1] >= params.min).all() and (sizes[:-1] <= params.max).all()
    assert 0 < sizes[-1] <= params.max


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"avg{p.avg}")
@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 300, 4096, 100_000, 3 * MiB + 7])
def test_cdc_boundaries(size: int, params: CdcParams) -> None:
    data = _rng(size).bytes(size)
    ends = cdc_ends(data, params)
    check_cdc_ends(ends, size, params)
    assert cdc_ends(bytearray(data), params).tolist() == ends.tolist()  # deterministic


@pytest.mark.parametrize("params", PARAMS[:3], ids=lambda p: f"avg{p.avg}")
@pytest.mark.parametrize("final", [True, False])
def test_cdc_equals_python_reference(params: CdcParams, final: bool) -> None:
    data = _rng(params.avg).bytes(40 * params.avg + 123)
    expected = chunks._fastcdc_py(data, params, final)
    assert len(expected) > 10
    assert _chunker.fastcdc(data, params.min, params.avg, params.max, final).tolist() == (
        expected.tolist()
    )


def test_gear_table_is_the_documented_splitmix64() -> None:
    table = _chunker.gear_table()
    assert table.tolist() == chunks._gear_table_py()
    assert len(set(table.tolist())) == 256


def test_cdc_forced_cuts_on_uniform_data() -> None:
    params = CdcParams.for_average(4096)
    ends = cdc_ends(bytes(100_000), params)  # zeros: no content cut ever fires
    check_cdc_ends(ends, 100_000, params)
    assert np.diff(ends, prepend=np.uint64(0))[:-1].tolist() == [params.max] * (len(ends) - 1)


def test_cdc_golden_cut_points() -> None:
    """Pins the cut points: a change here re-chunks every stored CDC file."""
    data = np.random.default_rng(1234).bytes(8 * MiB)
    ends = cdc_ends(data, CdcParams.for_average(64 * 1024))
    assert len(ends) == 114
    assert hashlib.sha256(ends.astype("<u8").tobytes()).hexdigest() == (
        "03bbaceb41153cf8d62ab333a313126cb2c177e055a95497385318d789938aa9"
    )


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"avg{p.avg}")
def test_cdc_not_final_omits_the_tail(params: CdcParams) -> None:
    data = _rng(11).bytes(50 * params.avg + 77)
    full = cdc_ends(data, params, final=True).tolist()
    partial = cdc_ends(data, params, final=False).tolist()
    assert partial == full[: len(partial)]
    assert len(partial) in (len(full), len(full) - 1)
    if len(partial) == len(full) - 1:
        assert len(data) - partial[-1] < params.max  # only an undecided tail is left out
    # a short input with no cut yet yields nothing, unless max forces a cut
    assert cdc_ends(data[: params.min], params, final=False).tolist() == []
    assert cdc_ends(data[: params.min], params, final=True).tolist() == [params.min]
    zeros = bytes(params.max)
    assert cdc_ends(zeros, params, final=False).tolist() == [params.max]
    assert cdc_ends(zeros[:-1], params, final=False).tolist() == []


def test_cdc_survives_an_insertion() -> None:
    data = np.random.default_rng(99).bytes(64 * MiB)
    shifted = data[:1000] + b"!" + data[1000:]
    params = CdcParams.for_average(MiB)
    before = chunks.digest_chunks(data, cdc_ends(data, params))
    after = set(chunks.digest_chunks(shifted, cdc_ends(shifted, params)))
    unchanged = sum(d in after for d in before)
    assert len(before) >= 30
    assert unchanged >= 0.9 * len(before)
    # fixed-size chunking, by contrast, loses everything after the insertion
    fixed = chunks.digest_chunks(data, chunks.split_fixed(len(data), MiB))
    fixed_after = set(chunks.digest_chunks(shifted, chunks.split_fixed(len(shifted), MiB)))
    assert sum(d in fixed_after for d in fixed) == 0


@pytest.mark.parametrize(
    "sizes",
    [(64, 32, 128), (0, 256, 1024), (64, 300, 1024), (64, 256, 128), (512, 256, 1024)],
)
def test_cdc_rejects_bad_sizes(sizes: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        _chunker.fastcdc(b"x" * 10_000, *sizes, True)


def test_cdc_releases_the_gil() -> None:
    data = _rng(5).bytes(8 * MiB)
    assert releases_gil(lambda: _chunker.fastcdc(data, 16384, 65536, 262144, True))


@needs_ext
def test_split_dispatches_on_chunking() -> None:
    data = _rng(8).bytes(300_000)
    assert chunks.split(data, 4096).tolist() == chunks.split_fixed(len(data), 4096).tolist()
    params = CdcParams.for_average(4096)
    assert chunks.split(data, params).tolist() == chunks.split_cdc(data, params).tolist()
    assert chunks.split_cdc(data, params, final=False).tolist() == (
        cdc_ends(data, params, final=False).tolist()
    )


def test_split_cdc_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "_chunker", None)
    with pytest.raises(RuntimeError, match="make build"):
        chunks.split_cdc(b"x" * 1000, CdcParams.for_average(256))


def test_public_functions_fall_back_without_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _rng(12).bytes(3 * CHUNK + 1)
    ends = chunks._split_fixed_py(len(data), CHUNK)
    compiled = (chunks.digest(data), chunks.xxh64(data), chunks.digest_chunks(data, ends))
    monkeypatch.setattr(chunks, "_xxh", None)
    monkeypatch.setattr(chunks, "_chunker", None)
    assert (chunks.digest(data), chunks.xxh64(data), chunks.digest_chunks(data, ends)) == compiled
    assert (
        chunks.split_fixed(len(data), CHUNK).tolist() == _chunker.fixed(len(data), CHUNK).tolist()
    )
    stream = StreamChunker(CHUNK)
    got = [bytes(c) for c in stream.feed(data)] + [bytes(c) for c in stream.finish()]
    assert got == chunks_of(data, ends)


# --- streaming ---------------------------------------------------------------------------------
STREAM_MODES: list[Any] = [
    4096,
    65536,
    1000,
    pytest.param(CdcParams.for_average(4096), marks=needs_ext),
    pytest.param(CdcParams(avg=16384, min=200, max=20000), marks=needs_ext),
    pytest.param(CdcParams.for_average(256), marks=needs_ext),
]


@pytest.mark.parametrize("chunking", STREAM_MODES, ids=str)
@pytest.mark.parametrize("piece", ["odd", "tiny", "huge"])
def test_stream_chunker_equals_one_shot(chunking: int | CdcParams, piece: str) -> None:
    rng = _rng(21)
    data = rng.bytes(2 * MiB + 333)
    expected = chunks_of(data, chunks.split(data, chunking))
    limit = chunking.max if isinstance(chunking, CdcParams) else chunking
    stream = StreamChunker(chunking)
    got: list[bytes] = []
    pos = 0
    high = {"odd": 3 * limit, "tiny": 97, "huge": 4 * MiB}[piece]
    while pos < len(data):
        size = int(rng.integers(0, high))  # includes empty pieces
        got += [bytes(c) for c in stream.feed(bytearray(data[pos : pos + size]))]
        pos += size
        assert stream.buffered < limit
    got += [bytes(c) for c in stream.finish()]
    assert got == expected


def test_stream_chunker_chunks_view_the_fed_buffer() -> None:
    data = _rng(2).bytes(10 * 4096 + 5)
    stream = StreamChunker(4096)
    out = stream.feed(data)
    assert len(out) == 10 and all(isinstance(c, memoryview) for c in out)
    assert out[0].obj is data  # no copy of whole chunks
    assert stream.buffered == 5
    assert [bytes(c) for c in stream.finish()] == [data[-5:]]


@needs_ext
def test_stream_chunker_lifecycle() -> None:
    stream = StreamChunker.for_config("cdc", 4096)
    assert stream.chunking == CdcParams.for_average(4096)
    assert StreamChunker.for_config("fixed", 4096).chunking == 4096
    assert stream.feed(b"") == []
    assert stream.finish() == []
    with pytest.raises(RuntimeError):
        stream.feed(b"x")
    with pytest.raises(ValueError):
        StreamChunker(0)
    with pytest.raises(ValueError):
        StreamChunker.for_config("rabin", 4096)
