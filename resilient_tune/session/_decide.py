"""One decision: the policy run against the probes, its weights applied to the engine, and the history entry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..engine import Engine
from ..policy import Decision, Policy, choose
from ..probes import ProbeResult
from ._probing import ProbeRunner, loss_of

__all__ = ["decide_entry"]


def decide_entry(
    engine: Engine,
    policy: Policy,
    probes: ProbeRunner,
    step: int,
    model: torch.nn.Module,
    *,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``policy`` (probing candidates), apply its weights to ``engine``, set the engine's α, and return the history
    entry of ``step``: α, drift, the general losses at α / the base / the fine-tuned model (and KL), the user's metric
    there for a metric budget, the target losses, the peer weights, the probe passes this decision cost, the decision
    itself and the per-layer drift. The fine-tuned model's figures (``*_finetuned``, ``general_kl``) are left out
    when the decision skipped ``α = 1`` (``decision.finetuned_skipped``: a warm budget search that knew it over
    budget).

    ``previous`` is the last decision's record (``Decision.to_dict()``), which a policy may start its search from.
    """
    results: dict[float, ProbeResult] = {}
    passes_before = probes.passes

    confidence = getattr(policy, "confidence", None)  # bound the loss's mean with this confidence
    bounds: dict[float, tuple[float, int]] = {}

    def measure(alpha: float) -> ProbeResult:
        if alpha == 0.0 and probes.base_result is not None:
            return probes.base_result
        if alpha not in results:
            results[alpha] = probes.run_general(engine, model, alpha)
            if alpha == 0.0:
                probes.base_result = results[alpha]
        return results[alpha]

    # a budget on the user's metric: the policy evaluates that instead of the loss
    metric = getattr(policy, "metric", None)
    scores: dict[float, float] = {}

    def score(alpha: float) -> float:
        if alpha not in scores:
            scores[alpha] = probes.run_metric(engine, model, alpha, metric)
        return scores[alpha]

    def bounded(alpha: float) -> float:
        if alpha not in bounds:
            bounds[alpha] = probes.bound(measure(alpha), measure(0.0), confidence)
        return bounds[alpha][0]

    if metric is not None:
        evaluate: Callable[[float], float] | None = score
    elif not probes.general:
        evaluate = None
    else:
        evaluate = bounded if confidence is not None else (lambda a: loss_of(measure(a)))
    drift = engine.drift(model)  # the fine-tune's displacement: a warm budget search starts from it
    decision: Decision = choose(
        policy,
        evaluate,
        ingredient_losses=lambda: probes.losses_of_ingredients(engine, model),
        previous=previous,
        displacement=drift.total,
    )
    if decision.weights is not None and tuple(decision.weights) != tuple(engine.weights):
        engine.set_weights(decision.weights)  # before the chosen mix is measured (and written)
        results.clear()
        scores.clear()
        bounds.clear()
        probes.base_result = None
        probes.base_metric = None
    entry: dict[str, Any] = {"step": int(step), "alpha": decision.alpha}
    entry.update(drift_norm=drift.total, drift_relative=drift.relative)
    # the fine-tuned model (α = 1) is measured for the report unless the policy knew it over budget and skipped it
    tuned_too = not decision.finetuned_skipped
    if probes.general:
        chosen, base = measure(decision.alpha), measure(0.0)
        entry.update(general_loss=chosen.loss, general_loss_base=base.loss)
        if tuned_too:
            tuned = measure(1.0)
            entry["general_loss_finetuned"] = tuned.loss
            if tuned.kl is not None:
                entry["general_kl"] = tuned.kl
        if chosen.kl is not None:
            entry["general_kl_merged"] = chosen.kl
        if confidence is not None:
            entry["general_loss_bound"] = bounded(decision.alpha)
            entry["general_loss_units"] = bounds[decision.alpha][1]
    if metric is not None:
        entry.update(general_metric=score(decision.alpha), general_metric_base=score(0.0))
        if tuned_too:
            entry["general_metric_finetuned"] = score(1.0)
    if probes.target:
        entry["target_loss"] = probes.run_target(engine, model, decision.alpha)
        if tuned_too:
            entry["target_loss_finetuned"] = probes.run_target(engine, model, 1.0)
    if engine.num_peers:
        labels = ["base", *(f"peer{i}" for i in range(1, engine.num_peers + 1))]
        entry.update({f"weight_{label}": w for label, w in zip(labels, engine.weights)})
        entry["weights"] = list(engine.weights)
    note = unbounded_note(confidence, entry) or strict_budget_note(decision, entry)
    if note:
        entry["note"] = note
    entry["probe_passes"] = probes.passes - passes_before
    entry["snapshot_bytes"] = engine.snapshot.nbytes
    entry["decision"] = decision.to_dict()
    entry["drift_per_layer"] = drift.per_layer
    engine.alpha = decision.alpha
    return entry


STRICT_ALPHA = 0.2  # a loss budget that leaves the fine-tuned model less weight than this is worth a word


def strict_budget_note(decision: Decision, entry: Mapping[str, Any]) -> str | None:
    """A word when a relative loss budget keeps little of the fine-tune (α below :data:`STRICT_ALPHA`): the bound may
    be far stricter than the user's own metric needs (an easy probe set, whose small base loss leaves a small absolute
    allowance, or a contrastive loss whose scale depends on the batch size). ``None`` otherwise."""
    if decision.policy != "budget" or decision.quantity != "loss" or not 0.0 < decision.alpha < STRICT_ALPHA:
        return None
    base, bound = decision.base_loss, decision.threshold
    if base is None or bound is None:
        return None
    tuned = entry.get("general_loss_finetuned")
    share = ""
    if isinstance(tuned, (int, float)) and tuned > bound:
        share = f" ({100 * (bound - base) / (tuned - base):.0f}% of the fine-tuned model's increase)"
    return (
        f"the loss budget kept alpha={decision.alpha:.2f}: it allows the general-probe loss {base:.4g} -> "
        f"{bound:.4g}{share}. A relative bound on a small base loss (an easy probe set) or on a loss whose scale "
        "depends on the batch size can be far stricter than your metric needs; check the resilient model on your "
        "metric, or bound that metric instead: BudgetPolicy(metric=fn, metric_drop=...)"
    )


def unbounded_note(confidence: float | None, entry: Mapping[str, Any]) -> str | None:
    """A word when a confidence bound had fewer than two probe units to estimate a spread from (it then bounds the
    mean); ``None`` otherwise."""
    units = entry.get("general_loss_units")
    if confidence is None or units is None or units >= 2:
        return None
    return (
        f"confidence={confidence:g} bounds the general-probe loss from the spread of its per-unit increase, but the "
        f"probes gave {units} unit: the mean is bounded instead. Let score_fn return per-example losses (a 1-D "
        "tensor), or batch the general probes in two or more batches"
    )
