"""The demo report's plot: probe losses and α over steps, and the α trade-off curve on the test sets (matplotlib is
imported only to draw)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..report import new_figure, save_figure

__all__ = ["PLOT_FILE", "write_plot"]

PLOT_FILE = "report.png"


def write_plot(
    run_dir: str | os.PathLike[str], report: Mapping[str, Any], path: str | os.PathLike[str] | None = None
) -> Path | None:
    """Draw ``report.png``: probe losses over steps, α (and drift) over steps, the α trade-off curve.

    Returns:
        The PNG's path, or ``None`` (with a warning naming the extra) when matplotlib is not installed.
    """
    figure = new_figure("report.png", figsize=(13.0, 4.2), dpi=100)
    if figure is None:
        return None
    losses, alphas, tradeoff = figure.subplots(1, 3)
    history = report.get("history") or []
    _plot_losses(
        losses,
        history,
        (report.get("policy") or {}).get("drift_budget"),
        report.get("loss_name", "contrastive loss"),
    )
    _plot_alpha(alphas, history)
    _plot_curve(tradeoff, report)
    figure.suptitle(_title(report), fontsize=10)
    return save_figure(figure, Path(path) if path is not None else Path(run_dir) / PLOT_FILE)


def _title(report: Mapping[str, Any]) -> str:
    cfg = report.get("config") or {}
    env = report.get("environment") or {}
    parts = [f"resilient-tune demo ({report.get('scenario', '?')})", report.get("model")]
    parts += [f"{cfg['steps']} steps" if cfg.get("steps") else None]
    data = report.get("data") or {}
    source = data.get("source", "")
    if data.get("title") and env.get("python"):  # a short name of the text, e.g. "stdlib prose → code"
        parts += [f"Python {env['python']} {data['title']}"]
    elif "docstring" in source and env.get("python"):
        parts += [f"Python {env['python']} docstrings"]
    else:
        parts += [source or None]
    return " · ".join(p for p in parts if p)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float))]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def _plot_losses(
    ax: Any, history: Sequence[Mapping[str, Any]], budget: float | None, loss_name: str = "contrastive loss"
) -> None:
    lines = (
        ("general_loss_finetuned", "general, fine-tuned", "--", "C0"),
        ("general_loss", "general, resilient (α)", "-", "C0"),
        ("target_loss_finetuned", "target, fine-tuned", "--", "C2"),
        ("target_loss", "target, resilient (α)", "-", "C2"),
    )
    for key, label, style, colour in lines:
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, style, color=colour, marker="o", markersize=3, label=label)
    xs, base = _series(history, "general_loss_base")
    if base:
        ax.axhline(base[0], color="C7", linestyle=":", label="general, base")
        if budget is not None:
            ax.axhline(
                base[0] * (1 + budget), color="C3", linestyle=":", label=f"budget (+{100 * budget:g}%)"
            )
    if not history:
        ax.text(0.5, 0.5, "no history", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("probe losses (held-out probes)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{loss_name} (lower is better)")
    ax.legend(fontsize=7)


def _plot_alpha(ax: Any, history: Sequence[Mapping[str, Any]]) -> None:
    xs, ys = _series(history, "alpha")
    ax.step(xs, ys, where="post", color="C3", marker="o", markersize=3, label="α chosen")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("α (weight of the fine-tuned model)", color="C3")
    ax.set_title("α over steps", fontsize=9)
    dx, dy = _series(history, "drift_relative")
    if dx:
        twin = ax.twinx()
        twin.plot(dx, dy, color="C7", linewidth=1)
        twin.set_ylim(bottom=0)
        twin.set_ylabel("‖θₜ − θ₀‖ / ‖θ₀‖ (grey)", color="C7")


def _plot_curve(ax: Any, report: Mapping[str, Any]) -> None:
    curve = report.get("curve") or []
    xs = [p["alpha"] for p in curve]
    for task, colour in (("target", "C2"), ("general", "C0")):
        ax.plot(xs, [100 * p[task] for p in curve], color=colour, marker="o", markersize=4, label=task)
    models = report["models"]
    ax.axhline(100 * models["base"]["general"], color="C0", linestyle=":", linewidth=1, label="general, base")
    alpha = models["resilient"]["alpha"]
    ax.axvline(alpha, color="C3", linestyle="--", linewidth=1, label=f"resilient α={alpha:.2f}")
    ax.set_xlabel("α (0 = base, 1 = fine-tuned)")
    ax.set_ylabel(f"{report.get('score_name', 'recall@1')} on the test sets (%)")
    ax.set_title("trade-off: θ₀ + α·(θ − θ₀)", fontsize=9)
    ax.legend(fontsize=7)
