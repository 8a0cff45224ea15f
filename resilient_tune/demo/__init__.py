"""``resilient-tune demo``: fine-tune a real pre-trained model, watch it forget, bring the general skill back.

- :func:`run_demo` runs a scenario into a folder (``report.json``, ``report.png``, the resilient checkpoint);
- :mod:`resilient_tune.demo.data`: the offline text (standard-library docstrings);
- :mod:`resilient_tune.demo.encoder`: the ``encoder`` scenario (all-MiniLM-L6-v2, ``transformers.Trainer``);
- :mod:`resilient_tune.demo.text`: the decoder's text (the standard library's English prose and Python source);
- :mod:`resilient_tune.demo.decoder`: the ``decoder`` scenario (a small causal LM pre-trained in the run on prose,
  fine-tuned on code);
- :mod:`resilient_tune.demo.report`: ``report.json``, the table and the plot (``resilient-tune report``).

Importing this package is light; the scenarios import torch and transformers when they run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["SCENARIOS", "run_demo"]

SCENARIOS = ("encoder", "decoder")


def run_demo(
    out: str | os.PathLike[str],
    scenario: str = "encoder",
    *,
    steps: int | None = None,
    echo: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """Run a demo scenario into ``out`` and return its report.

    Args:
        out: The run folder (created; files in it are replaced).
        scenario: ``"encoder"`` (all-MiniLM-L6-v2 on standard-library docstrings) or ``"decoder"`` (a small
            causal LM pre-trained on the standard library's prose, fine-tuned on its source code).
        steps: Fine-tuning optimizer steps (default: the scenario's documented recipe).
        echo: Where progress lines and the table go.
        **options: Other fields of the scenario's config (e.g. ``learning_rate``, ``seed``).

    Raises:
        UsageError: Unknown scenario or bad options.
    """
    from ..errors import UsageError

    if scenario not in SCENARIOS:
        raise UsageError(f"unknown demo scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if scenario == "decoder":
        from .decoder import DecoderConfig as config_class
        from .decoder import run_decoder as run
    else:
        from .encoder import EncoderConfig as config_class
        from .encoder import run_encoder as run

    fields = set(config_class.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for the {scenario} demo; valid: {sorted(fields)}")
    if steps is not None:
        options["steps"] = steps
    return run(out, config_class(**options), echo=echo)
