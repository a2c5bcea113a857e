"""cifarnet-train and cifarnet-eval end to end, their outputs and their one-line errors."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cifarnet.study.cli as cli
from cifarnet.study.cli import eval_main, train_main
from cifarnet.study.results import SEEDS_TABLE_MARKER
from cifarnet.study.results import main as results_main
from cifar10_fakes import CLASS_NAMES, make_split, write_folders, write_pickles

REPO = Path(__file__).resolve().parents[2]
REAL_DATA = REPO.parent / "shared" / "cifar10-jpeg"
EXPECTED_KEYS = [
    "epoch", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "test_classes_predicted",
    "lr", "seconds", "world_size", "train_images",
]
VARIANT_NAMES = ["baseline", "normalized", "augmented", "momentum", "dropout", "full"]
TINY = ["--batch-size", "8", "--limit-train", "24", "--no-progress", "--device", "cpu", "--threads", "1"]


def command_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a test's command process: this checkout's cifarnet (not whichever one
    is installed, e.g. another worktree's), and the test's own cache folder."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}

pytestmark = pytest.mark.usefixtures("isolated_cache", "restore_threads")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: a download fails as it does without one."""
    import torchvision.datasets.cifar as cifar

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)


@pytest.fixture
def pickles(tmp_path):
    root = tmp_path / "pickles"
    write_pickles(root, make_split(40, seed=21), make_split(20, seed=22))
    return root


@pytest.fixture
def folders(tmp_path):
    return write_folders(tmp_path / "folders", make_split(40, seed=23), make_split(20, seed=24))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_one_line_error(capsys, status, program="cifarnet-train") -> str:
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{program}: error: ") and "Traceback" not in captured.err
    return lines[0]


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["pickles", "folders"])
def test_train_end_to_end(request, tmp_path, capsys, layout):
    data_dir = request.getfixturevalue(layout)
    out = tmp_path / "run"
    status = train_main(["--variant", "full", "--epochs", "2", "--data-dir", str(data_dir), "--out", str(out), *TINY])
    assert status == 0
    metrics = read_metrics(out)
    assert [list(m) for m in metrics] == [EXPECTED_KEYS] * 2
    assert [m["epoch"] for m in metrics] == [1, 2]
    for name in ("curves.png", "batch_losses.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["limit_train"] == 24
    assert f"results in {out}" in capsys.readouterr().out


def test_progress_output_per_epoch(pickles, tmp_path, capsys):
    args = ["--variant", "baseline", "--epochs", "1", "--data-dir", str(pickles), "--out", str(tmp_path / "run")]
    assert train_main([*args, *[a for a in TINY if a != "--no-progress"]]) == 0
    out = capsys.readouterr().out
    assert re.search(r"baseline 1/1: train loss \d+\.\d{4} top-1 [\d.]+% \| test loss [\d.]+ top-1 [\d.]+% top-5", out)


def test_resume_from_the_command_line_equals_one_run(pickles, tmp_path):
    common = ["--variant", "dropout", "--data-dir", str(pickles), *TINY]
    assert train_main([*common, "--epochs", "2", "--out", str(tmp_path / "whole")]) == 0
    assert train_main([*common, "--epochs", "1", "--out", str(tmp_path / "parts")]) == 0
    assert train_main([*common, "--epochs", "2", "--out", str(tmp_path / "parts"), "--resume"]) == 0
    assert without_seconds(read_metrics(tmp_path / "parts")) == without_seconds(read_metrics(tmp_path / "whole"))


def table_rows(path: Path, section: str | None = None) -> dict[str, list[str]]:
    """The rows of a results.md table (the first, or the one after the heading ``section``):
    first cell -> the cells after it."""
    text = path.read_text()
    if section is not None:
        text = text.split(f"## {section}\n", 1)[1]
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), itertools.dropwhile(
        lambda line: not line.startswith("|"), text.splitlines())))[2:]
    cells = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]
    return {row[0]: row[1:] for row in cells}


def table_columns(path: Path, section: str | None = None) -> dict[str, dict[str, str]]:
    """The rows of a results.md table as in :func:`table_rows`, each cell under its column's name."""
    text = path.read_text()
    header = next(line for line in (text.split(f"## {section}\n", 1)[1] if section else text).splitlines()
                  if line.startswith("|"))  # fmt: skip
    names = [cell.strip() for cell in header.strip().strip("|").split("|")]
    return {first: dict(zip(names[1:], cells, strict=True)) for first, cells in table_rows(path, section).items()}


