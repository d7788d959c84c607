"""Flower compatibility: a NumPyClient as an insitu Client (insitu.flower), the insitu.flwr shim, Flower-style
client_fn in insitu.simulate, and `insitu client --flower-client`'s refusals.

When flwr is installed the clients here subclass the real ``flwr.client.NumPyClient`` (and unwrap flwr's
own ``to_client()``); otherwise insitu.flwr's base class, which needs nothing but insitu.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from insitu.cli.main import app
from insitu.client.api import Client
from insitu.flower import FlowerClientError, NumPyClientAdapter, adapt_client_fn, initial_parameters, unwrap
from insitu.params import Parameters
from insitu.simulation import SimulationConfig, build_experiment, simulate

try:  # the real base class (and Context) when flwr is installed, else the shim's
    from flwr.client import NumPyClient
    from flwr.common import Context

    FLWR = True
except ImportError:
    from insitu.flwr.client import NumPyClient
    from insitu.flwr.common import Context

    FLWR = False


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models train faster on one thread than on two contended ones (the suite shares its cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GLOBAL = Parameters.from_arrays({"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
                                 "fc.bias": np.array([0.5, -0.5], np.float32)})


class Scripted(NumPyClient):
    """Returns whatever ``reply`` makes of the parameters it gets, and records its calls."""

    def __init__(self, reply=None, evaluation=(0.25, 4, {"accuracy": 0.75})):
        self.reply = reply or (lambda params: ([p + 1 for p in params], 5, {"loss": np.float32(0.5)}))
        self.evaluation = evaluation
        self.configs: list[dict] = []
        self.received: list[list[np.ndarray]] = []

    def get_parameters(self, config):
        return [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)]

    def fit(self, parameters, config):
        self.configs.append(dict(config))
        self.received.append(parameters)
        return self.reply(parameters)

    def evaluate(self, parameters, config):
        return self.evaluation


def test_fit_maps_the_list_positionally_onto_the_servers_names_and_passes_the_scalar_config():
    client = Scripted()
    result = NumPyClientAdapter(client).fit(GLOBAL, {"lr": 0.1, "local_epochs": 2, "seed": 7})
    assert result.parameters.names == ("fc.weight", "fc.bias")
    np.testing.assert_array_equal(result.parameters.arrays[0], np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(result.parameters.arrays[1], [1.5, 0.5])
    assert result.num_examples == 5 and result.metrics == {"loss": 0.5}
    assert isinstance(result.metrics["loss"], float)
    assert client.configs == [{"lr": 0.1, "local_epochs": 2, "seed": 7}]
    client.received[0][0][0, 0] = 99.0  # the client got copies: changing them leaves the global model alone
    assert GLOBAL.arrays[0][0, 0] == 0.0
    evaluation = NumPyClientAdapter(client).evaluate(GLOBAL, {})
    assert (evaluation.loss, evaluation.num_examples, evaluation.metrics) == (0.25, 4, {"accuracy": 0.75})


def test_the_task_seed_seeds_torch_so_shuffling_clients_repeat():
    draws = []
    client = Scripted(reply=lambda params: (draws.append(torch.rand(1).item()) or params, 1, {}))
    adapter = adapt_client_fn(lambda cid: client)("0")  # simulation: the adapter seeds the global generators
    assert isinstance(adapter, NumPyClientAdapter) and adapter.seed_globals
    adapter.fit(GLOBAL, {"seed": 3})
    adapter.fit(GLOBAL, {"seed": 3})
    adapter.fit(GLOBAL, {"seed": 4})
    assert draws[0] == draws[1] != draws[2]


def _rng_states() -> tuple:
    return torch.get_rng_state().clone(), np.random.get_state(), random.getstate()


def test_a_deployed_flower_client_keeps_its_global_generators_away_from_the_servers_seed(captured):
    """The server chooses the task seed: a deployed client must not have torch/numpy/random seeded by it (its own
    noise drawn from them would be known to the server); fit and evaluate leave the generators' state alone."""
    import insitu.flwr as fl

    fl.client.start_numpy_client(server_address="localhost:8080", client=Scripted())
    (build, _), _ = captured[-1]
    adapter = build("simple-net")
    assert not adapter.seed_globals and not NumPyClientAdapter(Scripted()).seed_globals  # off by default too
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = _rng_states()
    adapter.fit(GLOBAL, {"seed": 7})
    adapter.evaluate(GLOBAL, {"seed": 7})
    after = _rng_states()
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1]) and before[1][2:] == after[1][2:]
    assert before[2] == after[2]
    seeded = NumPyClientAdapter(Scripted(), seed_globals=True)
    seeded.fit(GLOBAL, {"seed": 7})
    assert not torch.equal(before[0], torch.get_rng_state())  # the check above can fail


