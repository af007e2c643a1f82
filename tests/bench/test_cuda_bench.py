"""``batchnorm bench --device cuda``: its plumbing on the CPU with tiny cases (its numbers come
from running it on a GPU, not from here), and its refusal where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

from batchnorm.bench import cuda
from batchnorm.cli import main


def test_traffic_is_stated_per_mode_in_bytes_of_the_input():
    case = cuda.Case("c", (2, 3, 4, 5), torch.float16, "contiguous", "train")
    assert case.traffic_bytes == 8 * 120 * 2
    assert cuda.Case("c", (2, 3), torch.float32, "contiguous", "eval").traffic_bytes == 2 * 6 * 4
    assert cuda.TRAFFIC == {"train": 8, "eval": 2, "train_relu": 8}


def test_default_and_quick_cases_cover_the_issue_shapes():
    cases = cuda.default_cases()
    sizes = {(case.size, case.dtype) for case in cases}
    assert ((32, 256, 56, 56), torch.float16) in sizes
    assert ((32, 256, 56, 56), torch.float32) in sizes
    assert ((4, 128, 1024, 1024), torch.float16) in sizes
    assert ((20, 6, 65536), torch.float32) in sizes
    assert {case.layout for case in cases if len(case.size) == 4} == {"contiguous",
                                                                        "channels_last"}
    assert {case.mode for case in cases} == {"train", "eval", "train_relu"}
    assert {case.mode for case in cuda.quick_cases()} == set(cuda.MODES)


@pytest.mark.parametrize("mode", cuda.MODES)
@pytest.mark.parametrize("size, layout", [((4, 3, 6, 5), "channels_last"), ((4, 3, 17),
                                                                           "contiguous")])
def test_cases_run_and_fill_the_table_on_the_cpu(mode, size, layout):
    case = cuda.Case("tiny", size, torch.float32, layout, mode)
    device = torch.device("cpu")
    row = cuda.run_case(case, device, bandwidth=1e10, rounds=2)
    assert row.ours_s > 0 and row.torch_s > 0 and row.kernels_s > 0
    assert row.speedup == row.torch_s / row.ours_s
    assert row.share(row.ours_s) == case.traffic_bytes / row.ours_s / 1e10
    table = cuda.format_table([row])
    assert table.splitlines()[-1].count("|") == 14 and f"| {mode} |" in table


def test_run_measures_the_copy_bandwidth_and_reports_progress():
    seen = []
    case = cuda.Case("t", (4, 3, 5), torch.float32, "contiguous", "eval")
    description, rows = cuda.run([case], torch.device("cpu"), rounds=2, progress=seen.append)
    assert rows == seen and "copy" in description and rows[0].copy_bandwidth > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_without_cuda_says_so_in_one_line_and_fails(capsys):
    assert main(["bench", "--device", "cuda"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no CUDA device" in captured.err
