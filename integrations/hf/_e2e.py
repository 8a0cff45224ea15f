"""What the distributed end-to-end scripts share: the tiny language model and synthetic data (offline, built from a
config), their common arguments, and call counting with failure injection.

The training task is one repeated token pattern over tokens 0-11; general probes are uniform random tokens from
``low`` up (``low=12``: tokens the fine-tune never sees, so it forgets them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import transformers

import resilient_tune.engine._full_write as engine_module  # where the full-weight engine looks its writers up

VOCAB, LENGTH = 64, 8


def examples(n: int, seed: int, narrow: bool, *, low: int = 0) -> list[dict[str, list[int]]]:
    """``n`` tokenized examples: the task pattern (``narrow``) or random tokens in ``[low, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if narrow:
            start = int(torch.randint(0, 4, (1,), generator=g))
            ids = [(start + 3 * i) % 12 for i in range(LENGTH)]
        else:
            ids = torch.randint(low, VOCAB, (LENGTH,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * LENGTH, "labels": list(ids)})
    return out


def model() -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 (tied embeddings, no dropout), the same weights on every call."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every script takes: ``OUT``, ``--alpha``, ``--policy``, ``--drift-budget``, ``--fail-write``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--policy", default="fixed")
    parser.add_argument("--drift-budget", type=float, default=None)
    parser.add_argument(
        "--strict", action="store_true", help="CocktailCallback(strict=True): a failed save stops"
    )
    parser.add_argument(
        "--fail-write", action="store_true", help="make the resilient writes fail (an OSError)"
    )
    return parser


def count_calls(
    counter: dict[str, int], name: str, *, fail: bool = False, module: Any = engine_module
) -> None:
    """Count the calls of ``module.<name>`` in ``counter[name]``; with ``fail`` each call raises the ``OSError`` of
    a full disk instead (injected)."""
    original = getattr(module, name)
    counter.setdefault(name, 0)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter[name] += 1
        if fail:
            raise OSError(28, "No space left on device (injected by --fail-write)")
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
