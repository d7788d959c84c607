"""Engines: interchangeable ClientPool implementations (in-process now; Ray and gRPC plug in)."""

from insitu.engines.base import ClientPool, EvalOutcome, FitOutcome, Task
from insitu.engines.inprocess import ClientFn, InProcessPool, NotEnoughClientsError

__all__ = ["ClientFn", "ClientPool", "EvalOutcome", "FitOutcome", "InProcessPool", "NotEnoughClientsError", "Task"]
