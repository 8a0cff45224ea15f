"""A tiny GPT-2 that has learned to count (the general skill) and a pattern task to fine-tune it towards, shared by
the budget-policy tests that need real forgetting in a few CPU steps."""

from __future__ import annotations

from collections.abc import Callable

import torch

VOCAB, LENGTH = 64, 8
# general skill: counting upwards over tokens 12-63; the new task: a pattern over tokens 0-11
COUNTING = (
    12
    + (torch.randint(0, 52, (16, 1), generator=torch.Generator().manual_seed(1)) + torch.arange(LENGTH)) % 52
)
PATTERN = (torch.arange(4).unsqueeze(1) + 3 * torch.arange(LENGTH)) % 12


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 of width 16 from a config, seeded, without dropout."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def train_on(
    model: torch.nn.Module,
    ids: torch.Tensor,
    steps: int,
    lr: float,
    *,
    every: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    """``steps`` AdamW steps (no weight decay) of language modelling on ``ids``; ``on_step(step)`` after every
    ``every``-th one (1-based)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None and every and step % every == 0:
            on_step(step)
    return model


def pretrained_counter() -> torch.nn.Module:
    """The base: :func:`tiny_gpt2` trained 40 steps to count (next-token accuracy on COUNTING well above chance)."""
    return train_on(tiny_gpt2(), COUNTING, 40, 3e-2)


def examples(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Rows of ``ids`` as ``{"input_ids", "labels"}`` examples (probe data)."""
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def pattern_trainer(out: object, callback: object, **args: object) -> object:
    """A ``transformers.Trainer`` fine-tuning :func:`pretrained_counter` 6 steps towards PATTERN with ``callback``,
    evaluating at steps 3 and 6, writing into ``out``; ``args`` add or replace ``TrainingArguments`` fields."""
    import transformers

    train = examples(PATTERN.repeat(4, 1))
    options: dict = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-2,
        eval_strategy="steps", eval_steps=3, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    options.update(args)
    return transformers.Trainer(
        model=pretrained_counter(),
        args=transformers.TrainingArguments(**options),
        train_dataset=train,
        eval_dataset=train[:4],
        callbacks=[callback],
    )
