"""The seeds' own Flower client code against a real `insitu server`, with only its import line changed.

Seed 003's client.py (``FlowerClient(fl.client.NumPyClient)`` over a SimpleNet 784-128-10, started with
``fl.client.start_numpy_client(server_address="localhost:8080", ...)``) is read from ../shared/seeds at
test time, never copied into the repository; ``import flwr as fl`` becomes ``import insitu.flwr as fl``.
The seed leaves ``load_data()`` to the reader: the helper written here supplies it from the MNIST IDX
files (insitu's reader, no torchvision), giving each client the same partition `insitu client` takes.
(Seed 000's client.py lost its indentation in the seed text, so it is not runnable as printed.)

One federation runs the seed's script (client 0, via the shim's ``start_numpy_client``) and the same
client class served by ``insitu client --flower-client`` (client 1); a second federation runs two plain
``insitu client`` processes on the same partitions and settings. Both must reach the same accuracy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_harness import ENV, free_port
from conftest import REPO_ROOT

SEEDS = REPO_ROOT.parent / "shared" / "seeds"

DATA_HELPER = '''"""What seed 003 leaves to its reader: load_data(), from the MNIST IDX files, as `insitu client` splits them."""
import os

import numpy as np
from torch.utils.data import DataLoader, TensorDataset

from insitu.data import load_dataset, partition


def load_data(client_id=None):
    cid = int(os.environ["INSITU_CLIENT_ID"] if client_id is None else client_id)
    parts, limit, data_dir = int(os.environ["SEED_PARTS"]), int(os.environ["SEED_TRAIN_LIMIT"]), os.environ["SEED_MNIST"]
    train = load_dataset("mnist", "train", data_dir)
    train = train.subset(np.arange(min(limit, len(train))))
    test = load_dataset("mnist", "test", data_dir)
    rows = partition(train.labels_numpy(), parts, "iid", seed=0)[cid]
    test_rows = partition(test.labels_numpy(), parts, "iid", seed=1)[cid]
    return (DataLoader(TensorDataset(train.x[rows], train.y[rows]), batch_size=32, shuffle=True),
            DataLoader(TensorDataset(test.x[test_rows], test.y[test_rows]), batch_size=1000))
'''

RUNNER = '''"""Run the seed's client.py as its author would (python client.py), with load_data() defined for it."""
import runpy
import sys

from seed_data import load_data

runpy.run_path(sys.argv[1], init_globals={"load_data": load_data}, run_name="__main__")
'''

FACTORY = '''"""insitu client --flower-client factory.py:make: the seed's own FlowerClient and SimpleNet."""
from client import FlowerClient, SimpleNet
from seed_data import load_data


def make(client_id):
    trainloader, testloader = load_data(client_id)
    return FlowerClient(SimpleNet(), trainloader, testloader)
'''


def seed_client_code() -> str:
    """Seed 003's client.py block, with ``import flwr as fl`` swapped for insitu's shim (and nothing else)."""
    texts = sorted(SEEDS.glob("003_*.txt"))
    if not texts:
        pytest.skip(f"seed 003 not found in {SEEDS}")
    match = re.search(r"```python\n(# client\.py\n.*?)```", texts[0].read_text(), re.DOTALL)
    assert match, "seed 003 no longer holds a ```python block starting with # client.py"
    code = match.group(1)
    assert code.count("import flwr as fl\n") == 1 and "fl.client.start_numpy_client(" in code
    return code.replace("import flwr as fl\n", "import insitu.flwr as fl\n")


def server(port: int, out: str, rounds: int, mnist: Path, test_limit: int) -> list[str]:
    return ["server", "--insecure", "--address", f"127.0.0.1:{port}", "--dataset", "mnist", "--data-dir", str(mnist),
            "--model", "simple-net", "--rounds", str(rounds), "--min-clients", "2", "--test-limit", str(test_limit),
            "--lr", "0.01", "--local-epochs", "1", "--batch-size", "32", "--momentum", "0", "--seed", "0",
            "--heartbeat-timeout", "30", "-o", out]


def run_both(procs, tmp_path: Path, mnist: Path, monkeypatch, *, rounds: int, train_limit: int,
             test_limit: int) -> tuple[float, float]:
    """Final centralized accuracy of (the seed's Flower clients, insitu's own clients) on the same partitions."""
    for name, value in {"SEED_PARTS": "2", "SEED_TRAIN_LIMIT": str(train_limit), "SEED_MNIST": str(mnist),
                        "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setitem(ENV, name, value)  # every process started here (six share the cores: one thread each)
    (tmp_path / "client.py").write_text(seed_client_code())
    (tmp_path / "seed_data.py").write_text(DATA_HELPER)
    (tmp_path / "run_seed_client.py").write_text(RUNNER)
    (tmp_path / "factory.py").write_text(FACTORY)
    flower_port, own_port = free_port(), free_port()
    procs.start("flower_server", *server(flower_port, "flower_out", rounds, mnist, test_limit))
    procs.start("own_server", *server(own_port, "own_out", rounds, mnist, test_limit))
    with open(tmp_path / "seed_script.log", "w") as log:  # the seed's own script: python client.py
        procs.procs["seed_script"] = subprocess.Popen(
            [sys.executable, "run_seed_client.py", "client.py"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**ENV, "INSITU_CLIENT_ID": "0", "INSITU_SERVER_ADDRESS": f"127.0.0.1:{flower_port}"})
    procs.start("flower_cli", "client", "--insecure", "--client-id", "1", "--address", f"127.0.0.1:{flower_port}",
                "--flower-client", "factory.py:make")
    for cid in (0, 1):
        procs.start(f"own{cid}", "client", "--insecure", "--client-id", str(cid), "--address", f"127.0.0.1:{own_port}",
                    "--dataset", "mnist", "--data-dir", str(mnist), "--num-partitions", "2",
                    "--train-limit", str(train_limit))
    for name in ("flower_server", "own_server", "seed_script", "flower_cli", "own0", "own1"):
        assert procs.wait(name, timeout=300) == 0, procs.log(name)
    assert f"Done: {rounds} tasks completed" in procs.log("flower_cli")
    accuracies = []
    for out in ("flower_out", "own_out"):
        history = json.loads((tmp_path / out / "history.json").read_text())
        assert [r["num_results"] for r in history["rounds"]] == [2] * rounds, history
        accuracies.append(history["rounds"][-1]["centralized"]["metrics"]["accuracy"])
    print(f"seed Flower clients {accuracies[0]:.4f}, insitu clients {accuracies[1]:.4f}")
    return accuracies[0], accuracies[1]


def test_seed_003_flower_client_trains_against_insitu_server_like_insitu_client(procs, mnist_dir, tmp_path,
                                                                                monkeypatch):
    flower, own = run_both(procs, tmp_path, mnist_dir, monkeypatch, rounds=2, train_limit=3000, test_limit=2000)
    assert own > 0.65
    assert abs(flower - own) < 0.04


@pytest.mark.slow
def test_seed_003_flower_client_matches_insitu_client_on_more_data_and_rounds(procs, mnist_dir, tmp_path,
                                                                              monkeypatch):
    flower, own = run_both(procs, tmp_path, mnist_dir, monkeypatch, rounds=5, train_limit=20000, test_limit=10000)
    assert own > 0.88
    assert abs(flower - own) < 0.015
