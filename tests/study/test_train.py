"""The epoch function, the schedules, and runs: outputs, checkpoints, exact resumption."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import cifarnet._cpu
import cifarnet.study.train.loop as train_module  # where train() looks up epoch()
from cifarnet.study.data import CIFAR10, DataError, Split, load_cifar10
from cifarnet.study.models import ConvNet
from cifarnet.study.results import read_run
from cifarnet.study.train import (
    EpochResult,
    TrainConfig,
    TrainingCollapsed,
    TrainingDiverged,
    epoch,
    load_checkpoint,
    make_optimizer,
    resolve_device,
    train,
)
from cifar10_fakes import make_split, write_pickles

EXPECTED_KEYS = [
    "epoch", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "test_classes_predicted",
    "lr", "seconds", "world_size", "train_images",
]
TRAIN_COUNT, TEST_COUNT, BATCH = 40, 20, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_pickles(root, make_split(TRAIN_COUNT, seed=11), make_split(TEST_COUNT, seed=12))
    return load_cifar10(root, progress=False)


def run(dataset, out, **settings):
    resume, overwrite = settings.pop("resume", False), settings.pop("overwrite", False)
    config = TrainConfig(**{"batch_size": BATCH, "epochs": 2, **settings})
    return train(config, out, data=dataset, device="cpu", resume=resume, overwrite=overwrite, progress=False)


def without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- epoch ------------------------------------------------------------------------------------


class ModeRecorder(nn.Module):
    """A linear classifier that records the train/eval mode and grad mode it ran in."""

    def __init__(self, features: int = 12, classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.modes = []

    def forward(self, x):
        self.modes.append((self.training, torch.is_grad_enabled()))
        return self.linear(x)


def make_batches(count=50, batch=16, features=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, features, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return inputs, labels, [(inputs[i : i + batch], labels[i : i + batch]) for i in range(0, count, batch)]


def test_evaluation_figures_are_those_of_the_whole_set():
    torch.manual_seed(0)
    model = ModeRecorder()
    inputs, labels, batches = make_batches()
    result = epoch(batches, model, nn.CrossEntropyLoss())
    logits = model.linear(inputs)
    ranked = logits.argsort(dim=1, descending=True)
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert result.top1 == pytest.approx(100 * (ranked[:, 0] == labels).double().mean().item())
    assert result.top5 == pytest.approx(100 * (ranked[:, :5] == labels[:, None]).any(1).double().mean().item())
    assert set(model.modes) == {(False, False)}
    assert len(result.batch_losses) == 4


def test_training_averages_over_the_moving_model():
    torch.manual_seed(0)
    model = ModeRecorder()
    before = model.linear.weight.detach().clone()
    _, _, batches = make_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = epoch(batches, model, nn.CrossEntropyLoss(), optimizer)
    assert set(model.modes) == {(True, True)}
    assert not torch.equal(before, model.linear.weight)
    sizes = [len(b[1]) for b in batches]
    weighted = sum(loss * size for loss, size in zip(result.batch_losses, sizes)) / sum(sizes)
    assert result.loss == pytest.approx(weighted)
    # The first batch's loss is that of the initial weights, before any step.
    first_inputs, first_labels = batches[0]
    torch.manual_seed(0)
    initial = ModeRecorder()
    assert torch.equal(initial.linear.weight, before)
    assert result.batch_losses[0] == pytest.approx(F.cross_entropy(initial.linear(first_inputs), first_labels).item())


def test_confusion_matrix_counts_every_example():
    torch.manual_seed(0)
    model = ModeRecorder()
    inputs, labels, batches = make_batches()
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    result = epoch(batches, model, nn.CrossEntropyLoss(), confusion=confusion)
    predicted = model.linear(inputs).argmax(1)
    expected = torch.zeros(10, 10, dtype=torch.int64)
    for t, p in zip(labels.tolist(), predicted.tolist()):
        expected[t, p] += 1
    assert torch.equal(confusion, expected)
    assert confusion.trace().item() == pytest.approx(result.top1 * len(labels) / 100)


def test_epoch_rejects_empty_data():
    with pytest.raises(ValueError, match="no batches"):
        epoch([], ModeRecorder(), nn.CrossEntropyLoss())


# --- schedules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, momentum, decays",
    [("baseline", 0.0, False), ("normalized", 0.0, False), ("augmented", 0.0, False),
     ("momentum", 0.9, True), ("dropout", 0.9, True), ("full", 0.9, True)],
)
def test_optimiser_and_schedule_per_variant(variant, momentum, decays):
    model = nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, TrainConfig(variant=variant, lr=0.1))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["fused"], "the CPU has torch's fused SGD kernel"
    assert optimizer.param_groups[0]["momentum"] == momentum
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert (scheduler is not None) == decays
    if decays:
        assert isinstance(scheduler, torch.optim.lr_scheduler.ExponentialLR) and scheduler.gamma == 0.95
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.95**3)


def test_fused_update_follows_the_per_tensor_sgd():
    # make_optimizer's fused kernel against torch's reference loop, momentum buffers included
    torch.manual_seed(0)
    model = nn.Linear(64, 32, dtype=torch.float64)
    reference = copy.deepcopy(model)
    optimizer, _ = make_optimizer(model, TrainConfig(variant="full", lr=0.1))
    loop = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=False)
    for _ in range(5):
        input = torch.randn(16, 64, dtype=torch.float64)
        for module, step in ((model, optimizer), (reference, loop)):
            step.zero_grad()
            module(input).square().mean().backward()
            step.step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="variant must be one of"):
        TrainConfig(variant="best")
    with pytest.raises(ValueError, match="epochs must be at least 1; got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive number; got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="ops must be one of fused, native"):
        TrainConfig(ops="fast")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda; got 'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


# --- runs -------------------------------------------------------------------------------------


def test_run_writes_metrics_plots_and_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    history = run(dataset, out, variant="momentum", epochs=2)
    lines = read_metrics(out)
    assert lines == history and [list(line) for line in lines] == [EXPECTED_KEYS] * 2
    assert [line["epoch"] for line in lines] == [1, 2]
    assert [line["lr"] for line in lines] == [0.1, pytest.approx(0.095)]
    for line in lines:
        assert 0 <= line["train_top1"] <= line["train_top5"] <= 100 and line["seconds"] > 0
        assert 0 <= line["test_top1"] <= line["test_top5"] <= 100
    rows = (out / "batch_losses.csv").read_text().splitlines()
    assert rows[0] == "epoch,batch,loss" and len(rows) == 1 + 2 * 3  # 40 images in batches of 16
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["history"] == history
    losses = [[float(r.split(",")[2]) for r in rows[1:] if r.startswith(f"{e},")] for e in (1, 2)]
    assert checkpoint["batch_losses"] == losses
    for e in (0, 1):
        sizes = [16, 16, 8]
        assert lines[e]["train_loss"] == pytest.approx(sum(l * s for l, s in zip(losses[e], sizes)) / 40)
    assert set(checkpoint["rng"]) >= {"torch", "python", "numpy", "data"}
    for name in ("curves.png", "batch_losses.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    assert sorted(p.name for p in out.iterdir()) == [
        "batch_losses.csv", "batch_losses.png", "checkpoint.pt", "curves.png", "metrics.jsonl"
    ]


def test_constant_learning_rate_before_momentum(dataset, tmp_path):
    assert [line["lr"] for line in run(dataset, tmp_path, variant="baseline", epochs=2)] == [0.1, 0.1]


def test_checkpoint_holds_the_trained_model(dataset, tmp_path):
    history = run(dataset, tmp_path, variant="augmented", epochs=1)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    model = ConvNet("augmented", "native")
    model.load_state_dict(checkpoint["model"])  # across ops, strictly
    from cifarnet.study.data import make_loaders
    from cifarnet.study.variants import recipe

    _, test = make_loaders(dataset, recipe("augmented"), BATCH, torch.Generator())
    result = epoch(test, model, nn.CrossEntropyLoss())
    assert result.top1 == pytest.approx(history[-1]["test_top1"])
    assert result.loss == pytest.approx(history[-1]["test_loss"], rel=1e-4)


@pytest.mark.parametrize("variant, ops", [("full", "fused"), ("dropout", "fused"), ("augmented", "native")])
def test_resumed_run_equals_uninterrupted_run(dataset, tmp_path, variant, ops):
    whole = run(dataset, tmp_path / "whole", variant=variant, ops=ops, epochs=3)
    run(dataset, tmp_path / "parts", variant=variant, ops=ops, epochs=1)
    resumed = run(dataset, tmp_path / "parts", variant=variant, ops=ops, epochs=3, resume=True)
    assert without_seconds(resumed) == without_seconds(whole)
    assert without_seconds(read_metrics(tmp_path / "parts")) == without_seconds(whole)
    assert (tmp_path / "parts" / "batch_losses.csv").read_text() == (tmp_path / "whole" / "batch_losses.csv").read_text()
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    whole_checkpoint = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    for key, value in whole_checkpoint["model"].items():
        assert torch.equal(parts["model"][key], value), key
    assert torch.equal(parts["rng"]["data"], whole_checkpoint["rng"]["data"])
    assert parts["scheduler"] == whole_checkpoint["scheduler"]
    for key, state in whole_checkpoint["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(parts["optimizer"]["state"][key][name], value), (key, name)


def test_run_killed_mid_epoch_resumes_exactly(dataset, tmp_path, monkeypatch):
    whole = run(dataset, tmp_path / "whole", variant="dropout", epochs=3)
    real_epoch = train_module.epoch
    calls = []

    def epoch_killed_in_second_training_pass(data, model, criterion, optimizer=None, **kwargs):
        calls.append(optimizer is not None)
        if calls.count(True) == 2 and optimizer is not None:
            def killed_after_one_batch():
                for index, batch in enumerate(data):
                    if index == 1:
                        raise KeyboardInterrupt
                    yield batch

            return real_epoch(killed_after_one_batch(), model, criterion, optimizer, **kwargs)
        return real_epoch(data, model, criterion, optimizer, **kwargs)

    monkeypatch.setattr(train_module, "epoch", epoch_killed_in_second_training_pass)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, tmp_path / "killed", variant="dropout", epochs=3)
    monkeypatch.setattr(train_module, "epoch", real_epoch)
    assert len(read_metrics(tmp_path / "killed")) == 1
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]
    resumed = run(dataset, tmp_path / "killed", variant="dropout", epochs=3, resume=True)
    assert without_seconds(resumed) == without_seconds(whole)


def test_metrics_lines_of_a_lost_epoch_are_dropped_on_resume(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, variant="baseline", epochs=1)
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 2, "half": "written"}\n')
    history = run(dataset, out, variant="baseline", epochs=2, resume=True)
    assert read_metrics(out) == history and len(history) == 2


def test_same_seed_same_metrics_other_seed_other_metrics(dataset, tmp_path):
    first = run(dataset, tmp_path / "a", variant="dropout", epochs=1, seed=3)
    second = run(dataset, tmp_path / "b", variant="dropout", epochs=1, seed=3)
    third = run(dataset, tmp_path / "c", variant="dropout", epochs=1, seed=4)
    assert without_seconds(first) == without_seconds(second)
    assert without_seconds(first) != without_seconds(third)


def test_resume_refuses_other_settings(dataset, tmp_path):
    run(dataset, tmp_path, variant="baseline", epochs=1)
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint.pt with different settings \(batch_size: 16 -> 8\)"):
        train(TrainConfig(variant="baseline", epochs=2, batch_size=8), tmp_path, data=dataset, device="cpu",
              resume=True, progress=False)


def test_resume_may_switch_ops_and_says_so(dataset, tmp_path, capsys):
    run(dataset, tmp_path, variant="baseline", ops="fused", epochs=1)
    capsys.readouterr()
    history = run(dataset, tmp_path, variant="baseline", ops="native", epochs=2, resume=True)
    assert [r["epoch"] for r in history] == [1, 2]
    assert "note: " in (printed := capsys.readouterr().out)
    assert "trained with fused ops and continues with native ops" in printed


class DtypeRecorder(nn.Module):
    """A linear classifier that records the dtype its output is computed in."""

    def __init__(self, features: int = 12, classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.dtypes = []

    def forward(self, x):
        logits = self.linear(x)
        self.dtypes.append(logits.dtype)
        return logits


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_epoch_runs_the_forward_under_autocast(autocast_dtype):
    model = DtypeRecorder()
    _, _, batches = make_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch(batches, model, nn.CrossEntropyLoss(), optimizer, autocast_dtype=autocast_dtype)
    assert set(model.dtypes) == {autocast_dtype or torch.float32}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("ops", ["fused", "native"])
def test_bfloat16_run_records_its_precision_and_resumes_exactly(dataset, tmp_path, ops):
    whole = run(dataset, tmp_path / "whole", variant="full", ops=ops, precision="bfloat16", epochs=2)
    run(dataset, tmp_path / "parts", variant="full", ops=ops, precision="bfloat16", epochs=1)
    resumed = run(dataset, tmp_path / "parts", variant="full", ops=ops, precision="bfloat16", epochs=2, resume=True)
    assert without_seconds(resumed) == without_seconds(whole)
    checkpoint = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert checkpoint["config"]["precision"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in checkpoint["model"].values() if t.is_floating_point())
    float32 = run(dataset, tmp_path / "float32", variant="full", ops=ops, epochs=2)
    assert without_seconds(float32) != without_seconds(whole)  # the precision did change the computation
    with pytest.raises(ValueError, match=r"different settings \(precision: 'bfloat16' -> 'float32'\)"):
        run(dataset, tmp_path / "parts", variant="full", ops=ops, epochs=3, resume=True)


@pytest.mark.parametrize(
    "system, machine, isa, warns",
    [
        ("Linux", "x86_64", ["AVX2"], True),
        ("Linux", "x86_64", ["AVX2", "AVX-512"], True),
        ("Linux", "x86_64", ["AVX2", "AVX-512", "AVX512-BF16"], False),
        ("Linux", "x86_64", ["AVX2", "AVX-512", "AVX512-BF16", "AMX-BF16"], False),
        ("Linux", "aarch64", [], False),  # instruction sets unknown: no warning
        ("Darwin", "x86_64", [], False),
    ],
)
def test_bfloat16_on_a_cpu_without_bfloat16_arithmetic_warns(dataset, tmp_path, monkeypatch, system, machine, isa, warns):
    monkeypatch.setattr(train_module.platform, "system", lambda: system)
    monkeypatch.setattr(train_module.platform, "machine", lambda: machine)
    monkeypatch.setattr(train_module, "cpu_info", lambda: {"model": "a CPU", "isa": isa, "last_level_cache_bytes": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(dataset, tmp_path / "bf16", variant="baseline", precision="bfloat16", epochs=1, limit_train=BATCH)
        run(dataset, tmp_path / "fp32", variant="baseline", epochs=1, limit_train=BATCH)
    emulated = [w for w in caught if "bfloat16 arithmetic is emulated" in str(w.message)]
    assert len(emulated) == (1 if warns else 0), [str(w.message) for w in caught]


def test_checkpoint_without_a_precision_resumes_as_float32(dataset, tmp_path):
    whole = run(dataset, tmp_path / "whole", variant="baseline", epochs=2)
    run(dataset, tmp_path / "parts", variant="baseline", epochs=1)
    path = tmp_path / "parts" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["precision"]  # as written before the setting existed
    torch.save(checkpoint, path)
    assert without_seconds(run(dataset, tmp_path / "parts", variant="baseline", epochs=2, resume=True)) == without_seconds(whole)


def test_config_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16; got 'float16'"):
        TrainConfig(precision="float16")


def test_resume_refuses_other_data(dataset, tmp_path):
    run(dataset, tmp_path, variant="baseline", epochs=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    images = dataset.train.images.clone()
    images[-1, 0, 0, 0] ^= 1  # one bit of one pixel
    other = CIFAR10(Split(images, dataset.train.labels), dataset.test, dataset.layout, dataset.root)
    # The same folder and counts: what differs is said, not two equal descriptions.
    changed = rf"cannot resume .*checkpoint.pt on other data: {re.escape(str(Path(dataset.root).resolve()))} no longer holds"
    with pytest.raises(ValueError, match=changed):
        run(other, tmp_path, variant="baseline", epochs=2, resume=True)
    fewer = CIFAR10(Split(images[:-1], dataset.train.labels[:-1]), dataset.test, dataset.layout, dataset.root)
    with pytest.raises(ValueError, match=r"on other data: it was trained on .*40 training.*, not on .*39 training"):
        run(fewer, tmp_path, variant="baseline", epochs=2, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_on_the_same_images_elsewhere_continues_with_a_note(dataset, tmp_path, capsys):
    whole = run(dataset, tmp_path / "whole", variant="baseline", epochs=2)
    run(dataset, tmp_path / "parts", variant="baseline", epochs=1)
    moved = CIFAR10(dataset.train, dataset.test, dataset.layout, tmp_path / "moved")
    capsys.readouterr()
    resumed = run(moved, tmp_path / "parts", variant="baseline", epochs=2, resume=True)
    assert without_seconds(resumed) == without_seconds(whole)
    assert f"{tmp_path / 'moved'} holds the same images" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["data"]["root"] == str(tmp_path / "moved")


def test_resume_on_other_threads_or_another_cpu_class_says_it_will_not_match_bit_for_bit(dataset, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(dataset, tmp_path, variant="baseline", epochs=1)
        path = tmp_path / "checkpoint.pt"
        recorded = load_checkpoint(path)["compute"]
        assert recorded == {"threads": 1, "isa": cifarnet._cpu.cpu_info()["isa"]}
        capsys.readouterr()
        run(dataset, tmp_path, variant="baseline", epochs=2, resume=True)  # the same: nothing said
        assert "other compute" not in capsys.readouterr().out
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["compute"] = {"threads": 3, "isa": ["AVX512F"]}  # as if written elsewhere
        torch.save(checkpoint, path)
        run(dataset, tmp_path, variant="baseline", epochs=3, resume=True)
        note = capsys.readouterr().out
        assert "continues on other compute (3 threads -> 1; a CPU with AVX512F ->" in note and "bit for bit" in note
    finally:
        torch.set_num_threads(threads)


def test_checkpoint_without_a_data_record_still_resumes(dataset, tmp_path, capsys):
    whole = run(dataset, tmp_path / "whole", variant="baseline", epochs=2)
    run(dataset, tmp_path / "parts", variant="baseline", epochs=1)
    path = tmp_path / "parts" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["data"]  # as written before the record existed
    torch.save(checkpoint, path)
    capsys.readouterr()
    resumed = run(dataset, tmp_path / "parts", variant="baseline", epochs=2, resume=True)
    assert without_seconds(resumed) == without_seconds(whole)
    assert "does not record the data it was trained on" in capsys.readouterr().out


def test_checkpoint_records_the_images_trained_on(dataset, tmp_path):
    run(dataset, tmp_path / "all", variant="baseline", epochs=1)
    run(dataset, tmp_path / "some", variant="baseline", epochs=1, limit_train=10)
    everything = load_checkpoint(tmp_path / "all" / "checkpoint.pt")["data"]
    some = load_checkpoint(tmp_path / "some" / "checkpoint.pt")["data"]
    assert everything["root"] == some["root"] == str(dataset.root.resolve())
    assert (everything["train_images"], some["train_images"]) == (TRAIN_COUNT, 10)
    assert everything["test_images"] == some["test_images"] == TEST_COUNT
    assert everything["sha256"] != some["sha256"]


# --- CUDA random states across machines (faked: the tests need no GPU) ------------------------


class FakeGPUs:
    """``torch.cuda``'s random-state functions on a machine with ``count`` GPUs: each GPU's
    state is its own tensor, and a GPU the machine lacks raises IndexError, as torch's own
    functions do (``torch.cuda.default_generators[index]``)."""

    def __init__(self, monkeypatch, count: int):
        self.states = [torch.full((8,), 100 + index, dtype=torch.uint8) for index in range(count)]
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get_rng_state(i) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [self.set_rng_state(state, i) for i, state in enumerate(states)])

    def _index(self, device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = 0 if device.index is None else device.index
        if index >= len(self.states):
            raise IndexError("tuple index out of range")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()


def test_cuda_random_state_resumes_on_a_machine_with_fewer_gpus(monkeypatch, capsys):
    from cifarnet.study.train.checkpoints import _rng_state, _set_rng_state

    trained_on = FakeGPUs(monkeypatch, 4)
    trained_on.states[2] = torch.arange(8, dtype=torch.uint8)
    state = _rng_state(torch.Generator(), torch.device("cuda", 2))  # the run trained on GPU 2 of 4
    resumed_on = FakeGPUs(monkeypatch, 1)
    _set_rng_state(state, torch.Generator(), torch.device("cuda", 0))
    assert torch.equal(resumed_on.states[0], torch.arange(8, dtype=torch.uint8))  # GPU 2's state, now GPU 0's
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("gpus_then, gpus_now", [(4, 2), (2, 2), (1, 4)])
def test_checkpoint_with_every_gpus_random_state_resumes_on_any_number_of_gpus(monkeypatch, capsys, gpus_then, gpus_now):
    from cifarnet.study.train.checkpoints import _rng_state, _set_rng_state

    state = _rng_state(torch.Generator(), torch.device("cpu"))
    saved = [torch.full((8,), index, dtype=torch.uint8) for index in range(gpus_then)]
    state["cuda"] = saved  # as checkpoints written before this fix hold them: one per GPU of the machine
    resumed_on = FakeGPUs(monkeypatch, gpus_now)
    _set_rng_state(state, torch.Generator(), torch.device("cuda", 0))
    restored = min(gpus_then, gpus_now)
    assert all(torch.equal(resumed_on.states[i], saved[i]) for i in range(restored))
    assert all(resumed_on.states[i][0] == 100 + i for i in range(restored, gpus_now))  # left as they were
    note = capsys.readouterr().out
    if gpus_then > gpus_now:
        assert f"the CUDA random states of {gpus_then} GPUs" in note and f"this machine has {gpus_now}" in note
    else:
        assert note == ""

# --- the output folder ------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused(dataset, tmp_path):
    run(dataset, tmp_path, variant="baseline", epochs=1, seed=1)
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint.pt, metrics.jsonl\); resume it"):
        run(dataset, tmp_path, variant="baseline", epochs=1, seed=2)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_resume_without_a_checkpoint_is_refused(dataset, tmp_path):
    run(dataset, tmp_path, variant="baseline", epochs=1, seed=1)
    (tmp_path / "checkpoint.pt").unlink()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"holds metrics.jsonl but no checkpoint.pt to resume from"):
        run(dataset, tmp_path, variant="baseline", epochs=1, seed=1, resume=True)
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics


def test_overwrite_replaces_the_run(dataset, tmp_path):
    run(dataset, tmp_path / "old", variant="baseline", epochs=2, seed=1)
    fresh = run(dataset, tmp_path / "fresh", variant="baseline", epochs=1, seed=2)
    replaced = run(dataset, tmp_path / "old", variant="baseline", epochs=1, seed=2, overwrite=True)
    assert without_seconds(replaced) == without_seconds(fresh)
    assert without_seconds(read_metrics(tmp_path / "old")) == without_seconds(fresh)
    assert load_checkpoint(tmp_path / "old" / "checkpoint.pt")["config"]["seed"] == 2


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(dataset, tmp_path):
    run(dataset, tmp_path, variant="baseline", epochs=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "not-data").write_text("")  # a data folder that is a file: refused without a download
    with pytest.raises(DataError):
        train(TrainConfig(variant="baseline", epochs=1), tmp_path, data_dir=tmp_path / "not-data",
              device="cpu", overwrite=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_an_interrupted_first_epoch_is_not_a_run_to_keep(dataset, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")  # what a run stopped in its first epoch leaves
    assert len(run(dataset, tmp_path, variant="baseline", epochs=1)) == 1


def test_resume_and_overwrite_exclude_each_other(dataset, tmp_path):
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        run(dataset, tmp_path, variant="baseline", epochs=1, resume=True, overwrite=True)


def test_output_folder_that_is_a_file(dataset, tmp_path):
    (tmp_path / "run").write_text("my notes")
    with pytest.raises(ValueError, match=r"output folder .*run: it is a text file, not a folder"):
        run(dataset, tmp_path / "run", variant="baseline", epochs=1)
    with pytest.raises(ValueError, match=r"output folder .*sub: .*run is a file, so no folder can be created under it"):
        run(dataset, tmp_path / "run" / "sub", variant="baseline", epochs=1)
    assert (tmp_path / "run").read_text() == "my notes"


def test_resume_without_checkpoint_starts_afresh(dataset, tmp_path):
    resumed = run(dataset, tmp_path / "new", variant="baseline", epochs=1, resume=True)
    fresh = run(dataset, tmp_path / "fresh", variant="baseline", epochs=1)
    assert without_seconds(resumed) == without_seconds(fresh)


def test_resume_of_a_finished_run_trains_nothing(dataset, tmp_path):
    history = run(dataset, tmp_path, variant="baseline", epochs=1)
    assert run(dataset, tmp_path, variant="baseline", epochs=1, resume=True) == history


def test_limit_train_shrinks_the_epoch(dataset, tmp_path, capsys):
    run(dataset, tmp_path, variant="baseline", epochs=1, limit_train=10)
    assert len(load_checkpoint(tmp_path / "checkpoint.pt")["batch_losses"][0]) == 1
    assert "note: limit_train" not in capsys.readouterr().out
    # More than there are: all of them, and a note saying so.
    history = run(dataset, tmp_path / "more", variant="baseline", epochs=1, limit_train=len(dataset.train) + 1)
    assert history[0]["train_images"] == len(dataset.train)
    assert f"note: limit_train {len(dataset.train) + 1} is more than the {len(dataset.train)} training images" in capsys.readouterr().out


class NotPlainData:
    pass


def test_unreadable_checkpoint(tmp_path):
    expected = "expected a checkpoint.pt written by cifarnet-train"
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"bad.pt is not a checkpoint: it is a text file; {expected}"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "zeros.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=f"zeros.pt is not a checkpoint: it is a file of 100 bytes in an unknown format; {expected}"):
        load_checkpoint(tmp_path / "zeros.pt")
    Image.new("RGB", (4, 4)).save(tmp_path / "image.pt", format="PNG")
    with pytest.raises(ValueError, match="image.pt is not a checkpoint: it is a PNG image"):
        load_checkpoint(tmp_path / "image.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor.pt is a torch file but not a cifarnet checkpoint: it holds a tensor of shape \(3,\)"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save(NotPlainData(), tmp_path / "object.pt")
    with pytest.raises(ValueError, match=r"object.pt is not a checkpoint: it is a torch file holding a Python object of type .*NotPlainData"):
        load_checkpoint(tmp_path / "object.pt")
    torch.save({"format": 7}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="has format 7; this cifarnet reads format 1"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"format": 1, "epoch": 1}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lacks config, model"):
        load_checkpoint(tmp_path / "partial.pt")
    torch.save({"format": 1, "model": torch.zeros(1000)}, tmp_path / "whole.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"truncated.pt is a damaged or truncated checkpoint: a ZIP archive of 2,000 bytes without its end"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_checkpoint_path_that_is_a_run_folder(dataset, tmp_path):
    run(dataset, tmp_path, variant="baseline", epochs=1)
    with pytest.raises(ValueError, match=r"is a folder; did you mean .*checkpoint.pt\?"):
        load_checkpoint(tmp_path)


def test_epoch_result_is_plain_data():
    assert EpochResult(1.0, 50.0, 90.0).batch_losses == []


# --- divergence and its remedies --------------------------------------------------------------


def nan_inputs_in_training_pass(real_epoch, calls, training_pass, batch_index):
    """An ``epoch`` that, in its ``training_pass``-th training pass, feeds NaN inputs at
    ``batch_index`` (from 0), so that batch's loss is NaN."""

    def patched(data, model, criterion, optimizer=None, **kwargs):
        calls.append(optimizer is not None)
        if optimizer is None or calls.count(True) != training_pass:
            return real_epoch(data, model, criterion, optimizer, **kwargs)

        def poisoned():
            for index, (inputs, labels) in enumerate(data):
                yield (torch.full_like(inputs, float("nan")) if index == batch_index else inputs), labels

        return real_epoch(poisoned(), model, criterion, optimizer, **kwargs)

    return patched