def test_all_variants_and_their_summary(pickles, tmp_path, capsys):
    out = tmp_path / "study"
    assert train_main(["--variant", "all", "--epochs", "2", "--data-dir", str(pickles), "--out", str(out), *TINY]) == 0
    # Short runs on part of the data say so, beside the study's figures too.
    for section in (None, "Over seeds"):
        for name, row in table_columns(out / "results.md", section).items():
            assert (row["epochs"], row["training images"]) == ("2", "24"), (section, name)
    rows = table_rows(out / "results.md")
    assert list(rows) == VARIANT_NAMES
    for variant, cells in rows.items():
        metrics = read_metrics(out / variant)
        assert int(cells[0]) == 2
        assert float(cells[2]) == pytest.approx(max(m["test_top1"] for m in metrics), abs=0.005)
        assert float(cells[3]) == pytest.approx(metrics[-1]["test_top1"], abs=0.005)
        assert float(cells[4]) == pytest.approx(metrics[-1]["test_loss"], abs=5e-5)
        assert float(cells[5]) == pytest.approx((metrics[0]["seconds"] + metrics[1]["seconds"]) / 2, abs=0.05)  # median
        assert cells[6] == ""
        assert (out / variant / "checkpoint.pt").is_file()
    with Image.open(out / "test_accuracy.png") as image:
        assert image.format == "PNG"


