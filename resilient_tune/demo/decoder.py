"""The ``decoder`` demo: pre-train a small causal LM on general tasks, fine-tune it on a new one, watch it forget,
repair it.

All tasks are **synthetic** string transformations (clearly labelled as such in the output and the report): a
prompt ``"R:dcab="`` asks for the answer ``"bacd"`` then ``<eos>``, one character per token.

- general tasks (the "pre-training" mix, what the model must not forget): ``C`` copy, ``R`` reverse, ``S`` sort;
- target task (the new skill, never seen in pre-training): ``D`` sort descending (default), or ``H`` shift every
  letter to the next one of the alphabet (``p`` wraps to ``a``).

1. Build a GPT-2-style model from a config (4 layers, width 128, ≈0.8M parameters; character vocabulary) and
   pre-train it on the general mix with a ``transformers.Trainer`` (stage 1; the result is the base θ₀, saved to
   ``out/base``).
2. Fine-tune it on the target task with a ``Trainer`` and :class:`~resilient_tune.CocktailCallback`
   (policy ``budget``), which writes the resilient checkpoint ``θ₀ + α·(θ − θ₀)`` (stage 2).
3. Score exact-match accuracy (the greedy answer equals the expected one, ``<eos>`` included) of the base, the
   fine-tuned model, the resilient checkpoint (loaded back from disk), LM-Cocktail's static ``α = 0.5`` and a few
   more α values; write ``report.json`` and ``report.png`` as the encoder demo does.

The probes the policy sees are held out from the test sets, and no test prompt is trained on.

On this from-scratch model weight interpolation does not keep both skills: the new skill only appears at α where
the general one is mostly gone (docs/demo.md lists the recipes tried: richer task mixes, shared structure, gentler
and harder fine-tunes, new letters). The scenario shows the forgetting and what the policy does about it honestly.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer
from transformers import logging as hf_logging

from ..errors import UsageError
from ._progress import use_demo_progress
from ._scenario import (
    Hits,
    ScenarioConfig,
    echo_scores,
    environment,
    fine_tune,
    finish,
    positive_ints,
    score_mixes,
    training_args,
)

__all__ = [
    "GENERAL_TASKS",
    "TARGET_TASKS",
    "DecoderConfig",
    "LMCollator",
    "char_tokenizer",
    "exact_match_hits",
    "make_examples",
    "run_decoder",
]

ALPHABET = "abcdefghijklmnop"
GENERAL_TASKS = {"C": "copy", "R": "reverse", "S": "sort"}
TARGET_TASKS = {"D": "sort descending", "H": "shift each letter to the next (p -> a)"}
_SPECIAL = ["<pad>", "<eos>", "<unk>"]
MODEL_LABEL = "GPT-2-style causal LM built from a config (character vocabulary)"


@dataclass(frozen=True)
class DecoderConfig(ScenarioConfig):
    """The decoder demo's recipe (the defaults are the documented run); the policy, seed and
    regularisation fields are :class:`~resilient_tune.demo._scenario.ScenarioConfig`'s.

    Attributes:
        target_task: The new skill fine-tuned in stage 2: ``"D"`` (sort descending) or ``"H"`` (shift letters).
        steps: Fine-tuning optimizer steps (stage 2).
        learning_rate: Fine-tuning AdamW learning rate, constant.
        batch_size: Fine-tuning examples per step.
        pretrain_steps: Pre-training optimizer steps on the general mix (stage 1).
        pretrain_learning_rate: Pre-training peak learning rate (linear warm-up over 10% of the steps, then
            linear decay).
        pretrain_batch_size: Pre-training examples per step.
        probe_examples: Examples per task in the probes (general: this many of each general task).
        test_examples: Test examples per task.
        min_length: Shortest input string (letters).
        max_length: Longest input string (letters).
        n_layer: Transformer blocks.
        n_embd: Width.
        n_head: Attention heads.
        eval_batch_size: Examples per forward pass when scoring and probing.
    """

    target_task: str = "D"
    steps: int = 100
    learning_rate: float = 3e-4
    batch_size: int = 32
    pretrain_steps: int = 700
    pretrain_learning_rate: float = 3e-3
    pretrain_batch_size: int = 64
    probe_examples: int = 32
    test_examples: int = 300
    min_length: int = 3
    max_length: int = 6
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_ints(
            self,
            (
                "steps",
                "batch_size",
                "pretrain_batch_size",
                "probe_examples",
                "test_examples",
                "min_length",
                "n_layer",
                "n_embd",
                "n_head",
                "eval_batch_size",
            ),
        )
        if (
            isinstance(self.pretrain_steps, bool)
            or not isinstance(self.pretrain_steps, int)
            or self.pretrain_steps < 0
        ):
            raise UsageError(f"pretrain_steps={self.pretrain_steps!r} must be an int >= 0")
        if self.target_task not in TARGET_TASKS:
            raise UsageError(f"target_task={self.target_task!r}; choose one of {sorted(TARGET_TASKS)}")
        if self.max_length < self.min_length:
            raise UsageError(f"max_length={self.max_length} must be >= min_length={self.min_length}")
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        for name in ("learning_rate", "pretrain_learning_rate"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name}={getattr(self, name)!r} must be > 0, e.g. 1e-3")


# ---------------------------------------------------------------------------- the synthetic tasks
def answer(task: str, text: str) -> str:
    """The expected answer of ``task`` (``C``, ``R``, ``S``, ``D`` or ``H``) on ``text``."""
    if task == "C":
        return text
    if task == "R":
        return text[::-1]
    if task == "S":
        return "".join(sorted(text))
    if task == "D":
        return "".join(sorted(text, reverse=True))
    if task == "H":
        return "".join(ALPHABET[(ALPHABET.index(c) + 1) % len(ALPHABET)] for c in text)
    raise UsageError(f"unknown task {task!r}; choose one of {sorted({**GENERAL_TASKS, **TARGET_TASKS})}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of the task strings, plus ``<pad>``, ``<eos>``, ``<unk>`` (saved with the model)."""
    from tokenizers import Tokenizer, decoders, models

    chars = list(ALPHABET) + sorted({**GENERAL_TASKS, **TARGET_TASKS}) + [":", "="]
    vocab = {token: i for i, token in enumerate(_SPECIAL + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_examples(
    tasks: Sequence[str],
    n: int,
    rng: random.Random,
    tokenizer: Any,
    cfg: DecoderConfig,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """``n`` examples, tasks taken in turn: ``{"prompt", "input_ids", "labels"}`` with labels ``-100`` over the
    prompt (``"R:dcab="``) and the answer's tokens then ``<eos>`` after it. Prompts in ``exclude`` are skipped."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(cfg.min_length, cfg.max_length)))
        prompt = f"{task}:{text}="
        if prompt in exclude:
            continue
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer(task, text), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"prompt": prompt, "input_ids": p + a, "labels": [-100] * len(p) + a})
    return out


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
            ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.inference_mode()
def exact_match_hits(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Any]],
    pad_id: int,
    batch_size: int = 128,
    bar: Any = None,
) -> list[bool]:
    """Per example: does greedy decoding from the prompt produce exactly the answer and ``<eos>``?

    Computed in one teacher-forced pass: greedy decoding reproduces the answer exactly if and only if, given the
    right prefix, the most likely next token is the right one at every answer position.
    """
    model.eval()
    collate = LMCollator(pad_id)
    hits: list[bool] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, T, V)
        predicted = logits[:, :-1].argmax(-1)  # (B, T-1): the token predicted after each position
        wanted = batch["labels"][:, 1:]  # (B, T-1)
        hits += ((predicted == wanted) | (wanted == -100)).all(dim=1).tolist()
        if bar is not None:
            bar.update(len(batch["input_ids"]))
    return hits


# ---------------------------------------------------------------------------- data and model
@dataclass(frozen=True)
class _Data:
    pretrain: list[dict[str, Any]]
    target_train: list[dict[str, Any]]
    general_probe: list[dict[str, Any]]
    target_probe: list[dict[str, Any]]
    general_test: list[dict[str, Any]]
    target_test: list[dict[str, Any]]

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.__dataclass_fields__}


def _data(tokenizer: Any, cfg: DecoderConfig) -> _Data:
    rng = random.Random(cfg.seed)
    general, target = list(GENERAL_TASKS), [cfg.target_task]
    general_test = make_examples(general, cfg.test_examples * len(general), rng, tokenizer, cfg)
    target_test = make_examples(target, cfg.test_examples, rng, tokenizer, cfg)
    seen = {e["prompt"] for e in general_test + target_test}
    general_probe = make_examples(general, cfg.probe_examples * len(general), rng, tokenizer, cfg, seen)
    target_probe = make_examples(target, cfg.probe_examples, rng, tokenizer, cfg, seen)
    seen |= {e["prompt"] for e in general_probe + target_probe}
    pretrain = make_examples(general, cfg.pretrain_steps * cfg.pretrain_batch_size, rng, tokenizer, cfg, seen)
    target_train = make_examples(target, cfg.steps * cfg.batch_size, rng, tokenizer, cfg, seen)
    return _Data(pretrain, target_train, general_probe, target_probe, general_test, target_test)


def _new_model(tokenizer: Any, cfg: DecoderConfig) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=2 * cfg.max_length + 8,
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
    """Stage 1: the general mix with a plain ``Trainer`` (warm-up then linear decay); saves ``out/base``."""
    if cfg.pretrain_steps:
        args = training_args(
            out / "pretraining",
            cfg,
            max_steps=cfg.pretrain_steps,
            per_device_train_batch_size=cfg.pretrain_batch_size,
            learning_rate=cfg.pretrain_learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=max(1, cfg.pretrain_steps // 10),
            eval_strategy="no",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data.pretrain,
            data_collator=LMCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        use_demo_progress(trainer, "pre-training (general mix)")
        trainer.train()
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")


# ---------------------------------------------------------------------------- the run
def run_decoder(
    out: str | os.PathLike[str],
    config: DecoderConfig | None = None,
    *,
    base_path: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the decoder demo into ``out`` and return its report (also written to ``out/report.json``).

    Args:
        out: Run folder: ``report.json``, ``report.png``, ``base/`` (the pre-trained model), ``resilient/`` (the
            resilient checkpoint), ``fine-tuned/`` and ``cocktail_report.json`` (the callback's α history).
        config: The recipe (:class:`DecoderConfig`; default: the documented run).
        base_path: A ``base/`` folder of an earlier run with the same model settings: skips pre-training.
        echo: Where progress lines go.
    """
    cfg = config or DecoderConfig()
    out = Path(out)
    started = time.perf_counter()
    timing: dict[str, float] = {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()

    tokenizer = char_tokenizer()
    data = _data(tokenizer, cfg)
    target_name = TARGET_TASKS[cfg.target_task]
    echo(
        f"data: SYNTHETIC string tasks; general = copy/reverse/sort, target = {target_name}; "
        + ", ".join(f"{k} {v}" for k, v in data.sizes().items())
    )
    t = time.perf_counter()
    if base_path is not None:
        model = AutoModelForCausalLM.from_pretrained(base_path)
    else:
        model = _new_model(tokenizer, cfg)
        _pretrain(model, tokenizer, data, out, cfg)
    timing["pretrain"] = time.perf_counter() - t
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def score(m: torch.nn.Module, label: str) -> Hits:
        sets = {"target": data.target_test, "general": data.general_test}
        total = sum(len(s) for s in sets.values())
        with tqdm(total=total, desc=f"scoring {label}", unit="ex", leave=False, dynamic_ncols=True) as bar:
            return {
                k: exact_match_hits(m, s, tokenizer.pad_token_id, cfg.eval_batch_size, bar)
                for k, s in sets.items()
            }

    hits = {"base": score(model, "base")}
    echo_scores(echo, "base", hits["base"], "exact match")

    t = time.perf_counter()
    callback, policy = fine_tune(
        out,
        cfg,
        general_probe=[_tokens(e) for e in data.general_probe],
        target_probe=[_tokens(e) for e in data.target_probe],
        desc=f"fine-tuning (target: {target_name})",
        model=model,
        train_dataset=[_tokens(e) for e in data.target_train],
        data_collator=LMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    timing["train"] = time.perf_counter() - t
    alpha = callback.alpha

    t = time.perf_counter()
    resilient = AutoModelForCausalLM.from_pretrained(out / "resilient")  # the written checkpoint itself
    curve = score_mixes(
        model, base_state, resilient, alpha, (cfg.static_alpha, *cfg.curve), score, hits, echo, "exact match"
    )
    timing["score_after"] = time.perf_counter() - t

    final = callback.history[-1] if callback.history else {}
    params = sum(p.numel() for p in model.parameters())
    return finish(
        out,
        echo,
        timing,
        started,
        scenario="decoder",
        hits=hits,
        alphas={"base": 0.0, "fine_tuned": 1.0, "resilient": alpha, "static": cfg.static_alpha},
        drift_relative=final.get("drift_relative"),
        curve=curve,
        history=callback.history,
        policy=policy.to_dict(),
        score_name="exact match",
        loss_name="LM loss on answer tokens",
        metric={
            "target": f"exact match (greedy answer + <eos>): {target_name}, unseen prompts",
            "general": "exact match (greedy answer + <eos>): copy, reverse, sort (equal shares), unseen prompts",
        },
        model=f"{MODEL_LABEL}, {params / 1e6:.2f}M parameters",
        config=asdict(cfg),
        data={
            "sizes": data.sizes(),
            "source": f"synthetic string tasks (copy, reverse, sort; target: {target_name})",
            "synthetic": True,
            "base_path": None if base_path is None else str(base_path),
        },
        environment=environment(),
        files={
            "base": "base" if base_path is None else str(base_path),
            "resilient": "resilient",
            "fine_tuned": "fine-tuned",
            "cocktail_report": "cocktail_report.json",
            "plot": "report.png",
        },
    )


def _tokens(example: Mapping[str, Any]) -> dict[str, list[int]]:
    """The fields the Trainer and the probes batch (``prompt`` is for bookkeeping only)."""
    return {"input_ids": example["input_ids"], "labels": example["labels"]}
