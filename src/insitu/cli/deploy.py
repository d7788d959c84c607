"""Deployment commands: ``insitu keygen``, ``insitu server``, ``insitu client``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import typer

from insitu.cli.common import console, err_console, fail, setup_logging
from insitu.cli.outputs import write_outputs
from insitu.cli.presets import resolve_config
from insitu.cli.progress import RoundPrinter

def keygen(
    out: Path = typer.Option(Path("federation"), "--out", "-o", help="Folder to create the files in."),
    clients: int = typer.Option(3, help="Number of clients (ids 0 .. N-1) unless --client-id is given."),
    client_id: Optional[list[str]] = typer.Option(None, "--client-id", help="Explicit client id (repeatable)."),
    host: Optional[list[str]] = typer.Option(None, "--host", help="Server DNS name or IP for its certificate (repeatable; default localhost, 127.0.0.1)."),
    days: int = typer.Option(365, help="Certificate validity in days."),
    mutual_tls: bool = typer.Option(True, "--mtls/--no-mtls", help="Also issue client TLS certificates."),
    overwrite: bool = typer.Option(False, help="Replace existing files."),
) -> None:
    """Create a CA, the server's TLS certificate, one signing key per client and the allow-list."""
    from insitu.net import security

    ids = list(client_id) if client_id else [str(i) for i in range(clients)]
    try:
        files = security.generate_federation(out, ids, hosts=tuple(host) if host else ("localhost", "127.0.0.1"),
                                             days=days, mutual_tls=mutual_tls, overwrite=overwrite)
    except (ValueError, FileExistsError, security.SecurityError) as error:
        raise fail(str(error)) from None
    console.print(f"Federation files in [bold]{out}[/]:")
    console.print(f"  server: {files.server_cert}, {files.server_key}, allow-list {files.allow_list}")
    for cid, paths in files.clients.items():
        console.print(f"  client {cid}: hand over the folder {paths.dir}")
    console.print(f"Start the server with --certs {out}; each client with --certs {out}/clients/<id> --client-id <id>.")


