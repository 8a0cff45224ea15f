"""Peer checkpoints: the same architecture fine-tuned on other domains (LM-Cocktail's peers), paired with a model's
trainable parameters by name and read lazily, one tensor at a time, from disk (never a second model instance)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .distributed import global_shape
from .errors import IncompatibleModelsError
from .snapshot import trainable_parameters
from .sources import ModelLike, TensorSource, open_source

__all__ = ["PeerCheckpoints"]


class PeerCheckpoints:
    """Peer checkpoints paired with a model's trainable parameters, read one tensor at a time.

    Each trainable parameter ``name`` (as in ``model.named_parameters()``) is looked up in every peer under the
    names ``model.state_dict()`` gives it (tied parameters have several, e.g. GPT-2's ``transformer.wte.weight``
    and ``lm_head.weight``; ``save_pretrained`` stores one of them), each also with the model's
    ``base_model_prefix`` added or removed (a ``BertModel`` peer for a ``BertForSequenceClassification``
    model and vice versa), and relative to every transformers model nested in the model (a ``LightningModule``'s
    ``self.model``: its parameter ``model.transformer.h.0...`` is found as ``transformer.h.0...`` in a
    ``save_pretrained`` folder). Extra peer keys are ignored; only trainable parameters are mixed with peers.

    Build with :meth:`open`; close with :meth:`close`.

    Attributes:
        names: One label per peer (its path, or ``"peer i"`` for an in-memory state dict).
        fingerprints: One content fingerprint per peer (see :meth:`CheckpointReader.fingerprint`).
    """

    def __init__(self, sources: list[TensorSource], keys: list[dict[str, str]]) -> None:
        """Internal: use :meth:`open`."""
        self._sources = sources
        self._keys = keys
        self.names = [source.name for source in sources]
        self.fingerprints = [source.fingerprint() for source in sources]

    @classmethod
    def open(
        cls, peers: Sequence[ModelLike], model: torch.nn.Module, *, allow_pickle: bool = False
    ) -> PeerCheckpoints:
        """Open ``peers`` (checkpoint folders/files read lazily, or state dicts) and pair them with ``model``.

        Raises:
            CheckpointFormatError: A peer path is missing or not a checkpoint.
            IncompatibleModelsError: A peer lacks a trainable parameter of the model or holds it with another
                shape; the message names the first mismatching key (peers of another architecture).
        """
        params = trainable_parameters(model)
        aliases = _aliases(model)
        roots = _roots(model)
        sources: list[TensorSource] = []
        try:
            for i, peer in enumerate(peers, start=1):
                sources.append(open_source(peer, name=f"peer {i}", allow_pickle=allow_pickle))
            keys = [_pair(source, params, aliases, roots) for source in sources]
            return cls(sources, keys)
        except BaseException:
            for source in sources:
                source.close()
            raise

    def __len__(self) -> int:
        return len(self._sources)

    def get(self, index: int, name: str) -> torch.Tensor:
        """Peer ``index`` (0-based) value of trainable parameter ``name``, as stored (a fresh CPU tensor for a
        checkpoint; do not modify it)."""
        return self._sources[index].get(self._keys[index][name])

    def loader(self, index: int, name: str) -> Callable[[], torch.Tensor]:
        """A zero-argument function reading :meth:`get` when called (for streaming merges)."""
        return lambda: self.get(index, name)

    def identities(self) -> list[dict[str, str]]:
        """``{"name", "fingerprint"}`` per peer, for ``cocktail.json``."""
        return [{"name": n, "fingerprint": f} for n, f in zip(self.names, self.fingerprints)]

    def close(self) -> None:
        """Release the readers. Idempotent."""
        for source in self._sources:
            source.close()

    def __repr__(self) -> str:
        return f"PeerCheckpoints({self.names})"


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every state_dict name holding it`` (tied parameters have several)."""
    out: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        out.setdefault(id(value), []).append(key)
    return out


def _roots(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(path, base_model_prefix)`` of ``model`` itself (path ``""``) and of every transformers model nested in it
    (a submodule with a ``config`` and a string ``base_model_prefix``, e.g. ``self.model`` of a ``LightningModule``),
    outermost first: the roots a peer checkpoint's keys may be relative to."""
    roots = [("", getattr(model, "base_model_prefix", "") or "")]
    for path, module in model.named_modules():
        prefix = getattr(module, "base_model_prefix", None)
        if path and isinstance(prefix, str) and hasattr(module, "config"):
            roots.append((path, prefix))
    return roots


def _candidates(alias: str, roots: Sequence[tuple[str, str]]) -> list[str]:
    """The peer keys that may hold state-dict name ``alias``: the name itself, then relative to each root (with that
    root's ``base_model_prefix`` removed or added: a ``BertModel`` peer for a ``BertForSequenceClassification``)."""
    out = [alias]
    for path, prefix in roots:
        if path and not alias.startswith(path + "."):
            continue
        rest = alias[len(path) + 1 :] if path else alias
        out.append(rest)
        if prefix and rest.startswith(prefix + "."):
            out.append(rest[len(prefix) + 1 :])
        elif prefix:
            out.append(f"{prefix}.{rest}")
    return list(dict.fromkeys(out))


def _pair(
    source: TensorSource,
    params: list[tuple[str, torch.nn.Parameter]],
    aliases: Mapping[int, list[str]],
    roots: Sequence[tuple[str, str]],
) -> dict[str, str]:
    """Parameter name -> the peer's key, checking presence and shape in model order."""
    specs = source.specs()
    keys: dict[str, str] = {}
    for name, p in params:
        tried: list[str] = []
        for alias in dict.fromkeys([name, *aliases.get(id(p), [])]):
            tried.extend(k for k in _candidates(alias, roots) if k not in tried)
        found = next((key for key in tried if key in specs), None)
        if found is None:
            raise IncompatibleModelsError(
                f"{source.name} has no tensor for the trainable parameter {name!r} (looked for {tried}); "
                "peers must be checkpoints of the model's architecture — drop that peer or fine-tune the same model"
            )
        info = specs[found]
        shape = global_shape(p)
        if info.shape != shape or info.dtype.is_floating_point != p.is_floating_point():
            raise IncompatibleModelsError(
                f"{source.name}: {found!r} is {info.dtype} {info.shape} but the model's trainable parameter {name!r} "
                f"is {p.dtype} {shape}; peers must share the model's architecture and size"
            )
        keys[name] = found
    return keys
