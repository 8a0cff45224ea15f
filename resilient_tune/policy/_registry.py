"""Policies by name: :data:`POLICY_NAMES` and :func:`get_policy`, which builds one from its options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from ._base import FixedPolicy, Policy
from ._budget import BudgetPolicy
from ._cocktail import CocktailPolicy

POLICY_NAMES = ("fixed", "cocktail", "budget")


def get_policy(name: str | Policy, **options: Any) -> Policy:
    """A policy by name (``fixed`` | ``cocktail`` | ``budget``), or ``name`` itself if it is a policy object.

    Args:
        name: The policy name, or a ready policy (returned as is; ``options`` must then be empty).
        **options: Constructor arguments: ``alpha``, ``weights`` (fixed), ``alpha``, ``temperature`` (cocktail),
            ``drift_budget``, ``tolerance``, ``slack``, ``max_passes`` (budget).

    Raises:
        UsageError: Unknown name (the message lists the valid ones) or bad options.
    """
    if not isinstance(name, str):
        if isinstance(name, Policy):
            if options:
                raise UsageError(
                    f"options {sorted(options)} cannot be applied to a ready policy object {name!r}"
                )
            return name
        raise UsageError(f"policy={name!r} must be a name ({' | '.join(POLICY_NAMES)}) or a policy object")
    factories: dict[str, Callable[..., Policy]] = {
        "fixed": FixedPolicy,
        "cocktail": CocktailPolicy,
        "budget": BudgetPolicy,
    }
    if name not in factories:
        raise UsageError(f"policy {name!r} is unknown; use one of: {', '.join(POLICY_NAMES)}")
    try:
        return factories[name](**options)
    except TypeError as exc:
        raise UsageError(f"bad options for policy {name!r}: {exc}") from None