def test_a_flower_client_on_fitins_messages_is_refused_even_without_get_properties():
    class FitInsClient:  # flwr.client.Client's shape: one message argument per method
        def get_parameters(self, ins):
            return None

        def fit(self, ins):
            return None

        def evaluate(self, ins):
            return None

    with pytest.raises(TypeError, match="Flower Client working on FitIns/FitRes messages"):
        unwrap(FitInsClient())
    with pytest.raises(TypeError, match="Flower Client working on FitIns/FitRes messages"):
        adapt_client_fn(lambda cid: FitInsClient())("0")
    if FLWR:
        from flwr.client import Client as FlowerClient

        class Real(FlowerClient):
            def fit(self, ins):
                return None

        with pytest.raises(TypeError, match="FitIns/FitRes"):
            unwrap(Real())
    assert unwrap(Scripted()) is not None  # a NumPyClient's fit(parameters, config) passes


@pytest.mark.parametrize(("reply", "message"), [
    (lambda p: (p[:1], 1, {}), "returned 1 arrays, but the server's model has 2: fc.weight (2, 3), fc.bias (2,)"),
    (lambda p: ([p[0].T, p[1]], 1, {}), "shape (3, 2) for array 0 ('fc.weight'), which has shape (2, 3)"),
    (lambda p: ([p[0], np.array([1, 2])], 1, {}), "dtype int64 for array 1 ('fc.bias'), which is float32"),
    (lambda p: ([p[0], np.array([np.nan, 0], np.float32)], 1, {}), "non-finite values (nan or inf) in array 1"),
    (lambda p: ([p[0], np.array([1e300, 0.0])], 1, {}), "too large for float32"),
    (lambda p: ([p[0], [0.0, 1.0]], 1, {}), "returned list as array 1 ('fc.bias'); it must be a numpy array"),
    (lambda p: (np.concatenate([p[0].ravel(), p[1]]), 1, {}), "returned ndarray for the parameters"),
    (lambda p: (p, -1, {}), "num_examples -1; it must be an int >= 0"),
    (lambda p: (p, 2.0, {}), "num_examples 2.0"),
    (lambda p: (p, True, {}), "num_examples True"),
    (lambda p: (p, 1, {"hist": [1, 2]}), "metric 'hist' = [1, 2] (list); insitu metrics are numbers"),
    (lambda p: (p, 1, {"note": "ok"}), "metric 'note' = 'ok' (str)"),
    (lambda p: (p, 1, {"acc": float("inf")}), "metric 'acc' = inf; metrics must be finite"),
    (lambda p: (p, 1, [("acc", 1.0)]), "metrics of type list"),
    (lambda p: (p, 1), "fit returned tuple of 2; it must return a tuple (parameters, num_examples, metrics)"),
])
def test_untrusted_fit_results_are_refused_naming_the_problem(reply, message):
    with pytest.raises(FlowerClientError) as error:
        NumPyClientAdapter(Scripted(reply)).fit(GLOBAL, {})
    assert message in str(error.value)


def test_a_float64_update_is_cast_to_the_servers_float32():
    client = Scripted(lambda p: ([a.astype(np.float64) / 3 for a in p], 1, {}))
    result = NumPyClientAdapter(client).fit(GLOBAL, {})
    assert [a.dtype for a in result.parameters.arrays] == [np.float32, np.float32]
    np.testing.assert_array_equal(result.parameters.arrays[1], (np.array([0.5, -0.5]) / 3).astype(np.float32))


def test_bad_evaluate_results_are_refused():
    with pytest.raises(FlowerClientError, match="loss 'low' \\(str\\); it must be a number"):
        NumPyClientAdapter(Scripted(evaluation=("low", 1, {}))).evaluate(GLOBAL, {})
    with pytest.raises(FlowerClientError, match="evaluate returned num_examples -3"):
        NumPyClientAdapter(Scripted(evaluation=(0.1, -3, {}))).evaluate(GLOBAL, {})


