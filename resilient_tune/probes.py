"""Probes: small scoring passes that measure what a model must not forget.

- :func:`probe_loss`: the mean, over batches, of the model's own loss (``model(**batch).loss``) or of a user
  ``score_fn(model, batch) -> loss`` (e.g. a Trainer's ``compute_loss`` for custom objectives): a scalar, or a
  1-D tensor of per-example losses (the batch's loss is their mean).
- :func:`probe_kl`: ``KL(base ‖ current)`` of the next-token distributions on general tokens (label-free): how
  far the current model's predictions moved from the base's, averaged over the tokens whose attention mask is 1.
- :func:`base_log_probs` collects the base's predictions once, optionally compressed to the ``top_k`` most
  likely tokens per position (:class:`TopKLogProbs`); KL against a compressed base is computed on the coarsened
  distributions (the ``k`` tokens plus one "rest" bucket), a lower bound of the full KL that equals it when the
  rest carries no mass.
- :func:`probe` does both in one forward pass per batch (what the callbacks use).
- :func:`ingredient_losses`: the loss of each ingredient (the base, then each peer, as stored) on target probes,
  swapped into the live model one at a time: the ``Lᵢ`` of LM-Cocktail's auto weights ``softmax(−Lᵢ/τ)``.

Every probe runs under ``torch.no_grad()`` with the model in eval mode (dropout off) and restores each module's
training flag afterwards. Batches are mappings of tensors (what a data collator returns); tensors are moved to
the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

from .errors import UsageError
from .probe_bound import loss_value, sequence_losses

__all__ = [
    "ProbeResult",
    "TopKLogProbs",
    "base_log_probs",
    "ingredient_losses",
    "probe",
    "probe_kl",
    "probe_loss",
    "probe_metric",
]

Batch = Mapping[str, Any]
ScoreFn = Callable[[torch.nn.Module, Batch], Union[torch.Tensor, float]]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class TopKLogProbs:
    """The base's log-probabilities of its ``k`` most likely tokens at every position of one batch.

    Attributes:
        values: ``(B, T, k)`` float32 log-probabilities, on the CPU.
        indices: ``(B, T, k)`` int64 token ids, on the CPU.
    """

    values: torch.Tensor
    indices: torch.Tensor


BaseLogits = Union[torch.Tensor, TopKLogProbs]  # noqa: UP007
"""Per batch: full ``(B, T, V)`` logits (or log-probs) of the base, or a :class:`TopKLogProbs`."""


@dataclass(frozen=True)
class ProbeResult:
    """One probe pass.

    Attributes:
        loss: Mean of the per-batch losses (``None`` when not computed).
        kl: Mean ``KL(base ‖ current)`` per general token, in nats (``None`` when no base was given).
        batches: Number of batches scored.
        units: Per-unit losses in order, when asked for (``with_units``): see :mod:`resilient_tune.probe_bound`.
    """

    loss: float | None
    kl: float | None
    batches: int
    units: tuple[float, ...] | None = None


def probe_loss(model: torch.nn.Module, batches: Iterable[Batch], score_fn: ScoreFn | None = None) -> float:
    """Mean loss of ``model`` over ``batches`` (each batch weighs the same, as LM-Cocktail averages them).

    Args:
        model: The model to score (restored to its training mode afterwards).
        batches: Mappings of tensors; with the default scoring they must make the model return a loss (e.g.
            hold ``labels``).
        score_fn: ``score_fn(model, batch) -> loss`` (a scalar or per-example losses) replacing ``model(**batch).loss``.

    Raises:
        UsageError: No batches, or the model returned no loss.
        NonFiniteError: A batch's loss is NaN/Inf.
    """
    result = probe(model, batches, score_fn=score_fn)
    assert result.loss is not None
    return result.loss


def probe_kl(
    model: torch.nn.Module,
    base: Sequence[BaseLogits] | Callable[[Batch], BaseLogits],
    batches: Iterable[Batch],
) -> float:
    """Mean ``KL(base ‖ current)`` per general token (nats), label-free.

    Args:
        model: The current model; must return ``logits`` of shape ``(B, T, V)``.
        base: The base's predictions for each batch, in order (full logits or :class:`TopKLogProbs`, e.g. from
            :func:`base_log_probs`), or a function ``batch -> base logits``.
        batches: The same batches the base predictions were computed on. Tokens with ``attention_mask == 0`` are
            ignored; without an attention mask every position counts.
    """
    result = probe(model, batches, base=base, with_loss=False)
    assert result.kl is not None
    return result.kl


@torch.no_grad()
def base_log_probs(
    model: torch.nn.Module, batches: Iterable[Batch], top_k: int | None = None
) -> list[BaseLogits]:
    """The predictions of ``model`` (normally the base) for each batch, kept on the CPU for :func:`probe_kl`.

    Args:
        model: The model whose predictions are the reference.
        batches: Batches of tensors.
        top_k: Keep only the ``k`` most likely tokens per position (memory ``B·T·k·12`` bytes per batch instead of
            ``B·T·V·4``); ``None`` keeps the full float32 log-probabilities.
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k={top_k!r} must be a positive int or None (keep every token)")
    out: list[BaseLogits] = []
    with _eval_mode(model):
        for batch in batches:
            logp = F.log_softmax(_logits(model, _to_device(batch, model)).float(), dim=-1)
            if top_k is None or top_k >= logp.shape[-1]:
                out.append(logp.cpu())
            else:
                values, indices = logp.topk(top_k, dim=-1)
                out.append(TopKLogProbs(values.cpu(), indices.cpu()))
    return out


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    score_fn: ScoreFn | None = None,
    base: Sequence[BaseLogits] | Callable[[Batch], BaseLogits] | None = None,
    with_loss: bool = True,
    with_units: bool = False,
) -> ProbeResult:
    """Loss and/or ``KL(base ‖ current)`` in one pass (one forward per batch when both come from the model).

    Args:
        model: The model to score.
        batches: Batches of tensors.
        score_fn: Replaces ``model(**batch).loss`` (then KL, if asked, needs a second forward per batch).
        base: Base predictions per batch, or a function of the batch (see :func:`probe_kl`); ``None``: no KL.
        with_loss: Compute the loss (``False`` for a label-free KL pass).
        with_units: Keep the per-unit losses (:mod:`resilient_tune.probe_bound`) for a confidence bound.
    """
    losses: list[float] = []
    units: list[float] = []
    kl_sum, kl_tokens, count = 0.0, 0, 0
    with _eval_mode(model):
        for index, batch in enumerate(batches):
            count += 1
            on_device = _to_device(batch, model)
            output = None
            if with_loss:
                if score_fn is not None:
                    value, batch_units = loss_value(score_fn(model, on_device), index)
                else:
                    output = model(**on_device)
                    value, batch_units = loss_value(_loss_of(output), index)
                    if with_units:
                        batch_units = sequence_losses(model, output, on_device, value) or batch_units
                losses.append(value)
                units += batch_units
            if base is not None:
                if output is None:
                    output = model(**_forward_inputs(model, on_device))
                reference = base(batch) if callable(base) else _nth(base, index)
                total, tokens = _kl_sum(reference, _logits_of(output), _kl_mask(model, on_device))
                kl_sum += total
                kl_tokens += tokens
    if count == 0:
        raise UsageError("the probe data gave no batches; pass a non-empty dataset (a few dozen examples)")
    if base is not None and not callable(base) and len(base) != count:
        raise UsageError(
            f"got base predictions for {len(base)} batches but {count} batches; pass one per batch"
        )
    loss = sum(losses) / len(losses) if with_loss else None
    kl = (kl_sum / kl_tokens if kl_tokens else 0.0) if base is not None else None
    return ProbeResult(loss, kl, count, tuple(units) if with_units and with_loss else None)


