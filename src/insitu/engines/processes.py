"""The multi-process engine: clients train in forked worker processes, results fold in the main one.

:class:`ProcessRunner` is a :class:`~insitu.engines.parallel.TaskRunner`; :func:`process_pool` wraps it
in a :class:`~insitu.engines.parallel.ParallelPool`, which keeps the in-process engine's order, so the
same seed gives the same parameters, bit for bit, as in-process (with equal torch thread counts).

How it works, and why:

* Workers are forked (Linux) once the experiment is built, so each inherits ``client_fn``, the data set
  (copy-on-write pages: held once, not once per worker) and one model; nothing is pickled to start them.
* The global model goes to the workers through shared memory: the main process writes its flat float32
  vector into one ``SharedMemory`` block per live (version, parameters) and sends each job only the
  block's name and the specs; a worker views the block (no copy). Parameters that are not all-float32
  travel as serde bytes with each job.
* Jobs and results cross pipes as bytes: a JSON header plus :mod:`insitu.serde` payloads, never pickle.
* Per-client state (SCAFFOLD's control variate, local DP's accountant) stays in the main process's
  :class:`~insitu.client.state.MemoryStates`: each job carries its client's state to the worker and the
  result brings it back, so a client may run on any worker from one round to the next.
* A worker that dies mid-task (killed, out of memory) reports :class:`WorkerLost` for its job and is
  replaced by a fresh fork; the round goes on with the other results. If forking fails the pool goes
  on with the workers it has, and fails loudly only when none is left.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from insitu import serde
from insitu.client.api import Client, Config, EvalResult, FitResult
from insitu.client.state import MemoryStates
from insitu.engines.base import Outcome
from insitu.engines.parallel import Job, ParallelPool, WorkerLost
from insitu.engines.systems import SystemsModel
from insitu.params import Parameters, ParamSpec

ClientFn = Callable[[str], Client]

_SHM_PREFIX = "insitu-"
_STOP_WAIT_S = 5.0
_PARENT_CHECK_S = 1.0  # how often an idle worker checks that the main process is still alive
_PIPELINE = 2  # jobs sent to a worker at once: the one it runs and the next
_PIPELINE_MAX_BYTES = 16 * 1024  # a queued job's message must fit the pipe's buffer (see _dispatch)
_WORKER_BLOCK_CACHE = 2  # model blocks a worker keeps mapped (FedBuff hands out a few versions at once)


class ClientError(RuntimeError):
    """A client raised in a worker process: its exception's type name and message, carried back as text."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


def _warm_up() -> None:
    """Take one optimizer step on a throwaway tensor before forking.

    torch imports some 800 modules (torch._dynamo, sympy: seconds of CPU) on the first optimizer step
    of a process; done once here, every worker inherits them instead of importing them all again in
    its first task, all at once, on the same cores.
    """
    import torch

    weight = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    (weight * weight).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), the default number of workers."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# -- framing: a JSON header plus raw payloads, in one message ---------------------------------------


def _frame(header: dict[str, Any], payloads: list[bytes]) -> bytes:
    header = dict(header, sizes=[len(p) for p in payloads])
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join([len(head).to_bytes(4, "little"), head, *payloads])


