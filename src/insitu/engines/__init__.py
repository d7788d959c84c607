"""Engines: interchangeable task streams (in-process and gRPC now; more plug in behind ``Engine``)."""

from insitu.engines.base import (
    Engine,
    NotEnoughClientsError,
    Outcome,
    Task,
    TaskResult,
    run_tasks,
)
from insitu.engines.inprocess import ClientFn, InProcessPool
from insitu.engines.systems import ClientDroppedOut, StragglerDropped, SystemsModel, epochs_times_batches

__all__ = [
    "ClientDroppedOut",
    "ClientFn",
    "Engine",
    "InProcessPool",
    "NotEnoughClientsError",
    "Outcome",
    "StragglerDropped",
    "SystemsModel",
    "Task",
    "TaskResult",
    "epochs_times_batches",
    "run_tasks",
]
