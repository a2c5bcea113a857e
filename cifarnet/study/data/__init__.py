"""CIFAR-10 for the study: loading, a decode cache, batch-wise augmentation and mini-batches.

Two layouts of ``data_dir`` are recognised:

* the official pickles, ``data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}`` (torchvision's ``datasets.CIFAR10`` format; ``data_dir`` may also be the
  ``cifar-10-batches-py`` folder itself). When ``data_dir`` holds no data set, it is downloaded
  there with ``torchvision.datasets.CIFAR10(download=True)``, which checks the archive's md5.
* image folders, ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` with the ten
  CIFAR-10 class names (as in ``../shared/cifar10-jpeg``). These are decoded once and cached as
  uint8 tensors under :func:`default_cache_dir` (never next to the data, which may be
  read-only), keyed by the folder's absolute path and the names, sizes and mtimes of its files.
  Classes are interleaved (the first file of each class, then the second, ...), so the first
  N images, as ``limit_train`` takes them, are balanced like the official shuffled batches.

Everything is held in memory as ``uint8`` ``Tensor[N, 3, 32, 32]``; cropping, flipping,
scaling and normalisation run on whole mini-batches (:class:`BatchLoader`).

Modules: :mod:`.dataset` (the splits in memory), :mod:`.pickles` and :mod:`.image_folders` (the
two layouts), :mod:`.loading` (``load_cifar10``), :mod:`.augment` and :mod:`.batches`.
"""

from cifarnet.study.data.augment import (
    CROP_SIZE,
    MEAN,
    STD,
    center_crop,
    crop_flip,
    normalize,
    random_crop_flip,
    to_float,
)
from cifarnet.study.data.batches import BatchLoader, make_loaders
from cifarnet.study.data.dataset import (
    CIFAR10,
    CLASSES,
    IMAGE_SIZE,
    DataError,
    Split,
    default_cache_dir,
    default_data_dir,
    shortfall,
)
from cifarnet.study.data.loading import detect_layout, load_cifar10

__all__ = [
    "CLASSES",
    "CROP_SIZE",
    "IMAGE_SIZE",
    "MEAN",
    "STD",
    "BatchLoader",
    "CIFAR10",
    "DataError",
    "Split",
    "center_crop",
    "crop_flip",
    "default_cache_dir",
    "default_data_dir",
    "detect_layout",
    "load_cifar10",
    "make_loaders",
    "normalize",
    "random_crop_flip",
    "shortfall",
    "to_float",
]
