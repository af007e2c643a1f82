"""``batchnorm lab``: listing, clear errors for bad input, and no files written on error."""

from __future__ import annotations

import json

import pytest

from batchnorm.cli import main


def test_list_names_every_experiment_and_its_claims(capsys):
    assert main(["lab", "--list"]) == 0
    printed = capsys.readouterr().out
    for name in ("convergence", "learning-rate", "ioffe-mnist", "batch-size", "init",
                 "regularization"):
        assert name in printed
    assert "C15:" in printed
    assert "[data: mnist1d]" in printed and "[data: digits]" in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["lab", "warp-speed"], "unknown experiment 'warp-speed': expected one of convergence"),
        (["lab", "--data", "svhn:/x"], "unknown data 'svhn:/x': expected one of digits"),
        (["lab", "--data", "mnist:/no/such/folder"], "folder '/no/such/folder' does not exist"),
        (["lab", "--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["lab", "--device", "nodevice"], "--device 'nodevice' is not usable"),
    ],
)
def test_bad_input_fails_clearly_without_writing(arguments, message, tmp_path, capsys):
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_small_experiment_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["lab", "init", "--quick", "--data", "digits", "--jobs", "1", "--no-progress",
                 "--out", str(out)]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "2 tuning + 18 evaluation runs over 3 seeds" in printed  # --quick: 3 seeds
    assert "C6" in printed and str(out / "report.html") in printed
    assert "20 runs trained, 0 reused" in printed
    assert main(arguments) == 0
    assert "0 runs trained, 20 reused" in capsys.readouterr().out
    command = json.loads((out / "results.json").read_text())["command"]
    assert command == (f"batchnorm lab init --quick --seeds 3 --data digits --out {out} "
                       "--jobs 1")


def test_default_seeds_are_five(tmp_path, capsys, monkeypatch):
    import batchnorm.lab.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_lab", lambda configs, seeds, *rest: seen.setdefault("s", seeds)
                        and 0)
    assert main(["lab", "init", "--data", "digits", "--out", str(tmp_path / "o")]) == 0
    assert seen["s"] == [0, 1, 2, 3, 4]
    seen.clear()
    assert main(["lab", "init", "--seeds", "7", "--data", "digits"]) == 0
    assert seen["s"] == list(range(7))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_experiments_run_on_other_data(dataset, tmp_path, capsys):
    from tests.lab.conftest import make_cifar_folder, make_idx_folder

    folder = tmp_path / "data"
    if dataset == "mnist":
        make_idx_folder(folder / "MNIST" / "raw", gzipped=True, train=96, test=40, shape=(28, 28))
        experiment = "init"  # an MLP on 784 inputs
    else:
        make_cifar_folder(folder / "cifar-10-batches-py", per_batch=20)
        experiment = "batch-size"  # an MLP and a 2-D CNN on 3x32x32 images
    out = tmp_path / "out"
    arguments = ["lab", experiment, "--quick", "--seeds", "2", "--jobs", "1", "--no-progress",
                 "--data", f"{dataset}:{folder}", "--out", str(out)]
    assert main(arguments) == 0
    assert (out / "report.html").exists()
    assert dataset in (out / "report.md").read_text()
