"""Deployment commands: ``insitu keygen``, ``insitu server``, ``insitu client``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer

from insitu.cli.common import (
    DASHBOARD_HOST_OPTION,
    DASHBOARD_PORT_OPTION,
    MLFLOW_OPTION,
    MLFLOW_URI_OPTION,
    TENSORBOARD_OPTION,
    console,
    err_console,
    fail,
    setup_logging,
)
from insitu.cli.outputs import write_outputs
from insitu.cli.presets import load_settings_file, resolve_config
from insitu.cli.progress import RoundPrinter
from insitu.config import canonical_keys, from_mapping
from insitu.config.cli import with_settings
from insitu.dashboard.cli import run_dashboard
from insitu.net.client import ClientSettings
from insitu.net.server import ServerSettings
from insitu.simulation import SimulationConfig


def keygen(
    out: Path = typer.Option(Path("federation"), "--out", "-o", help="Folder to create the files in."),
    clients: int = typer.Option(3, help="Number of clients (ids 0 .. N-1) unless --client-id is given."),
    client_id: list[str] | None = typer.Option(None, "--client-id", help="Explicit client id (repeatable)."),
    host: list[str] | None = typer.Option(None, "--host", help="Server DNS name or IP for its certificate (repeatable; default localhost, 127.0.0.1)."),
    days: int = typer.Option(365, help="Certificate validity in days."),
    mutual_tls: bool = typer.Option(True, "--mtls/--no-mtls", help="Also issue client TLS certificates."),
    overwrite: bool = typer.Option(False, help="Replace existing files (with --add-client: re-key that client)."),
    add_client: list[str] | None = typer.Option(None, "--add-client", help="Add this client id to the existing federation in --out (repeatable): signs its certificate with the federation's CA key and appends it to the allow-list; a running server admits it without a restart."),
    ca_key: Path | None = typer.Option(None, "--ca-key", help="With --add-client: the CA key, if you moved it out of OUT/keep-offline/ca.key."),
) -> None:
    """Create a CA, the server's TLS certificate, one signing key per client and the allow-list;
    or, with --add-client, add clients to an existing federation."""
    from insitu.net import security

    if add_client:
        try:
            added = [security.add_client(out, cid, days=days, mutual_tls=mutual_tls, overwrite=overwrite, ca_key=ca_key)
                     for cid in add_client]
        except (ValueError, FileExistsError, FileNotFoundError, security.SecurityError) as error:
            raise fail(str(error)) from None
        for cid, paths in zip(add_client, added):
            console.print(f"Added client {cid} to {out / security.ALLOW_LIST}: hand over the folder {paths.dir}")
        console.print("A running server admits the new clients without a restart (it re-reads the allow-list).")
        _warn_ca_key(ca_key or security.ca_key_path(out))
        return
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
    _warn_ca_key(files.ca_key)


def _warn_ca_key(path: Path) -> None:
    console.print(f"[bold yellow]Keep {path} offline[/]: the CA private key is needed only to add clients "
                  "(`insitu keygen --add-client`); the server never reads it, and whoever holds it can mint "
                  "certificates its clients and server trust. Move it off the server (to a vault or an offline "
                  "disk) and bring it back, or pass --ca-key, when adding a client.")


# The SimulationConfig settings a deployed server honours (the strategy, what it sends clients, its own test
# set); the others describe simulated clients (partitions, attacks, the systems model) and have no flag here.
DEPLOYED_SETTINGS = (
    "dataset", "data_dir", "model", "rounds", "num_clients", "min_fit_clients", "fraction_fit", "fraction_evaluate",
    "local_epochs", "batch_size", "lr", "momentum", "optimizer", "lr_schedule", "lr_decay", "lr_step_every", "seed",
    "strategy", "mu", "server_optimizer", "server_lr", "server_momentum", "tau", "aggregator", "aggregator_options",
    "byzantine_f", "trim_fraction", "clip_norm", "screen", "dp_clip", "dp_noise", "dp_delta", "dp_target_epsilon",
    "dp_adaptive_clip", "dp_accountant", "dp_record_client_metrics", "dp_mode", "dp_min_contributors",
    "secure_aggregation", "secagg_bound", "test_limit",
    "mode", "concurrency", "buffer_size", "staleness_exponent", "max_staleness",
    "data", "data_format", "test_data", "label_column", "feature_columns", "exclude_columns", "classes", "image_size",
    "image_mode", "normalize", "x_key", "y_key",
)
# How a simulation ran its clients (not what it computed): a run's config.json holds them, and a server ignores them.
EXECUTION_SETTINGS = ("engine", "workers", "ray_address", "cohort_batching", "device")
SERVER_ALIASES = {"num_clients": ("--min-clients",)}
SERVER_HELP = {
    "dataset": "Dataset whose test split the server evaluates on (and whose shape sets the model).",
    "num_clients": "Clients that must be connected before a round starts.",
    "min_fit_clients": "Fewest results for a round to count (default: --min-clients; under central DP 1, the only "
                       "valid value).",
    "fraction_fit": "Fraction of connected clients sampled per round.",
    "local_epochs": "Local epochs sent to clients.",
    "seed": "Seed for the initial model, sampling and client shuffles (DP noise and sampling always use OS entropy).",
    "test_limit": "Evaluate on the first N test examples only (0 = all).",
    "data": "Evaluate on your own data (its test split: train/ and test/ subfolders, a 'split' column or --test-data; "
            "else all of it); its shape and classes set the model, and clients must have the same classes.",
    "label_column": "Column holding the class label (--data and --csv tables).",
}


@with_settings(ServerSettings, param="server_settings")
@with_settings(SimulationConfig, include=DEPLOYED_SETTINGS, aliases=SERVER_ALIASES, help=SERVER_HELP)
def server(
    settings: dict[str, Any],
    server_settings: dict[str, Any],
    config_file: Path | None = typer.Option(None, "--config", "-c", help="Settings file (flags override it): "
                                            "simulation keys as for simulate, server keys under \\[server]."),
    csv: Path | None = typer.Option(None, help="Evaluate on this CSV test file (clients train on their own CSVs)."),
    num_classes: int | None = typer.Option(None, help="Classes in the CSV labels (default: largest label + 1; set it on every party)."),
    certs: Path | None = typer.Option(None, help="Folder from `insitu keygen` (server.pem, server.key, ca.pem, allowed_clients.json)."),
    allow: Path | None = typer.Option(None, help="Allow-list of client keys (default: CERTS/allowed_clients.json)."),
    mtls: bool = typer.Option(True, "--mtls/--no-mtls", help="With --certs: require client TLS certificates."),
    max_update_mb: int | None = typer.Option(None, help="Largest accepted update, in MiB (instead of --max-update-bytes)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Where history, model and plot go."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Log client events."),
    dashboard: bool = typer.Option(False, "--dashboard", help="Serve a live dashboard: rounds, connected clients, "
                                   "tasks in flight, drops and rejections with reasons (pip install "
                                   "'insitu[dashboard]'); its address is printed."),
    dashboard_port: int = DASHBOARD_PORT_OPTION,
    dashboard_host: str = DASHBOARD_HOST_OPTION,
    tensorboard: Path | None = TENSORBOARD_OPTION,
    mlflow: bool = MLFLOW_OPTION,
    mlflow_uri: str | None = MLFLOW_URI_OPTION,
) -> None:
    """Run a federation server: wait for clients, run the rounds, persist each one.

    Settings: defaults (shown) < the dataset's preset < --config file < flags.
    """
    from insitu.data import load_dataset
    from insitu.data.tabular import load_csv
    from insitu.engines import NotEnoughClientsError
    from insitu.models import build_model
    from insitu.net import security
    from insitu.net.server import ResumeError, ServerTLS, serve
    from insitu.params import Parameters
    from insitu.run.fedbuff import check_async_strategy
    from insitu.simulation import central_evaluator, make_fedbuff, make_strategy

    setup_logging(verbose)
    try:
        file_values, file_server = _read_server_file(config_file) if config_file else ({}, {})
        config = resolve_config(config_file, settings, file_values)
        _refuse_simulation_only(config_file, file_values, config.dataset)
        if "min_fit_clients" not in {**file_values, **settings}:  # every client; under central DP 1 (every
            config.min_fit_clients = 1 if config.dp_clip > 0 else config.num_clients  # sampled round is released)
        config.validate()
        data_config, data_info = None, None
        if config.data and csv is not None:
            raise ValueError("give --data or --csv, not both (--data FILE.csv reads a CSV too)")
        if config.data:  # the server's own data: its test split, else all of it, is what it evaluates on
            from insitu.data.files import DataSpec, load_data
            from insitu.data.files.agreement import agreement_config

            loaded = load_data(config.data, DataSpec.from_settings(config), role="test")
            test, data_config = loaded.test, agreement_config(loaded.classes, loaded.test.input_shape)
            data_info = loaded.describe()
        elif csv is not None:
            test = load_csv(csv, config.label_column, num_classes)
        else:
            test = load_dataset(config.dataset, "test", config.data_dir)
        if config.test_limit:
            test = test.subset(np.arange(min(config.test_limit, len(test))))
        torch.manual_seed(config.seed)
        net = build_model(config.model, test.input_shape, test.num_classes)
        strategy = make_strategy(config, central_evaluator(net, test), remote=True, data_config=data_config)
        fedbuff = make_fedbuff(config)  # None: synchronous rounds
        if fedbuff is not None:
            check_async_strategy(strategy, Parameters.from_module(net))
        tls, allow_list = None, None
        if certs is not None:
            tls = ServerTLS(certs / "server.pem", certs / "server.key", certs / "ca.pem" if mtls else None)
            allow = allow or certs / "allowed_clients.json"
        if allow is not None:  # re-read when it changes: `insitu keygen --add-client` needs no restart
            allow_list = security.ReloadingAllowList(allow)
            if len(allow_list) < config.num_clients:
                raise ValueError(f"--min-clients is {config.num_clients} but the allow-list {allow} admits only "
                                 f"{len(allow_list)} clients, so no round could ever start: lower --min-clients or "
                                 f"add clients with `insitu keygen --out DIR --add-client ID`")
        out = output_dir or Path("insitu-runs") / "server"
        out.mkdir(parents=True, exist_ok=True)
        settings_file = str(config_file) + " [server]" if config_file else "server settings"
        given = {**file_server, **server_settings}
        if max_update_mb is not None:
            if "max_update_bytes" in given:
                raise ValueError("give --max-update-mb or max_update_bytes, not both")
            given["max_update_bytes"] = max_update_mb << 20
        if "heartbeat_interval_s" not in given:  # a quarter of the timeout, at most 3 s
            timeout = given.get("heartbeat_timeout_s", ServerSettings.__dataclass_fields__["heartbeat_timeout_s"].default)
            given["heartbeat_interval_s"] = min(3.0, float(timeout) / 4)
        server_config = from_mapping(ServerSettings, given, settings_file)
        server_config = replace(server_config, tls=tls, allow_list=allow_list, model=config.model,
                                store_path=server_config.store_path or out / "server.db")
        console.print(f"[bold]insitu server[/] on {server_config.address}: {config.model}, {config.rounds} rounds, "
                      f"waiting for {config.num_clients} clients; state in {server_config.store_path}")
        from insitu.report.summary import accounts_privacy

        printer = RoundPrinter(console, config.rounds, show_clock=fedbuff is not None,
                               show_epsilon=accounts_privacy(vars(config)))
        from dataclasses import asdict

        from insitu.tracking import trackers
        try:
            tracked = trackers(tensorboard=tensorboard, mlflow=mlflow, mlflow_uri=mlflow_uri, run_dir=out,
                               run_name=out.name, params=asdict(config))
        except ImportError as error:
            raise ValueError(str(error)) from None
        with run_dashboard(config, dashboard, dashboard_port, dashboard_host, mode="server") as live, tracked:
            result = serve(strategy, Parameters.from_module(net), num_rounds=config.rounds, settings=server_config,
                           seed=config.seed, on_round=tracked.also(live.also(lambda record, _p, _s: printer(record))),
                           fedbuff=fedbuff, on_start=live.watch)
            live.finish(result.history)
    except KeyboardInterrupt:
        err_console.print("[bold]interrupted[/]: completed rounds are saved; continue with --resume")
        raise typer.Exit(code=130) from None
    except (ValueError, FileNotFoundError, OSError, ResumeError, NotEnoughClientsError, security.SecurityError) as error:
        raise fail(str(error)) from None
    result.parameters.to_module(net)
    paths = write_outputs(out, config, net, result.history)
    if data_info is not None:  # --data: the classes and input shape the clients were held to
        paths["data"] = out / "data.json"
        paths["data"].write_text(json.dumps(data_info, indent=2))
    final = result.history.final_accuracy
    console.print(f"[bold green]Done[/]: {len(result.history.rounds)} rounds"
                  + (f", final accuracy {100 * final:.2f}%" if final is not None else "") + f". Outputs in {out}:")
    for label, path in paths.items():
        console.print(f"  {label:<8} {path}")
    failed = result.history.failed_rounds
    if failed:
        err_console.print(f"[bold red]{len(failed)} of {len(result.history.rounds)} round(s) failed[/]: "
                          f"{', '.join(map(str, failed))} (the reasons are in history.json and the log above)")
        raise typer.Exit(code=1)


@with_settings(ClientSettings, param="client_settings")
def client(
    client_settings: dict[str, Any],
    config_file: Path | None = typer.Option(None, "--config", "-c", help="Settings file (flags override it): "
                                            "client keys under \\[client] (else at the top level; a file "
                                            "shared with the server keeps its simulation keys under \\[simulate])."),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="Log progress."),
    flower_client: str | None = typer.Option(None, "--flower-client", help="Serve a Flower NumPyClient instead: "
                                             "MODULE:FACTORY or path/to/file.py:FACTORY, where FACTORY(client_id) "
                                             "(if it has a required parameter; the id is an int when it is a number) or "
                                             "FACTORY() returns the client. It brings its own data and model, so "
                                             "the data options and --model do not apply (docs/flower-migration.md)."),
) -> None:
    """Join a federation with this machine's own data and train when the server asks."""
    if flower_client is not None:
        _serve_flower_client(flower_client, config_file, client_settings, verbose)
        return
    from insitu.client.api import Client
    from insitu.client.state import DiskState
    from insitu.client.torch_client import TorchClient
    from insitu.data import load_dataset
    from insitu.data import partition as split
    from insitu.data.datasets import TensorDataset
    from insitu.data.tabular import load_csv
    from insitu.models import build_model
    from insitu.net import security
    from insitu.net.client import ConnectionRefused, connect

    setup_logging(verbose)
    try:
        file_values, source = _read_client_file(config_file) if config_file else ({}, "client settings")
        settings = from_mapping(ClientSettings, {**file_values, **client_settings}, source)
        settings.validate()
        client_id, csv, model, key = str(settings.client_id), settings.csv, settings.model, settings.key
        num_partitions, partition_id = settings.num_partitions, settings.partition_id
        test: TensorDataset | None
        classes: tuple[str, ...] | None = None
        if settings.data is not None:  # this machine's own files: all of it trains (an explicit test split tests)
            from insitu.data.files import DataSpec, load_data

            loaded = load_data(settings.data, DataSpec.from_settings(settings), role="train")
            train, classes, indices, test_indices = loaded.train, loaded.classes, None, None
            test = loaded.test if len(loaded.test) else None
            fallback = "mlp"
        elif csv is not None:
            train, test, indices, test_indices = load_csv(csv, settings.label_column, settings.num_classes), None, None, None
            fallback = "mlp"
        else:
            partition_id = _partition_id(partition_id, client_id, num_partitions)
            train = load_dataset(settings.dataset, "train", settings.data_dir)
            if settings.train_limit:
                train = train.subset(np.arange(min(settings.train_limit, len(train))))
            test = load_dataset(settings.dataset, "test", settings.data_dir)
            scheme, seed, alpha = settings.partition, settings.partition_seed, settings.alpha
            parts = split(train.labels_numpy(), num_partitions, scheme, seed=seed, alpha=alpha)
            test_parts = split(test.labels_numpy(), num_partitions, scheme, seed=seed + 1, alpha=alpha)
            indices, test_indices = parts[partition_id], test_parts[partition_id]
            fallback = resolve_config(None, {"dataset": settings.dataset}).model
        state = DiskState(settings.state_dir or Path(".insitu-client") / client_id)

        def build(server_model: str) -> Client:
            """The local client, built once the server has said which architecture it trains."""
            if model and server_model and model != server_model:
                raise ConnectionRefused(f"--model {model} does not match the server, which trains {server_model}: "
                                        f"drop --model (the client builds the server's model) or pass "
                                        f"--model {server_model}")
            name = server_model or model or fallback
            torch.manual_seed(0)
            try:
                net = build_model(name, train.input_shape, train.num_classes)
            except ValueError as error:
                raise ConnectionRefused(f"cannot build the server's model {name!r} for this data: {error}") from None
            console.print(f"model {name}" + (" (told by the server)" if server_model and not model else ""))
            local = TorchClient(net, train, test, train_indices=indices, test_indices=test_indices, state=state)
            if classes is None:
                return local
            from insitu.data.files.agreement import ClassCheckedClient

            return ClassCheckedClient(local, classes, train.input_shape)

        tls, key = settings.credentials()
        size = len(indices) if indices is not None else len(train)
        where = str(settings.data) if settings.data is not None else (
            f"partition {partition_id} of {num_partitions}" if csv is None else str(csv))
        if classes is not None:
            where += f"; classes {', '.join(classes)}"
        console.print(f"[bold]insitu client[/] {client_id}: {size} training examples ({where}), connecting to "
                      f"{settings.address}")
        failed: list[bool] = []
        tasks = connect(build, settings.address, client_id=client_id, signing_key=key, tls=tls,
                        give_up_after_s=settings.give_up_after_s, poll_wait_s=settings.poll_wait_s,
                        on_task=lambda ok: None if ok else failed.append(True),
                        min_noise_multiplier=settings.dp_min_noise if settings.dp_min_noise > 0 else None)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(code=130) from None
    except ConnectionRefused as error:
        raise fail(str(error)) from None
    except (ValueError, FileNotFoundError, TimeoutError, security.SecurityError) as error:
        raise fail(str(error)) from None
    _report_tasks(tasks, len(failed), "its data does not fit the server's model")


