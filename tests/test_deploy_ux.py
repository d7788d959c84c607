"""What a new user of `insitu server`/`insitu client` runs into, in one process on loopback: a stopped
server that clients wait for, the architecture the server tells its clients, clients added to a
running federation, TLS refusals that fail fast, busy ports, partitions that default to the client id."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from insitu.cli.deploy import _partition_id
from insitu.cli.main import app
from insitu.client.api import EvalResult, FitResult
from insitu.engines.base import Task, run_tasks
from insitu.engines.grpc_pool import GrpcClientPool
from insitu.net import security
from insitu.net.client import Backoff, ClientTLS, ConnectionRefused, connect
from insitu.net.server import BindError, FederationServer, ServerSettings, ServerTLS
from insitu.params import Parameters

W = Parameters.from_arrays({"w": np.zeros(3, np.float32)})


class Echo:
    def fit(self, parameters, config):
        return FitResult(parameters, 1, {})

    def evaluate(self, parameters, config):
        return EvalResult(0.0, 1, {})


class Joiner:
    """connect() in a thread; records the model name it was built for and how it ended."""

    def __init__(self, address: str, **kwargs) -> None:
        self.models: list[str] = []
        self.outcome: object = None
        kwargs.setdefault("backoff", Backoff(0.05, 0.3))
        kwargs.setdefault("poll_wait_s", 0.5)

        def factory(model: str) -> Echo:
            self.models.append(model)
            return Echo()

        def run() -> None:
            try:
                self.outcome = connect(factory, address, **kwargs)
            except BaseException as error:  # inspected by the test
                self.outcome = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "connect() did not return"
        return self.outcome


def wait_until(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def loopback(**settings) -> FederationServer:
    settings.setdefault("insecure", True)
    settings.setdefault("heartbeat_interval_s", 0.5)
    return FederationServer(ServerSettings(**{"address": "127.0.0.1:0", **settings}))


# -- B7: a stopped (resumable) server -----------------------------------------------------------


def test_pool_close_wakes_an_upload_waiting_for_the_loop():
    """Ctrl-C hits the loop while an upload waits to be folded: that handler must not sit out 600 s."""
    pool = GrpcClientPool()
    session = pool.register("0", "peer")
    rounds = run_tasks(pool, "fit", W, 0, [Task("0", {"round": 1})])
    taken = threading.Thread(target=next, args=(rounds,), daemon=True)  # the loop takes the result, then stops
    taken.start()
    wait_until(lambda: not session.mailbox.empty(), what="the task")
    task = pool.next_task(session, 1.0)
    handler = threading.Thread(target=pool.deliver, args=(task, FitResult(W, 1, {})), kwargs={"wait_consumed": 600},
                               daemon=True)
    handler.start()
    taken.join(10)
    assert not taken.is_alive() and handler.is_alive()  # delivered, and held until the loop folds it
    pool.close(resumable=True)
    handler.join(10)
    assert not handler.is_alive(), "closing the pool left an upload handler waiting"
    assert pool.resumable


def test_a_stopped_server_is_waited_for_and_rejoined_a_finished_one_is_left(caplog):
    caplog.set_level(logging.WARNING, logger="insitu.client")
    first = loopback(model="logreg")
    port = first.port
    joiner = Joiner(f"127.0.0.1:{port}", client_id="0", give_up_after_s=60)
    wait_until(lambda: first.pool.connected() == ["0"], what="the client to join")
    assert joiner.models == ["logreg"]  # the client built the server's architecture
    first.stop(grace_s=2.0, resumable=True)  # what Ctrl-C does
    wait_until(lambda: "waiting for up to 60 s (--give-up-after) for it to resume" in caplog.text,
               what="the client to say it waits")
    assert joiner.thread.is_alive()  # it did not take the stop for the end of the federation
    second = loopback(address=f"127.0.0.1:{port}", model="logreg")  # the resumed server
    try:
        wait_until(lambda: second.pool.connected() == ["0"], what="the client to rejoin the resumed server")
    finally:
        second.stop()  # the run is finished
    assert joiner.result() == 0
    assert joiner.models == ["logreg"]


def test_a_client_waiting_for_a_resume_gives_up_after_give_up_after():
    server = loopback()
    joiner = Joiner(f"127.0.0.1:{server.port}", client_id="0", give_up_after_s=2)
    wait_until(lambda: server.pool.connected() == ["0"], what="the client to join")
    server.stop(grace_s=2.0, resumable=True)
    outcome = joiner.result(30)
    assert isinstance(outcome, TimeoutError) and "unreachable for 2 s" in str(outcome)


def test_a_resumed_server_with_another_model_is_refused(caplog):
    first = loopback(model="mlp")
    port = first.port
    joiner = Joiner(f"127.0.0.1:{port}", client_id="0", give_up_after_s=60)
    wait_until(lambda: first.pool.connected() == ["0"], what="the client to join")
    first.stop(grace_s=2.0, resumable=True)
    second = loopback(address=f"127.0.0.1:{port}", model="simple-cnn")
    try:
        outcome = joiner.result()
    finally:
        second.stop()
    assert isinstance(outcome, ConnectionRefused) and "now trains 'simple-cnn'" in str(outcome)


# -- B6: one server per port ---------------------------------------------------------------------


def test_a_second_server_on_a_busy_port_is_refused():
    first = loopback()
    try:
        with pytest.raises(BindError, match=rf"cannot listen on 127.0.0.1:{first.port}: the port is in use"):
            loopback(address=f"127.0.0.1:{first.port}")
    finally:
        first.stop(grace_s=0)
    with socket.socket() as other:  # another program
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(BindError, match="another program"):
            loopback(address=f"127.0.0.1:{other.getsockname()[1]}")


# -- B10: TLS refusals fail fast with the cause ---------------------------------------------------


@pytest.fixture(scope="module")
def feds(tmp_path_factory):
    root = tmp_path_factory.mktemp("feds")
    return security.generate_federation(root / "ours", ["0", "1"]), security.generate_federation(root / "theirs", ["0"])


def tls_server(fed: security.FederationFiles, **settings) -> FederationServer:
    return loopback(insecure=False, tls=ServerTLS(fed.server_cert, fed.server_key, fed.ca_cert),
                    allow_list=security.ReloadingAllowList(fed.allow_list), **settings)


def test_a_client_certificate_the_server_refuses_fails_fast_with_the_fix(feds):
    ours, theirs = feds
    server = tls_server(ours)
    address = f"localhost:{server.port}"
    try:
        stranger = theirs.clients["0"]
        cases = {  # TLS files -> what the message must say
            "foreign certificate": (ClientTLS(ours.ca_cert, stranger.tls_cert, stranger.tls_key),
                                    "refused this client's TLS certificate"),
            "no certificate": (ClientTLS(ours.ca_cert), "requires a client certificate"),
            "foreign CA": (ClientTLS(stranger.ca_cert, ours.clients["0"].tls_cert, ours.clients["0"].tls_key),
                           "TLS handshake"),
        }
        for case, (tls, says) in cases.items():
            joiner = Joiner(address, client_id="0", tls=tls, signing_key=ours.clients["0"].signing_key,
                            give_up_after_s=60, backoff=Backoff(0.2, 0.5))
            outcome = joiner.result(55)  # not 60 s of retries: that would end in a TimeoutError
            assert isinstance(outcome, ConnectionRefused), (case, outcome)
            assert says in str(outcome), (case, str(outcome))
            assert "--certs" in str(outcome), case
        assert server.pool.connected() == []
    finally:
        server.stop(grace_s=0)


def test_a_plaintext_client_of_a_tls_server_is_told_to_use_its_certs(feds):
    ours, _ = feds
    server = tls_server(ours)
    try:
        joiner = Joiner(f"localhost:{server.port}", client_id="0", signing_key=ours.clients["0"].signing_key,
                        give_up_after_s=60, backoff=Backoff(0.2, 0.5))
        outcome = joiner.result(55)
    finally:
        server.stop(grace_s=0)
    assert isinstance(outcome, ConnectionRefused), outcome
    assert "requires TLS" in str(outcome) and "--certs" in str(outcome)


# -- B10: adding a client to a running federation -------------------------------------------------


def test_keygen_add_client_is_admitted_by_the_running_server(tmp_path):
    fed = security.generate_federation(tmp_path / "fed", ["0"])
    server = tls_server(fed)
    try:
        result = CliRunner().invoke(app, ["keygen", "--out", str(fed.root), "--add-client", "hospital-7"])
        assert result.exit_code == 0, result.output
        out = " ".join(result.output.split())
        assert "Added client hospital-7" in out and "without a restart" in out
        assert "keep-offline/ca.keyoffline" in "".join(out.split())  # the CA key is named, and what to do
        assert set(security.load_allow_list(fed.allow_list)) == {"0", "hospital-7"}
        new = security.ClientFiles.in_dir(fed.root / "clients" / "hospital-7")
        joiner = Joiner(f"localhost:{server.port}", client_id="hospital-7", signing_key=new.signing_key,
                        tls=ClientTLS(new.ca_cert, new.tls_cert, new.tls_key), give_up_after_s=30)
        wait_until(lambda: server.pool.connected() == ["hospital-7"] or not joiner.thread.is_alive(),
                   what="the new client to join")
        assert server.pool.connected() == ["hospital-7"], joiner.outcome
    finally:
        server.stop()
    assert joiner.result() == 0
    again = CliRunner().invoke(app, ["keygen", "--out", str(fed.root), "--add-client", "hospital-7"])
    assert again.exit_code == 2 and "already in" in again.output  # no silent re-keying


def test_keygen_add_client_without_the_ca_key_says_where_it_looked(tmp_path):
    fed = security.generate_federation(tmp_path / "fed", ["0"])
    vault = tmp_path / "vault.key"
    fed.ca_key.rename(vault)
    refused = CliRunner().invoke(app, ["keygen", "--out", str(fed.root), "--add-client", "1"])
    assert refused.exit_code == 2 and "--ca-key" in " ".join(refused.output.split())
    added = CliRunner().invoke(app, ["keygen", "--out", str(fed.root), "--add-client", "1", "--ca-key", str(vault)])
    assert added.exit_code == 0, added.output
    assert set(security.load_allow_list(fed.allow_list)) == {"0", "1"}


# -- B10: partitions default to the client id -----------------------------------------------------


def test_partition_id_defaults_to_a_numeric_client_id():
    assert _partition_id(None, "2", 3) == 2
    assert _partition_id(1, "hospital", 3) == 1
    with pytest.raises(ValueError, match="give --partition-id"):
        _partition_id(None, "hospital", 3)
    with pytest.raises(ValueError, match="give --partition-id"):
        _partition_id(None, "3", 3)  # out of range: not silently partition 0
    with pytest.raises(ValueError, match="must be in 0..2"):
        _partition_id(5, "0", 3)


def test_the_client_command_refuses_a_model_the_server_does_not_train():
    server = loopback(model="logreg")
    try:
        result = CliRunner().invoke(app, ["client", "--insecure", "--client-id", "0", "--num-partitions", "2",
                                          "--address", f"127.0.0.1:{server.port}", "--model", "mlp",
                                          "--give-up-after", "20", "--state-dir", str(Path("unused"))])
    finally:
        server.stop(grace_s=0)
    assert result.exit_code == 2, result.output
    assert "--model mlp does not match the server, which trains logreg" in " ".join(result.output.split())


# -- careless settings (from the adversarial review) ---------------------------------------------


@pytest.mark.parametrize("bad", [dict(round_timeout_s=0.0), dict(heartbeat_timeout_s=-1.0),
                                 dict(heartbeat_interval_s=-1.0), dict(max_clients=0), dict(max_update_bytes=0),
                                 dict(upload_slots=0), dict(max_examples_ratio=-1.0),
                                 dict(heartbeat_interval_s=20.0, heartbeat_timeout_s=15.0)])
def test_server_limits_under_which_nothing_could_succeed_are_refused_by_name(bad):
    from insitu.net.server import ServerSettings

    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerSettings(**bad)


def test_a_settings_table_beside_simulate_is_refused_not_ignored(tmp_path):
    """`[aggregator_options]` next to `[simulate]` used to be dropped silently (krum's f fell back to 0)."""
    from insitu.cli.presets import read_settings

    path = tmp_path / "krum.toml"
    path.write_text('[simulate]\naggregator = "krum"\n\n[aggregator_options]\nf = 2\n')
    with pytest.raises(ValueError, match=r"aggregator_options is outside \[simulate\].*\[simulate.aggregator_options\]"):
        read_settings(path)
    path.write_text('[simulate]\naggregator = "krum"\n\n[simulate.aggregator_options]\nf = 2\n\n[server]\nresume = false\n')
    assert read_settings(path)["aggregator_options"] == {"f": 2}
