"""Batched cohorts in-process: the in-process engine, with the fit tasks of one model version trained
together (:func:`insitu.client.batched.train_cohort`) instead of one client after another.

A :class:`BatchedPool` is a :class:`~insitu.engines.parallel.ParallelPool` whose runner is a
:class:`CohortRunner`: tasks are ordered and yielded exactly as the in-process engine orders them, so
results go through the same validation and folding; the runner only changes how they are computed.
Each batch of started fit tasks is grouped by (parameters, model, training tensors, device, loss);
every group of two or more batchable clients is trained as one vectorized computation. A client that
cannot be batched (see :func:`~insitu.client.batched.cohort_obstacle`: DP-SGD, FedProx, SCAFFOLD,
Adam, a custom loop plug-in or client, buffers, dropout, non-float32 parameters) runs its ordinary
``fit``; each reason is logged once (a warning: batching was asked for).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from insitu.client.api import Client
from insitu.client.batched import Member, cohort_key, cohort_obstacle, forbid_batching, train_cohort
from insitu.client.torch_client import TorchClient
from insitu.engines.base import Outcome
from insitu.engines.inprocess import ClientFn
from insitu.engines.parallel import Job, ParallelPool
from insitu.engines.systems import SystemsModel

log = logging.getLogger("insitu")

DEFAULT_MAX_COHORT = 256


class CohortRunner:
    """A :class:`~insitu.engines.parallel.TaskRunner` that runs in this process: ``start`` only queues a
    job; ``finished`` trains every queued fit task of one model version together and runs the rest
    (evaluations, clients that cannot be batched) one by one."""

    def __init__(self, client_fn: ClientFn, max_cohort: int = DEFAULT_MAX_COHORT,
                 on_fallback: Callable[[str, str], None] | None = None) -> None:
        if max_cohort < 1:
            raise ValueError(f"max_cohort must be >= 1, got {max_cohort}")
        self.client_fn = client_fn
        self.max_cohort = max_cohort
        self.on_fallback = on_fallback
        self.batched = 0  # fit tasks trained in a cohort so far
        self.sequential = 0  # fit tasks that ran their own loop
        self._pending: list[Job] = []
        self._logged: set[str] = set()

    @property
    def slots(self) -> int:
        return self.max_cohort

    def start(self, job: Job) -> None:
        self._pending.append(job)

    def finished(self) -> list[tuple[int, Outcome]]:
        jobs, self._pending = self._pending, []
        outcomes: dict[int, Outcome] = {}
        alone: list[tuple[Job, Client | None]] = []
        groups: dict[tuple[object, ...], list[tuple[Job, Member]]] = {}
        for job in jobs:
            if job.kind != "fit":
                alone.append((job, None))
                continue
            try:
                client = self.client_fn(job.client_id)
            except Exception as error:  # noqa: BLE001 - a failing client is reported, never fatal
                outcomes[job.task_id] = error
                continue
            reason = cohort_obstacle(client, job.config)
            if reason is not None:
                self._fallback(job.client_id, reason)
                alone.append((job, client))
                continue
            assert isinstance(client, TorchClient)
            member = Member(client, job.config)
            groups.setdefault((id(job.parameters), *cohort_key(member)), []).append((job, member))
        for group in groups.values():
            if len(group) == 1:
                alone.append((group[0][0], group[0][1].client))
                continue
            self._train_group(group, outcomes, alone)
        for job, maybe_client in alone:
            outcomes[job.task_id] = self._run_alone(job, maybe_client)
        return [(job.task_id, outcomes[job.task_id]) for job in jobs]

    def _train_group(self, group: list[tuple[Job, Member]], outcomes: dict[int, Outcome],
                     alone: list[tuple[Job, Client | None]]) -> None:
        parameters = group[0][0].parameters
        for start in range(0, len(group), self.max_cohort):
            chunk = group[start : start + self.max_cohort]
            try:
                results = train_cohort(parameters, [member for _, member in chunk])
            except RuntimeError as error:  # randomness in forward, an op vmap cannot batch, ...
                reason = f"batched training failed ({str(error).splitlines()[0]})"
                forbid_batching(chunk[0][1].client.model, reason)
                for job, member in chunk:
                    self._fallback(job.client_id, reason)
                    alone.append((job, member.client))
                continue
            self.batched += len(chunk)
            for (job, _), result in zip(chunk, results):
                outcomes[job.task_id] = result

    def _run_alone(self, job: Job, client: Client | None) -> Outcome:
        try:
            client = client if client is not None else self.client_fn(job.client_id)
            if job.kind == "fit":
                self.sequential += 1
                return client.fit(job.parameters, job.config)
            return client.evaluate(job.parameters, job.config)
        except Exception as error:  # noqa: BLE001 - a failing client is reported, never fatal
            return error

    def _fallback(self, client_id: str, reason: str) -> None:
        if self.on_fallback is not None:
            self.on_fallback(client_id, reason)
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("cohort batching: client %s (and any other with the same reason) trains on its own: %s",
                        client_id, reason)

    def close(self) -> None:
        self._pending.clear()


class BatchedPool(ParallelPool):
    """The in-process engine (same order, clock and systems model) with each model version's fit tasks
    trained as batched cohorts of up to ``max_cohort`` clients (see the module docstring)."""

    def __init__(self, client_fn: ClientFn, num_clients: int, systems: SystemsModel | None = None,
                 max_cohort: int = DEFAULT_MAX_COHORT) -> None:
        self.cohorts = CohortRunner(client_fn, max_cohort)
        super().__init__(self.cohorts, num_clients, systems, window=max_cohort)
