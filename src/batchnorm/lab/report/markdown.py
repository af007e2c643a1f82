"""``report.md``: the report as Markdown, with the PNG plots beside it."""

from __future__ import annotations

from batchnorm.lab.experiments.base import Table
from batchnorm.lab.report.document import ClaimSection, settings_lines
from batchnorm.lab.verdict import Finding

TITLE = "Batch norm's claims, tested"


def table_markdown(table: Table) -> list[str]:
    lines = [f"*{table.title}*", ""]
    lines.append("| " + " | ".join(table.headers) + " |")
    lines.append("|" + "---|" * len(table.headers))
    lines.extend("| " + " | ".join(row) + " |" for row in table.rows)
    return [*lines, ""]


def summary_markdown(findings: list[Finding]) -> list[str]:
    table = Table(
        "Summary",
        ["claim", "verdict", "effect [95% CI]", "experiment"],
        [[f.claim, f"**{f.verdict}**", f.effect_text(), f"`{f.experiment}`"] for f in findings],
    )
    return table_markdown(table)


def finding_markdown(finding: Finding) -> list[str]:
    seeds = ", ".join(f"{value:.3g}" for value in finding.per_seed)
    lines = [
        f"- **Verdict: {finding.verdict}.** Effect: {finding.measure}: {finding.effect_text()} "
        f"(95% CI over {finding.seeds} seeds; per seed: {seeds}).",
        f"- Rule: {finding.rule}.",
    ]
    if finding.caveat():
        lines.append(f"- Caveat: {finding.caveat()}")
    return [*lines, ""]


def render_markdown(
    document: dict, findings: list[Finding], sections: list[ClaimSection], pngs: dict[str, str]
) -> str:
    lines = [f"# {TITLE}", ""]
    lines.extend(f"{line}  " for line in settings_lines(document))
    lines.append("")
    lines.extend(summary_markdown(findings))
    for section in sections:
        lines.extend([f"## {section.claim}: {section.text}", ""])
        for block in section.blocks:
            lines.extend([f"### `{block.name}`: {block.question}", ""])
            if block.shown_under:
                lines.extend([f"Setup, plots and tables: see `{block.name}` under "
                              f"{block.shown_under}.", ""])
            else:
                lines.extend([f"**Setup.** {block.setup}", ""])
                for figure in block.figures:
                    lines.extend([f"![{figure.name}]({pngs[figure.name]})", ""])
                for table in block.tables:
                    lines.extend(table_markdown(table))
            for finding in block.findings:
                lines.extend(finding_markdown(finding))
            for note in block.notes if not block.shown_under else []:
                lines.extend([f"*Note:* {note}", ""])
            lines.extend([f"**Published.** {block.published}", ""])
            for table in block.published_tables:
                lines.extend(table_markdown(table))
    return "\n".join(lines).rstrip() + "\n"
