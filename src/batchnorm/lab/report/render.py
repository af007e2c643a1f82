"""Render the report into an output folder from its ``results.json`` alone."""

from __future__ import annotations

from pathlib import Path

from batchnorm.lab.report.document import (
    all_findings,
    claim_sections,
    data_sets,
    findings_json,
    summary_rows,
)
from batchnorm.lab.report.html import render_html
from batchnorm.lab.report.markdown import render_markdown
from batchnorm.lab.report.plots import render_png
from batchnorm.lab.report.results import analyze_results, read_results, write_results
from batchnorm.lab.verdict import Finding


def render_report(folder: Path) -> list[Finding]:
    """Write report.md, report.html and one PNG per figure; store every claim's status and
    findings in results.json (under "claims")."""
    folder = Path(folder)
    document = read_results(folder)
    analyzed = analyze_results(document)
    sections = claim_sections(analyzed)
    rows = summary_rows(sections)
    data = data_sets(analyzed)
    pngs: dict[str, bytes] = {}
    for item in analyzed:
        for figure in item.analysis.figures:
            pngs[figure.name] = render_png(figure)
            (folder / f"{figure.name}.png").write_bytes(pngs[figure.name])
    names = {name: f"{name}.png" for name in pngs}
    (folder / "report.md").write_text(render_markdown(document, rows, sections, data, names))
    (folder / "report.html").write_text(render_html(document, rows, sections, data, pngs))
    document["claims"] = findings_json(sections)
    write_results(folder, document)
    return all_findings(analyzed)


def summary_text(findings: list[Finding], folder: Path) -> str:
    """The one-screen summary printed at the end of ``batchnorm lab``."""
    lines = [f"{'claim':6s}{'verdict':15s}{'estimate [95% CI]':32s}{'threshold':12s}data"]
    for finding in findings:
        lines.append(f"{finding.claim:6s}{finding.verdict:15s}{finding.effect_text():32s}"
                     f"{finding.threshold_text():12s}{finding.data} ({finding.experiment})")
        lines.append(f"{'':6s}{finding.measure}")
    lines.append(f"Report: {Path(folder) / 'report.html'} (also report.md, results.json)")
    return "\n".join(lines)