def test_a_nonfinite_loss_stops_the_run_at_that_batch_and_keeps_the_last_good_epoch(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(dataset, out, variant="momentum", epochs=1)
    kept = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "batch_losses.csv")}
    calls = []
    monkeypatch.setattr(train_module, "epoch", nan_inputs_in_training_pass(train_module.epoch, calls, 1, 1))
    with pytest.raises(TrainingDiverged) as info:
        run(dataset, out, variant="momentum", epochs=3, resume=True)
    assert calls == [True]  # stopped in the training pass: no test pass, no third epoch
    error = info.value
    assert (error.variant, error.epoch, error.batch) == ("momentum", 2, 2) and math.isnan(error.loss)
    assert str(error) == (
        "momentum epoch 2 batch 2: the loss is nan (training diverged); the study's schedule is at the edge of "
        "stability without batch norm: try clip_grad_norm=5.0 or warmup_epochs=1 (off by default)"
    )
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 2
    # Training again (here: resuming) forgets the divergence.
    monkeypatch.undo()
    assert len(run(dataset, out, variant="momentum", epochs=2, resume=True)) == 2
    assert not (out / "diverged.json").exists()


def test_a_nonfinite_test_loss_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(dataset, out, variant="momentum", epochs=1)
    kept = (out / "checkpoint.pt").read_bytes()
    real_epoch = train_module.epoch

    def nan_test_pass(data, model, criterion, optimizer=None, **kwargs):
        if optimizer is not None:
            return real_epoch(data, model, criterion, optimizer, **kwargs)
        return real_epoch([(torch.full_like(x, float("nan")), y) for x, y in data], model, criterion, **kwargs)

    monkeypatch.setattr(train_module, "epoch", nan_test_pass)
    with pytest.raises(TrainingDiverged, match=r"^momentum epoch 2 test pass: the test loss is nan"):
        run(dataset, out, variant="momentum", epochs=2, resume=True)
    assert (out / "checkpoint.pt").read_bytes() == kept and len(read_metrics(out)) == 1


