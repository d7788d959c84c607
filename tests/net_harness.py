"""A federation on loopback for tests: a real server in a thread, clients as threads, raw protocol helpers.

Shared by test_net_server.py (protocol paths) and test_net_hostile.py (hostile clients).
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from insitu.client.api import EvalResult, FitResult
from insitu.net.client import Backoff, connect
from insitu.net.proto import federation_pb2 as pb
from insitu.net.proto import federation_pb2_grpc as pb_grpc
from insitu.net.server import FederationServer, ServerSettings
from insitu.net.servicer import PROTOCOL_VERSIONS, SESSION_METADATA
from insitu.params import Parameters
from insitu.strategies import fedavg

GLOBAL = Parameters.from_arrays({"w": np.zeros(3, np.float32)})


class ValueClient:
    """Returns fixed parameters and count; optionally sleeps first (a straggler)."""

    def __init__(self, w, n=1, delay=0.0):
        self.w, self.n, self.delay = np.asarray(w, np.float32), n, delay
        self.configs = []

    def fit(self, parameters, config):
        self.configs.append(config)
        time.sleep(self.delay)
        return FitResult(Parameters.from_arrays({"w": self.w}), self.n, {"seen": float(dict(parameters)["w"][0])})

    def evaluate(self, parameters, config):
        return EvalResult(float(self.n), self.n, {"accuracy": 0.5})


class Federation:
    """A server running ``num_rounds`` in a background thread; clients join with ``add``."""

    def __init__(self, num_rounds=1, strategy=None, initial=None, fedbuff=None, **settings):
        settings.setdefault("insecure", True)
        settings.setdefault("heartbeat_interval_s", 0.5)
        self.server = FederationServer(ServerSettings(address="127.0.0.1:0", **settings))
        self.address = f"127.0.0.1:{self.server.port}"
        self.strategy = strategy or fedavg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0)
        self.initial = GLOBAL if initial is None else initial
        self.fedbuff = fedbuff  # FedBuff's server steps instead of rounds
        self.result = None
        self.error = None
        self.rounds = []
        self._threads = []
        self._thread = threading.Thread(target=self._run, args=(num_rounds,), daemon=True)
        self._thread.start()

    def _run(self, num_rounds):
        try:
            self.result = self.server.run(self.strategy, self.initial, num_rounds=num_rounds, fedbuff=self.fedbuff,
                                          on_round=lambda r, p, s: self.rounds.append(r))
        except BaseException as error:  # surfaced by finish()
            self.error = error

    def add(self, client, client_id, **kwargs):
        kwargs.setdefault("backoff", Backoff(0.05, 0.2))
        kwargs.setdefault("poll_wait_s", 0.5)
        thread = threading.Thread(target=connect, args=(client, self.address), kwargs=dict(client_id=client_id, **kwargs), daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def finish(self, timeout=60):
        self._thread.join(timeout)
        self.server.stop(grace_s=2)
        for thread in self._threads:
            thread.join(10)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "federation did not finish"
        return self.result


def stub_for(address):
    return pb_grpc.FederationStub(grpc.insecure_channel(address))


def auth(token):
    """Call metadata carrying a session token (PullTask and PushResult need it)."""
    return ((SESSION_METADATA, token),)


def raw_session(stub, client_id):
    hello = stub.Hello(pb.HelloRequest(protocol_versions=list(PROTOCOL_VERSIONS), client_id=client_id))
    return stub.Authenticate(pb.AuthRequest(client_id=client_id, nonce=hello.nonce)).session_token


def pull(stub, token):
    """The next task's header (waiting for one)."""
    for _ in range(100):
        messages = list(stub.PullTask(pb.PullRequest(session_token=token, wait_s=0.5), metadata=auth(token)))
        if messages[0].WhichOneof("body") == "header":
            return messages[0].header
    raise AssertionError("no task arrived")
