"""What a failed resilient save does: raised (``strict``), or logged loudly, recorded and survived."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..distributed import is_rank_zero

__all__ = ["SaveGuard"]

logger = logging.getLogger("resilient_tune.session")
T = TypeVar("T")


class SaveGuard:
    """Runs saves under the ``strict`` rule and keeps the record of the ones that failed.

    Args:
        strict: Raise a failure (``True``), or log it, record it and go on (``False``).
    """

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.failures: list[dict[str, Any]] = []  # {"step", "path", "error"} per failed save

    def run(
        self,
        action: Callable[[], T],
        path: str | os.PathLike[str],
        step: int,
        *,
        announce: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> T | None:
        """``action()``; on a failure with ``strict=False``: ``logger.error`` on rank 0 (a warning elsewhere) with the
        path and the cause, a record in :attr:`failures`, ``announce(record)``, and ``None``."""
        try:
            return action()
        except Exception as exc:
            if self.strict:
                raise
            record = {"step": int(step), "path": str(path), "error": f"{type(exc).__name__}: {exc}"}
            self.failures.append(record)
            if is_rank_zero():
                logger.error(
                    "CocktailCallback: the resilient save to %s at step %d FAILED: %s. Training continues without "
                    "it; fix the cause (free disk space, permissions, non-finite weights) or pass strict=True to "
                    "stop the run on such errors", path, step, record["error"], exc_info=exc,
                )  # fmt: skip
            else:
                logger.warning("CocktailCallback: the resilient save to %s failed: %s", path, record["error"])
            if announce is not None:
                announce(record)
            return None
