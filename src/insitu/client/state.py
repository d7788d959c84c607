"""Per-client state that outlives one round (SCAFFOLD's control variate c_i, for one).

A client reads and writes its state through a :class:`ClientState`: a few named flat arrays. The
simulation keeps every virtual client's state in one :class:`MemoryStates` (one float32 vector per
client and name, nothing else: no model, no optimizer); a deployed client keeps it on disk in a
:class:`DiskState` folder, written atomically, so it survives a restart of the client process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from insitu import serde
from insitu.files import write_atomic
from insitu.params import Parameters


class ClientState(Protocol):
    """Named flat arrays belonging to one client."""

    def load(self, name: str) -> np.ndarray | None:
        """The stored array, or None if there is none yet."""

    def save(self, name: str, value: np.ndarray) -> None:
        """Store ``value`` (a copy is kept)."""


class MemoryState:
    """One client's slice of a :class:`MemoryStates` (what ``MemoryStates.for_client`` returns)."""

    def __init__(self, store: dict[str, np.ndarray]) -> None:
        self._store = store

    def load(self, name: str) -> np.ndarray | None:
        return self._store.get(name)

    def save(self, name: str, value: np.ndarray) -> None:
        self._store[name] = np.array(value, dtype=np.float32, copy=True).reshape(-1)


class MemoryStates:
    """Every simulated client's state, in memory: only clients that saved something take space."""

    def __init__(self) -> None:
        self._by_client: dict[str, dict[str, np.ndarray]] = {}

    def for_client(self, client_id: str) -> MemoryState:
        return MemoryState(self._by_client.setdefault(client_id, {}))

    def nbytes(self) -> int:
        """Bytes held by all stored arrays (to check the footprint stays one vector per client)."""
        return sum(a.nbytes for arrays in self._by_client.values() for a in arrays.values())

    def __len__(self) -> int:
        return sum(1 for arrays in self._by_client.values() if arrays)


class DiskState:
    """A deployed client's state: one ``NAME.insitu`` file (insitu's serde format) per name in ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, name: str) -> Path:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"state name {name!r} must be letters, digits, '_' or '-'")
        return self.folder / f"{name}.insitu"

    def load(self, name: str) -> np.ndarray | None:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            return dict(serde.loads(path.read_bytes()))[name]
        except (serde.SerdeError, KeyError) as error:
            raise ValueError(f"client state file {path} is unreadable ({error}); delete it to start afresh") from None

    def save(self, name: str, value: np.ndarray) -> None:
        """Write to a temporary file and rename it into place: a crash never leaves half a file."""
        blob = serde.dumps(Parameters.from_arrays({name: np.asarray(value, dtype=np.float32).reshape(-1)}))
        write_atomic(self._path(name), blob)
