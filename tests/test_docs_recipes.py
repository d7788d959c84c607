"""docs/architecture.md's recipes run as written: each recipe's Python blocks are executed here on
tiny data, then checked. Registries the recipes add to are copied first, so nothing leaks."""

import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

import insitu
import insitu.algorithms
from insitu.aggregation import registry as aggregation_registry
from insitu.protocols import registry as protocol_registry

DOC = REPO_ROOT / "docs" / "architecture.md"


def recipe(name: str) -> str:
    """The Python blocks between ``<!-- recipe: name -->`` and ``<!-- /recipe -->``, joined."""
    text = DOC.read_text()
    section = re.search(rf"<!-- recipe: {name} -->(.*?)<!-- /recipe -->", text, re.DOTALL)
    assert section is not None, f"docs/architecture.md has no recipe {name!r}"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.DOTALL)
    assert blocks, f"recipe {name!r} has no Python block"
    return "\n".join(blocks)


def run(name: str) -> dict:
    namespace: dict = {"__name__": f"recipe_{name}"}
    exec(compile(recipe(name), f"docs/architecture.md ({name})", "exec"), namespace)  # noqa: S102 - the docs run as written
    return namespace


@pytest.fixture(autouse=True)
def _private_registries(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(aggregation_registry, "_FACTORIES", dict(aggregation_registry._FACTORIES))
    monkeypatch.setattr(protocol_registry, "HANDLERS", dict(protocol_registry.HANDLERS))
    monkeypatch.setattr(insitu.algorithms, "ALGORITHMS", dict(insitu.algorithms.ALGORITHMS))


def test_adding_an_aggregator():
    from insitu.simulation import SimulationConfig, make_strategy

    ns = run("aggregator")
    assert "smallest_norms" in aggregation_registry.aggregator_names()
    assert ns["vector"].tolist() == [0.5, 1.5]
    # reachable from the settings (CLI flag / TOML key) by name, with its option
    config = SimulationConfig(aggregator="smallest_norms", aggregator_options={"keep": 3}, num_clients=4)
    config.validate()
    assert repr(make_strategy(config, None).reducer) == "smallest_norms(keep=3)"
    with pytest.raises(ValueError, match="has no option 'k'; its options are: keep"):
        SimulationConfig(aggregator="smallest_norms", aggregator_options={"k": 3}).validate()
    # composition refused where it is built, with the reason (the docs quote it)
    with pytest.raises(ValueError, match="central DP clips and noises the mean itself"):
        SimulationConfig(aggregator="smallest_norms", dp_clip=1.0, dp_noise=1.0, num_clients=4).validate()
    with pytest.raises(ValueError, match="secure aggregation reveals only the sum"):
        SimulationConfig(aggregator="smallest_norms", secure_aggregation=True, num_clients=4).validate()


def test_adding_a_round_protocol():
    from insitu.protocols.plain import PlainExchange
    from insitu.protocols.registry import client_handlers

    ns = run("protocol")
    assert "fp16" in client_handlers(ns["engine"].client_fn("0"))  # the client half, found by name
    aggregate, round_ = ns["aggregate"], ns["round_"]
    assert aggregate.num_results == 3 and not ns["record"].failures
    plain = PlainExchange().fit(ns["engine"], round_)  # the same round over the plain exchange
    np.testing.assert_allclose(aggregate.parameters.flat(), plain.parameters.flat(), atol=2e-3)
    assert not np.array_equal(aggregate.parameters.flat(), ns["parameters"].flat())  # it trained
    # a malformed reply is one client's failure, recorded, not a crash
    assert isinstance(ns["read_fp16"](ns["Envelope"]("fp16", message=b"\0\0"), ns["parameters"]), ValueError)
    # a client with a noise floor refuses the protocol by name: it does not declare it honours the floor
    floored = client_handlers(ns["engine"].client_fn("0"), ns["ClientPolicy"](min_noise_multiplier=1.0))
    with pytest.raises(ValueError, match="protocol 'fp16' does not declare it honours the floor"):
        floored["fp16"].handle(ns["task_envelope"]("fit", ns["parameters"], 0, {}))


def test_adding_an_engine():
    ns = run("engine")
    rounds, steps = ns["rounds"], ns["steps"]
    assert len(rounds.history.rounds) == 2 and all(r.status != "failed" for r in rounds.history.rounds)
    assert len(steps.history.rounds) == 3  # FedBuff's server steps over the same engine
    # the order the engine returns results in does not change a synchronous FedAvg round
    reference = insitu.simulate(ns["client_fn"], num_clients=4, strategy=ns["strategy"], num_rounds=2,
                                initial_parameters=ns["initial"])
    np.testing.assert_allclose(rounds.parameters.flat(), reference.parameters.flat(), atol=1e-6)
    assert rounds.history.final_accuracy > 0.3  # it learned (10% at the start)


def test_adding_a_client_algorithm():
    ns = run("algorithm")
    client, sent, result = ns["client"], ns["sent"], ns["result"]
    # gradients x 2 at lr 0.05 is plain local SGD at lr 0.1
    plain = client.fit(sent, {"algorithm": "local_sgd", "lr": 0.1, "seed": 0})
    np.testing.assert_allclose(result.parameters.flat(), plain.parameters.flat(), atol=1e-6)
    frozen = client.fit(sent, {"algorithm": "scaled_sgd", "grad_scale": 0.0, "seed": 0})
    assert np.array_equal(frozen.parameters.flat(), sent.flat())  # scale 0: the model does not move
    with pytest.raises(insitu.algorithms.UnknownAlgorithmError, match="does not know algorithm 'nope'"):
        client.fit(sent, {"algorithm": "nope"})
    assert [r.status for r in ns["history"].rounds] == ["ok"]  # the strategy ran end to end through simulate


@pytest.mark.parametrize("page", ["robustness.md", "algorithms.md", "getting-started/researcher.md"])
def test_python_blocks_of_the_pages_run(page):
    """Every Python block of these pages runs as shown (names they leave open are given here)."""
    from insitu.simulation import SimulationConfig

    text = (REPO_ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), {"insitu": insitu})  # noqa: S102
    if page == "robustness.md":  # the commands shown: the same settings through the schema
        for settings in ({"aggregator": "geometric_median"},
                         {"aggregator": "geometric_median", "aggregator_options": {"max_iter": "20", "tol": "1e-4"}},
                         {"aggregator": "multi_krum", "byzantine_f": 2, "aggregator_options": {"m": "5"},
                          "clip_norm": 2.0, "screen": True}):
            SimulationConfig(**settings).validate()
        with pytest.raises(ValueError, match=r"central DP clips and noises the mean itself.*coordinate_median\(\)"):
            SimulationConfig(aggregator="median", dp_clip=1.0, dp_noise=1.0).validate()
