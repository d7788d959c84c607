"""Central DP is sound as run: noise nobody can regenerate, no noise reused after a resume, epsilon that
matches the mechanism actually executed (checked with Google's dp-accounting), every round released
and accounted, a secret sample, and nothing recorded that epsilon does not cover."""

from __future__ import annotations

import json
import threading

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats
from typer.testing import CliRunner

from insitu.aggregation.base import AggregationAssumptionError
from insitu.client.api import EvalResult, FitResult
from insitu.engines.inprocess import InProcessPool
from insitu.net.client import connect
from insitu.net.server import FederationServer, ServerSettings
from insitu.params import Parameters
from insitu.privacy.central import CentralDP, gaussian_mean
from insitu.privacy.randomness import (
    OSEntropy,
    SecureRandom,
    SimulationSeed,
    secure_normal,
    secure_uniform,
)
from insitu.run.loop import Coordinator
from insitu.simulation import SimulationConfig, make_strategy
from insitu.strategies import ServerState, Strategy, fedavg

DIM = 4
START = Parameters.from_arrays({"w": np.zeros(DIM, np.float32)})
DELTA = 1e-5


# -- helpers ---------------------------------------------------------------------------------------
class VecClient:
    """Adds a fixed vector to the global model; reports a train loss and evaluates (counted)."""

    def __init__(self, update: np.ndarray) -> None:
        self.update = np.asarray(update, np.float32)
        self.evaluations = 0

    def fit(self, parameters, config):
        return FitResult(Parameters.from_arrays({"w": dict(parameters)["w"] + self.update}), 7, {"train_loss": 0.25})

    def evaluate(self, parameters, config):
        self.evaluations += 1
        return EvalResult(0.5, 3, {"accuracy": 0.75})


def update_of_norm(norm: float, i: int = 0) -> np.ndarray:
    direction = np.zeros(DIM)
    direction[i % DIM] = 1.0
    return norm * direction


def client_norms(n: int) -> list[float]:
    """Some updates inside the initial clip norm 1, some outside, so adaptive clipping has work to do."""
    return [0.2 + 1.6 * (i % 10) / 9 for i in range(n)]


class CountingPool(InProcessPool):
    """The in-process pool, remembering who was asked to train in each round."""

    def __init__(self, clients: dict[str, VecClient]) -> None:
        super().__init__(lambda cid: clients[cid], len(clients))
        self.asked: list[list[str]] = []

    def submit(self, kind, parameters, model_version, tasks):
        if kind == "fit":
            self.asked.append([t.client_id for t in tasks])
        return super().submit(kind, parameters, model_version, tasks)


def federation(n: int) -> tuple[CountingPool, dict[str, VecClient]]:
    clients = {str(i): VecClient(update_of_norm(norm, i)) for i, norm in enumerate(client_norms(n))}
    return CountingPool(clients), clients


class Spy:
    """A randomness source recording the std of every Gaussian draw: (index, purpose, std).

    ``quiet``: every draw is 0, so a release shows its exact, noiseless value (for sensitivities)."""

    reproducible = True

    def __init__(self, seed: int = 0, quiet: bool = False) -> None:
        self.inner, self.quiet, self.draws = SimulationSeed(seed), quiet, []

    def generator(self, index, purpose):
        return _SpyGenerator(self, self.inner.generator(index, purpose), index, purpose)

    def describe(self) -> str:
        return "a test spy"

    def stds(self, purpose: str) -> dict[int, float]:
        return {index: std for index, p, std in self.draws if p == purpose}


class _SpyGenerator:
    def __init__(self, spy, inner, index, purpose) -> None:
        self.spy, self.inner, self.index, self.purpose = spy, inner, index, purpose

    def normal(self, loc=0.0, scale=1.0, size=None):
        self.spy.draws.append((self.index, self.purpose, float(scale)))
        if self.spy.quiet:
            return np.zeros(size) + loc if size is not None else float(loc)
        return self.inner.normal(loc, scale, size)

    def random(self, size=None):
        return self.inner.random(size)