def test_a_collapsed_network_stops_the_run(dataset, tmp_path, monkeypatch):
    # Conv biases far below zero: no input turns a ReLU on, no gradient reaches the convolutions
    # again, and the classifier sees zeros: one class for every image, the quiet failure of
    # `momentum` and `dropout` seeds (README), with a finite loss.
    real_epoch = train_module.epoch
    killed = []

    def dead_relus(data, model, criterion, optimizer=None, **kwargs):
        if optimizer is not None and not killed:
            killed.append(True)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name.startswith("conv") and name.endswith("bias"):
                        parameter.fill_(-1e4)
        return real_epoch(data, model, criterion, optimizer, **kwargs)

    out = tmp_path / "momentum-collapsed"
    run(dataset, out, variant="momentum", epochs=1)
    monkeypatch.setattr(train_module, "epoch", dead_relus)
    with pytest.raises(TrainingCollapsed) as info:
        run(dataset, out, variant="momentum", epochs=5, resume=True)
    error = info.value
    assert isinstance(error, TrainingDiverged) and (error.epoch, error.batch) == (2, None)
    assert str(error).startswith(
        "momentum epoch 2 test pass: the model gives every test image the same class and no gradient reached its "
        f"first layer in the whole epoch, test loss {error.loss:.4f} (training collapsed); the study's schedule"
    )
    assert len(read_metrics(out)) == 1  # the collapsed epoch is not kept, as a diverged one
    recorded = json.loads((out / "diverged.json").read_text())
    assert recorded["collapsed"] is True and recorded["epoch"] == 2
    assert read_run(out).status == "collapsed (one class for every test image, stopped after epoch 2)"


