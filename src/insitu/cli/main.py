"""The ``insitu`` command line: simulate, evaluate, partition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from insitu.cli.presets import resolve_config
from insitu.cli.progress import RoundPrinter, progress_bar
from insitu.config.cli import with_settings
from insitu.dashboard.cli import run_dashboard
from insitu.simulation import SimulationConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="insitu: federated learning for PyTorch. Simulate many clients in one process, or deploy.",
)
@app.command()
@with_settings(SimulationConfig)
def simulate(
    settings: dict[str, Any],
    config_file: Path | None = typer.Option(None, "--config", "-c", help="Settings file (flags override it): TOML, "
                                            "optionally under \\[simulate], or a run's config.json."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Where to write history, model and plot."),
    show_partition: bool = typer.Option(False, help="Print the per-client label histogram before training."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
    dashboard: bool = typer.Option(False, "--dashboard", help="Serve a live dashboard of the run (needs "
                                   "pip install 'insitu[dashboard]'); its address is printed."),
    dashboard_port: int = DASHBOARD_PORT_OPTION,
    dashboard_host: str = DASHBOARD_HOST_OPTION,
    dashboard_wait: bool = typer.Option(False, "--dashboard-wait", help="With --dashboard: start the first round "
                                        "only once a browser has opened the dashboard."),
    tensorboard: Path | None = TENSORBOARD_OPTION,
    mlflow: bool = MLFLOW_OPTION,
    mlflow_uri: str | None = MLFLOW_URI_OPTION,
) -> None:
    """Run a federated simulation. With no arguments: a demo on the bundled digits dataset.

    Settings: defaults (shown) < the dataset's preset < --config file < flags.
    """
    setup_logging(verbose)
    from insitu.data import format_histogram
    from insitu.simulation import build_experiment

    try:
        config = resolve_config(config_file, settings)
        config.validate()
        experiment = build_experiment(config)
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from None

    out = output_dir or _default_output_dir()
    generated = config.dataset == "synthetic"  # each client's data is made when it is drawn
    console.print(
        f"[bold]insitu simulate[/]  {config.data or config.dataset} ({'generated per client' if generated else len(experiment.train)} "
        f"train / {len(experiment.test)} test), "
        f"{config.model}, {config.num_clients} clients "
        f"({'by ' + config.partition_by if config.partition_by else config.partition}), {config.strategy}, "
        f"{config.rounds} {'FedBuff steps' if experiment.fedbuff else 'rounds'} x {config.local_epochs} epoch(s), "
        f"batch {config.batch_size}, lr {config.lr}, seed {config.seed}"
    )
    if show_partition and generated:
        console.print("--show-partition: the synthetic dataset has no stored partition (clients are generated)")
    elif show_partition:
        console.print(format_histogram(experiment.train_parts, experiment.train.labels_numpy(), experiment.train.num_classes))

    from insitu.report.summary import accounts_privacy

    printer = RoundPrinter(console, config.rounds, show_clock=experiment.systems is not None,
                           show_epsilon=accounts_privacy(vars(config)))
    per_round = experiment.fedbuff.buffer_size if experiment.fedbuff else experiment.strategy.num_fit_clients(config.num_clients)
    from dataclasses import asdict

    from insitu.tracking import trackers
    try:
        tracked = trackers(tensorboard=tensorboard, mlflow=mlflow, mlflow_uri=mlflow_uri, run_dir=out,
                           run_name=out.name, params=asdict(config))
    except ImportError as error:
        raise fail(str(error)) from None
    with run_dashboard(config, dashboard, dashboard_port, dashboard_host, dashboard_wait) as live, tracked:
        with progress_bar(console, total=config.rounds * per_round) as bar:
            result = experiment.run(on_round=tracked.also(live.also(lambda record, _p, _s: printer(record))),
                                    engine=bar.wrap(experiment.engine()))
        live.finish(result.history)
    paths = write_outputs(out, config, experiment.model, result.history)
    if experiment.data_info is not None:  # --data: its classes and, with --partition-by, client -> group
        paths["data"] = out / "data.json"
        paths["data"].write_text(json.dumps(experiment.data_info, indent=2))
    final = result.history.final_accuracy
    summary = f"final accuracy {100 * final:.2f}%" if final is not None else "no accuracy recorded"
    console.print(f"[bold green]Done[/]: {summary}. Outputs in [bold]{out}[/]:")
    for label, path in paths.items():
        console.print(f"  {label:<8} {path}")
    failed = result.history.failed_rounds
    if failed:
        err_console.print(f"[bold red]{len(failed)} round(s) failed[/]: {', '.join(map(str, failed))} (see history.json and the log above)")
        raise typer.Exit(code=1)


@app.command()
def evaluate(
    model_path: Path = typer.Argument(..., help="A saved state_dict (e.g. model.pt written by simulate)."),
    dataset: str = typer.Option("digits", help="Dataset whose test split to score on."),
    data_dir: str | None = typer.Option(None, help="Folder with the MNIST/Fashion-MNIST IDX files."),
    data: Path | None = typer.Option(None, "--data", help="Score on your own files instead (an image folder, a "
                                     ".csv/.parquet/.npz file or a Hugging Face folder: docs/data.md), default "
                                     "options; give the run's --config to read them as the run did."),
    run_config: Path | None = typer.Option(None, "--config", "-c", help="A run's config.json: score on that run's "
                                           "data, read and preprocessed as the run did (dataset or --data with its "
                                           "options, test split, model)."),
    model: str | None = typer.Option(None, help="Architecture; inferred from the saved keys if omitted."),
    split: str = typer.Option("test", help="test | train."),
) -> None:
    """Report the accuracy of a saved global model on a dataset's test set."""
    from insitu.cli.outputs import infer_model_name, load_state_dict
    from insitu.client.torch_client import evaluate_model
    from insitu.data import TensorDataset, load_dataset
    from insitu.data.files import DataSpec, load_data
    from insitu.models import build_model

    try:
        if split not in ("test", "train"):
            raise ValueError(f"--split must be test or train, got {split!r}")
        state = load_state_dict(model_path)
        settings = resolve_config(run_config, {}) if run_config is not None else None
        files = data or (Path(settings.data) if settings is not None and settings.data else None)
        scored: TensorDataset
        if files is not None:
            loaded = load_data(files, DataSpec.from_settings(settings) if settings is not None else DataSpec())
            scored, where = (loaded.test if split == "test" else loaded.train), str(files)
            if len(scored) == 0:
                raise ValueError(f"{files} has no {split} rows (no test/ folder, 'split' column or held-out share): "
                                 "pass --split train, or give the run's --config")
        else:
            if settings is not None:
                dataset, data_dir = settings.dataset, settings.data_dir or data_dir
            scored, where = load_dataset(dataset, split, data_dir), dataset
        name = model or (settings.model if settings is not None else None) or infer_model_name(state)
        net = build_model(name, scored.input_shape, scored.num_classes)
        net.load_state_dict(state)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise fail(str(error)) from None
    loss, accuracy, n = evaluate_model(net, scored)
    console.print(f"{model_path}: {name} on {where} {split} ({n} examples): accuracy {100 * accuracy:.2f}%  loss {loss:.4f}")


