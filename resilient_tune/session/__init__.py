"""The session: :class:`Cocktail`, one resilient fine-tuning run, framework-free.

It holds the base θ₀ (through an :class:`~resilient_tune.engine.Engine`), the probes, the policy, the α history and
the writer. The training integrations (``CocktailCallback`` for the Hugging Face ``Trainer`` and Lightning) hold one
and translate their events into its calls; custom training loops call it directly (``docs/custom-loops.md``).
"""

from __future__ import annotations

from ._base import PER_RANK_FORMAT, rank_folder
from ._cocktail import Cocktail
from ._options import (
    BASE_FOLDER,
    RESILIENT_FOLDER,
    TARGET_DEFAULT_EXAMPLES,
    check_writable,
    head,
    make_policy,
    metrics,
    probe_sets,
    scalars,
)
from ._probing import ScoreFn

__all__ = [
    "BASE_FOLDER",
    "PER_RANK_FORMAT",
    "RESILIENT_FOLDER",
    "TARGET_DEFAULT_EXAMPLES",
    "Cocktail",
    "ScoreFn",
    "check_writable",
    "head",
    "make_policy",
    "metrics",
    "probe_sets",
    "rank_folder",
    "scalars",
]
