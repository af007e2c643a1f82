"""Figures as PNG bytes, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import io

from batchnorm.lab.experiments.base import Figure

PANEL_SIZE = (5.2, 3.6)


def render_png(figure: Figure) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    count = len(figure.panels)
    canvas, axes = pyplot.subplots(
        1, count, figsize=(PANEL_SIZE[0] * count, PANEL_SIZE[1]), squeeze=False
    )
    for axis, panel in zip(axes[0], figure.panels, strict=True):
        for series in panel.series:
            dashed = series.style == "--"
            banded = series.low is not None and series.high is not None
            if banded and "-" not in series.style:
                # Markers without a line (categories): the 95% interval as error bars.
                below = [max(0.0, y - low) for y, low in zip(series.y, series.low, strict=True)]
                above = [max(0.0, high - y) for y, high in zip(series.y, series.high, strict=True)]
                axis.errorbar(series.x, series.y, yerr=[below, above], fmt=series.style,
                              label=series.label, capsize=4, markersize=5)
                continue
            (line,) = axis.plot(
                series.x,
                series.y,
                series.style,
                label=series.label,
                color="grey" if dashed else None,
                linewidth=1 if dashed else 1.6,
                markersize=4,
            )
            if banded:
                axis.fill_between(series.x, series.low, series.high, alpha=0.2,
                                  color=line.get_color(), linewidth=0)
        axis.set_title(panel.title, fontsize=9, wrap=True)
        axis.set_xlabel(panel.xlabel)
        axis.set_ylabel(panel.ylabel)
        axis.set_xscale(panel.xscale)
        if panel.xscale == "log" and panel.xticklabels is None:
            # Ticks at the values measured (batch sizes, learning rates), written plainly.
            values = sorted({x for series in panel.series for x in series.x})
            axis.set_xticks(values, [f"{v:g}" for v in values], fontsize=8)
            axis.minorticks_off()
        if panel.xticklabels is not None:
            axis.set_xticks(range(len(panel.xticklabels)), panel.xticklabels, fontsize=8)
        axis.set_yscale(panel.yscale)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    canvas.tight_layout()
    buffer = io.BytesIO()
    canvas.savefig(buffer, format="png", dpi=100)
    pyplot.close(canvas)
    return buffer.getvalue()
