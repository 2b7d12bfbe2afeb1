"""Fixtures for the integration suites (real processes on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# --- coordinator fixture (owner: coordinator; see conftest_coordinator.py) --------------
from tests.integration.conftest_coordinator import CoordinatorProcess, start_coordinator


@pytest.fixture
def coordinator(tmp_path: Path, store_url: str) -> Iterator[CoordinatorProcess]:
    """A fresh coordinator process on each store (no token, 60 s peer timeout); SIGKILLed
    at teardown."""
    proc = start_coordinator(tmp_path / "coordinator", store=store_url)
    try:
        yield proc
    finally:
        proc.kill()


# --- end coordinator fixture -------------------------------------------------------------