def _serve_flower_client(spec: str, config_file: Path | None, client_settings: dict[str, Any], verbose: bool) -> None:
    """``insitu client --flower-client``: serve a Flower NumPyClient (it brings its data and model)."""
    from insitu.flower import FlowerClientError
    from insitu.flower.start import serve_flower_cli
    from insitu.net import security
    from insitu.net.client import ConnectionRefused

    setup_logging(verbose)
    failed: list[bool] = []
    try:
        file_values, source = _read_client_file(config_file) if config_file else ({}, "client settings")
        given = {**file_values, **client_settings}
        settings = from_mapping(ClientSettings, given, source)
        settings.validate()
        console.print(f"[bold]insitu client[/] {settings.client_id}: Flower client {spec}, connecting to "
                      f"{settings.address}")
        tasks = serve_flower_cli(spec, settings, given, on_task=lambda ok: None if ok else failed.append(True))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(code=130) from None
    except (ConnectionRefused, ValueError, TypeError, FileNotFoundError, TimeoutError, FlowerClientError,
            security.SecurityError) as error:
        raise fail(str(error)) from None
    _report_tasks(tasks, len(failed), "its model does not fit the server's --model")


def _report_tasks(tasks: int, failed: int, likely_cause: str) -> None:
    """A client's last line; exit 1 when every task it was given failed (``likely_cause``: the usual reason)."""
    if tasks and failed == tasks:
        err_console.print(f"[bold red]error:[/] all {tasks} tasks failed on this client (the reasons are in the log "
                          f"above; e.g. {likely_cause})")
        raise typer.Exit(code=1)
    console.print(f"Done: {tasks} tasks completed" + (f", {failed} of them failed." if failed else "."))


