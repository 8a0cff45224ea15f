"""``resilient-tune demo``: fine-tune a real pre-trained model, watch it forget, bring the general skill back.

- :func:`run_demo` runs a scenario into a folder (``report.json``, ``report.png``, the resilient checkpoint);
- :mod:`resilient_tune.demo.data`: the offline text (standard-library docstrings);
- :mod:`resilient_tune.demo.encoder`: the ``encoder`` scenario (all-MiniLM-L6-v2, ``transformers.Trainer``);
- :mod:`resilient_tune.demo.report`: ``report.json``, the table and the plot (``resilient-tune report``).

Importing this package is light; the scenarios import torch and transformers when they run.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["SCENARIOS", "run_demo"]

SCENARIOS = ("encoder",)


def run_demo(
    out: str | os.PathLike[str], scenario: str = "encoder", *, steps: int | None = None, **options: Any
) -> dict[str, Any]:
    """Run a demo scenario into ``out`` and return its report.

    Args:
        out: The run folder (created; files in it are replaced).
        scenario: ``"encoder"`` (all-MiniLM-L6-v2 on standard-library docstrings).
        steps: Optimizer steps (default: the scenario's documented recipe).
        **options: Other fields of the scenario's config (e.g. ``learning_rate``, ``seed``).

    Raises:
        UsageError: Unknown scenario or bad options.
    """
    from ..errors import UsageError

    if scenario not in SCENARIOS:
        raise UsageError(f"unknown demo scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    from .encoder import EncoderConfig, run_encoder

    fields = set(EncoderConfig.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for the {scenario} demo; valid: {sorted(fields)}")
    if steps is not None:
        options["steps"] = steps
    return run_encoder(out, EncoderConfig(**options))
