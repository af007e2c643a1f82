"""The report's content, independent of format: one section per claim, blocks inside it.

``markdown.py`` and ``html.py`` only turn these blocks into text, so the two documents always
say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchnorm.lab.claims import CLAIMS
from batchnorm.lab.experiments.base import Figure, Table
from batchnorm.lab.report.results import AnalyzedExperiment
from batchnorm.lab.verdict import Finding


@dataclass
class ExperimentBlock:
    name: str
    question: str
    setup: str
    published: str
    published_tables: tuple[Table, ...]
    findings: list[Finding]
    figures: list[Figure]  # empty when shown under an earlier claim
    tables: list[Table]
    notes: list[str]
    shown_under: str | None = None  # the claim whose section already shows this experiment


@dataclass
class ClaimSection:
    claim: str
    text: str
    blocks: list[ExperimentBlock] = field(default_factory=list)


def claim_sections(analyzed: list[AnalyzedExperiment]) -> list[ClaimSection]:
    """Sections in claim order; an experiment's plots and tables appear under its first claim."""
    order = {claim: index for index, claim in enumerate(CLAIMS)}
    claims = sorted(
        {claim for item in analyzed for claim in item.experiment.claims},
        key=lambda claim: order.get(claim, len(order)),
    )
    first_claim: dict[str, str] = {}
    sections = []
    for claim in claims:
        section = ClaimSection(claim, CLAIMS.get(claim, claim))
        for item in analyzed:
            if claim not in item.experiment.claims:
                continue
            name = item.experiment.name
            shown_under = first_claim.setdefault(name, claim)
            repeated = shown_under != claim
            section.blocks.append(
                ExperimentBlock(
                    name=name,
                    question=item.experiment.question,
                    setup=item.experiment.setup(item.config),
                    published=item.experiment.published,
                    published_tables=item.experiment.published_tables,
                    findings=[f for f in item.analysis.findings if f.claim == claim],
                    figures=[] if repeated else item.analysis.figures,
                    tables=[] if repeated else item.analysis.tables,
                    notes=item.analysis.notes,
                    shown_under=shown_under if repeated else None,
                )
            )
        sections.append(section)
    return sections


def all_findings(analyzed: list[AnalyzedExperiment]) -> list[Finding]:
    order = {claim: index for index, claim in enumerate(CLAIMS)}
    findings = [finding for item in analyzed for finding in item.analysis.findings]
    return sorted(findings, key=lambda finding: order.get(finding.claim, len(order)))


def settings_lines(document: dict) -> list[str]:
    """The suite's settings, one line each, for the top of the report."""
    seconds = document.get("wall_seconds")
    lines = [
        f"Data: {document['data']['description']}",
        f"Seeds: {', '.join(map(str, document['seeds']))}; device: {document['device']}; "
        f"size: {'quick' if document['quick'] else 'default'}",
        f"Runs: {document['run_count']}; created {document['created']}"
        + (f"; training wall time {seconds:.0f} s" if seconds is not None else ""),
        "Every verdict comes from the effect's 95% confidence interval across seeds "
        "(Student t); the threshold of each rule is stated beside it.",
    ]
    return lines
