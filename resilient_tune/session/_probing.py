"""The probe runs of a session: general and target probe sets scored on candidate mixes swapped into the live model.

:class:`ProbeRunner` holds the batched probe sets, the scoring (a ``score_fn`` or the module's own loss), the base's
predictions for the KL probe, the base's general loss (measured once per run), the ingredient losses of the
``cocktail`` policy (once per run) and the count of probe passes. Every number is averaged across ranks, so that every
rank decides from the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..distributed import mean_across_ranks
from ..engine import Engine
from ..errors import UsageError
from ..probe_bound import bounded_loss, z_of
from ..probes import BaseLogits, ProbeResult, base_log_probs, ingredient_losses, probe, probe_metric

__all__ = ["Batches", "ProbeRunner", "ScoreFn"]

ScoreFn = Callable[[torch.nn.Module, Mapping[str, Any]], Any]
Batches = list[Any]


class ProbeRunner:
    """Batched probe sets and their scoring for one run (see the module docs)."""

    def __init__(self) -> None:
        self.general: dict[str, Batches] = {}
        self.target: dict[str, Batches] = {}
        self.score: ScoreFn | None = None
        self.module: torch.nn.Module | None = None  # what the probes call (default: the model)
        self.base_refs: dict[str, list[BaseLogits]] = {}
        self.base_result: ProbeResult | None = None  # the general probes at α = 0, measured once per run
        self.ingredient_losses: list[float] | None = None
        self.base_metric: float | None = None  # the user's metric at α = 0, once per run (metric budgets)
        self.passes = 0
        self.installed = False
        self.with_units = False  # keep per-unit losses of the general probes (a confidence-bounded budget)

    def install(
        self,
        engine: Engine,
        model: torch.nn.Module,
        general: Mapping[str, Batches],
        target: Mapping[str, Batches],
        score: ScoreFn | None,
        *,
        probe_module: torch.nn.Module | None,
        with_kl: bool | None,
        kl_top_k: int | None,
    ) -> None:
        """Install the batched probe sets; collect the base's predictions for the KL probe and the base's general loss
        (so that bad probe data fails now, before training, not at the first evaluation)."""
        self.general, self.target = dict(general), dict(target)
        self.score, self.module = score, probe_module
        self.base_refs = {}
        self.installed = True
        if with_kl is None:
            with_kl = score is None
        if self.general and with_kl:
            scorer = self._scorer(model)
            with base_weights(engine), engine.swapped(model, 0.0):
                self.base_refs = {
                    name: base_log_probs(scorer, batches, top_k=kl_top_k)
                    for name, batches in self.general.items()
                }
        base = self.base_result  # a resumed run kept the base's loss only: a confidence bound needs its units too
        if self.general and (base is None or (self.with_units and base.units is None)):
            self.base_result = self.run_general(engine, model, 0.0)

    def restore(self, base_loss: float | None, ingredient_losses: list[float] | None) -> None:
        """On resume: the base's general loss and the ingredient losses a checkpoint kept (measured once per run)."""
        if base_loss is not None:
            self.base_result = ProbeResult(float(base_loss), None, 0)
        if ingredient_losses is not None:
            self.ingredient_losses = [float(x) for x in ingredient_losses]

    def run_general(self, engine: Engine, model: torch.nn.Module, alpha: float) -> ProbeResult:
        """The general probes on θ(α): loss (and KL to the base when its predictions were collected)."""
        scorer = self._scorer(model)
        losses, kls, units = [], [], []
        with engine.swapped(model, alpha):
            for name, batches in self.general.items():
                self.passes += 1
                result = probe(
                    scorer,
                    batches,
                    score_fn=self.score,
                    base=self.base_refs.get(name),
                    with_units=self.with_units,
                )
                losses.append(result.loss)
                kls.append(result.kl)
                units += result.units or ()
        kl = None if any(k is None for k in kls) else mean_across_ranks(sum(kls) / len(kls))
        loss = mean_across_ranks(sum(losses) / len(losses))  # every rank decides from the same numbers
        count = sum(len(b) for b in self.general.values())
        return ProbeResult(loss, kl, count, tuple(units) if self.with_units else None)

    def bound(self, result: ProbeResult, base: ProbeResult, confidence: float) -> tuple[float, int]:
        """The one-sided ``confidence`` upper bound of ``result``'s loss from its per-unit increase over ``base``
        (:func:`~resilient_tune.probe_bound.bounded_loss`), and the number of units."""
        if result.units is None or base.units is None:
            raise UsageError(
                "a confidence bound needs both probe passes run with per-unit losses (with_units)"
            )
        return bounded_loss(loss_of(result), result.units, base.units, z_of(confidence))

    def run_metric(
        self, engine: Engine, model: torch.nn.Module, alpha: float, metric: Callable[[torch.nn.Module], Any]
    ) -> float:
        """The user's metric on θ(α) (swapped into ``model``), averaged across ranks; the base's is cached."""
        if alpha == 0.0 and self.base_metric is not None:
            return self.base_metric
        with engine.swapped(model, alpha):
            self.passes += 1
            value = mean_across_ranks(probe_metric(self._scorer(model), metric))
        if alpha == 0.0:
            self.base_metric = value
        return value

    def run_target(self, engine: Engine, model: torch.nn.Module, alpha: float) -> float:
        """The target probes' mean loss on θ(α)."""
        scorer = self._scorer(model)
        losses = []
        with engine.swapped(model, alpha):
            for batches in self.target.values():
                self.passes += 1
                losses.append(loss_of(probe(scorer, batches, score_fn=self.score)))
        return mean_across_ranks(sum(losses) / len(losses))

    def losses_of_ingredients(self, engine: Engine, model: torch.nn.Module) -> list[float]:
        """``Lᵢ`` of the base and each peer (as stored) on the target probes, measured once per run."""
        if self.ingredient_losses is None:
            losses = ingredient_losses(engine, model, self.target, score_fn=self.score, scorer=self.module)
            self.ingredient_losses = [mean_across_ranks(x) for x in losses]
            self.passes += len(self.ingredient_losses) * len(self.target)
        return self.ingredient_losses

    def _scorer(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.module if self.module is not None else model


@contextlib.contextmanager
def base_weights(engine: Engine) -> Iterator[None]:
    """Within the block the engine's α = 0 mix is the base alone (weight 1 on the base, 0 on each peer)."""
    saved = engine.weights
    if engine.num_peers:
        engine.set_weights((1.0,) + (0.0,) * engine.num_peers)
    try:
        yield
    finally:
        engine.weights = saved


def loss_of(result: ProbeResult) -> float:
    if result.loss is None:
        raise UsageError("the probe produced no loss")
    return result.loss
