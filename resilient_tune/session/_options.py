"""The session's option checks, folder names and metric names (no state here)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..policy import Policy, get_policy

__all__ = [
    "BASE_FOLDER",
    "RESILIENT_FOLDER",
    "TARGET_DEFAULT_EXAMPLES",
    "batch_examples",
    "check_flag",
    "check_probe_options",
    "check_writable",
    "head",
    "make_policy",
    "metrics",
    "probe_metadata",
    "probe_sets",
    "scalars",
    "target_sets",
]

BASE_FOLDER = "resilient_base"  # θ₀ kept on disk for a resume (or with snapshot_on_disk)
RESILIENT_FOLDER = "resilient"  # the resilient twin of a checkpoint, and the run's final one
TARGET_DEFAULT_EXAMPLES = 64  # target examples taken from each eval dataset when target_data is not given


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a :class:`UsageError` (a string such as ``'no'`` would be truthy)."""
    if not isinstance(value, bool):
        raise UsageError(f"{name}={value!r} must be True or False (a bool; a string such as 'no' is truthy)")
    return value


def make_policy(
    policy: str | Policy, alpha: float, drift_budget: float | None, temperature: float | None = None
) -> Policy:
    """The policy object for the ``policy`` / ``alpha`` / ``drift_budget`` / ``temperature`` arguments.

    Raises:
        UsageError: An unknown name, or an option given to a policy that does not use it.
    """
    if not isinstance(policy, str):
        if drift_budget is not None or temperature is not None:
            raise UsageError(
                "drift_budget/temperature cannot be applied to a ready policy object; configure the object instead"
            )
        return get_policy(policy)
    if temperature is not None and policy != "cocktail":
        raise UsageError(f"temperature applies to policy='cocktail' only; got policy={policy!r}")
    if drift_budget is not None and policy != "budget":
        raise UsageError(f"drift_budget applies to policy='budget' only; got policy={policy!r}")
    options: dict[str, dict[str, Any]] = {
        "fixed": {"alpha": alpha},
        "cocktail": {"alpha": alpha, "temperature": 5.0 if temperature is None else temperature},
        "budget": {"drift_budget": 0.05 if drift_budget is None else drift_budget},
    }
    return get_policy(policy, **options.get(policy, {}))


def probe_sets(
    data: Any, label: str, *, loaders: bool = True, mapping_examples: bool = False
) -> dict[str, Any]:
    """Validate probe data at construction: a non-empty dataset of examples, or a dict name -> dataset.

    Args:
        data: ``None``, a dataset (``__len__`` and ``__getitem__``), or a dict of them.
        label: The argument's name, for messages.
        loaders: Also accept a ``torch.utils.data.DataLoader`` (its batches are used as they come).
        mapping_examples: Require each example to be a dict (the Hugging Face ``Trainer``'s collators need it).
    """
    if data is None:
        return {}
    sets = dict(data) if isinstance(data, Mapping) else {label: data}  # a mapping is name -> dataset
    if not sets:
        raise UsageError(f"{label} is an empty dict; pass a dataset or a dict name -> dataset")
    for name, dataset in sets.items():
        where = label if name == label else f"{label}[{name!r}]"
        if loaders and isinstance(dataset, torch.utils.data.DataLoader):
            continue
        if (
            isinstance(dataset, (str, bytes))
            or not hasattr(dataset, "__len__")
            or not hasattr(dataset, "__getitem__")
        ):
            also = ", a DataLoader" if loaders else ""
            raise UsageError(
                f"{where} is a {type(dataset).__name__}; pass a dataset (datasets.Dataset, a torch Dataset{also} or "
                "a list of tokenized example dicts such as {'input_ids': [...], 'labels': [...]})"
            )
        if len(dataset) == 0:
            raise UsageError(f"{where} is empty; pass a few dozen examples")
        first = dataset[0]
        if mapping_examples and not _is_example(first):
            raise UsageError(
                f"{where}[0] is a {type(first).__name__}; each example must be a dict of tokenized fields, e.g. "
                "{'input_ids': [...], 'attention_mask': [...], 'labels': [...]}"
            )
    return sets


