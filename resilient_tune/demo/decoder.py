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
The pieces (tokenizer, windows, collator, scoring, data sets, model) live in
:mod:`resilient_tune.demo._decoder_parts`; their public names are importable from here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers import logging as hf_logging

from ..errors import UsageError
from ._decoder_parts import (
    LMCollator,
    _data,
    _examples,
    _merged_fine_tune,
    _new_model,
    _pretrain,
    _with_lora,
    char_tokenizer,
    encode,
    next_char_hits,
    next_char_scores,
    windows,
)
from ._scenario import (
    Hits,
    ScenarioConfig,
    Scored,
    echo_scores,
    environment,
    fine_tune,
    finish,
    positive_ints,
    score_mixes,
    score_slerp,
)
from .text import code_documents, corpus, prose_documents, text_fingerprint

__all__ = [
    "DecoderConfig",
    "LMCollator",
    "char_tokenizer",
    "encode",
    "next_char_hits",
    "next_char_scores",
    "run_decoder",
    "windows",
]

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
            scored = {k: next_char_scores(m, s, cfg.eval_batch_size, bar) for k, s in sets.items()}
        return Scored({k: h for k, (h, _) in scored.items()}, {k: loss for k, (_, loss) in scored.items()})

    hits = {"base": score(model, "base")}
    echo_scores(echo, "base", hits["base"], SCORE_NAME)

    def probe_accuracy(candidate: torch.nn.Module) -> float:  # the general probes' score, for a metric budget
        hits = next_char_hits(candidate, data.general_probe, cfg.eval_batch_size)
        return sum(hits) / len(hits)

    t = time.perf_counter()
    trained = _with_lora(model, cfg.lora_rank, cfg.seed) if cfg.lora_rank else model
    callback, policy = fine_tune(
        out,
        cfg,
        probe_metric=probe_accuracy,
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
    slerp_hits = score_slerp(model, base_state, cfg.slerp_curve, score, echo, SCORE_NAME)
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
        slerp_curve=slerp_hits,
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