def run_rounds(dp: CentralDP, pool, rounds: int, strategy: Strategy | None = None):
    """Run ``rounds`` rounds; returns (history, server states after each round, parameters after each)."""
    strategy = strategy or fedavg(privacy=dp, fraction_evaluate=1.0)
    states, params = [], []
    coordinator = Coordinator(strategy, pool, num_rounds=rounds, seed=0, evaluate_initial=False,
                              on_round=lambda record, p, s: (states.append(s), params.append(p.flat().copy())))
    result = coordinator.run(START)
    return result.history, states, params


def measured_sensitivities(dp_settings: dict, state: ServerState, num_clients: int) -> tuple[float, float]:
    """(update-sum sensitivity, clip-count sensitivity) of one round from ``state``, measured on
    neighbouring inputs with the noise switched off: the largest change one added client causes."""
    quiet = CentralDP(**dp_settings, randomness=Spy(quiet=True))
    strategy = fedavg(privacy=quiet)
    expected = quiet.sample_rate * num_clients

    def release(norms: list[float]) -> tuple[np.ndarray, float]:
        results = [(str(i), FitResult(Parameters.from_arrays({"w": update_of_norm(r, i).astype(np.float32)}), 1))
                   for i, r in enumerate(norms)]
        out = strategy.aggregate_fit(START, state, results, num_clients=num_clients)
        clip_before, clip_after = float(state.privacy["clip_norm"][0]), float(out.server_state.privacy["clip_norm"][0])
        # the released count, recovered from the clip update C' = C exp(-lr (count / (qN) - target))
        count = (quiet.target_quantile - np.log(clip_after / clip_before) / quiet.clip_lr) * expected
        return out.parameters.flat().astype(np.float64) * expected, float(count)

    base = [0.5, 3.0, 0.8]
    model, count = release(base)
    update_sens, count_sens = 0.0, 0.0
    for extra in (1000.0, 1e-3):  # one client far outside the clip norm, one far inside
        other_model, other_count = release([*base, extra])
        update_sens = max(update_sens, float(np.linalg.norm(other_model - model)))
        count_sens = max(count_sens, abs(other_count - count))
    return update_sens, count_sens


