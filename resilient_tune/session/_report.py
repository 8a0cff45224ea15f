"""The end-of-run report of a session: ``cocktail_report.json`` and its PNG plot."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..report import PLOT_FILE, plot_history

__all__ = ["write_report"]

logger = logging.getLogger("resilient_tune.session")


def write_report(path: Path, session: Any, final: Mapping[str, Any]) -> Path:
    """``path`` (JSON: policy, recipe, final decision, snapshot size, history, failed saves) and the PNG plot beside
    it, from a :class:`~resilient_tune.Cocktail` ``session``; written atomically by the calling process."""
    snap = session.engine.snapshot
    report = {
        "format": "resilient-tune/cocktail-report",
        "policy": session.policy.to_dict(),
        "recipe": session.engine.recipe_for(final["alpha"]).to_dict(),
        "final": dict(final),
        "snapshot": {
            "storage": snap.storage,
            "resident_bytes": snap.nbytes,
            "stored_bytes": snap.stored_bytes,
        },
        "history": session.history,
        "save_failures": session.save_failures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    try:
        plot_history(session.history, path.with_name(PLOT_FILE))  # warns (no error) without matplotlib
    except Exception as exc:  # a plot must never fail the run
        logger.warning("CocktailCallback: the report plot was not drawn: %s", exc)
    return path
