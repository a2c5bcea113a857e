"""torch.onnx.export(dynamo=True) of models with cifarnet layers: standard ONNX nodes, and
onnxruntime computing what PyTorch computes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import cifarnet  # noqa: E402
from cifarnet import nn as cnn  # noqa: E402
from cifarnet.ops._onnx import ONNX_TRANSLATIONS  # noqa: E402
from cifarnet.study.models import ConvNet  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def export(model: nn.Module, input: torch.Tensor, **options) -> onnx.ModelProto:
    """What a user writes: the plain dynamo export, nothing cifarnet-specific."""
    return torch.onnx.export(model, (input,), dynamo=True, verbose=False, **options).model_proto


def run_onnx(proto: onnx.ModelProto, input: torch.Tensor) -> torch.Tensor:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: input.detach().contiguous().numpy()})
    return torch.from_numpy(output)


def node_types(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def assert_close_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Two float32 convolution algorithms: rounding of the order of 1e-6 of the output's scale.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected.contiguous(), rtol=1e-4, atol=1e-5 * scale)


def exported_and_checked(model: nn.Module, input: torch.Tensor, **options) -> onnx.ModelProto:
    """Exports ``model`` in eval mode and checks that onnxruntime computes on ``input`` what
    PyTorch computes, in float32."""
    model.eval()
    proto = export(model, input, **options)
    with torch.no_grad():
        assert_close_float32(run_onnx(proto, input), model(input))
    return proto


def randomise_running_statistics(model: nn.Module) -> nn.Module:
    """Running statistics away from 0 and 1, so that an eval-mode batch norm is not the identity."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model


def image(*shape: int, channels_last: bool = False) -> torch.Tensor:
    input = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return input.to(memory_format=torch.channels_last) if channels_last else input


def test_every_translation_is_in_the_registry_the_exporter_builds():
    # Fails when torch.onnx changes the private registry cifarnet.ops._onnx adds to.
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    assert [op for op in ONNX_TRANSLATIONS if not registry.is_registered(op)] == []
    for op, function in ONNX_TRANSLATIONS.items():
        assert registry.get_decomps(op)[0].onnx_function is function


def test_import_cifarnet_does_not_import_the_exporter():
    code = "import sys, cifarnet; print(sorted(m for m in ('onnxscript', 'torch.onnx') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# (in, out, kernel, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding, height, width, bias,
# channels_last); bias and layout vary across the geometries rather than multiplying them (each export
# takes seconds).
CONV_RELU_POOL_CASES = [
    pytest.param((3, 8, 3, 1, 1, 2, None, False, 0, 16, 16, True, False), id="3x3-pool2"),
    pytest.param((3, 8, 3, 1, 1, 2, None, False, 0, 16, 16, False, True), id="3x3-pool2-no_bias-channels_last"),
    pytest.param((3, 8, 5, 1, 2, 2, None, True, 0, 15, 13, True, True), id="ceil_mode-channels_last"),
    pytest.param((4, 6, 3, 2, 1, 3, 2, False, 0, 17, 19, False, False), id="stride2-pool3-stride2-no_bias"),
    # Pooled height: 12 -> 4 with PyTorch's rule that drops a last window starting past the input.
    pytest.param((4, 6, 3, 1, 0, (2, 3), (3, 2), True, 0, 14, 17, True, False), id="pool_stride-over-size-ceil_mode"),
    # A ResNet stem: conv 7x7/2, max pool 3x3/2 with padding 1.
    pytest.param((3, 8, 7, 2, 3, 3, 2, False, 1, 32, 29, False, True), id="resnet_stem-pool_padding"),
    # Convolution 8x9. Pooled height: ceil((8 + 2 - 2) / 3) + 1 = 4 -> 3, PyTorch's rule dropping a
    # last window that would start in the right padding; width: ceil((9 + 4 - 4) / 3) + 1 = 4, the
    # last window starting inside.
    pytest.param((3, 5, 2, 1, 0, (2, 4), 3, True, (1, 2), 9, 10, True, False), id="pool_padding-ceil_mode"),
]


@pytest.mark.parametrize("case", CONV_RELU_POOL_CASES)
def test_conv2d_relu_max_pool2d_exports_as_conv_relu_maxpool(case):
    c_in, c_out, kernel, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding, height, width, bias, channels_last = case
    torch.manual_seed(0)
    layer = cnn.Conv2dReLUMaxPool2d(
        c_in, c_out, kernel, stride, padding, bias, pool_size, pool_stride, ceil_mode, pool_padding
    )
    nodes = node_types(exported_and_checked(layer, image(2, c_in, height, width, channels_last=channels_last)))
    assert nodes == ["Conv", "Relu", "MaxPool"]


