"""bench.report: the table, the ratios, the README section, the chart, from a sample dict;
and the harness pieces behind its newer rows (S3 PUT ceiling loop, client CPU, the
close-acknowledged writer, the source-tree tarball, --quick). Nothing here asserts on time."""

from __future__ import annotations

import os
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.harness import QUICK, parse_args
from bench.s3_ceiling import put_ceiling
from bench.systems import session_cpu_seconds
from bench.workloads import METRIC_BY_KEY, WORKLOADS, source_tarball, write_close


def _fig(median: float | None) -> dict[str, Any]:
    return {"median": median, "runs": [median]}


def sample() -> dict[str, Any]:
    return {
        "started": "2026-01-02T03:04:05+00:00",
        "params": {"file_size": 64 << 20, "small_files": 200, "repeat": 1},
        "machine": {"cpus": 2, "ram_gib": 24, "disk": "/dev/vda (ext4)"},
        "page_cache": "drop_caches",
        "proxy": {"delay_ms": 20, "bandwidth_mib_s": 64},
        "systems": {
            "fastcache": {"versions": {"fastcache": "0.1.0"}},
            "juicefs": {"versions": {"juicefs": "juicefs version 1.4.2"}},
        },
        "profiles": {
            "local": {
                "figures": {
                    "seq_read_warm": {
                        "fastcache": _fig(800.0),
                        "juicefs": _fig(400.0),
                        "rclone": _fig(500.0),
                        "raw": _fig(1600.0),
                    },
                    "rand_read_p99": {
                        "fastcache": _fig(100.0),
                        "juicefs": _fig(300.0),
                        "raw": _fig(10.0),
                    },
                    "seq_write": {"juicefs": _fig(42.0), "rclone": _fig(790.0)},
                },
                "errors": {"fastcache": {"seq_write": "MountError: no mount\nlog tail"}},
                "notes": [],
            },
            "remote": {
                "figures": {
                    "seq_read_warm": {"fastcache": _fig(700.0), "s3fs": _fig(1400.0)},
                    "seq_write": {
                        "fastcache": _fig(300.0),
                        "juicefs": _fig(100.0),
                        "raw": _fig(2000.0),
                    },
                    "seq_write_close": {"fastcache": _fig(900.0), "raw": _fig(3000.0)},
                    "seq_write_cpu": {
                        "fastcache": _fig(2.0),
                        "juicefs": _fig(5.0),
                        "raw": _fig(None),
                    },
                    "s3_put": {"s3": _fig(400.0)},
                    "s3_put_cpu": {"s3": _fig(1.5)},
                    "tree_extract": {"fastcache": _fig(1200.0), "juicefs": _fig(300.0)},
                    "tree_rm": {"fastcache": _fig(2000.0), "juicefs": _fig(4000.0)},
                },
                "errors": {},
                "notes": ["raw: same figures"],
            },
        },
    }


