"""Keep Python's cyclic garbage collector off the long-lived heap while a simulation runs.

A simulation process holds hundreds of thousands of long-lived objects (torch, the dataset, the
model). Each full collection the round loop's bookkeeping happens to trigger scans all of them, a
pause of up to ~0.2 s that lands on whichever round is running. Freezing the heap present at the
start (``gc.freeze``) exempts it from those scans; ``gc.unfreeze`` on exit hands it back, so nothing
frozen can leak past the run.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the objects alive now for the duration of the block (no-op if the caller froze some,
    or turned the collector off, already)."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
