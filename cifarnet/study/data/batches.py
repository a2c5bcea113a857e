"""Mini-batches of a split, prepared as a variant asks, a few thousand images at a time."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from cifarnet.study.data.augment import CROP_SIZE, center_crop, crop_flip, draw_crop_flip, normalize, to_float
from cifarnet.study.data.dataset import CIFAR10, Split
from cifarnet.study.distributed import shard_bounds
from cifarnet.study.variants import Recipe

# Batches are prepared this many images at a time (about 40 MB of float32 crops): per-batch
# tensor ops are small enough that their fixed costs dominate, and on a machine whose cores
# are shared, each parallel op's thread synchronisation can cost more than its work.
PREPARE_CHUNK = 4096


class BatchLoader:
    """Mini-batches ``(inputs, labels)`` of a :class:`Split`, prepared as a variant asks.

    Training loaders shuffle with ``generator`` each epoch and, where the recipe augments, take
    random 28×28 crops with random flips; test loaders keep the order and, where the recipe
    augments, take centre crops. Inputs are scaled to [0, 1] and, where the recipe normalises,
    normalised. The last batch may be smaller (nothing is dropped). Batches are prepared a few
    thousand images at a time and yielded as views of that chunk.

    With ``world_size`` > 1 the loader yields process ``rank``'s slice of each batch of
    ``batch_size`` (the global batch; see :func:`cifarnet.study.distributed.shard_bounds`). Every
    process draws the whole order and the whole batch's crops and flips from ``generator``, as a
    single process does, and prepares only its own slice: so a step of ``world_size`` processes
    sees exactly the samples, and crops, of a step of one process, and the generator's state
    does not depend on the number of processes. A slice may be empty in a last batch smaller
    than ``world_size``; it is skipped.

    Args:
        split: the images and labels.
        batch_size: examples per batch.
        recipe: the variant's :class:`cifarnet.study.variants.Recipe`.
        train: training (shuffled, randomly augmented) or test (fixed) batches.
        generator: CPU generator for shuffling and augmentation; required when ``train``.
            Its state after an epoch decides the next epoch, so saving it makes runs resumable.
        device: where the batches go; pixels travel as uint8 and are converted there.
        rank: the process whose slice of each batch to yield, from 0.
        world_size: the processes that share each batch.
        memory_format: the inputs' layout (``torch.channels_last`` for a model that runs in
            it; the pixels are rearranged while still uint8).

    Yields:
        ``float32`` ``Tensor[B, 3, S, S]`` (S = 28 where the recipe augments, else 32) and
        ``int64`` ``Tensor[B]``, on ``device``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        recipe: Recipe,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in 0..world_size-1 and world_size at least 1; got rank {rank}, world_size {world_size}"
            )
        if train and generator is None:
            raise ValueError("generator is required for a training loader (it shuffles and augments)")
        self.split = split
        self.batch_size = batch_size
        self.recipe = recipe
        self.train = train
        self.generator = generator
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.memory_format = memory_format

    def __len__(self) -> int:
        """The number of (global) batches."""
        return math.ceil(len(self.split) / self.batch_size)

    def global_batch_size(self, index: int) -> int:
        """The examples in batch ``index`` (from 0) over all processes: ``batch_size``, or
        fewer in the last batch."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        return min(self.batch_size, len(self.split) - index * self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count = len(self.split)
        order = torch.randperm(count, generator=self.generator) if self.train else None
        # Whole batches per chunk, so the batches do not depend on the chunk size.
        chunk = self.batch_size * max(1, PREPARE_CHUNK // self.batch_size)
        for chunk_start in range(0, count, chunk):
            chunk_stop = min(chunk_start + chunk, count)
            # This process's slice of each batch of the chunk, as positions in the chunk.
            slices = []
            for batch_start in range(0, chunk_stop - chunk_start, self.batch_size):
                batch_count = min(self.batch_size, chunk_stop - chunk_start - batch_start)
                first, last = shard_bounds(batch_count, self.world_size, self.rank)
                slices.append((batch_start + first, batch_start + last))
            keep = None if self.world_size == 1 else torch.cat([torch.arange(a, b) for a, b in slices])
            inputs, labels = self._prepare(order, chunk_start, chunk_stop, keep)
            offset = 0
            for first, last in slices:
                if last > first:
                    yield inputs[offset : offset + last - first], labels[offset : offset + last - first]
                offset += last - first

    def _prepare(self, order: Tensor | None, start: int, stop: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inputs and labels of examples ``start:stop`` (of ``order`` where shuffled), only
        those at the positions ``keep`` (of ``start:stop``) where given."""
        if order is not None:
            indices = order[start:stop]
        else:
            indices = None if keep is None else torch.arange(start, stop)
        if keep is not None:
            indices = indices[keep]
        if indices is None:
            images, labels = self.split.images[start:stop], self.split.labels[start:stop]
        else:
            images, labels = self.split.images[indices], self.split.labels[indices]
        if self.recipe.augment:
            if self.train:
                # Drawn for the whole chunk, as one process draws them, whatever this process keeps.
                _, _, height, width = self.split.images.shape
                top, left, flip = draw_crop_flip(stop - start, height, width, CROP_SIZE, self.generator)
                if keep is not None:
                    top, left, flip = top[keep], left[keep], flip[keep]
                images = crop_flip(images, top, left, flip, CROP_SIZE)
            else:
                images = center_crop(images, CROP_SIZE)
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking).contiguous(memory_format=self.memory_format)
        inputs = to_float(images)  # keeps the layout, as normalize does
        if self.recipe.normalize:
            inputs = normalize(inputs)
        return inputs, labels.to(self.device, non_blocking=non_blocking)


def make_loaders(
    data: CIFAR10,
    recipe: Recipe,
    batch_size: int,
    generator: torch.Generator,
    *,
    device: str | torch.device = "cpu",
    limit_train: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[BatchLoader, BatchLoader]:
    """The training and test :class:`BatchLoader` of a variant.

    Args:
        data: the loaded data set.
        recipe: the variant's recipe (normalisation, augmentation).
        batch_size: examples per batch, for both loaders.
        generator: CPU generator for shuffling and augmenting the training set.
        device: where the batches go.
        limit_train: use only the first ``limit_train`` training images (None: all).
        rank, world_size: yield process ``rank``'s slice of each batch (see :class:`BatchLoader`).
        memory_format: the inputs' layout.

    Returns:
        ``(train_loader, test_loader)``.
    """
    if limit_train is not None and limit_train < 1:
        raise ValueError(f"limit_train must be at least 1; got {limit_train}")
    train = data.train.head(limit_train) if limit_train is not None else data.train
    common = {"device": device, "rank": rank, "world_size": world_size, "memory_format": memory_format}
    return (
        BatchLoader(train, batch_size, recipe, train=True, generator=generator, **common),
        BatchLoader(data.test, batch_size, recipe, train=False, **common),
    )
