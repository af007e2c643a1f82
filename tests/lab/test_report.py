"""The report is rendered from results.json alone, and says what a reviewer needs: every claim
(tested or not) with its measure, threshold, interval and verdict, captioned figures, accuracy in
%, the published figures beside ours, a plain explanation per claim, and how it was made."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from batchnorm.cli import main
from batchnorm.lab.claims import CLAIM_LIST
from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.report.results import ResultsError
from batchnorm.lab.suite import run_suite
from tests.lab.conftest import TINY_DATA, make_tiny_configs

FIGURES = {"convergence", "learning-rate", "ioffe-mnist", "batch-size", "init", "regularization"}


@pytest.fixture(scope="module")
def results_only(tmp_path_factory):
    """A folder that holds nothing but the results.json of a finished tiny suite (3 seeds)."""
    configs = make_tiny_configs()
    out = tmp_path_factory.mktemp("lab")
    run_suite(configs, (0, 1, 2), data=TINY_DATA, out=out, store=out / "runs", progress=False,
              command="batchnorm lab --seeds 3 (tiny configs)")
    bare = tmp_path_factory.mktemp("bare")
    shutil.copy(out / "results.json", bare / "results.json")
    assert main(["report", str(bare)]) == 0
    return bare


def test_report_command_renders_from_results_alone(results_only, capsys):
    assert main(["report", str(results_only)]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "C9" in printed and "threshold" in printed
    names = {path.name for path in results_only.iterdir()}
    assert {"report.html", "report.md", "results.json"} <= names
    assert {f"{name}.png" for name in FIGURES} <= names
    for png in results_only.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    claims = json.loads((results_only / "results.json").read_text())["claims"]
    assert [entry["claim"] for entry in claims] == [claim.id for claim in CLAIM_LIST]
    tested = {entry["claim"] for entry in claims if entry["status"] == "tested"}
    assert tested == {claim for experiment in EXPERIMENTS.values() for claim in experiment.claims}
    assert tested >= {"C1", "C2", "C3", "C5", "C6", "C9", "C15"}
    for entry in claims:
        for finding in entry["findings"]:
            assert {"measure", "unit", "threshold", "low", "high", "verdict", "why", "data",
                    "split"} <= set(finding)


def test_summary_lists_all_fifteen_claims_with_measure_threshold_interval_and_link(results_only):
    markdown = (results_only / "report.md").read_text()
    summary = markdown.split("## Summary", 1)[1].split("## Data sets", 1)[0]
    header = ("| claim | data (split) | measure | threshold | estimate [95% CI] | verdict | "
              "experiment |")
    assert header in summary
    for claim in CLAIM_LIST:
        assert f"| [{claim.id}](#{claim.id.lower()}) |" in summary
        assert f'<a id="{claim.id.lower()}"></a>' in markdown  # the link's target
    untested = [line for line in summary.splitlines()
                if line.startswith("| [") and "| not yet tested |" in line]
    covered = {claim for experiment in EXPERIMENTS.values() for claim in experiment.claims}
    waiting = [claim for claim in CLAIM_LIST if claim.id not in covered]
    assert len(untested) == len(waiting)  # each naming the experiment to come
    assert all("(to come)" in line for line in untested)
    for claim in waiting:
        assert f"**Not yet tested.** The experiment `{claim.experiments[-1]}`" in markdown
    for line in summary.splitlines():
        if "**" in line:  # a tested row: threshold and interval in the stated unit
            assert re.search(r"\| [<>] [+-]?\d", line), line
            assert re.search(r"\[[+-]?[\d.]+(x| pp), [+-]?[\d.]+(x| pp)\]", line), line


def test_every_claim_has_a_plain_explanation_and_every_figure_a_caption(results_only):
    markdown = (results_only / "report.md").read_text()
    assert markdown.count("*In plain words.*") == 15
    captions = re.findall(r"\*Figure \(([\w-]+)\)\.\* (.+)", markdown)
    assert {name for name, _ in captions} >= FIGURES
    for name, caption in captions:
        if name in FIGURES:
            assert "mean over 3 seeds" in caption and "95% t-interval" in caption
        assert "95%" in caption or "seed" in caption, (name, caption)
    html = (results_only / "report.html").read_text()
    assert html.count("<figcaption>") == len(captions)


def test_accuracy_is_in_percent_and_splits_are_named(results_only):
    markdown = (results_only / "report.md").read_text()
    # No accuracy written as a fraction: every accuracy cell is a percentage.
    for table_line in re.findall(r"^\|.*accuracy.*\|$", markdown, flags=re.MULTILINE):
        assert not re.search(r"\| 0\.\d+ \|", table_line), table_line
    assert "(validation split)" in markdown and "(test split)" in markdown
    assert "chosen on the validation part" in markdown


def test_published_figures_are_beside_ours_in_our_units(results_only):
    markdown = (results_only / "report.md").read_text()
    assert "| BN | 76.4 | 76.3 | 75.2 | 72.7 | 65.3 | 11.1 pp |" in markdown  # 100 - error
    assert "as quoted" in markdown  # the secondary figures are marked
    assert "| Santurkar et al. 2018, VGG CIFAR-10 | 83% | 80% | +3.0 pp |" in markdown
    assert "BN-Baseline (same rate) | 13.3M | 2.33x" in markdown


def test_the_end_says_how_the_numbers_were_made(results_only):
    markdown = (results_only / "report.md").read_text()
    tail = markdown.split("## How these numbers were made", 1)[1]
    assert "Command: `batchnorm lab --seeds 3 (tiny configs)`" in tail
    for package in ("torch", "numpy", "batchnorm", "mnist1d", "python"):
        assert f"{package} " in tail.split("Versions:", 1)[1].split("\n", 1)[0]
    assert "Evaluation seeds: 0, 1, 2" in tail
    assert re.search(r"digits: \d+ train / \d+ validation / 540 test", tail)


def test_html_is_self_contained(results_only):
    html = (results_only / "report.html").read_text()
    markdown = (results_only / "report.md").read_text()
    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', html)
    assert sources and all(source.startswith("data:") for source in sources)
    assert html.count("<img") == len(re.findall(r"\*Figure \(", markdown))
    assert "<script" not in html
    for claim in CLAIM_LIST:
        assert f'href="#{claim.id.lower()}"' in html and f'id="{claim.id.lower()}"' in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium here (apt-get install chromium)")
def test_html_renders_offline_in_a_real_browser(results_only, tmp_path):
    """Headless Chromium, with no network, draws the page: the screenshot is a real picture
    (not blank) and the console reports no error."""
    from PIL import Image

    screenshot = tmp_path / "page.png"
    profile = tmp_path / "profile"
    completed = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",  # no network at all
         "--enable-logging=stderr", "--v=0", "--window-size=1200,2400",
         "--virtual-time-budget=5000", f"--screenshot={screenshot}",
         (results_only / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.exists(), completed.stderr[-2000:]
    console = [line for line in completed.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "error" in line.lower()], console
    assert "Uncaught" not in completed.stderr
    image = Image.open(screenshot).convert("L")
    assert image.size == (1200, 2400)
    low, high = image.getextrema()
    assert high - low > 100  # text and figures, not a blank page
    histogram = image.histogram()
    assert sum(histogram[:128]) > 1000  # enough dark pixels: text was drawn


def test_report_rejects_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "expected the output folder of a lab run" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        from batchnorm.lab.report import render_report

        render_report(tmp_path)


def test_report_refuses_runs_trained_at_another_choice_than_their_tuning_runs_make(
    results_only, tmp_path
):
    document = json.loads((results_only / "results.json").read_text())
    entry = next(e for e in document["experiments"] if e["name"] == "init")
    entry["tuning"]["chosen"] = {"learning_rate": {"none": 9.0, "batch": 9.0}}
    (tmp_path / "results.json").write_text(json.dumps(document))
    from batchnorm.lab.report import render_report

    with pytest.raises(ResultsError, match="init: its tuning runs now choose"):
        render_report(tmp_path)
