"""Results out: the JSON file, the Markdown table, the PNG chart, the README section.

The results dict (what ``bench/results/<date>.json`` holds)::

    {"started": iso, "finished": iso, "params": {...}, "machine": {...},
     "page_cache": "drop_caches" | "remount", "proxy": {...},
     "systems": {name: {"versions": {...}, "options": {...}}},
     "profiles": {"local" | "remote": {
         "figures": {metric: {system: {"median": x | None, "runs": [...]}}},
         "errors": {system: {workload: message}}, "notes": [...]}}}

Reference figures (the S3 PUT ceiling) sit under the pseudo-system ``"s3"``: no column
of their own, they are shown in the column of every S3-backed system (the server each of
them writes to); derived rows (seq write / S3 PUT ceiling) are computed here, per system.

Ratios are "fastcache against the best other system" (raw disk is the ceiling, not a
competitor), oriented so that above 1 means fastcache is ahead: fastcache / best for
rates, best / fastcache for latencies and bytes. Reference rows have no ratio.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.workloads import METRICS, REFERENCE, Metric

SUBJECT = "fastcache"
CEILING = "raw"
START_MARK = "<!-- bench:start -->"
END_MARK = "<!-- bench:end -->"
PROFILE_ORDER = ("local", "remote")  # S3 on loopback, then behind the latency proxy
SYSTEM_ORDER = ("fastcache", "juicefs", "rclone", "s3fs", "weed", "raw")

Results = dict[str, Any]


def write_json(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _median(fig: dict[str, Any] | None) -> float | None:
    if not fig:
        return None
    value = fig.get("median")
    return float(value) if isinstance(value, int | float) else None


def systems_in(results: Results) -> list[str]:
    """The table's columns: every system with a figure or an error (not the reference)."""
    seen: set[str] = set()
    for prof in results.get("profiles", {}).values():
        for per_system in prof.get("figures", {}).values():
            seen.update(per_system)
        seen.update(prof.get("errors", {}))
    seen.discard(REFERENCE)
    known = [s for s in SYSTEM_ORDER if s in seen]
    return known + sorted(seen - set(known))


def best_other(metric: Metric, per_system: dict[str, Any]) -> tuple[str, float] | None:
    """The best competitor's (name, median) for this metric, or None."""
    candidates = [
        (name, v)
        for name, fig in per_system.items()
        if name not in (SUBJECT, CEILING) and (v := _median(fig)) is not None
    ]
    if not candidates:
        return None
    pick = max if metric.higher_is_better else min
    return pick(candidates, key=lambda c: c[1])


def with_derived(figures: dict[str, Any]) -> dict[str, Any]:
    """``figures`` plus the derived metrics: per system (not the raw disk), its figure of
    ``of[0]`` over the reference figure of ``of[1]``."""
    out = dict(figures)
    for m in METRICS:
        if m.kind != "derived" or m.of is None:
            continue
        ref = _median(figures.get(m.of[1], {}).get(REFERENCE))
        per_system: dict[str, Any] = {}
        for name, fig in figures.get(m.of[0], {}).items():
            value = _median(fig)
            if name in (CEILING, REFERENCE) or value is None or not ref:
                continue
            per_system[name] = {"median": value / ref, "runs": []}
        if per_system:
            out[m.key] = per_system
    return out


def ratio(metric: Metric, subject: float | None, other: float | None) -> float | None:
    """Above 1: fastcache ahead."""
    if subject is None or other is None:
        return None
    if metric.higher_is_better:
        return subject / other if other > 0 else None
    return other / subject if subject > 0 else None


