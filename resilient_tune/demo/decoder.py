"""The ``decoder`` demo: pre-train a small causal LM on English prose, fine-tune it on Python code, watch it forget
the prose, repair it.

Both domains are real text that ships with Python (:mod:`resilient_tune.demo.text`): the general domain is the
reference manual's topics and the standard library's docstrings, the target domain is the standard library's
source with docstrings and comments removed. Documents are split by name, so no test text is trained on.

1. Build a GPT-2-style model from a config (4 layers, width 128, ≈0.8M parameters; one token per character) and
   pre-train it on prose with a ``transformers.Trainer`` (stage 1; the result is the base θ₀, saved to
   ``out/base``).
2. Fine-tune it on code with a ``Trainer`` and :class:`~resilient_tune.CocktailCallback` (policy ``budget``),
   which writes the resilient checkpoint ``θ₀ + α·(θ − θ₀)`` (stage 2).
3. Score next-character accuracy (greedy, teacher-forced) on held-out windows of both domains for the base, the
   fine-tuned model, the resilient checkpoint (loaded back from disk), LM-Cocktail's static ``α = 0.5`` and a few
   more α values; write ``report.json`` and ``report.png`` as the encoder demo does.

The probes the policy sees are windows of the validation documents; the scores are on the test documents.
"""

from __future__ import annotations

import os
import time
from collections import Counter
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
from .text import Corpus, code_documents, corpus, prose_documents, text_fingerprint

__all__ = [
    "DecoderConfig",
    "LMCollator",
    "char_tokenizer",
    "encode",
    "next_char_hits",
    "run_decoder",
    "windows",
]

_SPECIAL = ["<pad>", "<unk>", "<eos>"]
MODEL_LABEL = "GPT-2-style causal LM built from a config (one token per character)"
SCORE_NAME = "next-char accuracy"


