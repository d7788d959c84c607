"""Secure aggregation over the gRPC deployment: the four protocol steps as envelopes, dropouts, bad clients."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import ClassVar

import numpy as np
import pytest

from insitu.net.client import connect
from insitu.net.server import FederationServer, ServerSettings
from insitu.params import Parameters
from insitu.privacy import skellam
from insitu.privacy.secagg import codec
from insitu.privacy.secagg.messages import NOISED, AdvertiseKeys, InputRequest, MaskedInput, RoutedShares
from insitu.privacy.secagg.protocol import SecAggClient, SecAggConfig, SecAggRefused, SecAggServer
from insitu.privacy.secure import SecureAggregation
from insitu.protocols import registry
from insitu.protocols import secagg as secagg_protocol
from insitu.protocols.base import ClientPolicy
from insitu.protocols.envelope import Envelope, Expect
from insitu.protocols.secagg import SecAggHandler
from insitu.run.loop import client_seed
from insitu.simulation import SimulationConfig, build_experiment, simulate
from insitu.strategies import fedavg, scaffold

BASE = {"dataset": "digits", "model": "logreg", "lr": 0.1, "seed": 3, "secure_aggregation": True}


class Tagged:
    """A user client plus how its secure-aggregation side misbehaves: (what, protocol step)."""

    def __init__(self, inner, behaviour: tuple[str, str] | None) -> None:
        self.inner, self.behaviour = inner, behaviour

    def fit(self, parameters, config):
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters, config):
        return self.inner.evaluate(parameters, config)


class Misbehaving(SecAggHandler):
    """Drops out at a step, sends a truncated masked vector, claims another client's protocol id, or
    smuggles its model into a reply that should hold only the protocol message."""

    def handle(self, task):
        what, step = getattr(self.client, "behaviour", None) or (None, None)
        if what == "drop" and task.step == step:
            raise ConnectionError("client went away")
        reply = super().handle(task)
        if what is None or task.step != step:
            return reply
        if what == "smuggle":
            return dataclasses.replace(reply, parameters=task.parameters)
        message = codec.decode(reply.message)
        if what == "truncate":
            message = dataclasses.replace(message, masked=message.masked[:-4])
        elif what == "spoof":
            message = dataclasses.replace(message, client_id=message.client_id % 4 + 1)
        return dataclasses.replace(reply, message=codec.encode(message))


def run_federation(config: SimulationConfig, rounds: int, behaviours=None, monkeypatch=None, min_noise=None):
    behaviours = behaviours or {}
    if monkeypatch is not None:
        monkeypatch.setitem(registry.HANDLERS, secagg_protocol.PROTOCOL, Misbehaving)
    remote = build_experiment(config)
    remote.strategy.min_available_clients = config.num_clients
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, heartbeat_interval_s=0.5))
    for i in range(config.num_clients):
        client = Tagged(build_experiment(config).client_fn(str(i)), behaviours.get(str(i)))
        threading.Thread(target=connect, args=(client, f"127.0.0.1:{server.port}"),
                         kwargs={"client_id": str(i), "poll_wait_s": 0.5, "min_noise_multiplier": min_noise},
                         daemon=True).start()
    try:
        return remote, server.run(remote.strategy, remote.initial_parameters, num_rounds=rounds, seed=config.seed,
                                  allow_seeded_privacy=True)  # compared with the seeded simulation
    finally:
        server.stop(grace_s=2)


def in_process(config: SimulationConfig, rounds: int):
    local = build_experiment(config)
    return simulate(local.client_fn, num_clients=config.num_clients, strategy=local.strategy, num_rounds=rounds,
                    initial_parameters=local.initial_parameters, seed=config.seed)


def plain_fedavg_of(config: SimulationConfig, client_ids: list[str]) -> np.ndarray:
    """One round of plain FedAvg over exactly these clients (what a secure round should equal)."""
    experiment = build_experiment(dataclasses.replace(config, secure_aggregation=False))
    start = experiment.initial_parameters
    results = [(cid, experiment.client_fn(cid).fit(start, {"round": 1, "seed": client_seed(config.seed, 1, cid)}))
               for cid in client_ids]
    results = [(cid, dataclasses.replace(r, parameters=Parameters.from_flat(r.parameters.flat(), start.specs)))
               for cid, r in results]
    return fedavg().aggregate_fit(start, None, results).parameters.flat()


def test_secure_fedavg_over_grpc_equals_the_in_process_secure_run_and_plain_fedavg():
    config = SimulationConfig(**BASE, num_clients=4, rounds=2, min_fit_clients=4)
    _, got = run_federation(config, rounds=2)
    assert [(r.status, r.num_results) for r in got.history.rounds] == [("ok", 4), ("ok", 4)]
    secure = in_process(config, 2)
    plain = in_process(dataclasses.replace(config, secure_aggregation=False), 2)
    # the same inputs, the same fixed-point sum: masks cancel exactly, whatever the arrival order
    assert np.array_equal(got.parameters.flat(), secure.parameters.flat())
    assert np.abs(got.parameters.flat() - plain.parameters.flat()).max() < 1e-5
    assert got.history.rounds[-1].centralized.metrics["accuracy"] > 0.5


def test_a_client_dropping_after_its_masked_input_still_counts(monkeypatch, caplog):
    config = SimulationConfig(**BASE, num_clients=5, rounds=1, min_fit_clients=3)
    with caplog.at_level(logging.WARNING):
        _, got = run_federation(config, 1, {"4": ("drop", "unmask")}, monkeypatch)
    record = got.history.rounds[0]
    assert record.status == "ok" and record.num_results == 5
    assert [f["client"] for f in record.failures] == ["4"] and "secagg unmask" in record.failures[0]["stage"]
    expected = plain_fedavg_of(config, ["0", "1", "2", "3", "4"])
    assert np.abs(got.parameters.flat() - expected).max() < 1e-5


def test_a_malformed_masked_vector_is_excluded_and_the_round_completes_without_it(monkeypatch):
    config = SimulationConfig(**BASE, num_clients=5, rounds=1, min_fit_clients=3)
    _, got = run_federation(config, 1, {"2": ("truncate", "masked")}, monkeypatch)
    record = got.history.rounds[0]
    assert record.status == "ok" and record.num_results == 4
    assert any(f["client"] == "2" and "masked vector has" in f["reason"] for f in record.failures)
    expected = plain_fedavg_of(config, ["0", "1", "3", "4"])
    assert np.abs(got.parameters.flat() - expected).max() < 1e-5


def test_a_client_claiming_another_protocol_id_is_rejected(monkeypatch):
    config = SimulationConfig(**BASE, num_clients=4, rounds=1, min_fit_clients=3)
    _, got = run_federation(config, 1, {"1": ("spoof", "train")}, monkeypatch)
    record = got.history.rounds[0]
    assert record.status == "ok" and record.num_results == 3
    assert any(f["client"] == "1" and "claims protocol id" in f["reason"] for f in record.failures)


def test_more_dropouts_than_the_threshold_allows_fail_the_round_and_reveal_nothing(monkeypatch):
    config = SimulationConfig(**BASE, num_clients=4, rounds=1, min_fit_clients=2)  # t = 3 of 4
    remote, got = run_federation(config, 1, {"0": ("drop", "unmask"), "3": ("drop", "unmask")}, monkeypatch)
    record = got.history.rounds[0]
    assert record.status == "failed" and "aborted" in record.error and "no individual update was revealed" in record.error
    assert got.parameters == remote.initial_parameters


def test_secure_aggregation_with_central_dp_matches_the_in_process_run():
    config = SimulationConfig(**BASE, num_clients=4, rounds=2, min_fit_clients=1, dp_clip=1.0, dp_noise=0.3,
                              fraction_fit=1.0)
    _, got = run_federation(config, 2)
    expected = in_process(config, 2)
    assert [r.status for r in got.history.rounds] == ["ok", "ok"]
    assert got.history.rounds[-1].fit_metrics["epsilon"] == pytest.approx(
        expected.history.rounds[-1].fit_metrics["epsilon"])
    assert np.allclose(got.parameters.flat(), expected.parameters.flat(), atol=1e-6)


def test_a_deployed_server_refuses_seeded_dp_noise():
    config = SimulationConfig(**BASE, num_clients=2, rounds=1, min_fit_clients=1, dp_clip=1.0, dp_noise=0.3,
                              fraction_fit=1.0)
    seeded = build_experiment(config)  # a simulation's strategy: noise reproducible from the seed
    assert seeded.strategy.privacy.randomness.reproducible
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True))
    try:
        with pytest.raises(ValueError, match="must draw DP noise from OS entropy"):
            server.run(seeded.strategy, seeded.initial_parameters, num_rounds=1, seed=config.seed)
    finally:
        server.stop(grace_s=0.5)


def test_handler_refuses_steps_out_of_order_and_foreign_payloads():
    class Stub:
        def fit(self, parameters, config):
            raise AssertionError("not reached")

    handler = SecAggHandler(Stub(), ClientPolicy())
    with pytest.raises(SecAggRefused, match="no secure round"):
        handler.handle(Envelope("secagg", "share", message=b"x"))
    with pytest.raises(ValueError, match="unknown secure-aggregation step"):
        handler.handle(Envelope("secagg", "reveal-everything"))
    with pytest.raises(ValueError, match="expected a RoundSetup"):  # a train step's message is the round setup
        handler.handle(Envelope("secagg", "train", parameters=Parameters.from_arrays({"w": np.zeros(3, np.float32)}),
                                message=codec.encode(AdvertiseKeys(1, b"a" * 32, b"b" * 32))))
    with pytest.raises(ValueError, match="expected a MaskedInput"):
        codec.decode(codec.encode(AdvertiseKeys(1, b"a" * 32, b"b" * 32)), MaskedInput)


def test_scaffold_with_secure_aggregation_is_refused():
    with pytest.raises(ValueError, match="cannot hide"):
        scaffold(secure_aggregation=SecureAggregation())
    with pytest.raises(ValueError, match="cannot hide"):
        SimulationConfig(**{**BASE, "strategy": "scaffold"}, num_clients=4).validate()


def test_a_reply_carrying_more_than_the_protocol_message_is_refused_from_its_header(monkeypatch):
    config = SimulationConfig(**BASE, num_clients=3, rounds=1, min_fit_clients=2)
    smuggle = ("smuggle", "train")  # each client sends its model beside its keys
    remote, got = run_federation(config, 1, {"0": smuggle, "1": smuggle, "2": smuggle}, monkeypatch)
    record = got.history.rounds[0]
    assert record.status == "failed" and got.parameters == remote.initial_parameters
    assert len(record.failures) == 3
    assert all("are not part of a reply to this task" in f["reason"] for f in record.failures)


def test_a_client_reports_a_protocol_it_does_not_know_instead_of_guessing():
    config = SimulationConfig(dataset="digits", model="logreg", num_clients=1, seed=0)
    experiment = build_experiment(config)
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, heartbeat_interval_s=0.5))
    threading.Thread(target=connect, args=(experiment.client_fn("0"), f"127.0.0.1:{server.port}"),
                     kwargs={"client_id": "0", "poll_wait_s": 0.5}, daemon=True).start()
    try:
        server.pool.wait_for(1, timeout=30)
        task = Envelope("reveal", parameters=experiment.initial_parameters)
        [(cid, outcome)] = list(server.pool.exchange([("0", task)], Expect()))
    finally:
        server.stop(grace_s=2)
    assert cid == "0" and isinstance(outcome, RuntimeError)
    assert "unknown round protocol 'reveal'" in str(outcome) and "upgrade insitu on this client" in str(outcome)


class RecordingServer(SecAggServer):
    """The protocol's server side, keeping what it decoded (what a curious server would hold)."""

    decoded: ClassVar[list[np.ndarray]] = []

    def unmask(self, messages):
        total = super().unmask(messages)
        RecordingServer.decoded.append(total.copy())
        return total


