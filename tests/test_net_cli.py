"""The deployment as users run it: `insitu keygen`, one `insitu server` and client processes on
loopback, with TLS, client certificates and key authentication; kill -9 of a client and of the server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch

from cli_harness import BIN, ENV, Procs, free_port


def server_args(port: int, certs: Path, out: str, *extra: str) -> list[str]:
    return ["server", "--certs", str(certs), "--address", f"127.0.0.1:{port}", "-o", out, *extra]


def client_args(port: int, certs: Path, cid: int, *extra: str) -> list[str]:
    return ["client", "--certs", str(certs / "clients" / str(cid)), "--client-id", str(cid),
            "--address", f"localhost:{port}", "--num-partitions", "3", "--partition-id", str(cid), *extra]


def final_history(root: Path, out: str) -> dict:
    return json.loads((root / out / "history.json").read_text())


def test_four_terminals_with_tls_and_authentication(procs, certs, tmp_path):
    port = free_port()
    procs.start("server", *server_args(port, certs, "out", "--rounds", "3", "--min-clients", "3"))
    for cid in range(3):
        procs.start(f"client{cid}", *client_args(port, certs, cid))
    assert procs.wait("server") == 0, procs.log("server")
    for cid in range(3):
        assert procs.wait(f"client{cid}") == 0, procs.log(f"client{cid}")
        assert "Done: 3 tasks completed" in procs.log(f"client{cid}")
    log = procs.log("server")
    assert "TLS + client certificates, 3 allowed client keys" in log
    assert "client 0 joined" in log and "Round 3/3" in log
    history = final_history(tmp_path, "out")
    assert [r["num_results"] for r in history["rounds"]] == [3, 3, 3]
    assert history["rounds"][-1]["centralized"]["metrics"]["accuracy"] > 0.9
    for name in ("model.pt", "history.csv", "plot.png", "server.db"):
        assert (tmp_path / "out" / name).exists()


def test_a_client_without_a_valid_key_is_refused(procs, certs, tmp_path):
    subprocess.run([str(BIN / "insitu"), "keygen", "--out", str(tmp_path / "other"), "--clients", "1", "--no-mtls"],
                   check=True, env=ENV, capture_output=True)
    port = free_port()
    procs.start("server", *server_args(port, certs, "out", "--rounds", "1", "--min-clients", "1", "--no-mtls"))
    procs.wait_for_text("server", "server listening")
    foreign = tmp_path / "other" / "clients" / "0"
    procs.start("stranger", "client", "--certs", str(foreign), "--client-id", "0", "--address", f"localhost:{port}")
    assert procs.wait("stranger", 60) == 2  # it does not even trust this server's certificate
    assert "TLS handshake" in procs.log("stranger")
    (foreign / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())  # trusts the server, but a foreign key
    procs.start("intruder", "client", "--certs", str(foreign), "--client-id", "0", "--address", f"localhost:{port}")
    assert procs.wait("intruder", 60) == 2
    assert "authentication failed" in procs.log("intruder")
    assert "rejected client '0'" in procs.log("server")
    procs.start("client0", *client_args(port, certs, 0))
    assert procs.wait("server") == 0


def test_plaintext_or_unauthenticated_on_a_public_address_is_refused(procs):
    """--insecure too: it is for loopback. Refused before binding, so this test never opens a socket
    off loopback (the plain case without --insecure is in test_net_security's bind-policy table)."""
    procs.start("server", "server", "--insecure", "--address", f"0.0.0.0:{free_port()}", "--rounds", "1")
    assert procs.wait("server", 60) == 2, procs.log("server")
    log = " ".join(procs.log("server").split())
    assert "refusing to listen on 0.0.0.0" in log and "without TLS and client authentication" in log
    assert "--dangerously-allow-insecure-network" in log and "server listening" not in log


def test_a_busy_port_is_a_clear_error(procs, certs):
    port = free_port()
    procs.start("first", *server_args(port, certs, "one", "--rounds", "1", "--min-clients", "1"))
    procs.wait_for_text("first", "server listening")
    procs.start("second", *server_args(port, certs, "two", "--rounds", "1", "--min-clients", "1"))
    with socket.socket() as other:  # a port held by another program
        other.bind(("127.0.0.1", 0))
        other.listen()
        procs.start("third", *server_args(other.getsockname()[1], certs, "three", "--rounds", "1", "--min-clients", "1"))
        for name in ("second", "third"):  # not a second federation silently sharing the port
            assert procs.wait(name, 60) == 2, procs.log(name)
            log = " ".join(procs.log(name).split())
            assert "the port is in use" in log and "Traceback" not in log, log
    assert procs.procs["first"].poll() is None  # the first server is untouched


def test_more_required_clients_than_the_allow_list_admits_is_refused_at_start(procs, certs):
    procs.start("server", *server_args(free_port(), certs, "out", "--rounds", "1", "--min-clients", "5"))
    assert procs.wait("server", 60) == 2
    log = " ".join(procs.log("server").split())
    assert "--min-clients is 5 but the allow-list" in log and "admits only 3 clients" in log
    assert "--add-client" in log and "server listening" not in log


def test_kill_9_of_a_client_mid_round_the_round_completes_with_the_others(procs, certs, tmp_path):
    port = free_port()
    procs.start("server", *server_args(port, certs, "out", "--rounds", "3", "--min-clients", "3",
                                       "--min-fit-clients", "2", "--local-epochs", "40", "--heartbeat-timeout", "2"))
    for cid in range(3):
        procs.start(f"client{cid}", *client_args(port, certs, cid))
    procs.wait_for_text("client2", "round 2: fit task received")
    procs.procs["client2"].send_signal(signal.SIGKILL)
    procs.wait_for_text("server", "Round 2/3")
    procs.start("client2b", *client_args(port, certs, 2))  # it comes back and takes part again
    assert procs.wait("server") == 0, procs.log("server")
    rounds = final_history(tmp_path, "out")["rounds"]
    assert rounds[0]["num_results"] == 3
    assert rounds[1]["status"] == "ok" and rounds[1]["num_results"] == 2
    assert rounds[1]["failures"][0]["client"] == "2" and "disconnected" in rounds[1]["failures"][0]["reason"]
    assert rounds[2]["num_results"] == 3


def _run_to_end(procs: Procs, port: int, certs: Path, out: str, tag: str, rounds: int) -> None:
    procs.start(f"server{tag}", *server_args(port, certs, out, "--rounds", str(rounds), "--min-clients", "3"))
    for cid in range(3):
        procs.start(f"client{cid}{tag}", *client_args(port, certs, cid))


def test_kill_9_of_the_server_then_resume_finishes_like_an_uninterrupted_run(procs, certs, tmp_path):
    port = free_port()
    _run_to_end(procs, port, certs, "straight", "a", 5)
    assert procs.wait("servera") == 0

    port = free_port()
    _run_to_end(procs, port, certs, "resumed", "b", 5)
    procs.wait_for_text("serverb", "Round 2/5")
    procs.procs["serverb"].send_signal(signal.SIGKILL)
    procs.wait("serverb", 10)
    procs.start("serverc", *server_args(port, certs, "resumed", "--rounds", "5", "--min-clients", "3", "--resume"))
    assert procs.wait("serverc") == 0, procs.log("serverc")
    assert "resuming after round 2" in procs.log("serverc")
    assert "Round 3/5" in procs.log("serverc") and "Round 1/5" not in procs.log("serverc")
    history = final_history(tmp_path, "resumed")
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3, 4, 5]
    # The same final model as the uninterrupted run: results arrive in any order over the network, so
    # the float32 sums may differ in their last bits (docs/deployment.md, Determinism), nothing more.
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(resumed[name], straight[name], rtol=0, atol=1e-5), name
    for cid in range(3):  # the clients rode out the restart by reconnecting
        assert procs.wait(f"client{cid}b") == 0
        assert "Done: 5 tasks completed" in procs.log(f"client{cid}b")


