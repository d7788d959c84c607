"""``serve``: run the round loop over real remote clients, persisting every round.

The same ``Coordinator`` and ``Strategy`` as in simulation; only the pool differs. After every round
the global parameters, the round record and the client registry are committed to SQLite, so a server
killed at any moment resumes from its last completed round with ``resume=True``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from insitu.config import setting
from insitu.engines.grpc_pool import GrpcClientPool
from insitu.net import security
from insitu.net.client import GRPC_OPTIONS
from insitu.net.proto import federation_pb2_grpc as pb_grpc
from insitu.net.servicer import (
    MAX_EXAMPLES_PER_CLIENT,
    MAX_EXAMPLES_RATIO,
    UPLOAD_SLOTS,
    UPLOAD_STALL_S,
    UPLOAD_TIMEOUT_S,
    AttemptLimiter,
    FederationServicer,
)
from insitu.params import Parameters, describe_mismatch
from insitu.privacy.randomness import OSEntropy
from insitu.run.fedbuff import AsyncCoordinator, FedBuff
from insitu.run.history import History, RoundRecord
from insitu.run.loop import Coordinator, RoundCallback, RunResult
from insitu.run.store import RunStore
from insitu.strategies.strategy import ServerState, Strategy

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

log = logging.getLogger("insitu.server")

# Uploads waiting for their turn to be decoded must not each buffer megabytes: keep HTTP/2 receive
# windows at their small default instead of letting bandwidth probing grow them per stream.
# No SO_REUSEPORT: a second server on a busy port must fail to bind, not share the port and split the
# clients between two federations that then both wait forever.
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.http2.bdp_probe", 0), ("grpc.so_reuseport", 0)]


def _return_freed_memory_promptly() -> None:
    """Have glibc serve ~1 MiB message buffers by mmap (returned to the OS on free) and keep few
    per-thread arenas; otherwise hundreds of handler threads each retain freed chunk buffers and the
    server's footprint grows far beyond O(model). A no-op where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_arena_max = -3, -8
        libc.mallopt(m_mmap_threshold, 256 << 10)
        libc.mallopt(m_arena_max, 4)
    except (OSError, AttributeError):
        pass