def ratios(results: Results) -> dict[str, dict[str, float | None]]:
    """profile → metric → fastcache vs best other."""
    out: dict[str, dict[str, float | None]] = {}
    for profile, prof in results.get("profiles", {}).items():
        figures = with_derived(prof.get("figures", {}))
        row: dict[str, float | None] = {}
        for m in METRICS:
            if m.kind == "reference":
                continue
            per_system = figures.get(m.key, {})
            best = best_other(m, per_system)
            row[m.key] = ratio(m, _median(per_system.get(SUBJECT)), best[1] if best else None)
        out[profile] = row
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _tree_text(params: dict[str, Any]) -> str:
    tree = params.get("tree")
    if not isinstance(tree, dict):
        return ""
    return f"source tree {tree.get('files', '?')} files in {tree.get('dirs', '?')} dirs, "


def markdown(results: Results) -> str:
    """The tables (one per S3 profile), with the conditions they were measured under."""
    params = results.get("params", {})
    machine = results.get("machine", {})
    proxy = results.get("proxy", {})
    systems = systems_in(results)
    lines: list[str] = []
    when = str(results.get("started", ""))[:16].replace("T", " ")
    lines.append(
        f"Measured {when} by `fastcache bench` on {machine.get('cpus', '?')} cores, "
        f"{machine.get('ram_gib', '?')} GiB RAM, {machine.get('disk', '?')}: "
        f"file {_fmt_size(int(params.get('file_size', 0)))}, "
        f"{params.get('small_files', '?')} small files, "
        + _tree_text(params)
        + f"median of {params.get('repeat', '?')} run(s). "
        f"Page cache dropped by {results.get('page_cache', '?')}."
    )
    lines.append("")
    for profile, prof in results.get("profiles", {}).items():
        if profile == "remote":
            bw = proxy.get("bandwidth_mib_s")
            cap = f", {bw:g} MiB/s per connection" if bw else ""
            title = f"**S3 remote** (through the harness proxy: +{proxy.get('delay_ms', '?')} ms "
            title += f"first byte per response{cap})"
        else:
            title = "**S3 local** (loopback SeaweedFS)"
        lines.append(title)
        lines.append("")
        header = ["workload", "metric", "unit", *systems, "fastcache vs best other"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(systems) + 1)) + "|")
        figures = with_derived(prof.get("figures", {}))
        errors = prof.get("errors", {})
        for m in METRICS:
            per_system = figures.get(m.key, {})
            if m.kind == "reference":
                if not per_system and m.runner not in errors.get(REFERENCE, {}):
                    continue
                lines.append("| " + " | ".join(_reference_cells(m, per_system, systems)) + " |")
                continue
            if not per_system:
                continue
            cells = [m.workload, m.label, m.unit]
            for s in systems:
                value = _median(per_system.get(s))
                if value is None and s in errors and m.runner in errors[s]:
                    cells.append("err")
                else:
                    cells.append(fmt(value))
            best = best_other(m, per_system)
            r = ratio(m, _median(per_system.get(SUBJECT)), best[1] if best else None)
            cells.append(f"{r:.2f}x ({best[0]})" if r is not None and best else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for s, errs in sorted(errors.items()):
            s = "S3 server" if s == REFERENCE else s
            for w, msg in errs.items():
                first = str(msg).strip().splitlines()[0] if str(msg).strip() else "?"
                lines.append(f"- {profile} / {s} / {w}: failed: {first[:200]}")
        for note in prof.get("notes", []):
            lines.append(f"- {profile}: {note}")
        if errors or prof.get("notes"):
            lines.append("")
    versions = []
    for name in systems:
        for k, v in results.get("systems", {}).get(name, {}).get("versions", {}).items():
            versions.append(v if str(v).lower().startswith(k) else f"{k} {v}")
    if versions:
        lines.append("Versions: " + "; ".join(versions) + ".")
        lines.append("")
    lines.append(
        "Ratios above 1 mean fastcache is ahead (rates: fastcache / best; latency, CPU and S3 "
        "bytes: best / fastcache); raw disk is the ceiling, not counted as a competitor. "
        "The S3 PUT ceiling is the server alone (bare parallel PUTs from the harness, through "
        "the proxy in the remote profile), shown in every S3-backed system's column. Client "
        "CPU is the mount process's (utime + stime) from before the write until the file is "
        "durable."
    )
    return "\n".join(lines) + "\n"


def _reference_cells(metric: Metric, per_system: dict[str, Any], systems: list[str]) -> list[str]:
    """A reference row: the one figure in every S3-backed system's column, no ratio."""
    value = _median(per_system.get(REFERENCE))
    shown = fmt(value) if value is not None else "err"
    cells = [metric.workload, metric.label, metric.unit]
    cells += ["—" if s == CEILING else shown for s in systems]
    return [*cells, "—"]


def ratio_ticks(values: list[float]) -> list[float]:
    """Powers of two around ``values`` and 1 (parity): the log axis's ticks."""
    lo = min([1.0, *values])
    hi = max([1.0, *values])
    low = 2.0 ** math.floor(math.log2(lo))
    high = 2.0 ** math.ceil(math.log2(hi))
    ticks = [low]
    while ticks[-1] < high:
        ticks.append(ticks[-1] * 2)
    return ticks


def ratio_label(value: float) -> str:
    """A tick's label as a plain ratio: 0.25x, 1x, 4x (no scientific notation)."""
    return f"{value:g}x"


def figure(results: Results) -> Any:
    """The ratio chart (a matplotlib ``Figure``): one panel per S3 profile, side by side on
    one log axis labelled in plain ratios (1x = parity); ``None`` without matplotlib or
    without ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        return None
    table = ratios(results)
    keys = [
        m.key for m in METRICS if m.kind == "system" and any(table[p].get(m.key) for p in table)
    ]
    if not keys:
        return None
    profiles = [p for p in PROFILE_ORDER if p in table] + sorted(set(table) - set(PROFILE_ORDER))
    values = [v for p in profiles for k in keys if (v := table[p].get(k))]
    ticks = ratio_ticks(values)
    width = max(8.0, 0.8 * len(keys) + 2)
    fig, axes = plt.subplots(
        1, len(profiles), figsize=(width * len(profiles) ** 0.75, 4.8), sharey=True, squeeze=False
    )
    for ax, profile in zip(axes[0], profiles, strict=True):
        ys = [table[profile].get(k) or 0.0 for k in keys]
        bars = ax.bar(range(len(keys)), ys, 0.7)
        for bar, y in zip(bars, ys, strict=True):
            if y:
                ax.annotate(
                    ratio_label(float(f"{y:.2g}")),
                    (bar.get_x() + bar.get_width() / 2, y),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(ticks[0] / 1.2, ticks[-1] * 1.2)
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: ratio_label(v)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("_", " ") for k in keys], rotation=35, ha="right")
        ax.set_title(f"S3 {profile}")
    axes[0][0].set_ylabel("fastcache vs best other (>1x = ahead)")
    fig.suptitle("fastcache against the best other system, per workload")
    fig.tight_layout()
    return fig


def plot(results: Results, path: Path) -> bool:
    """Save ``figure(results)`` as a PNG; False if there is nothing to draw or no matplotlib."""
    fig = figure(results)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replace_section(text: str, body: str) -> str:
    """``text`` with what lies between the bench markers replaced by ``body``.

    Without markers, a "Performance" section holding them is appended.
    """
    block = f"{START_MARK}\n{body.rstrip()}\n{END_MARK}"
    start = text.find(START_MARK)
    end = text.find(END_MARK)
    if start >= 0 and end > start:
        return text[:start] + block + text[end + len(END_MARK) :]
    if start >= 0 or end >= 0:
        raise ValueError("README has only one of the bench markers")
    return text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"


def update_readme(readme: Path, body: str) -> None:
    new = replace_section(readme.read_text(), body)
    fd, tmp = tempfile.mkstemp(dir=readme.parent, prefix=".readme-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, 0o644)
    os.replace(tmp, readme)
