"""The report is rendered from results.json alone, and says what the issue asks of it."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from batchnorm.cli import main
from batchnorm.lab.report.results import ResultsError
from batchnorm.lab.suite import run_suite
from tests.lab.conftest import make_tiny_configs


@pytest.fixture(scope="module")
def results_only(tmp_path_factory):
    """A folder that holds nothing but the results.json of a finished tiny suite."""
    configs = make_tiny_configs()
    out = tmp_path_factory.mktemp("lab")
    run_suite(configs, (0, 1), data="digits", data_description="digits (tiny)", out=out,
              store=out / "runs", progress=False)
    bare = tmp_path_factory.mktemp("bare")
    shutil.copy(out / "results.json", bare / "results.json")
    return bare


def test_report_command_renders_from_results_alone(results_only, capsys):
    assert main(["report", str(results_only)]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "C9" in printed
    names = {path.name for path in results_only.iterdir()}
    assert {"report.html", "report.md", "results.json"} <= names
    assert {"convergence.png", "learning-rate.png", "ioffe-mnist.png", "batch-size.png",
            "init.png", "regularization.png"} <= names
    for png in results_only.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    findings = json.loads((results_only / "results.json").read_text())["findings"]
    assert {finding["claim"] for finding in findings} == {"C1", "C2", "C3", "C5", "C6", "C9",
                                                           "C15"}


def test_html_is_self_contained(results_only):
    main(["report", str(results_only)])
    html = (results_only / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', html)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert html.count("<img") == 6


def test_report_shows_claims_rules_verdicts_and_published_figures(results_only):
    main(["report", str(results_only)])
    markdown = (results_only / "report.md").read_text()
    for claim in ("C1", "C2", "C3", "C5", "C6", "C9", "C15"):
        assert f"## {claim}:" in markdown
    assert markdown.count("- Rule: supported if the 95% CI lies entirely") == 9
    assert "**Published.**" in markdown and "| BN | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |" in markdown
    assert "as quoted" in markdown  # the secondary figures are marked
    assert re.search(r"Verdict: (supported|not supported|inconclusive)\.", markdown)
    assert "![batch-size](batch-size.png)" in markdown


def test_report_rejects_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "expected the output folder of a lab run" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        from batchnorm.lab.report import render_report

        render_report(tmp_path)