def test_a_metrics_line_without_a_figure_is_reported_not_a_key_error(tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.3, "test_loss": 2.2, "test_top1": 12.0, "seconds": 3.0}\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: epoch record 2 lacks train_loss, test_loss, test_top1, seconds; expected"):
        read_run(folder)


def test_training_reports_whether_the_first_layer_learned_and_how_many_classes_it_predicts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3))
    inputs, labels = torch.randn(16, 3, 2, 2), torch.arange(16) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = epoch([(inputs, labels)], model, nn.CrossEntropyLoss(), optimizer)
    assert trained.first_layer_learned is True and epoch([(inputs, labels)], model, nn.CrossEntropyLoss()).classes_predicted > 1
    with torch.no_grad():
        model[1].bias.fill_(-1e4)  # dead ReLUs: the output is the last layer's bias for every input
    assert epoch([(inputs, labels)], model, nn.CrossEntropyLoss(), optimizer).first_layer_learned is False
    assert epoch([(inputs, labels)], model, nn.CrossEntropyLoss()).classes_predicted == 1


def test_a_diverged_run_with_a_remedy_suggests_the_other(dataset, tmp_path, monkeypatch):
    real_epoch = train_module.epoch
    monkeypatch.setattr(train_module, "epoch", nan_inputs_in_training_pass(real_epoch, [], 1, 0))
    with pytest.raises(TrainingDiverged, match=r"epoch 1 batch 1: .*: try clip_grad_norm=5.0 \(off by default\)$"):
        run(dataset, tmp_path / "a", variant="dropout", epochs=1, warmup_epochs=1)
    monkeypatch.setattr(train_module, "epoch", nan_inputs_in_training_pass(real_epoch, [], 1, 0))
    with pytest.raises(TrainingDiverged, match=r": try a lower learning rate$"):
        run(dataset, tmp_path / "b", variant="dropout", epochs=1, warmup_epochs=1, clip_grad_norm=1.0)


