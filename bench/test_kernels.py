"""Kernel benchmarks: our compiled hot path beside the reference measured in the same run.

Throughput (GB/s) lands in ``benchmark.extra_info`` and in the summary table printed at the
end (bench/conftest.py). Nothing here asserts on time. Smoke mode (make bench-smoke) runs
every benchmark once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import xxhash

from fastcache import _chunker, _nvme, _xxh, chunks

MiB = 1 << 20
TOTAL = 64 * MiB
CHUNK = 4 * MiB
NCHUNKS = TOTAL // CHUNK

Record = Callable[[str, object, int], "float | None"]


@pytest.fixture(scope="module")
def data() -> bytes:
    return np.random.default_rng(2024).bytes(TOTAL)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        executor.submit(int).result()  # start the threads outside the timed region
        yield executor


def rounds(config: pytest.Config) -> int:
    """Rounds of the I/O benchmarks: the configured minimum (5 by default, 1 in smoke mode)."""
    return max(1, int(config.getoption("benchmark_min_rounds") or 1))


# --- hashing -------------------------------------------------------------------------------
@pytest.mark.benchmark(group="hash")
def test_hash_ours_1_thread(benchmark, data: bytes, record: Record) -> None:
    result = benchmark(_xxh.xxh3_128_hex, data)
    assert result == xxhash.xxh3_128_hexdigest(data)
    record("hash/ours-1t", benchmark, TOTAL)


@pytest.mark.benchmark(group="hash")
def test_hash_xxhash_wheel_1_thread(benchmark, data: bytes, record: Record) -> None:
    benchmark(xxhash.xxh3_128_hexdigest, data)
    record("hash/xxhash-1t", benchmark, TOTAL)


def _halves(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    return [view[: TOTAL // 2], view[TOTAL // 2 :]]


@pytest.mark.benchmark(group="hash")
def test_hash_ours_2_threads(
    benchmark,
    data: bytes,
    pool: ThreadPoolExecutor,
    record: Record,
) -> None:
    halves = _halves(data)
    result = benchmark(lambda: list(pool.map(_xxh.xxh3_128_hex, halves)))
    assert result == [xxhash.xxh3_128_hexdigest(h) for h in halves]
    record("hash/ours-2t", benchmark, TOTAL)


@pytest.mark.benchmark(group="hash")
def test_hash_xxhash_wheel_2_threads(
    benchmark,
    data: bytes,
    pool: ThreadPoolExecutor,
    record: Record,
) -> None:
    halves = _halves(data)
    benchmark(lambda: list(pool.map(xxhash.xxh3_128_hexdigest, halves)))
    record("hash/xxhash-2t", benchmark, TOTAL)


# 64 MiB streams from DRAM: on a small VM one thread already nearly saturates memory
# bandwidth, so the same total is also hashed from cache-resident 1 MiB buffers (one per
# thread), which measures what releasing the GIL buys when the CPU is the limit.
CACHED = 1 * MiB
CACHED_REPEAT = TOTAL // CACHED // 2


def _hash_repeatedly(buf: bytes) -> str:
    for _ in range(CACHED_REPEAT - 1):
        _xxh.xxh3_128_hex(buf)
    return _xxh.xxh3_128_hex(buf)


@pytest.fixture(scope="module")
def cached_buffers() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [rng.bytes(CACHED), rng.bytes(CACHED)]


@pytest.mark.benchmark(group="hash-cached")
def test_hash_cached_ours_1_thread(benchmark, cached_buffers: list[bytes], record: Record) -> None:
    benchmark(lambda: [_hash_repeatedly(b) for b in cached_buffers])
    record("hash-cached/ours-1t", benchmark, TOTAL)


@pytest.mark.benchmark(group="hash-cached")
def test_hash_cached_ours_2_threads(
    benchmark,
    cached_buffers: list[bytes],
    pool: ThreadPoolExecutor,
    record: Record,
) -> None:
    benchmark(lambda: list(pool.map(_hash_repeatedly, cached_buffers)))
    record("hash-cached/ours-2t", benchmark, TOTAL)


@pytest.mark.benchmark(group="hash")
def test_hash_many_chunks(benchmark, data: bytes, record: Record) -> None:
    ends = chunks.split_fixed(TOTAL, CHUNK)
    result = benchmark(_xxh.xxh3_128_hex_many, data, ends)
    assert len(result) == NCHUNKS
    record("hash/ours-many", benchmark, TOTAL)


# --- splitting -------------------------------------------------------------------------------
@pytest.mark.benchmark(group="cdc")
@pytest.mark.parametrize("avg", [MiB, 64 * 1024], ids=["1m", "64k"])
def test_fastcdc(benchmark, data: bytes, avg: int, record: Record) -> None:
    params = chunks.CdcParams.for_average(avg)
    ends = benchmark(_chunker.fastcdc, data, params.min, params.avg, params.max, True)
    assert int(ends[-1]) == TOTAL
    benchmark.extra_info["chunks"] = len(ends)
    record(f"cdc/fastcdc-{'1m' if avg == MiB else '64k'}", benchmark, TOTAL)


@pytest.mark.benchmark(group="cdc")
def test_fastcdc_2_threads(
    benchmark,
    data: bytes,
    pool: ThreadPoolExecutor,
    record: Record,
) -> None:
    params = chunks.CdcParams.for_average(MiB)
    args = (params.min, params.avg, params.max, True)
    halves = _halves(data)
    benchmark(lambda: list(pool.map(lambda half: _chunker.fastcdc(half, *args), halves)))
    record("cdc/fastcdc-1m-2t", benchmark, TOTAL)


@pytest.mark.benchmark(group="split")
def test_fixed_split_ours(benchmark, record: Record) -> None:
    ends = benchmark(_chunker.fixed, TOTAL, CHUNK)
    assert len(ends) == NCHUNKS
    record("split/fixed-ours", benchmark, TOTAL)


@pytest.mark.benchmark(group="split")
def test_fixed_split_python(benchmark, record: Record) -> None:
    ends = benchmark(chunks._split_fixed_py, TOTAL, CHUNK)
    assert len(ends) == NCHUNKS
    record("split/fixed-py", benchmark, TOTAL)


# --- NVMe chunk writes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunk_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("nvme-bench")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _chunk_views(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    return [view[i * CHUNK : (i + 1) * CHUNK] for i in range(NCHUNKS)]


@pytest.mark.benchmark(group="write")
def test_write_chunks_ours(
    benchmark,
    data: bytes,
    chunk_dir: Path,
    record: Record,
    request: pytest.FixtureRequest,
) -> None:
    direct = _nvme.probe_direct(chunk_dir)
    views = _chunk_views(data)
    paths = [str(chunk_dir / f"ours-{i}") for i in range(NCHUNKS)]

    def write_all() -> None:
        for path, view in zip(paths, views, strict=True):
            _nvme.write_file_atomic(path, view, direct)

    benchmark.pedantic(write_all, rounds=rounds(request.config), iterations=1)
    assert Path(paths[-1]).read_bytes() == views[-1]
    benchmark.extra_info["o_direct"] = direct
    record("write/ours-direct", benchmark, TOTAL)


@pytest.mark.benchmark(group="write")
def test_write_chunks_python(
    benchmark,
    data: bytes,
    chunk_dir: Path,
    record: Record,
    request: pytest.FixtureRequest,
) -> None:
    views = _chunk_views(data)
    paths = [chunk_dir / f"py-{i}" for i in range(NCHUNKS)]

    def write_all() -> None:
        for path, view in zip(paths, views, strict=True):
            with open(path, "wb") as f:
                f.write(view)
                f.flush()
                os.fsync(f.fileno())

    benchmark.pedantic(write_all, rounds=rounds(request.config), iterations=1)
    record("write/python", benchmark, TOTAL)


def _dd(target: Path, *extra: str) -> Callable[[], None]:
    dd = shutil.which("dd")
    if dd is None:
        pytest.skip("dd is not installed")
    argv = [dd, "if=/dev/zero", f"of={target}", "bs=4M", f"count={NCHUNKS}", "oflag=direct"]
    argv += list(extra)
    return lambda: subprocess.run(argv, check=True, capture_output=True)  # type: ignore[return-value]


@pytest.mark.benchmark(group="write")
def test_write_dd_direct(
    benchmark,
    chunk_dir: Path,
    record: Record,
    request: pytest.FixtureRequest,
) -> None:
    benchmark.pedantic(_dd(chunk_dir / "dd"), rounds=rounds(request.config), iterations=1)
    assert (chunk_dir / "dd").stat().st_size == TOTAL
    record("write/dd", benchmark, TOTAL)


@pytest.mark.benchmark(group="write")
def test_write_dd_direct_fdatasync(
    benchmark,
    chunk_dir: Path,
    record: Record,
    request: pytest.FixtureRequest,
) -> None:
    run = _dd(chunk_dir / "dd-sync", "conv=fdatasync")
    benchmark.pedantic(run, rounds=rounds(request.config), iterations=1)
    record("write/dd-fdatasync", benchmark, TOTAL)


# --- NVMe chunk reads --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def written_chunks(data: bytes, chunk_dir: Path) -> list[str]:
    paths = [str(chunk_dir / f"read-{i}") for i in range(NCHUNKS)]
    for path, view in zip(paths, _chunk_views(data), strict=True):
        _nvme.write_file_atomic(path, view, False)
    return paths


@pytest.mark.benchmark(group="read")
def test_read_chunks_pread_into(
    benchmark,
    written_chunks: list[str],
    record: Record,
) -> None:
    out = bytearray(CHUNK)

    def read_all() -> int:
        return sum(_nvme.pread_into(path, 0, out) for path in written_chunks)

    assert benchmark(read_all) == TOTAL
    record("read/pread-into", benchmark, TOTAL)


@pytest.mark.benchmark(group="read")
def test_read_chunks_python_readinto(
    benchmark,
    written_chunks: list[str],
    record: Record,
) -> None:
    out = bytearray(CHUNK)

    def read_all() -> int:
        total = 0
        for path in written_chunks:
            with open(path, "rb", buffering=0) as f:
                total += f.readinto(out) or 0
        return total

    assert benchmark(read_all) == TOTAL
    record("read/readinto", benchmark, TOTAL)