@dataclass(frozen=True)
class DecoderConfig(ScenarioConfig):
    """The decoder demo's recipe (the defaults are the documented run); the policy, seed and
    regularisation fields are :class:`~resilient_tune.demo._scenario.ScenarioConfig`'s.

    Attributes:
        steps: Fine-tuning optimizer steps on code (stage 2).
        learning_rate: Fine-tuning AdamW learning rate, constant.
        batch_size: Fine-tuning windows per step.
        context: Characters a window predicts (each window holds ``context + 1`` tokens).
        pretrain_steps: Pre-training optimizer steps on prose (stage 1).
        pretrain_learning_rate: Pre-training peak learning rate (linear warm-up over 10% of the steps, then
            linear decay).
        pretrain_batch_size: Pre-training windows per step.
        probe_windows: Windows in each probe (validation documents).
        test_windows: Windows in each test set (test documents); each window scores ``context`` characters.
        min_char_count: A character seen fewer times in the training text becomes ``<unk>``.
        n_layer: Transformer blocks.
        n_embd: Width.
        n_head: Attention heads.
        eval_batch_size: Windows per forward pass when scoring and probing.
        drift_budget: ``budget`` policy: allowed relative increase of the prose-probe loss over the base's.
        lora_rank: 0 fine-tunes every weight; ``r > 0`` trains a LoRA adapter of rank ``r`` instead (``peft``;
            ``lora_alpha = 2r`` on the attention and MLP projections), which the callback scales by α.
    """

    steps: int = 100
    learning_rate: float = 3e-4
    batch_size: int = 32
    context: int = 64
    pretrain_steps: int = 1200
    pretrain_learning_rate: float = 3e-3
    pretrain_batch_size: int = 32
    probe_windows: int = 32
    test_windows: int = 400
    min_char_count: int = 20
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    eval_batch_size: int = 100
    drift_budget: float = 0.02
    lora_rank: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_ints(
            self,
            (
                "steps",
                "batch_size",
                "context",
                "pretrain_batch_size",
                "probe_windows",
                "test_windows",
                "min_char_count",
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
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise UsageError(f"lora_rank={self.lora_rank!r} must be an int >= 0 (0: full fine-tune)")
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        for name in ("learning_rate", "pretrain_learning_rate"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name}={getattr(self, name)!r} must be > 0, e.g. 1e-3")


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


@torch.inference_mode()
def next_char_hits(
    model: torch.nn.Module, block: torch.Tensor, batch_size: int = 100, bar: Any = None
) -> list[bool]:
    """Per predicted character of the windows ``block`` ``(N, T + 1)``: is the model's most likely next token the
    right one (given the true text before it)? ``N·T`` hits, window by window."""
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(block), batch_size):
        w = block[start : start + batch_size]
        logits = model(input_ids=w[:, :-1]).logits  # (B, T, V)
        hits += (logits.argmax(-1) == w[:, 1:]).flatten().tolist()
        if bar is not None:
            bar.update(len(w))
    return hits


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
        out: Run folder: ``report.json``, ``report.png``, ``base/`` (the pre-trained model and its tokenizer),
            ``resilient/`` (the resilient checkpoint), ``fine-tuned/`` and ``cocktail_report.json`` (the
            callback's α history).
        config: The recipe (:class:`DecoderConfig`; default: the documented run).
        base_path: A ``base/`` folder of an earlier run with the same model settings: skips pre-training (its
            tokenizer is used).
        echo: Where progress lines go.
    """
    cfg = config or DecoderConfig()
    out = Path(out)
    started = time.perf_counter()
    timing: dict[str, float] = {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()

    t = time.perf_counter()
    prose, code = corpus(prose_documents()), corpus(code_documents())
    if base_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_path)
    else:
        tokenizer = char_tokenizer(prose.texts["train"] + code.texts["train"], cfg.min_char_count)
    data = _data(tokenizer, prose, code, cfg)
    timing["data"] = time.perf_counter() - t
    echo(
        "data: real text of the standard library; general = English prose (reference manual topics, docstrings), "
        "target = Python source (docstrings and comments removed); "
        f"{len(tokenizer)} tokens; prose {prose.sizes()['train']:,} / code {code.sizes()['train']:,} training "
        "characters"
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
        with tqdm(total=total, desc=f"scoring {label}", unit="win", leave=False, dynamic_ncols=True) as bar:
            return {k: next_char_hits(m, s, cfg.eval_batch_size, bar) for k, s in sets.items()}

    hits = {"base": score(model, "base")}
    echo_scores(echo, "base", hits["base"], SCORE_NAME)

    t = time.perf_counter()
    trained = _with_lora(model, cfg.lora_rank, cfg.seed) if cfg.lora_rank else model
    callback, policy = fine_tune(
        out,
        cfg,
        general_probe=_examples(data.general_probe),
        target_probe=_examples(data.target_probe),
        desc="fine-tuning (target: Python code" + (f", LoRA r={cfg.lora_rank})" if cfg.lora_rank else ")"),
        model=trained,
        train_dataset=_examples(data.target_train),
        data_collator=LMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    if cfg.lora_rank:
        model = _merged_fine_tune(trained, out / "fine-tuned", tokenizer)
    timing["train"] = time.perf_counter() - t
    alpha = callback.alpha

    t = time.perf_counter()
    resilient = AutoModelForCausalLM.from_pretrained(out / "resilient")  # the written checkpoint itself
    curve = score_mixes(
        model, base_state, resilient, alpha, (cfg.static_alpha, *cfg.curve), score, hits, echo, SCORE_NAME
    )
    timing["score_after"] = time.perf_counter() - t

    final = callback.history[-1] if callback.history else {}
    params = sum(p.numel() for p in model.parameters())
    chars = cfg.test_windows * cfg.context
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
        score_name=SCORE_NAME,
        loss_name="LM loss (next character)",
        metric={
            "target": f"next-character accuracy (greedy, teacher-forced) on {chars:,} characters of held-out "
            "Python source of the standard library",
            "general": f"next-character accuracy (greedy, teacher-forced) on {chars:,} characters of held-out "
            "English prose (reference manual topics and docstrings)",
            "unit": "a character (hits of one window are not independent)",
        },
        model=f"{MODEL_LABEL}, {params / 1e6:.2f}M parameters",
        config=asdict(cfg),
        data={
            "sizes": data.sizes(),
            "source": "standard library of this Python: pydoc_data topics and docstrings (general), module "
            "source without docstrings and comments (target)",
            "title": "stdlib prose → code",
            "synthetic": False,
            "fingerprint": text_fingerprint(prose, code),
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
