"""Policies: how α (the weight of the fine-tuned model) is chosen at each evaluation.

A policy is a small object with one method, ``choose(evaluate) -> Decision``. ``evaluate(alpha)`` returns the
general-probe loss of the merged model ``θ₀ + α·(θₜ − θ₀)`` (one probe pass, which the caller may cache, e.g.
the base's loss at ``α = 0`` never changes during a run). Policies that need no measurement accept
``evaluate=None``.

- :class:`FixedPolicy` (``"fixed"``, the zero-config default): α as given.
- :class:`BudgetPolicy` (``"budget"``): the largest α in ``[0, 1]`` whose general-probe loss stays within
  ``(1 + drift_budget)`` × the base's, found in a few probe passes.
- :class:`CocktailPolicy` (``"cocktail"``, the paper): α as given, and the weights ``wᵢ`` of the base and the
  peers in ``θ = α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ`` from their losses ``Lᵢ`` on target examples, ``wᵢ = softmax(−Lᵢ/τ)``.

Policies that choose ``wᵢ`` return them in :attr:`Decision.weights`; the others leave it ``None`` and the merge
keeps its current weights (uniform over base and peers unless set). Policies that need ingredient losses say so
with ``needs_ingredient_losses = True`` and take them as ``choose(evaluate, ingredient_losses=...)``.

Modules: :mod:`~resilient_tune.policy._base` (:class:`Decision`, the :class:`Policy` protocol, :class:`FixedPolicy`,
:func:`choose`), :mod:`~resilient_tune.policy._budget`, :mod:`~resilient_tune.policy._cocktail` and
:mod:`~resilient_tune.policy._registry` (:func:`get_policy`, :data:`POLICY_NAMES`).
"""

from ._base import Decision, FixedPolicy, Policy, choose
from ._base import Evaluate as Evaluate  # the type aliases, importable from here as before the split
from ._base import IngredientLosses as IngredientLosses
from ._budget import BudgetPolicy
from ._cocktail import CocktailPolicy
from ._registry import POLICY_NAMES, get_policy

__all__ = [
    "POLICY_NAMES",
    "BudgetPolicy",
    "CocktailPolicy",
    "Decision",
    "FixedPolicy",
    "Policy",
    "choose",
    "get_policy",
]