def batch_examples(
    data: Any, name: str, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None
) -> list[Any]:
    """The batches of one probe set, made once: a ``DataLoader`` as it comes, else ``batch_size`` examples at a time
    through ``collate_fn`` (``torch.utils.data.default_collate`` by default).

    Raises:
        UsageError: The examples cannot be batched (names the set, the cause and the fix), or give no batch.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
    else:
        collate = collate_fn or torch.utils.data.default_collate
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate, shuffle=False)
    try:
        batches = list(loader)
    except Exception as exc:
        raise UsageError(
            f"cannot batch the probe data {name!r}: {exc}; pass examples of equal length (e.g. tensors), a "
            "collate_fn that pads them (transformers.DataCollatorWithPadding(tokenizer)), or a ready DataLoader"
        ) from exc
    if not batches:
        raise UsageError(f"the probe data {name!r} gave no batches; pass a few dozen examples")
    return batches


def check_probe_options(score_fn: Any, kl_top_k: Any, batch_size: Any, collate_fn: Any) -> None:
    """The session's probe options, checked at construction.

    Raises:
        UsageError: A value of the wrong kind (names the option and what it must be).
    """
    if score_fn is not None and not callable(score_fn):
        raise UsageError(f"score_fn={score_fn!r} must be callable as score_fn(model, batch) -> loss")
    if kl_top_k is not None and (isinstance(kl_top_k, bool) or not isinstance(kl_top_k, int) or kl_top_k < 1):
        raise UsageError(f"kl_top_k={kl_top_k!r} must be a positive int or None (keep every token)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} must be a positive int (examples per probe batch)")
    if collate_fn is not None and not callable(collate_fn):
        raise UsageError(
            f"collate_fn={collate_fn!r} must be callable as collate_fn(list_of_examples) -> batch"
        )


def target_sets(
    policy: Policy, target_data: Mapping[str, Any], default: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``target_data``, or, for a policy that weighs ingredients by their target loss, the first
    :data:`TARGET_DEFAULT_EXAMPLES` examples of each of ``default``'s sets.

    Raises:
        UsageError: The policy needs target examples and there are none.
    """
    if target_data or not getattr(policy, "needs_ingredient_losses", False):
        return dict(target_data)
    if not default:
        raise UsageError(
            f"policy {policy.name!r} weighs the base and the peers by their loss on target examples: pass "
            f"target_data (a few dozen examples of the new task) or eval data (its first "
            f"{TARGET_DEFAULT_EXAMPLES} examples are used)"
        )
    return {name: head(data, TARGET_DEFAULT_EXAMPLES) for name, data in default.items()}


def check_writable(folder: Path) -> None:
    """Check that files can be created in ``folder`` (created if missing), before any work starts.

    Raises:
        UsageError: It cannot be created or written to (names the folder, the cause and the fix).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe_file = tempfile.mkstemp(prefix=".resilient-write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe_file)
    except OSError as exc:
        raise UsageError(
            f"the output folder {folder} is not writable ({type(exc).__name__}: {exc}); CocktailCallback writes the "
            "resilient checkpoints there: fix its permissions or free space, pass a writable output folder, or "
            "set save_resilient=False"
        ) from exc


def head(dataset: Any, n: int) -> Any:
    """The first ``n`` examples of a dataset (``datasets.Dataset``, a list, or any torch dataset)."""
    count = min(n, len(dataset))
    if hasattr(dataset, "select"):
        return dataset.select(range(count))
    if isinstance(dataset, (list, tuple)):
        return dataset[:count]
    return torch.utils.data.Subset(dataset, range(count))


def scalars(entry: Mapping[str, Any]) -> dict[str, float]:
    """The loggable numbers of a history entry (no nested dicts, no step)."""
    return {
        k: float(v)
        for k, v in entry.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def probe_metadata(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A history entry as ``cocktail.json`` records it under ``probes`` (everything but α and the step)."""
    return {k: v for k, v in entry.items() if k not in ("alpha", "step")}


def metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """A history entry's numbers as logged: ``cocktail/<name>`` (``cocktail/alpha``, ``cocktail/general_loss``, ...)."""
    return {f"cocktail/{k}": v for k, v in scalars(entry).items()}


def _is_example(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)