def test_a_task_with_named_arrays_is_refused_since_a_numpy_client_cannot_use_them():
    with pytest.raises(FlowerClientError, match="named arrays \\(c_global\\).*'scaffold'"):
        NumPyClientAdapter(Scripted()).fit(GLOBAL, {"algorithm": "scaffold", "c_global": GLOBAL})


def test_precheck_names_the_servers_model_when_the_architecture_differs():
    class Wide(Scripted):
        def get_parameters(self, config):
            return [np.zeros((4, 3), np.float32), np.zeros(4, np.float32)]

    adapter = NumPyClientAdapter(Wide(), precheck=True, server_model="mlp")
    with pytest.raises(FlowerClientError, match=r"does not fit the one the server trains \(mlp\).*shape \(4, 3\) "
                                                r"for array 0 \('fc.weight'\).*--model"):
        adapter.fit(GLOBAL, {})


def test_to_client_results_are_unwrapped_and_other_objects_refused():
    client = Scripted()
    assert unwrap(client.to_client()) is client
    from insitu.flwr.client import NumPyClient as Shim

    class Plain(Shim):
        def get_parameters(self, config):
            return [np.ones(2, np.float32)]

    plain = Plain()
    assert unwrap(plain.to_client()) is plain

    class MessageClient:  # a Flower Client on FitIns/FitRes: not a NumPyClient
        def get_properties(self, ins): ...
        def fit(self, ins): ...
        def evaluate(self, ins): ...

    with pytest.raises(TypeError, match="Flower Client working on FitIns/FitRes.*subclass NumPyClient"):
        unwrap(MessageClient())
    with pytest.raises(NotImplementedError, match="must define fit"):
        Shim().fit([], {})


@pytest.mark.skipif(not FLWR, reason="flwr is not installed")
def test_flwrs_own_to_client_result_is_unwrapped():
    client = Scripted()
    wrapped = client.to_client()
    assert type(wrapped).__module__ != type(client).__module__  # flwr's wrapper, not ours
    assert NumPyClientAdapter(wrapped).fit(GLOBAL, {}).num_examples == 5


def test_initial_parameters_come_from_get_parameters_named_by_position():
    made = initial_parameters(Scripted().to_client())
    assert made.names == ("0", "1") and [a.shape for a in made.arrays] == [(2, 3), (2,)]


def test_the_flwr_shim_names_insitus_replacements_for_the_server_side():
    import insitu.flwr as fl

    arrays = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
    params = fl.common.ndarrays_to_parameters(arrays)
    assert [a.tolist() for a in fl.common.parameters_to_ndarrays(params)] == [a.tolist() for a in arrays]
    with pytest.raises(AttributeError, match="insitu server"):
        fl.server  # noqa: B018
    with pytest.raises(AttributeError, match="insitu.simulate"):
        fl.simulation  # noqa: B018


class TorchBacked(NumPyClient):
    """A Flower client whose training is an insitu TorchClient's: the adapter is then the only difference."""

    def __init__(self, inner: Client, names: tuple[str, ...]):
        self.inner, self.names = inner, names

    def get_parameters(self, config):
        raise AssertionError("not called when initial_parameters are given")

    def fit(self, parameters, config):
        result = self.inner.fit(Parameters.from_arrays(dict(zip(self.names, parameters))), config)
        return list(result.parameters.arrays), result.num_examples, result.metrics

    def evaluate(self, parameters, config):
        result = self.inner.evaluate(Parameters.from_arrays(dict(zip(self.names, parameters))), config)
        return result.loss, result.num_examples, result.metrics


def _experiment():
    return build_experiment(SimulationConfig(dataset="digits", model="mlp", num_clients=3, rounds=2, seed=5,
                                             fraction_evaluate=1.0))


def test_a_flower_client_fn_simulation_equals_insitus_own_bit_for_bit():
    own = _experiment()
    expected = simulate(own.client_fn, num_clients=3, strategy=own.strategy, num_rounds=2,
                        initial_parameters=own.initial_parameters, seed=5)
    flower = _experiment()
    names = flower.initial_parameters.names
    got = simulate(lambda cid: TorchBacked(flower.client_fn(cid), names).to_client(), num_clients=3,
                   strategy=flower.strategy, num_rounds=2, initial_parameters=flower.initial_parameters, seed=5)
    np.testing.assert_array_equal(got.parameters.flat(), expected.parameters.flat())
    assert got.parameters.names == expected.parameters.names
    assert [r.accuracy for r in got.history.rounds] == [r.accuracy for r in expected.history.rounds]
    assert not np.array_equal(got.parameters.flat(), flower.initial_parameters.flat())  # it did train