def test_a_huge_learning_rate_diverges_and_stops(dataset, tmp_path):
    # The message blames the rate the user chose, not the study's schedule.
    with pytest.raises(TrainingDiverged, match=r"^momentum epoch 1 batch \d: the loss is (nan|inf) \(training diverged\); "
                       r"lr 1000000.0 is not the study's 0.1: try"):
        run(dataset, tmp_path, variant="momentum", epochs=3, lr=1e6)
    assert not (tmp_path / "checkpoint.pt").exists() and read_metrics(tmp_path) == []


def test_a_diverged_run_with_batch_norm_does_not_blame_its_absence(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "epoch", nan_inputs_in_training_pass(train_module.epoch, [], 1, 0))
    with pytest.raises(TrainingDiverged, match=r"^full epoch 1 batch 1: the loss is nan \(training diverged\); "
                       r"the study's schedule diverged here even with batch norm: try"):
        run(dataset, tmp_path, variant="full", epochs=1)


@pytest.fixture
def step_lrs():
    """The learning rate of every optimiser step taken while the fixture is active."""
    lrs = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"])
    )
    yield lrs
    handle.remove()


def test_warmup_raises_the_rate_linearly_per_batch_then_follows_the_schedule(dataset, tmp_path, step_lrs):
    history = run(dataset, tmp_path / "warm", variant="momentum", epochs=3, warmup_epochs=2)
    # 40 images in batches of 16: three steps per epoch, six in the warm-up.
    expected = [0.1 * 1 / 6, 0.1 * 2 / 6, 0.1 * 3 / 6, 0.095 * 4 / 6, 0.095 * 5 / 6, 0.095, 0.09025, 0.09025, 0.09025]
    assert step_lrs == pytest.approx(expected)
    assert [record["lr"] for record in history] == pytest.approx([0.1, 0.095, 0.09025])  # the schedule's
    checkpoint = load_checkpoint(tmp_path / "warm" / "checkpoint.pt")
    assert checkpoint["config"]["warmup_epochs"] == 2
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.95**3)
    step_lrs.clear()
    run(dataset, tmp_path / "study", variant="momentum", epochs=2)
    assert step_lrs == pytest.approx([0.1] * 3 + [0.095] * 3)


