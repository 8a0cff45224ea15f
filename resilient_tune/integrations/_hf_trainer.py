"""How the Hugging Face ``CocktailCallback`` reaches its ``Trainer`` (callbacks are not handed one) and its own state
in a checkpoint's ``trainer_state.json``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["find_trainer", "replaced_callback", "stored_state"]

logger = logging.getLogger("resilient_tune.integrations.transformers")


def find_trainer(*, quiet: bool = False) -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack (the one firing the current event)."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < 50:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    if quiet:
        return None
    logger.warning(
        "CocktailCallback could not find its Trainer on the call stack: metrics are added to the eval metrics "
        "but not logged to report_to; call callback.bind(trainer) to fix it"
    )
    return None


def replaced_callback(restored: Any, kind: type) -> Any | None:
    """The first ``CocktailCallback`` of the Trainer on the call stack not yet used as a configuration source."""
    trainer = find_trainer(quiet=True)
    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", []):
        taken = getattr(callback, "_config_taken", False)
        if isinstance(callback, kind) and callback is not restored and not taken:
            return callback
    return None


def stored_state(state: Any, name: str) -> dict[str, Any] | None:
    stored = (getattr(state, "stateful_callbacks", None) or {}).get(name)
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    if not isinstance(stored, Mapping):
        return None
    resume = (stored.get("attributes") or {}).get("_resume_state")
    return dict(resume) if isinstance(resume, Mapping) else None
