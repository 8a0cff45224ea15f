"""The decoder demo's parts: a character-level tokenizer, token windows and their collator, next-character hits
(the score), the windows of every set, and the model (built from a config, pre-trained on prose, or wrapped with
LoRA). :mod:`resilient_tune.demo.decoder` runs them; its public names are importable from there.

Documents are split by name: pre-training and fine-tuning windows come from the train documents, the probes from
the validation documents, the test sets from the test documents, so no test text is trained on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer

from ..errors import UsageError
from ._progress import use_demo_progress
from ._scenario import training_args
from .text import Corpus

if TYPE_CHECKING:
    from .decoder import DecoderConfig

_SPECIAL = ["<pad>", "<unk>", "<eos>"]


# ---------------------------------------------------------------------------- tokens and windows
def char_tokenizer(text: str, min_count: int = 1) -> PreTrainedTokenizerFast:
    """One token per character of ``text`` seen at least ``min_count`` times (sorted), after ``<pad>``, ``<unk>``
    and ``<eos>``; other characters become ``<unk>``. Saved with the model, so the checkpoints load with
    ``AutoTokenizer.from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(c for c, n in Counter(text).items() if n >= min_count and c not in _SPECIAL)
    vocab = {token: i for i, token in enumerate(_SPECIAL + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """``text`` as token ids ``(len(text),)``, one per character (what ``tokenizer(text)`` gives, computed directly:
    the fast tokenizer is slow on megabyte-long strings)."""
    vocab = tokenizer.get_vocab()
    unk = vocab["<unk>"]
    return torch.tensor([vocab.get(c, unk) for c in text], dtype=torch.long)


def windows(ids: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``length`` consecutive tokens at random starts of ``ids``: ``(n, length)``.

    Raises:
        UsageError: ``ids`` is shorter than one window.
    """
    if len(ids) <= length:
        raise UsageError(
            f"the text has {len(ids)} tokens, fewer than one window of {length}; lower context= or use more text"
        )
    starts = torch.randint(0, len(ids) - length + 1, (n,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


class LMCollator:
    """Pad ``input_ids`` (with ``pad_id``) and ``labels`` (with ``-100``) to the batch's longest, on the right;
    ``attention_mask`` marks the real tokens. Other fields are dropped. Tensors are ``(B, T)``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def next_char_hits(
    model: torch.nn.Module, block: torch.Tensor, batch_size: int = 100, bar: Any = None
) -> list[bool]:
    """Per predicted character of the windows ``block`` ``(N, T + 1)``: is the model's most likely next token the
    right one (given the true text before it)? ``N·T`` hits, window by window."""
    return next_char_scores(model, block, batch_size, bar)[0]


@torch.inference_mode()
def next_char_scores(
    model: torch.nn.Module, block: torch.Tensor, batch_size: int = 100, bar: Any = None
) -> tuple[list[bool], float]:
    """:func:`next_char_hits` and, from the same forward passes, the mean next-character loss (the LM loss the
    probes measure) over all ``N·T`` predicted characters."""
    model.eval()
    hits: list[bool] = []
    total = 0.0
    for start in range(0, len(block), batch_size):
        w = block[start : start + batch_size]
        logits = model(input_ids=w[:, :-1]).logits  # (B, T, V)
        hits += (logits.argmax(-1) == w[:, 1:]).flatten().tolist()
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"))
        if bar is not None:
            bar.update(len(w))
    return hits, total / max(len(hits), 1)


def _examples(block: torch.Tensor) -> list[dict[str, list[int]]]:
    """Trainer examples of ``(N, T + 1)`` windows: the model shifts ``labels`` itself."""
    return [{"input_ids": row, "labels": row} for row in block.tolist()]


# ---------------------------------------------------------------------------- data and model
@dataclass(frozen=True)
class _Data:
    """Token windows ``(N, context + 1)`` of every set, and the text they come from."""

    pretrain: torch.Tensor
    target_train: torch.Tensor
    general_probe: torch.Tensor
    target_probe: torch.Tensor
    general_test: torch.Tensor
    target_test: torch.Tensor
    prose: Corpus
    code: Corpus

    def sizes(self) -> dict[str, int]:
        """Windows per set, and characters per split of each domain."""
        out = {
            name: len(getattr(self, name))
            for name in self.__dataclass_fields__
            if name not in ("prose", "code")
        }
        out.update({f"prose_{k}_chars": v for k, v in self.prose.sizes().items()})
        out.update({f"code_{k}_chars": v for k, v in self.code.sizes().items()})
        return out


def _data(tokenizer: Any, prose: Corpus, code: Corpus, cfg: DecoderConfig) -> _Data:
    """The windows, drawn with ``cfg.seed``: pre-training and fine-tuning from the train documents, probes from
    the validation documents, test sets from the test documents."""
    g = torch.Generator().manual_seed(cfg.seed)
    length = cfg.context + 1
    ids = {
        (d, s): encode(tokenizer, c.texts[s]) for d, c in (("prose", prose), ("code", code)) for s in c.texts
    }
    # the held-out sets first: their windows do not move when the training budget changes
    return _Data(
        general_test=windows(ids["prose", "test"], cfg.test_windows, length, g),
        target_test=windows(ids["code", "test"], cfg.test_windows, length, g),
        general_probe=windows(ids["prose", "val"], cfg.probe_windows, length, g),
        target_probe=windows(ids["code", "val"], cfg.probe_windows, length, g),
        pretrain=windows(ids["prose", "train"], cfg.pretrain_steps * cfg.pretrain_batch_size, length, g),
        target_train=windows(ids["code", "train"], cfg.steps * cfg.batch_size, length, g),
        prose=prose,
        code=code,
    )


def _new_model(tokenizer: Any, cfg: DecoderConfig) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.context + 1,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def _pretrain(model: torch.nn.Module, tokenizer: Any, data: _Data, out: Path, cfg: DecoderConfig) -> None:
    """Stage 1: prose with a plain ``Trainer`` (warm-up then linear decay); saves ``out/base``."""
    if cfg.pretrain_steps:
        args = training_args(
            out / "pretraining",
            cfg,
            max_steps=cfg.pretrain_steps,
            per_device_train_batch_size=cfg.pretrain_batch_size,
            learning_rate=cfg.pretrain_learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=max(1, cfg.pretrain_steps // 10),
            adam_beta2=0.98,
            eval_strategy="no",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_examples(data.pretrain),
            data_collator=LMCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        use_demo_progress(trainer, "pre-training (prose)")
        trainer.train()
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")


def _with_lora(model: torch.nn.Module, rank: int, seed: int) -> Any:
    """``model`` wrapped with a fresh LoRA adapter of ``rank`` (the base weights frozen inside it), initialised
    from ``seed`` (the same adapter whether the base was pre-trained in this run or loaded)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError(
            f"lora_rank={rank} needs the peft package; pip install 'resilient-tune[peft]' or set lora_rank=0"
        ) from None
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights transposed
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def _merged_fine_tune(peft_model: Any, folder: Path, tokenizer: Any) -> torch.nn.Module:
    """The adapter-trained model with the adapter merged in (θ₀ + Δ, a plain model), saved to ``folder`` in place
    of the adapter the Trainer saved there (``resilient/adapter/`` keeps the α-scaled adapter)."""
    import shutil

    merged = peft_model.merge_and_unload()
    shutil.rmtree(folder, ignore_errors=True)
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return merged