def _unframe(data: bytes) -> tuple[dict[str, Any], list[memoryview]]:
    view = memoryview(data)
    size = int.from_bytes(view[:4], "little")
    header = json.loads(bytes(view[4 : 4 + size]))
    payloads, offset = [], 4 + size
    for length in header["sizes"]:
        payloads.append(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise ValueError(f"message holds {len(view)} bytes, its header accounts for {offset}")
    return header, payloads


def _specs_json(specs: tuple[ParamSpec, ...]) -> list[list[Any]]:
    return [[s.name, list(s.shape), s.dtype.str] for s in specs]


def _specs_from_json(raw: list[list[Any]]) -> list[ParamSpec]:
    return [ParamSpec(name, tuple(int(d) for d in shape), np.dtype(dtype)) for name, shape, dtype in raw]


def split_config(config: Config) -> tuple[dict[str, Any], list[str], list[bytes]]:
    """Scalars go in the header; named arrays (SCAFFOLD's server control variate) as serde payloads."""
    scalars: dict[str, Any] = {}
    names: list[str] = []
    payloads: list[bytes] = []
    for key, value in config.items():
        if isinstance(value, Parameters):
            names.append(key)
            payloads.append(serde.dumps(value))
        elif isinstance(value, (bool, int, float, str)):
            scalars[key] = value
        else:
            raise TypeError(f"config value {key!r} is a {type(value).__name__}; a task's config holds scalars "
                            "(bool, int, float, str) or Parameters")
    return scalars, names, payloads


def json_metrics(metrics: dict[str, Any]) -> dict[str, float | int | bool]:
    """Metrics as JSON numbers; a value that is not a number is refused by name."""
    out: dict[str, float | int | bool] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
        else:
            raise TypeError(f"metric {key!r} is a {type(value).__name__}; a client's metrics must be numbers")
    return out


def _state_payload(states: MemoryStates | None, client_id: str) -> list[bytes]:
    """One client's stored arrays (none: an empty list) as a serde payload."""
    if states is None:
        return []
    # MemoryStates keeps one dict of flat float32 arrays per client; it is moved between processes whole.
    stored = states._by_client.get(client_id) or {}
    return [serde.dumps(Parameters(list(stored), list(stored.values())))]


def _restore_state(states: MemoryStates | None, client_id: str, payload: memoryview | None) -> None:
    if states is None or payload is None:
        return
    arrays = {name: np.asarray(array, dtype=np.float32).reshape(-1) for name, array in serde.loads(payload)}
    store = states._by_client.setdefault(client_id, {})
    store.clear()
    store.update(arrays)


# -- the worker process ------------------------------------------------------------------------------


def _worker_main(conn: Connection, client_fn: ClientFn, states: MemoryStates | None, threads: int,
                 parent: int) -> None:
    """Serve jobs until told to stop, the pipe closes or the main process is gone."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops us
    torch.set_num_threads(threads)
    blocks: dict[str, tuple[SharedMemory, Parameters]] = {}  # shared model blocks this worker maps
    while True:
        if not conn.poll(_PARENT_CHECK_S):
            if os.getppid() != parent:
                return
            continue
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        header, payloads = _unframe(data)
        if header["op"] == "stop":
            break
        reply = _serve(header, payloads, client_fn, states, blocks)
        del data, payloads
        try:
            conn.send_bytes(reply)
        except (BrokenPipeError, OSError):
            return
    for name in list(blocks):
        _unmap(blocks, name)


def _unmap(blocks: dict[str, tuple[SharedMemory, Parameters]], name: str) -> None:
    shm, parameters = blocks.pop(name)
    del parameters
    try:
        shm.close()
    except BufferError:  # a client kept a view of the model: the mapping goes when the process does
        pass


def _job_parameters(header: dict[str, Any], payloads: list[memoryview],
                    blocks: dict[str, tuple[SharedMemory, Parameters]]) -> Parameters:
    model = header["model"]
    if "payload" in model:
        return serde.loads(payloads[model["payload"]])
    name = model["shm"]
    if name not in blocks:
        while len(blocks) >= _WORKER_BLOCK_CACHE:
            _unmap(blocks, next(iter(blocks)))
        shm = SharedMemory(name=name)
        specs = _specs_from_json(model["specs"])
        view = np.ndarray((sum(s.size for s in specs),), dtype=np.float32, buffer=shm.buf)
        blocks[name] = (shm, Parameters.from_flat(view, specs, copy=False))
    return blocks[name][1]


def _serve(header: dict[str, Any], payloads: list[memoryview], client_fn: ClientFn, states: MemoryStates | None,
           blocks: dict[str, tuple[SharedMemory, Parameters]]) -> bytes:
    """Run one job; the reply is the result, or the client's exception as type name and message."""
    client_id = header["client_id"]
    reply: dict[str, Any] = {"task_id": header["task_id"]}
    out: list[bytes] = []
    try:
        if states is not None:
            _restore_state(states, client_id, payloads[header["state"]])
        parameters = _job_parameters(header, payloads, blocks)
        config: Config = dict(header["config"])
        for key, index in zip(header["config_params"], header["config_payloads"]):
            config[key] = serde.loads(payloads[index])
        client = client_fn(client_id)
        if header["kind"] == "fit":
            fit = client.fit(parameters, config)
            reply.update(result="fit", num_examples=int(fit.num_examples), metrics=json_metrics(fit.metrics),
                         extras=list(fit.extras))
            out = [serde.dumps(fit.parameters), *(serde.dumps(value) for value in fit.extras.values())]
            del fit
        else:
            evaluation = client.evaluate(parameters, config)
            reply.update(result="evaluate", loss=float(evaluation.loss), num_examples=int(evaluation.num_examples),
                         metrics=json_metrics(evaluation.metrics))
        del client, parameters
    except Exception as error:  # noqa: BLE001 - reported to the main process as the task's failure
        reply = {"task_id": header["task_id"], "result": "error", "type": type(error).__name__, "message": str(error)}
        out = []
    if states is not None:  # the client's state goes home with the result, whatever it was
        reply["state"] = len(out)
        out += _state_payload(states, client_id)
        states._by_client.pop(client_id, None)
    return _frame(reply, out)


def _decode_result(header: dict[str, Any], payloads: list[memoryview]) -> Outcome:
    kind = header["result"]
    if kind == "error":
        return ClientError(header["type"], header["message"])
    if kind == "evaluate":
        return EvalResult(header["loss"], header["num_examples"], header["metrics"])
    extras = {name: serde.loads(payloads[1 + i]) for i, name in enumerate(header["extras"])}
    return FitResult(serde.loads(payloads[0]), header["num_examples"], header["metrics"], extras)


# -- the main process's side ----------------------------------------------------------------------


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    jobs: deque[Job] = field(default_factory=deque)  # sent, not yet answered; the first is running


@dataclass
class _Block:
    """One model version in shared memory, and how many started jobs still need it."""

    shm: SharedMemory
    parameters: Parameters  # held so the key's id() stays unique while the block lives
    refs: int = 0


@dataclass
class _Resources:
    """What must be released when the runner goes: held apart from it so a finalizer can do it."""

    owner: int = field(default_factory=os.getpid)
    workers: list[_Worker] = field(default_factory=list)
    blocks: dict[tuple[int, int], _Block] = field(default_factory=dict)
    main_threads: int | None = None  # the main process's torch threads before the runner set them

    def shutdown(self) -> None:
        if os.getpid() != self.owner:  # a forked worker never stops its siblings
            return
        for worker in self.workers:
            if worker.jobs:  # its result is no longer wanted (FedBuff leaves tasks running)
                worker.process.terminate()
                continue
            try:
                worker.conn.send_bytes(_frame({"op": "stop"}, []))
            except (BrokenPipeError, OSError):
                pass
        for worker in self.workers:
            worker.conn.close()  # a worker blocked sending a result gets a broken pipe and exits
        for worker in self.workers:
            _reap(worker)
        self.workers.clear()
        for key in list(self.blocks):
            _free(self.blocks.pop(key))
        if self.main_threads is not None:
            import torch

            torch.set_num_threads(self.main_threads)
            self.main_threads = None


def _reap(worker: _Worker) -> None:
    """Wait for the worker to exit (terminating, then killing, one that does not), so none is left a zombie."""
    worker.process.join(_STOP_WAIT_S)
    if worker.process.is_alive():
        worker.process.terminate()
        worker.process.join(_STOP_WAIT_S)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.conn.close()  # closing twice is harmless


def _free(block: _Block) -> None:
    block.shm.close()
    try:
        block.shm.unlink()
    except FileNotFoundError:
        pass


class ProcessRunner:
    """Runs jobs on ``workers`` forked processes, one job at a time each (``slots`` = workers).

    ``states`` is the simulation's per-client state (``Experiment.client_states``), kept here and moved
    to whichever worker runs the client. Each worker uses ``threads`` torch threads (default 1: the
    workers already share the cores). Fork the runner after the experiment is built: the workers
    inherit its data and model as they are at that moment.

    While the runner lives, the main process's own torch work (folding the updates, central evaluation)
    runs on ``main_threads`` threads (default 1; None leaves torch's setting alone): the workers hold
    the cores, and a multi-threaded fold waits for threads that cannot be scheduled (on a 2-core
    machine, folding a 200k-value update took 14 ms with 2 threads against 0.2 ms with 1). Restored on close.
    """

    def __init__(self, client_fn: ClientFn, workers: int, *, states: MemoryStates | None = None,
                 threads: int = 1, main_threads: int | None = 1) -> None:
        if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError(f"the processes engine forks its workers, which this platform ({sys.platform}) does "
                               "not support: use --engine inprocess")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            raise RuntimeError("CUDA is initialized in this process and a CUDA context does not survive a fork: "
                               "the processes engine trains on CPU workers; run accelerator jobs in-process")
        if threads < 1:
            raise ValueError(f"threads per worker must be >= 1, got {threads}")
        self.client_fn = client_fn
        self.states = states
        self.threads = threads
        self._context = multiprocessing.get_context("fork")
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.shutdown)  # on garbage collection or at exit
        self._pending: deque[Job] = deque()
        self._done: list[tuple[int, Outcome]] = []
        self._names = 0
        # Workers attaching a block register it with the resource tracker; they must share the main
        # process's tracker (started before forking), or their own would unlink live blocks on exit.
        resource_tracker.ensure_running()
        _warm_up()
        if main_threads is not None:
            import torch

            self._res.main_threads = torch.get_num_threads()  # restored on close
            torch.set_num_threads(main_threads)
        for _ in range(workers):
            self._res.workers.append(self._fork())

    @property
    def slots(self) -> int:
        return len(self._res.workers)

    def _fork(self) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, name="insitu-worker", daemon=True,
                                        args=(theirs, self.client_fn, self.states, self.threads, os.getpid()))
        process.start()
        theirs.close()  # the worker's end lives in the worker only, so its death closes the pipe
        return _Worker(process, ours)

    def start(self, job: Job) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("the process runner is closed")
        self._hold(job)
        self._pending.append(job)
        self._dispatch()

    def finished(self) -> list[tuple[int, Outcome]]:
        while not self._done:
            busy = [w for w in self._res.workers if w.jobs]
            if not busy:
                raise RuntimeError("finished() was called with no job running: start a job first")
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    self._collect(worker)
            self._dispatch()
        done, self._done = self._done, []
        return done

    def _collect(self, worker: _Worker) -> None:
        """Take every reply the worker has sent; if it has died, its running job is lost."""
        while worker.jobs:
            try:
                if not worker.conn.poll():
                    break
                header, payloads = _unframe(worker.conn.recv_bytes())
            except (EOFError, OSError):
                break
            job = worker.jobs.popleft()
            if header["task_id"] != job.task_id:
                raise RuntimeError(f"worker {worker.process.pid} answered task {header['task_id']} while running "
                                   f"{job.task_id}: the pipe is out of step")
            outcome: Outcome
            try:
                if self.states is not None and "state" in header:
                    _restore_state(self.states, job.client_id, payloads[header["state"]])
                outcome = _decode_result(header, payloads)
            except (ValueError, KeyError, IndexError) as error:  # serde.SerdeError is a ValueError
                outcome = RuntimeError(f"client {job.client_id}'s result from worker {worker.process.pid} is "
                                       f"unreadable: {error}")
            self._release(job)
            self._done.append((job.task_id, outcome))
        if not worker.process.is_alive():
            self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        """Report the job the worker was running as lost, hand its queued ones to the others, reap it and
        fork a replacement (or go on with fewer)."""
        self._res.workers.remove(worker)
        _reap(worker)
        if worker.jobs:  # replies come in order: the first unanswered job was running, the rest never started
            job = worker.jobs.popleft()
            self._release(job)
            self._done.append((job.task_id, WorkerLost(
                f"the worker process running client {job.client_id}'s {job.kind} task died (exit code "
                f"{worker.process.exitcode}) before it reported back")))
            self._pending.extendleft(reversed(worker.jobs))
            worker.jobs.clear()
        try:
            self._res.workers.append(self._fork())
        except OSError as error:
            if not self._res.workers:
                raise RuntimeError(f"every worker process is gone and a new one cannot be forked ({error})") from error

    def _dispatch(self) -> None:
        """Give pending jobs to idle workers, then queue one more behind a busy worker's job when the
        message is small: the worker starts it as soon as it replies, without waiting for this process
        to wake up and read the reply. A large message waits for an idle worker (both sides blocked
        sending to each other would deadlock)."""
        for depth in range(_PIPELINE):
            for worker in list(self._res.workers):
                if not self._pending:
                    return
                if len(worker.jobs) != depth:
                    continue
                job = self._pending[0]
                if depth and not self._small(job):
                    continue
                message = self._message(job)
                if depth and len(message) >= _PIPELINE_MAX_BYTES:  # the whole message, header included
                    continue
                self._pending.popleft()
                worker.jobs.append(job)
                try:
                    worker.conn.send_bytes(message)
                except (BrokenPipeError, OSError):
                    self._lost(worker)

    def _small(self, job: Job) -> bool:
        """Whether the job's message is surely under ``_PIPELINE_MAX_BYTES``: its model in shared memory, no
        arrays in its config, little client state."""
        if self._key(job) not in self._res.blocks or any(isinstance(v, Parameters) for v in job.config.values()):
            return False
        stored = self.states._by_client.get(job.client_id) if self.states is not None else None
        return sum(a.nbytes for a in (stored or {}).values()) < _PIPELINE_MAX_BYTES // 2

    def _message(self, job: Job) -> bytes:
        scalars, names, payloads = split_config(job.config)
        header: dict[str, Any] = {"op": "job", "task_id": job.task_id, "client_id": job.client_id,
                                  "kind": job.kind, "config": scalars, "config_params": names,
                                  "config_payloads": list(range(len(names)))}
        block = self._res.blocks.get(self._key(job))
        if block is not None:
            header["model"] = {"shm": block.shm.name, "specs": _specs_json(job.parameters.specs)}
        else:
            header["model"] = {"payload": len(payloads)}
            payloads.append(serde.dumps(job.parameters))
        if self.states is not None:
            header["state"] = len(payloads)
            payloads += _state_payload(self.states, job.client_id)
        return _frame(header, payloads)

    @staticmethod
    def _key(job: Job) -> tuple[int, int]:
        return job.model_version, id(job.parameters)

    def _hold(self, job: Job) -> None:
        """Put the job's model in shared memory (once per version), or count one more job using it."""
        parameters = job.parameters
        if parameters.num_values == 0 or any(s.dtype != np.float32 for s in parameters.specs):
            return  # sent as serde bytes with the job
        key = self._key(job)
        block = self._res.blocks.get(key)
        if block is None:
            for old in [k for k, b in self._res.blocks.items() if b.refs == 0]:  # kept until a new version comes
                _free(self._res.blocks.pop(old))
            shm = self._new_block(parameters.num_values * 4)
            np.ndarray((parameters.num_values,), dtype=np.float32, buffer=shm.buf)[:] = parameters.flat()
            block = self._res.blocks[key] = _Block(shm, parameters)
        block.refs += 1

    def _new_block(self, size: int) -> SharedMemory:
        """A fresh block named insitu-PID-N (a name left behind by a dead process with our pid is skipped)."""
        while True:
            self._names += 1
            try:
                return SharedMemory(name=f"{_SHM_PREFIX}{os.getpid()}-{self._names}", create=True, size=size)
            except FileExistsError:
                continue

    def _release(self, job: Job) -> None:
        block = self._res.blocks.get(self._key(job))
        if block is not None:
            block.refs -= 1

    def shared_memory_names(self) -> list[str]:
        """The shared-memory blocks this runner holds now (for tests and diagnostics)."""
        return [block.shm.name for block in self._res.blocks.values()]

    def worker_pids(self) -> list[int]:
        """The live workers' process ids."""
        return [w.process.pid for w in self._res.workers if w.process.pid is not None]

    def running(self) -> dict[int, str]:
        """Worker pid -> the client whose job it is running now."""
        return {w.process.pid: w.jobs[0].client_id for w in self._res.workers
                if w.jobs and w.process.pid is not None}

    def close(self) -> None:
        self._pending.clear()
        self._done.clear()
        self._finalizer()


def process_pool(client_fn: ClientFn, num_clients: int, workers: int, *, systems: SystemsModel | None = None,
                 states: MemoryStates | None = None, threads: int = 1, window: int | None = None) -> ParallelPool:
    """An engine running ``num_clients`` virtual clients on ``workers`` forked processes (0 = one per core
    available), in the in-process engine's order (see :class:`ParallelPool`)."""
    runner = ProcessRunner(client_fn, workers or available_cores(), states=states, threads=threads)
    return ParallelPool(runner, num_clients, systems, window)
