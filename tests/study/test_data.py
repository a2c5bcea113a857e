"""Data loading (both layouts, cache, errors) and the batch-wise augmentation."""

from __future__ import annotations

import multiprocessing
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarnet.study.data import batches as batches_module
from cifarnet.study.data import image_folders, pickles
from cifarnet.study.data import (
    CLASSES,
    MEAN,
    STD,
    CIFAR10,
    BatchLoader,
    DataError,
    Split,
    center_crop,
    crop_flip,
    load_cifar10,
    make_loaders,
    normalize,
    random_crop_flip,
    shortfall,
    to_float,
)
from cifarnet.study.variants import recipe
from cifar10_fakes import CLASS_NAMES, make_split, write_folders, write_pickles

TRAIN_COUNT, TEST_COUNT = 60, 30


@pytest.fixture
def splits():
    return make_split(TRAIN_COUNT, seed=1), make_split(TEST_COUNT, seed=2)


@pytest.fixture
def balanced_splits():
    return make_split(TRAIN_COUNT, seed=3, round_robin=True), make_split(TEST_COUNT, seed=4, round_robin=True)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def assert_split_equals(split, images, labels):
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert torch.equal(split.images, torch.from_numpy(images))
    assert torch.equal(split.labels, torch.from_numpy(labels))


