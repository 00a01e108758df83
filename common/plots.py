"""The project's figures (loss curves, the guidance trade-off, likelihood terms) as PNGs, drawn with matplotlib.

One function draws every line chart so they all look alike; it never opens a window and imports matplotlib lazily,
so the training loop and the pipelines do not pay for it until a figure is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def line_chart(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logy: bool = False,
    logx: bool = False,
    secondary: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    secondary_label: str = "",
    markers: bool = True,
) -> Path:
    """Draw ``{label: (xs, ys)}`` as lines (with points) to ``path``; ``secondary`` series go on a right-hand axis.

    Returns the path written. A series with fewer than one point is skipped.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    style = {"marker": "o", "markersize": 3} if markers else {}
    for label, (xs, ys) in series.items():
        if len(xs):
            ax.plot(list(xs), list(ys), label=label, **style)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        right = ax.twinx()
        for k, (label, (xs, ys)) in enumerate(secondary.items()):
            if len(xs):
                right.plot(list(xs), list(ys), label=label, linestyle="--", color=f"C{len(series) + k}", **style)
        right.set_ylabel(secondary_label)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if labels:
        ax.legend(handles, labels, fontsize="small", loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