DISTRIBUTED = {"dp_clip": 1.0, "dp_noise": 1.0, "dp_mode": "distributed", "fraction_fit": 1.0,
               "min_fit_clients": 1, "dp_record_client_metrics": True}


def clipped_sum(config: SimulationConfig, client_ids: list[str], gamma: float) -> np.ndarray:
    """gamma x the sum of these clients' first-round updates clipped to dp_clip: the sum without noise."""
    experiment = build_experiment(dataclasses.replace(config, secure_aggregation=False, dp_clip=0.0,
                                                      dp_mode="central"))
    start = experiment.initial_parameters.flat()
    total = np.zeros(start.size)
    for cid in client_ids:
        fitted = experiment.client_fn(cid).fit(experiment.initial_parameters,
                                               {"round": 1, "seed": client_seed(config.seed, 1, cid)})
        delta = fitted.parameters.flat().astype(np.float64) - start
        total += delta * min(1.0, config.dp_clip / np.linalg.norm(delta))
    return gamma * total


def first_plan(experiment, config: SimulationConfig):
    """The public parameters of the first distributed-DP round (a pure function of the state)."""
    privacy = experiment.strategy.privacy
    return privacy.plan(privacy.init_state(), config.num_clients, experiment.initial_parameters.num_values)


def test_distributed_dp_over_grpc_the_server_decodes_only_the_noised_sum(monkeypatch):
    monkeypatch.setattr(secagg_protocol, "SecAggServer", RecordingServer)
    RecordingServer.decoded = []
    config = SimulationConfig(**BASE, num_clients=4, rounds=1, **DISTRIBUTED)
    remote, got = run_federation(config, 1)
    record = got.history.rounds[0]
    assert record.status == "ok" and record.num_results == 4
    plan = first_plan(remote, config)
    [total] = RecordingServer.decoded
    exact = clipped_sum(config, ["0", "1", "2", "3"], plan.gamma)
    noise = total[:-1] - exact  # the clients' noise (plus at most 1 of rounding per client and coordinate)
    assert noise.std() == pytest.approx(math.sqrt(4 * plan.client_variance), rel=0.12)
    assert np.abs(noise).max() > 1e3 * 4 and total[-1] == 0  # never the unnoised sum
    # epsilon: one round of Skellam noise with variance mu (4 >= m contributors), sampling rate 1
    expected = skellam.epsilon(skellam.round_rdp(plan.mu, 1.0, plan.l1, plan.l2), config.dp_delta)
    assert record.fit_metrics["epsilon"] == pytest.approx(expected, rel=1e-12)


