"""Deployment as users run it: the `insitu` binary, free loopback ports, and started processes with their
logs (shared by the CLI end-to-end tests; the fixtures `procs` and `certs` are in conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ENV = {**os.environ, "COLUMNS": "200", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Started processes, their logs, and a cleanup that kills whatever is left."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([str(BIN / "insitu"), *args], stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                    cwd=self.root)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def wait_for_text(self, name: str, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None and text not in self.log(name):
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}) before printing {text!r}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not print {text!r} in {timeout} s:\n{self.log(name)}")
            time.sleep(0.05)

    def wait(self, name: str, timeout: float = 180) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout} s:\n{self.log(name)}") from None

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