def test_too_few_clients_within_the_wait_is_a_clear_error(procs, certs):
    procs.start("server", *server_args(free_port(), certs, "out", "--rounds", "1", "--min-clients", "3",
                                       "--wait-timeout", "1"))
    assert procs.wait("server", 60) == 2
    assert "only 0 of the 3 required clients connected within 1 s" in " ".join(procs.log("server").split())


def test_ctrl_c_stops_the_server_cleanly(procs, certs):
    procs.start("server", *server_args(free_port(), certs, "out", "--rounds", "1", "--min-clients", "3"))
    procs.wait_for_text("server", "waiting for clients")
    procs.procs["server"].send_signal(signal.SIGINT)
    assert procs.wait("server", 30) == 130
    assert "completed rounds are saved; continue with --resume" in " ".join(procs.log("server").split())


def test_ctrl_c_mid_run_clients_wait_and_rejoin_the_resumed_server(procs, certs, tmp_path):
    port = free_port()
    # One short local epoch: a client busy training when Ctrl-C comes still pulls (and hears that the
    # run is resumable) within the server's grace; one training longer would just see the server gone.
    # 40 short rounds: the run cannot end before Ctrl-C arrives (3 rounds sometimes did, on a fast box).
    rounds = "40"
    procs.start("server", *server_args(port, certs, "out", "--rounds", rounds, "--min-clients", "1", "--local-epochs", "1"))
    procs.start("client0", "client", "--certs", str(certs / "clients" / "0"), "--client-id", "0",
                "--address", f"localhost:{port}")  # its partition defaults to its id
    procs.wait_for_text("server", "Round 1/40")
    procs.procs["server"].send_signal(signal.SIGINT)
    assert procs.wait("server", 30) == 130, procs.log("server")  # not ~600 s in an upload handler
    assert "completed rounds are saved; continue with --resume" in " ".join(procs.log("server").split())
    # The client is told the run can be resumed: it waits instead of ending with "Done" and exit 0.
    procs.wait_for_text("client0", "for it to resume", 30)
    time.sleep(1.0)
    assert procs.procs["client0"].poll() is None, procs.log("client0")
    assert "Done" not in procs.log("client0")
    procs.start("resumed", *server_args(port, certs, "out", "--rounds", rounds, "--min-clients", "1", "--local-epochs", "1",
                                        "--resume"))
    assert procs.wait("resumed") == 0, procs.log("resumed")
    assert "resuming after round" in procs.log("resumed") and "Round 40/40" in procs.log("resumed")
    assert [r["round"] for r in final_history(tmp_path, "out")["rounds"]] == list(range(1, 41))  # nothing lost or torn
    assert procs.wait("client0") == 0, procs.log("client0")
    assert "partition 0 of 3" in procs.log("client0") and "Done:" in procs.log("client0")


