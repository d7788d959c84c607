"""What a run leaves behind: history (JSON, CSV), the model state_dict, the config, a plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from insitu.run.history import History
from insitu.simulation import SimulationConfig, save_model


def write_outputs(out: Path, config: SimulationConfig, model: nn.Module, history: History) -> dict[str, Path]:
    """Write everything into ``out`` (created if needed); returns label -> path."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": out / "model.pt",
        "history": out / "history.json",
        "csv": out / "history.csv",
        "plot": out / "plot.png",
        "config": out / "config.json",
    }
    save_model(model, paths["model"])
    history.save_json(paths["history"])
    history.save_csv(paths["csv"])
    paths["config"].write_text(json.dumps(asdict(config), indent=2))
    plot_history(history, paths["plot"], title=f"{config.strategy} on {config.dataset} ({config.model}, {config.num_clients} clients)")
    return paths


def plot_history(history: History, path: Path, title: str = "") -> None:
    """Accuracy and loss per round (round 0 = the initial model, when evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(0, history.initial)] if history.initial else []
    points += [(r.round, r.headline) for r in history.rounds if r.headline is not None]
    rounds = [p[0] for p in points]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, [100 * (e.accuracy or 0.0) for _, e in points], marker="o")
    ax_acc.set(xlabel="round", ylabel="accuracy (%)", title="test accuracy")
    ax_loss.plot(rounds, [e.loss for _, e in points], marker="o", color="tab:red")
    ax_loss.set(xlabel="round", ylabel="loss", title="test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a saved state_dict safely (``weights_only``: tensors only, no arbitrary objects)."""
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Deliberately broad: on a file that is not a checkpoint torch.load raises an open-ended set of
    # types (fuzzing truncated/corrupted files found OSError, EOFError, RuntimeError,
    # UnpicklingError, UnicodeDecodeError, IndexError, KeyError, struct.error, AssertionError,
    # TypeError); each means "not a loadable file", which callers report as a ValueError.
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path} is not a loadable state_dict: {error}") from None
    if not isinstance(state, dict):
        # A ValueError, not TypeError: the file's content is wrong, not an argument's type, and
        # `insitu evaluate` reports ValueErrors from here as a bad model file.
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict")  # noqa: TRY004
    return state


def infer_model_name(state: dict[str, torch.Tensor]) -> str:
    """Recognise a reference architecture from its state_dict keys (and, where names are shared, shapes)."""
    keys = set(state)
    if "layer4.1.conv2.weight" in keys and "conv1.weight" in keys:  # a ResNet-18: width from the stem's filters
        if "bn1.running_mean" in keys:
            return "resnet18-bn"
        return "resnet18-w16" if state["conv1.weight"].shape[0] == 16 else "resnet18"
    if "conv1.weight" in keys and "conv2.weight" in keys:
        return "simple-cnn"
    if "fc3.weight" in keys:
        return "2nn"
    if keys == {"linear.weight", "linear.bias"}:
        return "logreg"
    if keys == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}:
        return "simple-net" if state["fc1.weight"].shape[0] == 128 else "mlp"  # the tutorials' SimpleNet: 128 wide
    raise ValueError("cannot tell the architecture from the saved keys; pass --model "
                     "(simple-cnn | 2nn | logreg | mlp | simple-net | resnet18 | resnet18-bn | resnet18-w16)")