def server(
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML settings (as for simulate)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset whose test split the server evaluates on (and whose shape sets the model)."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the IDX files."),
    model: Optional[str] = typer.Option(None, help="simple-cnn | 2nn | logreg | mlp."),
    rounds: Optional[int] = typer.Option(None, help="Number of rounds."),
    min_clients: Optional[int] = typer.Option(None, "--min-clients", help="Clients that must be connected before a round starts."),
    min_fit_clients: Optional[int] = typer.Option(None, help="Fewest results for a round to count (default: --min-clients; under central DP 1, the only valid value)."),
    fraction: Optional[float] = typer.Option(None, help="Fraction of connected clients sampled per round."),
    fraction_evaluate: Optional[float] = typer.Option(None, help="Fraction of clients evaluating locally each round."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs sent to clients."),
    batch_size: Optional[int] = typer.Option(None, help="Local batch size sent to clients."),
    lr: Optional[float] = typer.Option(None, help="Client learning rate sent to clients."),
    momentum: Optional[float] = typer.Option(None, help="Client SGD momentum sent to clients."),
    seed: Optional[int] = typer.Option(None, help="Seed for the initial model, sampling and client shuffles."),
    strategy: Optional[str] = typer.Option(None, help="fedavg | fedsgd | fedprox | scaffold | fedavgm | fedadam | fedyogi | fedadagrad."),
    mu: Optional[float] = typer.Option(None, help="FedProx proximal weight mu."),
    server_lr: Optional[float] = typer.Option(None, help="Server learning rate (0 = the optimizer's default)."),
    aggregator: Optional[str] = typer.Option(None, help="mean | median | trimmed_mean | krum | multi_krum | bulyan."),
    byzantine_f: Optional[int] = typer.Option(None, help="Attackers Krum/Multi-Krum/Bulyan must tolerate."),
    clip_norm: Optional[float] = typer.Option(None, help="Bound each update's L2 norm (0 = off)."),
    dp_clip: Optional[float] = typer.Option(None, help="Central DP: clip each client's update to this L2 norm (0 = off)."),
    dp_noise: Optional[float] = typer.Option(None, help="Central DP noise multiplier z."),
    dp_target_epsilon: Optional[float] = typer.Option(None, help="Stop before a round that would exceed this epsilon."),
    secure_aggregation: Optional[bool] = typer.Option(None, "--secure-aggregation/--no-secure-aggregation", help="Learn only the sum of the updates (SecAgg protocol with the clients)."),
    secagg_bound: Optional[float] = typer.Option(None, help="With --secure-aggregation: fixed-point range [-B, B] of each update element."),
    test_limit: Optional[int] = typer.Option(None, help="Evaluate on the first N test examples only."),
    csv: Optional[Path] = typer.Option(None, help="Evaluate on this CSV test file (clients train on their own CSVs)."),
    label_column: str = typer.Option("label", help="CSV column holding the class label."),
    num_classes: Optional[int] = typer.Option(None, help="Classes in the CSV labels (default: largest label + 1; set it on every party)."),
    address: str = typer.Option("127.0.0.1:8080", help="host:port to listen on."),
    certs: Optional[Path] = typer.Option(None, help="Folder from `insitu keygen` (server.pem, server.key, ca.pem, allowed_clients.json)."),
    allow: Optional[Path] = typer.Option(None, help="Allow-list of client keys (default: CERTS/allowed_clients.json)."),
    mtls: bool = typer.Option(True, "--mtls/--no-mtls", help="With --certs: require client TLS certificates."),
    insecure: bool = typer.Option(False, help="Allow plaintext and no authentication (tests, trusted networks)."),
    store: Optional[Path] = typer.Option(None, help="SQLite file for round-by-round persistence (default OUTPUT/server.db)."),
    resume: bool = typer.Option(False, help="Continue the run in --store from its last completed round."),
    round_timeout: float = typer.Option(600.0, help="Seconds a round waits for results before dropping stragglers."),
    wait_timeout: Optional[float] = typer.Option(None, help="Give up if too few clients connect within this many seconds."),
    heartbeat_timeout: float = typer.Option(15.0, help="Drop a client silent for this many seconds."),
    max_update_mb: int = typer.Option(4096, help="Largest accepted update, in MiB."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Where history, model and plot go."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Log client events."),
) -> None:
    """Run a federation server: wait for clients, run the rounds, persist each one."""
    from insitu.data import load_dataset
    from insitu.data.tabular import load_csv
    from insitu.engines import NotEnoughClientsError
    from insitu.models import build_model
    from insitu.net import security
    from insitu.net.server import ResumeError, ServerSettings, ServerTLS, serve
    from insitu.params import Parameters
    from insitu.simulation import central_evaluator, make_strategy

    setup_logging(verbose)
    flags: dict[str, Any] = {"dataset": dataset, "data_dir": data_dir, "model": model, "rounds": rounds,
                             "num_clients": min_clients, "min_fit_clients": min_fit_clients,
                             "fraction_fit": fraction, "fraction_evaluate": fraction_evaluate,
                             "local_epochs": local_epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
                             "seed": seed, "test_limit": test_limit, "strategy": strategy, "mu": mu,
                             "server_lr": server_lr, "aggregator": aggregator, "byzantine_f": byzantine_f,
                             "clip_norm": clip_norm, "dp_clip": dp_clip, "dp_noise": dp_noise,
                             "dp_target_epsilon": dp_target_epsilon, "secure_aggregation": secure_aggregation,
                             "secagg_bound": secagg_bound}
    try:
        config = resolve_config(config_file, {k: v for k, v in flags.items() if v is not None})
        if min_fit_clients is None:  # every client; under central DP 1 (every sampled round is released)
            config.min_fit_clients = 1 if config.dp_clip > 0 else config.num_clients
        config.validate()
        test = load_csv(csv, label_column, num_classes) if csv is not None else load_dataset(config.dataset, "test", config.data_dir)
        if config.test_limit:
            test = test.subset(np.arange(min(config.test_limit, len(test))))
        torch.manual_seed(config.seed)
        net = build_model(config.model, test.input_shape, test.num_classes)
        strategy = make_strategy(config, central_evaluator(net, test), remote=True)
        tls, allow_list = None, None
        if certs is not None:
            tls = ServerTLS(certs / "server.pem", certs / "server.key", certs / "ca.pem" if mtls else None)
            allow = allow or certs / "allowed_clients.json"
        if allow is not None:
            allow_list = security.load_allow_list(allow)
        out = output_dir or Path("insitu-runs") / "server"
        out.mkdir(parents=True, exist_ok=True)
        settings = ServerSettings(address=address, tls=tls, allow_list=allow_list, insecure=insecure,
                                  store_path=store or out / "server.db", resume=resume, round_timeout_s=round_timeout,
                                  wait_timeout_s=wait_timeout, heartbeat_timeout_s=heartbeat_timeout,
                                  heartbeat_interval_s=min(3.0, heartbeat_timeout / 4),
                                  max_update_bytes=max_update_mb << 20)
        console.print(f"[bold]insitu server[/] on {address}: {config.model}, {config.rounds} rounds, waiting for "
                      f"{config.num_clients} clients; state in {settings.store_path}")
        printer = RoundPrinter(console, config.rounds)
        result = serve(strategy, Parameters.from_module(net), num_rounds=config.rounds, settings=settings,
                       seed=config.seed, on_round=lambda record, _p, _s: printer(record))
    except KeyboardInterrupt:
        err_console.print("[bold]interrupted[/]: completed rounds are saved; continue with --resume")
        raise typer.Exit(code=130) from None
    except (ValueError, FileNotFoundError, OSError, ResumeError, NotEnoughClientsError, security.SecurityError) as error:
        raise fail(str(error)) from None
    result.parameters.to_module(net)
    paths = write_outputs(out, config, net, result.history)
    final = result.history.final_accuracy
    console.print(f"[bold green]Done[/]: {len(result.history.rounds)} rounds"
                  + (f", final accuracy {100 * final:.2f}%" if final is not None else "") + f". Outputs in {out}:")
    for label, path in paths.items():
        console.print(f"  {label:<8} {path}")