@app.command("partition")
def show_partition(
    dataset: str = typer.Option("digits", help="Dataset to split."),
    data_dir: str | None = typer.Option(None, help="Folder with the MNIST/Fashion-MNIST IDX files."),
    scheme: str = typer.Option("iid", "--partition", help="iid | dirichlet | shards | quantity."),
    clients: int = typer.Option(10, help="Number of clients."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration."),
    shards_per_client: int = typer.Option(2, help="Shards per client."),
    seed: int = typer.Option(0, help="Seed."),
    max_rows: int = typer.Option(20, help="Rows shown before eliding the middle."),
) -> None:
    """Print the per-client label histogram of a partition, and its skew (0 = IID)."""
    from insitu.data import format_histogram, load_dataset, partition, skew_score

    try:
        data = load_dataset(dataset, "train", data_dir)
        labels = data.labels_numpy()
        parts = partition(labels, clients, scheme, seed=seed, alpha=alpha, shards_per_client=shards_per_client)
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from None
    console.print(format_histogram(parts, labels, data.num_classes, max_rows=max_rows))
    console.print(f"label skew (mean total-variation distance to the global mix): {skew_score(parts, labels, data.num_classes):.3f}")


from insitu.cli import deploy

app.command("keygen")(deploy.keygen)
app.command("server")(deploy.server)
app.command("client")(deploy.client)

from insitu.cli import experiment as experiment_cli

app.command("experiment")(experiment_cli.experiment)


from insitu.dashboard.cli import dashboard as dashboard_command
from insitu.report.cli import report as report_command

app.command("dashboard")(dashboard_command)
app.command("report")(report_command)


def _default_output_dir() -> Path:
    from datetime import datetime

    return Path("insitu-runs") / datetime.now().strftime("simulate-%Y%m%d-%H%M%S")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