def test_a_one_epoch_curve_is_drawn(tmp_path):
    """A line through one point draws nothing: one-epoch runs (a smoke test of --variant all)
    left test_accuracy.png with a legend and empty axes."""
    from cifarnet.study.plots import plot_test_accuracy

    plot_test_accuracy({"full": [[{"epoch": 1, "test_top1": 50.0}]]}, tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    above_the_legend = pixels[: pixels.shape[0] // 2]
    first_colour = np.array([0x1F, 0x77, 0xB4])  # matplotlib's C0, the first curve's
    assert (np.abs(above_the_legend - first_colour).sum(-1) < 30).sum() > 10


def test_unknown_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--variant", "best"])
    assert info.value.code == 2
    assert "invalid choice: 'best'" in capsys.readouterr().err


def test_nonpositive_epochs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train_main(["--epochs", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


# --- the output folder: never a traceback, never an earlier run lost --------------------------


def test_out_that_is_a_file_is_one_line(pickles, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    line = assert_one_line_error(capsys, train_main(["--data-dir", str(pickles), "--out", str(notes), *TINY]))
    assert f"--out {notes}: it is a text file, not a folder" in line
    line = assert_one_line_error(capsys, train_main(["--data-dir", str(pickles), "--out", str(notes / "run"), *TINY]))
    assert f"--out {notes / 'run'}: {notes} is a file" in line
    assert notes.read_text() == "my notes"


def test_out_is_checked_before_the_data_is_read(tmp_path, capsys, monkeypatch):
    import cifarnet.study.cli as cli

    monkeypatch.setattr(cli, "load_cifar10", lambda *args, **kwargs: pytest.fail("read the data first"))
    (tmp_path / "file").write_text("")
    assert "--out" in assert_one_line_error(capsys, train_main(["--out", str(tmp_path / "file"), *TINY]))


def test_training_into_an_earlier_run_is_refused(pickles, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--variant", "baseline", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]
    assert train_main([*common, "--seed", "1"]) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "curves.png")}
    line = assert_one_line_error(capsys, train_main([*common, "--seed", "2"]))
    assert f"{out} already holds a run (checkpoint.pt, metrics.jsonl)" in line
    assert "--resume" in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in before} == before


def test_overwrite_replaces_an_earlier_run(pickles, tmp_path):
    common = ["--variant", "baseline", "--data-dir", str(pickles), *TINY]
    assert train_main([*common, "--epochs", "2", "--seed", "1", "--out", str(tmp_path / "run")]) == 0
    assert train_main([*common, "--epochs", "1", "--seed", "2", "--out", str(tmp_path / "fresh")]) == 0
    assert train_main([*common, "--epochs", "1", "--seed", "2", "--out", str(tmp_path / "run"), "--overwrite"]) == 0
    assert without_seconds(read_metrics(tmp_path / "run")) == without_seconds(read_metrics(tmp_path / "fresh"))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["seed"] == 2


def test_resume_without_a_checkpoint_keeps_the_recorded_epochs(pickles, tmp_path, capsys):
    # A folder whose checkpoint was deleted (or a copy of docs/results): --resume would start
    # afresh and rewrite metrics.jsonl.
    out = tmp_path / "run"
    common = ["--variant", "baseline", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]
    assert train_main(common) == 0
    (out / "checkpoint.pt").unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    line = assert_one_line_error(capsys, train_main([*common, "--resume"]))
    assert f"{out} holds metrics.jsonl but no checkpoint.pt to resume from; pass --overwrite" in line
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_interrupted_before_an_epoch_completes_says_nothing_was_saved(pickles, tmp_path, capsys, monkeypatch):
    def interrupted(config, run_out, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    out = tmp_path / "run"
    assert train_main(["--variant", "baseline", "--data-dir", str(pickles), "--out", str(out), *TINY]) == 130
    assert capsys.readouterr().err == "cifarnet-train: interrupted; no epoch had completed, so nothing was saved\n"


def test_resume_and_overwrite_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--resume", "--overwrite"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_all_variants_check_every_run_folder_before_training(pickles, tmp_path, capsys):
    out = tmp_path / "study"
    assert train_main(["--variant", "full", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out / "full"), *TINY]) == 0
    capsys.readouterr()
    line = assert_one_line_error(capsys, train_main(["--variant", "all", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]))
    assert f"{out / 'full'} already holds a run" in line
    assert "with --variant all, --resume keeps complete runs and continues the others" in line
    assert sorted(p.name for p in out.iterdir()) == ["full"]  # baseline, trained first, was not started


def test_all_variants_refuse_a_single_run_s_folder_before_training(pickles, tmp_path, capsys):
    """The summary of the six runs could not be written there: found out only after they all
    trained, where a study takes days."""
    out = tmp_path / "run"
    assert train_main(["--variant", "full", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    line = assert_one_line_error(capsys, train_main(["--variant", "all", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]))
    assert f"--out {out} holds a single run (checkpoint.pt, metrics.jsonl); --variant all writes a folder of run folders" in line
    assert not any(path.is_dir() for path in out.iterdir())


@pytest.mark.parametrize("value", ["-1", "4294967296", "99999999999999999999999", "1.5"])
def test_a_seed_out_of_torch_s_range_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as info:
        train_main(["--seed", value])
    assert info.value.code == 2 and "argument --seed: expected an integer from 0 to 4294967295" in capsys.readouterr().err


@pytest.mark.parametrize("main", [train_main, eval_main])
@pytest.mark.parametrize("extra", [1, 100_000])
def test_more_threads_than_cpus_is_a_usage_error(capsys, main, extra):
    # OpenMP aborts the process where it cannot create that many threads
    threads = (os.cpu_count() or 1) + extra
    with pytest.raises(SystemExit) as info:
        main(["--threads", str(threads), *(["checkpoint.pt"] if main is eval_main else [])])
    message = f"argument --threads: expected 1 to {os.cpu_count()} (the CPUs this machine has), got {threads}"
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--lr", "--clip-grad-norm"])
def test_an_infinite_rate_or_norm_is_a_usage_error(capsys, option):
    with pytest.raises(SystemExit) as info:
        train_main([option, "inf"])
    assert info.value.code == 2 and f"argument {option}: expected a positive finite number, got inf" in capsys.readouterr().err


# --- resuming: the same data and settings -----------------------------------------------------


@pytest.fixture
def half_run(pickles, tmp_path):
    """A baseline run of one epoch (of two) on the pickles, and the arguments that made it."""
    out = tmp_path / "run"
    common = ["--variant", "baseline", "--out", str(out), *TINY]
    assert train_main([*common, "--data-dir", str(pickles), "--epochs", "1"]) == 0
    return out, common


def test_resume_on_other_data_is_refused(half_run, pickles, folders, capsys):
    out, common = half_run
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()
    line = assert_one_line_error(capsys, train_main([*common, "--data-dir", str(folders), "--epochs", "2", "--resume"]))
    assert "on other data" in line and str(pickles.resolve()) in line and str(folders.resolve()) in line
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "option, value, setting",
    [("--limit-train", "16", "limit_train: 24 -> 16"), ("--batch-size", "4", "batch_size: 8 -> 4"), ("--seed", "5", "seed: 0 -> 5")],
)
def test_resume_with_other_training_settings_is_refused(half_run, pickles, capsys, option, value, setting):
    out, common = half_run
    capsys.readouterr()
    # The last occurrence wins, so this changes one setting of TINY's (or adds one).
    argv = [*common, "--data-dir", str(pickles), "--epochs", "2", "--resume", option, value]
    assert setting in assert_one_line_error(capsys, train_main(argv))


def test_resume_on_a_copy_of_the_data_continues_with_a_note(half_run, pickles, tmp_path, capsys):
    out, common = half_run
    copy = tmp_path / "copy"
    shutil.copytree(pickles, copy)
    assert train_main([*common, "--data-dir", str(copy), "--epochs", "2", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {out / 'checkpoint.pt'} was trained on {(pickles / 'cifar-10-batches-py').resolve()}" in printed
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]


def test_resume_with_other_ops_continues_with_a_note(half_run, pickles, capsys):
    out, common = half_run
    assert train_main([*common, "--data-dir", str(pickles), "--epochs", "2", "--resume", "--ops", "native"]) == 0
    assert "trained with fused ops and continues with native ops" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["ops"] == "native"


# --- bad data: one line, status 2 -------------------------------------------------------------


def truncate_pickle(root: Path) -> str:
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])
    return str(batch)


def corrupt_image(root: Path) -> str:
    image = root / "train" / "frog" / "0000.png"
    image.write_bytes(b"garbage")
    return str(image)


def remove_class(root: Path) -> str:
    for path in (root / "train" / "ship").iterdir():
        path.unlink()
    (root / "train" / "ship").rmdir()
    return "missing ship"


def remove_test_split(root: Path) -> str:
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    return f"{root / 'test'} is missing"


@pytest.mark.parametrize(
    "layout, damage",
    [("pickles", truncate_pickle), ("folders", corrupt_image), ("folders", remove_class), ("folders", remove_test_split)],
)
def test_bad_data_is_one_line(request, tmp_path, capsys, layout, damage):
    root = request.getfixturevalue(layout)
    expected = damage(root)
    status = train_main(["--data-dir", str(root), "--out", str(tmp_path / "run"), *TINY])
    assert expected in assert_one_line_error(capsys, status)


def test_missing_data_offline_is_one_line(tmp_path, capsys):
    status = train_main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *TINY])
    line = assert_one_line_error(capsys, status)
    assert "downloading" in line and "failed" in line and str(tmp_path / "nowhere") in line
    assert not (tmp_path / "nowhere").exists()  # the failed download leaves no empty folder


def test_default_data_dir_is_the_cache(tmp_path, capsys):
    status = train_main(["--out", str(tmp_path / "run"), *TINY])
    assert str(tmp_path / "xdg-cache" / "cifarnet") in assert_one_line_error(capsys, status)


def test_folder_without_a_data_set_is_one_line(tmp_path, capsys):
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "beach.jpg").write_bytes(b"")
    status = train_main(["--data-dir", str(tmp_path / "holiday"), "--out", str(tmp_path / "run"), *TINY])
    assert "holds beach.jpg" in assert_one_line_error(capsys, status)