def test_a_run_whose_every_round_failed_exits_non_zero(procs, certs, tmp_path):
    port = free_port()
    procs.start("server", *server_args(port, certs, "out", "--rounds", "1", "--min-clients", "1"))
    # The server trains digits; this client's data has another shape, so every update it sends fails.
    procs.start("client0", *client_args(port, certs, 0, "--dataset", "breast-cancer"))
    assert procs.wait("server") == 1, procs.log("server")
    log = " ".join(procs.log("server").split())
    assert "1 of 1 round(s) failed" in log
    assert final_history(tmp_path, "out")["rounds"][0]["status"] != "ok"
    assert procs.wait("client0") == 1, procs.log("client0")  # neither side says "Done"
    assert "tasks failed on this client" in " ".join(procs.log("client0").split())


def test_scaffold_across_real_processes_keeps_client_state_on_disk(procs, certs, tmp_path):
    port = free_port()
    procs.start("server", *server_args(port, certs, "out", "--rounds", "2", "--min-clients", "3",
                                       "--strategy", "scaffold", "--aggregator", "median"))
    for cid in range(3):
        procs.start(f"client{cid}", *client_args(port, certs, cid, "--state-dir", f"state{cid}"))
    assert procs.wait("server") == 0, procs.log("server")
    history = final_history(tmp_path, "out")
    assert [r["num_results"] for r in history["rounds"]] == [3, 3]
    for cid in range(3):
        assert procs.wait(f"client{cid}") == 0, procs.log(f"client{cid}")
        assert (tmp_path / f"state{cid}" / "scaffold_c_i.insitu").is_file()


