"""Persistent run state in SQLite: survives a kill -9 of the server between any two statements.

After every round the server commits, in one transaction, the global parameters, the round record,
the server state (optimizer and algorithm) and the client registry. ``--resume`` reads the last committed round
back. Parameters are stored in insitu's own binary format (``serde``), never pickled.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from insitu import serde
from insitu.params import Parameters
from insitu.run.history import Evaluation, History, RoundRecord
from insitu.strategies.strategy import ServerState

SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """The store file is unusable (another schema, another run, corrupt)."""


class RunStore:
    """One SQLite file holding one federated run's committed rounds."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS rounds (
                round INTEGER PRIMARY KEY, parameters BLOB NOT NULL, optimizer_state BLOB,
                record TEXT NOT NULL, saved_at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS clients (
                client_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
                status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
            """
        )
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version}; this insitu reads {SCHEMA_VERSION}")

    # -- metadata --------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- rounds ----------------------------------------------------------------------------
    def save_round(self, record: RoundRecord, parameters: Parameters, server_state: ServerState | None,
                   initial: Evaluation | None = None) -> None:
        """Commit one finished round atomically (parameters, record, server state)."""
        blob = serde.dumps(parameters)
        arrays = server_state.to_arrays() if server_state is not None else {}
        state_blob = serde.dumps(Parameters.from_arrays(arrays)) if arrays else None
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO rounds (round, parameters, optimizer_state, record, saved_at) VALUES (?, ?, ?, ?, ?)",
                (record.round, blob, state_blob, json.dumps(asdict(record)), time.time()),
            )
            if initial is not None:
                self.set_meta("initial_evaluation", json.dumps(asdict(initial)))

    def last_round(self) -> int:
        row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def load(self) -> tuple[int, Parameters, History, ServerState | None] | None:
        """(last round, its parameters, the history up to it, server state), or None if empty.

        A None state means "nothing stored": the strategy starts from a fresh one."""
        last = self.last_round()
        if last == 0:
            return None
        blob, state_blob = self._db.execute(
            "SELECT parameters, optimizer_state FROM rounds WHERE round = ?", (last,)
        ).fetchone()
        records = [json.loads(r[0]) for r in self._db.execute("SELECT record FROM rounds ORDER BY round")]
        initial = self.get_meta("initial_evaluation")
        history = History.from_dict({"rounds": records, "initial": json.loads(initial) if initial else None})
        state = None if state_blob is None else ServerState.from_arrays(dict(serde.loads(state_blob)))
        return last, serde.loads(blob), history, state

    # -- client registry -------------------------------------------------------------------
    def record_client(self, client_id: str, status: str, detail: str = "") -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO clients (client_id, first_seen, last_seen, status, detail) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(client_id) DO UPDATE SET last_seen = excluded.last_seen, status = excluded.status, "
            "detail = excluded.detail",
            (client_id, now, now, status, detail),
        )

    def clients(self) -> dict[str, dict[str, Any]]:
        rows = self._db.execute("SELECT client_id, first_seen, last_seen, status, detail FROM clients")
        return {r[0]: {"first_seen": r[1], "last_seen": r[2], "status": r[3], "detail": r[4]} for r in rows}

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")