@pytest.mark.parametrize("affine, channels_last", [(True, False), (False, True)], ids=["affine", "no_affine-channels_last"])
def test_batch_norm2d_exports_as_batch_normalization(affine, channels_last):
    layer = randomise_running_statistics(cnn.BatchNorm2d(5, eps=1e-3, affine=affine))
    nodes = node_types(exported_and_checked(layer, image(3, 5, 6, 7, channels_last=channels_last)))
    assert nodes.count("BatchNormalization") == 1 and not {"Conv", "Relu", "MaxPool"} & set(nodes)


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 9)])
def test_batch_norm1d_exports_as_batch_normalization(shape):
    layer = randomise_running_statistics(cnn.BatchNorm1d(6))
    assert node_types(exported_and_checked(layer, image(*shape))) == ["BatchNormalization"]


@pytest.mark.parametrize("bias, channels_last", [(True, False), (False, True)], ids=["bias", "no_bias-channels_last"])
def test_conv2d_batch_norm_relu_max_pool2d_exports_folded_into_conv(bias, channels_last):
    torch.manual_seed(0)
    layer = cnn.Conv2dBatchNormReLUMaxPool2d(
        3, 8, 3, padding=1, bias=bias, pool_size=3, pool_stride=2, ceil_mode=True, pool_padding=1
    )
    layer = randomise_running_statistics(layer)
    nodes = node_types(exported_and_checked(layer, image(2, 3, 12, 11, channels_last=channels_last)))
    # Evaluation folds the batch norm into the convolution (as the op itself does); the
    # exporter's optimizer folds that arithmetic on the initializers into constants.
    assert nodes == ["Conv", "Relu", "MaxPool"]


@pytest.mark.parametrize("stride", [1, 2])
def test_batch_norm_relu_conv2d_exports_as_batch_normalization_relu_conv(stride):
    # onnxruntime checks the Conv node's attributes: its dilations must name both dimensions.
    torch.manual_seed(0)
    layer = randomise_running_statistics(cnn.BatchNormReLUConv2d(4, 6, 3, stride=stride, padding=1))
    proto = exported_and_checked(layer, image(2, 4, 9, 8))
    assert node_types(proto) == ["BatchNormalization", "Relu", "Conv"]
    (conv,) = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert {attribute.name: list(attribute.ints) for attribute in conv.attribute}["dilations"] == [1, 1]


def test_fused_torchvision_resnet18_exports_and_computes_the_same():
    torch.manual_seed(0)
    model = randomise_running_statistics(torchvision.models.resnet18(num_classes=10))
    fused = cifarnet.fuse(model).eval()
    input = image(2, 3, 32, 32)
    nodes = node_types(exported_and_checked(fused, input))
    assert nodes.count("Conv") == 20 and nodes.count("MaxPool") == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(input), model.eval()(input), rtol=1e-4, atol=1e-4)


def test_batch_statistics_fail_to_export_naming_the_reason():
    layer = cnn.BatchNorm2d(4, track_running_stats=False)  # batch statistics in eval too
    with pytest.raises(Exception, match="batch statistics"):
        export(layer.eval(), image(2, 4, 5, 5))


def test_study_convnet_full_exports_and_takes_any_batch_size():
    torch.manual_seed(0)
    model = randomise_running_statistics(ConvNet("full", "fused")).eval()
    proto = exported_and_checked(model, image(2, 3, 28, 28), dynamic_shapes=({0: torch.export.Dim("batch")},))
    nodes = node_types(proto)
    assert nodes.count("Conv") == 3 and nodes.count("Relu") == 4 and nodes.count("MaxPool") == 3
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}  # no custom-op domain
    other_batch = image(5, 3, 28, 28)
    with torch.no_grad():
        assert_close_float32(run_onnx(proto, other_batch), model(other_batch))


