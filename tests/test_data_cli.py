"""`insitu simulate --data` and `insitu server/client --data` as users run them (real subprocesses, loopback)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from cli_harness import BIN, ENV, free_port

HOSPITALS = {"st-marys": 9, "general": 6, "county": 12}  # training rows of each (plus 2 test rows each)


def run(cwd, *args, timeout=120):
    return subprocess.run([str(BIN / "insitu"), *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def write_hospitals_csv(path):
    rng = np.random.default_rng(0)
    lines = ["patient,age,marker,hospital,split,label"]
    for hospital, n in HOSPITALS.items():
        for i in range(n + 2):
            label = i % 2
            age, marker = rng.normal(50, 5), rng.normal(3.0 * label, 0.5)
            split = "test" if i >= n else "train"
            lines.append(f"{hospital}-{i},{age:.2f},{marker:.3f},{hospital},{split},{label}")
    path.write_text("\n".join(lines) + "\n")


def test_simulate_partitions_a_csv_by_its_hospital_column(tmp_path):
    write_hospitals_csv(tmp_path / "patients.csv")
    result = run(tmp_path, "simulate", "--data", "patients.csv", "--partition-by", "hospital",
                 "--exclude-columns", "patient", "--num-clients", "3", "--rounds", "1", "--local-epochs", "1",
                 "--model", "logreg", "-o", "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 clients (by hospital)" in result.stdout
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert data["clients"] == {"0": {"group": "county", "train_examples": 12},  # sorted by group value
                               "1": {"group": "general", "train_examples": 6},
                               "2": {"group": "st-marys", "train_examples": 9}}
    assert data["classes"] == ["0", "1"] and data["test_examples"] == 6 and data["input_shape"] == [2]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["num_results"] for r in history["rounds"]] == [3]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["partition_by"] == "hospital" and config["data"] == "patients.csv"


def write_image_folder(root, classes=("cat", "dog"), per_class=6, seed=0, size=(10, 10)):
    """Dark cats and bright dogs, noisy PNGs in root/<class>/."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 140 * (name == "dog"), 25, size), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{c}-{i}.png")


def test_simulate_on_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "images" / "train", per_class=8)
    write_image_folder(tmp_path / "images" / "test", per_class=3, seed=1)
    (tmp_path / "images" / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    result = run(tmp_path, "simulate", "--data", "images", "--image-size", "8", "--num-clients", "2",
                 "--partition", "iid", "--model", "simple-cnn", "--rounds", "2", "--local-epochs", "2", "-o", "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped 1 unreadable image under images: train/cat/broken.png" in " ".join(
        (result.stdout + result.stderr).split())
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert data["classes"] == ["cat", "dog"] and data["input_shape"] == [1, 8, 8]
    assert (data["train_examples"], data["test_examples"]) == (16, 6) and data["skipped"] == ["train/cat/broken.png"]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    final = history["rounds"][-1]["centralized"]["metrics"]["accuracy"]
    assert final >= 5 / 6  # dark vs bright: easy
    # the saved model scores the same on the run's own test split, read and preprocessed as the run did
    scored = run(tmp_path, "evaluate", "out/model.pt", "--config", "out/config.json")
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert f"simple-cnn on images test (6 examples): accuracy {100 * final:.2f}%" in " ".join(scored.stdout.split())


@pytest.mark.slow  # four processes (~60 s on a loaded 2-core machine); the class check has unit tests
def test_deployed_clients_train_on_their_own_folders_and_other_classes_are_refused(procs, tmp_path):
    write_image_folder(tmp_path / "server-test", per_class=3, seed=9)
    write_image_folder(tmp_path / "hospital-0", seed=0)
    write_image_folder(tmp_path / "hospital-1", seed=1)
    write_image_folder(tmp_path / "hospital-2", classes=("cat", "dog", "fox"), seed=2)
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs.start("server", "server", "--insecure", "--address", address, "--data", "server-test", "--model", "mlp",
                "--rounds", "2", "--min-clients", "3", "--min-fit-clients", "2", "-o", "out")
    for cid in range(3):
        procs.start(f"client{cid}", "client", "--insecure", "--client-id", str(cid), "--address", address,
                    "--data", f"hospital-{cid}", "--give-up-after", "60")
    assert procs.wait("server") == 0, procs.log("server")
    for cid in (0, 1):
        assert procs.wait(f"client{cid}") == 0, procs.log(f"client{cid}")
        assert "Done: 2 tasks completed" in procs.log(f"client{cid}")
        assert "classes cat, dog" in procs.log(f"client{cid}")
    assert procs.wait("client2") == 1
    refused = " ".join(procs.log("client2").split())
    assert "classes (cat, dog, fox) differ from the server's (cat, dog): not on the server: fox" in refused
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["num_results"] for r in history["rounds"]] == [2, 2]
    assert history["rounds"][-1]["centralized"]["metrics"]["accuracy"] >= 5 / 6
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert data["classes"] == ["cat", "dog"] and data["input_shape"] == [1, 10, 10] and data["test_examples"] == 6
