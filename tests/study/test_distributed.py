"""cifarnet-train under torchrun: data-parallel processes (gloo, CPU) against one process.

The multi-process tests start real processes: ``torchrun`` itself, or ``python -m
cifarnet.study train`` with the environment torchrun would give it. Each trains a few steps on tiny
generated data, so a test takes seconds: 10 to 50 on two busy cores, most of them spent starting
processes and importing torch (marked slow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifarnet.study.cli import train_main
from cifarnet.study.data import BatchLoader, Split
from cifarnet.study.distributed import Launch, epoch_seed, launch_from_environment, shard_bounds
from cifarnet.study.train import TrainConfig, load_checkpoint
from cifarnet.study.models import HIDDEN_FEATURES
from cifarnet.study.variants import recipe
from cifar10_fakes import make_split, write_pickles

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CONSOLE_SCRIPT = Path(sys.executable).with_name("cifarnet-train")  # imports cifarnet from PYTHONPATH first
TRAIN_COUNT, TEST_COUNT, BATCH = 64, 20, 16
# 43 = 2 batches of 16 and one of 11, which two processes share 6 + 5: uneven shares.
UNEVEN_LIMIT = 43
COMMON = ["--batch-size", str(BATCH), "--no-progress", "--device", "cpu", "--threads", "1"]
# Startup (importing torch, joining the group) takes seconds on a loaded machine; no run here
# should take more than this.
RUN_TIMEOUT = 120

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no torchrun beside {sys.executable}")


pytestmark = pytest.mark.usefixtures("isolated_cache", "restore_threads")


@pytest.fixture
def pickles(tmp_path):
    root = tmp_path / "pickles"
    write_pickles(root, make_split(TRAIN_COUNT, seed=31), make_split(TEST_COUNT, seed=32))
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(tmp_path: Path, **variables) -> dict:
    """This environment without torchrun's variables, with the tree on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env.update({name: str(value) for name, value in variables.items()})
    return env