def test_cuda_without_a_gpu_is_one_line(pickles, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = ["--data-dir", str(pickles), "--out", str(tmp_path / "run"), "--device", "cuda", "--no-progress"]
    assert "no CUDA device" in assert_one_line_error(capsys, train_main(args))


def test_command_process_reports_bad_data_without_traceback(pickles, tmp_path):
    truncate_pickle(pickles)
    env = command_env(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cifarnet.study.cli", "train", "--data-dir", str(pickles), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cifarnet-train: error: ")
    assert "data_batch_2" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does(pickles, tmp_path):
    """A plain ``kill`` (what schedulers and ``timeout`` send) of one process: the Ctrl-C line,
    status 143 (128 + SIGTERM, as a shell reports it), and a run that ``--resume`` continues."""
    out = tmp_path / "run"
    env = command_env(tmp_path)
    command = [sys.executable, "-m", "cifarnet.study", "train", "--variant", "baseline", "--epochs", "1000",
               "--data-dir", str(pickles), "--out", str(out), *TINY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "checkpoint.pt").exists(), "no epoch was saved"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, (process.returncode, stderr)
    assert stderr == f"cifarnet-train: stopped by SIGTERM; completed epochs are saved in {out}, continue with --resume\n"
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 1000
    assert train_main(["--variant", "baseline", "--epochs", str(saved + 1), "--data-dir", str(pickles), "--out", str(out),
                       "--resume", *TINY]) == 0
    assert [m["epoch"] for m in read_metrics(out)] == list(range(1, saved + 2))

# --- --variant all over several sessions, and the report of whatever runs exist --------------


def test_all_variants_with_resume_keep_complete_runs_and_continue_the_partial_one(pickles, tmp_path, capsys):
    out = tmp_path / "study"
    common = ["--data-dir", str(pickles), *TINY]
    assert train_main(["--variant", "baseline", "--epochs", "2", "--out", str(out / "baseline"), *common]) == 0
    assert train_main(["--variant", "normalized", "--epochs", "1", "--out", str(out / "normalized"), *common]) == 0
    assert train_main(["--variant", "normalized", "--epochs", "2", "--out", str(tmp_path / "whole"), *common]) == 0
    kept = (out / "baseline" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train_main(["--variant", "all", "--epochs", "2", "--out", str(out), "--resume", *common]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'baseline'} is complete (2 of 2 epochs); nothing to train" in printed
    assert (out / "baseline" / "checkpoint.pt").read_bytes() == kept
    assert without_seconds(read_metrics(out / "normalized")) == without_seconds(read_metrics(tmp_path / "whole"))
    for variant in VARIANT_NAMES:
        assert [m["epoch"] for m in read_metrics(out / variant)] == [1, 2], variant
    rows = table_rows(out / "results.md")
    assert list(rows) == VARIANT_NAMES and all(cells[0] == "2" and cells[6] == "" for cells in rows.values())


def test_interrupted_all_variants_report_what_exists_and_resume(pickles, tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    common = ["--variant", "all", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]
    real_train = cli.train

    def interrupted_at_momentum(config, run_out, **kwargs):
        if config.variant == "momentum":
            raise KeyboardInterrupt
        return real_train(config, run_out, **kwargs)

    monkeypatch.setattr(cli, "train", interrupted_at_momentum)
    assert train_main(common) == 130
    captured = capsys.readouterr()
    assert "continue with --resume" in captured.err and f"summary: {out / 'results.md'}" in captured.out
    rows = table_rows(out / "results.md")
    assert list(rows) == VARIANT_NAMES
    assert [rows[v][0] for v in VARIANT_NAMES] == ["1", "1", "1", "0", "0", "0"]
    assert [rows[v][6] for v in VARIANT_NAMES] == ["", "", "", "not run", "not run", "not run"]
    assert float(rows["augmented"][3]) == pytest.approx(read_metrics(out / "augmented")[-1]["test_top1"], abs=0.005)
    with Image.open(out / "test_accuracy.png") as image:
        assert image.format == "PNG"
    monkeypatch.undo()
    assert train_main(common) == 2  # the folders hold runs: refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert train_main([*common, "--resume"]) == 0
    rows = table_rows(out / "results.md")
    assert [rows[v][0] for v in VARIANT_NAMES] == ["1"] * 6 and all(cells[6] == "" for cells in rows.values())


def test_report_marks_a_partial_run(pickles, tmp_path, capsys):
    out = tmp_path / "study"
    assert train_main(["--variant", "momentum", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out / "momentum"), *TINY]) == 0
    # As if stopped after 1 of 3 epochs: the checkpoint says how many the run was to have.
    checkpoint = torch.load(out / "momentum" / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["epochs"] = 3
    torch.save(checkpoint, out / "momentum" / "checkpoint.pt")
    assert results_main([str(out)]) == 0
    rows = table_rows(out / "results.md")
    assert rows["momentum"][0] == "1" and rows["momentum"][6] == "partial: 1 of 3 epochs"
    assert rows["baseline"][6] == "not run"


def test_divergence_stops_with_one_line_naming_the_remedies(pickles, tmp_path, capsys):
    out = tmp_path / "run"
    status = train_main(["--variant", "momentum", "--epochs", "3", "--lr", "1e6", "--data-dir", str(pickles), "--out", str(out), *TINY])
    line = assert_one_line_error(capsys, status)
    assert re.fullmatch(
        r"cifarnet-train: error: momentum epoch 1 batch \d: the loss is (nan|inf) \(training diverged\); lr 1000000.0 "
        r"is not the study's 0.1: try --clip-grad-norm 5 or --warmup-epochs 1 \(off by default\)",
        line,
    ), line
    assert not (out / "checkpoint.pt").exists() and read_metrics(out) == []
    # The divergence is no run to keep: the same folder takes a new run without --overwrite.
    assert train_main(["--variant", "momentum", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), *TINY]) == 0


def test_remedy_options_reach_the_run(pickles, tmp_path):
    out = tmp_path / "run"
    args = ["--variant", "momentum", "--epochs", "1", "--warmup-epochs", "1", "--clip-grad-norm", "2.5"]
    assert train_main([*args, "--data-dir", str(pickles), "--out", str(out), *TINY]) == 0
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (config["warmup_epochs"], config["clip_grad_norm"]) == (1, 2.5)


@pytest.mark.parametrize("option, value", [("--warmup-epochs", "-1"), ("--clip-grad-norm", "0")])
def test_bad_remedy_values_are_usage_errors(capsys, option, value):
    with pytest.raises(SystemExit) as info:
        train_main([option, value])
    assert info.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_diverged_all_variants_report_the_divergence_and_train_the_others(pickles, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--variant", "all", "--epochs", "1", "--data-dir", str(pickles), "--out", str(out), "--no-progress", *TINY]
    status = train_main([*args, "--lr", "1e6"])
    captured = capsys.readouterr()
    rows = table_rows(out / "results.md")
    diverged = [v for v in VARIANT_NAMES if rows[v][6].startswith("diverged")]
    assert status == 2 and diverged[:2] == ["baseline", "normalized"], rows
    # Each divergence is one line, and every variant after it was trained.
    errors = captured.err.splitlines()
    assert [line.split()[2] for line in errors] == diverged and all("(training diverged)" in line for line in errors)
    assert all(re.fullmatch(r"diverged \((nan|inf) loss in epoch 1(, batch \d+)?\)", rows[v][6]) for v in diverged), rows
    assert not any(rows[v][6] == "not run" for v in VARIANT_NAMES), rows
    # --resume retries only what is not complete: with a sane rate the diverged ones now train.
    assert train_main([*args, "--resume"]) == 0
    rows = table_rows(out / "results.md")
    assert [rows[v][0] for v in VARIANT_NAMES] == ["1"] * 6, rows
    assert not any(rows[v][6].startswith("diverged") for v in VARIANT_NAMES), rows


def test_results_command_regenerates_the_table_from_metrics_files(pickles, tmp_path, capsys):
    runs = tmp_path / "results"
    assert train_main(["--variant", "full", "--epochs", "2", "--data-dir", str(pickles), "--out", str(tmp_path / "full"), *TINY]) == 0
    # Only the small files are kept (as in docs/results): metrics, and a divergence record.
    (runs / "full-fused-seed0").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "metrics.jsonl", runs / "full-fused-seed0")
    (runs / "momentum-fused-seed0").mkdir()
    (runs / "momentum-fused-seed0" / "diverged.json").write_text('{"epoch": 1, "batch": 37, "loss": "nan"}\n')
    (runs / "notes").mkdir()  # not a run folder: ignored
    assert results_main([str(runs)]) == 0
    rows = table_rows(runs / "results.md")
    assert list(rows) == ["baseline", "normalized", "augmented", "momentum-fused-seed0", "dropout", "full-fused-seed0"]
    metrics = read_metrics(tmp_path / "full")
    assert rows["full-fused-seed0"][:4] == ["2", "24", f"{max(m['test_top1'] for m in metrics):.2f}",
                                            f"{metrics[-1]['test_top1']:.2f}"]
    assert rows["momentum-fused-seed0"] == ["0", "", "", "", "", "", "diverged (nan loss in epoch 1, batch 37)"]
    assert rows["dropout"][6] == "not run"
    # A second seed of the same configuration, one point better at its last epoch.
    (runs / "full-fused-seed1").mkdir()
    better = [{**m, "test_top1": m["test_top1"] + (i == len(metrics) - 1)} for i, m in enumerate(metrics)]
    (runs / "full-fused-seed1" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in better))
    assert results_main([str(runs)]) == 0
    seeds = table_rows(runs / "results.md", section="Over seeds")
    assert list(seeds) == ["baseline", "normalized", "augmented", "momentum-fused", "dropout", "full-fused"]
    finals = [metrics[-1]["test_top1"], better[-1]["test_top1"]]
    bests = [max(m["test_top1"] for m in metrics), max(m["test_top1"] for m in better)]
    assert seeds["full-fused"][:7] == [
        "2", "24", "2", "2", "0", f"{sum(bests) / 2:.2f} ({min(bests):.2f}–{max(bests):.2f})",
        f"{sum(finals) / 2:.2f} ({min(finals):.2f}–{max(finals):.2f})",
    ]
    loss = f"{metrics[-1]['test_loss']:.3f}"
    assert seeds["full-fused"][7] == f"{loss} ({loss}–{loss})"
    assert seeds["momentum-fused"][:8] == ["", "", "1", "0", "1", "", "", ""]
    assert seeds["baseline"][:4] == ["", "", "0", ""] and seeds["baseline"][8:] == ["≈70 / ≈2.5", "72.7"]
    with Image.open(runs / "test_accuracy.png") as image:
        assert image.format == "PNG"
    assert f"{runs / 'results.md'}" in capsys.readouterr().out
    assert results_main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder of runs" in capsys.readouterr().err
    # A run's own folder, and a folder without runs, are refused (not six "not run" rows).
    assert results_main([str(tmp_path / "full")]) == 2
    assert "is a run's folder (it holds metrics.jsonl); expected a folder of run folders" in capsys.readouterr().err
    assert not (tmp_path / "full" / "results.md").exists()
    assert results_main([str(runs / "notes")]) == 2
    assert "holds no run folders" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "docs" / "results" / "results.md").is_file(), reason="no docs/results/results.md")
