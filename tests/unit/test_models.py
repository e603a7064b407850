from __future__ import annotations

import pytest
import torch

from jetfed.errors import InvalidConfig, UnknownModel
from jetfed.models import build_model, model_names


def test_registry_names():
    assert model_names() == ["mnist-cnn", "mobilenet_v3_small", "resnet18"]


@pytest.mark.parametrize("name", ["mnist-cnn", "resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_gives_log_probabilities(name, train_mode):
    torch.manual_seed(0)
    model = build_model(name).train(train_mode)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert bool((out <= 0).all())
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(2), atol=1e-5)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModel) as caught:
        build_model("lenet")
    message = str(caught.value)
    assert message.startswith("model: ")
    assert "'lenet'" in message
    assert "mnist-cnn, mobilenet_v3_small, resnet18" in message
    assert isinstance(caught.value, InvalidConfig)


def test_mnist_cnn_has_the_reference_shapes():
    shapes = {name: tuple(t.shape) for name, t in build_model("mnist-cnn").state_dict().items()}
    assert shapes == {
        "conv1.weight": (20, 1, 5, 5),
        "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5),
        "conv2.bias": (50,),
        "fc1.weight": (500, 800),
        "fc1.bias": (500,),
        "fc2.weight": (10, 500),
        "fc2.bias": (10,),
    }


def test_same_seed_builds_the_same_weights():
    torch.manual_seed(7)
    first = build_model("mnist-cnn").state_dict()
    torch.manual_seed(7)
    second = build_model("mnist-cnn").state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_each_call_builds_a_fresh_model():
    assert build_model("mnist-cnn") is not build_model("mnist-cnn")