def start_ranks(tmp_path: Path, world_size: int, args: list[str], *,
                command: tuple[str, ...] = ("-m", "cifarnet.study", "train")) -> list[subprocess.Popen]:
    """``python -m cifarnet.study train ARGS`` (or ``python COMMAND ARGS``) as the
    ``world_size`` processes torchrun would start."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = child_environment(tmp_path, RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank,
                                LOCAL_WORLD_SIZE=world_size, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(subprocess.Popen([sys.executable, *command, *args], env=env, cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes: list[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> list[tuple[int, str, str]]:
    """``(status, stdout, stderr)`` of each process, killing any still running after ``timeout``."""
    results = []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise AssertionError(f"pid {process.pid} still ran after {timeout} s:\n{stderr}") from None
        results.append((process.returncode, stdout, stderr))
    return results


def run_ranks(tmp_path: Path, world_size: int, args: list[str]) -> list[tuple[int, str, str]]:
    return finish(start_ranks(tmp_path, world_size, args))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close_models(first: dict, second: dict, *, rtol: float, atol: float) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --- the pieces, in one process ---------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 5, 16, 43])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_cover_a_batch_in_order(count, world_size):
    bounds = [shard_bounds(count, world_size, rank) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [len(part) for part in torch.arange(count).tensor_split(world_size)]


@pytest.mark.parametrize("variant", ["baseline", "full"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_the_slices_of_every_process_make_the_batches_of_one(variant, world_size):
    """Same samples, same crops and flips, same generator state after the epoch."""
    images, labels = make_split(UNEVEN_LIMIT, seed=5)
    split = Split(torch.from_numpy(images), torch.from_numpy(labels))
    for train in (True, False):
        generators = [torch.Generator().manual_seed(7) for _ in range(world_size + 1)]
        one = list(BatchLoader(split, BATCH, recipe(variant), train=train, generator=generators[0]))
        shares = [
            list(BatchLoader(split, BATCH, recipe(variant), train=train, generator=generators[1 + rank], rank=rank,
                             world_size=world_size))
            for rank in range(world_size)
        ]
        assert all(len(batches) == len(one) for batches in shares)
        loader = BatchLoader(split, BATCH, recipe(variant), train=False, rank=world_size - 1, world_size=world_size)
        for index, (inputs, batch_labels) in enumerate(one):
            assert torch.equal(torch.cat([batches[index][0] for batches in shares]), inputs)
            assert torch.equal(torch.cat([batches[index][1] for batches in shares]), batch_labels)
            # what each process weights its loss by, without asking the others
            assert loader.global_batch_size(index) == batch_labels.shape[0]
        with pytest.raises(IndexError, match="out of range"):
            loader.global_batch_size(len(one))
        for generator in generators[1:]:
            assert torch.equal(generator.get_state(), generators[0].get_state())


def test_empty_slices_of_a_small_last_batch_are_skipped():
    images, labels = make_split(17, seed=5)  # a last batch of 1 image among 2 processes
    split = Split(torch.from_numpy(images), torch.from_numpy(labels))
    shares = [list(BatchLoader(split, BATCH, recipe("baseline"), train=False, rank=rank, world_size=2)) for rank in (0, 1)]
    assert [len(batches) for batches in shares] == [2, 1]
    assert [b[1].shape[0] for b in shares[0]] == [8, 1] and shares[1][0][1].shape[0] == 8


def test_launch_is_read_from_torchruns_variables():
    assert launch_from_environment({}) is None
    full = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
            "MASTER_PORT": "1"}
    assert launch_from_environment(full) == Launch(rank=1, world_size=4, local_rank=1, local_world_size=2)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE set but not MASTER_ADDR, MASTER_PORT"):
        launch_from_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        launch_from_environment({**full, "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=4 is not below WORLD_SIZE=4"):
        launch_from_environment({**full, "RANK": "4"})


def test_every_process_and_epoch_draws_its_own_dropout_stream():
    seeds = {epoch_seed(0, rank, epoch) for rank in range(4) for epoch in range(1, 51)}
    assert len(seeds) == 200 and all(0 <= seed < 2**63 for seed in seeds)
    assert epoch_seed(3, 1, 2) == epoch_seed(3, 1, 2) != epoch_seed(-3, 1, 2)


def test_config_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="batch_size 128 does not split evenly among world_size 3 processes"):
        TrainConfig(batch_size=128, world_size=3)


def test_batch_size_must_split_among_the_processes(pickles, tmp_path, monkeypatch, capsys):
    for name, value in {"RANK": 0, "WORLD_SIZE": 3, "LOCAL_RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
        monkeypatch.setenv(name, str(value))
    status = train_main(["--variant", "baseline", "--data-dir", str(pickles), "--out", str(tmp_path / "run"), *COMMON])
    captured = capsys.readouterr()
    assert status == 2 and not (tmp_path / "run").exists()
    assert captured.err.splitlines() == [
        "cifarnet-train: error: --batch-size 16 does not split evenly among the 3 processes (WORLD_SIZE=3): it is the "
        "global batch, of which each process takes --batch-size / 3 samples per step; expected a multiple of 3"
    ]


# --- several processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_last_batch_smaller_than_the_processes_is_refused_once(pickles, tmp_path):
    out = tmp_path / "run"
    args = ["--variant", "baseline", "--limit-train", str(BATCH + 1), "--data-dir", str(pickles), "--out", str(out), *COMMON]
    (status0, _, stderr0), (status1, stdout1, stderr1) = run_ranks(tmp_path, 2, args)
    assert (status0, status1) == (2, 2)
    assert stderr0.splitlines() == [
        f"cifarnet-train: error: the last training batch holds 1 image ({BATCH + 1} training images in batches of "
        f"{BATCH}), fewer than the 2 processes, so a process would have none; choose a limit_train (--limit-train) that "
        "leaves 0 or at least 2 images for the last batch"
    ]
    assert stdout1 == stderr1 == ""  # the same error, reported once, by rank 0
    assert not out.exists()


@pytest.mark.slow
@needs_torchrun
def test_torchrun_trains_one_run_that_one_process_resumes(pickles, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--variant", "full", "--no-sync-bn", "--epochs", "2", "--limit-train", "32", "--data-dir", str(pickles),
            "--out", str(out), *COMMON]
    torchrun = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "cifarnet.study", "train", *args]
    process = subprocess.run(torchrun, env=child_environment(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
    assert process.returncode == 0, process.stderr
    assert process.stdout.count(f"full: results in {out}") == 1  # printed by rank 0 only
    metrics = read_metrics(out)
    assert [(m["epoch"], m["world_size"]) for m in metrics] == [(1, 2), (2, 2)]
    assert len((out / "batch_losses.csv").read_text().splitlines()) == 1 + 2 * 2
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["world_size"] == 2
    assert checkpoint["config"]["sync_batch_norm"] is False
    assert not [key for key in checkpoint["model"] if key.startswith("module.")]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    resumed = ["--variant", "full", "--no-sync-bn", "--epochs", "3", "--limit-train", "32", "--data-dir", str(pickles),
               "--out", str(out), "--resume", *COMMON]
    assert train_main(resumed) == 0
    assert "was trained by 2 processes and continues with 1 process" in capsys.readouterr().out
    metrics = read_metrics(out)
    assert [(m["epoch"], m["world_size"]) for m in metrics] == [(1, 2), (2, 2), (3, 1)]
    assert load_checkpoint(out / "checkpoint.pt")["config"]["world_size"] == 1


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(pickles, tmp_path):
    """Augmentation and momentum, no dropout or batch norm (per-process draws and statistics):
    the same samples and crops per step, the gradient of the global batch's mean loss."""
    args = ["--variant", "momentum", "--epochs", "2", "--limit-train", str(UNEVEN_LIMIT), "--data-dir", str(pickles),
            *COMMON]
    results = run_ranks(tmp_path, 2, [*args, "--out", str(tmp_path / "two")])
    assert [status for status, _, _ in results] == [0, 0], results[0][2] + results[1][2]
    assert results[1][1] == "" and results[1][2] == ""  # rank 1 prints nothing
    assert train_main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("two", "one"))
    # 6 steps; float32 gradients summed in another order drift by a few ulps per step.
    assert_close_models(one["model"], two["model"], rtol=1e-4, atol=1e-6)
    assert torch.equal(one["rng"]["data"], two["rng"]["data"])  # the same draws: shuffles and crops
    for batch_one, batch_two in zip(one["batch_losses"], two["batch_losses"]):
        assert batch_two == pytest.approx(batch_one, rel=1e-5)
    for record_one, record_two in zip(one["history"], two["history"]):
        for key in ("train_loss", "test_loss"):
            assert record_two[key] == pytest.approx(record_one[key], rel=1e-5)
        for key in ("train_top1", "train_top5", "test_top1", "test_top5"):
            assert record_two[key] == pytest.approx(record_one[key], abs=100 / TRAIN_COUNT)


