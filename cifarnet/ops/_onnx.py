"""ONNX translations of the fused ops, so ``torch.onnx.export(model, args, dynamo=True)`` exports
models with cifarnet layers as standard ONNX nodes.

The dynamo exporter captures the model with ``torch.export``, decomposes it, then translates each
op with an ONNX Script function from its registry. What reaches the translation step, for a model
in evaluation mode:

- ``conv2d_relu_max_pool2d`` stays whole (a functional composite op, which the exporter keeps
  when the registry translates it) and becomes ``Conv -> Relu -> MaxPool``.
- ``batch_norm`` (a composite op that may update running statistics) decomposes into
  ``_batch_norm_forward``, which becomes ``BatchNormalization``.
- ``conv2d_batch_norm_relu_max_pool2d`` decomposes as it runs in evaluation: the batch norm
  folded into the convolution's weight and bias (a few ``Mul``/``Sqrt`` on initializers, which
  the exporter's optimizer folds into constants), then ``conv2d_relu_max_pool2d``:
  ``Conv -> Relu -> MaxPool``, the graph ONNX runtimes make of ``Conv -> BatchNormalization``
  anyway.

- ``dropout`` (in training; in evaluation it is the input itself) becomes ONNX ``Dropout`` in
  training mode, as ``nn.Dropout`` in training exports: a mask drawn by the runtime.

Every other op of the namespace that the exporter does not decompose has an entry that fails
the export with a message naming the op, what brought it there and the way out (see
:func:`no_onnx_translation`), where the exporter alone would say "No ONNX function found": batch
norm with batch statistics (a model in training mode, or no running statistics), the training
op of ``conv2d_batch_norm_relu_max_pool2d``, the ops of synchronized batch norm, the backward
ops, and ``conv2d_relu_max_pool2d_with_argmax`` (what an ``ExportedProgram`` holds after
``run_decompositions()``). Export the model, or its ``torch.export.export`` program as it
comes, in ``model.eval()``.

NB: ``torch.onnx.export`` has no public hook that makes a translation apply to every export (its
``custom_translation_table`` argument applies to one call), so :func:`_register_with_exporter`
adds the translations to the list the exporter builds its registry from at each export, a
private one in ``torch.onnx``; tests/test_onnx.py fails clearly when torch changes it. That
happens when ``torch.onnx``'s registry module is first imported (at once if it already is), so
``import cifarnet`` imports neither ``torch.onnx`` nor ``onnxscript``; without ``onnxscript``,
which the exporter needs too, nothing is registered.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

import torch

_MIN_OPSET = 18  # the opset the translations' ops are written against (onnxscript opset18)


def pads(padding) -> list[int]:
    """``[top, left, bottom, right]`` ONNX pads of a symmetric torch ``(pad_h, pad_w)``."""
    return [padding[0], padding[1], padding[0], padding[1]]


def per_channel_or(value, fill: float, input):
    """``value``, or a ``Tensor[C]`` of ``fill`` in ``input``'s dtype when ``value`` is None."""
    from onnxscript import opset18 as op

    if value is not None:
        return value
    channels = op.Shape(input, start=1, end=2)
    return op.Expand(op.CastLike(op.Constant(value_float=fill), input), channels)


ONNX_TRANSLATIONS = {}
"""op overload -> its ONNX Script translation, filled by :func:`onnx_translation` and
:func:`no_onnx_translation` in each op's module; what :func:`_register_with_exporter`
registers, and usable as ``torch.onnx.export``'s ``custom_translation_table``."""


def onnx_translation(target):
    """Decorator: the function translates the op overload ``target`` to ONNX."""

    def register(function):
        ONNX_TRANSLATIONS[target] = function
        return function

    return register


EXPORT_IN_EVAL_MODE = "export the model in evaluation mode (model.eval())"
"""The way out for the ops a model runs in training only."""

BACKWARD = "a backward op, for the gradients", "ONNX export is of the forward: " + EXPORT_IN_EVAL_MODE
"""``what`` and ``way_out`` of :func:`no_onnx_translation` for a backward op."""


def no_onnx_translation(target, what: str, way_out: str = EXPORT_IN_EVAL_MODE) -> None:
    """Registers for the op overload ``target``, which has no ONNX translation, an entry that
    fails the export with ``NotImplementedError("<op> (<what>) has no ONNX translation;
    <way_out>")``, where the exporter alone would say "No ONNX function found for <op>".

    NB: only for ops the exporter does not decompose: an entry for a composite op (one with a
    CompositeImplicitAutograd kernel) would keep it whole, where it decomposes into ops that
    translate.
    """
    message = f"{target.name()} ({what}) has no ONNX translation; {way_out}"

    def refuse(*args, **kwargs):
        raise NotImplementedError(message)

    refuse.__name__ = refuse.__qualname__ = f"{target.name().split('::')[1]}_has_no_onnx_translation"
    ONNX_TRANSLATIONS[target] = refuse


_EXPORTER_REGISTRY_MODULE = "torch.onnx._internal.exporter._registration"
# Loaders made for one module each (find_spec returns a new one), so patching one patches no other.
_FILE_LOADERS = (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)


def _register_with_exporter() -> None:
    """Add :data:`ONNX_TRANSLATIONS` to the list every ``torch.onnx.export(dynamo=True)`` builds
    its registry from (idempotent)."""
    # NB: private torch.onnx API, used here only; tests/test_onnx.py checks that an exporter
    # registry built after `import cifarnet` translates every op in ONNX_TRANSLATIONS.
    from torch.onnx._internal.exporter import _registration
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    registered = {meta.fx_target for meta in _torchlib_registry._registry}
    for target, function in ONNX_TRANSLATIONS.items():
        if target not in registered:
            _torchlib_registry._registry.append(
                _registration.OnnxDecompMeta(
                    onnx_function=function,
                    fx_target=target,
                    signature=None,
                    is_custom=True,
                    opset_introduced=_MIN_OPSET,
                )
            )


class _RegisterAfterExporterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_with_exporter` right after the exporter's registry module is first
    imported, so ``import cifarnet`` does not import ``torch.onnx`` and ``onnxscript`` (half a
    second) for programs that never export."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _EXPORTER_REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not find this finder
        spec = importlib.util.find_spec(fullname)
        if spec is not None and isinstance(spec.loader, _FILE_LOADERS):
            exec_module = spec.loader.exec_module

            def exec_module_then_register(module):
                del spec.loader.exec_module  # the loader's own method again, for any later module
                exec_module(module)
                _register_with_exporter()

            spec.loader.exec_module = exec_module_then_register
        return spec


def register_when_exporting() -> None:
    """Registers :data:`ONNX_TRANSLATIONS` with the exporter now if it is loaded, else as soon as
    it loads (called once, after every op module has added its translations)."""
    if _EXPORTER_REGISTRY_MODULE in sys.modules:
        _register_with_exporter()
    elif importlib.util.find_spec("onnxscript") is not None:  # without it the exporter cannot run
        sys.meta_path.insert(0, _RegisterAfterExporterImport())
