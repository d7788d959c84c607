"""ResNet-18 (insitu.models.resnet): torchvision's parameter count and names, shapes, norms and stems."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from insitu.models import MODEL_NAMES, ResNet18, build_model, resnet18
from insitu.params import Parameters


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine two threads contend and run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _torchvision_keys(norm_buffers: bool) -> list[str]:
    """torchvision.models.resnet18().state_dict() keys, written out from its naming scheme."""
    def norm(prefix: str) -> list[str]:
        keys = [f"{prefix}.weight", f"{prefix}.bias"]
        return keys + [f"{prefix}.running_mean", f"{prefix}.running_var", f"{prefix}.num_batches_tracked"] * norm_buffers

    keys = ["conv1.weight", *norm("bn1")]
    for layer in (1, 2, 3, 4):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *norm(f"{p}.bn1"), f"{p}.conv2.weight", *norm(f"{p}.bn2")]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *norm(f"{p}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


def test_parameter_count_is_torchvisions_resnet18() -> None:
    # torchvision.models.resnet18(): 11,689,512 parameters (3 channels, 1000 classes, 7x7 stem, BatchNorm)
    assert _count(ResNet18(3, 1000, norm="batch", stem="standard")) == 11_689_512
    # GroupNorm has the same affine parameters (a weight and a bias per channel), no running statistics
    assert _count(ResNet18(3, 1000, norm="group", stem="standard")) == 11_689_512
    # the small stem's 3x3 conv: 64 x 3 x (9 - 49) weights fewer; 1 channel and 2 classes change conv1 and fc
    assert _count(ResNet18(3, 1000, stem="small")) == 11_689_512 - 64 * 3 * 40
    assert _count(ResNet18(1, 2, stem="small")) == 11_689_512 - 64 * 3 * 49 + 64 * 9 - 512 * 998 - 998


def test_state_dict_keys_follow_torchvision() -> None:
    assert list(ResNet18(3, 1000, norm="batch").state_dict()) == _torchvision_keys(norm_buffers=True)
    assert list(ResNet18(3, 1000, norm="group").state_dict()) == _torchvision_keys(norm_buffers=False)
    assert len(_torchvision_keys(norm_buffers=True)) == 122  # torchvision's resnet18 state_dict has 122 entries


@pytest.mark.parametrize(("shape", "stem", "layer4_hw"), [
    ((1, 32, 32), "small", (4, 4)),        # 3x3/1 stem, no pool: 32 at layer1, then /2 per stage -> 4
    ((3, 64, 48), "standard", (2, 2)),     # 7x7/2 + pool: 16x12 at layer1 -> 8x6 -> 4x3 -> 2x2
    ((1, 20, 20), "small", (3, 3)),        # 20 -> 10 -> 5 -> 3
])
def test_output_shapes(shape: tuple[int, int, int], stem: str, layer4_hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = ResNet18(shape[0], 3, stem=stem).eval()
    x = torch.randn(2, *shape)
    assert net(x).shape == (2, 3)
    features = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    features = net.layer4(net.layer3(net.layer2(net.layer1(features))))
    assert features.shape == (2, 512, *layer4_hw)


def test_registry_names_norms_and_auto_stem() -> None:
    assert {"resnet18", "resnet18-bn"} <= set(MODEL_NAMES)
    group = build_model("resnet18", (1, 32, 32), 2)
    assert isinstance(group, ResNet18) and group.norm == "group" and group.stem == "small"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())
    batch = build_model("resnet18_bn", (3, 224, 224), 5)
    assert isinstance(batch, ResNet18) and batch.norm == "batch" and batch.stem == "standard"
    assert build_model("resnet18", (1, 64, 64), 2).stem == "standard"  # auto: small only below 64 px
    narrow = build_model("resnet18-w16", (1, 64, 64), 2)
    assert isinstance(narrow, ResNet18) and narrow.width == 16 and narrow.fc.in_features == 128
    # 1 channel, 2 classes, width w: 3x3 convs 36w² + 128w² + 512w² + 2048w² per stage (1x1 projections
    # included), stem 49w, norms 2w + 8w + 20w + 40w + 80w, fc 8w x 2 + 2
    for w, net in ((16, narrow), (64, ResNet18(1, 2))):
        assert _count(net) == 2724 * w * w + 215 * w + 2  # 700,786 and 11,171,266
    assert resnet18((1, 64, 64), 2, stem="small").stem == "small"


def test_group_norm_model_has_no_buffers_and_round_trips_through_parameters() -> None:
    torch.manual_seed(1)
    net = build_model("resnet18", (1, 16, 16), 2)
    assert list(net.buffers()) == []  # nothing for FedAvg to average besides weights
    params = Parameters.from_module(net)
    assert len(params.names) == len(net.state_dict()) == 62
    other = build_model("resnet18", (1, 16, 16), 2)
    params.to_module(other)
    x = torch.randn(3, 1, 16, 16)
    np.testing.assert_array_equal(net.eval()(x).detach().numpy(), other.eval()(x).detach().numpy())
    # BatchNorm's running statistics and its integer batch counter are state_dict entries Parameters carry
    bn = Parameters.from_module(build_model("resnet18-bn", (1, 16, 16), 2))
    assert "bn1.running_mean" in bn.names and "layer4.1.bn2.num_batches_tracked" in bn.names


def test_opacus_accepts_group_norm_and_refuses_batch_norm() -> None:
    validator = pytest.importorskip("opacus.validators").ModuleValidator
    assert validator.validate(build_model("resnet18", (1, 32, 32), 2), strict=False) == []
    assert validator.validate(build_model("resnet18-bn", (1, 32, 32), 2), strict=False) != []


def test_trains_a_step_and_refuses_bad_arguments() -> None:
    torch.manual_seed(2)
    net = build_model("resnet18", (1, 8, 8), 2)
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.002)
    before = nn.functional.cross_entropy(net(x), y)
    before.backward()
    opt.step()  # one small gradient step lowers the loss on its own batch
    assert nn.functional.cross_entropy(net(x), y).item() < before.item()
    with pytest.raises(ValueError, match="expects images"):
        build_model("resnet18", (784,), 10)
    with pytest.raises(ValueError, match="unknown norm"):
        ResNet18(norm="layer")
    with pytest.raises(ValueError, match="unknown stem"):
        resnet18((3, 32, 32), 10, stem="tiny")