def load_error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_cifar10(*args, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# --- the two layouts --------------------------------------------------------------------------


def test_official_class_order():
    assert CLASSES == CLASS_NAMES


@pytest.mark.parametrize("point_at", ["root", "batches folder"])
def test_pickle_layout_gives_the_written_arrays(tmp_path, splits, point_at):
    folder = write_pickles(tmp_path, *splits)
    data = load_cifar10(tmp_path if point_at == "root" else folder, download=False, progress=False)
    assert data.layout == "pickle"
    assert_split_equals(data.train, *splits[0])
    assert_split_equals(data.test, *splits[1])


def test_pickle_layout_matches_torchvision_reader(tmp_path, splits, monkeypatch):
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

    write_pickles(tmp_path, *splits)
    # torchvision insists on the official md5 sums, which generated batches cannot have.
    monkeypatch.setattr(TorchvisionCIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(pickles, "download", lambda data_dir: pytest.fail("must not download"))
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = TorchvisionCIFAR10(str(tmp_path), train=True)
    data = load_cifar10(tmp_path, progress=False)
    assert torch.equal(data.train.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert data.train.labels.tolist() == reference.targets


def test_png_folders_equal_pickles(tmp_path, balanced_splits, cache_dir):
    pickled = load_cifar10(write_pickles(tmp_path / "pickles", *balanced_splits), progress=False)
    folders = load_cifar10(write_folders(tmp_path / "folders", *balanced_splits), cache_dir=cache_dir, progress=False)
    assert folders.layout == "folders"
    for ours, theirs in ((folders.train, pickled.train), (folders.test, pickled.test)):
        assert torch.equal(ours.images, theirs.images)
        assert torch.equal(ours.labels, theirs.labels)


def test_folders_interleave_classes_so_prefixes_are_balanced(tmp_path, splits, cache_dir):
    data = load_cifar10(write_folders(tmp_path, *splits), cache_dir=cache_dir, progress=False)
    labels = data.train.labels.tolist()
    # Every class present in the first 10 images, as long as all classes still have files.
    smallest_class = min(np.bincount(splits[0][1], minlength=10))
    for start in range(0, 10 * smallest_class, 10):
        assert sorted(labels[start : start + 10]) == list(range(10))
    assert sorted(labels) == sorted(splits[0][1].tolist())


def test_jpeg_folders_decode_as_pil_does(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits, extension="jpg")
    data = load_cifar10(root, cache_dir=cache_dir, progress=False)
    first_cat = root / "train" / "cat" / "0000.jpg"
    expected = np.array(Image.open(first_cat).convert("RGB")).transpose(2, 0, 1)
    cat = CLASSES.index("cat")
    index = data.train.labels.tolist().index(cat)
    assert torch.equal(data.train.images[index], torch.from_numpy(expected))


def test_grayscale_and_palette_images_become_rgb(tmp_path, balanced_splits, cache_dir):
    root = write_folders(tmp_path, *balanced_splits)
    gray = np.arange(1024, dtype=np.uint16).reshape(32, 32) % 256
    path = root / "test" / "dog" / "0000.png"
    Image.fromarray(gray.astype(np.uint8), mode="L").save(path)
    data = load_cifar10(root, cache_dir=cache_dir, progress=False)
    dog = data.test.labels.tolist().index(CLASSES.index("dog"))
    assert torch.equal(data.test.images[dog], torch.from_numpy(gray.astype(np.uint8)).expand(3, 32, 32))


def test_worker_pool_decodes_like_the_main_process(tmp_path, splits, cache_dir, monkeypatch):
    root = write_folders(tmp_path, *splits)
    serial = load_cifar10(root, cache_dir=cache_dir / "serial", workers=1, progress=False)
    monkeypatch.setattr(image_folders, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(image_folders, "DECODE_CHUNK", 7)  # several chunks, one of them short
    pooled = load_cifar10(root, cache_dir=cache_dir / "pooled", workers=2, progress=False)
    assert torch.equal(serial.train.images, pooled.train.images)
    assert torch.equal(serial.test.images, pooled.test.images)


# --- the decode cache -------------------------------------------------------------------------


def test_second_load_comes_from_the_cache(tmp_path, splits, cache_dir, monkeypatch):
    root = write_folders(tmp_path / "data", *splits)
    first = load_cifar10(root, cache_dir=cache_dir, progress=False)
    assert len(list(cache_dir.glob("*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(image_folders, "_decode_images", no_decoding)
    second = load_cifar10(root, cache_dir=cache_dir, progress=False)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)


def test_changed_files_invalidate_the_cache(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path / "data", *splits)
    load_cifar10(root, cache_dir=cache_dir, progress=False)
    path = root / "train" / "ship" / "0000.png"
    replacement = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(replacement).save(path)
    os.utime(path, ns=(1, 1))  # a different mtime for certain, whatever the clock resolution
    data = load_cifar10(root, cache_dir=cache_dir, progress=False)
    ship = data.train.labels.tolist().index(CLASSES.index("ship"))
    assert torch.equal(data.train.images[ship], torch.full((3, 32, 32), 7, dtype=torch.uint8))
    # The stale copy is gone (each is a whole data set); another folder's cache stays.
    other = write_folders(tmp_path / "other", *splits)
    load_cifar10(other, cache_dir=cache_dir, progress=False)
    os.utime(path, ns=(2, 2))
    # A cache file named as cifarnet named them before they began with the folder's key.
    (cache_dir / ("0123456789abcdef" * 2 + ".pt")).write_bytes(b"an old decoded data set")
    load_cifar10(root, cache_dir=cache_dir, progress=False)
    assert len(list(cache_dir.glob("*.pt"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path / "data", *splits)
    first = load_cifar10(root, cache_dir=cache_dir, progress=False)
    (cache_file,) = cache_dir.glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable decode cache"):
        second = load_cifar10(root, cache_dir=cache_dir, progress=False)
    assert torch.equal(first.train.images, second.train.images)


def test_nothing_is_written_into_the_data_folder(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path / "data", *splits)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    load_cifar10(root, cache_dir=cache_dir, progress=False)
    load_cifar10(root, cache_dir=cache_dir, progress=False)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_default_cache_dir_follows_xdg_cache_home(tmp_path, splits, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_cifar10(write_folders(tmp_path / "data", *splits), progress=False)
    assert len(list((tmp_path / "xdg" / "cifarnet" / "decoded").glob("*.pt"))) == 1


def test_unwritable_cache_only_warns(tmp_path, splits):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the decode cache"):
        data = load_cifar10(write_folders(tmp_path / "data", *splits), cache_dir=blocker / "cache", progress=False)
    assert len(data.train) == TRAIN_COUNT


# --- errors -----------------------------------------------------------------------------------


def test_missing_data_without_download(tmp_path):
    message = load_error(tmp_path / "nothing", download=False)
    assert str(tmp_path / "nothing") in message and "cifar-10-batches-py" in message


def test_failed_download_is_one_clean_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    message = load_error(tmp_path / "fresh")
    assert "downloading https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz failed" in message
    assert "Name or service not known" in message and str(tmp_path / "fresh") in message
    assert not (tmp_path / "fresh").exists()


def test_failed_download_removes_the_folders_it_created(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def partial_download(url, download_root, filename=None, **kwargs):
        (Path(download_root) / filename).write_bytes(b"half an archive")
        raise urllib.error.URLError("[Errno 104] Connection reset by peer")

    monkeypatch.setattr(cifar, "download_and_extract_archive", partial_download)
    message = load_error(tmp_path / "new" / "cifar")
    assert "Connection reset by peer" in message and str(tmp_path / "new" / "cifar") in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_download_leaves_an_existing_folder_as_it_was(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def partial_download(url, download_root, filename=None, **kwargs):
        (Path(download_root) / filename).write_bytes(b"half an archive")
        (Path(download_root) / "cifar-10-batches-py").mkdir()
        (Path(download_root) / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half a batch")
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(cifar, "download_and_extract_archive", partial_download)
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    (data_dir / ".hidden-by-the-user").write_text("keep")
    assert "No space left on device" in load_error(data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == [".hidden-by-the-user"]


def test_interrupted_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def interrupted(url, download_root, filename=None, **kwargs):
        (Path(download_root) / filename).write_bytes(b"a third of an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar, "download_and_extract_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_cifar10(tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_download_never_goes_into_a_folder_of_other_things(tmp_path, monkeypatch):
    monkeypatch.setattr(pickles, "download", lambda data_dir: pytest.fail("must not download"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("")
    message = load_error(tmp_path)
    assert "notes.txt, photos" in message


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    assert "is a file" in load_error(tmp_path / "file")


def test_truncated_pickle(tmp_path, splits):
    folder = write_pickles(tmp_path, *splits)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    message = load_error(tmp_path, download=False)
    assert str(batch) in message and "truncated" in message


def test_missing_batch(tmp_path, splits):
    folder = write_pickles(tmp_path, *splits)
    (folder / "test_batch").unlink()
    assert f"{folder / 'test_batch'} is missing" in load_error(tmp_path, download=False)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"data": np.zeros((2, 3072), np.uint8)}, "'labels'"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "ints in 0..9"),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, "uint8 [N, 3072]"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "uint8 [N, 3072]"),
        ([1, 2, 3], "'data'"),
    ],
)
def test_malformed_batch(tmp_path, splits, entry, expected):
    import pickle

    folder = write_pickles(tmp_path, *splits)
    with open(folder / "data_batch_1", "wb") as file:
        pickle.dump(entry, file)
    message = load_error(tmp_path, download=False)
    assert "data_batch_1 is not a CIFAR-10 batch" in message and expected in message


def test_wrong_label_names(tmp_path, splits):
    import pickle

    folder = write_pickles(tmp_path, *splits)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": list(reversed(CLASS_NAMES))}, file)
    assert "label_names" in load_error(tmp_path, download=False)


def test_corrupt_image(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits)
    bad = root / "train" / "frog" / "0001.png"
    bad.write_bytes(b"this is not an image")
    message = load_error(root, cache_dir=cache_dir)
    assert f"{bad} is not a readable image" in message


def test_truncated_jpeg(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits, extension="jpg")
    bad = root / "test" / "horse" / "0000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    assert f"{bad} is not a readable image" in load_error(root, cache_dir=cache_dir)


def test_corrupt_image_found_by_a_worker(tmp_path, splits, cache_dir, monkeypatch):
    root = write_folders(tmp_path, *splits)
    bad = root / "test" / "truck" / "0000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    monkeypatch.setattr(image_folders, "POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(image_folders, "DECODE_CHUNK", 5)
    assert f"{bad} is not a readable image" in load_error(root, cache_dir=cache_dir, workers=2)
    assert multiprocessing.active_children() == []


def test_wrong_image_size(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits)
    bad = root / "train" / "bird" / "0000.png"
    Image.new("RGB", (31, 32)).save(bad)
    assert f"{bad} is 31x32 pixels; expected 32x32" in load_error(root, cache_dir=cache_dir)


def test_missing_class_folder(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits)
    for path in (root / "test" / "deer").iterdir():
        path.unlink()
    (root / "test" / "deer").rmdir()
    message = load_error(root, cache_dir=cache_dir)
    assert str(root / "test") in message and "missing deer" in message and ", ".join(CLASSES) in message


def test_unexpected_class_folder(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits)
    (root / "train" / "unicorn").mkdir()
    assert "unexpected unicorn" in load_error(root, cache_dir=cache_dir)


def test_empty_class_folder(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits)
    for path in (root / "train" / "cat").iterdir():
        path.unlink()
    assert f"{root / 'train' / 'cat'} holds no images" in load_error(root, cache_dir=cache_dir)


def test_train_without_test(tmp_path, splits, cache_dir):
    root = write_folders(tmp_path, *splits)
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    assert f"{root / 'test'} is missing" in load_error(root, cache_dir=cache_dir)


# --- augmentation -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(1, 6),
    height=st.integers(28, 36),
    width=st.integers(28, 36),
    size=st.integers(1, 28),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.uint8, torch.float32]),
)
def test_crop_flip_equals_torchvision(count, height, width, size, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(count, 3, height, width, generator=generator) * 255).to(dtype)
    top = torch.randint(0, height - size + 1, (count,), generator=generator)
    left = torch.randint(0, width - size + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    ours = crop_flip(images, top, left, flip, size)
    for n in range(count):
        expected = TF.crop(images[n], int(top[n]), int(left[n]), size, size)
        if flip[n]:
            expected = TF.hflip(expected)
        assert torch.equal(ours[n], expected)


def test_center_crop_equals_torchvision():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(center_crop(images, 28), T.CenterCrop(28)(images))


def test_scaling_and_normalisation_equal_torchvision():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    pipeline = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    expected = torch.stack([pipeline(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
    torch.testing.assert_close(normalize(to_float(images)), expected, rtol=0, atol=0)
    expected_raw = torch.stack([T.ToTensor()(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
    torch.testing.assert_close(to_float(images), expected_raw, rtol=0, atol=0)


REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "cifar10-jpeg"


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real CIFAR-10 not found at {REAL_DATA}")
def test_mean_and_std_are_the_training_images_statistics():
    """MEAN is the training pixels' mean per channel (to its three decimals); STD is, as in the
    widely copied (0.2023, 0.1994, 0.2010), the per-image standard deviation averaged over the
    images, not the pixels' (about 0.25), to within 2e-3."""
    images = load_cifar10(REAL_DATA, download=False, progress=False).train.images
    pixels = images.to(torch.float64) / 255
    mean = pixels.mean((0, 2, 3))
    per_image_std = pixels.std((2, 3)).mean(0)
    torch.testing.assert_close(torch.tensor(MEAN, dtype=torch.float64), mean, rtol=0, atol=6e-4)
    torch.testing.assert_close(torch.tensor(STD, dtype=torch.float64), per_image_std, rtol=0, atol=2e-3)


def whole_cifar10_labels(per_class: int) -> torch.Tensor:
    return torch.arange(len(CLASSES)).repeat_interleave(per_class)


def test_shortfall_names_a_split_cut_short_and_its_thinnest_class():
    def data_with(train_labels, test_labels):
        split = lambda labels: Split(torch.zeros(len(labels), 3, 1, 1, dtype=torch.uint8), labels)
        return CIFAR10(split(train_labels), split(test_labels), "folders", Path("/data"))

    train, test = whole_cifar10_labels(5000), whole_cifar10_labels(1000)
    assert shortfall(data_with(train, test)) is None
    cats_short = torch.cat([train[train != 3], torch.full((5,), 3)])
    assert shortfall(data_with(cats_short, test)) == (
        "/data holds 45,005 training images (5 of class cat), where CIFAR-10 has 50,000 and 10,000, 5,000 and 1,000 "
        "of each class: the figures are not comparable with the study's"
    )
    # The right total is not enough: every class must hold its tenth.
    unbalanced = torch.cat([test[test != 9], torch.zeros(1000, dtype=torch.int64)])
    assert shortfall(data_with(train, unbalanced)).startswith("/data holds 10,000 test images (0 of class truck), where")


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real CIFAR-10 not found at {REAL_DATA}")
def test_the_real_data_set_has_no_shortfall():
    assert shortfall(load_cifar10(REAL_DATA, download=False, progress=False)) is None


def test_random_crop_offsets_are_uniform_and_flips_fair():
    count = 50_000
    # Each pixel holds its own position, so the crop tells where it was taken and whether flipped.
    positions = torch.arange(32 * 32, dtype=torch.int32).view(1, 1, 32, 32)
    crops = random_crop_flip(positions.expand(count, 1, 32, 32), 28, torch.Generator().manual_seed(2024))
    first, second = crops[:, 0, 0, 0], crops[:, 0, 0, 1]
    flipped = second < first
    top = first // 32
    left = torch.where(flipped, first % 32 - 27, first % 32)
    assert top.min() == 0 and top.max() == 4 and left.min() == 0 and left.max() == 4
    # Each crop must be a contiguous, possibly mirrored, 28x28 window.
    expected = crop_flip(positions.expand(count, 1, 32, 32), top.long(), left.long(), flipped, 28)
    assert torch.equal(crops, expected)

    cells = torch.bincount((top * 5 + left) * 2 + flipped.int(), minlength=50).double()
    offsets = cells.view(25, 2).sum(1)
    chi_square_offsets = ((offsets - count / 25) ** 2 / (count / 25)).sum().item()
    chi_square_joint = ((cells - count / 50) ** 2 / (count / 50)).sum().item()
    assert chi_square_offsets < 51.18  # chi-square, 24 degrees of freedom, p = 0.001
    assert chi_square_joint < 85.35  # 49 degrees of freedom, p = 0.001: flips independent of offsets
    assert abs(flipped.double().mean().item() - 0.5) < 4 * (0.25 / count) ** 0.5


def test_random_crop_flip_draws_offsets_per_image():
    images = torch.arange(32 * 32, dtype=torch.int32).view(1, 1, 32, 32).expand(64, 1, 32, 32)
    crops = random_crop_flip(images, 28, torch.Generator().manual_seed(0))
    assert len({int(v) for v in crops[:, 0, 0, 0]}) > 10


def test_crop_flip_rejects_mismatched_offsets():
    with pytest.raises(ValueError, match=r"top must be a Tensor\[3\]"):
        crop_flip(torch.zeros(3, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                  torch.zeros(3, dtype=torch.bool), 28)
    with pytest.raises(ValueError, match="size must be in 1..32"):
        crop_flip(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  torch.zeros(1, dtype=torch.bool), 33)


# --- batches ----------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path, splits):
    return load_cifar10(write_pickles(tmp_path, *splits), progress=False)


@pytest.mark.parametrize("variant, size", [("baseline", 32), ("normalized", 32), ("augmented", 28), ("full", 28)])
def test_batches_have_the_variants_shape_and_scale(dataset, variant, size):
    train, test = make_loaders(dataset, recipe(variant), 16, torch.Generator().manual_seed(0))
    for loader in (train, test):
        inputs, labels = next(iter(loader))
        assert inputs.shape == (16, 3, size, size) and inputs.dtype == torch.float32
        assert labels.dtype == torch.int64
    inputs, labels = next(iter(test))
    expected = to_float(center_crop(dataset.test.images[:16], 28) if size == 28 else dataset.test.images[:16])
    if variant != "baseline":
        expected = normalize(expected)
    assert torch.equal(inputs, expected) and torch.equal(labels, dataset.test.labels[:16])


@pytest.mark.parametrize("chunk", [1, 40, 4096])
def test_training_batches_are_a_shuffled_epoch(dataset, monkeypatch, chunk):
    monkeypatch.setattr(batches_module, "PREPARE_CHUNK", chunk)
    loader = BatchLoader(dataset.train, 16, recipe("normalized"), train=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 12]
    seen = torch.cat([inputs for inputs, _ in batches])
    expected = normalize(to_float(dataset.train.images))
    # Every training image exactly once: match each batch row to its source image.
    matches = (seen.flatten(1)[:, None, :] == expected.flatten(1)[None, :, :]).all(-1)
    assert torch.equal(matches.sum(0), torch.ones(TRAIN_COUNT, dtype=torch.long))
    order = matches.int().argmax(1)
    assert not torch.equal(order, torch.arange(TRAIN_COUNT))
    assert torch.equal(torch.cat([labels for _, labels in batches]), dataset.train.labels[order])


def test_test_batches_do_not_depend_on_the_chunk_size(dataset, monkeypatch):
    loader = BatchLoader(dataset.test, 8, recipe("full"), train=False)
    whole = list(loader)
    monkeypatch.setattr(batches_module, "PREPARE_CHUNK", 1)
    for (a, la), (b, lb) in zip(whole, list(loader), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert [len(labels) for _, labels in whole] == [8, 8, 8, 6]  # 30 test images


@pytest.mark.parametrize("variant", ["baseline", "full"])
def test_channels_last_batches_hold_the_same_values(dataset, variant):
    batches = {
        memory_format: list(BatchLoader(dataset.train, 16, recipe(variant), train=True, memory_format=memory_format,
                                        generator=torch.Generator().manual_seed(3)))
        for memory_format in (torch.contiguous_format, torch.channels_last)
    }  # fmt: skip
    for (a, la), (b, lb) in zip(*batches.values(), strict=True):
        assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_same_generator_state_gives_same_batches(dataset):
    generator = torch.Generator().manual_seed(5)
    loader = BatchLoader(dataset.train, 16, recipe("full"), train=True, generator=generator)
    list(loader)  # one epoch moves the generator on
    state = generator.get_state()
    second_epoch = list(loader)
    generator.set_state(state)
    again = list(loader)
    for (a, la), (b, lb) in zip(second_epoch, again):
        assert torch.equal(a, b) and torch.equal(la, lb)
    first_epoch = list(BatchLoader(dataset.train, 16, recipe("full"), train=True, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first_epoch[0][0], second_epoch[0][0])


def test_limit_train_takes_the_first_images(dataset):
    train, test = make_loaders(dataset, recipe("baseline"), 8, torch.Generator().manual_seed(0), limit_train=10)
    assert len(train.split) == 10 and torch.equal(train.split.images, dataset.train.images[:10])
    assert len(test.split) == TEST_COUNT
    with pytest.raises(ValueError, match="limit_train must be at least 1; got 0"):
        make_loaders(dataset, recipe("baseline"), 8, torch.Generator(), limit_train=0)


def test_training_loader_needs_a_generator(dataset):
    with pytest.raises(ValueError, match="generator is required"):
        BatchLoader(dataset.train, 8, recipe("full"), train=True)
