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

    Identical to :class:`resilient_tune.integrations.lightning.CocktailCallback` (same arguments, documented on
    :class:`~resilient_tune.Cocktail`, same outputs and resume state) except for the
    Lightning package it plugs into.
    """

    _package = "pytorch_lightning"
    _import_error = _IMPORT_ERROR