def test_warmup_on_a_constant_rate(dataset, tmp_path, step_lrs):
    run(dataset, tmp_path, variant="baseline", epochs=2, warmup_epochs=1)
    assert step_lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.1])


def test_clipping_bounds_every_step_gradient(dataset, tmp_path):
    norms = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        clipped = run(dataset, tmp_path / "clipped", variant="momentum", epochs=2, clip_grad_norm=0.05)
        clipped_norms, norms[:] = list(norms), []
        study = run(dataset, tmp_path / "study", variant="momentum", epochs=2)
    finally:
        handle.remove()
    assert len(clipped_norms) == 6 and max(clipped_norms) <= 0.05 * (1 + 1e-5)
    assert max(norms) > 0.05  # so the clipping did change something
    assert without_seconds(clipped) != without_seconds(study)
    assert load_checkpoint(tmp_path / "clipped" / "checkpoint.pt")["config"]["clip_grad_norm"] == 0.05


def test_a_run_with_remedies_resumes_exactly(dataset, tmp_path):
    settings = {"variant": "dropout", "warmup_epochs": 2, "clip_grad_norm": 1.0}
    whole = run(dataset, tmp_path / "whole", epochs=3, **settings)
    run(dataset, tmp_path / "parts", epochs=1, **settings)
    resumed = run(dataset, tmp_path / "parts", epochs=3, resume=True, **settings)
    assert without_seconds(resumed) == without_seconds(whole)


