"""cli.outputs.load_state_dict: every kind of bad file is a ValueError (what `insitu evaluate` reports)."""

from __future__ import annotations

import pytest
import torch

from insitu.cli.outputs import infer_model_name, load_state_dict
from insitu.models import MODEL_NAMES, build_model


def test_load_state_dict_round_trip(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    state = load_state_dict(path)
    assert list(state) == ["w"] and torch.equal(state["w"], torch.arange(3.0))


def test_load_state_dict_bad_files_are_value_errors(tmp_path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4)}, good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(4)}, legacy, _use_new_zipfile_serialization=False)
    bad = {
        "empty.pt": b"",
        "text.pt": b"hello world\n",  # KeyError inside torch.load
        "truncated.pt": data[: len(data) // 2],  # RuntimeError
        "legacy-truncated.pt": legacy.read_bytes()[:50],  # EOFError
        "pickle.pt": b"\x80\x02}q\x00.",  # not a torch checkpoint
    }
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="is not a loadable state_dict"):
            load_state_dict(path)


def test_load_state_dict_refuses_non_dict(tmp_path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(ValueError, match="holds a Tensor, expected a state_dict"):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "missing.pt")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_architecture_is_recognised_from_its_saved_state(name) -> None:
    """`insitu evaluate model.pt` needs no --model for any architecture insitu trains."""
    shape = (1, 28, 28) if name not in ("resnet18", "resnet18-bn") else (1, 16, 16)
    state = build_model(name, shape, 10).state_dict()
    assert infer_model_name(state) == name


def test_the_round_line_shows_epsilon_only_when_the_run_accounts_privacy() -> None:
    """Without DP a fit metric named epsilon is whatever a client reported: the progress line leaves it out."""
    from insitu.cli.progress import format_round
    from insitu.report.summary import accounts_privacy
    from insitu.run.history import RoundRecord

    record = RoundRecord(round=1, fit_metrics={"epsilon": 0.01})
    assert "epsilon 0.01" in format_round(record, 5, show_epsilon=accounts_privacy({"dp_clip": 1.0}))
    assert "epsilon" not in format_round(record, 5, show_epsilon=accounts_privacy({"dp_clip": 0.0}))