def test_secure_aggregation_across_real_processes_survives_a_kill_9(procs, certs, tmp_path):
    port = free_port()
    procs.start("server", *server_args(port, certs, "out", "--rounds", "2", "--min-clients", "3",
                                       "--min-fit-clients", "2", "--secure-aggregation", "--local-epochs", "10",
                                       "--heartbeat-timeout", "2"))
    for cid in range(3):
        procs.start(f"client{cid}", *client_args(port, certs, cid))
    procs.wait_for_text("client2", "round 1: secagg train task received")  # training, before its keys went out
    procs.procs["client2"].send_signal(signal.SIGKILL)
    procs.wait_for_text("server", "Round 1/2")
    procs.start("client2b", *client_args(port, certs, 2))
    assert procs.wait("server") == 0, procs.log("server")
    rounds = final_history(tmp_path, "out")["rounds"]
    assert [(r["status"], r["num_results"]) for r in rounds] == [("ok", 2), ("ok", 3)], [r["failures"] for r in rounds]
    assert rounds[0]["failures"][0]["client"] == "2" and "secagg train" in rounds[0]["failures"][0]["stage"]
    assert rounds[-1]["centralized"]["metrics"]["accuracy"] > 0.9
    log = " ".join(procs.log("server").split())
    assert "securely aggregated 2 of 3 clients" in log and "securely aggregated 3 of 3 clients" in log


def test_a_server_configured_from_a_settings_file_with_a_server_table(procs, certs, tmp_path):
    port = free_port()
    (tmp_path / "fed.toml").write_text(
        'rounds = 2\nclients = 1\nlocal_epochs = 1\ntest_limit = 100\n\n'
        f'[server]\naddress = "127.0.0.1:{port}"\nstore = "state/fed.db"\nround_timeout = 120\n')
    procs.start("server", "server", "--config", "fed.toml", "--certs", str(certs), "-o", "out", "--rounds", "1")
    procs.start("client0", *client_args(port, certs, 0))
    assert procs.wait("server") == 0, procs.log("server")  # the flag's --rounds 1 overrides the file's 2
    assert "Round 1/1" in procs.log("server") and (tmp_path / "state" / "fed.db").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["test_limit"] == 100
    assert procs.wait("client0") == 0, procs.log("client0")


def test_a_client_configured_from_a_settings_file_with_a_client_table(procs, certs, tmp_path):
    """One file for both sides: the server reads [simulate] and [server], the client [client]; flags still win."""
    port = free_port()
    (tmp_path / "fed.toml").write_text(
        '[simulate]\nrounds = 2\nclients = 1\nlocal_epochs = 1\ntest_limit = 100\n\n'
        f'[server]\naddress = "127.0.0.1:{port}"\n\n'
        f'[client]\naddress = "127.0.0.1:{port}"\nclient-id = "0"\ncerts = "{certs / "clients" / "0"}"\n'
        'num_partitions = 3\npartition_id = 2\npartition = "dirichlet"\nalpha = 1.0\ngive_up_after = 60\n'
        'poll_wait = 2\nstate_dir = "state0"\n')
    procs.start("server", "server", "--config", "fed.toml", "--certs", str(certs), "-o", "out")
    procs.start("client0", "client", "--config", "fed.toml", "--partition-id", "1")
    assert procs.wait("server") == 0, procs.log("server")
    assert "Round 2/2" in procs.log("server")
    assert procs.wait("client0") == 0, procs.log("client0")
    log = " ".join(procs.log("client0").split())
    assert "partition 1 of 3" in log and f"connecting to 127.0.0.1:{port}" in log  # the flag beat the file's 2
    assert "Done: 2 tasks completed" in log
