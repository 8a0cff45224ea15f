"""Run reports: a PNG plot and a text table of α, probe losses and drift over the steps of a training run.

The training callbacks keep one history entry per decision (``step``, ``alpha``, ``drift_norm``,
``general_loss`` / ``general_loss_base`` / ``general_loss_finetuned``, ``target_loss`` /
``target_loss_finetuned``, ...) and write them to ``cocktail_report.json``; :func:`plot_history` draws them,
:func:`history_table` prints them, :func:`read_report` loads a report from a run folder.

matplotlib is optional (the ``demo`` extra) and imported only when a plot is drawn, with the non-interactive
Agg canvas (no pyplot, no global backend switch): without it :func:`plot_history` warns, naming
``pip install 'resilient-tune[demo]'``, and returns ``None``.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["PLOT_FILE", "REPORT_FILE", "history_table", "plot_history", "read_report"]

REPORT_FILE = "cocktail_report.json"
PLOT_FILE = "cocktail_report.png"

# (history key, label, line style, colour) of the loss panel, drawn when present
_LOSS_LINES = (
    ("general_loss", "general, resilient (α)", "-", "C0"),
    ("general_loss_finetuned", "general, fine-tuned", "--", "C0"),
    ("general_loss_base", "general, base", ":", "C7"),
    ("target_loss", "target, resilient (α)", "-", "C2"),
    ("target_loss_finetuned", "target, fine-tuned", "--", "C2"),
)
_TABLE_COLUMNS = (
    ("step", "step"),
    ("alpha", "alpha"),
    ("drift_norm", "drift"),
    ("general_loss", "general"),
    ("general_loss_base", "general@base"),
    ("general_loss_finetuned", "general@tuned"),
    ("general_kl", "kl"),
    ("target_loss", "target"),
    ("target_loss_finetuned", "target@tuned"),
    ("probe_passes", "passes"),
)


def plot_history(
    history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None
) -> Path | None:
    """Draw probe losses (top) and α with the relative drift (bottom) over steps into a PNG, atomically.

    Args:
        history: History entries (each a mapping with at least ``step`` and ``alpha``), in step order.
        path: The PNG file to write (its folder is created).
        title: Figure title (default: "resilient-tune: probes and alpha over steps").

    Returns:
        The written path, or ``None`` when matplotlib is not installed (a warning says how to install it).

    Raises:
        UsageError: An entry has no ``step`` or no ``alpha``.
    """
    rows = _checked(history)
    figure = new_figure("the report plot", figsize=(7.0, 5.5), dpi=110)
    if figure is None:
        return None
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    steps = [row["step"] for row in rows]
    drawn = 0
    for key, label, style, colour in _LOSS_LINES:
        points = [(row["step"], row[key]) for row in rows if _is_number(row.get(key))]
        if points:
            xs, ys = zip(*points)
            top.plot(xs, ys, style, color=colour, marker="o", markersize=3, label=label)
            drawn += 1
    if drawn:
        top.set_ylabel("probe loss")
        top.legend(fontsize=7, loc="best")
    else:
        top.text(
            0.5,
            0.5,
            "no probe data (pass general_data / target_data)",
            ha="center",
            va="center",
            transform=top.transAxes,
        )
        top.set_yticks([])
    bottom.plot(steps, [row["alpha"] for row in rows], marker="o", markersize=3, color="C3")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("α (fine-tuned weight)", color="C3")
    bottom.set_xlabel("step")
    drift = [(row["step"], row["drift_relative"]) for row in rows if _is_number(row.get("drift_relative"))]
    if drift:
        twin = bottom.twinx()
        twin.plot(*zip(*drift), color="C7", linewidth=1, label="‖θₜ − θ₀‖ / ‖θ₀‖")
        twin.set_ylabel("relative drift", color="C7")
    figure.suptitle(title or "resilient-tune: probes and alpha over steps", fontsize=10)
    return save_figure(figure, path)


def new_figure(what: str, **figure_kw: Any) -> Any | None:
    """A matplotlib ``Figure`` on the Agg canvas (no display needed), or ``None`` when matplotlib is missing.

    Args:
        what: What would have been drawn, for the warning (e.g. ``"report.png"``).
        figure_kw: ``Figure`` arguments (``figsize``, ``dpi``); the layout is ``"constrained"``.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(
            f"matplotlib is not installed, so {what} was not drawn (the JSON report was written); "
            "install it with: pip install 'resilient-tune[demo]'",
            UserWarning,
            stacklevel=3,
        )
        return None
    figure = Figure(layout="constrained", **figure_kw)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG atomically (temp file beside ``path``, then rename); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def history_table(history: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of the history: step, α, drift and the probe losses present in any entry."""
    rows = _checked(history)
    columns = [(key, head) for key, head in _TABLE_COLUMNS if any(key in row for row in rows)]
    cells = [[head for _, head in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``cocktail_report.json`` from a run folder (or the file itself).

    Raises:
        UsageError: No report there, or it is not a resilient-tune report.
    """
    file = Path(path)
    if file.is_dir():
        file = file / REPORT_FILE
    if not file.is_file():
        raise UsageError(
            f"no {REPORT_FILE} at {file}; pass the output_dir of a run that used CocktailCallback"
        )
    try:
        report = json.loads(file.read_text())
    except ValueError as exc:
        raise UsageError(f"{file} is not valid JSON ({exc}); the run may have been interrupted") from None
    if not isinstance(report, dict) or not isinstance(report.get("history"), list):
        raise UsageError(f"{file} is not a resilient-tune report (no history list)")
    return report


def _checked(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = list(history)
    for i, row in enumerate(rows):
        if (
            not isinstance(row, Mapping)
            or not _is_number(row.get("step"))
            or not _is_number(row.get("alpha"))
        ):
            raise UsageError(f"history entry {i} has no numeric 'step' and 'alpha': {str(row)[:120]}")
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
