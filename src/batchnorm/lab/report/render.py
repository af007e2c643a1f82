"""Render the report into an output folder from its ``results.json`` alone."""

from __future__ import annotations

from pathlib import Path

from batchnorm.lab.report.document import all_findings, claim_sections
from batchnorm.lab.report.html import render_html
from batchnorm.lab.report.markdown import render_markdown
from batchnorm.lab.report.plots import render_png
from batchnorm.lab.report.results import analyze_results, read_results, write_results
from batchnorm.lab.verdict import Finding


def render_report(folder: Path) -> list[Finding]:
    """Write report.md, report.html and one PNG per figure; store the findings in results.json."""
    folder = Path(folder)
    document = read_results(folder)
    analyzed = analyze_results(document)
    findings = all_findings(analyzed)
    sections = claim_sections(analyzed)
    pngs: dict[str, bytes] = {}
    for item in analyzed:
        for figure in item.analysis.figures:
            pngs[figure.name] = render_png(figure)
            (folder / f"{figure.name}.png").write_bytes(pngs[figure.name])
    names = {name: f"{name}.png" for name in pngs}
    (folder / "report.md").write_text(render_markdown(document, findings, sections, names))
    (folder / "report.html").write_text(render_html(document, findings, sections, pngs))
    document["findings"] = [finding.to_dict() for finding in findings]
    write_results(folder, document)
    return findings


def summary_text(findings: list[Finding], folder: Path) -> str:
    """The one-screen summary printed at the end of ``batchnorm lab``."""
    lines = [f"{'claim':6s}{'verdict':16s}effect [95% CI]   ({'experiment'})"]
    for finding in findings:
        lines.append(f"{finding.claim:6s}{finding.verdict:16s}{finding.effect_text()}   "
                     f"({finding.experiment})")
        lines.append(f"{'':6s}{finding.measure}")
    lines.append(f"Report: {Path(folder) / 'report.html'} (also report.md, results.json)")
    return "\n".join(lines)