def test_fused_torchvision_vgg11_bn_exports_and_computes_the_same():
    torch.manual_seed(0)
    # NB: the features, where fuse puts every fused layer; VGG's classifier (400 MB of Linear
    # weights) would only slow the export down.
    model = randomise_running_statistics(torchvision.models.vgg11_bn(num_classes=10).features)
    fused = cifarnet.fuse(model).eval()
    input = image(2, 3, 32, 32, channels_last=True)
    nodes = node_types(exported_and_checked(fused, input))
    assert nodes.count("Conv") == 8 and nodes.count("MaxPool") == 5 and nodes.count("Relu") == 8
    with torch.no_grad():
        torch.testing.assert_close(fused(input), model.eval()(input), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# What has no ONNX translation fails saying which op, and the way out


def export_error(model, input: torch.Tensor) -> str:
    """The messages of the exception ``torch.onnx.export`` raises and of its causes, joined."""
    with pytest.raises(Exception) as caught:
        export(model, input)
    messages, error = [], caught.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")  # torch's own advice; training mode is the point
def test_fused_conv_batch_norm_layer_in_training_fails_naming_the_op_and_eval_mode():
    layer = cnn.Conv2dBatchNormReLUMaxPool2d(3, 4, 3, padding=1).train()
    message = export_error(layer, image(2, 3, 8, 8))
    assert "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training" in message
    assert "batch statistics" in message and "model.eval()" in message
    assert "No ONNX function found" not in message


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")  # torch's own advice; training mode is the point
def test_batch_norm_in_training_fails_naming_the_op_and_eval_mode():
    message = export_error(cnn.BatchNorm2d(4).train(), image(2, 4, 5, 5))
    assert "cifarnet::_batch_norm_forward" in message and "model.eval()" in message


def test_a_decomposed_program_fails_naming_the_decomposed_op_and_the_way_out():
    layer = cnn.Conv2dReLUMaxPool2d(3, 4, 3).eval()
    input = image(2, 3, 8, 8)
    program = torch.export.export(layer, (input,))
    message = export_error(program.run_decompositions(), input)
    assert "cifarnet::conv2d_relu_max_pool2d_with_argmax" in message and "run_decompositions" in message
    assert "No ONNX function found" not in message
    # The way out the message gives: the program as torch.export.export returns it.
    with torch.no_grad():
        assert_close_float32(run_onnx(export(program, input), input), layer(input))


def all_cifarnet_ops() -> list:
    """Every op overload of the cifarnet namespace, from the dispatcher."""
    # NB: torch has no public listing of a namespace's ops; this private one fails clearly.
    assert hasattr(torch._C, "_dispatch_get_all_op_names"), f"torch {torch.__version__} removed it"
    names = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("cifarnet::"))
    assert "cifarnet::conv2d_relu_max_pool2d" in names
    overloads = []
    for name in names:
        packet = getattr(torch.ops.cifarnet, name.split("::")[1].split(".")[0])
        overloads += [getattr(packet, overload) for overload in packet.overloads()]
    return overloads


def test_every_op_the_exporter_can_meet_has_a_translation_or_a_reason():
    """Composite ops decompose before translation (an entry would keep them whole); every
    other op either translates or fails export with a message that names it."""
    implicit = torch._C.DispatchKey.CompositeImplicitAutograd
    for op in all_cifarnet_ops():
        if op in ONNX_TRANSLATIONS:
            continue
        assert op.has_kernel_for_dispatch_key(implicit), f"{op} has neither an ONNX translation nor a composite kernel"
    for op in ONNX_TRANSLATIONS:
        whole = op is torch.ops.cifarnet.conv2d_relu_max_pool2d.default  # kept whole on purpose
        composite = op.has_kernel_for_dispatch_key(implicit)
        assert whole or not composite, f"{op} is composite: an entry would stop its decomposition"


def test_untranslatable_ops_fail_naming_themselves():
    for op, translation in ONNX_TRANSLATIONS.items():
        if translation.__name__.endswith("_has_no_onnx_translation"):
            with pytest.raises(NotImplementedError, match=f"{op.name()} .*has no ONNX translation; "):
                translation()


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")  # torch's own advice; training mode is the point
def test_dropout_in_training_exports_as_nn_dropout_does():
    input = image(8, 64).abs() + 1  # no zeros: a zero output is a dropped element
    native = export(nn.Sequential(nn.Dropout(0.3)).train(), input)
    ours = export(nn.Sequential(cnn.Dropout(0.3)).train(), input)
    assert node_types(ours) == node_types(native) == ["Dropout"]
    output = run_onnx(ours, input)
    kept = output != 0
    torch.testing.assert_close(output[kept], input[kept] / 0.7, rtol=1e-6, atol=0)
    assert 0.5 < kept.float().mean().item() < 0.9
    evaluated = export(nn.Sequential(cnn.Dropout(0.3)).eval(), input)
    assert torch.equal(run_onnx(evaluated, input), input)


class GeneratorDropout(nn.Module):
    """A layer, then dropout keyed by the input device's generator (what a CUDA model runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, input):
        return torch.ops.cifarnet.dropout(self.fc(input), None, 0.3)


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_dropout_without_a_seed_exports_as_nn_dropout_does():
    """The op stays one node (its autograd formula's ops never reach the exporter), though the
    layer before it takes gradients."""
    input = image(8, 64)
    assert node_types(export(GeneratorDropout().train(), input)) == ["Gemm", "Dropout"]
