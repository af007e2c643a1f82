"""``report.html``: one self-contained page (no script, no external file; the plots embedded as
base64 PNG), so it opens offline."""

from __future__ import annotations

import base64
import re
from html import escape

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
from batchnorm.lab.report.markdown import SUMMARY_HEADERS
from batchnorm.lab.verdict import Finding

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 76em; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { text-align: left; font-style: italic; padding-bottom: 0.3em; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
img { max-width: 100%; }
.verdict { font-weight: bold; padding: 0.1em 0.4em; border-radius: 0.3em; white-space: nowrap; }
.supported { background: #d8f0d8; } .not-supported { background: #f6d6d6; }
.inconclusive { background: #f1ecd0; } .not-yet-tested { background: #e6e6e6; }
.published { background: #f6f6fb; border-left: 4px solid #99c; padding: 0.4em 0.8em; }
.plain { background: #f4f8f4; border-left: 4px solid #9c9; padding: 0.4em 0.8em; }
.finding { border-left: 4px solid #ccc; padding: 0.2em 0.8em; margin: 0.6em 0; }
"""


def _verdict(verdict: str) -> str:
    return f'<span class="verdict {verdict.replace(" ", "-")}">{escape(verdict)}</span>'


def _code(text: str) -> str:
    """Escape ``text`` and set its `backquoted` names in code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def table_html(table: Table, raw_cells: bool = False) -> str:
    def cell(value: str) -> str:
        return value if raw_cells else escape(value)

    head = "".join(f"<th>{escape(header)}</th>" for header in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>"
        for row in table.rows
    )
    return f"<table><caption>{escape(table.title)}</caption><tr>{head}</tr>{body}</table>"


def summary_html(rows: list[SummaryRow]) -> str:
    cells = []
    for row in rows:
        tested = row.verdict != NOT_TESTED
        cells.append([
            f'<a href="#{anchor(row.claim)}">{escape(row.claim)}</a>', escape(row.data),
            escape(row.measure), escape(row.threshold), escape(row.estimate),
            _verdict(row.verdict),
            f"<code>{escape(row.experiment)}</code>" if tested else escape(row.experiment),
        ])
    table = Table("Every claim: one row per finding; a claim without one is not yet tested",
                  SUMMARY_HEADERS, cells)
    return table_html(table, raw_cells=True)


def finding_html(finding: Finding) -> str:
    seeds = ", ".join(f"{value:.3g}" for value in finding.per_seed)
    noise = (
        f"; the shared test examples add a standard error of {finding.example_se:.2f} pp"
        if finding.example_se else ""
    )
    parts = [
        f"<p>{_verdict(finding.verdict)} {escape(finding.measure)}, on "
        f"{escape(finding.data)} ({escape(finding.split)} split).",
        f"<br>Estimate: <b>{escape(finding.effect_text())}</b> (95% CI over {finding.seeds} "
        f"seeds{escape(noise)}; per seed: {escape(seeds)}).",
        f"<br>Threshold {escape(finding.threshold_text())}. Rule: {escape(finding.rule)}.",
        f"<br>Why the threshold is above the noise: {escape(finding.why)}.",
    ]
    if finding.degenerate:
        parts.append(f"<br>No verdict from this interval: {escape(finding.degenerate)}.")
    return '<div class="finding">' + "".join(parts) + "</p></div>"


def data_html(blocks: list[DataSetBlock]) -> str:
    items = "".join(
        f"<li><b>{escape(block.description)}</b>; used by "
        + ", ".join(f"<code>{escape(name)}</code>" for name in block.experiments)
        + "</li>"
        for block in blocks
    )
    tables = "".join(table_html(block.baselines) for block in blocks if block.baselines)
    return f'<h2 id="data">Data sets</h2><ul>{items}</ul>{tables}'


def render_html(
    document: dict,
    rows: list[SummaryRow],
    sections: list[ClaimSection],
    data: list[DataSetBlock],
    pngs: dict[str, bytes],
) -> str:
    parts = [f"<h1>{escape(TITLE)}</h1>"]
    parts.extend(f"<p>{escape(line)}</p>" for line in method_lines())
    parts.extend(['<h2 id="summary">Summary</h2>', summary_html(rows), data_html(data)])
    for section in sections:
        claim = section.claim
        parts.append(f'<h2 id="{anchor(claim.id)}">{escape(claim.id)}: {escape(claim.text)}</h2>')
        parts.append(f'<p class="plain"><b>In plain words.</b> {escape(claim.explanation)}</p>')
        if not section.tested:
            planned = ", ".join(f"<code>{escape(name)}</code>" for name in claim.experiments)
            parts.append(f"<p><b>Not yet tested.</b> The experiment {planned} will test it.</p>")
        for block in section.blocks:
            parts.append(
                f'<h3 id="{anchor(claim.id)}-{escape(block.name)}"><code>{escape(block.name)}'
                f"</code>: {escape(block.question)}</h3>"
            )
            if block.shown_under:
                parts.append(
                    f'<p>Data, setup, plots and tables: see <a href="#{anchor(block.shown_under)}'
                    f'-{escape(block.name)}"><code>{escape(block.name)}</code> under '
                    f"{escape(block.shown_under)}</a>.</p>"
                )
            else:
                parts.append(f"<p><b>Data.</b> {escape(block.data)}. "
                             f"{escape(block.data_reason)}</p>")
                parts.append(f"<p><b>Setup.</b> {escape(block.setup)}</p>")
                if block.tuning is not None:
                    parts.append(table_html(block.tuning))
                for figure in block.figures:
                    encoded = base64.b64encode(pngs[figure.name]).decode("ascii")
                    parts.append(
                        f'<figure><img alt="{escape(figure.caption)}" '
                        f'src="data:image/png;base64,{encoded}"><figcaption>Figure '
                        f"({escape(figure.name)}). {escape(figure.caption)}</figcaption></figure>"
                    )
                parts.extend(table_html(table) for table in block.tables)
            parts.extend(finding_html(finding) for finding in block.findings)
            parts.extend(f"<p><i>Note:</i> {escape(note)}</p>" for note in block.notes)
            published = [f"<b>Published.</b> {escape(block.published)}"]
            published.extend(table_html(table) for table in block.published_tables)
            parts.append(f'<div class="published">{"".join(published)}</div>')
    parts.append('<h2 id="environment">How these numbers were made</h2><ul>')
    parts.extend(f"<li>{_code(line)}</li>" for line in environment_lines(document))
    parts.append("</ul>")
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon, so that a browser does not look for favicon.ico beside the file.
        '<link rel="icon" href="data:,">'
        f"<title>{escape(TITLE)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
