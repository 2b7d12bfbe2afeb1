"""bench.report: the table, the ratios, the README section, the chart, from a sample dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import report


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
                "figures": {"seq_read_warm": {"fastcache": _fig(700.0), "s3fs": _fig(1400.0)}},
                "errors": {},
                "notes": ["raw: same figures"],
            },
        },
    }


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if f"| {label} |" in line:
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in\n{table}")


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
