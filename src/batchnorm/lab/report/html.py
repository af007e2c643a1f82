"""``report.html``: one self-contained page, the plots embedded as base64 PNG."""

from __future__ import annotations

import base64
from html import escape

from batchnorm.lab.experiments.base import Table
from batchnorm.lab.report.document import ClaimSection, settings_lines
from batchnorm.lab.report.markdown import TITLE
from batchnorm.lab.verdict import Finding

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
caption { text-align: left; font-style: italic; padding-bottom: 0.3em; }
img { max-width: 100%; }
.verdict { font-weight: bold; padding: 0.1em 0.4em; border-radius: 0.3em; }
.supported { background: #d8f0d8; } .not-supported { background: #f6d6d6; }
.inconclusive { background: #f1ecd0; }
.published { background: #f6f6fb; border-left: 4px solid #99c; padding: 0.4em 0.8em; }
"""


def _verdict(verdict: str) -> str:
    return f'<span class="verdict {verdict.replace(" ", "-")}">{escape(verdict)}</span>'


def table_html(table: Table, raw_cells: bool = False) -> str:
    def cell(value: str) -> str:
        return value if raw_cells else escape(value)

    head = "".join(f"<th>{escape(header)}</th>" for header in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>"
        for row in table.rows
    )
    return f"<table><caption>{escape(table.title)}</caption><tr>{head}</tr>{body}</table>"


def finding_html(finding: Finding) -> str:
    seeds = ", ".join(f"{value:.3g}" for value in finding.per_seed)
    return (
        f"<p>{_verdict(finding.verdict)} {escape(finding.measure)}: "
        f"<b>{escape(finding.effect_text())}</b> (95% CI over {finding.seeds} seeds; per seed: "
        f"{escape(seeds)}).<br>Rule: {escape(finding.rule)}."
        + (f"<br><i>Caveat:</i> {escape(finding.caveat())}" if finding.caveat() else "")
        + "</p>"
    )


def render_html(
    document: dict, findings: list[Finding], sections: list[ClaimSection], pngs: dict[str, bytes]
) -> str:
    parts = [f"<h1>{escape(TITLE)}</h1>", "<p>"]
    parts.append("<br>".join(escape(line) for line in settings_lines(document)))
    parts.append("</p>")
    summary = Table(
        "Summary",
        ["claim", "verdict", "effect [95% CI]", "experiment"],
        [[escape(f.claim), _verdict(f.verdict), escape(f.effect_text()), escape(f.experiment)]
         for f in findings],
    )
    parts.append(table_html(summary, raw_cells=True))
    for section in sections:
        parts.append(f"<h2>{escape(section.claim)}: {escape(section.text)}</h2>")
        for block in section.blocks:
            parts.append(
                f'<h3 id="{escape(section.claim)}-{escape(block.name)}"><code>'
                f"{escape(block.name)}</code>: {escape(block.question)}</h3>"
            )
            if block.shown_under:
                parts.append(
                    f'<p>Setup, plots and tables: see <a href="#{escape(block.shown_under)}-'
                    f'{escape(block.name)}"><code>{escape(block.name)}</code> under '
                    f"{escape(block.shown_under)}</a>.</p>"
                )
            else:
                parts.append(f"<p><b>Setup.</b> {escape(block.setup)}</p>")
                for figure in block.figures:
                    encoded = base64.b64encode(pngs[figure.name]).decode("ascii")
                    parts.append(
                        f'<img alt="{escape(figure.name)}" src="data:image/png;base64,{encoded}">'
                    )
                parts.extend(table_html(table) for table in block.tables)
            parts.extend(finding_html(finding) for finding in block.findings)
            if not block.shown_under:
                parts.extend(f"<p><i>Note:</i> {escape(note)}</p>" for note in block.notes)
            published = [f"<b>Published.</b> {escape(block.published)}"]
            published.extend(table_html(table) for table in block.published_tables)
            parts.append(f'<div class="published">{"".join(published)}</div>')
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(TITLE)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