def test_checkpoint_without_remedies_resumes_without_them(dataset, tmp_path):
    whole = run(dataset, tmp_path / "whole", variant="momentum", epochs=2)
    run(dataset, tmp_path / "parts", variant="momentum", epochs=1)
    path = tmp_path / "parts" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["config"]["warmup_epochs"], checkpoint["config"]["clip_grad_norm"]  # as written before them
    torch.save(checkpoint, path)
    assert without_seconds(run(dataset, tmp_path / "parts", variant="momentum", epochs=2, resume=True)) == without_seconds(whole)
    with pytest.raises(ValueError, match=r"different settings \(warmup_epochs: 0 -> 1\)"):
        run(dataset, tmp_path / "parts", variant="momentum", epochs=3, warmup_epochs=1, resume=True)


def test_remedies_may_differ_only_for_a_complete_run(dataset, tmp_path, capsys):
    history = run(dataset, tmp_path, variant="momentum", epochs=1)
    capsys.readouterr()
    assert run(dataset, tmp_path, variant="momentum", epochs=1, clip_grad_norm=5.0, resume=True) == history
    assert "is a complete run trained with warmup_epochs=0, clip_grad_norm=None; it is kept" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"different settings \(clip_grad_norm: None -> 5.0\)"):
        run(dataset, tmp_path, variant="momentum", epochs=2, clip_grad_norm=5.0, resume=True)


def test_config_rejects_bad_remedies():
    with pytest.raises(ValueError, match="warmup_epochs must be 0 .* got -1"):
        TrainConfig(warmup_epochs=-1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_grad_norm must be a positive number"):
            TrainConfig(clip_grad_norm=bad)
    assert TrainConfig().warmup_epochs == 0 and TrainConfig().clip_grad_norm is None  # the study, exactly