def test_distributed_dp_over_grpc_charges_a_dropout_for_the_noise_it_did_not_add(monkeypatch):
    config = SimulationConfig(**BASE, num_clients=5, rounds=1, dp_min_contributors=5, **DISTRIBUTED)
    remote, got = run_federation(config, 1, {"2": ("truncate", "masked")}, monkeypatch)
    record = got.history.rounds[0]
    assert record.status == "ok" and record.num_results == 4
    assert any(f["client"] == "2" and "masked vector has" in f["reason"] for f in record.failures)
    plan = first_plan(remote, config)
    [row] = got.server_state.privacy["history"]
    assert row[0] == pytest.approx(plan.mu * 4 / 5)  # 4 of the m = 5 planned shares reached the sum
    expected = skellam.epsilon(skellam.round_rdp(plan.mu * 4 / 5, 1.0, plan.l1, plan.l2), config.dp_delta)
    assert record.fit_metrics["epsilon"] == pytest.approx(expected, rel=1e-12)
    full = skellam.epsilon(skellam.round_rdp(plan.mu, 1.0, plan.l1, plan.l2), config.dp_delta)
    assert record.fit_metrics["epsilon"] > full


def test_a_client_refuses_a_distributed_round_without_noise():
    handler = SecAggHandler(None, ClientPolicy())
    protocol = SecAggClient(1, SecAggConfig(3, 2, 11, 1.0, integer=True))
    current = secagg_protocol._Round(0, protocol, np.ones(10), 5)

    def request(gamma, variance):
        return InputRequest(RoutedShares(1, ()), NOISED, 0.0, 1.0, gamma, variance)

    with pytest.raises(ValueError, match="refusing"):
        handler._input(current, request(1000.0, 0.0))
    with pytest.raises(ValueError, match="exceed the 32-bit field"):
        handler._input(current, request(2.0**31, 1.0))
    with pytest.raises(ValueError, match="unknown masked-input kind 9"):
        handler._input(current, dataclasses.replace(request(1000.0, 100.0), kind=9))
    got = handler._input(current, request(1000.0, 100.0))
    assert got.dtype == np.int64 and got.size == 11 and got[-1] == 0


