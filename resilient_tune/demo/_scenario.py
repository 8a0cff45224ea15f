"""What every demo scenario does alike: fine-tune with a ``Trainer`` + ``CocktailCallback(policy="budget")``, score
the fine-tuned model, the written resilient checkpoint and a few α mixes, then write ``report.json``, ``report.png``
and print the table.

A scenario supplies its model, its data and a ``score(model, label) -> {"target": hits, "general": hits}``
function (per-example hits, higher is better); :func:`fine_tune` and :func:`score_mixes` / :func:`finish` do the
rest, so the encoder and decoder demos report the same way.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..errors import UsageError
from ..integrations.transformers import CocktailCallback
from ..merging import merge_tensor
from ..policy import BudgetPolicy
from ._progress import use_demo_progress

__all__ = [
    "Hits",
    "Score",
    "Scored",
    "environment",
    "fine_tune",
    "finish",
    "mix",
    "score_mixes",
    "training_args",
]

Hits = dict[str, list[bool]]
"""``task -> per-example hits`` (``"target"``, ``"general"``)."""


class Scored(dict):  # type: ignore[type-arg]
    """``task -> per-example hits`` of one model, with ``losses``: ``task -> held-out loss``, the probes' loss
    measured on the test set (the quantity the ``budget`` policy bounds, on data it never saw), and
    ``spread_losses``: the same loss with its batches drawn across the set the way the probe set is drawn (a
    contrastive loss, whose value depends on its in-batch negatives; empty where the layout does not matter)."""

    def __init__(
        self, hits: Hits, losses: dict[str, float], spread_losses: dict[str, float] | None = None
    ) -> None:
        super().__init__(hits)
        self.losses = losses
        self.spread_losses = spread_losses or {}


Score = Callable[[torch.nn.Module, str], Hits]
"""``score(model, label)``: the model's hits on the test sets (``label`` names it on the progress bar)."""


@dataclass(frozen=True)
class ScenarioConfig:
    """What the recipes of every demo scenario share (the scenarios' configs add their data, model and optimizer).

    Attributes:
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping (the ``Trainer``'s default 1.0; 0 turns it off).
        seed: Seed of the data, the initial weights, dropout and everything else random.
        decisions: Evaluations during fine-tuning (each one probes and lets the policy choose α).
        drift_budget: ``budget`` policy: allowed relative increase of the general-probe loss over the base's.
        max_passes: ``budget`` policy: cap on general-probe passes per decision (the base's is cached).
        metric_drop: Bound the general probes' own score (the scenario's test score: recall@1, next-character
            accuracy) instead of their loss: at most this much below the base's (a fraction, ``0.01`` = one point);
            ``None`` (default) keeps the loss budget ``drift_budget``.
        confidence: Bound the general-probe loss with this one-sided confidence instead of its mean
            (``BudgetPolicy(confidence=...)``); ``None`` (default) bounds the mean.
        static_alpha: The static LM-Cocktail α reported for comparison (the paper's 0.5).
        curve: Extra α values scored for the trade-off curve (0, 1, ``static_alpha`` and the chosen α always are).
        slerp_curve: α values also scored along SLERP from θ₀ to θ (``t = α``, per tensor; the callbacks'
            ``method="slerp"``), beside the linear mix θ₀ + α·(θ − θ₀); none by default (each costs a scoring pass).

    Raises:
        UsageError: A field out of range (names the field and its value).
    """

    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    decisions: int = 5
    drift_budget: float = 0.05
    max_passes: int = 5
    static_alpha: float = 0.5
    curve: tuple[float, ...] = (0.25, 0.75)
    slerp_curve: tuple[float, ...] = ()
    metric_drop: float | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        positive_ints(self, ("decisions",))
        # the policy's own checks name the field and the fix
        BudgetPolicy(self.drift_budget, max_passes=self.max_passes, confidence=self.confidence)
        if self.metric_drop is not None:
            BudgetPolicy(metric=lambda model: 0.0, metric_drop=self.metric_drop)
        for a in (self.static_alpha, *self.curve, *self.slerp_curve):
            if not 0.0 <= a <= 1.0:
                raise UsageError(f"alpha {a!r} must be in [0, 1]")