@torch.no_grad()
def probe_metric(model: torch.nn.Module, metric: Callable[[torch.nn.Module], Any]) -> float:
    """``metric(model)`` in eval mode without gradients: a finite real number (a float, an int or a one-element
    tensor), else :class:`UsageError` naming what came back and the fix."""
    with _eval_mode(model):
        value = metric(model)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(
            f"the metric returned {value!r} ({type(value).__name__}); return one number, higher is better "
            "(e.g. recall@1 as a float)"
        )
    if not math.isfinite(value):
        raise UsageError(
            f"the metric returned {value}; return a finite number (check its data: an empty set gives 0/0)"
        )
    return float(value)


def ingredient_losses(
    engine: Any,
    model: torch.nn.Module,
    target: Mapping[str, Sequence[Batch]],
    *,
    score_fn: ScoreFn | None = None,
    scorer: torch.nn.Module | None = None,
) -> list[float]:
    """Loss of every ingredient on the target probes: the base first, then each peer (as stored, unmixed).

    Each ingredient is swapped into the live ``model``'s trainable parameters with
    ``engine.swapped_ingredient(model, i)`` and restored bit-exactly; the loss of an ingredient is the mean over
    the target sets of each set's mean batch loss. Costs ``(1 + engine.num_peers) × len(target)`` probe passes.

    Args:
        engine: A :class:`~resilient_tune.engine.CocktailEngine` (or anything with ``num_peers`` and
            ``swapped_ingredient``) holding the model's base snapshot and peers.
        model: The live model.
        target: Batched target probes, ``name -> batches``.
        score_fn: ``score_fn(module, batch) -> loss`` (default: the module's own loss).
        scorer: The module the probes call (default ``model``; it must share ``model``'s parameters).

    Raises:
        UsageError: ``target`` is empty.
    """
    if not target:
        raise UsageError(
            "auto weights need target examples: pass target_data (a few tokenized examples of the new task)"
        )
    module = model if scorer is None else scorer
    losses = []
    for index in range(1 + engine.num_peers):
        with engine.swapped_ingredient(model, index):
            per_set = [probe(module, batches, score_fn=score_fn).loss for batches in target.values()]
        losses.append(sum(x for x in per_set if x is not None) / len(per_set))
    return losses