def test_a_client_with_a_noise_floor_takes_part_in_distributed_dp_and_sends_no_count_or_metrics():
    config = SimulationConfig(**BASE, num_clients=4, rounds=1, **DISTRIBUTED)  # noise multiplier 1.0
    _, got = run_federation(config, 1, min_noise=0.9)
    record = got.history.rounds[0]
    assert record.status == "ok" and record.num_results == 4
    assert record.clients == {cid: {"num_examples": 0} for cid in ("0", "1", "2", "3")}  # no count, no metric


@pytest.mark.parametrize("settings, reason", [
    ({**DISTRIBUTED, "dp_noise": 0.5}, "below this client's minimum 0.9"),  # the server asks for too little noise
    ({"dp_clip": 1.0, "dp_noise": 1.0, "fraction_fit": 1.0, "min_fit_clients": 1, "dp_record_client_metrics": True},
     "without client noise"),  # central DP: the server would decode the unnoised sum
    ({"secure_aggregation": False, "min_fit_clients": 1}, "plain fit task"),  # the update in the clear
])
def test_a_client_with_a_noise_floor_refuses_less_noise_or_no_client_noise(settings, reason):
    base = {**BASE, "secure_aggregation": True, **settings}
    config = SimulationConfig(**{**base, "num_clients": 3, "rounds": 1})
    _, got = run_federation(config, 1, min_noise=0.9)
    record = got.history.rounds[0]
    assert record.status == "failed" and record.num_results == 0
    assert {f["client"] for f in record.failures if reason in f["reason"]} == {"0", "1", "2"}, record.failures
    assert got.parameters == build_experiment(config).initial_parameters