@pytest.mark.slow
@pytest.mark.parametrize("ops", ["fused", "native"])
def test_sync_batch_norm_statistics_are_those_of_one_process(pickles, tmp_path, ops):
    """One step of ``full``: the running statistics are those of the whole global batch (later
    steps differ by dropout, which each process draws for itself)."""
    args = ["--variant", "full", "--ops", ops, "--epochs", "1", "--limit-train", str(BATCH), "--data-dir", str(pickles),
            *COMMON]
    results = run_ranks(tmp_path, 2, [*args, "--out", str(tmp_path / "two")])
    assert [status for status, _, _ in results] == [0, 0], results[0][2] + results[1][2]
    assert train_main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("two", "one"))
    statistics = [name for name in one if "running_" in name]
    assert len(statistics) == 6
    for name in statistics:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def wait_for_epochs(out: Path, epochs: int, processes: list[subprocess.Popen]) -> None:
    """Waits until rank 0 has written ``epochs`` lines of metrics."""
    deadline = time.monotonic() + RUN_TIMEOUT
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or metrics.read_text().count("\n") < epochs:
        stopped = [p for p in processes if p.poll() is not None]
        assert not stopped, stopped[0].communicate()[1]
        assert time.monotonic() < deadline, f"fewer than {epochs} epochs after {RUN_TIMEOUT} s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_process_stops_the_others(pickles, tmp_path, killed):
    out = tmp_path / "run"
    timeout = 30
    args = ["--variant", "baseline", "--epochs", "10000", "--limit-train", "32", "--data-dir", str(pickles),
            "--out", str(out), "--dist-timeout", str(timeout), *COMMON]
    processes = start_ranks(tmp_path, 2, args)
    survivor = processes[1 - killed]
    try:
        wait_for_epochs(out, 2, processes)
        processes[killed].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        (status, _, stderr), = finish([survivor], timeout=timeout + 30)
        stopped_after = time.monotonic() - killed_at
    finally:
        for process in processes:
            process.kill()
            process.communicate()
    # A dead peer closes its connections: the others notice at once, not after the timeout.
    assert status == 2 and stopped_after < timeout, (stopped_after, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"cifarnet-train: error: rank {1 - killed} of 2: ")
    assert "another process stopped" in lines[0]
    # What rank 0 wrote is whole: the checkpoint loads, every metrics line is one epoch.
    metrics = read_metrics(out)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert checkpoint["epoch"] in (len(metrics), len(metrics) + 1)


