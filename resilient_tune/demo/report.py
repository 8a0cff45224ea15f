"""The demo's ``report.json``, its text table and its plot; ``resilient-tune report RUN_DIR`` rebuilds them.

``report.json`` (format ``resilient-tune/demo-report``, scores are fractions in ``[0, 1]``, higher is better)::

    {"models": {"base": {"target": .., "general": .., "alpha": 0.0, "drift": 0.0},
                "fine_tuned": {...}, "resilient": {...}, "static": {...}},
     "alpha": .., "summary": {...}, "significance": {...}, "curve": [{"alpha": .., "target": .., "general": ..}],
     "history": [...], "hits": {...}, "config": {...}, "data": {...}, "environment": {...}, "timing": {...}}

``score_name`` names the score (``recall@1`` for the encoder, ``next-char accuracy`` for the decoder; ``recall@1`` when
absent) and ``loss_name`` the probe loss. ``hits`` keeps every model's per-example hits as ``"0"``/``"1"``
strings, so paired statistics (McNemar's exact test, :func:`mcnemar`) can be recomputed from the file alone.

This module imports no torch and no transformers; matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ._report_plot import PLOT_FILE, write_plot

__all__ = [
    "DEMO_FORMAT",
    "PLOT_FILE",
    "REPORT_FILE",
    "build_report",
    "format_report",
    "gain_kept",
    "load_run",
    "mcnemar",
    "render_run",
    "write_plot",
    "write_report",
]

DEMO_FORMAT = "resilient-tune/demo-report"
REPORT_FILE = "report.json"
_MODEL_ORDER = ("base", "fine_tuned", "resilient", "static")
_TASKS = ("target", "general")


# ---------------------------------------------------------------------------- statistics
def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test on paired hits of two models over the same examples.

    Returns:
        ``{"a_only": n, "b_only": m, "p": p}``: examples only ``a`` gets right, only ``b`` gets right, and the
        two-sided exact p-value (binomial, ``n + m`` trials, probability 1/2) of a difference that large.

    Raises:
        UsageError: The two lists differ in length.
    """
    if len(a) != len(b):
        raise UsageError(f"paired hits differ in length ({len(a)} vs {len(b)}); score the same examples")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def gain_kept(models: Mapping[str, Mapping[str, float]], name: str) -> dict[str, float | None]:
    """How much of the fine-tuning's effect model ``name`` keeps, as fractions.

    ``target_gain_kept = (target − base) / (fine-tuned − base)``: 1.0 keeps all of the new skill.
    ``general_drop_recovered = (general − fine-tuned) / (base − fine-tuned)``: 1.0 is back at the base, above 1 is
    better than the base. ``None`` when the fine-tuning gained (or lost) nothing to measure against.
    """
    base, tuned, model = models["base"], models["fine_tuned"], models[name]
    gain = tuned["target"] - base["target"]
    drop = base["general"] - tuned["general"]
    return {
        "target_gain_kept": (model["target"] - base["target"]) / gain if gain > 0 else None,
        "general_drop_recovered": (model["general"] - tuned["general"]) / drop if drop > 0 else None,
    }


