"""Concurrency stress on the coordinator's namespace: many clients, one small tree.

Eight clients race creates, mkdirs, hard links, renames (also of directories across each
other), unlinks and rmdirs over a handful of names. Each operation may legitimately fail
(EEXIST, ENOENT, ENOTEMPTY, EINVAL for a directory into its own subtree…); what must hold
afterwards — and after a SIGKILL and restart — are the namespace invariants:

- every entry points at a live inode, and the tree is a tree (no directory is its own
  ancestor, every directory is reachable exactly once);
- a file's nlink equals the number of entries naming it;
- a directory's nlink is 2 + its subdirectories.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest

from fastcache import errors
from fastcache.coordinator.client import CoordinatorClient
from tests.integration.conftest_coordinator import CoordinatorProcess

pytestmark = pytest.mark.race

NAMES = ["a", "b", "c", "d"]
EXPECTED = (
    errors.Exists,
    errors.NotFound,
    errors.NotEmpty,
    errors.NotADirectory,
    errors.IsADirectory,
    errors.InvalidArgument,
    errors.NotPermitted,
)


async def _dirs(client: CoordinatorClient) -> list[int]:
    """Directory inodes reachable from the root (root first)."""
    out, todo = [], [1]
    while todo:
        ino = todo.pop()
        out.append(ino)
        for entry in await _entries(client, ino):
            if entry.attrs.type == "dir":
                todo.append(entry.attrs.ino)
    return out


async def _entries(client: CoordinatorClient, ino: int) -> list:
    entries, offset = [], 0
    while True:
        batch = await client.readdir(ino, offset=offset, limit=100)
        if not batch:
            return entries
        entries.extend(batch)
        offset = batch[-1].offset


async def _worker(client: CoordinatorClient, seed: int, ops: int) -> Counter[str]:
    rng = random.Random(seed)
    outcome: Counter[str] = Counter()
    for _ in range(ops):
        try:
            dirs = await _dirs(client)
        except errors.NotFound:  # a directory vanished under the walk: the race at work
            outcome["walk:NotFound"] += 1
            continue
        parent, other = rng.choice(dirs), rng.choice(dirs)
        name, new_name = rng.choice(NAMES), rng.choice(NAMES)
        op = rng.choice(["create", "mkdir", "link", "rename", "rename", "unlink", "rmdir"])
        try:
            if op == "create":
                await client.create(parent, name, type="file", mode=0o644)
            elif op == "mkdir":
                await client.mkdir(parent, name)
            elif op == "link":
                target = await client.lookup(parent, name)
                await client.link(target.ino, other, new_name)
            elif op == "rename":
                await client.rename(parent, name, other, new_name)
            elif op == "unlink":
                await client.unlink(parent, name)
            else:
                await client.rmdir(parent, name)
            outcome[f"{op}:ok"] += 1
        except EXPECTED as exc:
            outcome[f"{op}:{type(exc).__name__}"] += 1
    return outcome


async def _check_invariants(client: CoordinatorClient) -> dict[str, int]:
    names_per_inode: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    seen_dirs: set[int] = set()
    kinds: dict[int, str] = {}
    todo = [1]
    while todo:
        ino = todo.pop()
        assert ino not in seen_dirs, f"directory {ino} reachable twice: the tree has a cycle"
        seen_dirs.add(ino)
        for entry in await _entries(client, ino):
            attrs = await client.getattr(entry.attrs.ino)  # the inode is alive
            kinds[attrs.ino] = attrs.type
            if attrs.type == "dir":
                subdirs[ino] += 1
                todo.append(attrs.ino)
            else:
                names_per_inode[attrs.ino] += 1
    for ino, count in names_per_inode.items():
        assert (await client.getattr(ino)).nlink == count, f"file {ino}: nlink != entries"
    for ino in seen_dirs:
        assert (await client.getattr(ino)).nlink == 2 + subdirs[ino], f"dir {ino}: bad nlink"
    return {"dirs": len(seen_dirs), "files": len(names_per_inode)}


def test_concurrent_namespace_operations_keep_invariants(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    async def run() -> tuple[Counter[str], dict[str, int]]:
        clients = [CoordinatorClient(coordinator.url) for _ in range(8)]
        try:
            results = await asyncio.gather(
                *(_worker(c, seed, 60) for seed, c in enumerate(clients))
            )
            return sum(results, Counter()), await _check_invariants(clients[0])
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    outcome, shape = asyncio.run(run())
    # The race really happened: operations succeeded and collided.
    assert sum(v for k, v in outcome.items() if k.endswith(":ok")) > 50
    assert sum(v for k, v in outcome.items() if not k.endswith(":ok")) > 20
    assert outcome["rename:ok"] > 0 and outcome["link:ok"] > 0

    coordinator.kill()
    coordinator.start()

    async def after_restart() -> dict[str, int]:
        async with CoordinatorClient(coordinator.url) as client:
            return await _check_invariants(client)

    assert asyncio.run(after_restart()) == shape


def test_concurrent_commits_on_one_version_exactly_one_wins(
    coordinator: CoordinatorProcess,
) -> None:
    digest = "0" * 32

    async def run() -> list[object]:
        async with CoordinatorClient(coordinator.url) as setup:
            attrs = await setup.create(1, "contended", type="file", mode=0o644)
        clients = [CoordinatorClient(coordinator.url) for _ in range(8)]
        try:
            manifests = [
                {"size": size, "chunk_size": 4 << 20, "chunks": [digest]} for size in range(1, 9)
            ]
            return await asyncio.gather(
                *(
                    c.commit_manifest(attrs.ino, m, expected_version=attrs.version)
                    for c, m in zip(clients, manifests, strict=True)
                ),
                return_exceptions=True,
            )
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    results = asyncio.run(run())
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, errors.Conflict) for r in losers)

    async def final_size() -> int:
        async with CoordinatorClient(coordinator.url) as client:
            return (await client.resolve("/contended")).size

    assert asyncio.run(final_size()) == winners[0].size  # type: ignore[attr-defined]
