"""``Dropout``: ``nn.Dropout`` computed by :func:`cifarnet.ops.dropout`."""

from __future__ import annotations

from torch import Tensor, nn

from cifarnet import ops
from cifarnet.nn._fx import leaf_call


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`cifarnet.ops.dropout`: one pass with a counter-based
    mask, where native CPU dropout takes three (draw, scale, multiply). Same arguments, same
    behaviour in evaluation mode (the input itself), no state; its masks differ from native's
    for the same ``torch.manual_seed``. On CUDA the mask is keyed on the device by the CUDA
    generator's Philox state, as native dropout's is, so it may be captured in a CUDA graph
    (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``): every replay draws a new
    mask. With ``inplace=True`` the result is written back into
    the input, as ``nn.Dropout(inplace=True)`` leaves it. Under ``torch.fx.symbolic_trace`` it
    is a leaf, as ``nn.Dropout`` is: the traced model calls it and follows ``.train()`` /
    ``.eval()``."""

    def forward(self, input: Tensor) -> Tensor:
        call = leaf_call(self, input)
        if call is not None:
            return call
        output = ops.dropout(input, self.p, self.training)
        if self.inplace and output is not input:
            return input.copy_(output)
        return output

    @classmethod
    def from_dropout(cls, dropout: nn.Dropout) -> Dropout:
        """The cifarnet counterpart of an ``nn.Dropout`` (same ``p``, ``inplace`` and mode)."""
        module = cls(dropout.p, dropout.inplace)
        module.train(dropout.training)
        return module

    def to_native(self) -> nn.Dropout:
        """An ``nn.Dropout`` with this module's arguments and mode."""
        module = nn.Dropout(self.p, self.inplace)
        module.train(self.training)
        return module
