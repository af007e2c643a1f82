"""``report.md``: the report as Markdown, with the PNG plots beside it."""

from __future__ import annotations

from batchnorm.lab.experiments.base import Table
from batchnorm.lab.report.document import (
    NOT_TESTED,
    TITLE,
    ClaimSection,
    DataSetBlock,
    SummaryRow,
    anchor,
    environment_lines,
    method_lines,
)
from batchnorm.lab.verdict import Finding

SUMMARY_HEADERS = ["claim", "data (split)", "measure", "threshold", "estimate [95% CI]",
                   "verdict", "experiment"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> list[str]:
    lines = [f"*{table.title}*", ""]
    lines.append("| " + " | ".join(map(_cell, table.headers)) + " |")
    lines.append("|" + "---|" * len(table.headers))
    lines.extend("| " + " | ".join(map(_cell, row)) + " |" for row in table.rows)
    return [*lines, ""]


def summary_markdown(rows: list[SummaryRow]) -> list[str]:
    table = Table(
        "Every claim: one row per finding; a claim without one is not yet tested",
        SUMMARY_HEADERS,
        [[f"[{row.claim}](#{anchor(row.claim)})", row.data, row.measure, row.threshold,
          row.estimate, f"**{row.verdict}**" if row.verdict != NOT_TESTED else row.verdict,
          f"`{row.experiment}`" if row.verdict != NOT_TESTED else row.experiment]
         for row in rows],
    )
    return table_markdown(table)


def finding_markdown(finding: Finding) -> list[str]:
    seeds = ", ".join(f"{value:.3g}" for value in finding.per_seed)
    noise = (
        f"; the shared test examples add a standard error of {finding.example_se:.2f} pp"
        if finding.example_se else ""
    )
    lines = [
        f"- **Verdict: {finding.verdict}.** {finding.measure}, on {finding.data} "
        f"({finding.split} split).",
        f"- Estimate: {finding.effect_text()} (95% CI over {finding.seeds} seeds{noise}; per "
        f"seed: {seeds}).",
        f"- Threshold {finding.threshold_text()}. Rule: {finding.rule}.",
        f"- Why the threshold is above the noise: {finding.why}.",
    ]
    if finding.degenerate:
        lines.append(f"- No verdict from this interval: {finding.degenerate}.")
    return [*lines, ""]


def data_markdown(blocks: list[DataSetBlock]) -> list[str]:
    lines = ["## Data sets", ""]
    for block in blocks:
        lines.extend([f"- **{block.description}**; used by "
                      + ", ".join(f"`{name}`" for name in block.experiments)])
    lines.append("")
    for block in blocks:
        if block.baselines is not None:
            lines.extend(table_markdown(block.baselines))
    return lines


def render_markdown(
    document: dict,
    rows: list[SummaryRow],
    sections: list[ClaimSection],
    data: list[DataSetBlock],
    pngs: dict[str, str],
) -> str:
    lines = [f"# {TITLE}", ""]
    for line in method_lines():
        lines.extend([line, ""])
    lines.extend(["## Summary", ""])
    lines.extend(summary_markdown(rows))
    lines.extend(data_markdown(data))
    for section in sections:
        claim = section.claim
        lines.extend([f'<a id="{anchor(claim.id)}"></a>', "", f"## {claim.id}: {claim.text}", ""])
        lines.extend([f"*In plain words.* {claim.explanation}", ""])
        if not section.tested:
            planned = ", ".join(f"`{name}`" for name in claim.experiments)
            lines.extend([f"**Not yet tested.** The experiment {planned} will test it.", ""])
        for block in section.blocks:
            lines.extend([f"### `{block.name}`: {block.question}", ""])
            if block.shown_under:
                lines.extend([f"Data, setup, plots and tables: see `{block.name}` under "
                              f"[{block.shown_under}](#{anchor(block.shown_under)}).", ""])
            else:
                lines.extend([f"**Data.** {block.data}. {block.data_reason}", ""])
                lines.extend([f"**Setup.** {block.setup}", ""])
                if block.tuning is not None:
                    lines.extend(table_markdown(block.tuning))
                for figure in block.figures:
                    lines.extend([f"![{figure.name}]({pngs[figure.name]})", "",
                                  f"*Figure ({figure.name}).* {figure.caption}", ""])
                for table in block.tables:
                    lines.extend(table_markdown(table))
            for finding in block.findings:
                lines.extend(finding_markdown(finding))
            for note in block.notes:
                lines.extend([f"*Note:* {note}", ""])
            lines.extend([f"**Published.** {block.published}", ""])
            for table in block.published_tables:
                lines.extend(table_markdown(table))
    lines.extend(["## How these numbers were made", ""])
    lines.extend(f"- {line}" for line in environment_lines(document))
    return "\n".join(lines).rstrip() + "\n"