class SeedStyle(NumPyClient):
    """The seeds' client shape (seed 003's SimpleNet, seed 001's config['local_epochs'] and config['lr']):
    a DataLoader that shuffles with torch's global generator."""

    def __init__(self, x, y):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                         torch.nn.Linear(16, 10))
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

    def get_parameters(self, config):
        return [v.cpu().numpy() for v in self.model.state_dict().values()]

    def set_parameters(self, parameters):
        keys = self.model.state_dict().keys()
        self.model.load_state_dict({k: torch.tensor(v) for k, v in zip(keys, parameters)}, strict=True)

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=float(config.get("lr", 0.05)))
        for _ in range(int(config.get("local_epochs", 1))):
            for x, y in self.loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(self.model(x), y).backward()
                optimizer.step()
        return self.get_parameters({}), len(self.loader.dataset), {}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        with torch.no_grad():
            x, y = self.loader.dataset.tensors
            out = self.model(x)
        return float(torch.nn.functional.cross_entropy(out, y)), len(y), {"accuracy": float((out.argmax(1) == y).float().mean())}


def test_a_seed_style_client_fn_simulates_reproducibly_from_a_clients_initial_parameters_in_either_form():
    from insitu.strategies import fedavg

    own = _experiment()

    def client_fn(cid: str):
        index = own.train_parts[int(cid)]
        x, y = own.train.x[index], own.train.y[index]
        return SeedStyle(x, y).to_client()

    def run(client_fn):
        strategy = fedavg(min_fit_clients=3, min_available_clients=3, fraction_evaluate=1.0,
                          fit_config={"lr": 0.2, "local_epochs": 1})
        return simulate(client_fn, num_clients=3, strategy=strategy, num_rounds=2, seed=1)

    def context_fn(context: Context):  # newer Flower's form: the partition comes from node_config
        assert context.node_config["num-partitions"] == 3
        return client_fn(str(context.node_config["partition-id"]))

    first, second = run(client_fn), run(context_fn)
    assert first.parameters.names == ("0", "1", "2", "3")  # from client "0"'s get_parameters, as Flower does
    np.testing.assert_array_equal(first.parameters.flat(), second.parameters.flat())
    accuracy = first.history.rounds[-1].accuracy
    assert accuracy > 0.7, first.history.rounds


def test_simulate_without_initial_parameters_needs_a_flower_client_fn():
    own = _experiment()
    with pytest.raises(ValueError, match="give initial_parameters"):
        simulate(own.client_fn, num_clients=3, strategy=own.strategy, num_rounds=1)