def reference_epsilon(q: float, multipliers: list[float], delta: float = DELTA) -> float:
    """dp-accounting's RDP epsilon of the sampled Gaussian mechanism with these per-round multipliers."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    for z in multipliers:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return accountant.get_epsilon(delta)


# -- A1: the noise comes from OS entropy in a deployment -------------------------------------------
def test_secure_normal_is_standard_gaussian_and_never_repeats():
    draws = secure_normal(200_001, 3.0)
    assert draws.size == 200_001 and draws.dtype == np.float64
    assert abs(draws.mean()) < 5 * 3.0 / np.sqrt(draws.size)
    assert draws.std() == pytest.approx(3.0, rel=0.01)
    assert stats.kstest(draws / 3.0, "norm").statistic < 0.01  # 0.006 is the 1-in-10^6 critical value
    again = secure_normal(200_001, 3.0)
    assert not np.any(again == draws)
    uniforms = secure_uniform(100_000)
    assert uniforms.min() > 0 and uniforms.max() <= 1 and uniforms.mean() == pytest.approx(0.5, abs=0.01)
    rng = SecureRandom()
    assert 0 <= rng.random() < 1 and np.asarray(rng.normal(2.0, 0.5, size=(3, 2))).shape == (3, 2)


def test_a_deployed_strategy_draws_noise_nobody_can_regenerate_from_the_seed():
    config = SimulationConfig(num_clients=10, fraction_fit=0.5, dp_clip=1.0, dp_noise=1.0, seed=0)
    result = [("0", FitResult(Parameters.from_arrays({"w": np.ones(DIM, np.float32)}), 1))]

    def released(strategy: Strategy) -> np.ndarray:
        return strategy.aggregate_fit(START, None, result, num_clients=10).parameters.flat()

    deployed = [make_strategy(config, None, remote=True) for _ in range(2)]
    assert all(isinstance(s.privacy.randomness, OSEntropy) for s in deployed)
    assert not np.array_equal(released(deployed[0]), released(deployed[1]))  # same seed, same inputs
    simulated = [make_strategy(config, None) for _ in range(2)]  # labelled: reproducible, simulation only
    assert simulated[0].privacy.randomness.reproducible
    assert np.array_equal(released(simulated[0]), released(simulated[1]))
    assert "simulation only" in simulated[0].privacy.randomness.describe()


# -- A2: a resumed seeded run does not reuse noise ---------------------------------------------------
def test_a_resumed_seeded_run_draws_the_noise_of_the_uninterrupted_run_and_never_repeats_one():
    def strategy() -> Strategy:
        return fedavg(privacy=CentralDP(1.0, 1.0, 0.5, randomness=SimulationSeed(3)))

    zero = [("0", FitResult(START, 1))]  # a zero update: each released delta is pure noise / (q N)
    straight, state, deltas = strategy(), None, []
    for _ in range(3):
        out = straight.aggregate_fit(START, state, zero, num_clients=4)
        state = out.server_state
        deltas.append(out.parameters.flat())
        if len(deltas) == 2:
            saved = state.to_arrays()
    resumed = strategy().aggregate_fit(START, ServerState.from_arrays(saved), zero, num_clients=4)
    assert np.array_equal(resumed.parameters.flat(), deltas[2])
    assert not np.array_equal(deltas[2], deltas[0]) and not np.array_equal(deltas[1], deltas[0])


# -- A3: adaptive clipping's epsilon is that of the mechanism run ------------------------------------
@pytest.mark.parametrize(("num_clients", "q", "z"), [(1000, 0.05, 1.0), (100, 0.2, 0.8), (500, 0.1, 1.2)])
def test_adaptive_clipping_reports_the_epsilon_of_both_releases(num_clients, q, z):
    rounds = 6
    settings = {"noise_multiplier": z, "clip_norm": 1.0, "sample_rate": q, "delta": DELTA, "adaptive": True}
    spy = Spy(seed=11)
    pool, _ = federation(num_clients)
    history, states, _ = run_rounds(CentralDP(**settings, randomness=spy), pool, rounds)
    assert [r.status for r in history.rounds] == ["ok"] * rounds
    update_std, count_std = spy.stds("update"), spy.stds("clip_count")
    assert sorted(update_std) == sorted(count_std) == list(range(1, rounds + 1))
    multipliers = []
    before = [fedavg(privacy=CentralDP(**settings)).init_state(START), *states[:-1]]
    for t in range(1, rounds + 1):
        update_sens, count_sens = measured_sensitivities(settings, before[t - 1], num_clients)
        assert update_sens == pytest.approx(float(before[t - 1].privacy["clip_norm"][0]), rel=1e-4)
        assert count_sens == pytest.approx(0.5, abs=1e-6)  # the centred count sum(b - 1/2)
        multipliers.append(((update_sens / update_std[t]) ** 2 + (count_sens / count_std[t]) ** 2) ** -0.5)
    assert multipliers == pytest.approx([z] * rounds, rel=1e-6)
    reported = history.rounds[-1].fit_metrics["epsilon"]
    assert reported == pytest.approx(reference_epsilon(q, multipliers), rel=0.01)


# -- A4: every round is released and accounted -------------------------------------------------------
@pytest.mark.parametrize(("num_clients", "q", "z", "rounds", "failing"),
                         [(10, 0.1, 1.0, 20, ()), (30, 0.05, 0.9, 15, ()), (40, 0.5, 1.1, 6, (2, 4))])
def test_every_round_is_released_and_accounted_whoever_was_sampled(num_clients, q, z, rounds, failing):
    settings = {"noise_multiplier": z, "clip_norm": 1.0, "sample_rate": q, "delta": DELTA}
    spy = Spy(seed=5)
    dp = CentralDP(**settings, randomness=spy)
    strategy = fedavg(privacy=dp, fraction_evaluate=0.0)
    aggregate, calls = strategy.aggregate_fit, []

    def sometimes_failing(*args, **kwargs):
        calls.append(1)
        if len(calls) in failing:
            raise AggregationAssumptionError("injected failure")
        return aggregate(*args, **kwargs)

    strategy.aggregate_fit = sometimes_failing  # type: ignore[method-assign]
    pool, _ = federation(num_clients)
    history, states, params = run_rounds(dp, pool, rounds, strategy)
    assert len(history.rounds) == rounds
    assert [r.round for r in history.rounds if r.status != "ok"] == list(failing)
    assert dp.accountant(states[-1].privacy).steps == rounds
    sizes = [len(asked) for asked in pool.asked]
    if not failing:
        assert 0 in sizes  # a round with no sampled client was run, released and counted
        previous = START.flat()
        for size, after in zip(sizes, params):
            if size == 0:  # nobody sampled: the release is the noise / (q N), not "no round"
                assert not np.array_equal(after, previous)
            previous = after
    update_std = spy.stds("update")
    released = [t for t in range(1, rounds + 1) if t not in failing]
    assert sorted(update_std) == released
    update_sens, count_sens = measured_sensitivities(settings, fedavg(privacy=dp).init_state(START), num_clients)
    assert (update_sens, count_sens) == (pytest.approx(1.0, rel=1e-4), 0.0)  # fixed clip norm 1: no count released
    multipliers = [update_std[t] / update_sens for t in released] + [z] * len(failing)  # failed: counted at z
    assert multipliers == pytest.approx([z] * rounds)
    reported = [r.fit_metrics["epsilon"] for r in history.rounds]  # failed rounds report theirs too
    assert reported == sorted(reported) and len(set(reported)) == rounds
    assert reported[-1] == pytest.approx(reference_epsilon(q, multipliers), rel=0.01)


def test_a_dp_mean_of_no_update_releases_the_noise_divided_by_the_expected_count():
    mean = gaussian_mean(clip_norm=1.0, noise_std=2.0, denominator=4.0)
    released, report = mean.finish(mean.start(200_000))  # nobody sampled
    assert released.dtype == np.float32 and abs(float(released.mean())) < 0.01
    assert float(released.std()) == pytest.approx(2.0 / 4.0, rel=0.01)
    assert mean.properties.min_updates == 0 and report == {"within_clip": 0}


def test_settings_that_make_the_release_depend_on_the_sample_are_refused(tmp_path):
    dp = CentralDP(1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="release would depend on the sample"):
        Strategy(privacy=dp, min_fit_clients=2)
    assert fedavg(privacy=dp).min_fit_clients == 1
    with pytest.raises(ValueError, match="release would depend on the sample"):
        SimulationConfig(dp_clip=1.0, num_clients=10, min_fit_clients=3).validate()
    with pytest.raises(ValueError, match="release would depend on the sample"):
        SimulationConfig.from_dict({"dp-clip": 1.0, "num-clients": 10, "min-fit-clients": 2}).validate()
    with pytest.raises(ValueError, match="neither clips nor noises"):
        SimulationConfig(dp_clip=1.0, strategy="scaffold").validate()

    from insitu.cli.main import app

    runner = CliRunner()
    toml = tmp_path / "dp.toml"
    toml.write_text("dp_clip = 1.0\nnum_clients = 10\nmin_fit_clients = 2\n")
    refused = runner.invoke(app, ["simulate", "--config", str(toml)])
    assert refused.exit_code != 0 and "release would depend" in refused.output.replace("\n", " ")
    refused = runner.invoke(app, ["server", "--dp-clip", "1", "--min-clients", "3", "--min-fit-clients", "2",
                                  "--insecure", "--address", "127.0.0.1:0", "-o", str(tmp_path / "a")])
    assert refused.exit_code != 0 and "release would depend" in refused.output.replace("\n", " ")
    # without --min-fit-clients the DP server's default is valid: it gets as far as waiting for clients
    waited = runner.invoke(app, ["server", "--dp-clip", "1", "--min-clients", "3", "--insecure", "--wait-timeout",
                                 "0.5", "--address", "127.0.0.1:0", "--test-limit", "50", "-o", str(tmp_path / "b")])
    assert waited.exit_code != 0 and "required clients connected" in waited.output.replace("\n", " ")


# -- A5: the DP sample is secret in a deployment -----------------------------------------------------
def test_dp_sampling_in_a_deployment_is_not_recomputable_from_the_seed():
    def samples(remote: bool, dp: bool) -> list[list[str]]:
        config = SimulationConfig(num_clients=60, fraction_fit=0.5, dp_clip=1.0 if dp else 0.0, min_fit_clients=1)
        pool, _ = federation(60)
        Coordinator(make_strategy(config, None, remote=remote), pool, num_rounds=2, seed=0,
                    evaluate_initial=False).run(START)
        return pool.asked

    assert samples(remote=True, dp=True) != samples(remote=True, dp=True)  # OS entropy, not [seed, round]
    assert samples(remote=False, dp=True) == samples(remote=False, dp=True)  # simulation: seeded, labelled
    assert samples(remote=True, dp=False) == samples(remote=True, dp=False)  # no DP: reproducible


# -- A7: only what epsilon covers is recorded ------------------------------------------------------
def test_under_dp_the_history_holds_only_what_epsilon_covers_unless_opted_in():
    for opt_in in (False, True):
        dp = CentralDP(1.0, 1.0, 0.5, randomness=SimulationSeed(0), record_client_metrics=opt_in)
        pool, clients = federation(8)
        history, _, _ = run_rounds(dp, pool, 2)
        evaluated = sum(c.evaluations for c in clients.values())
        for record in history.rounds:
            if opt_in:
                assert record.selected and record.num_results and record.clients and record.federated
                assert record.fit_metrics["train_loss"] == pytest.approx(0.25)
            else:
                assert (record.selected, record.num_results, record.clients, record.failures) == ([], 0, {}, [])
                assert record.federated is None and record.timings == {} and record.withheld
                assert set(record.fit_metrics) == {"epsilon", "clip_norm"}
        assert (evaluated > 0) == opt_in  # federated evaluation stays on the clients unless opted in
        text = json.dumps(history.to_dict())
        assert ("train_loss" in text) == opt_in and ("num_examples\": 7" in text) == opt_in


# -- acceptance: deployed runs over gRPC -----------------------------------------------------------
def deployed_run(config: SimulationConfig, rounds: int = 3) -> np.ndarray:
    """``insitu server``'s strategy over a real gRPC server on loopback, clients in threads."""
    strategy = make_strategy(config, None, remote=True)
    server = FederationServer(ServerSettings(address="127.0.0.1:0", insecure=True, heartbeat_interval_s=0.5))
    for i in range(config.num_clients):
        client = VecClient(np.full(DIM, (i + 1) / 8, np.float32))
        threading.Thread(target=connect, args=(client, f"127.0.0.1:{server.port}"),
                         kwargs={"client_id": str(i), "poll_wait_s": 0.5}, daemon=True).start()
    try:
        return server.run(strategy, START, num_rounds=rounds, seed=config.seed).parameters.flat()
    finally:
        server.stop(grace_s=2)


def test_identical_deployed_runs_differ_under_central_dp_and_are_bit_identical_without():
    # Two clients per round without DP: a sum of two floats is the same in either arrival order (with
    # three or more, the order in which results arrive may move the last bit).
    base = {"num_clients": 6, "fraction_fit": 1 / 3, "fraction_evaluate": 0.0, "seed": 0}
    plain = SimulationConfig(**base, min_fit_clients=1)
    first, second = deployed_run(plain), deployed_run(plain)
    assert np.array_equal(first, second) and not np.array_equal(first, START.flat())
    private = SimulationConfig(**base, min_fit_clients=1, dp_clip=10.0, dp_noise=1.0)
    assert not np.array_equal(deployed_run(private), deployed_run(private))
