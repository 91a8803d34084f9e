"""Fixtures for the stress tests: a private tgtd for the session and a fresh PostgreSQL database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.storage.conftest import private_tgtd
from tests.storage.tgtd import TgtDaemon
from tests.stress.harness import PgDatabase, create_database, drop_database


@pytest.fixture(scope="session")
def stress_tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TgtDaemon]:
    with private_tgtd(tmp_path_factory.mktemp("tgtd-stress")) as daemon:
        yield daemon


@pytest.fixture
def tgtd(stress_tgtd: TgtDaemon) -> Iterator[TgtDaemon]:
    """The private tgtd, empty at the start of each test; a test during which it died fails."""
    stress_tgtd.clear()
    yield stress_tgtd
    if not stress_tgtd.alive():
        why = f"exit status {stress_tgtd.proc.returncode if stress_tgtd.proc else '?'}: {stress_tgtd.log_tail(3)}"
        stress_tgtd.restart_empty()
        pytest.fail(f"tgtd died during the test: {why}")
    stress_tgtd.clear()


@pytest.fixture
def pg() -> Iterator[PgDatabase]:
    """A PostgreSQL database of the test's own, migrated to head, dropped afterwards."""
    database = create_database("tether_stress")
    try:
        yield database
    finally:
        drop_database(database)