def test_docs_results_table_is_the_one_its_metrics_give(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(REPO / "docs" / "results", copy)
    assert results_main([str(copy)]) == 0
    assert (copy / "results.md").read_text() == (REPO / "docs" / "results" / "results.md").read_text()


def test_results_command_puts_the_table_into_a_page(tmp_path, capsys):
    runs = tmp_path / "results"
    shutil.copytree(REPO / "docs" / "results", runs)
    page = tmp_path / "study.md"
    page.write_text(f"# Title\n\n{SEEDS_TABLE_MARKER}\n| old | table |\n|---|---|\n| x | y |\n\nText after.\n")
    assert results_main([str(runs), "--page", str(page)]) == 0
    text = page.read_text()
    generated = (runs / "results.md").read_text().split("## Over seeds\n", 1)[1]
    table = "".join(line + "\n" for line in generated.splitlines() if line.startswith("|"))
    assert text == f"# Title\n\n{SEEDS_TABLE_MARKER}\n{table}\nText after.\n"
    page.write_text("no marker\n")
    assert results_main([str(runs), "--page", str(page)]) == 2
    assert "has no line" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "docs" / "results" / "results.md").is_file(), reason="no docs/results/results.md")
def test_study_page_shows_the_generated_table_over_seeds():
    page = (REPO / "docs" / "study.md").read_text().split(SEEDS_TABLE_MARKER, 1)[1].lstrip("\n")
    shown = list(itertools.takewhile(lambda line: line.startswith("|"), page.splitlines()))
    generated = (REPO / "docs" / "results" / "results.md").read_text().split("## Over seeds\n", 1)[1]
    expected = [line for line in generated.splitlines() if line.startswith("|")]
    assert shown == expected, (
        "docs/study.md's table over seeds is not docs/results/results.md's: "
        "python -m cifarnet.study.results docs/results --page docs/study.md"
    )


