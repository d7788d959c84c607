"""The ``insitu`` command line: simulate, evaluate, partition."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from insitu.cli.common import console, err_console, fail, setup_logging
from insitu.cli.outputs import write_outputs
from insitu.cli.presets import resolve_config
from insitu.cli.progress import RoundPrinter, progress_bar

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="insitu: federated learning for PyTorch. Simulate many clients in one process, or deploy.",
)
@app.command()
def simulate(
    config_file: Path | None = typer.Option(None, "--config", "-c", help="TOML file of settings (flags override it)."),
    dataset: str | None = typer.Option(None, help="digits | breast-cancer | mnist | fashion-mnist."),
    data_dir: str | None = typer.Option(None, help="Folder with the MNIST/Fashion-MNIST IDX files."),
    partition: str | None = typer.Option(None, help="iid | dirichlet | shards | quantity."),
    alpha: float | None = typer.Option(None, help="Dirichlet concentration (dirichlet, quantity); smaller = more skew."),
    shards_per_client: int | None = typer.Option(None, help="Shards per client (shards partition)."),
    clients: int | None = typer.Option(None, "--clients", help="Number of virtual clients."),
    fraction: float | None = typer.Option(None, "--fraction", help="Fraction of clients sampled each round."),
    min_fit_clients: int | None = typer.Option(None, help="Fewest usable results for a round to count."),
    fraction_evaluate: float | None = typer.Option(None, help="Fraction of clients that evaluate on their local test shard (0 = off)."),
    rounds: int | None = typer.Option(None, help="Number of federated rounds."),
    local_epochs: int | None = typer.Option(None, help="Local epochs per round."),
    batch_size: int | None = typer.Option(None, help="Local batch size (0 = full batch)."),
    lr: float | None = typer.Option(None, help="Client learning rate."),
    momentum: float | None = typer.Option(None, help="Client SGD momentum."),
    optimizer: str | None = typer.Option(None, help="sgd | adam."),
    model: str | None = typer.Option(None, help="simple-cnn | 2nn | logreg | mlp."),
    strategy: str | None = typer.Option(None, help="fedavg | fedsgd | fedprox | scaffold | fedavgm | fedadam | fedyogi | fedadagrad."),
    mu: float | None = typer.Option(None, help="FedProx proximal weight mu (>= 0)."),
    server_optimizer: str | None = typer.Option(None, help="Override the server optimizer: sgd | fedavgm | fedadam | fedyogi | fedadagrad."),
    server_lr: float | None = typer.Option(None, help="Server learning rate (0 = the optimizer's default)."),
    lr_schedule: str | None = typer.Option(None, help="Client lr over rounds: constant | exponential | step | cosine."),
    lr_decay: float | None = typer.Option(None, help="Decay factor of the exponential/step schedules."),
    aggregator: str | None = typer.Option(None, help="mean | median | trimmed_mean | krum | multi_krum | bulyan."),
    byzantine_f: int | None = typer.Option(None, help="Attackers Krum/Multi-Krum/Bulyan must tolerate."),
    trim_fraction: float | None = typer.Option(None, help="Trimmed mean: share cut at each end (< 0.5)."),
    clip_norm: float | None = typer.Option(None, help="Bound each update's L2 norm (0 = off)."),
    screen: bool | None = typer.Option(None, "--screen/--no-screen", help="Drop non-finite and outsized updates."),
    attack: str | None = typer.Option(None, help="Simulated attack: none | sign_flip | scaling | gaussian | label_flip | backdoor."),
    attack_fraction: float | None = typer.Option(None, help="Share of malicious clients, in [0, 1)."),
    dp_clip: float | None = typer.Option(None, help="Central DP (DP-FedAvg): clip each client's update to this L2 norm (0 = off)."),
    dp_noise: float | None = typer.Option(None, help="Central DP noise multiplier z (noise std z x clip on the sum)."),
    dp_target_epsilon: float | None = typer.Option(None, help="Stop before a round that would exceed this epsilon."),
    dp_mode: str | None = typer.Option(None, help="central: the server noises the sum | distributed: each client adds a Skellam noise share before secure aggregation (needs --secure-aggregation)."),
    dp_delta: float | None = typer.Option(None, help="Central DP delta (default 1e-5)."),
    dp_adaptive_clip: bool | None = typer.Option(None, "--dp-adaptive-clip/--no-dp-adaptive-clip", help="Adapt the clip norm to the median update norm."),
    secure_aggregation: bool | None = typer.Option(None, "--secure-aggregation/--no-secure-aggregation", help="Sum each round through the SecAgg protocol (simulated parties)."),
    secagg_dropout: float | None = typer.Option(None, help="With --secure-aggregation: share of clients dropping after their masked input."),
    eval_every: int | None = typer.Option(None, help="Evaluate on the test set every k rounds (and the last)."),
    stop_at_accuracy: float | None = typer.Option(None, help="Stop once test accuracy reaches this (0 = never)."),
    seed: int | None = typer.Option(None, help="Seed for partitioning, sampling and training."),
    train_limit: int | None = typer.Option(None, help="Use only the first N training examples (quick tries)."),
    test_limit: int | None = typer.Option(None, help="Use only the first N test examples."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Where to write history, model and plot."),
    show_partition: bool = typer.Option(False, help="Print the per-client label histogram before training."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
) -> None:
    """Run a federated simulation. With no arguments: a demo on the bundled digits dataset."""
    setup_logging(verbose)
    flags: dict[str, Any] = {
        "dataset": dataset, "data_dir": data_dir, "partition": partition, "alpha": alpha,
        "shards_per_client": shards_per_client, "num_clients": clients, "fraction_fit": fraction,
        "min_fit_clients": min_fit_clients, "fraction_evaluate": fraction_evaluate, "rounds": rounds,
        "local_epochs": local_epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "optimizer": optimizer, "model": model, "strategy": strategy, "seed": seed, "mu": mu,
        "server_optimizer": server_optimizer, "server_lr": server_lr, "lr_schedule": lr_schedule,
        "lr_decay": lr_decay, "aggregator": aggregator, "byzantine_f": byzantine_f,
        "trim_fraction": trim_fraction, "clip_norm": clip_norm, "screen": screen, "attack": attack,
        "attack_fraction": attack_fraction, "eval_every": eval_every, "stop_at_accuracy": stop_at_accuracy,
        "dp_clip": dp_clip, "dp_noise": dp_noise, "dp_target_epsilon": dp_target_epsilon, "dp_mode": dp_mode, "dp_delta": dp_delta,
        "dp_adaptive_clip": dp_adaptive_clip, "secure_aggregation": secure_aggregation, "secagg_dropout": secagg_dropout,
        "train_limit": train_limit, "test_limit": test_limit,
    }
    from insitu.data import format_histogram
    from insitu.engines import InProcessPool
    from insitu.simulation import build_experiment
    from insitu.simulation import simulate as run_rounds

    try:
        config = resolve_config(config_file, {k: v for k, v in flags.items() if v is not None})
        config.validate()
        experiment = build_experiment(config)
    except (ValueError, FileNotFoundError) as error:
        raise fail(str(error)) from None

    out = output_dir or _default_output_dir()
    console.print(
        f"[bold]insitu simulate[/]  {config.dataset} ({len(experiment.train)} train / {len(experiment.test)} test), "
        f"{config.model}, {config.num_clients} clients ({config.partition}), {config.strategy}, "
        f"{config.rounds} rounds x {config.local_epochs} epoch(s), batch {config.batch_size}, lr {config.lr}, seed {config.seed}"
    )
    if show_partition:
        console.print(format_histogram(experiment.train_parts, experiment.train.labels_numpy(), experiment.train.num_classes))

    printer = RoundPrinter(console, config.rounds)
    per_round = experiment.strategy.num_fit_clients(config.num_clients)
    with progress_bar(console, total=config.rounds * per_round) as bar:
        pool = bar.wrap(InProcessPool(experiment.client_fn, config.num_clients))
        result = run_rounds(
            experiment.client_fn, num_clients=config.num_clients, strategy=experiment.strategy,
            num_rounds=config.rounds, initial_parameters=experiment.initial_parameters, seed=config.seed,
            on_round=lambda record, _p, _s: printer(record), pool=pool,
        )
    result.parameters.to_module(experiment.model)
    paths = write_outputs(out, config, experiment.model, result.history)
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
    model: str | None = typer.Option(None, help="Architecture; inferred from the saved keys if omitted."),
    split: str = typer.Option("test", help="test | train."),
) -> None:
    """Report the accuracy of a saved global model on a dataset's test set."""
    from insitu.cli.outputs import infer_model_name, load_state_dict
    from insitu.client.torch_client import evaluate_model
    from insitu.data import load_dataset
    from insitu.models import build_model

    try:
        state = load_state_dict(model_path)
        name = model or infer_model_name(state)
        data = load_dataset(dataset, split, data_dir)
        net = build_model(name, data.input_shape, data.num_classes)
        net.load_state_dict(state)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise fail(str(error)) from None
    loss, accuracy, n = evaluate_model(net, data)
    console.print(f"{model_path}: {name} on {dataset} {split} ({n} examples): accuracy {100 * accuracy:.2f}%  loss {loss:.4f}")


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


def _default_output_dir() -> Path:
    from datetime import datetime

    return Path("insitu-runs") / datetime.now().strftime("simulate-%Y%m%d-%H%M%S")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
