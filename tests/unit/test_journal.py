"""The write-back journal: replay, torn records, compaction, crash survival, thread safety;
and the record of commits the coordinator has not acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastcache.chunks import digest
from fastcache.journal import (
    JOURNAL_NAME,
    Journal,
    PendingCommits,
    decode_record,
    encode_record,
    replay_file,
)


def names(n: int, tag: str = "") -> list[str]:
    return [digest(f"{tag}{i}".encode()) for i in range(n)]


def test_record_round_trip_and_damage() -> None:
    d = names(1)[0]
    line = encode_record("add", d)
    assert line.endswith(b"\n")
    assert decode_record(line[:-1]) == ("add", d)
    assert decode_record(encode_record("done", d)[:-1]) == ("done", d)
    flipped = bytearray(line[:-1])
    flipped[6] ^= 0x01  # a digest char: the checksum no longer matches
    assert decode_record(bytes(flipped)) is None
    assert decode_record(line[:-5]) is None
    assert decode_record(b"") is None
    assert decode_record(b"garbage") is None


def test_replay_of_add_and_done(tmp_path: Path) -> None:
    a, b, c = names(3)
    j = Journal.open(tmp_path)
    assert j.add(a) and j.add(b) and j.add(c)
    j.done(b)
    assert j.pending == {a, c}
    j.close()
    again = Journal.open(tmp_path)
    assert again.pending == {a, c}
    again.done(a)
    again.add(b)  # re-added after done: pending again
    again.close()
    third = Journal.open(tmp_path)
    assert third.pending == {b, c}
    third.close()


def test_torn_last_line_is_ignored_and_not_glued_to_new_records(tmp_path: Path) -> None:
    a, b, c = names(3, "torn")
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(encode_record("add", a) + encode_record("add", b)[:20])
    assert replay_file(path) == ({a}, 1)
    j = Journal.open(tmp_path)
    assert j.pending == {a}
    j.add(c)  # appended after the torn tail was dropped by the open-time rewrite
    j.close()
    assert replay_file(path) == ({a, c}, 0)


def test_damaged_record_in_the_middle_is_skipped(tmp_path: Path) -> None:
    a, b = names(2, "mid")
    path = tmp_path / JOURNAL_NAME
    bad = bytearray(encode_record("add", b))
    bad[10] ^= 0x02
    path.write_bytes(encode_record("add", a) + bytes(bad))
    assert replay_file(path) == ({a}, 1)


def test_missing_file_is_an_empty_journal(tmp_path: Path) -> None:
    assert replay_file(tmp_path / "nope") == (set(), 0)
    j = Journal.open(tmp_path / "sub" / "dir")
    assert j.pending == frozenset()
    j.close()
    assert (tmp_path / "sub" / "dir" / JOURNAL_NAME).exists()


def test_compaction_keeps_exactly_the_pending_set(tmp_path: Path) -> None:
    all_names = names(200, "c")
    keep = set(all_names[::7])
    j = Journal.open(tmp_path, compact_after=50)
    for name in all_names:
        j.add(name)
    for name in all_names:
        if name not in keep:
            j.done(name)
    assert j.compactions >= 2  # once at open, then on the done count
    assert j.pending == keep
    j.close()
    lines = (tmp_path / JOURNAL_NAME).read_bytes().splitlines()
    assert len(lines) < 200  # compacted: far fewer than the 200 adds + ~170 dones appended
    assert replay_file(tmp_path / JOURNAL_NAME) == (keep, 0)
    assert not (tmp_path / (JOURNAL_NAME + ".new")).exists()


def test_add_many_is_one_write_and_re_adding_writes_nothing(tmp_path: Path) -> None:
    batch = names(20, "many")
    j = Journal.open(tmp_path)
    before = j.writes
    assert j.add_many(batch + batch[:5]) == batch
    assert j.writes == before + 1
    assert j.add_many(batch) == []
    assert not j.add(batch[0])
    assert j.writes == before + 1
    j.close()
    assert replay_file(tmp_path / JOURNAL_NAME) == (set(batch), 0)


def test_add_is_never_fsynced_but_survives_sigkill(tmp_path: Path) -> None:
    """Acknowledged means written to the page cache: a SIGKILL right after loses nothing."""
    batch = names(50, "kill")
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from fastcache.journal import Journal\n"
        "j = Journal.open(Path(sys.argv[1]))\n"
        "for d in sys.argv[2:]:\n"
        "    j.add(d)\n"
        "assert j.fsyncs == 0\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), *batch], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert replay_file(tmp_path / JOURNAL_NAME) == (set(batch), 0)


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    j.close()
    with pytest.raises(RuntimeError):
        j.add(names(1, "closed")[0])


def test_threads_add_and_done_concurrently(tmp_path: Path) -> None:
    j = Journal.open(tmp_path, compact_after=64)
    per_thread = [names(300, f"t{i}-") for i in range(4)]

    def work(batch: list[str]) -> None:
        for i, d in enumerate(batch):
            j.add(d)
            if i % 2:
                j.done(d)

    threads = [threading.Thread(target=work, args=(b,)) for b in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {d for b in per_thread for d in b[::2]}
    assert j.pending == expected
    j.sync()
    assert j.fsyncs == 1
    j.close()
    assert replay_file(tmp_path / JOURNAL_NAME) == (expected, 0)


def test_pending_commits_round_trip(tmp_path: Path) -> None:
    commits = PendingCommits(tmp_path)
    commits.put(7, {"ino": 7, "expected": 3, "manifest": {"size": 0}, "changed": [0]})
    commits.put(7, {"ino": 7, "expected": 4, "manifest": {"size": 1}, "changed": [0, 1]})
    commits.put(9, {"ino": 9, "expected": 1, "manifest": {"size": 2}, "changed": []})
    (commits.directory / "12.json").write_bytes(b"{torn")
    again = PendingCommits(tmp_path)
    loaded = again.load()
    assert loaded == {
        7: {"ino": 7, "expected": 4, "manifest": {"size": 1}, "changed": [0, 1]},
        9: {"ino": 9, "expected": 1, "manifest": {"size": 2}, "changed": []},
    }
    assert (commits.directory / "12.json").exists()  # damaged: kept for an operator
    again.remove(7)
    again.remove(7)  # idempotent
    assert set(again.load()) == {9}
    assert not [p for p in os.listdir(commits.directory) if p.endswith(".tmp")]