# ---------------------------------------------------------------------------- helpers
class _eval_mode:
    """Context manager: every module in eval mode, each module's own training flag restored on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._flags: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> None:
        self._flags = [(m, m.training) for m in self._model.modules()]
        self._model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, flag in self._flags:
            module.training = flag


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Batch, model: torch.nn.Module) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise UsageError(
            f"a probe batch is a {type(batch).__name__}; pass batches as mappings of tensors (what a data collator "
            "returns), e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...}"
        )
    device = _device_of(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_of(output: Any) -> Any:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    if loss is None:
        raise UsageError(
            "the model returned no loss on a probe batch; include 'labels' in the probe data or pass "
            "score_fn(model, batch) -> loss"
        )
    return loss


def _logits_of(output: Any) -> torch.Tensor:
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise UsageError(
            "KL probes need a model that returns logits of shape (batch, tokens, vocab), e.g. a causal or masked "
            "LM; this model returned none"
        )
    return logits


def _logits(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return _logits_of(model(**_forward_inputs(model, batch)))


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """An encoder-decoder LM (T5, BART; or a probe module wrapping one as ``lm``): its logits are over decoder
    positions, which its ``labels`` (or ``decoder_input_ids``) define."""
    for candidate in (model, getattr(model, "lm", None)):
        if bool(getattr(getattr(candidate, "config", None), "is_encoder_decoder", False)):
            return True
    return False


def _forward_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch for a forward that only needs logits: without ``labels`` (no loss to compute), except for an
    encoder-decoder model, whose decoder inputs are built from them."""
    if is_encoder_decoder(model) and "decoder_input_ids" not in batch:
        return dict(batch)
    return {k: v for k, v in batch.items() if k != "labels"}


def _kl_mask(model: torch.nn.Module, batch: Mapping[str, Any]) -> Any:
    """The positions KL is averaged over: the decoder's (``decoder_attention_mask``, else the labelled positions) for
    an encoder-decoder model, the attention mask's for a decoder-only one (every position without one)."""
    if is_encoder_decoder(model):
        if isinstance(batch.get("decoder_attention_mask"), torch.Tensor):
            return batch["decoder_attention_mask"]
        labels = batch.get("labels")
        return labels != -100 if isinstance(labels, torch.Tensor) else None
    return batch.get("attention_mask")


def _nth(base: Sequence[BaseLogits], index: int) -> BaseLogits:
    if index >= len(base):
        raise UsageError(f"got base predictions for {len(base)} batches but more batches; pass one per batch")
    return base[index]


def _kl_sum(reference: BaseLogits, logits: torch.Tensor, mask: Any) -> tuple[float, int]:
    """Sum over (masked) positions of KL(base ‖ current), and the number of positions."""
    logq = F.log_softmax(logits.float(), dim=-1)
    if isinstance(reference, TopKLogProbs):
        logp_k = reference.values.to(logq.device)
        logq_k = logq.gather(-1, reference.indices.to(logq.device))
        p_k = logp_k.exp()
        per_token = (p_k * (logp_k - logq_k)).sum(-1)
        p_rest = (1.0 - p_k.sum(-1)).clamp_min(0.0)
        q_rest = (1.0 - logq_k.exp().sum(-1)).clamp_min(1e-12)
        per_token = per_token + torch.where(
            p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), 0.0
        )
    else:
        logp = F.log_softmax(reference.to(logq.device).float(), dim=-1)
        if logp.shape != logq.shape:
            raise UsageError(
                f"base logits have shape {tuple(logp.shape)} but the model's are {tuple(logq.shape)}"
            )
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    if isinstance(mask, torch.Tensor):
        if tuple(mask.shape) != tuple(per_token.shape):
            raise UsageError(
                f"the KL probe's mask has shape {tuple(mask.shape)} but the logits cover {tuple(per_token.shape)} "
                "positions; an encoder-decoder model needs labels (or decoder_attention_mask) in the probe batches"
            )
        keep = mask.to(per_token.device).bool()
        return float(per_token[keep].sum()), int(keep.sum())
    return float(per_token.sum()), per_token.numel()
