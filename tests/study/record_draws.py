"""``python tests/study/record_draws.py RECORD cifarnet-train-arguments...``: runs ``cifarnet-train``
as ``python -m cifarnet.study train`` would, and saves this process's random draws to
``RECORD.rank<RANK>.pt`` (tests/study/test_distributed.py starts it as each process of a run).

What it saves: for each training epoch, in order, a dict with

* ``"crops"``: ``int64`` ``Tensor[3, N]`` per prepared chunk, the ``top``, ``left`` and ``flip``
  of the crops this process applied (see :func:`cifarnet.study.data.crop_flip`; patched where
  :mod:`cifarnet.study.data.batches` calls it);
* ``"masks"``: ``bool`` ``Tensor[B, F]`` per training batch, the mask the model's dropout drew
  (True: kept).

A mask is read without disturbing the run: a forward pre-hook saves torch's CPU random state,
lets the dropout module draw on a tensor of ones (its draws depend on the state and the shape,
not the values), and restores the state, so the module's own call draws that mask again; a
forward hook checks that it did.
"""

from __future__ import annotations

import os
import sys

import torch

import cifarnet.study.data.batches as batches
import cifarnet.study.train.loop as loop
from cifarnet.study.cli import train_main

epochs: list[dict[str, list[torch.Tensor]]] = []

original_crop_flip = batches.crop_flip
original_epoch = loop.epoch


def recording_crop_flip(images, top, left, flip, size):
    epochs[-1]["crops"].append(torch.stack([top, left, flip.long()]))
    return original_crop_flip(images, top, left, flip, size)


def recording_epoch(batches, model, criterion, optimizer=None, **options):
    if optimizer is not None:  # a training epoch; the test epochs draw nothing
        epochs.append({"crops": [], "masks": []})
    return original_epoch(batches, model, criterion, optimizer, **options)


def draw_mask(module, args):
    if not module.training:
        return
    state = torch.get_rng_state()
    with torch.no_grad():
        mask = module.forward(torch.ones_like(args[0])) != 0  # forward: not the hooks again
    torch.set_rng_state(state)
    epochs[-1]["masks"].append(mask)


def check_mask(module, args, output):
    if module.training:
        drawn = epochs[-1]["masks"][-1]
        if not torch.equal(output != 0, drawn & (args[0] != 0)):
            raise AssertionError("the dropout module drew another mask than the recorded one")


class RecordingConvNet(loop.ConvNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.dropout, torch.nn.Dropout):
            raise ValueError(f"variant {self.variant!r} has no dropout to record")
        self.dropout.register_forward_pre_hook(draw_mask)
        self.dropout.register_forward_hook(check_mask)


if __name__ == "__main__":
    record = sys.argv[1]
    batches.crop_flip = recording_crop_flip
    loop.epoch = recording_epoch
    loop.ConvNet = RecordingConvNet
    status = train_main(sys.argv[2:])
    torch.save(epochs, f"{record}.rank{os.environ.get('RANK', '0')}.pt")
    sys.exit(status)
