"""resilient-tune: keep fine-tuned language models good at everything they knew before."""

__version__ = "0.1.0.dev0"