@pytest.mark.slow
def test_a_stalled_process_stops_the_others_after_the_timeout(pickles, tmp_path):
    out = tmp_path / "run"
    timeout = 5
    args = ["--variant", "baseline", "--epochs", "10000", "--limit-train", "32", "--data-dir", str(pickles),
            "--out", str(out), "--dist-timeout", str(timeout), *COMMON]
    rank0, rank1 = start_ranks(tmp_path, 2, args)
    try:
        wait_for_epochs(out, 2, [rank0, rank1])
        rank1.send_signal(signal.SIGSTOP)
        stalled = time.monotonic()
        (status, _, stderr), = finish([rank0], timeout=timeout + 60)
        stopped_after = time.monotonic() - stalled
    finally:
        for process in (rank0, rank1):
            process.kill()
            process.communicate()
    assert status == 2 and timeout - 1 < stopped_after < timeout + 30, (stopped_after, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarnet-train: error: rank 0 of 2: "), stderr
    assert f"within {timeout} s" in lines[0]


@pytest.mark.slow
@needs_torchrun
def test_two_machines_with_c10d_rendezvous(pickles, tmp_path):
    """Two torchrun invocations, one per "machine", meeting at 127.0.0.1 (see docs/distributed.md); the
    second starts the console script (``--no-python cifarnet-train``) where it is installed."""
    out = tmp_path / "run"
    port = free_port()
    args = ["--variant", "baseline", "--epochs", "1", "--limit-train", "32", "--data-dir", str(pickles),
            "--out", str(out), *COMMON]
    commands = [["-m", "cifarnet.study", "train"], ["--no-python", str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else
                ["-m", "cifarnet.study", "train"]]
    nodes = [
        subprocess.Popen(
            [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cifarnet-test", *commands[node], *args],
            env=child_environment(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    results = finish(nodes)
    assert [status for status, _, _ in results] == [0, 0], results[0][2] + results[1][2]
    assert [(m["epoch"], m["world_size"]) for m in read_metrics(out)] == [(1, 2)]
    assert sum(stdout.count("baseline: results in") for _, stdout, _ in results) == 1


def recording(record: Path) -> tuple[str, ...]:
    """The command that runs cifarnet-train and saves each process's draws to ``record.rank<R>.pt``
    (see tests/study/record_draws.py)."""
    return (str(Path(__file__).with_name("record_draws.py")), str(record))


def read_draws(record: Path, rank: int) -> list[dict[str, list[torch.Tensor]]]:
    return torch.load(f"{record}.rank{rank}.pt")


def assert_equal_draws(first: dict, second: dict, what: str) -> None:
    for kind in ("crops", "masks"):
        assert len(first[kind]) == len(second[kind]) > 0, (what, kind)
        assert all(torch.equal(a, b) for a, b in zip(first[kind], second[kind])), f"{what}: other {kind}"


@pytest.mark.slow
def test_a_run_resumed_with_as_many_processes_equals_the_uninterrupted_one(pickles, tmp_path):
    """Batch norm with per-process statistics and dropout with per-process draws: the buffers
    are rank 0's at the end of each epoch, and dropout is seeded from (seed, rank, epoch).

    The draws themselves are recorded (tests/study/record_draws.py): the two processes apply their
    own slices of each batch's crops and draw their own dropout masks (equal metrics and
    weights alone would not show it: with every process drawing rank 0's masks, the resumed
    run still equals the uninterrupted one), and every process's draws in the resumed epoch
    are those of the uninterrupted run's second epoch."""
    args = ["--variant", "full", "--no-sync-bn", "--limit-train", "32", "--data-dir", str(pickles), *COMMON]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    started = [*start_ranks(tmp_path, 2, [*args, "--epochs", "2", "--out", str(whole)], command=recording(whole)),
               *start_ranks(tmp_path, 2, [*args, "--epochs", "1", "--out", str(parts)], command=recording(parts))]
    results = finish(started)
    assert [status for status, _, _ in results] == [0] * 4, "".join(stderr for _, _, stderr in results)
    resume = [*args, "--epochs", "2", "--out", str(parts), "--resume"]
    results = finish(start_ranks(tmp_path, 2, resume, command=recording(tmp_path / "resumed")))
    assert [status for status, _, _ in results] == [0, 0], "".join(stderr for _, _, stderr in results)
    metrics = [[{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(out)] for out in (whole, parts)]
    assert metrics[0] == metrics[1]
    models = [load_checkpoint(out / "checkpoint.pt")["model"] for out in (whole, parts)]
    for name, value in models[0].items():
        assert torch.equal(models[1][name], value), name

    draws = {name: [read_draws(tmp_path / name, rank) for rank in (0, 1)] for name in ("whole", "parts", "resumed")}
    assert [len(draws[name][rank]) for name in draws for rank in (0, 1)] == [2, 2, 1, 1, 1, 1]  # training epochs
    for epoch_draws in draws["whole"][0]:
        # 2 batches of 16, 8 images per process: one chunk of crops, one mask per batch
        assert [tuple(c.shape) for c in epoch_draws["crops"]] == [(3, 16)]
        assert [tuple(m.shape) for m in epoch_draws["masks"]] == [(8, HIDDEN_FEATURES)] * 2
    for index in (0, 1):
        rank0, rank1 = draws["whole"][0][index], draws["whole"][1][index]
        # Own slices of the batch's crops: the pairs (top, left, flip) of the two ranks differ.
        assert not torch.equal(rank0["crops"][0], rank1["crops"][0]), f"epoch {index + 1}: both ranks applied the same crops"
        for batch, (mask0, mask1) in enumerate(zip(rank0["masks"], rank1["masks"])):
            assert not torch.equal(mask0, mask1), f"epoch {index + 1} batch {batch + 1}: both ranks drew the same mask"
    assert not torch.equal(draws["whole"][0][0]["masks"][0], draws["whole"][0][1]["masks"][0])  # nor both epochs
    for rank in (0, 1):
        assert_equal_draws(draws["parts"][rank][0], draws["whole"][rank][0], f"rank {rank}, epoch 1")
        assert_equal_draws(draws["resumed"][rank][0], draws["whole"][rank][1], f"rank {rank}, resumed epoch 2")

