"""Probe data and scoring for the Lightning ``CocktailCallback``: examples from files, batches made like the
validation data, the module the probes call and the loss that scores them."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from resilient_tune.errors import UsageError
from resilient_tune.session import Cocktail, ScoreFn

__all__ = [
    "RAW",
    "ProbeModule",
    "Scorer",
    "build_probes",
    "find_tokenizer",
    "from_files",
    "load_examples",
    "probe_batches",
    "transformers_model",
    "val_datasets",
    "validation_batching",
]

RAW = "__resilient_tune_batch__"  # wraps a batch that is not a dict, so that the probes can carry it


def load_examples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Tokenized examples from a ``.json`` list or a ``.jsonl`` file (one object per line); every list becomes a
    tensor, so that ``default_collate`` stacks equal-length examples.

    Raises:
        UsageError: The file is missing, is not JSON, or does not hold example objects.
    """
    file = Path(path).expanduser()
    try:
        text = file.read_text()
        rows = (
            json.loads(text)
            if file.suffix == ".json"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read probe examples from {file}: {exc}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(
            f'{file} must hold example objects such as {{"input_ids": [...], "labels": [...]}}: a JSON list, or '
            "one object per line (.jsonl)"
        )
    return [{k: torch.tensor(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]


def from_files(data: Any) -> Any:
    """Probe data given as file paths (or a dict of them) loaded with :func:`load_examples`."""
    if isinstance(data, (str, os.PathLike)):
        return load_examples(data)
    if isinstance(data, Mapping):
        return {k: load_examples(v) if isinstance(v, (str, os.PathLike)) else v for k, v in data.items()}
    return data


def validation_batching(trainer: Any) -> tuple[Any, int]:
    """The first validation dataloader's ``collate_fn`` and batch size, else ``default_collate`` and 8."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if isinstance(loaders, torch.utils.data.DataLoader):
        return loaders.collate_fn, loaders.batch_size or 8
    return torch.utils.data.default_collate, 8


def probe_batches(data: Any, collate: Any, batch_size: int, name: str) -> list[Any]:
    """The probe batches, once; batches that are not dicts are wrapped in ``{RAW: batch}``."""
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate, shuffle=False)
    try:
        batches = list(loader)
    except Exception as exc:
        raise UsageError(
            f"cannot batch the probe data {name!r}: {exc}; give examples in the validation data's format (batched "
            "with its collate_fn), tensors of equal length, or a ready DataLoader"
        ) from exc
    if not batches:
        raise UsageError(f"the probe data {name!r} gave no batches; pass a few dozen examples")
    return [b if isinstance(b, Mapping) else {RAW: b} for b in batches]


def transformers_model(module: torch.nn.Module, *, language_model: bool = False) -> Any | None:
    """The outermost transformers ``PreTrainedModel`` inside ``module`` (the first in module order), or ``None``.

    With ``language_model``: only one with an output embedding (an LM head returning ``(B, T, V)`` logits).
    transformers is not imported here: a module holding its models has imported it already.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    base = transformers.PreTrainedModel
    for _, sub in module.named_modules():
        if isinstance(sub, base):
            if language_model and sub.get_output_embeddings() is None:
                return None
            return sub
    return None


def find_tokenizer(module: Any, trainer: Any) -> Any | None:
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (module, datamodule):
        tokenizer = getattr(owner, "tokenizer", None)
        if hasattr(tokenizer, "save_pretrained"):
            return tokenizer
    return None


class ProbeModule(torch.nn.Module):
    """What the probes call: the ``LightningModule`` (a child, so that eval mode covers it) and, for the KL probe,
    its transformers language model, fed the batch keys its ``forward`` accepts."""

    def __init__(self, module: torch.nn.Module, lm: torch.nn.Module | None) -> None:
        super().__init__()
        self.module = module
        self.lm = lm
        params = inspect.signature(lm.forward).parameters if lm is not None else {}
        self._any_key = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._keys = set(params)

    def forward(self, **batch: Any) -> Any:
        if self.lm is None:
            raise UsageError("internal: the probe module has no language model to compute logits with")
        return self.lm(**{k: v for k, v in batch.items() if self._any_key or k in self._keys})


class Scorer:
    """``score(view, batch) -> loss``: the user's ``score_fn(pl_module, batch)`` or ``training_step``'s loss, with
    the batch converted and the forward run as the Trainer's precision plugin does for a training step."""

    def __init__(self, module: Any, score_fn: ScoreFn | None, precision: Any = None) -> None:
        self._module = module
        self._score_fn = score_fn
        self._precision = precision

    def __call__(self, view: torch.nn.Module, batch: Mapping[str, Any]) -> Any:
        module = self._module
        raw: Any = dict(batch)
        if RAW in batch:  # not a dict: moved here, the probes move only a dict's tensors
            raw = module.transfer_batch_to_device(batch[RAW], module.device, 0)
        context: Any = contextlib.nullcontext()
        if self._precision is not None:  # e.g. bf16-true: float inputs cast like the training batches
            raw = self._precision.convert_input(raw)
            context = self._precision.forward_context()
        with context:
            if self._score_fn is not None:
                return self._score_fn(module, raw)
            with muted_logging(module):
                output = module.training_step(raw, 0)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, (torch.Tensor, float, int)) or isinstance(loss, bool):
            raise UsageError(
                f"training_step returned {type(output).__name__} on a probe batch, not a loss; return the loss "
                "(or {'loss': loss}), or pass score_fn(pl_module, batch) -> loss to CocktailCallback"
            )
        return loss


@contextlib.contextmanager
def muted_logging(module: Any) -> Iterator[None]:
    """``module.log`` / ``module.log_dict`` do nothing in this block (training_step's logging during probes)."""
    module.log = _ignore
    module.log_dict = _ignore
    try:
        yield
    finally:
        del module.log
        del module.log_dict


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def build_probes(session: Cocktail, trainer: Any, module: Any) -> None:
    """Batch the session's probe sets like the validation data (once) and install them: scored with
    ``training_step``'s loss (or ``score_fn``), with the KL probe when the module holds a transformers LM.

    Raises:
        UsageError: Manual optimization without a ``score_fn`` (``training_step`` would step the optimizer).
    """
    if session.probes_ready:
        return
    target_sets = session.target_sets(val_datasets(trainer))
    if not (session.general_data or target_sets):
        return
    if session.score_fn is None and not module.automatic_optimization:
        raise UsageError(
            "the probes score the module with training_step, which runs the optimizer under manual "
            "optimization; pass score_fn(pl_module, batch) -> loss to CocktailCallback"
        )
    collate, batch_size = validation_batching(trainer)
    general = {n: probe_batches(d, collate, batch_size, n) for n, d in session.general_data.items()}
    target = {n: probe_batches(d, collate, batch_size, n) for n, d in target_sets.items()}
    lm = transformers_model(module, language_model=True)
    dict_batches = all(RAW not in b for batches in general.values() for b in batches)
    view = ProbeModule(module, lm if dict_batches else None)
    scorer = Scorer(module, session.score_fn, getattr(trainer, "precision_plugin", None))
    session.use_probes(
        module, general, target, score_fn=scorer, probe_module=view, with_kl=view.lm is not None
    )


def val_datasets(trainer: Any) -> dict[str, Any]:
    """The datasets of the Trainer's validation dataloaders (``val``, or ``val_<i>`` / ``val_<name>``)."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if isinstance(loaders, torch.utils.data.DataLoader):
        loaders = {"val": loaders}
    elif isinstance(loaders, (list, tuple)):
        loaders = {f"val_{i}": loader for i, loader in enumerate(loaders)}
    elif isinstance(loaders, Mapping):
        loaders = {f"val_{name}": loader for name, loader in loaders.items()}
    else:
        return {}
    return {
        name: loader.dataset
        for name, loader in loaders.items()
        if isinstance(loader, torch.utils.data.DataLoader) and hasattr(loader.dataset, "__len__")
    }