def test_adapt_client_fn_passes_insitu_clients_through_and_refuses_others():
    own = _experiment()
    adapted = adapt_client_fn(own.client_fn)
    assert adapt_client_fn(adapted) is adapted
    assert not isinstance(adapted("0"), NumPyClientAdapter)
    with pytest.raises(TypeError, match="neither an insitu Client"):
        adapt_client_fn(lambda cid: object())("0")
    seen = []
    by_context = adapt_client_fn(lambda context: seen.append(context) or Scripted(), num_clients=5)
    assert isinstance(by_context("3"), NumPyClientAdapter)
    assert (seen[0].node_id, seen[0].node_config) == (3, {"partition-id": 3, "num-partitions": 5})
    with pytest.raises(ValueError, match="pass num_clients"):
        adapt_client_fn(lambda context: None)


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "mnist"], "--dataset cannot apply with --flower-client"),
    (["--model", "mlp", "--num-partitions", "2"], "--model, --num-partitions cannot apply"),
    ([], "no 'nope'"),
])
def test_insitu_client_flower_refuses_options_that_describe_insitus_own_client(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flowerclient.py").write_text("def make():\n    raise AssertionError('not built')\n")
    spec = "flowerclient:nope" if not args else "flowerclient:make"
    result = CliRunner().invoke(app, ["client", "--flower-client", spec, "--client-id", "0", "--insecure", *args])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output


@pytest.fixture
def captured(monkeypatch):
    """start_numpy_client's call of insitu.net.client.connect, recorded instead of made (no server)."""
    import insitu.net.client

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(insitu.net.client, "connect", lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
    for name in ("INSITU_CERTS", "INSITU_CLIENT_ID", "INSITU_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_start_numpy_client_takes_its_identity_and_tls_from_the_environment(captured, monkeypatch, tmp_path):
    import insitu.flwr as fl

    fl.client.start_numpy_client(server_address="localhost:8080", client=Scripted())
    (build, address), kwargs = captured[-1]
    assert address == "localhost:8080" and kwargs["tls"] is None and kwargs["signing_key"] is None
    assert kwargs["client_id"].startswith("flower-")
    adapter = build("simple-net")  # the factory connect calls with the server's model name
    assert isinstance(adapter, NumPyClientAdapter) and adapter.precheck and adapter.server_model == "simple-net"

    folder = tmp_path / "clients" / "3"
    folder.mkdir(parents=True)
    for name in ("client.key", "ca.pem", "tls.pem", "tls.key"):
        (folder / name).write_text("x")
    monkeypatch.setenv("INSITU_CERTS", str(folder))
    monkeypatch.setenv("INSITU_CLIENT_ID", "3")
    monkeypatch.setenv("INSITU_SERVER_ADDRESS", "fl.example.org:9092")
    fl.client.start_client(server_address="localhost:8080", client=Scripted().to_client())
    (_, address), kwargs = captured[-1]
    assert address == "fl.example.org:9092" and kwargs["client_id"] == "3"
    assert kwargs["signing_key"] == folder / "client.key"
    assert (kwargs["tls"].ca, kwargs["tls"].cert, kwargs["tls"].key) == (folder / "ca.pem", folder / "tls.pem",
                                                                        folder / "tls.key")


@pytest.mark.parametrize(("kwargs", "env", "message"), [
    ({"server_address": "10.1.2.3:8080"}, {}, "not a loopback address and no INSITU_CERTS folder is set"),
    ({"server_address": "localhost:8080", "root_certificates": b"PEM"}, {}, "root_certificates alone cannot"),
    ({"server_address": "localhost:8080", "insecure": False}, {}, "insecure=False asks for TLS"),
    ({"server_address": "localhost:8080"}, {"INSITU_CERTS": "."}, "client.key not found"),
    ({"server_address": "localhost:8080", "transport": "rest"}, {}, "transport 'rest'"),
])
def test_start_numpy_client_refuses_settings_that_cannot_work(captured, monkeypatch, kwargs, env, message):
    import insitu.flwr as fl

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        fl.client.start_numpy_client(client=Scripted(), **kwargs)
    assert not captured
    for name in env:
        monkeypatch.delenv(name)
    fl.client.start_numpy_client(server_address="10.1.2.3:8080", client=Scripted(), insecure=True)  # explicit: ok
    assert captured


def test_flower_client_factories_get_the_id_only_when_they_need_it(tmp_path, monkeypatch):
    from insitu.flower.start import load_factory, make_client

    (tmp_path / "fac.py").write_text("def by_id(client_id):\n    return ('id', client_id)\n"
                                     "def plain(seed=0):\n    return ('plain', seed)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_client(load_factory("fac:by_id"), "7") == ("id", 7)  # a number: an int, as Flower partitions use
    assert make_client(load_factory(f"{tmp_path / 'fac.py'}:by_id"), "site-a") == ("id", "site-a")
    assert make_client(load_factory("fac:plain"), "7") == ("plain", 0)
    with pytest.raises(ValueError, match="give MODULE:FACTORY"):
        load_factory("fac")
    with pytest.raises(ValueError, match="cannot import 'missing_mod'"):
        load_factory("missing_mod:make")


def test_a_flower_client_file_never_replaces_a_loaded_module_nor_shadows_later_imports(tmp_path):
    import json

    from insitu.flower.start import load_factory

    (tmp_path / "json.py").write_text("import helper_mod\n\ndef make():\n    return helper_mod.VALUE\n")
    (tmp_path / "helper_mod.py").write_text("VALUE = 'from the folder'\n")
    folder = str(tmp_path.resolve())
    try:
        factory = load_factory(f"{tmp_path / 'json.py'}:make")
        assert factory() == "from the folder"  # sibling imports work while the file loads
        assert sys.modules["json"] is json  # the stdlib module stays
        assert sys.modules["_insitu_flower_client_json"].make is factory
        assert folder not in sys.path[:-1] and sys.path[-1] == folder  # searched last from now on
    finally:
        for name in ("_insitu_flower_client_json", "helper_mod"):
            sys.modules.pop(name, None)
        while folder in sys.path:
            sys.path.remove(folder)
