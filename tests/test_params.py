import numpy as np
import pytest
import torch
from torch import nn

from insitu.params import IncompatibleParametersError, Parameters, ParamSpec, describe_mismatch


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    net.train()
    net(torch.randn(8, 1, 28, 28))  # moves BatchNorm running stats and num_batches_tracked
    return net


def test_module_round_trip_is_exact_including_buffers():
    src, dst = _net(), _net()
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    dst[1].running_mean.fill_(7.0)
    dst[1].num_batches_tracked.fill_(99)
    params = Parameters.from_module(src)
    assert "1.running_mean" in params.names and "1.num_batches_tracked" in params.names
    params.to_module(dst)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert a.dtype == b.dtype, k
        assert torch.equal(a, b), k


def test_flat_view_and_back_keeps_dtypes_and_values():
    params = Parameters.from_module(_net())
    flat = params.flat()
    assert flat.dtype == np.float32 and flat.size == params.num_values
    back = Parameters.from_flat(flat, params.specs)
    assert back == params
    assert dict(back)["1.num_batches_tracked"].dtype == np.int64


def test_numpy_round_trip_and_names():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5], dtype=np.float64)}
    params = Parameters.from_arrays(arrays)
    assert params.names == ("w", "b")
    assert np.array_equal(params.flat(), np.array([0, 1, 2, 3, 4, 5, 1.5], dtype=np.float32))
    unnamed = Parameters.from_arrays([np.zeros(2), np.ones(3)])
    assert unnamed.names == ("0", "1")
    state = params.to_state_dict()
    assert state["b"].dtype == torch.float64


def test_to_module_rejects_wrong_shape_with_a_named_array():
    params = Parameters.from_arrays({"0.weight": np.zeros((2, 2), np.float32), "0.bias": np.zeros(2, np.float32)})
    with pytest.raises(IncompatibleParametersError, match=r"'0.weight' has shape \(2, 2\), expected \(3, 2\)"):
        params.to_module(nn.Sequential(nn.Linear(2, 3)))


def test_from_flat_length_mismatch():
    with pytest.raises(ValueError, match="has 3 values, specs need 4"):
        Parameters.from_flat(np.zeros(3), [ParamSpec("a", (2, 2), np.dtype(np.float32))])


def test_describe_mismatch_cases():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    base = [ParamSpec("a", (2,), f32)]
    assert describe_mismatch(base, base) is None
    assert "2 arrays where 1" in describe_mismatch(base * 2, base)
    assert "named 'b'" in describe_mismatch([ParamSpec("b", (2,), f32)], base)
    assert "dtype float64, expected float32" in describe_mismatch([ParamSpec("a", (2,), f64)], base)


def test_shared_snapshot_is_copied_only_if_still_held_when_the_module_is_reloaded():
    from insitu.params import flatten_module_

    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    assert flatten_module_(net)
    before = Parameters.from_module(net)  # a private copy
    shared = Parameters.from_module(net, share=True)
    kept = shared.flat().copy()
    zeros = Parameters.from_flat(np.zeros(before.num_values, np.float32), before.specs)
    zeros.to_module(net)  # reloading the module detaches the still-held shared snapshot first
    assert np.array_equal(shared.flat(), kept) and shared == before
    assert not np.shares_memory(shared.flat(), net._insitu_flat.numpy())
    assert all(not p.any() for p in net.state_dict().values())
    # a snapshot nobody holds any more costs nothing and is simply released
    Parameters.from_module(net, share=True)
    before.to_module(net)
    assert Parameters.from_module(net) == before


def test_flatten_refuses_tied_or_non_float_state():
    from insitu.params import flatten_module_

    tied = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    assert not flatten_module_(tied)
    assert not flatten_module_(nn.BatchNorm1d(3))  # int64 num_batches_tracked


@pytest.mark.parametrize("change", ["new_parameter", "new_submodule", "load_assign"])
def test_flattened_module_changed_behind_our_back_still_loads_and_snapshots_correctly(change):
    """Re-created tensors or submodules no longer live in the flat buffer: insitu must notice."""
    from insitu.params import _flat_storage, flatten_module_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    assert flatten_module_(net)
    assert _flat_storage(net) is not None
    if change == "new_parameter":
        net[1].bias = nn.Parameter(torch.ones(2))
    elif change == "new_submodule":
        net[1] = nn.Linear(2, 2)
    else:
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    assert _flat_storage(net) is None
    target = Parameters.from_flat(np.arange(14, dtype=np.float32), Parameters.from_module(net).specs)
    target.to_module(net)
    assert Parameters.from_module(net, share=True) == target
    assert np.array_equal(net[1].bias.detach().numpy(), [12.0, 13.0])
