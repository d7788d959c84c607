"""Ray engine: each client task runs on a Ray actor somewhere in a cluster, in the in-process order.

``make_ray_engine(experiment)`` is a :class:`~insitu.engines.parallel.ParallelPool` over a
:class:`RayRunner`: one actor per CPU of the cluster (or ``workers``), each training one client at a
time with one torch thread. Every actor builds the experiment itself from its
:class:`~insitu.simulation.SimulationConfig` (sent as a JSON dict), so no dataset travels through
the driver: each node reads the data from its own ``data_dir``.

What crosses the cluster is bytes: the global model is put in Ray's object store once per model
version (``insitu.serde``: a JSON header and raw arrays) and every task of that version names it; a
result comes back as a JSON header (kind, num_examples, metrics, loss) and serde payloads, never as a
pickled insitu object. Ray's own control plane still pickles the actor class and the calls (see
docs/ray.md: a Ray cluster is one trust domain).

An actor that dies (``ray.kill``, a SIGKILLed worker, a lost node) reports :class:`WorkerLost` for
the tasks it held; the round goes on with the others and a fresh actor takes its place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from insitu import serde
from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.engines.base import Outcome
from insitu.engines.parallel import Job, ParallelPool, WorkerLost
from insitu.engines.processes import json_metrics, split_config
from insitu.params import Parameters

if TYPE_CHECKING:
    from insitu.simulation import Experiment

ClientFactory = Callable[[], Callable[[str], Client]]
"""Builds a ``client_fn`` inside an actor: a picklable, importable function for your own clients."""

_MISSING_RAY = "the Ray engine needs Ray: pip install 'insitu[ray]' (or pip install 'ray>=2.9')"


_DEPTH = 2
"""Jobs sent to an actor at once: the next one waits in the actor's queue, so it starts without a round
trip to the driver (a lost actor loses it too)."""


def _ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(_MISSING_RAY) from error
    return ray


def _init_local(ray: Any, workers: int) -> None:
    """A private Ray instance on this machine, on 127.0.0.1 only: no dashboard, no usage report.

    On Linux Ray swaps a loopback node address for the machine's network address (so that other nodes
    could join); its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ray is
    imported, hence also set on the imported module) keeps 127.0.0.1. The processes Ray starts
    inherit the setting; this process gets its own back once the instance is up.
    """
    from ray._private import ray_constants

    saved_env = {key: os.environ.get(key) for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")}
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(include_dashboard=False, num_cpus=workers or None, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    finally:
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RemoteClientError(RuntimeError):
    """A client raised inside its actor; the message names the original exception."""


# -- the wire format between driver and actors: JSON headers and serde payloads, no pickle --

def encode_config(config: Config) -> tuple[bytes, list[bytes]]:
    """Scalars go into a JSON header; named arrays (e.g. SCAFFOLD's control variate) as serde payloads
    (the processes engine's :func:`~insitu.engines.processes.split_config`)."""
    scalars, arrays, payloads = split_config(config)
    return json.dumps({"scalars": scalars, "arrays": arrays}).encode(), payloads


def decode_config(header: bytes, payloads: list[bytes]) -> Config:
    meta = json.loads(header)
    config: Config = dict(meta["scalars"])
    for key, payload in zip(meta["arrays"], payloads, strict=True):
        config[key] = serde.loads(payload)
    return config


def encode_outcome(outcome: FitResult | EvalResult | BaseException) -> tuple[bytes, list[bytes]]:
    """A result (or a client's failure) as a JSON header and serde payloads."""
    if isinstance(outcome, FitResult):
        names = list(outcome.extras)
        header = {"kind": "fit", "num_examples": int(outcome.num_examples), "metrics": json_metrics(outcome.metrics),
                  "extras": names}
        return json.dumps(header).encode(), [serde.dumps(outcome.parameters),
                                             *(serde.dumps(outcome.extras[n]) for n in names)]
    if isinstance(outcome, EvalResult):
        header = {"kind": "evaluate", "loss": float(outcome.loss), "num_examples": int(outcome.num_examples),
                  "metrics": json_metrics(outcome.metrics)}
        return json.dumps(header).encode(), []
    return json.dumps({"kind": "error", "error": f"{type(outcome).__name__}: {outcome}"}).encode(), []


def decode_outcome(header: bytes, payloads: list[bytes], expected: Parameters | None = None) -> Outcome:
    """The inverse of :func:`encode_outcome`; a fit's parameters are checked against ``expected``'s specs."""
    meta = json.loads(header)
    if meta["kind"] == "fit":
        specs = expected.specs if expected is not None else None
        parameters = serde.loads(payloads[0], expected=specs)
        extras = {name: serde.loads(p) for name, p in zip(meta["extras"], payloads[1:], strict=True)}
        return FitResult(parameters, int(meta["num_examples"]), dict(meta["metrics"]), extras)
    if meta["kind"] == "evaluate":
        return EvalResult(float(meta["loss"]), int(meta["num_examples"]), dict(meta["metrics"]))
    return RemoteClientError(str(meta["error"]))


class _Worker:
    """The actor's body: builds the clients once, then runs one task at a time."""

    def __init__(self, config_json: str | None, client_factory: ClientFactory | None, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the kernels' reduction order, hence the bits, depends on it
        if client_factory is not None:
            self.client_fn = client_factory()
        else:
            from insitu.simulation import SimulationConfig, build_experiment

            values = json.loads(config_json or "{}")
            values.update(engine="inprocess", cohort_batching=False)  # the actor runs its clients itself
            self.client_fn = build_experiment(SimulationConfig.from_dict(values, "the Ray driver")).client_fn
        self._model_id = ""
        self._parameters: Parameters | None = None

    def ready(self) -> str:
        """The id of the node this actor runs on (answers once construction is done)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def pid(self) -> int:
        return os.getpid()

    def run(self, client_id: str, kind: str, config_header: bytes, config_payloads: list[bytes],
            model_id: str, model: bytes) -> tuple[bytes, list[bytes]]:
        """Train or evaluate ``client_id`` on ``model`` (serde bytes, fetched from the object store)."""
        try:
            if self._model_id != model_id or self._parameters is None:  # decode once per model version
                self._parameters = serde.loads(model)
                self._model_id = model_id
            client = self.client_fn(client_id)
            config = decode_config(config_header, config_payloads)
            outcome: FitResult | EvalResult | BaseException
            if kind == "fit":
                outcome = client.fit(self._parameters, config)
            else:
                outcome = client.evaluate(self._parameters, config)
            return encode_outcome(outcome)  # inside the try: an unencodable result is the client's failure
        except Exception as error:  # noqa: BLE001 - a failing client is reported, never fatal
            return encode_outcome(error)


class RayRunner:
    """A :class:`~insitu.engines.parallel.TaskRunner` over Ray actors.

    Give ``config`` (a ``SimulationConfig``: each actor builds the experiment from it) or
    ``client_factory`` (a picklable function returning a ``client_fn``, called once in each actor:
    for your own clients; define it in an importable module so every node can load it).
    ``workers`` = 0 starts one actor per CPU of the cluster. ``address`` joins a running cluster
    ("host:port" or "auto"); without one a local Ray instance is started and shut down on ``close``.
    """

    def __init__(self, config: Any = None, *, client_factory: ClientFactory | None = None,
                 address: str | None = None, workers: int = 0, threads: int = 1) -> None:
        if (config is None) == (client_factory is None):
            raise ValueError("RayRunner needs exactly one of config (a SimulationConfig) and client_factory")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one actor per CPU of the cluster), got {workers}")
        ray = _ray()
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                _init_local(ray, workers)
        self._workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._config_json = json.dumps(asdict(config)) if config is not None else None
        self._factory = client_factory
        self._threads = threads
        self._actor_class = ray.remote(num_cpus=1, max_restarts=0)(_Worker)
        self.actors: list[Any] = [self._new_actor() for _ in range(self._workers)]
        self._load = [0] * self._workers  # jobs sent to each actor and not yet back
        self._generation = [0] * self._workers  # bumped when a slot's actor is replaced
        self._pending: list[Job] = []
        self._running: dict[Any, tuple[int, int, Job]] = {}  # result ref -> (actor slot, generation, job)
        self._models: dict[tuple[int, int], tuple[Parameters, Any, int]] = {}  # -> (parameters, ref, jobs)
        self.tasks_run = [0] * self._workers  # tasks finished per actor slot (tests, logs)

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self._config_json, self._factory, self._threads)

    @property
    def slots(self) -> int:
        return self._workers

    def node_ids(self) -> list[str]:
        """The node each actor runs on (waits until they are built)."""
        return list(self._ray.get([actor.ready.remote() for actor in self.actors]))

    def worker_pids(self) -> list[int]:
        """The actors' process ids (on their nodes; the benchmark reads their CPU time on one machine)."""
        return [int(pid) for pid in self._ray.get([actor.pid.remote() for actor in self.actors])]

    def start(self, job: Job) -> None:
        key = (job.model_version, id(job.parameters))
        entry = self._models.get(key)
        if entry is None:  # once per model version: every job of it names the same object
            entry = (job.parameters, self._ray.put(serde.dumps(job.parameters)), 0)
        self._models[key] = (entry[0], entry[1], entry[2] + 1)
        self._pending.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._pending:
            slot = min(range(self._workers), key=self._load.__getitem__)
            if self._load[slot] >= _DEPTH:
                return
            job = self._pending.pop(0)
            self._load[slot] += 1
            header, payloads = encode_config(job.config)
            _, model_ref, _ = self._models[(job.model_version, id(job.parameters))]
            ref = self.actors[slot].run.remote(job.client_id, job.kind, header, payloads, model_ref.hex(),
                                               model_ref)
            self._running[ref] = (slot, self._generation[slot], job)

    def _release_model(self, job: Job) -> None:
        key = (job.model_version, id(job.parameters))
        parameters, ref, jobs = self._models[key]
        if jobs <= 1:
            del self._models[key]
        else:
            self._models[key] = (parameters, ref, jobs - 1)

    def finished(self) -> list[tuple[int, Outcome]]:
        ray = self._ray
        if not self._running:
            raise RuntimeError("finished() called with no job started")
        done, _ = ray.wait(list(self._running), num_returns=1)
        done, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0) if done else (done, None)
        reported: list[tuple[int, Outcome]] = []
        lost: set[int] = set()
        for ref in done:
            slot, generation, job = self._running.pop(ref)
            current = generation == self._generation[slot]
            if current:
                self._load[slot] -= 1
            outcome: Outcome
            try:
                header, payloads = ray.get(ref)
                outcome = decode_outcome(header, payloads, job.parameters if job.kind == "fit" else None)
                self.tasks_run[slot] += 1
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
                outcome = WorkerLost(f"the Ray actor running client {job.client_id}'s {job.kind} task died: {error}")
                if current:
                    lost.add(slot)
            except ray.exceptions.RayError as error:  # the task itself failed in Ray (object lost, ...)
                outcome = WorkerLost(f"Ray lost client {job.client_id}'s {job.kind} task: {error}")
            except (ValueError, KeyError, IndexError, TypeError) as error:  # a result that does not decode
                outcome = RuntimeError(f"client {job.client_id}'s {job.kind} result is unreadable: "
                                       f"{type(error).__name__}: {error}")
            self._release_model(job)
            reported.append((job.task_id, outcome))
        for slot in lost:  # a fresh actor for the later tasks and rounds
            self.actors[slot] = self._new_actor()
            self._generation[slot] += 1
            self._load[slot] = 0  # its other jobs are lost with it, reported as their refs fail
        self._dispatch()
        return reported

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors.clear()
        self._running.clear()
        self._pending.clear()
        self._models.clear()
        if self._owns_ray:
            self._ray.shutdown()


def make_ray_engine(experiment: Experiment, address: str | None = None, workers: int = 0) -> ParallelPool:
    """The Ray engine for ``experiment``: its config's ``ray_address`` and ``workers`` unless given here."""
    config = experiment.config
    if experiment.client_states is not None:
        raise ValueError(f"strategy {config.strategy!r} (or local DP) keeps per-client state in one process; the Ray "
                         "engine runs a client on any actor: use engine 'inprocess' or 'processes'")
    runner = RayRunner(config, address=address or config.ray_address or None, workers=workers or config.workers)
    return ParallelPool(runner, config.num_clients, experiment.systems)