class _Fits:
    def fit(self, parameters, config):
        from insitu.client.api import FitResult
        return FitResult(Parameters(["w"], [parameters.flat() + 0.5]), 7, {"acc": 0.9})


def _masked_step_with_floor(n, t, degree, variance, floor, *, drop_peers=0, victim=1):
    """Drive a client with a noise floor through train, share and masked in a round the server describes
    as n clients (SecAgg+ degree ``degree``), with only the victim's real group taking part; the server
    routes the shares of all but ``drop_peers`` of its peers and asks for noise ``variance`` per client."""
    from insitu.privacy.secagg.messages import KeyBroadcast, RoundSetup, ShareKeys

    params = Parameters(["w"], [np.zeros(8, np.float32)])
    session = 42
    config = SecAggConfig(n, t, params.num_values + 1, 1.0, session=session, degree=degree, integer=True)
    peers = {v: SecAggClient(v, config) for v in sorted(config.group(victim)) if v != victim}
    handler = SecAggHandler(_Fits(), ClientPolicy(min_noise_multiplier=floor))
    setup = RoundSetup(session, victim, n, t, config.dim, 1.0, degree or 0, 1)
    reply = handler.handle(Envelope("secagg", "train", 1, 0, parameters=params, message=codec.encode(setup)))
    adverts = [codec.decode(reply.message, AdvertiseKeys)] + [c.advertise_keys() for c in peers.values()]
    broadcast = KeyBroadcast(session, tuple(sorted(adverts, key=lambda a: a.client_id)))
    reply = handler.handle(Envelope("secagg", "share", 1, 0, message=codec.encode(broadcast)))
    codec.decode(reply.message, ShareKeys)
    routed = [c.share_keys(broadcast) for c in peers.values()][drop_peers:]
    to_victim = tuple(s for sk in routed for s in sk.shares if s.recipient == victim)
    request = InputRequest(RoutedShares(victim, to_victim), NOISED, 0.0, 1.0, 1000.0, variance)
    reply = handler.handle(Envelope("secagg", "masked", 1, 0, message=codec.encode(request)))
    return codec.decode(reply.message, MaskedInput)


def test_a_noise_floor_counts_only_the_shares_the_client_can_verify_not_the_servers_claimed_n():
    # the review's attack: SecAgg+ degree 2, the server claims n = 100,000 and asks for a per-client variance
    # that meets z = 1 only for 100,000 shares; the victim sees 3 (itself and its 2 neighbours): z ~ 0.0055
    claimed = 100_000
    with pytest.raises(ValueError, match=r"0\.00548 x the clip norm with the 3 shares .*claims 100000.* minimum 1"):
        _masked_step_with_floor(claimed, 2, 2, (1.0 * 1000.0) ** 2 / claimed, floor=1.0)
    # full graph: the server routes only 2 of the 3 peers' shares (t = 3 still met), noise planned for 4
    with pytest.raises(ValueError, match="with the 3 shares"):
        _masked_step_with_floor(4, 3, None, (1.0 * 1000.0) ** 2 / 4, floor=0.9, drop_peers=1)


def test_a_noise_floor_passes_an_honest_full_graph_round_with_enough_noise():
    got = _masked_step_with_floor(4, 3, None, (1.0 * 1000.0) ** 2 / 4, floor=1.0)
    assert got.client_id == 1 and len(got.masked) == 4 * 9