@dataclass
class ServerTLS:
    """The server's certificate and key; with ``client_ca``, clients must present a certificate (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class ResumeError(RuntimeError):
    """The store cannot be resumed (or would be overwritten without --resume)."""


class BindError(OSError):
    """The server could not listen on its address (port in use by another server or program)."""


@dataclass
class ServerSettings:
    """Network, security and fault-tolerance settings of a federation server, declared once: ``insitu server``'s
    flags and its settings file's ``[server]`` keys are generated from these fields (``insitu.config``)."""

    address: str = setting("127.0.0.1:8080", section="network", help="host:port to listen on.")
    tls: ServerTLS | None = setting(None, section="security", cli=False, help="Built from --certs (and --mtls).")
    allow_list: Mapping[str, Ed25519PublicKey] | None = setting(  # a ReloadingAllowList picks up added clients
        None, section="security", cli=False, help="Built from --allow (default CERTS/allowed_clients.json).")
    insecure: bool = setting(False, section="security", help="Allow plaintext and no authentication, on a loopback "
                             "address only (tests).")
    allow_insecure_network: bool = setting(False, section="security", flag="--dangerously-allow-insecure-network",
                                           help="Serve a non-loopback address without TLS or without client "
                                           "authentication: anyone who reaches the port can read the models and "
                                           "join. Only on a network you fully trust.")
    store_path: Path | None = setting(None, section="run", aliases=("--store",), help="SQLite file for "
                                      "round-by-round persistence (default OUTPUT/server.db).")
    resume: bool = setting(False, section="run", help="Continue the run in --store from its last completed round.")
    round_timeout_s: float | None = setting(600.0, section="limits", aliases=("--round-timeout",),
                                            help="Seconds a round waits for results before dropping stragglers.")
    wait_timeout_s: float | None = setting(None, section="limits", aliases=("--wait-timeout",), help="Give up if "
                                           "too few clients connect within this many seconds (default: wait).")
    heartbeat_interval_s: float = setting(3.0, section="limits", aliases=("--heartbeat-interval",), help="Seconds "
                                          "between a client's heartbeats (command line default: min(3, "
                                          "heartbeat timeout / 4)).")
    heartbeat_timeout_s: float = setting(15.0, section="limits", aliases=("--heartbeat-timeout",),
                                         help="Drop a client silent for this many seconds.")
    max_update_bytes: int = setting(4 << 30, section="limits", help="Largest accepted update in bytes (never more "
                                    "than the model and its algorithm's extras need; or --max-update-mb).")
    upload_slots: int = setting(UPLOAD_SLOTS, section="limits", help="Uploads decoded at once; server memory grows "
                                "by about one model per slot.")
    upload_stall_s: float = setting(UPLOAD_STALL_S, section="limits", aliases=("--upload-stall",),
                                    help="Cancel an upload whose client sends nothing for this many seconds.")
    upload_timeout_s: float = setting(UPLOAD_TIMEOUT_S, section="limits", aliases=("--upload-timeout",),
                                      help="Cancel an upload still arriving this many seconds after it got a decode "
                                      "slot.")
    max_examples_per_client: int = setting(MAX_EXAMPLES_PER_CLIENT, section="limits", help="Weigh a result "
                                           "claiming more examples as this many (set it to your largest client's "
                                           "size).")
    max_examples_ratio: float = setting(MAX_EXAMPLES_RATIO, section="limits", help="Weigh a result as at most this "
                                        "many times the previous round's median example count (0 = off).")
    max_clients: int = setting(1000, section="limits", help="Most clients connected at once.")
    max_handshakes_per_minute: int = setting(600, section="security", help="Authentication attempts per minute "
                                             "from one peer host (clients behind one NAT share it).")
    server_name: str = setting("insitu", section="network", help="Name the server gives clients at "
                               "authentication.")
    model: str = setting("", section="network", cli=False, help="Architecture name told to clients at "
                         "authentication (they build the same model); set from the strategy's --model.")

    def __post_init__(self) -> None:
        """Refuse limits under which no task, upload or session could ever succeed, naming the setting."""
        positive = {"heartbeat_interval_s": self.heartbeat_interval_s, "heartbeat_timeout_s": self.heartbeat_timeout_s,
                    "upload_stall_s": self.upload_stall_s, "upload_timeout_s": self.upload_timeout_s,
                    "max_update_bytes": self.max_update_bytes, "upload_slots": self.upload_slots,
                    "max_examples_per_client": self.max_examples_per_client, "max_clients": self.max_clients,
                    "max_handshakes_per_minute": self.max_handshakes_per_minute}
        for name in ("round_timeout_s", "wait_timeout_s"):  # None: no limit
            value = getattr(self, name)
            if value is not None:
                positive[name] = value
        for name, value in positive.items():
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"server setting {name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.max_examples_ratio) and self.max_examples_ratio >= 0):
            raise ValueError(f"server setting max_examples_ratio must be >= 0 (0 = off), got {self.max_examples_ratio!r}")
        if self.heartbeat_interval_s >= self.heartbeat_timeout_s:
            raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be below heartbeat_timeout_s "
                             f"({self.heartbeat_timeout_s}), or every client is dropped between two heartbeats")


