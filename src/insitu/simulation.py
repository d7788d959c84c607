"""Simulation: many virtual clients in one process, driven by the same round loop as deployment.

``simulate`` is the Python entry point for user-written clients; ``SimulationConfig`` +
``run_simulation`` build the whole experiment (data, partition, model, clients, strategy) from plain
settings, which is what the CLI and the benchmarks use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from insitu.aggregation import aggregator_names, make_reducer
from insitu.attacks import (
    ATTACK_NAMES,
    DATA_ATTACKS,
    UPDATE_ATTACKS,
    MaliciousClient,
    Trigger,
    attack_success_rate,
    choose_malicious,
    flip_labels,
    make_update_attack,
    poison_with_backdoor,
    validate_attack,
)
from insitu.client.api import Client
from insitu.client.state import MemoryStates
from insitu.client.torch_client import OPTIMIZERS, TorchClient, TrainSettings, evaluate_model
from insitu.config import from_mapping, setting
from insitu.data import PARTITION_NAMES, TensorDataset, load_dataset, partition
from insitu.data.files import DATA_FORMATS, IMAGE_MODES, DataSpec, LoadedData, load_data
from insitu.data.synthetic import LazyParts, SyntheticFederation
from insitu.engines.base import Engine
from insitu.engines.heap import frozen_heap
from insitu.engines.inprocess import ClientFn, InProcessPool
from insitu.engines.systems import SystemsModel, epochs_times_batches
from insitu.models import MODEL_NAMES, build_model
from insitu.params import Parameters, flatten_module_
from insitu.privacy.central import CentralDP
from insitu.privacy.distributed import DistributedDP
from insitu.privacy.randomness import OSEntropy, SimulationSeed
from insitu.privacy.secure import SecureAggregation
from insitu.run.fedbuff import AsyncCoordinator, FedBuff, check_async_strategy
from insitu.run.loop import Coordinator, RoundCallback, RunResult
from insitu.strategies import (
    SCHEDULE_NAMES,
    SERVER_OPTIMIZER_NAMES,
    STRATEGY_NAMES,
    Strategy,
    fedavg,
    fedprox,
    fedsgd,
    lr_config,
    make_schedule,
    make_server_optimizer,
    scaffold,
)
from insitu.strategies.strategy import CentralEvaluator


def simulate(
    client_fn: ClientFn | Callable[[str], Any],
    *,
    num_clients: int,
    strategy: Strategy,
    num_rounds: int,
    initial_parameters: Parameters | None = None,
    seed: int = 0,
    on_round: RoundCallback | None = None,
    pool: Engine | None = None,
    stop_at_accuracy: float = 0.0,
    fedbuff: FedBuff | None = None,
) -> RunResult:
    """Run ``num_rounds`` of ``strategy`` over ``num_clients`` virtual clients made by ``client_fn``.

    ``client_fn(cid)`` is called whenever client ``cid`` ("0" .. "N-1") is needed; keep it cheap
    (share one model object, pass index lists rather than copies of the data). With
    ``stop_at_accuracy`` > 0 the run ends after the first round whose accuracy reaches it. With
    ``fedbuff`` the rounds are FedBuff's asynchronous server steps; give ``pool`` a systems model
    (``InProcessPool(client_fn, n, systems=SystemsModel(...))``) to simulate client speeds.

    A Flower-style ``client_fn`` works too (``client_fn(cid)``, or newer Flower's ``client_fn(context)``):
    one returning a ``NumPyClient`` (or its ``.to_client()``) has each client wrapped by
    :class:`insitu.flower.NumPyClientAdapter` (a ``pool`` given here needs
    ``insitu.flower.adapt_client_fn(client_fn, num_clients)``). Without ``initial_parameters`` the run starts, as
    Flower's does, from a client's ``get_parameters({})``: client "0"'s, arrays named "0", "1", ...
    """
    from insitu.flower.adapter import adapt_client_fn, is_flower_client
    from insitu.flower.adapter import initial_parameters as flower_initial

    client_fn = adapt_client_fn(client_fn, num_clients)
    if initial_parameters is None:
        first = client_fn.make("0")
        if not is_flower_client(first):
            raise ValueError("give initial_parameters (e.g. Parameters.from_module(model)): only a Flower-style "
                             "client_fn's clients can supply them (get_parameters)")
        initial_parameters = flower_initial(first)
    pool = pool if pool is not None else InProcessPool(client_fn, num_clients)
    stop_when = None
    if stop_at_accuracy > 0:
        stop_when = lambda record: (record.accuracy or 0.0) >= stop_at_accuracy
    coordinator: Coordinator | AsyncCoordinator
    if fedbuff is not None:
        coordinator = AsyncCoordinator(strategy, pool, fedbuff, num_rounds=num_rounds, seed=seed, on_round=on_round,
                                       stop_when=stop_when)
    else:
        coordinator = Coordinator(strategy, pool, num_rounds=num_rounds, seed=seed, on_round=on_round,
                                  stop_when=stop_when)
    try:
        with frozen_heap():  # no full-heap GC pauses in the middle of rounds
            return coordinator.run(initial_parameters)
    finally:
        pool.close()


def central_evaluator(model: nn.Module, test: TensorDataset, batch_size: int = 1024, *, every: int = 1,
                      last_round: int = 0, backdoor: tuple[Trigger, int] | None = None,
                      device: str | torch.device = "cpu") -> CentralEvaluator:
    """An ``evaluate_fn`` that loads the global parameters into ``model`` and scores it on ``test``.

    With ``every`` = k it scores rounds 0, k, 2k, ... and ``last_round`` only (long runs spend
    less time evaluating). ``backdoor`` = (trigger, target) adds the backdoor's attack success rate.
    """
    if every < 1:
        raise ValueError(f"eval_every must be >= 1, got {every}")

    def evaluate(server_round: int, parameters: Parameters) -> tuple[float, dict[str, float]] | None:
        if server_round % every and server_round != last_round:
            return None
        parameters.to_module(model)
        loss, accuracy, _ = evaluate_model(model, test, batch_size=batch_size, device=device)
        metrics = {"accuracy": accuracy}
        if backdoor is not None:
            metrics["attack_success_rate"] = attack_success_rate(model, test, backdoor[0], backdoor[1], batch_size,
                                                                 device)
        return loss, metrics

    return evaluate


@dataclass
class SimulationConfig:
    """Every setting of a simulated experiment, declared once: ``insitu simulate``'s flags, the TOML keys
    and ``config.json`` are generated from these fields (``insitu.config``)."""

    # -- data and federation --
    dataset: str = setting("digits", section="data", help="Dataset: digits, breast-cancer (bundled), mnist, "
                           "fashion-mnist (IDX files in --data-dir), synthetic (LEAF's synthetic(alpha, beta), "
                           "generated per client: any number of clients; --partition does not apply).")
    data_dir: str | None = setting(None, section="data", help="Folder with the MNIST/Fashion-MNIST IDX files "
                                   "(default $INSITU_DATA_DIR, else ~/.insitu/data).")
    data: str = setting("", section="data", help="Your own data instead of --dataset: a folder of images (one "
                        "subfolder per class), a .csv, .parquet or .npz file, or a Hugging Face save_to_disk folder "
                        "(docs/data.md).")
    data_format: str = setting("", section="data", choices=("", *DATA_FORMATS), help="Format of --data (default: "
                               "from the file's suffix or the folder's layout).")
    test_data: str = setting("", section="data", help="--data: a separate test file or folder in the same format "
                             "(else train/ and test/ subfolders, a 'split' column, or --test-fraction).")
    test_fraction: float = setting(0.2, section="data", help="--data without an explicit test split: the stratified "
                                   "share held out for testing (seeded by --split-seed).")
    split_seed: int = setting(0, section="data", help="--data: seed of the held-out test split (independent of "
                              "--seed, so every run tests on the same rows).")
    label_column: str = setting("label", section="data", help="--data tables and Hugging Face folders: the column "
                                "holding the class label.")
    feature_columns: str = setting("", section="data", help="--data tables: the feature columns, comma-separated "
                                   "(default: every numeric column but the label, group and split ones).")
    exclude_columns: str = setting("", section="data", help="--data tables: columns to leave out of the features, "
                                   "comma-separated (ids, free text, categorical columns).")
    partition_by: str = setting("", section="data", help="--data: one client per value of this column (image "
                                "folders: 'folder', ROOT/<group>/<class>/image), clients in sorted value order; "
                                "--num-clients must equal the number of groups. Replaces --partition.")
    classes: str = setting("", section="data", help="--data: the class names in label order, comma-separated "
                           "(default: sorted names; integer labels keep their value).")
    image_size: str = setting("", section="data", help="--data images: resize to SIZE or HEIGHTxWIDTH (default: "
                              "keep; then every image must have the same size).")
    image_mode: str = setting("", section="data", choices=IMAGE_MODES, help="--data images: grayscale or rgb "
                              "(default: grayscale when every image is, else rgb).")
    normalize: str = setting("auto", section="data", help="--data: auto (mean/std of the training rows, per channel "
                             "or feature), none, or MEAN[,MEAN..]/STD[,STD..].")
    x_key: str = setting("x", section="data", help="--data .npz: the inputs' array (x_test: the test split's).")
    y_key: str = setting("y", section="data", help="--data .npz: the labels' array (y_test: the test split's).")
    partition: str = setting("iid", section="data", choices=PARTITION_NAMES, help="How the training set is split "
                             "over clients.")
    alpha: float = setting(0.5, section="data", help="Dirichlet concentration (dirichlet, quantity); smaller = more "
                           "skew.")
    shards_per_client: int = setting(2, section="data", help="Shards per client (shards partition).")
    synthetic_alpha: float = setting(1.0, section="data", help="synthetic: how much the clients' models differ "
                                     "(u_k ~ N(0, alpha), Li et al. 2020).")
    synthetic_beta: float = setting(1.0, section="data", help="synthetic: how much the clients' inputs differ "
                                    "(B_k ~ N(0, beta)).")
    synthetic_max_examples: int = setting(1000, section="data", help="synthetic: cap on a client's examples "
                                          "(floor(LogNormal(4, 2)) + 50; 0 = uncapped).")
    synthetic_test_clients: int = setting(100, section="data", help="synthetic: the central test set pools the "
                                          "held-out examples of this many (seeded) clients.")
    num_clients: int = setting(10, section="data", aliases=("--clients",), help="Number of virtual clients.")
    fraction_fit: float = setting(1.0, section="strategy", aliases=("--fraction",), help="Fraction of clients "
                                  "sampled each round.")
    min_fit_clients: int = setting(1, section="strategy", help="Fewest usable results for a round to count.")
    fraction_evaluate: float = setting(0.0, section="strategy", help="Fraction of clients that evaluate on their "
                                       "local test shard (0 = off).")
    rounds: int = setting(5, section="run", help="Number of federated rounds (FedBuff: server steps).")
    # -- client training --
    local_epochs: int = setting(1, section="training", help="Local epochs per round.")
    batch_size: int = setting(32, section="training", help="Local batch size (0 = full batch).")
    lr: float = setting(0.01, section="training", help="Client learning rate.")
    momentum: float = setting(0.0, section="training", help="Client SGD momentum.")
    optimizer: str = setting("sgd", section="training", choices=OPTIMIZERS, help="Client optimizer.")
    model: str = setting("2nn", section="training", choices=MODEL_NAMES, help="Model architecture.")
    device: str = setting("cpu", section="training", help="cpu, cuda, cuda:N or mps; the data is moved to the "
                          "device once")
    # -- strategy and server optimizer --
    strategy: str = setting("fedavg", section="strategy", choices=STRATEGY_NAMES, help="Federated algorithm.")
    mu: float = setting(0.01, section="strategy", help="FedProx's proximal weight mu (>= 0).")
    server_optimizer: str = setting("", section="strategy", choices=lambda: ("", *SERVER_OPTIMIZER_NAMES),
                                    help="Override the strategy's server optimizer ('' = the strategy's own: sgd, or "
                                    "the one fedavgm/fedadam/... names).")
    server_lr: float = setting(0.0, section="strategy", help="Server learning rate (0 = the server optimizer's "
                               "default: 1.0 for sgd/fedavgm, 0.1 adaptive).")
    server_momentum: float = setting(0.9, section="strategy", help="Server momentum (fedavgm; beta1 of the adaptive "
                                     "server optimizers).")
    tau: float = setting(1e-3, section="strategy", help="Adaptive server optimizers' epsilon (Reddi et al. 2021).")
    lr_schedule: str = setting("constant", section="training", choices=SCHEDULE_NAMES, help="Client learning rate "
                               "over rounds.")
    lr_decay: float = setting(0.99, section="training", help="Schedule factor: exponential: lr x decay^(round-1); "
                              "step: x decay every --lr-step-every rounds.")
    lr_step_every: int = setting(10, section="training", help="Rounds between the step schedule's decays.")
    # -- aggregation --
    aggregator: str = setting("mean", section="aggregation", choices=aggregator_names,
                              help="How client updates are combined.")
    aggregator_options: dict[str, float | int | str | bool] = setting(
        section="aggregation", aliases=("--aggregator-option",), default_factory=dict,
        help="Aggregator-specific settings by name (TOML: an [aggregator_options] table).")
    byzantine_f: int = setting(0, section="aggregation", help="Attackers Krum/Multi-Krum/Bulyan must tolerate.")
    trim_fraction: float = setting(0.1, section="aggregation", help="Trimmed mean: share cut at each end (< 0.5).")
    clip_norm: float = setting(0.0, section="aggregation", help="Bound every update's L2 norm (0 = off).")
    screen: bool = setting(False, section="aggregation", help="Drop non-finite and outsized updates before "
                           "aggregating.")
    # -- simulated attacks --
    attack: str = setting("none", section="attack", choices=ATTACK_NAMES, help="Simulated attack.")
    attack_fraction: float = setting(0.0, section="attack", help="Share of malicious clients, in [0, 1) (ignored "
                                     "when --attack is none).")
    attack_scale: float = setting(10.0, section="attack", help="sign_flip and scaling attacks' strength.")
    attack_std: float = setting(1.0, section="attack", help="gaussian attack's noise std.")
    backdoor_target: int = setting(0, section="attack", help="Label the backdoor's trigger maps to.")
    poison_fraction: float = setting(0.5, section="attack", help="Share of a backdoor attacker's examples that carry "
                                     "the trigger, in (0, 1].")
    backdoor_boost: float = setting(1.0, section="attack", help="Backdoor attackers scale their update by this "
                                    "(model replacement; 1 = no boosting).")
    # -- privacy --
    dp_clip: float = setting(0.0, section="privacy", help="DP-FedAvg on when > 0: clip each client's update to this "
                             "L2 norm.")
    dp_noise: float = setting(1.0, section="privacy", help="DP noise multiplier z: Gaussian noise of std z x dp_clip "
                              "on the sum.")
    dp_delta: float = setting(1e-5, section="privacy", help="DP delta.")
    dp_target_epsilon: float = setting(0.0, section="privacy", help="Stop before a round that would exceed this "
                                       "epsilon (0 = no budget).")
    dp_adaptive_clip: bool = setting(False, section="privacy", help="Adapt the clip norm to the median update norm "
                                     "(Andrew et al. 2021).")
    dp_accountant: str = setting("rdp", section="privacy", choices=("rdp", "pld"), help="Privacy accountant: rdp "
                                 "(built in) or pld (tighter; needs dp-accounting).")
    dp_record_client_metrics: bool = setting(False, section="privacy", help="Keep per-client facts in the history "
                                             "under DP: NOT covered by epsilon.")
    dp_mode: str = setting("central", section="privacy", choices=("central", "distributed"), help="central: the "
                           "server noises the sum | distributed: each client adds a Skellam noise share before "
                           "secure aggregation (needs --secure-aggregation).")
    dp_min_contributors: int = setting(0, section="privacy", help="Distributed DP: clients whose shares make up the "
                                       "full noise (0 = q N minus two standard deviations).")
    local_dp_noise: float = setting(0.0, section="privacy", help="Local DP (DP-SGD via Opacus) in every client when "
                                    "> 0: the noise multiplier.")
    local_dp_clip: float = setting(1.0, section="privacy", help="Local DP: per-example gradient clip norm.")
    local_dp_target_epsilon: float = setting(0.0, section="privacy", help="Local DP: each client refuses rounds past "
                                             "this epsilon (0 = no budget).")
    secure_aggregation: bool = setting(False, section="privacy", help="Sum each round through the SecAgg protocol "
                                       "(the server learns only the sum).")
    secagg_bound: float = setting(10.0, section="privacy", help="Secure aggregation: fixed-point range [-B, B] of "
                                  "each (weighted) update element.")
    secagg_dropout: float = setting(0.0, section="privacy", help="Secure aggregation in simulation: share of clients "
                                    "that drop after sending their masked input.")
    # -- asynchronous FL and the systems model (simulated wall-clock time) --
    mode: str = setting("sync", section="systems", choices=("sync", "fedbuff"), help="sync: rounds that wait for "
                        "every sampled client | fedbuff: buffered asynchronous FL.")
    concurrency: int = setting(0, section="systems", help="FedBuff: clients training at once (0 = 2 x buffer_size).")
    buffer_size: int = setting(10, section="systems", help="FedBuff: client updates folded into each server step "
                               "(K in Nguyen et al. 2022).")
    staleness_exponent: float = setting(0.5, section="systems", help="FedBuff: an update s versions old is weighted "
                                        "(1 + s)^-a.")
    max_staleness: int = setting(0, section="systems", help="FedBuff: drop updates more than this many versions old "
                                 "(0 = keep all).")
    speed_sigma: float = setting(0.0, section="systems", help="Clients' compute speeds ~ LogNormal(0, sigma) "
                                 "(0 = all equal).")
    step_seconds: float = setting(0.01, section="systems", help="Simulated seconds per local step at the median "
                                  "speed.")
    latency: float = setting(0.0, section="systems", help="Simulated seconds added to every task (download + upload).")
    dropout: float = setting(0.0, section="systems", help="Chance that a client drops out during a task.")
    straggler_fraction: float = setting(0.0, section="systems", help="Share of sampled clients that can do only "
                                        "1..E-1 local epochs (Li et al. 2020).")
    drop_stragglers: bool = setting(False, section="systems", help="FedAvg as in Li et al. 2020: stragglers' partial "
                                    "work is dropped, not used.")
    # -- run --
    engine: str = setting("inprocess", section="run", choices=("inprocess", "processes", "ray"), help="What runs "
                          "the clients: inprocess (one after another, here) | processes (forked workers, see "
                          "--workers) | ray (Ray actors). Same seed, same result on each (bit for bit at 1 torch thread: workers "
                          "and actors use 1).")
    workers: int = setting(0, section="run", help="Worker processes (or actors) for --engine processes/ray, one "
                           "client at a time each (0 = the cores available, os.sched_getaffinity).")
    ray_address: str = setting("", section="run", help="--engine ray: the Ray cluster to run on (host:port of its "
                               "head, or auto); '' = a local Ray instance on this machine (pip install "
                               "'insitu[ray]').")
    cohort_batching: bool = setting(False, section="run", help="In-process: train each round's plain local-SGD "
                                    "clients together as one batched (vmap) computation; others run one by one "
                                    "(the log says why).")
    eval_every: int = setting(1, section="run", help="Evaluate on the test set every k rounds (and the last).")
    stop_at_accuracy: float = setting(0.0, section="run", help="End the run once test accuracy reaches this "
                                      "(0 = run all rounds).")
    # One seed drives partitioning, sampling and training. In simulation it also drives central DP's noise
    # and Poisson sample: reproducible, simulation only, not private against anyone who knows the seed.
    # A deployment (`insitu server`) always draws DP noise and sampling from OS entropy.
    seed: int = setting(0, section="run", help="Seed for partitioning, sampling and training (same seed, same "
                        "bits; simulation only: not private against anyone who knows it).")
    train_limit: int = setting(0, section="data", help="Use only the first N training examples (0 = all): quick "
                               "tries and tests.")
    test_limit: int = setting(0, section="data", help="Use only the first N test examples (0 = all).")

    def synthetic_federation(self) -> SyntheticFederation:
        """The lazily generated clients of dataset "synthetic" (nothing is generated here)."""
        return SyntheticFederation(self.num_clients, self.synthetic_alpha, self.synthetic_beta, self.seed,
                                   self.synthetic_max_examples)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> SimulationConfig:
        """Build from TOML/JSON/CLI keys (names or flag aliases, dashes or underscores), checking each value's
        type and choices; an unknown key is an error naming it and the valid keys."""
        config: SimulationConfig = from_mapping(cls, values, source)
        return config

    def validate(self) -> None:
        """Fail before any data is loaded on settings that cannot work."""
        if self.partition not in PARTITION_NAMES:
            raise ValueError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITION_NAMES)}")
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        if self.num_clients < 1 or self.rounds < 1:
            raise ValueError("num_clients and rounds must be >= 1")
        if self.min_fit_clients > self.num_clients:
            raise ValueError(f"min_fit_clients ({self.min_fit_clients}) exceeds num_clients ({self.num_clients})")
        if self.partition in ("dirichlet", "quantity") and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.data:
            DataSpec.from_settings(self)  # checks the format, image size, mode, normalization and classes
            if self.partition_by and (self.train_limit or self.test_limit):
                raise ValueError("train_limit and test_limit cut rows across groups; with partition_by each client "
                                 "is one whole group: drop the limits (or make a smaller file)")
        elif self.partition_by:
            raise ValueError(f"partition_by {self.partition_by!r} splits your own data (--data PATH); the built-in "
                             f"dataset {self.dataset!r} has no group column: use --partition instead")
        if self.dataset == "synthetic":
            self.synthetic_federation()  # checks alpha, beta and max_examples
            if self.synthetic_test_clients < 1:
                raise ValueError(f"synthetic_test_clients must be >= 1, got {self.synthetic_test_clients}")
            if self.attack in DATA_ATTACKS:
                raise ValueError(f"attack {self.attack!r} poisons stored training rows; the synthetic dataset "
                                 "generates each client's data on demand: use an update attack (sign_flip, "
                                 "scaling, gaussian) or another dataset")
        if self.engine not in ("inprocess", "processes", "ray"):
            raise ValueError(f"unknown engine {self.engine!r}; choose inprocess, processes or ray")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = the cores available), got {self.workers}")
        if self.engine == "ray" and self.device != "cpu":
            raise ValueError(f"engine 'ray' runs CPU actors (one CPU each, no GPU reserved), so device {self.device!r} "
                             "is not available in them: use device 'cpu' with it, or engine 'inprocess' on the "
                             "accelerator")
        if self.engine == "processes" and self.device != "cpu":
            raise ValueError(f"engine 'processes' forks CPU worker processes, and a {self.device} context does not "
                             "survive a fork: use device 'cpu' with it, or engine 'inprocess' on the accelerator")
        TrainSettings(self.local_epochs, self.batch_size, self.lr, self.optimizer, self.momentum)
        if self.server_optimizer and self.server_optimizer not in SERVER_OPTIMIZER_NAMES:
            raise ValueError(f"unknown server_optimizer {self.server_optimizer!r}; choose one of "
                             f"{', '.join(SERVER_OPTIMIZER_NAMES)}")
        if self.lr_schedule not in SCHEDULE_NAMES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
        if self.aggregator not in aggregator_names():
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose one of {', '.join(aggregator_names())}")
        validate_attack(self.attack, self.attack_fraction)
        if self.attack != "none" and self.attack_fraction <= 0:
            raise ValueError(f"attack {self.attack!r} needs attack_fraction > 0 (the share of malicious clients)")
        if not 0 < self.poison_fraction <= 1:
            raise ValueError(f"poison_fraction must be in (0, 1], got {self.poison_fraction}")
        if not self.backdoor_boost >= 1:
            raise ValueError(f"backdoor_boost must be >= 1 (1 = no boosting), got {self.backdoor_boost}")
        if self.dp_mode not in ("central", "distributed"):
            raise ValueError(f"unknown dp_mode {self.dp_mode!r}; choose central or distributed")
        if self.dp_mode == "distributed" and not (self.dp_clip > 0 and self.secure_aggregation):
            raise ValueError("dp_mode 'distributed' adds the noise in the clients before secure aggregation: set "
                             "dp_clip > 0 and secure_aggregation = true")
        if self.dp_mode == "distributed" and (self.dp_adaptive_clip or self.dp_accountant != "rdp"):
            raise ValueError("dp_mode 'distributed' has a fixed clip norm and its own (Skellam RDP) accountant: "
                             "drop dp_adaptive_clip and dp_accountant")
        # builds (and so checks) optimizer, schedule, reducer and its options, mu, and how DP, secure
        # aggregation and the reducer compose (refused by Strategy, from the stages' declared properties)
        strategy = make_strategy(self, None)
        if strategy.privacy is not None:
            strategy.privacy.check_clients(self.num_clients)
        per_round = strategy.num_fit_clients(self.num_clients)
        needed = strategy.reducer.properties.min_updates
        if per_round < needed:
            raise ValueError(f"aggregator {strategy.reducer!r} needs at least {needed} updates per round, but each "
                             f"round samples {per_round} of {self.num_clients} clients: lower byzantine_f or raise "
                             f"num_clients/fraction_fit")


@dataclass
class Experiment:
    """A built simulation: data, partitions, the shared model and everything needed to run.

    Dataset "synthetic" stores no training data: ``train`` is empty (it gives the input shape),
    ``train_parts`` is a lazy ``LazyParts`` and ``client_fn`` generates each client's examples."""

    config: SimulationConfig
    train: TensorDataset
    test: TensorDataset
    train_parts: Sequence[np.ndarray]
    test_parts: list[np.ndarray]
    model: nn.Module
    strategy: Strategy
    client_fn: ClientFn
    initial_parameters: Parameters
    malicious: list[str]
    client_states: MemoryStates | None = None
    systems: SystemsModel | None = None  # simulated client speeds, latency, dropouts, stragglers
    fedbuff: FedBuff | None = None  # mode "fedbuff": asynchronous server steps instead of rounds
    data_info: dict[str, Any] | None = None  # --data: format, classes, client index -> group (data.json)

    def engine(self) -> Engine:
        """A fresh engine over this experiment's clients (with its systems model), of the configured kind:
        in-process, forked worker processes (forked now, so they inherit the built data and model) or Ray."""
        if self.config.cohort_batching and self.config.engine != "inprocess":
            raise ValueError(f"cohort_batching trains clients together in this process; engine "
                             f"{self.config.engine!r} runs them elsewhere: use engine 'inprocess' or drop cohort_batching")
        if self.config.cohort_batching:
            from insitu.engines.cohort import BatchedPool

            return BatchedPool(self.client_fn, self.config.num_clients, systems=self.systems)
        if self.config.engine == "processes":
            from insitu.engines.processes import process_pool

            return process_pool(self.client_fn, self.config.num_clients, self.config.workers, systems=self.systems,
                                states=self.client_states)
        if self.config.engine == "ray":
            from insitu.engines.ray_engine import make_ray_engine

            return make_ray_engine(self)
        return InProcessPool(self.client_fn, self.config.num_clients, systems=self.systems)

    def run(self, on_round: RoundCallback | None = None, engine: Engine | None = None) -> RunResult:
        """Train (rounds, or FedBuff steps) and leave the final global parameters in ``self.model``."""
        config = self.config
        result = simulate(self.client_fn, num_clients=config.num_clients, strategy=self.strategy,
                          num_rounds=config.rounds, initial_parameters=self.initial_parameters, seed=config.seed,
                          on_round=on_round, pool=engine if engine is not None else self.engine(),
                          stop_at_accuracy=config.stop_at_accuracy, fedbuff=self.fedbuff)
        result.parameters.to_module(self.model)
        return result


def build_experiment(config: SimulationConfig) -> Experiment:
    """Load data, partition it, build one shared model and the strategy; nothing trains yet."""
    config.validate()
    device = resolve_device(config.device)
    fedbuff = make_fedbuff(config)
    make_systems_model(config, {})  # refuse bad systems settings before any data is loaded
    synthetic = config.synthetic_federation() if config.dataset == "synthetic" and not config.data else None
    loaded: LoadedData | None = None
    train_parts: Sequence[np.ndarray]
    test_parts: list[np.ndarray] = []
    if synthetic is not None:  # nothing per client is made here: client_fn generates what it needs
        test = _limit(synthetic.test_set(config.synthetic_test_clients), config.test_limit)
        train = TensorDataset(test.x[:0], test.y[:0], test.num_classes, "synthetic")
        train_parts = LazyParts(synthetic)
    elif config.data:
        loaded = load_data(config.data, DataSpec.from_settings(config))
        train, test = _limit(loaded.train, config.train_limit), _limit(loaded.test, config.test_limit)
        if len(test) == 0:
            raise ValueError(f"{config.data}: no test rows to evaluate on: give --test-data, train/ and test/ "
                             "subfolders or a 'split' column, or set --test-fraction > 0")
        if config.partition_by:
            train_parts = _group_parts(loaded, config)
            test_parts = loaded.group_parts(test=True) if config.fraction_evaluate > 0 else []
        else:
            train_parts = partition(train.labels_numpy(), config.num_clients, config.partition, seed=config.seed,
                                    alpha=config.alpha, shards_per_client=config.shards_per_client)
    else:
        train = _limit(load_dataset(config.dataset, "train", config.data_dir), config.train_limit)
        test = _limit(load_dataset(config.dataset, "test", config.data_dir), config.test_limit)
        train_parts = partition(train.labels_numpy(), config.num_clients, config.partition, seed=config.seed,
                                alpha=config.alpha, shards_per_client=config.shards_per_client)
    if config.fraction_evaluate > 0 and synthetic is None and not config.partition_by:
        test_parts = partition(test.labels_numpy(), config.num_clients, config.partition, seed=config.seed + 1,
                               alpha=config.alpha, shards_per_client=config.shards_per_client)
    if device.type != "cpu":  # once: every batch and evaluation then indexes the data where it lives
        train, test = _on_device(train, device), _on_device(test, device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, train.input_shape, train.num_classes).to(device)
    flatten_module_(model)  # one copy to load or snapshot the shared model, not one per tensor
    settings = TrainSettings(config.local_epochs, config.batch_size, config.lr, config.optimizer, config.momentum)
    states = MemoryStates() if config.strategy == "scaffold" or config.local_dp_noise > 0 else None
    local_dp = None
    if config.local_dp_noise > 0:
        from insitu.privacy.local import DPTorchClient, LocalDPSettings

        local_dp = LocalDPSettings(config.local_dp_noise, config.local_dp_clip, config.dp_delta,
                                   config.local_dp_target_epsilon or None)
    malicious = choose_malicious(config.num_clients, config.attack_fraction, config.seed) if config.attack != "none" else []
    update_attack = make_update_attack(config.attack, scale=config.attack_scale, std=config.attack_std) \
        if config.attack in UPDATE_ATTACKS else None
    if config.attack == "backdoor" and config.backdoor_boost > 1:  # Bagdasaryan et al.'s boosted update
        update_attack = make_update_attack("scaling", scale=config.backdoor_boost)
    trigger = Trigger().resolved(train.x) if config.attack == "backdoor" else None
    poisoned: dict[str, TensorDataset] = {}
    if config.attack in DATA_ATTACKS:  # only the attackers' own rows are copied
        for cid in malicious:
            own = train.subset(train_parts[int(cid)])
            poisoned[cid] = flip_labels(own) if trigger is None else poison_with_backdoor(
                own, trigger, config.backdoor_target, config.poison_fraction, seed=config.seed + int(cid))
    attackers = set(malicious)
    train_rows = [] if synthetic is not None else [  # once, not per fit
        torch.from_numpy(np.asarray(part, dtype=np.int64)) for part in train_parts]
    test_rows = [torch.from_numpy(np.asarray(part, dtype=np.int64)) for part in test_parts]

    def client_fn(cid: str) -> Client:
        i = int(cid)
        rows: torch.Tensor | None
        local_test, local_rows = (test, test_rows[i]) if test_parts else (None, None)
        if synthetic is not None:  # generated now from (seed, client), the same every time
            data, held_out = synthetic.client_data(i)
            rows, local_test = None, held_out if config.fraction_evaluate > 0 else None
        else:
            data, rows = (poisoned[cid], None) if cid in poisoned else (train, train_rows[i])
        state = states.for_client(cid) if states is not None else None
        client: Client
        if local_dp is not None:
            client = DPTorchClient(model, data, local_test, dp=local_dp, train_indices=rows,
                                   test_indices=local_rows, settings=settings, share_result=True, state=state,
                                   device=device)
        else:
            client = TorchClient(model, data, local_test, train_indices=rows, test_indices=local_rows,
                                 settings=settings, share_result=True, state=state, device=device)
        if update_attack is not None and cid in attackers:
            client = MaliciousClient(client, update_attack, seed=config.seed)
        return client

    evaluator = central_evaluator(model, test, every=config.eval_every, last_round=config.rounds,
                                  backdoor=(trigger, config.backdoor_target) if trigger else None, device=device)
    strategy = make_strategy(config, evaluator)
    initial = Parameters.from_module(model)
    if fedbuff is not None:
        check_async_strategy(strategy, initial)
    sizes: dict[str, int] | Callable[[str], int]
    if synthetic is not None:
        sizes = lambda cid: synthetic.client_size(int(cid))  # per task, nothing stored
    else:
        sizes = {str(i): len(part) for i, part in enumerate(train_parts)}
    systems = make_systems_model(config, sizes)
    return Experiment(config, train, test, train_parts, test_parts, model, strategy, client_fn, initial, malicious,
                      states, systems, fedbuff, loaded.describe() if loaded is not None else None)


def _group_parts(loaded: LoadedData, config: SimulationConfig) -> list[np.ndarray]:
    """Client i = the i-th group in sorted order; the federation's size must be the number of groups."""
    names = loaded.group_names
    if len(names) != config.num_clients:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ValueError(f"partition_by {config.partition_by!r} gives {len(names)} clients ({shown}) but num_clients "
                         f"is {config.num_clients}: pass --num-clients {len(names)}")
    parts = loaded.group_parts()
    empty = [names[i] for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ValueError(f"group(s) {', '.join(empty)} of {config.partition_by!r} have no training rows (all of "
                         "theirs went to the test split): lower --test-fraction or give an explicit test split")
    return parts


def make_fedbuff(config: SimulationConfig) -> FedBuff | None:
    """FedBuff's settings for mode "fedbuff", None for synchronous rounds; refuses an unknown mode."""
    if config.mode not in ("sync", "fedbuff"):
        raise ValueError(f"unknown mode {config.mode!r}; choose sync (rounds) or fedbuff (buffered asynchronous)")
    if config.mode == "sync":
        return None
    if config.fraction_evaluate > 0:
        raise ValueError("fedbuff does not run federated evaluation (every client is busy training): set "
                         "fraction_evaluate to 0 (centralized evaluation still runs every server step)")
    if config.fraction_fit != 1.0:
        raise ValueError("fedbuff does not sample a fraction of clients per round: drop fraction_fit and set how many "
                         "clients train at once with concurrency")
    fedbuff = FedBuff(config.buffer_size, config.concurrency, config.staleness_exponent, config.max_staleness)
    at_once = fedbuff.clients_at_once(config.num_clients)
    if at_once > config.num_clients:
        raise ValueError(f"fedbuff trains {at_once} clients at once (concurrency) but the federation has "
                         f"{config.num_clients}: lower concurrency or raise num_clients")
    if fedbuff.buffer_size > at_once:
        raise ValueError(f"buffer_size ({fedbuff.buffer_size}) exceeds the {at_once} clients training at once (a "
                         "buffer holds one update per client): a server step could never fill its buffer; lower "
                         "buffer_size")
    return fedbuff


def make_systems_model(config: SimulationConfig, sizes: dict[str, int] | Callable[[str], int]) -> SystemsModel | None:
    """The simulated speeds, latency, dropouts and stragglers, or None when every setting is off (and
    the mode is synchronous): then the engine's clock is wall time."""
    heterogeneous = (config.speed_sigma != 0 or config.latency != 0 or config.dropout != 0
                     or config.straggler_fraction != 0)  # a negative value is then refused by SystemsModel
    if not heterogeneous and config.mode == "sync":
        return None
    return SystemsModel(config.speed_sigma, config.step_seconds, config.latency, config.dropout,
                        config.straggler_fraction, config.drop_stragglers, config.local_epochs, config.seed,
                        steps=epochs_times_batches(sizes, config.batch_size, config.local_epochs))


def make_strategy(config: SimulationConfig, evaluate_fn: CentralEvaluator | None, *, remote: bool = False,
                  data_config: dict[str, str] | None = None) -> Strategy:
    """The strategy named in ``config`` with its sampling settings.

    In simulation every client is always there and gets its training settings when it is built.
    A ``remote`` server instead waits for ``num_clients`` connections and sends the training
    settings with every task.

    Central DP's noise (and its Poisson sample) comes from OS entropy for a ``remote`` server, always;
    a simulation seeds it with ``config.seed`` (reproducible, simulation only, not private against
    anyone who knows the seed).

    ``data_config`` (a ``remote`` server's own data's class names and input shape, from
    ``insitu.data.files.agreement.agreement_config``) travels with every task, so a client whose data differs
    refuses it by name instead of training on labels that mean other classes.
    """
    name = config.strategy
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    base: dict[str, Any] = {}
    if remote:
        base = {"local_epochs": config.local_epochs, "batch_size": config.batch_size,
                "lr": config.lr, "momentum": config.momentum, "optimizer": config.optimizer}
        base.update(data_config or {})
    fit_config: Any = base
    if config.lr_schedule != "constant":
        fit_config = lr_config(make_schedule(config.lr_schedule, config.lr, decay=config.lr_decay,
                                             every=config.lr_step_every, total_rounds=config.rounds), base)
    optimizer_name = config.server_optimizer or (name if name in SERVER_OPTIMIZER_NAMES else "sgd")
    common: dict[str, Any] = {
        "fraction_fit": config.fraction_fit,
        "min_fit_clients": config.min_fit_clients,
        "min_available_clients": config.num_clients if remote else max(config.min_fit_clients, 1),
        "fraction_evaluate": config.fraction_evaluate,
        "fit_config": fit_config,
        "evaluate_fn": evaluate_fn,
        "reducer": make_reducer(config.aggregator, byzantine_f=config.byzantine_f, trim_fraction=config.trim_fraction,
                                clip_norm=config.clip_norm, screen=config.screen,
                                **getattr(config, "aggregator_options", {})),
        "server_optimizer": make_server_optimizer(optimizer_name, lr=config.server_lr or None,
                                                  momentum=config.server_momentum, tau=config.tau),
    }
    if config.secure_aggregation:
        common["secure_aggregation"] = SecureAggregation(  # a deployment's dropouts are real, not simulated
            config.secagg_bound, dropout_fraction=0.0 if remote else config.secagg_dropout, seed=config.seed)
    if config.dp_clip > 0 and config.dp_mode == "distributed":
        common["privacy"] = DistributedDP(config.dp_noise, config.dp_clip, config.fraction_fit, config.dp_delta,
                                          config.dp_target_epsilon or None, config.dp_min_contributors or None,
                                          randomness=OSEntropy() if remote else SimulationSeed(config.seed),
                                          record_client_metrics=config.dp_record_client_metrics)
    elif config.dp_clip > 0:
        common["privacy"] = CentralDP(config.dp_noise, config.dp_clip, config.fraction_fit, config.dp_delta,
                                      config.dp_target_epsilon or None, adaptive=config.dp_adaptive_clip,
                                      accountant_kind=config.dp_accountant,
                                      randomness=OSEntropy() if remote else SimulationSeed(config.seed),
                                      record_client_metrics=config.dp_record_client_metrics)
    if name == "fedsgd":
        return fedsgd(**common)
    if name == "fedprox":
        return fedprox(config.mu, **common)
    if name == "scaffold":
        return scaffold(**common)
    return fedavg(name=name, **common)


def run_simulation(config: SimulationConfig, on_round: RoundCallback | None = None) -> tuple[Experiment, RunResult]:
    """Build and run an experiment; the final global parameters are left in ``experiment.model``."""
    experiment = build_experiment(config)
    return experiment, experiment.run(on_round)


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` names, or an error saying why it is unusable here and what to do."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"unknown device {name!r} ({error}); use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} needs CUDA, but torch.cuda.is_available() is False here (torch "
                             f"{torch.__version__}): install a CUDA build of torch on a machine with an NVIDIA GPU, "
                             "or use device 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered 0..{torch.cuda.device_count() - 1}: pick one of those")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} needs Apple's MPS backend, which is not available here: run on an "
                             "Apple-silicon Mac with an MPS-enabled torch, or use device 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
    return device


def _on_device(data: TensorDataset, device: torch.device) -> TensorDataset:
    return TensorDataset(data.x.to(device), data.y.to(device), data.num_classes, data.name)


def _limit(data: TensorDataset, limit: int) -> TensorDataset:
    return data if limit <= 0 or limit >= len(data) else data.subset(np.arange(limit))


def save_model(model: nn.Module, path: str | Path) -> None:
    """A plain state_dict, loadable with ``torch.load`` + ``load_state_dict``."""
    torch.save(model.state_dict(), path)
