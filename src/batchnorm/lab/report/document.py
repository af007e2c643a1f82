"""The report's content, independent of format: a summary of all claims, one section per claim,
the data sets, and how the numbers were made.

``markdown.py`` and ``html.py`` only turn this content into text, so the two documents always say
the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchnorm.lab.claims import CLAIM_LIST, Claim
from batchnorm.lab.data.mnist1d import NAME as MNIST1D
from batchnorm.lab.data.mnist1d import PUBLISHED_ACCURACY as MNIST1D_PUBLISHED
from batchnorm.lab.experiments.base import Figure, Table
from batchnorm.lab.report.results import AnalyzedExperiment
from batchnorm.lab.verdict import MIN_DISTINCT, NOISE_MULTIPLE, Finding

TITLE = "Batch norm's claims, tested"
NOT_TESTED = "not yet tested"


def anchor(claim: str) -> str:
    return claim.lower()


@dataclass
class ExperimentBlock:
    name: str
    question: str
    data: str  # the data set, described
    data_reason: str
    setup: str
    tuning: Table | None
    published: str
    published_tables: tuple[Table, ...]
    findings: list[Finding]
    figures: list[Figure]  # empty when shown under an earlier claim
    tables: list[Table]
    notes: list[str]
    shown_under: str | None = None  # the claim whose section already shows this experiment


@dataclass
class ClaimSection:
    claim: Claim
    blocks: list[ExperimentBlock] = field(default_factory=list)

    @property
    def tested(self) -> bool:
        return any(block.findings for block in self.blocks)


@dataclass(frozen=True)
class SummaryRow:
    """One line of the summary table: a finding, or a claim not yet tested."""

    claim: str
    data: str
    measure: str
    threshold: str
    estimate: str
    verdict: str
    experiment: str


def claim_sections(analyzed: list[AnalyzedExperiment]) -> list[ClaimSection]:
    """Every claim in order; an experiment's setup, plots and tables appear under its first
    claim, and later claims point there."""
    first_claim: dict[str, str] = {}
    sections = []
    for claim in CLAIM_LIST:
        section = ClaimSection(claim)
        for item in analyzed:
            if claim.id not in item.experiment.claims:
                continue
            name = item.experiment.name
            shown_under = first_claim.setdefault(name, claim.id)
            repeated = shown_under != claim.id
            section.blocks.append(
                ExperimentBlock(
                    name=name,
                    question=item.experiment.question,
                    data=item.data["description"],
                    data_reason=item.experiment.data_reason,
                    setup=item.experiment.setup(item.config),
                    tuning=None if repeated else item.tuning,
                    published=item.experiment.published,
                    published_tables=item.experiment.published_tables,
                    findings=[f for f in item.analysis.findings if f.claim == claim.id],
                    figures=[] if repeated else item.analysis.figures,
                    tables=[] if repeated else item.analysis.tables,
                    notes=[] if repeated else item.analysis.notes,
                    shown_under=shown_under if repeated else None,
                )
            )
        sections.append(section)
    return sections


def all_findings(analyzed: list[AnalyzedExperiment]) -> list[Finding]:
    order = {claim.id: index for index, claim in enumerate(CLAIM_LIST)}
    findings = [finding for item in analyzed for finding in item.analysis.findings]
    return sorted(findings, key=lambda finding: order.get(finding.claim, len(order)))


def summary_rows(sections: list[ClaimSection]) -> list[SummaryRow]:
    """All claims: one row per finding, and one "not yet tested" row for a claim without any."""
    rows = []
    for section in sections:
        findings = [finding for block in section.blocks for finding in block.findings]
        for finding in findings:
            rows.append(SummaryRow(
                claim=section.claim.id,
                data=f"{finding.data} ({finding.split})",
                measure=finding.measure,
                threshold=finding.threshold_text(),
                estimate=finding.effect_text(),
                verdict=finding.verdict,
                experiment=finding.experiment,
            ))
        if not findings:
            planned = ", ".join(section.claim.experiments)
            rows.append(SummaryRow(
                claim=section.claim.id, data="", measure=section.claim.text, threshold="",
                estimate="", verdict=NOT_TESTED,
                experiment=f"{planned} (to come)" if planned else "",
            ))
    return rows


def findings_json(sections: list[ClaimSection]) -> list[dict]:
    """The summary as plain data for results.json: every claim, with its findings (if any)."""
    return [
        {
            "claim": section.claim.id,
            "text": section.claim.text,
            "status": "tested" if section.tested else NOT_TESTED,
            "experiments": list(section.claim.experiments),
            "findings": [f.to_dict() for block in section.blocks for f in block.findings],
        }
        for section in sections
    ]


def method_lines() -> list[str]:
    """How every verdict is reached, in a few sentences, for the top of the report."""
    return [
        "Every data set is split three ways: training, validation (carved from the training "
        "set, stratified, fixed) and test. Every choice (a learning rate, and so on) is made on "
        "validation, on tuning seeds of its own; the test part is scored once per run, at its "
        "end. Each finding says which split its number comes from.",
        "An estimate is the mean over the evaluation seeds with its 95% confidence interval. "
        "The interval joins two sources of noise: the seeds (Student t) and, for a measure made "
        "of test accuracies, the test examples themselves (every seed is scored on the same "
        "test set, so its luck does not average away; the paired standard error over examples "
        "is added in quadrature).",
        f"A claim is supported when the whole interval lies on the claim's side of a threshold "
        f"fixed in advance, not supported when it lies entirely on the other side, and "
        f"inconclusive otherwise. An interval of zero width, or one from fewer than "
        f"{MIN_DISTINCT} distinct per-seed values, is always inconclusive.",
        f"Each threshold is above the noise: for accuracies it is {NOISE_MULTIPLE:g} times the "
        "largest standard error that sampling the test set alone could give the measure "
        "(binomial, at 50% accuracy); each finding states its own reason. Accuracy is in % "
        "everywhere; differences of accuracy are in percentage points (pp).",
    ]


@dataclass(frozen=True)
class DataSetBlock:
    name: str
    description: str
    experiments: list[str]
    baselines: Table | None


def data_sets(analyzed: list[AnalyzedExperiment]) -> list[DataSetBlock]:
    """The data sets the suite ran on, their sizes, and (for MNIST-1D) the published baselines
    beside our own accuracies."""
    blocks: dict[str, DataSetBlock] = {}
    for item in analyzed:
        description = item.data["description"]
        name = description.split(":")[0]
        block = blocks.setdefault(name, DataSetBlock(name, description, [], None))
        block.experiments.append(item.experiment.name)
    result = []
    for name, block in blocks.items():
        table = None
        if name == MNIST1D:
            ours = [b for item in analyzed for b in item.analysis.baselines if b.data == name]
            rows = []
            for model, published in MNIST1D_PUBLISHED.items():
                matching = [b for b in ours if b.model == model]
                cells = "; ".join(
                    f"{b.accuracy:.1f}% ({b.setting}, {b.seeds} seeds)" for b in matching
                )
                rows.append([model, f"{published:.0f}%", cells or "-"])
            table = Table(
                "MNIST-1D test accuracy: published baselines (the data set's authors, as "
                "quoted) beside ours",
                ["model", "published (as quoted)", "ours"],
                rows,
            )
        result.append(DataSetBlock(name, block.description, block.experiments, table))
    return result


def environment_lines(document: dict) -> list[str]:
    """How the numbers were made: the command, versions, seeds, data sizes, time."""
    versions = document.get("versions", {})
    lines = [
        f"Command: `{document.get('command', '?')}`",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"Evaluation seeds: {', '.join(map(str, document['seeds']))} (tuning runs use seeds "
        "of their own); device: " + document["device"]
        + f"; size: {'quick' if document['quick'] else 'default'}",
    ]
    for entry in document["experiments"]:
        sizes = entry["data"].get("sizes", {})
        size_text = ", ".join(f"{count} {part}" for part, count in sizes.items())
        lines.append(f"Data of `{entry['name']}`: {entry['data']['description']} ({size_text})")
    seconds = document.get("wall_seconds")
    lines.append(
        f"Runs: {document['run_count']} ({document.get('reused_runs', 0)} reused from earlier "
        f"runs); created {document['created']}"
        + (f"; wall time {seconds:.0f} s with {document.get('jobs', 1)} process(es)"
           if seconds is not None else "")
    )
    return lines
