"""Auto weights (LM-Cocktail): score every ingredient on a few target examples, weight by softmax(−loss/τ).

The loss of ingredient ``i`` on the examples ``E`` is ``Lᵢ``; its weight is ``wᵢ = softmax(−L/τ)ᵢ``, computed in
float32 exactly as the reference implementation (LM_Cocktail 0.0.4) does. Three losses are defined, matching the
reference where it has one:

* ``decoder`` (examples ``{"input": str, "output": str}``): causal-LM mean token cross-entropy of ``output`` given
  ``input``. Tokens are ``encode(input + " " + output) + [eos]``; the first ``len(encode(input))`` positions are
  masked out of the labels (−100); sequences are truncated to ``max_input_length`` tokens and padded to the
  longest sequence of their batch (the reference pads to ``max_input_length``: same per-batch losses, less work);
  the attention mask is ``ids != pad_id``. A tokenizer without a pad token pads with its eos token (the reference
  crashes). The loss is the mean of the per-batch means.
* ``encoder`` (examples ``{"query": str, "pos": [str, ...], "neg": [str, ...]}``): contrastive loss with in-batch
  negatives. Embeddings are the L2-normalised CLS vectors (``last_hidden_state[:, 0]``); each query brings
  ``pos[0]`` followed by ``neg_number`` negatives sampled with ``random.Random(seed)`` (the reference samples with
  the global ``random`` module: seeding it with the same seed gives the same negatives); scores are
  ``q · pᵀ / 0.05`` over every passage of the batch, the target of query ``i`` is passage ``i · (1 + neg_number)``;
  cross-entropy mean per batch, mean over batches.
* ``reranker`` (same example format; not in the reference): a sequence-classification model with one output
  scores the pairs ``(query, passage)`` for ``[pos[0]] + negatives`` of each query; cross-entropy over each group
  with target 0 (the FlagEmbedding reranker loss), mean per batch, mean over batches.

Only one model instance is built; ingredients are copied into it one at a time (one extra tensor in memory at a
time when read from disk). ``transformers`` is imported inside the functions that need it.

Modules: :mod:`~resilient_tune.weights._auto` (the public API and the argument checks),
:mod:`~resilient_tune.weights._batches` (batches and losses per model type) and
:mod:`~resilient_tune.weights._models` (loading models, copying ingredients into them).
"""

from ._auto import (
    MODEL_TYPES,
    AutoWeights,
    compute_auto_weights,
    compute_weights,
    example_losses,
    softmax_weights,
)

# the checks and model loading the LM_Cocktail drop-ins (resilient_tune.lm_cocktail) share with the auto weights
from ._auto import _check_model_type as check_model_type
from ._auto import _check_names as check_names

# also importable from here, as before the split: private helpers the tests import (a redundant alias marks it)
from ._batches import _decoder_batches as _decoder_batches
from ._batches import _encoder_batches as _encoder_batches
from ._models import Ingredient
from ._models import _copy_weights_into as copy_weights_into
from ._models import _load_auto_model as _load_auto_model
from ._models import _load_auto_model as load_auto_model
from ._models import _resolve_model_path as resolve_model_path

__all__ = [
    "MODEL_TYPES",
    "AutoWeights",
    "Ingredient",
    "check_model_type",
    "check_names",
    "compute_auto_weights",
    "compute_weights",
    "copy_weights_into",
    "example_losses",
    "load_auto_model",
    "resolve_model_path",
    "softmax_weights",
]