def positive_ints(config: Any, names: Sequence[str]) -> None:
    """Raise :class:`UsageError` naming the first of ``names`` whose value on ``config`` is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name}={value!r} must be a positive int")


def mix(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float) -> dict:
    """``θ₀ + α·(θ − θ₀)`` for float tensors; other tensors copied from ``tuned``."""
    return {
        k: base[k] + alpha * (v - base[k]) if v.is_floating_point() else v.clone() for k, v in tuned.items()
    }


def slerp_mix(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float) -> dict:
    """SLERP from ``base`` (α = 0) to ``tuned`` (α = 1) per float tensor, as the engine mixes with ``method="slerp"``;
    other tensors copied from ``tuned``."""
    return {
        k: merge_tensor("slerp", [v], [1.0], base=base[k], options={"t": alpha}, key=k)
        if v.is_floating_point()
        else v.clone()
        for k, v in tuned.items()
    }


def training_args(out: Path, cfg: Any, **overrides: Any) -> TrainingArguments:
    """The demo's ``TrainingArguments``: ``cfg.steps`` steps, ``cfg.decisions`` evaluations, no checkpoints (the
    callback writes ``out/resilient`` at the end), constant learning rate, quiet. ``overrides`` replace fields."""
    every = max(1, math.ceil(cfg.steps / cfg.decisions))
    options: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        eval_strategy="steps",
        eval_steps=every,
        save_strategy="no",
        logging_steps=max(1, min(5, every)),
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,  # the collators need their raw fields
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def fine_tune(
    out: Path,
    cfg: Any,
    *,
    trainer_class: type[Trainer] = Trainer,
    general_probe: Sequence[Mapping[str, Any]],
    target_probe: Sequence[Mapping[str, Any]],
    desc: str = "fine-tuning",
    probe_metric: Callable[[torch.nn.Module], float] | None = None,
    score_fn: Callable[[torch.nn.Module, Mapping[str, Any]], Any] | None = None,
    **trainer_kwargs: Any,
) -> tuple[CocktailCallback, BudgetPolicy]:
    """Fine-tune with ``CocktailCallback(policy=BudgetPolicy(cfg.drift_budget, max_passes=cfg.max_passes,
    confidence=cfg.confidence))``, or, with ``cfg.metric_drop``, a budget on ``probe_metric(model)`` (the general
    probes' score).

    ``score_fn`` scores the probes (default: the trainer's own loss). The target probe is also the eval dataset.
    ``out/resilient`` (the callback's) and ``out/fine-tuned`` are written. ``trainer_kwargs`` go to
    ``trainer_class`` (``model``, ``train_dataset``, ``data_collator``, ...).

    Raises:
        UsageError: ``cfg.metric_drop`` without a ``probe_metric``.

    Returns:
        The callback (``alpha``, ``history``) and the policy.
    """
    if cfg.metric_drop is None:
        policy = BudgetPolicy(cfg.drift_budget, max_passes=cfg.max_passes, confidence=cfg.confidence)
    elif probe_metric is None:
        raise UsageError("metric_drop needs the scenario's probe metric; this scenario passes none")
    else:
        policy = BudgetPolicy(metric=probe_metric, metric_drop=cfg.metric_drop, max_passes=cfg.max_passes)
    callback = CocktailCallback(
        policy=policy, general_data=list(general_probe), target_data=list(target_probe), score_fn=score_fn
    )
    trainer = trainer_class(
        args=training_args(out, cfg),
        eval_dataset=list(target_probe),
        callbacks=[callback],
        **trainer_kwargs,
    )
    use_demo_progress(trainer, desc)
    trainer.train()
    trainer.save_model(str(out / "fine-tuned"))
    return callback, policy


def score_mixes(
    model: torch.nn.Module,
    base_state: Mapping[str, torch.Tensor],
    resilient: torch.nn.Module,
    alpha: float,
    alphas: Sequence[float],
    score: Score,
    hits: dict[str, Hits],
    echo: Callable[[str], None],
    unit: str,
) -> dict[float, Hits]:
    """Score the fine-tuned ``model``, the ``resilient`` checkpoint (chosen ``alpha``) and the mixes at ``alphas``.

    Fills ``hits["fine_tuned"]``, ``hits["resilient"]`` and ``hits["static"]`` (``alphas[0]``, the static α) and
    returns the trade-off curve ``α -> hits`` (0 = ``hits["base"]``, 1 = fine-tuned). ``model`` ends as it began.
    """
    tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hits["fine_tuned"] = score(model, "fine-tuned")
    echo_scores(echo, "fine-tuned", hits["fine_tuned"], unit)
    hits["resilient"] = score(resilient, f"resilient (α={alpha:.2f})")
    echo_scores(echo, f"resilient α={alpha:.2f}", hits["resilient"], unit)
    curve = {0.0: hits["base"], 1.0: hits["fine_tuned"]}
    for a in sorted(set(alphas) - {0.0, 1.0}):
        if abs(a - alpha) < 1e-9:
            curve[a] = hits["resilient"]
            continue
        model.load_state_dict(mix(base_state, tuned_state, a))
        curve[a] = score(model, f"α={a:g}")
        echo_scores(echo, f"α={a:g}", curve[a], unit)
    model.load_state_dict(tuned_state)
    hits["static"] = curve[alphas[0]]
    curve.setdefault(alpha, hits["resilient"])
    return curve


def score_slerp(
    model: torch.nn.Module,
    base_state: Mapping[str, torch.Tensor],
    alphas: Sequence[float],
    score: Score,
    echo: Callable[[str], None],
    unit: str,
) -> dict[float, Hits]:
    """Score the fine-tuned ``model`` mixed with the base by SLERP at each of ``alphas`` (:func:`slerp_mix`); returns
    ``α -> hits``. ``model`` ends as it began."""
    if not alphas:
        return {}
    tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve: dict[float, Hits] = {}
    for a in sorted(set(alphas)):
        model.load_state_dict(slerp_mix(base_state, tuned_state, a))
        curve[a] = score(model, f"SLERP α={a:g}")
        echo_scores(echo, f"SLERP α={a:g}", curve[a], unit)
    model.load_state_dict(tuned_state)
    return curve


def environment() -> dict[str, Any]:
    """Python, torch, threads and platform of this run (recorded in ``report.json``)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "implementation": sys.implementation.name,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def finish(
    out: Path,
    echo: Callable[[str], None],
    timing: dict[str, float],
    started: float,
    **fields: Any,
) -> dict[str, Any]:
    """Build ``report.json`` (:func:`~resilient_tune.demo.report.build_report` with ``fields``), draw the plot,
    print the table and the paths; returns the report."""
    from .report import build_report, format_report, write_plot, write_report

    timing["total"] = time.perf_counter() - started
    report = build_report(timing=timing, **fields)
    write_report(out, report)
    plot = write_plot(out, report)
    echo("")
    echo(format_report(report))
    echo("")
    echo(f"resilient checkpoint: {out / 'resilient'} (cocktail.json says how it was made)")
    echo(f"report: {out / 'report.json'}" + (f", plot: {plot}" if plot else ""))
    echo(f"wall time: {timing['total']:.0f} s")
    return report


def echo_scores(echo: Callable[[str], None], label: str, hits: Mapping[str, list[bool]], unit: str) -> None:
    """``  label: target <unit> 51.9, general <unit> 39.5`` (percent)."""
    parts = ", ".join(f"{name} {unit} {100 * sum(h) / len(h):.1f}" for name, h in hits.items())
    echo(f"  {label}: {parts}")
