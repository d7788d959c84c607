"""`insitu server --mode fedbuff` as users run it: a real server and three `insitu client` processes on
loopback, with TLS and key authentication; FedBuff's server steps are committed like rounds."""

from __future__ import annotations

import json

from cli_harness import free_port


def test_fedbuff_server_and_client_processes_run_every_step(procs, certs, tmp_path):
    port = free_port()
    procs.start("server", "server", "--certs", str(certs), "--address", f"127.0.0.1:{port}", "-o", "out",
                "--rounds", "4", "--min-clients", "3", "--mode", "fedbuff", "--buffer-size", "2", "--concurrency",
                "3", "--model", "logreg")
    for cid in range(3):
        procs.start(f"client{cid}", "client", "--certs", str(certs / "clients" / str(cid)), "--client-id", str(cid),
                    "--address", f"localhost:{port}", "--num-partitions", "3", "--partition-id", str(cid))
    assert procs.wait("server") == 0, procs.log("server")
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    steps = history["rounds"]
    assert [s["round"] for s in steps] == [1, 2, 3, 4] and all(s["status"] == "ok" for s in steps)
    assert all(s["num_results"] == 2 and "staleness_mean" in s["fit_metrics"] for s in steps)
    assert steps[-1]["centralized"]["metrics"]["accuracy"] > 0.5
    assert "staleness" in procs.log("server")
    for cid in range(3):
        assert procs.wait(f"client{cid}", 60) == 0, procs.log(f"client{cid}")
