"""Files saved by cifarnet before its modules moved (tests/study/fixtures/before_redesign, written by
commit b9fb46d, when the study was cifarnet.train, cifarnet.models, ... and cifarnet.fuse one
module) load and work now: a training checkpoint, and whole fused models pickled by class path."""

from __future__ import annotations

import lzma
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cifarnet
import cifarnet.nn as cnn
from cifarnet.fuse import FusedBatchNorm2d, FusedConv2dBatchNormReLUMaxPool2d, FusedIdentity
from cifarnet.study.models import ConvNet
from cifarnet.study.train import TrainConfig, load_checkpoint, make_optimizer

FIXTURES = Path(__file__).parent / "fixtures" / "before_redesign"


@pytest.fixture(scope="module")
def saved_models():
    sys.path.insert(0, str(FIXTURES))  # fixture_models, whose class the fused GraphModule names
    try:
        return torch.load(FIXTURES / "fused_models.pt", weights_only=False)
    finally:
        sys.path.remove(str(FIXTURES))


def test_checkpoint_from_before_the_move_loads_into_the_model_and_optimizer(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(lzma.decompress((FIXTURES / "checkpoint.pt.xz").read_bytes()))
    checkpoint = load_checkpoint(path)
    config = TrainConfig(**checkpoint["config"])
    assert (config.variant, checkpoint["epoch"], len(checkpoint["history"])) == ("full", 1, 1)
    model = ConvNet(config.variant)
    model.load_state_dict(checkpoint["model"])  # strict: every key and shape as today's model
    optimizer, _ = make_optimizer(model, config)
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())  # the fixture's zeroed tensors


def test_graph_fused_model_from_before_the_move_computes_as_its_native_counterpart(saved_models):
    model, input = saved_models["graph_fused"], saved_models["input"]
    assert type(model).__name__ == "Branchy" and isinstance(model, torch.fx.GraphModule)
    assert any(isinstance(m, FusedConv2dBatchNormReLUMaxPool2d) for m in model.modules())
    native = cifarnet.unfuse(model)
    assert type(native).__name__ == "Branchy" and not isinstance(native, torch.fx.GraphModule)
    model.eval(), native.eval()
    torch.testing.assert_close(model(input), native(input), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected a batch"):  # the kept branch check: the original's error
        model(input[0])


def test_position_fused_and_cifarnet_nn_models_from_before_the_move_train_as_native(saved_models):
    input = saved_models["input"]
    for key in ("position_fused", "layers"):
        model = saved_models[key]
        if key == "position_fused":
            assert isinstance(model[1], FusedBatchNorm2d) and isinstance(model[2], FusedIdentity)
        else:
            assert isinstance(model[0], cnn.Conv2dBatchNormReLUMaxPool2d)
            model = model[:2]  # dropout's mask is its own by design; the conv layers must match native
        native = cifarnet.unfuse(model)
        assert not any(isinstance(m, (FusedBatchNorm2d, cnn.Conv2dReLUMaxPool2d)) for m in native.modules())
        model.train(), native.train()
        fused_output, native_output = model(input), native(input)  # same tensors: both update running stats
        torch.testing.assert_close(fused_output, native_output, rtol=1e-12, atol=1e-12)
        assert isinstance(native, nn.Module)
