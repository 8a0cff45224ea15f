"""Tiny models and data shared by the integration tests: a 2-layer GPT-2 built from a config, token examples,
a PEFT LoRA wrapper and peft's own merge as the oracle of θ₀ + α·Δ."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from resilient_tune.errors import UsageError

VOCAB, LENGTH = 64, 8


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 (tied embeddings, no dropout), the same weights on every call."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def token_examples(n: int, seed: int, narrow: bool, *, tensors: bool = False) -> list[dict]:
    """``narrow``: one repeated pattern (the fine-tuning task); else uniform random tokens (general data).

    Each example holds ``input_ids``, ``attention_mask`` and ``labels``: lists of ints, or 1-D tensors with
    ``tensors`` (what ``default_collate`` stacks).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if narrow:
            start = int(torch.randint(0, 4, (1,), generator=g))
            ids = torch.tensor([(start + 3 * i) % 12 for i in range(LENGTH)])
        else:
            ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        mask = torch.ones(LENGTH, dtype=torch.long)
        if tensors:
            out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
        else:
            out.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": ids.tolist()})
    return out


def lora(model: torch.nn.Module | None = None, **kw) -> torch.nn.Module:
    """``model`` (default: :func:`tiny_gpt2`) with a LoRA adapter on ``c_attn`` and ``c_fc`` (options override)."""
    import peft

    options = dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0
    )
    options.update(kw)
    return peft.get_peft_model(model if model is not None else tiny_gpt2(), peft.LoraConfig(**options))


def oracle(model: torch.nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """θ₀ + α·Δ by peft's own merge: scale every LoRA scaling by α, mix modules_to_save copies, merge_and_unload."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, LoraLayer):
                module.scaling = {k: v * alpha for k, v in module.scaling.items()}
            if isinstance(module, ModulesToSaveWrapper):
                trained, original = module.modules_to_save["default"], module.original_module
                for name, p in trained.named_parameters():
                    base = original.get_parameter(name)
                    p.copy_(base + alpha * (p - base))
    return {k: v.detach().clone() for k, v in clone.merge_and_unload().state_dict().items()}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module.state_dict()``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_peers(root: Path) -> list[Path]:
    """Two peers of :func:`tiny_gpt2`'s architecture as ``save_pretrained`` folders: an "expert" trained a little
    on the target task (the narrow pattern of :func:`token_examples`) and another initialisation."""
    import transformers

    config = tiny_gpt2().config
    torch.manual_seed(5)
    expert = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(expert.parameters(), lr=3e-2)
    batch = torch.utils.data.default_collate(token_examples(32, 0, True, tensors=True))
    for _ in range(15):
        optimizer.zero_grad()
        expert(**batch).loss.backward()
        optimizer.step()
    torch.manual_seed(6)
    other = transformers.GPT2LMHeadModel(config)
    folders = [root / "expert", root / "other"]
    for model, folder in zip((expert, other), folders):
        model.save_pretrained(folder)
    return folders


BAD_OPTIONS = [
    ({"alpha": 1.5}, UsageError, "outside"),
    ({"policy": "greedy"}, UsageError, "fixed, cocktail, budget"),
    ({"policy": "budget"}, UsageError, "needs general_data"),
    ({"policy": "fixed", "drift_budget": 0.1}, UsageError, "budget"),
    ({"general_data": []}, UsageError, "empty"),
    ({"method": "soup"}, UsageError, "linear"),
    ({"max_shard_size": "lots"}, UsageError, "5GB"),
    ({"peers": ["/no/such/model"]}, UsageError, "does not exist"),
    ({"policy": "fixed", "temperature": 2.0}, UsageError, "cocktail"),
    ({"policy": "cocktail", "temperature": 0.0}, UsageError, "temperature"),
    ({"policy": "cocktail", "drift_budget": 0.1}, UsageError, "budget"),
]
"""``(constructor kwargs, error, message pattern)`` that every ``CocktailCallback`` refuses at construction."""