def client(
    address: str = typer.Option("127.0.0.1:8080", help="Server host:port."),
    client_id: str = typer.Option(..., "--client-id", help="This client's id (as in the server's allow-list)."),
    certs: Optional[Path] = typer.Option(None, help="This client's folder from `insitu keygen` (client.key, ca.pem, tls.pem, tls.key)."),
    key: Optional[Path] = typer.Option(None, help="Ed25519 signing key (default CERTS/client.key)."),
    insecure: bool = typer.Option(False, help="Plaintext connection (the server must run with --insecure)."),
    dataset: str = typer.Option("digits", help="Named dataset to take a partition of."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with the IDX files."),
    partition_id: int = typer.Option(0, help="Which partition of the dataset this client holds."),
    num_partitions: int = typer.Option(3, help="Into how many partitions the dataset is split."),
    partition: str = typer.Option("iid", help="iid | dirichlet | shards | quantity (same on every client)."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration."),
    partition_seed: int = typer.Option(0, help="Seed of the partition (same on every client)."),
    csv: Optional[Path] = typer.Option(None, help="Train on this CSV file instead of a named dataset."),
    label_column: str = typer.Option("label", help="CSV column holding the class label."),
    num_classes: Optional[int] = typer.Option(None, help="Classes in the CSV labels (default: largest label + 1; set it on every party)."),
    model: Optional[str] = typer.Option(None, help="Architecture (must match the server's); default per dataset."),
    train_limit: int = typer.Option(0, help="Use only the first N examples of the dataset before partitioning."),
    give_up_after: float = typer.Option(600.0, help="Stop if the server is unreachable this long (seconds)."),
    state_dir: Optional[Path] = typer.Option(None, help="Where this client keeps state between rounds (SCAFFOLD's control variate); default .insitu-client/CLIENT_ID."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Log progress."),
) -> None:
    """Join a federation with this machine's own data and train when the server asks."""
    from insitu.client.state import DiskState
    from insitu.client.torch_client import TorchClient
    from insitu.data import load_dataset
    from insitu.data import partition as split
    from insitu.data.tabular import load_csv
    from insitu.models import build_model
    from insitu.net import security
    from insitu.net.client import ClientTLS, ConnectionRefused, connect

    setup_logging(verbose)
    try:
        if csv is not None:
            train, test, indices, test_indices = load_csv(csv, label_column, num_classes), None, None, None
            name = model or "mlp"
        else:
            train = load_dataset(dataset, "train", data_dir)
            if train_limit:
                train = train.subset(np.arange(min(train_limit, len(train))))
            test = load_dataset(dataset, "test", data_dir)
            if not 0 <= partition_id < num_partitions:
                raise ValueError(f"--partition-id must be in 0..{num_partitions - 1}, got {partition_id}")
            parts = split(train.labels_numpy(), num_partitions, partition, seed=partition_seed, alpha=alpha)
            test_parts = split(test.labels_numpy(), num_partitions, partition, seed=partition_seed + 1, alpha=alpha)
            indices, test_indices = parts[partition_id], test_parts[partition_id]
            name = model or resolve_config(None, {"dataset": dataset}).model
        torch.manual_seed(0)
        net = build_model(name, train.input_shape, train.num_classes)
        state = DiskState(state_dir or Path(".insitu-client") / client_id)
        local = TorchClient(net, train, test, train_indices=indices, test_indices=test_indices, state=state)
        tls = None
        if certs is not None and not insecure:
            files = security.ClientFiles.in_dir(certs)
            tls = ClientTLS(files.ca_cert, files.tls_cert, files.tls_key)
            key = key or files.signing_key
        elif not insecure:
            raise ValueError("give this client's --certs folder (from `insitu keygen`), or --insecure")
        size = len(indices) if indices is not None else len(train)
        console.print(f"[bold]insitu client[/] {client_id}: {size} training examples, {name}, connecting to {address}")
        tasks = connect(local, address, client_id=client_id, signing_key=key, tls=tls, give_up_after_s=give_up_after)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(code=130) from None
    except ConnectionRefused as error:
        raise fail(str(error)) from None
    except (ValueError, FileNotFoundError, TimeoutError, security.SecurityError) as error:
        raise fail(str(error)) from None
    console.print(f"Done: {tasks} tasks completed.")
