"""Layer depth of every tensor key, for LiNeS depth scaling.

Rules (keys are matched case-insensitively):

1. A key inside a numbered block gets ``depth = l / (L - 1)``, where ``l`` is the number after the
   first ``layers.``, ``layer.``, ``h.``, ``blocks.`` or ``block.`` path component (at the start of
   the key or after a dot, followed by a dot), e.g. ``model.layers.3.mlp.up_proj.weight``,
   ``encoder.layer.3.output.dense.bias``, ``transformer.h.3.attn.c_attn.weight``. ``L - 1`` is the
   largest layer index found among all keys (so ``L`` is the number of layers when they are numbered
   ``0 .. L-1``); with a single layer every layer key gets ``0.0``.
2. Other keys whose name contains ``embed``, ``wte``, ``wpe`` or ``embeddings`` (token and position
   embeddings) are the shallowest: ``0.0``.
3. Every other key (final norms, LM heads, poolers, classifiers) is the deepest: ``1.0``.

Models with several numbered stacks (encoder and decoder, vision and text towers) share one index
range: layer 3 of the encoder and layer 3 of the decoder get the same depth. Pass all keys of the
model at once (not one shard) so that ``L`` is right.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["layer_depths"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EMBEDDING_WORDS = ("embed", "wte", "wpe")  # "embed" also covers "embeddings"


def layer_depths(keys: Iterable[str]) -> dict[str, float]:
    """LiNeS depth in ``[0, 1]`` for every key (see the module docstring for the rules).

    Args:
        keys: all tensor names of one model.

    Returns:
        key -> depth, in the order of ``keys``.
    """
    keys = list(keys)
    indices: dict[str, int | None] = {}
    for key in keys:
        match = _LAYER.search(key.lower())
        indices[key] = int(match.group(1)) if match else None
    deepest = max((i for i in indices.values() if i is not None), default=0)
    depths: dict[str, float] = {}
    for key, index in indices.items():
        if index is not None:
            depths[key] = index / deepest if deepest > 0 else 0.0
        elif any(word in key.lower() for word in _EMBEDDING_WORDS):
            depths[key] = 0.0
        else:
            depths[key] = 1.0
    return depths
