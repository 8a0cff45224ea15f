"""The ``cocktail`` policy (LM-Cocktail, the paper): α as given, and the weights ``wᵢ`` of the base and the peers in
``θ = α·θₜ + (1 − α)·Σᵢ wᵢ·θᵢ`` from their losses ``Lᵢ`` on target examples, ``wᵢ = softmax(−Lᵢ/τ)``.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..validation import check_alpha
from ..weights import softmax_weights
from ._base import Decision, Evaluate, IngredientLosses


class CocktailPolicy:
    """LM-Cocktail (paper arXiv 2311.13534): α as given, ``wᵢ = softmax(−Lᵢ/τ)`` over the base and the peers.

    ``Lᵢ`` is the loss of ingredient ``i`` (the base, then each peer, as stored — not mixed with the fine-tuned
    model) on a few target examples. The ingredients never change during a run, so the caller may compute the
    losses once and pass the same numbers at every decision. Without peers the only weight is the base's (1.0)
    and the policy is ``fixed``.

    Args:
        alpha: Weight of the fine-tuned model in ``[0, 1]`` (0.5 by default, as the paper's examples).
        temperature: Softmax temperature τ > 0 (5.0, the reference default; smaller τ favours the lowest loss).
    """

    name = "cocktail"
    needs_general_data = False
    needs_ingredient_losses = True

    def __init__(self, alpha: float = 0.5, *, temperature: float = 5.0) -> None:
        self.alpha = check_alpha(alpha)
        softmax_weights([0.0], temperature)  # validates the temperature with the reference's message
        self.temperature = float(temperature)

    def choose(
        self, evaluate: Evaluate | None = None, *, ingredient_losses: IngredientLosses | None = None, **_: Any
    ) -> Decision:
        """Weights from ``ingredient_losses`` (base first, or a function returning them); no general pass.

        Raises:
            UsageError: ``ingredient_losses`` missing or empty.
            NonFiniteError: A loss is NaN/Inf.
        """
        if ingredient_losses is None:
            raise UsageError(
                "the cocktail policy weighs the base and the peers by their loss on target examples; pass "
                "ingredient_losses=[loss of the base, loss of peer 1, ...]"
            )
        losses = tuple(
            float(x) for x in (ingredient_losses() if callable(ingredient_losses) else ingredient_losses)
        )
        names = ["the base", *(f"peer {i}" for i in range(1, len(losses)))]
        weights = tuple(softmax_weights(losses, self.temperature, names=names))
        reason = f"fixed alpha; weights softmax(-loss/{self.temperature:g}) over base and {len(losses) - 1} peer(s)"
        return Decision(self.alpha, 0, self.name, reason=reason, weights=weights, ingredient_losses=losses)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "temperature": self.temperature}

    def __repr__(self) -> str:
        return f"CocktailPolicy(alpha={self.alpha}, temperature={self.temperature})"