# ---------------------------------------------------------------------------- building
def _rate(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def _bits(hits: Mapping[str, Sequence[bool]]) -> dict[str, str]:
    return {task: "".join("1" if h else "0" for h in hits[task]) for task in _TASKS}


def build_report(
    *,
    scenario: str,
    hits: Mapping[str, Mapping[str, Sequence[bool]]],
    alphas: Mapping[str, float],
    curve: Mapping[float, Mapping[str, Sequence[bool]]],
    history: Sequence[Mapping[str, Any]] = (),
    drift_relative: float | None = None,
    slerp_curve: Mapping[float, Mapping[str, Sequence[bool]]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Assemble a demo report from per-example hits.

    Args:
        scenario: ``"encoder"`` or ``"decoder"``.
        hits: ``model -> task -> per-example hits`` for the models ``base``, ``fine_tuned``, ``resilient``,
            ``static`` and the tasks ``target``, ``general``.
        alphas: ``model -> α`` (weight of the fine-tuned model in the mix).
        curve: ``α -> task -> hits`` of the trade-off curve. Hits that carry ``losses`` (the scenarios' ``Scored``:
            the probes' loss on the held-out test sets) add ``test_loss`` (and ``test_loss_spread``) to the model
            and curve rows.
        history: The callback's decisions (``step``, ``alpha``, probe losses, ...); per-layer drift is dropped.
        drift_relative: ``‖θ − θ₀‖ / ‖θ₀‖`` of the fine-tuned weights (a mix at α drifts α times that).
        slerp_curve: ``α -> task -> hits`` of the models mixed by SLERP (stored as ``slerp_curve`` rates and
            ``slerp_hits``, the per-example hits keyed by ``f"{α:g}"``, for paired tests against the linear mix).
        **extra: Stored as they are (``config``, ``data``, ``environment``, ``timing``, ``files``, ...).

    Raises:
        UsageError: A model or a task is missing.
    """
    missing = [f"{m}/{t}" for m in _MODEL_ORDER for t in _TASKS if t not in hits.get(m, {})]
    if missing:
        raise UsageError(f"build_report needs hits for every model and task; missing {missing}")
    models: dict[str, dict[str, Any]] = {}
    for name in _MODEL_ORDER:
        alpha = float(alphas[name])
        row: dict[str, Any] = {task: _rate(hits[name][task]) for task in _TASKS}
        row["alpha"] = alpha
        row["drift"] = None if drift_relative is None else alpha * drift_relative
        row.update(_losses(hits[name]))
        models[name] = row
    significance = {}
    for task in _TASKS:
        for name, other in (("fine_tuned", "base"), ("resilient", "base"), ("resilient", "fine_tuned")):
            significance[f"{task}: {name} vs {other}"] = mcnemar(hits[name][task], hits[other][task])
    return {
        "format": DEMO_FORMAT,
        "version": 1,
        "scenario": scenario,
        "models": models,
        "alpha": models["resilient"]["alpha"],
        "summary": {name: gain_kept(models, name) for name in ("resilient", "static")},
        "significance": significance,
        "curve": [
            {"alpha": float(a), **{task: _rate(curve[a][task]) for task in _TASKS}, **_losses(curve[a])}
            for a in sorted(curve)
        ],
        "history": [{k: v for k, v in entry.items() if k != "drift_per_layer"} for entry in history],
        "hits": {name: _bits(hits[name]) for name in _MODEL_ORDER},
        **(
            {
                "slerp_curve": [
                    {
                        "alpha": float(a),
                        **{task: _rate(slerp_curve[a][task]) for task in _TASKS},
                        **_losses(slerp_curve[a]),
                    }
                    for a in sorted(slerp_curve)
                ],
                "slerp_hits": {f"{a:g}": _bits(slerp_curve[a]) for a in sorted(slerp_curve)},
            }
            if slerp_curve
            else {}
        ),
        **extra,
    }


def _losses(scored: Any) -> dict[str, dict[str, float]]:
    """``{"test_loss": {task: loss}}`` when the scenario measured held-out losses with the hits (and
    ``test_loss_spread`` when it also measured them in batches drawn across the set), else ``{}``."""
    out = {}
    for key, attr in (("test_loss", "losses"), ("test_loss_spread", "spread_losses")):
        losses = getattr(scored, attr, None)
        if losses:
            out[key] = {task: float(losses[task]) for task in _TASKS if task in losses}
    return out


def write_report(run_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write ``report.json`` into ``run_dir`` atomically."""
    path = Path(run_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- table
_LABELS = {"base": "base", "fine_tuned": "fine-tuned", "resilient": "resilient", "static": "static"}


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{100 * value:.1f}"


def _share(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def format_report(report: Mapping[str, Any]) -> str:
    """The demo's text table: base / fine-tuned / resilient / static × target / general, with α and drift,
    then the share of the target gain kept, of the general drop recovered, and the paired tests."""
    models = report["models"]
    policy = report.get("policy") or {}
    cfg = report.get("config") or {}
    head = f"{report.get('scenario', '?')} demo"
    if report.get("model"):
        head += f": {report['model']}"
    if cfg.get("steps"):
        head += f", {cfg['steps']} steps"
    if policy.get("name") == "budget":
        head += f", policy budget (general-probe loss ≤ {1 + policy.get('drift_budget', 0):.2f} × base)"
    score = report.get("score_name", "recall@1")
    lines = [head, f"{score} in %, higher is better; drift = ‖θ − θ₀‖ / ‖θ₀‖", ""]
    lines.append(f"{'model':<22}{'α':>6}{'drift':>9}{'target':>9}{'general':>9}")
    for name in _MODEL_ORDER:
        row = models[name]
        label = _LABELS[name]
        if name == "static":
            label = f"static α={row['alpha']:g} (paper)"
        elif name == "resilient":
            label = f"resilient ({policy.get('name', 'policy')})"
        drift = "-" if row.get("drift") is None else f"{row['drift']:.4f}"
        lines.append(
            f"{label:<22}{row['alpha']:>6.2f}{drift:>9}{_pct(row['target']):>9}{_pct(row['general']):>9}"
        )
    lines.append("")
    base, tuned = models["base"], models["fine_tuned"]
    if base["general"] > 0:
        rel = (tuned["general"] - base["general"]) / base["general"]
        test = (report.get("significance") or {}).get("general: fine_tuned vs base")
        tail = (
            f", McNemar p = {test['p']:.2g} ({test['b_only']} worse, {test['a_only']} better)" if test else ""
        )
        lines.append(f"forgetting: fine-tuned general {100 * rel:+.1f}% relative to base{tail}")
    for name, summary in (report.get("summary") or {}).items():
        lines.append(
            f"{_LABELS.get(name, name)}: kept {_share(summary.get('target_gain_kept'))} of the target gain, "
            f"recovered {_share(summary.get('general_drop_recovered'))} of the general drop"
        )
    history = report.get("history") or []
    if history:
        alphas = " → ".join(f"{entry['alpha']:.2f}" for entry in history)
        lines.append(f"α over evaluations (steps {history[0]['step']}..{history[-1]['step']}): {alphas}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot
# ---------------------------------------------------------------------------- reading a run
def load_run(run_dir: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """What a run folder holds: ``("demo", report)`` for a demo run, ``("history", cocktail report)`` for any
    training run with ``CocktailCallback`` (``cocktail_report.json``, or a checkpoint's ``trainer_state.json``).

    Raises:
        UsageError: The folder holds none of these.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UsageError(f"run folder {str(folder)!r} does not exist; pass the --out folder of a run")
    demo = folder / REPORT_FILE
    if demo.is_file():
        report = _read_json(demo)
        if report.get("format") == DEMO_FORMAT:
            return "demo", report
    from ..report import REPORT_FILE as COCKTAIL_REPORT
    from ..report import read_report

    if (folder / COCKTAIL_REPORT).is_file():
        return "history", read_report(folder)
    state = folder / "trainer_state.json"
    if state.is_file():
        history = _history_from_trainer_state(_read_json(state))
        if history is not None:
            return "history", {"history": history}
    raise UsageError(
        f"{folder} holds no {REPORT_FILE} (a demo run), no {COCKTAIL_REPORT} and no trainer_state.json with "
        "CocktailCallback state; pass the output_dir of a run that used CocktailCallback"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); the run may have been interrupted") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def _history_from_trainer_state(state: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    stored = (state.get("stateful_callbacks") or {}).get("CocktailCallback")
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    resume = (
        ((stored or {}).get("attributes") or {}).get("_resume_state") if isinstance(stored, dict) else None
    )
    history = resume.get("history") if isinstance(resume, dict) else None
    return list(history) if isinstance(history, list) else None


def render_run(
    run_dir: str | os.PathLike[str], plot: str | os.PathLike[str] | None = None
) -> tuple[str, Path | None]:
    """Rebuild a run's table and plot from its files (nothing is re-run).

    Args:
        run_dir: A demo run folder, a training ``output_dir`` or a ``checkpoint-N`` folder.
        plot: Where to draw the PNG (default: ``report.png`` for a demo run, ``cocktail_report.png`` otherwise,
            in ``run_dir``).

    Returns:
        The table text and the PNG's path (``None`` without matplotlib).
    """
    kind, report = load_run(run_dir)
    if kind == "demo":
        return format_report(report), write_plot(run_dir, report, plot)
    from ..report import PLOT_FILE as HISTORY_PLOT
    from ..report import history_table, plot_history

    history = report["history"]
    if not history:
        return "the run recorded no CocktailCallback decisions (no evaluation or save happened)", None
    target = Path(plot) if plot is not None else Path(run_dir) / HISTORY_PLOT
    return history_table(history), plot_history(history, target)
