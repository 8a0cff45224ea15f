"""Thin adapters of :mod:`resilient_tune.engine` to training frameworks.

Each submodule imports its framework lazily (only when the submodule itself is imported) and fails at
construction, with the extra to install, when the framework is missing:

- :mod:`resilient_tune.integrations.transformers`: ``CocktailCallback`` for the Hugging Face ``Trainer``
  (``pip install 'resilient-tune[hf]'``).

Nothing here is imported by the core.
"""
