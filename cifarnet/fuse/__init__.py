"""``cifarnet.fuse(model)``: the fused layers in any model, and ``cifarnet.unfuse`` to take them out.

:func:`fuse` finds every ``Conv2d -> ReLU -> MaxPool2d`` and ``Conv2d -> BatchNorm2d -> ReLU ->
MaxPool2d`` chain of a model and computes it with one fused op, and every ``BatchNorm2d -> ReLU
-> Conv2d`` chain whose convolution heads no such chain (ResNet blocks, DenseNet layers) with
another, keeping the trained tensors.

**State dicts keep their keys.** The modules that hold tensors stay where they are, so a fused
model's ``state_dict()`` has the original's keys in the original order and checkpoints load
both ways strictly:

- the convolution's position (``features.0``, ``conv1``) gets a fused layer
  (:class:`FusedConv2dReLUMaxPool2d`, :class:`FusedConv2dBatchNormReLUMaxPool2d` or
  :class:`FusedBatchNormReLUConv2d`) that owns the convolution's own ``Parameter`` objects as
  ``weight`` and ``bias``;
- the batch norm stays registered at its position and the fused layer reads it at every call
  through a reference to the *module* (not a child, so no second key): module references see
  what ``.to()``, ``.double()`` and ``load_state_dict`` do to its buffers, and
  :func:`cifarnet.nn.batch_norm_arguments` applies torch's rules (mode, momentum,
  ``num_batches_tracked``) to it, so running statistics evolve exactly as unfused.

**Two ways to rewrite**, chosen per module:

- *Positions* (the model keeps its class). When every chain is a run of consecutive children of
  an ``nn.Sequential`` (``vgg11().features``), the positions are swapped in place: fused layer at
  the convolution's, a :class:`FusedBatchNorm2d` (the same parameters and buffers, an identity
  ``forward``) at the batch norm's, and :class:`FusedIdentity` at the ReLU's and the pool's;
  ``nn.Sequential.forward`` then computes the chain once, in its convolution's child.
- *Graph* (the model becomes a ``torch.fx.GraphModule`` with the same class name). Chains
  written in ``forward`` (``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.max_pool2d``,
  ``torch.max_pool2d``, modules called by attribute) are found in the model's ``torch.fx``
  graph; the convolution's node calls the fused layer (on the batch norm's input, for batch
  norm -> ReLU -> conv) and the other nodes are removed. Augmented assignments
  (``out += identity``) stay in place, as written (torch.fx alone makes them out of place). The
  other modules stay registered untouched, and the GraphModule adopts the model's whole module
  tree, parameters, buffers, hooks and plain attributes, so every name, key and container
  (``model.features[0]``) is where it was.

Tracing decides both: it shows where each output goes, so a chain whose intermediate output is
used elsewhere is never fused. ``forward`` is traced in training and in evaluation mode,
without touching a buffer outside the graph. Where it branches on ``self.training`` (auxiliary
outputs in training only), the graph of the mode the module is in is kept, and in the other
mode the module's own ``forward`` runs, unfused (the report's checks say so). Input checks
such as ``if input.dim() != 4: raise ValueError(...)`` do not stop the trace: every way
through ``forward``'s branches on traced values is tried, and when exactly one of them traces
(the others raise or cannot be traced) that one is kept, with each branch condition checked
at run time. An input that fails a check runs the module's own ``forward``
instead, on the same tensors with the graph's fused layers back to ``nn.Conv2d``: it raises
what the original raises (the ``ValueError``, or the user's own exception type) or, on a way
the graph does not hold, returns what the original returns. A module that cannot be traced
is left as it is, except that its plain ``nn.Sequential`` children are rewritten by position
and its other children are tried in turn; :func:`fuse` warns, naming it. A ``forward`` that
switches grad mode or autocast, or assigns an attribute, counts as untraceable: the graph would
record neither. A module with hooks stays a call in its parent's graph (its hooks then run at
every call) and is fused on its own; a module held under two names is fused once. The
GraphModule keeps the traced class's own ``train()``; where a submodule traced into the graph
is in the other mode than the one the graph holds, the module's own ``forward`` runs, as it
does where a module traced into or a module of a fused chain (the fused layer included) was
replaced or hooked after fusing. An ``nn.Sequential`` rewritten by position computes each
chain at its convolution's index: a slice ending inside a chain returns the pooled output.

Chains the fused ops cannot compute (dilation, groups, padding modes, dilated or
index-returning pools, pools padded by more than half their window, which native refuses too,
windows over 255 elements, batch-norm subclasses, synchronized batch norms before a ReLU ->
conv, hooked modules, reused outputs, modules called more than once, convolutions and batch
norms shared by two modules) stay unfused and are listed, with the reason, in the
:class:`FusionReport`. Padded pools, such as ResNet's and DenseNet's stems (max pool 3x3, stride
2, padding 1), fuse.

:func:`unfuse` puts back ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.MaxPool2d`` and the
modules' own classes (and so their own ``forward``), sharing the same tensors, for people
without cifarnet; it also turns the :mod:`cifarnet.nn` layers of any model into torch modules
(their ``to_native()``).

The modules of this package, each readable on its own: :mod:`.rewrite` (``fuse``),
:mod:`.unfuse`, :mod:`.patterns` (finding chains), :mod:`.tracing` (``torch.fx`` tracing),
:mod:`.graph_module` (the GraphModule of a traced module), :mod:`.layers` (the fused modules),
:mod:`.report` and :mod:`._torch_internals` (the private torch behaviour fuse relies on).
"""

from cifarnet.fuse.layers import (
    FusedBatchNorm2d,
    FusedBatchNormReLUConv2d,
    FusedConv2dBatchNormReLUMaxPool2d,
    FusedConv2dReLUMaxPool2d,
    FusedIdentity,
)
from cifarnet.fuse.report import Chain, FusionReport
from cifarnet.fuse.rewrite import fuse
from cifarnet.fuse.unfuse import unfuse

# NB: models pickled before fuse became a package name these classes and functions as
# cifarnet.fuse.<name>; they stay importable from here so that such models load.
from cifarnet.fuse._torch_internals import _rename_graph_module  # noqa: E402, F401  isort: skip
from cifarnet.fuse.graph_module import (  # noqa: E402, F401  isort: skip
    _check_branch,
    _FusedGraphModule,
    _TracedFrom,
    _unpickle_fused_graph_module,
)
from cifarnet.fuse.layers import _Step  # noqa: E402, F401  isort: skip
from cifarnet.fuse.tracing import _Tracer  # noqa: E402, F401  isort: skip

__all__ = [
    "Chain",
    "FusedBatchNorm2d",
    "FusedBatchNormReLUConv2d",
    "FusedConv2dBatchNormReLUMaxPool2d",
    "FusedConv2dReLUMaxPool2d",
    "FusedIdentity",
    "FusionReport",
    "fuse",
    "unfuse",
]
