"""Shared fixtures: the team's MNIST copy beside the repository; started processes and a keygen'd federation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cli_harness import BIN, ENV, Procs

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST IDX files not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture
def procs(tmp_path):
    """Processes started for one test (their logs in tmp_path), killed at its end whatever happened."""
    p = Procs(tmp_path)
    yield p
    p.kill_all()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A federation's keys from the real `insitu keygen`: a CA, the server's, and clients 0, 1, 2."""
    root = tmp_path_factory.mktemp("keys")
    subprocess.run([str(BIN / "insitu"), "keygen", "--out", str(root / "fed"), "--clients", "3"], check=True, env=ENV,
                   capture_output=True)
    return root / "fed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test is a failure: a missing data set or dependency must not pass silently."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {skipped} test(s) skipped; a skip hides a broken install or missing data: failing")
        session.exitstatus = 1
