"""``CocktailCallback`` for the standalone ``pytorch_lightning`` package.

The same callback as :mod:`resilient_tune.integrations.lightning` (one implementation:
:class:`~resilient_tune.integrations.lightning.LightningCocktail`), built over ``pytorch_lightning.Callback``:
Lightning refuses to mix the ``lightning.pytorch`` and ``pytorch_lightning`` class trees, so use this import with
``pytorch_lightning.Trainer`` / ``pytorch_lightning.cli.LightningCLI``::

    from resilient_tune.integrations.pytorch_lightning import CocktailCallback
    trainer = pytorch_lightning.Trainer(callbacks=[CocktailCallback(alpha=0.3)])

    python train.py fit --trainer.callbacks+=resilient_tune.integrations.pytorch_lightning.CocktailCallback
"""

from __future__ import annotations

from resilient_tune.integrations.lightning import LightningCocktail, callback_bases

__all__ = ["CocktailCallback"]

_BASES, _IMPORT_ERROR = callback_bases("pytorch_lightning")


class CocktailCallback(LightningCocktail, *_BASES):  # type: ignore[misc]
    """``pytorch_lightning`` callback writing resilient (LM-Cocktail) checkpoints.

    Identical to :class:`resilient_tune.integrations.lightning.CocktailCallback` (same arguments, outputs and
    resume state) except for the Lightning package it plugs into.

    Args:
        alpha: Weight of the fine-tuned model in ``[0, 1]`` (the ``fixed`` policy).
        policy: ``fixed`` | ``budget`` | a policy object.
        drift_budget: For ``budget``: allowed relative increase of the general-probe loss.
        general_data: General probes (dataset, DataLoader, or dict of them).
        target_data: Target probes (same forms).
        peers: Peer checkpoints (a later increment).
        method: Merge method name (``linear`` by default).
        method_options: Options of the merge method.
        score_fn: ``score_fn(pl_module, batch) -> loss``; default: ``training_step``'s loss.
        snapshot_device: Where the in-memory θ₀ lives.
        snapshot_dtype: Storage dtype of θ₀ (``bf16``, ``fp16``).
        snapshot_on_disk: Keep θ₀ on disk in ``<default_root_dir>/resilient_base/``.
        save_resilient: Write resilient folders.
        kl_top_k: Tokens per position kept for the KL probe.
        max_shard_size: Shard size of the written weights.
        seed: Seed of random merge methods.
    """

    _package = "pytorch_lightning"
    _import_error = _IMPORT_ERROR