class FederationServer:
    """A started gRPC server plus its pool; use ``run`` then ``stop`` (or the context manager)."""

    def __init__(self, settings: ServerSettings) -> None:
        security.check_bind_allowed(settings.address, tls=settings.tls is not None,
                                    authenticated=settings.allow_list is not None,
                                    allow_insecure_network=settings.allow_insecure_network)
        if settings.allow_list is None and not settings.insecure:
            raise ValueError("client authentication is required: give the allow-list of client keys "
                             "(--allow FILE, made by `insitu keygen`) or --insecure for a test federation")
        if not security.is_loopback(settings.address) and (settings.tls is None or settings.allow_list is None):
            log.warning("DANGER: serving %s to the network %s: anyone who can reach this port can read the "
                        "models and join the federation", settings.address,
                        "in plaintext" if settings.tls is None else "without client authentication")
        self.settings = settings
        self.pool = GrpcClientPool(round_timeout=settings.round_timeout_s,
                                   heartbeat_timeout=settings.heartbeat_timeout_s, max_clients=settings.max_clients)
        self.servicer = FederationServicer(self.pool, allow_list=settings.allow_list, server_name=settings.server_name,
                                           max_update_bytes=settings.max_update_bytes,
                                           upload_slots=settings.upload_slots, upload_stall_s=settings.upload_stall_s,
                                           upload_timeout_s=settings.upload_timeout_s,
                                           max_examples_per_client=settings.max_examples_per_client,
                                           max_examples_ratio=settings.max_examples_ratio,
                                           heartbeat_interval_s=settings.heartbeat_interval_s,
                                           limiter=AttemptLimiter(settings.max_handshakes_per_minute, 60.0),
                                           model=settings.model)
        _return_freed_memory_promptly()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=min(settings.max_clients, 200) * 2 + 8),
                                   options=SERVER_OPTIONS, maximum_concurrent_rpcs=None,
                                   interceptors=[self.servicer.gate])  # refuses calls without a session first
        pb_grpc.add_FederationServicer_to_server(self.servicer, self._server)
        try:
            if settings.tls is not None:
                creds = security.server_credentials(settings.tls.cert, settings.tls.key, settings.tls.client_ca)
                self.port = self._server.add_secure_port(settings.address, creds)
            else:
                self.port = self._server.add_insecure_port(settings.address)
        except RuntimeError:  # grpc raises a bare "Failed to bind to address ..."
            self.port = 0
        if self.port == 0:
            self._server.stop(None)
            raise BindError(f"cannot listen on {settings.address}: the port is in use (another insitu server, "
                            "or another program) or the address is not this machine's. Stop the other server, "
                            "or choose a free port with --address HOST:PORT")
        self._server.start()
        mode = "TLS" + (" + client certificates" if settings.tls and settings.tls.client_ca else "") if settings.tls else "plaintext"
        auth = f"{len(settings.allow_list)} allowed client keys" if settings.allow_list is not None else "no authentication"
        log.info("server listening on %s (port %d, %s, %s)", settings.address, self.port, mode, auth)

    def run(self, strategy: Strategy, initial_parameters: Parameters, *, num_rounds: int, seed: int = 0,
            on_round: RoundCallback | None = None, allow_seeded_privacy: bool = False,
            fedbuff: FedBuff | None = None) -> RunResult:
        """Run (or resume) ``num_rounds`` rounds; every finished round is committed before the next.

        With ``fedbuff`` the rounds are FedBuff's asynchronous server steps (each committed the same way).

        A strategy whose DP randomness is reproducible (``SimulationSeed``) is refused: anyone who knows
        the seed could subtract the noise. ``allow_seeded_privacy=True`` is for tests that compare a
        deployment with a seeded simulation, and gives no privacy."""
        privacy = strategy.privacy
        if privacy is not None and privacy.randomness.reproducible and not allow_seeded_privacy:
            raise ValueError(f"a deployed server must draw DP noise from OS entropy, but this strategy's noise comes "
                             f"from {privacy.randomness.describe()}; drop its randomness= argument (OSEntropy is "
                             "the default)")
        store = RunStore(self.settings.store_path) if self.settings.store_path else None
        start_round, parameters, history, state = 1, initial_parameters, History(), None
        listener = None
        if store is not None:
            start_round, parameters, history, state = self._restore(store, initial_parameters)
            listener = lambda event, cid, detail: store.record_client(cid, event, detail)
            self.pool.listeners.append(listener)
        if start_round > num_rounds:
            log.info("all %d rounds are already done in %s", num_rounds, self.settings.store_path)
            return RunResult(parameters, history, state)

        def after_round(record: RoundRecord, params: Parameters, server_state: ServerState) -> None:
            if store is not None:
                store.save_round(record, params, server_state, history.initial)
            if on_round is not None:
                on_round(record, params, server_state)

        # Under DP who takes part must stay secret: the Poisson sample comes from OS entropy, never the seed.
        sampling = OSEntropy() if strategy.privacy is not None else None
        coordinator: Coordinator | AsyncCoordinator
        if fedbuff is not None:
            coordinator = AsyncCoordinator(strategy, self.pool, fedbuff, num_rounds=num_rounds, seed=seed,
                                           wait_timeout=self.settings.wait_timeout_s, on_round=after_round)
        else:
            coordinator = Coordinator(strategy, self.pool, num_rounds=num_rounds, seed=seed, sampling=sampling,
                                      wait_timeout=self.settings.wait_timeout_s, on_round=after_round)
        try:
            # Hand the model over without keeping a reference here: from round 2 on the server then
            # holds only the current global model (plus the accumulator and one update).
            handoff = [parameters]
            del parameters, initial_parameters
            return coordinator.run(handoff.pop(), start_round=start_round, history=history, server_state=state)
        finally:
            if store is not None:
                self.pool.listeners.remove(listener)
                store.close()

    def _restore(self, store: RunStore, initial: Parameters) -> tuple[int, Parameters, History, ServerState | None]:
        loaded = store.load()
        if loaded is None:
            if self.settings.resume:
                log.info("nothing to resume in %s: starting at round 1", self.settings.store_path)
            return 1, initial, History(), None
        last, parameters, history, state = loaded
        if not self.settings.resume:
            raise ResumeError(f"{self.settings.store_path} already holds rounds 1-{last} of a run: pass --resume to "
                              "continue it, or choose another --store")
        problem = describe_mismatch(parameters.specs, initial.specs)
        if problem:
            raise ResumeError(f"{self.settings.store_path} holds another model ({problem}); resume with the same model")
        log.info("resuming after round %d from %s", last, self.settings.store_path)
        return last + 1, parameters, history, state

    def stop(self, grace_s: float = 5.0, *, resumable: bool = False) -> None:
        """Tell clients the federation is over (they receive it at their next pull), then stop.

        ``resumable``: the run stopped early (Ctrl-C, an error) and can go on with ``resume=True``:
        clients are told to wait and reconnect instead of leaving."""
        self.pool.close(resumable=resumable)
        deadline = time.monotonic() + grace_s
        while self.pool.connected() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._server.stop(grace=1.0).wait(5.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        # A run that ended by an exception (Ctrl-C included) kept its completed rounds: resumable.
        # Long-polling clients hear of it within a fraction of a second, clients finishing a short
        # task at their next pull; those still training after the grace find the server gone and
        # reconnect with backoff, so there is no need to wait long for them.
        if kind is None:
            self.stop()
        else:
            self.stop(grace_s=5.0, resumable=True)


def serve(strategy: Strategy, initial_parameters: Parameters, *, num_rounds: int, settings: ServerSettings,
          seed: int = 0, on_round: RoundCallback | None = None, fedbuff: FedBuff | None = None,
          on_start: Callable[[FederationServer], None] | None = None) -> RunResult:
    """Start a server, run the federation to the end (rounds, or FedBuff's steps), tell the clients, stop.

    ``on_start(server)`` runs once it listens, before the first round (the dashboard watches its pool)."""
    with FederationServer(settings) as server:
        if on_start is not None:
            on_start(server)
        return server.run(strategy, initial_parameters, num_rounds=num_rounds, seed=seed, on_round=on_round,
                          fedbuff=fedbuff)
