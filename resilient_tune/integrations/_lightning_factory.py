"""Zero-code switch: Lightning's ``callbacks_factory`` entry points add ``CocktailCallback`` when
``RESILIENT_TUNE=1``.

resilient-tune registers :func:`lightning_callbacks` in the entry-point group
``lightning.pytorch.callbacks_factory`` and :func:`pytorch_lightning_callbacks` in
``pytorch_lightning.callbacks_factory``; every ``Trainer`` calls them when it is built. They return ``[]`` (and
import nothing heavy) unless the environment variable ``RESILIENT_TUNE`` is ``1`` (or ``true``/``yes``/``on``).
Options come from ``RESILIENT_TUNE_<ARGUMENT>`` variables, e.g.::

    RESILIENT_TUNE=1 RESILIENT_TUNE_ALPHA=0.3 python train.py
    RESILIENT_TUNE=1 RESILIENT_TUNE_POLICY=budget RESILIENT_TUNE_GENERAL_DATA=general.jsonl python train.py

With the switch on, an unknown ``RESILIENT_TUNE_*`` variable is an error that lists the valid ones (a typo must not
silently fall back to a default); with it off nothing happens (a warning when options are set without the switch).
A ``CocktailCallback`` passed to the Trainer explicitly wins over the environment's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from resilient_tune.errors import UsageError

__all__ = ["ENV_OPTIONS", "SWITCH", "lightning_callbacks", "options_from_env", "pytorch_lightning_callbacks"]

logger = logging.getLogger(__name__)

SWITCH = "RESILIENT_TUNE"
_PREFIX = SWITCH + "_"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def _number(text: str) -> float:
    return float(text)


def _integer(text: str) -> int:
    return int(text)


def _optional_integer(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "all") else int(text)


def _optional_text(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none") else text.strip()


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"expected one of {', '.join(_ON + _OFF[1:])}")


def _size(text: str) -> int | str:
    return int(text) if text.strip().isdigit() else text.strip()


def _method_options(text: str) -> dict[str, float]:
    """``density=0.5,lambda=1.0`` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return {str(k): float(v) for k, v in value.items()}
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not key=value")
        options[key.strip()] = float(value)
    return options


def _paths(text: str) -> list[str]:
    """Peer checkpoints: paths separated by ``os.pathsep`` (``:`` on POSIX) or commas; each must exist."""
    parts = [p.strip() for chunk in text.split(os.pathsep) for p in chunk.split(",") if p.strip()]
    if not parts:
        raise ValueError("no path given")
    missing = [p for p in parts if not Path(p).expanduser().exists()]
    if missing:
        raise ValueError(f"no such path {missing[0]}")
    return [str(Path(p).expanduser()) for p in parts]


def _file(text: str) -> str:
    path = Path(text.strip()).expanduser()
    if not path.is_file():
        raise ValueError(f"no file {path}")
    return str(path)


# variable -> (CocktailCallback argument, parser, what to write)
ENV_OPTIONS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    f"{_PREFIX}ALPHA": ("alpha", _number, "a number in [0, 1]"),
    f"{_PREFIX}POLICY": ("policy", str.strip, "fixed | cocktail | budget"),
    f"{_PREFIX}DRIFT_BUDGET": ("drift_budget", _number, "a number >= 0, e.g. 0.05"),
    f"{_PREFIX}PEERS": ("peers", _paths, "peer checkpoint paths separated by ':' or ','"),
    f"{_PREFIX}TEMPERATURE": ("temperature", _number, "a number > 0, e.g. 5.0 (policy cocktail)"),
    f"{_PREFIX}GENERAL_DATA": ("general_data", _file, "a .json/.jsonl file of tokenized examples"),
    f"{_PREFIX}TARGET_DATA": ("target_data", _file, "a .json/.jsonl file of tokenized examples"),
    f"{_PREFIX}METHOD": ("method", str.strip, "a merge method name, e.g. linear"),
    f"{_PREFIX}METHOD_OPTIONS": ("method_options", _method_options, "key=value,... or a JSON object"),
    f"{_PREFIX}SNAPSHOT_DEVICE": ("snapshot_device", str.strip, "cpu, cuda, ..."),
    f"{_PREFIX}SNAPSHOT_DTYPE": ("snapshot_dtype", _optional_text, "bf16 | fp16 | none"),
    f"{_PREFIX}SNAPSHOT_ON_DISK": ("snapshot_on_disk", _flag, "1 | 0"),
    f"{_PREFIX}SAVE_RESILIENT": ("save_resilient", _flag, "1 | 0"),
    f"{_PREFIX}KL_TOP_K": ("kl_top_k", _optional_integer, "an int >= 1 or none"),
    f"{_PREFIX}MAX_SHARD_SIZE": ("max_shard_size", _size, "bytes or e.g. 5GB"),
    f"{_PREFIX}SEED": ("seed", _integer, "an int"),
}


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The ``CocktailCallback`` arguments the environment asks for, or ``None`` when the switch is off.

    Raises:
        UsageError: ``RESILIENT_TUNE`` has an unclear value, a ``RESILIENT_TUNE_*`` variable is unknown (the message
            lists the valid ones), or a value does not parse.
    """
    env = os.environ if environ is None else environ
    switch = env.get(SWITCH, "").strip().lower()
    if switch not in _ON + _OFF:
        raise UsageError(
            f"{SWITCH}={env[SWITCH]!r}: set it to 1 to add CocktailCallback to every Lightning Trainer, or 0 / unset"
        )
    names = sorted(k for k in env if k.startswith(_PREFIX))
    if switch in _OFF:
        if names:
            logger.warning("%s is set but %s is not 1: CocktailCallback is not added", names[0], SWITCH)
        return None
    unknown = [k for k in names if k not in ENV_OPTIONS]
    if unknown:
        raise UsageError(
            f"unknown environment variable {unknown[0]}; the valid {_PREFIX}* variables are: "
            + ", ".join(ENV_OPTIONS)
            + f" (and {SWITCH}=1 to switch the callback on)"
        )
    options = {}
    for name in names:
        argument, parse, expected = ENV_OPTIONS[name]
        try:
            options[argument] = parse(env[name])
        except (ValueError, OSError) as exc:
            raise UsageError(f"{name}={env[name]!r} is not valid ({exc}); expected {expected}") from None
    return options


def _callbacks(module: str) -> list[Any]:
    options = options_from_env()
    if options is None:
        return []
    from importlib import import_module

    callback = import_module(module).CocktailCallback(**options)
    callback.from_env = True
    return [callback]


def lightning_callbacks() -> list[Any]:
    """Entry point of ``lightning.pytorch.callbacks_factory``: ``[CocktailCallback(...)]`` or ``[]``."""
    return _callbacks("resilient_tune.integrations.lightning")


def pytorch_lightning_callbacks() -> list[Any]:
    """Entry point of ``pytorch_lightning.callbacks_factory``: ``[CocktailCallback(...)]`` or ``[]``."""
    return _callbacks("resilient_tune.integrations.pytorch_lightning")
