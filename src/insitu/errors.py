"""Exceptions shared across packages, in a module that imports nothing (no import cycles)."""

from __future__ import annotations


class RoundAborted(RuntimeError):
    """A round protocol could not finish the round (e.g. secure aggregation lost too many clients).

    The round loop records the round as failed and keeps the previous global model; the run goes on.
    A protocol raises a subclass of this, so the loop needs to know no protocol by name."""