def _row(table: str, label: str, nth: int = 0) -> list[str]:
    """The ``nth`` row (0: first table, local profile) whose metric is ``label``."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if f"| {label} |" in line
    ]
    if len(rows) <= nth:
        raise AssertionError(f"no row {label!r} #{nth} in\n{table}")
    return rows[nth]


def _remote(table: str) -> str:
    return table[table.index("**S3 remote**") :]


def test_table_has_absolute_figures_and_ratio_against_best_other() -> None:
    table = report.markdown(sample())
    header = _row(table, "workload")
    assert header[3:] == [
        "fastcache",
        "juicefs",
        "rclone",
        "s3fs",
        "raw",
        "fastcache vs best other",
    ]
    warm = _row(table, "local cache warm")  # first table: local profile
    assert warm[3:8] == ["800", "400", "500", "—", "1,600"]
    assert warm[-1] == "1.60x (rclone)"  # raw disk is the ceiling, not a competitor


def test_latency_ratio_is_oriented_so_above_one_is_ahead() -> None:
    assert _row(report.markdown(sample()), "p99 latency")[-1] == "3.00x (juicefs)"


def test_failed_workload_shows_err_and_its_message() -> None:
    table = report.markdown(sample())
    assert _row(table, "1 MiB blocks, fsync at end")[3] == "err"
    assert "local / fastcache / seq_write: failed: MountError: no mount" in table
    assert "remote: raw: same figures" in table


def test_ratios_per_profile() -> None:
    r = report.ratios(sample())
    assert r["local"]["seq_read_warm"] == pytest.approx(1.6)
    assert r["remote"]["seq_read_warm"] == pytest.approx(0.5)
    assert r["local"]["seq_write"] is None


def test_readme_section_is_replaced_between_markers() -> None:
    text = f"# T\n\nintro\n{report.START_MARK}\nold table\n{report.END_MARK}\n\n## After\n"
    new = report.replace_section(text, "| new |")
    assert "old table" not in new
    assert f"{report.START_MARK}\n| new |\n{report.END_MARK}" in new
    assert new.startswith("# T\n\nintro\n") and new.endswith("\n\n## After\n")
    assert report.replace_section(new, "| new |") == new


def test_readme_without_markers_gets_a_section() -> None:
    new = report.replace_section("# T\n", "body")
    assert new == f"# T\n\n## Performance\n\n{report.START_MARK}\nbody\n{report.END_MARK}\n"
    with pytest.raises(ValueError):
        report.replace_section(f"# T\n{report.START_MARK}\n", "body")


def test_json_and_png_are_written(tmp_path: Path) -> None:
    report.write_json(sample(), tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text().startswith("{")
    assert report.plot(sample(), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the newer rows ----------------------------------------------------------------------
def test_s3_put_ceiling_row_is_the_same_server_for_every_s3_system() -> None:
    table = _remote(report.markdown(sample()))
    row = _row(table, METRIC_BY_KEY["s3_put"].label)
    header = _row(report.markdown(sample()), "workload")
    cells = dict(zip(header, row, strict=True))
    assert row[2] == "MiB/s"
    assert cells["fastcache"] == cells["juicefs"] == cells["s3fs"] == "400"
    assert cells["raw"] == "—"  # the raw disk writes to no S3
    assert cells["fastcache vs best other"] == "—"
    assert "s3" not in header  # the reference is no column of its own


def test_seq_write_against_the_s3_ceiling_is_derived_per_system() -> None:
    table = _remote(report.markdown(sample()))
    row = _row(table, METRIC_BY_KEY["seq_write_vs_s3"].label)
    assert row[3:8] == ["0.75", "0.25", "—", "—", "—"]  # 300/400, 100/400; not raw
    assert row[-1] == "3.00x (juicefs)"
    assert report.ratios(sample())["remote"]["seq_write_vs_s3"] == pytest.approx(3.0)
    # no ceiling measured: no derived row
    assert (
        METRIC_BY_KEY["seq_write_vs_s3"].label
        not in report.markdown(sample()).split("**S3 remote**")[0]
    )


def test_close_write_cpu_and_tree_rows() -> None:
    table = _remote(report.markdown(sample()))
    close = _row(table, METRIC_BY_KEY["seq_write_close"].label)
    assert close[3] == "900" and close[7] == "3,000" and close[-1] == "—"
    cpu = _row(table, METRIC_BY_KEY["seq_write_cpu"].label)
    assert cpu[2] == "CPU-s/GiB"
    assert cpu[3:5] == ["2.00", "5.00"]
    assert cpu[-1] == "2.50x (juicefs)"  # lower is better: best other / fastcache
    put_cpu = _row(table, METRIC_BY_KEY["s3_put_cpu"].label)
    assert put_cpu[3] == "1.50" and put_cpu[-1] == "—"
    assert _row(table, METRIC_BY_KEY["tree_extract"].label)[-1] == "4.00x (juicefs)"
    assert _row(table, METRIC_BY_KEY["tree_rm"].label)[-1] == "0.50x (juicefs)"


def test_failed_ceiling_shows_err_and_the_server_as_culprit() -> None:
    results = sample()
    remote = results["profiles"]["remote"]
    del remote["figures"]["s3_put"], remote["figures"]["s3_put_cpu"]
    remote["errors"]["s3"] = {"s3_put": "ClientError: AccessDenied"}
    table = report.markdown(results)
    row = _row(_remote(table), METRIC_BY_KEY["s3_put"].label)
    assert row[3] == "err" and row[-1] == "—"
    assert "remote / S3 server / s3_put: failed: ClientError: AccessDenied" in table
    assert "| s3 |" not in table


def test_header_describes_the_source_tree() -> None:
    results = sample()
    results["params"]["tree"] = {"files": 2445, "dirs": 174}
    assert "source tree 2445 files in 174 dirs" in report.markdown(results)


def test_chart_axis_reads_as_plain_ratios() -> None:
    assert report.ratio_ticks([0.3, 3.0]) == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert report.ratio_ticks([1.5]) == [1.0, 2.0]  # parity is always on the axis
    assert [report.ratio_label(t) for t in (0.25, 0.5, 1.0, 2.0, 4.0)] == [
        "0.25x",
        "0.5x",
        "1x",
        "2x",
        "4x",
    ]
    fig = report.figure(sample())
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]  # the shared axis
    assert labels == ["0.5x", "1x", "2x", "4x"], labels  # the sample: 0.5x to 3x
    for ax in fig.axes:
        assert not [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]


def test_chart_shows_both_s3_profiles_side_by_side() -> None:
    fig = report.figure(sample())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["S3 local", "S3 remote"]
    left, right = (ax.get_position() for ax in fig.axes)
    assert left.x1 <= right.x0  # side by side, local first
    one = sample()
    del one["profiles"]["remote"]
    assert [ax.get_title() for ax in report.figure(one).axes] == ["S3 local"]


def test_chart_leaves_out_reference_and_derived_rows(tmp_path: Path) -> None:
    assert report.plot(sample(), tmp_path / "r.png")
    table = report.ratios(sample())
    assert "s3_put" not in table["remote"]


# --- the harness pieces --------------------------------------------------------------------
class FakeS3:
    def __init__(self) -> None:
        self.puts: dict[str, int] = {}
        self.bodies: set[bytes] = set()
        self.lock = threading.Lock()

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
        with self.lock:
            self.puts[f"{Bucket}/{Key}"] = len(Body)
            self.bodies.add(Body)


def test_put_ceiling_puts_whole_bodies_in_parallel() -> None:
    s3 = FakeS3()
    got = put_ceiling(s3, "b", 10 * 4096 + 1, jobs=3, body_size=4096, prefix="r0")
    assert got.bytes == 11 * 4096  # rounded up to whole bodies
    keys = sorted(k for k in s3.puts if "warmup" not in k)
    assert keys == [f"b/r0/{i:06d}" for i in range(11)]
    assert set(s3.puts.values()) == {4096}
    assert len(s3.bodies) == 8  # distinct bodies
    assert got.mib_s > 0 and got.cpu_per_gib >= 0


def test_put_ceiling_stops_at_its_time_limit() -> None:
    got = put_ceiling(FakeS3(), "b", 1 << 30, jobs=2, body_size=4096, time_limit=0)
    assert got.bytes < 1 << 30


def test_session_cpu_seconds_of_our_own_session_and_of_none() -> None:
    mine = session_cpu_seconds(os.getsid(0))
    assert mine is not None and mine >= 0
    assert session_cpu_seconds(2**22 + 12345) is None  # above any pid_max: no such session


def test_write_close_writes_every_byte_with_no_two_64k_pieces_alike(tmp_path: Path) -> None:
    size = 3 * 2**20 + 5000
    written, seconds = write_close(tmp_path / "f", size, deadline=float("inf"))
    data = (tmp_path / "f").read_bytes()
    assert written == size == len(data) and seconds >= 0
    pieces = [data[i : i + 65536] for i in range(0, size - 65536, 65536)]
    assert len(set(pieces)) == len(pieces)
    write_close(tmp_path / "g", 65536, deadline=float("inf"))
    assert (tmp_path / "g").read_bytes() != data[:65536]  # a new stamp per call


def test_source_tarball_is_a_clean_source_tree_made_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("a", "a/b", "c", "__pycache__", "site-packages"):
        (src / d).mkdir(parents=True)
    for rel in ("x.py", "a/y.py", "a/b/z.py", "c/w.py", "__pycache__/x.pyc", "site-packages/s.py"):
        (src / rel).write_text(rel)
    (src / "big.bin").write_bytes(b"\0" * (2**20 + 1))
    (src / "link.py").symlink_to(src / "x.py")
    cache = tmp_path / "cache"
    tree = source_tarball(src, 100, cache)
    assert (tree.files, tree.dirs) == (4, 4)  # src, a, a/b, c
    with tarfile.open(tree.tarball) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert {m.uid for m in tar.getmembers()} == {0}
    assert names == ["src/a/b/z.py", "src/a/y.py", "src/c/w.py", "src/x.py"]
    stamp = tree.tarball.stat().st_mtime_ns
    assert source_tarball(src, 100, cache).tarball.stat().st_mtime_ns == stamp  # cached
    small = source_tarball(src, 2, cache)
    assert small.files == 2 and small.tarball != tree.tarball


def test_quick_sets_small_defaults_that_flags_override() -> None:
    args = parse_args(["--quick"])
    assert args.file_size == QUICK["file_size"] and args.repeat == 1
    assert args.profiles == ["local"] and args.tree_files == 500
    args = parse_args(["--quick", "--repeat", "2", "--file-size", "32M"])
    assert args.repeat == 2 and args.file_size == 32 << 20 and args.small_files == 200
    assert parse_args([]).repeat == 3
    assert "src_tree" in WORKLOADS and parse_args(["--workloads", "src_tree"]).workloads == [
        "src_tree"
    ]