# --- evaluation -------------------------------------------------------------------------------


@pytest.fixture
def trained(folders, tmp_path):
    out = tmp_path / "trained"
    assert train_main(["--variant", "augmented", "--epochs", "1", "--data-dir", str(folders), "--out", str(out), *TINY]) == 0
    return out


def test_bfloat16_training_is_evaluated_in_bfloat16(folders, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert train_main(["--variant", "full", "--epochs", "1", "--precision", "bfloat16", "--data-dir", str(folders),
                       "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert eval_main([str(out / "checkpoint.pt"), "--data-dir", str(folders), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    final = read_metrics(out)[-1]
    assert "ops fused, bfloat16" in printed  # the checkpoint's precision, by default
    assert f"test loss {final['test_loss']:.4f}" in printed  # the same computation as training's test pass


@pytest.mark.parametrize("world", [{}, {"WORLD_SIZE": "2", "RANK": "1"}])
def test_warnings_print_as_one_line(folders, tmp_path, capsys, monkeypatch, world):
    """A warning (here: bfloat16 on a CPU without bfloat16 arithmetic) prints as the command's
    errors do, naming the process where several run, not as Python's file:line form."""
    import cifarnet.study.train.loop as loop

    monkeypatch.setattr(loop, "has_bfloat16_arithmetic", lambda: False)
    for name, value in world.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "launch_from_environment", lambda: None)  # one process trains all the same
    out = tmp_path / "bf16"
    assert train_main(["--variant", "baseline", "--epochs", "1", "--precision", "bfloat16", "--data-dir", str(folders),
                       "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    where = "rank 1: " if world else ""
    assert f"cifarnet-train: warning: {where}precision bfloat16 on a CPU without AVX512-BF16 or AMX" in err
    assert "UserWarning" not in err and "train(" not in err


def test_eval_reports_what_training_measured(trained, folders, capsys):
    capsys.readouterr()
    status = eval_main([str(trained / "checkpoint.pt"), "--data-dir", str(folders), "--no-progress", "--device", "cpu"])
    assert status == 0
    out = capsys.readouterr().out
    final = read_metrics(trained)[-1]
    assert f"top-1 {final['test_top1']:.2f}%" in out and f"top-5 {final['test_top5']:.2f}%" in out
    assert f"test loss {final['test_loss']:.4f}" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in CLASS_NAMES}
    assert list(rows) == list(CLASS_NAMES)
    correct = sum(int(re.search(r"(\d+) / (\d+)$", row).group(1)) for row in rows.values())
    totals = [int(re.search(r"(\d+) / (\d+)$", row).group(2)) for row in rows.values()]
    assert totals == [2] * 10  # the 20 test images, two per class
    assert correct == round(final["test_top1"] * 20 / 100)
    plot = Path(re.search(r"confusion matrix: (.+)$", out, re.M).group(1))
    assert plot == trained / "confusion_matrix.png"
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_eval_with_the_other_ops_and_own_plot_path(trained, folders, tmp_path, capsys):
    plot = tmp_path / "plots" / "cm.png"
    args = [str(trained / "checkpoint.pt"), "--data-dir", str(folders), "--ops", "native", "--out", str(plot), "--no-progress"]
    assert eval_main(args) == 0
    assert plot.is_file() and f"confusion matrix: {plot}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, what",
    [(b"\x00" * 100, "a file of 100 bytes in an unknown format"), (b"epoch 1: 52%\n", "a text file"), (b"", "an empty file")],
    ids=["binary", "text", "empty"],
)
def test_eval_of_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, folders, capsys, content, what):
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(content)
    line = assert_one_line_error(capsys, eval_main([str(broken), "--data-dir", str(folders), "--no-progress"]), "cifarnet-eval")
    assert f"{broken} is not a checkpoint: it is {what}; expected a checkpoint.pt written by cifarnet-train" in line


def test_eval_of_a_checkpoint_that_does_not_fit_its_variant_names_the_keys(trained, folders, tmp_path, capsys):
    checkpoint = torch.load(trained / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["variant"] = "full"  # batch norms the augmented weights lack
    edited = tmp_path / "edited.pt"
    torch.save(checkpoint, edited)
    capsys.readouterr()
    line = assert_one_line_error(capsys, eval_main([str(edited), "--data-dir", str(folders), "--no-progress"]), "cifarnet-eval")
    assert f"{edited} does not fit a full ConvNet: Missing key(s) in state_dict: " in line and "bn1.weight" in line


def test_eval_of_a_png_names_what_it_got(trained, folders, capsys):
    capsys.readouterr()
    status = eval_main([str(trained / "curves.png"), "--data-dir", str(folders), "--no-progress"])
    assert "curves.png is not a checkpoint: it is a PNG image" in assert_one_line_error(capsys, status, "cifarnet-eval")


def test_eval_never_replaces_a_users_file(trained, folders, tmp_path, capsys):
    notes = tmp_path / "afile.txt"
    notes.write_text("my notes")
    capsys.readouterr()
    args = [str(trained / "checkpoint.pt"), "--data-dir", str(folders), "--no-progress", "--out", str(notes)]
    line = assert_one_line_error(capsys, eval_main(args), "cifarnet-eval")
    assert f"--out {notes} exists and is a text file, not a plot cifarnet drew" in line and "--overwrite" in line
    assert notes.read_text() == "my notes"
    assert eval_main([*args, "--overwrite"]) == 0
    with Image.open(notes) as image:
        assert image.format == "PNG"


def test_eval_redraws_its_own_plot(trained, folders, tmp_path):
    plot = tmp_path / "cm.png"
    args = [str(trained / "checkpoint.pt"), "--data-dir", str(folders), "--no-progress", "--out", str(plot)]
    assert eval_main(args) == 0 and eval_main(args) == 0


def test_eval_replaces_a_png_at_its_default_path_but_not_other_files(trained, folders, capsys):
    default = trained / "confusion_matrix.png"
    Image.new("RGB", (4, 4)).save(default)  # as an earlier cifarnet, which did not tag its PNGs, left it
    args = [str(trained / "checkpoint.pt"), "--data-dir", str(folders), "--no-progress"]
    assert eval_main(args) == 0
    assert default.stat().st_size > 1000
    default.write_text("not a plot")
    capsys.readouterr()
    assert "--overwrite" in assert_one_line_error(capsys, eval_main(args), "cifarnet-eval")
    assert default.read_text() == "not a plot"


def test_eval_out_that_is_a_folder_is_checked_before_evaluating(trained, tmp_path, capsys, monkeypatch):
    import cifarnet.study.cli as cli

    monkeypatch.setattr(cli, "load_cifar10", lambda *args, **kwargs: pytest.fail("read the data first"))
    capsys.readouterr()
    status = eval_main([str(trained / "checkpoint.pt"), "--out", str(tmp_path), "--no-progress"])
    assert f"--out {tmp_path}: it is a folder" in assert_one_line_error(capsys, status, "cifarnet-eval")


def test_eval_with_bad_data_is_one_line(trained, tmp_path, capsys):
    capsys.readouterr()
    status = eval_main([str(trained / "checkpoint.pt"), "--data-dir", str(tmp_path / "void"), "--no-progress"])
    assert "downloading" in assert_one_line_error(capsys, status, "cifarnet-eval")


def test_eval_without_data_dir_tests_on_the_data_the_run_trained_on(trained, folders, capsys):
    capsys.readouterr()
    assert eval_main([str(trained / "checkpoint.pt"), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"data: {folders.resolve()}, the folder {trained / 'checkpoint.pt'} was trained on (the same images)" in out
    final = read_metrics(trained)[-1]
    assert f"test loss {final['test_loss']:.4f}  top-1 {final['test_top1']:.2f}%" in out


def test_eval_without_data_dir_refuses_the_run_folder_when_it_holds_other_images(trained, folders, capsys):
    replaced = next((folders / "test" / "cat").iterdir())
    Image.new("RGB", (32, 32), (255, 0, 0)).save(replaced)
    capsys.readouterr()
    status = eval_main([str(trained / "checkpoint.pt"), "--no-progress", "--device", "cpu"])
    line = assert_one_line_error(capsys, status, "cifarnet-eval")
    assert f"{folders.resolve()}, the folder {trained / 'checkpoint.pt'} was trained on, no longer holds its images" in line
    assert "--data-dir" in line


def test_eval_without_data_dir_uses_the_default_folder_when_the_run_folder_is_gone(pickles, tmp_path, capsys):
    from cifarnet.study.data import default_data_dir

    copy = shutil.copytree(pickles, tmp_path / "copy")
    out = tmp_path / "run"
    assert train_main(["--variant", "baseline", "--epochs", "1", "--data-dir", str(copy), "--out", str(out), *TINY]) == 0
    shutil.rmtree(copy)
    checkpoint = out / "checkpoint.pt"
    capsys.readouterr()
    # Nothing at the default path either: the download is tried (and fails, offline), and the reason is given.
    status = eval_main([str(checkpoint), "--no-progress", "--device", "cpu"])
    why = (f"data: {default_data_dir()}, since {copy.resolve() / 'cifar-10-batches-py'}, the folder {checkpoint} "
           "was trained on, no longer exists (downloaded there when empty; --data-dir names another folder)")
    assert why in capsys.readouterr().out
    assert status == 2
    write_pickles(default_data_dir(), make_split(40, seed=21), make_split(20, seed=22))  # the pickles fixture's images
    assert eval_main([str(checkpoint), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert why in printed and "other images than" not in printed  # the same images
    final = read_metrics(out)[-1]
    assert f"test loss {final['test_loss']:.4f}  top-1 {final['test_top1']:.2f}%" in printed


def test_eval_on_other_images_than_the_run_trained_on_says_so(trained, pickles, folders, capsys):
    args = [str(trained / "checkpoint.pt"), "--no-progress", "--device", "cpu", "--data-dir"]
    capsys.readouterr()
    assert eval_main([*args, str(folders)]) == 0
    assert "other images than" not in capsys.readouterr().out
    assert eval_main([*args, str(pickles)]) == 0
    note = f"note: {pickles / 'cifar-10-batches-py'} holds other images than {trained / 'checkpoint.pt'} was trained on"
    assert note in capsys.readouterr().out

def test_module_entry_point_needs_a_command(capsys):
    from cifarnet.study.cli import main

    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


# --- real data --------------------------------------------------------------------------------


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real CIFAR-10 not found at {REAL_DATA}")
def test_full_variant_learns_on_real_data(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")  # reuse the machine's decode cache of the real data
    out = tmp_path / "full"
    args = ["--variant", "full", "--epochs", "2", "--limit-train", "10000", "--data-dir", str(REAL_DATA)]
    # One thread: the two cores are often shared with benchmarks, where OpenMP threads spin-wait.
    assert train_main([*args, "--out", str(out), "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
    metrics = read_metrics(out)
    assert len(metrics) == 2
    assert metrics[-1]["test_top1"] >= 30.0, metrics
