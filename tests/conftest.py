"""Shared fixtures: the team's MNIST copy beside the repository, tiny models and data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST IDX files not found at {MNIST_DIR}")
    return MNIST_DIR


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test is a failure: a missing data set or dependency must not pass silently."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {skipped} test(s) skipped; a skip hides a broken install or missing data: failing")
        session.exitstatus = 1