def _read_server_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A server's settings file: (simulation settings as for simulate, the ``[server]`` table's settings),
    each with its keys checked and made canonical."""
    data = dict(load_settings_file(path))
    server_table = data.pop("server", {})
    if not isinstance(server_table, dict):
        raise ValueError(f"{path}: [server] must be a table of server settings")  # noqa: TRY004 (a user's bad file)
    simulation = data.get("simulate", data)
    if not isinstance(simulation, dict):
        raise ValueError(f"{path}: [simulate] must be a table of settings")  # noqa: TRY004 (a user's bad file)
    return (canonical_keys(SimulationConfig, simulation, source=str(path)),
            canonical_keys(ServerSettings, server_table, source=f"{path} [server]"))


def _read_client_file(path: Path) -> tuple[dict[str, Any], str]:
    """A client's settings file: its ``[client]`` table (the file may also hold a server's ``[simulate]`` and
    ``[server]`` tables, which a client ignores), or, without one, the top level; keys checked and made
    canonical. Also returns the name errors give the file (``FILE [client]``)."""
    data = load_settings_file(path)
    if "client" not in data:
        return canonical_keys(ClientSettings, data, source=str(path)), str(path)
    table, source = data["client"], f"{path} [client]"
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [client] must be a table of client settings")  # noqa: TRY004 (a user's bad file)
    return canonical_keys(ClientSettings, table, source=source), source


def _refuse_simulation_only(path: Path | None, file_values: dict[str, Any], dataset: str) -> None:
    """A settings file may hold simulation settings a server cannot honour (partitions, attacks, the systems
    model) only at the value they would have anyway, as in a run's config.json; any other value is refused."""
    baseline = resolve_config(None, {"dataset": dataset})
    changed = sorted(k for k, v in file_values.items()
                     if k not in DEPLOYED_SETTINGS and k not in EXECUTION_SETTINGS and v != getattr(baseline, k))
    if changed:
        raise ValueError(f"{path}: {', '.join(changed)} describe simulated clients, which a server does not have, "
                         "so it cannot honour them: remove them from the file (insitu server --help lists the "
                         "settings a server takes)")


def _partition_id(given: int | None, client_id: str, num_partitions: int) -> int:
    """--partition-id, or the client id when that is a number in range (so clients never share data by default)."""
    if given is None:
        if not (client_id.isdigit() and int(client_id) < num_partitions):
            raise ValueError(f"give --partition-id (0..{num_partitions - 1}): it defaults to the client id only when "
                             f"that is a number below --num-partitions ({num_partitions}), and {client_id!r} is not. "
                             "Each client needs its own partition, or they train on the same data")
        return int(client_id)
    if not 0 <= given < num_partitions:
        raise ValueError(f"--partition-id must be in 0..{num_partitions - 1}, got {given}")
    return given
