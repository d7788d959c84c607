"""Engines: interchangeable ClientPool implementations (in-process now; Ray and gRPC plug in)."""

from insitu.engines.base import ClientPool, EvalOutcome, FitOutcome, NotEnoughClientsError, Task
from insitu.engines.inprocess import ClientFn, InProcessPool

__all__ = ["ClientFn", "ClientPool", "EvalOutcome", "FitOutcome", "InProcessPool", "NotEnoughClientsError", "Task"]
