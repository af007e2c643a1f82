"""The report: built from ``results.json`` alone, so ``batchnorm report DIR`` needs no training.

``results.py`` assembles and reads the results file, ``plots.py`` draws the figures,
``markdown.py`` and ``html.py`` write the two documents, ``render.py`` ties them together.
"""

from batchnorm.lab.report.render import render_report, summary_text

__all__ = ["render_report", "summary_text"]
