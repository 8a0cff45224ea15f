"""The frozen copy θ₀ of a model's trainable parameters, taken before training moves them.

Only parameters with ``requires_grad=True`` are copied: frozen parameters do not move, so the live model holds
their base values all along. Names are those of ``model.named_parameters()`` (tied parameters appear once).

Storage options:

- in memory on ``device`` (``"cpu"`` by default), in the parameters' own dtype or cast to ``bfloat16`` /
  ``float16`` (half the bytes, at the cost of rounding θ₀);
- on disk: a safetensors checkpoint written with :class:`~resilient_tune.checkpoint.StreamingWriter` into a
  folder (atomically) and read back one tensor at a time with
  :class:`~resilient_tune.checkpoint.CheckpointReader` (about zero bytes resident).

:meth:`Snapshot.state` is a JSON-able description (where the snapshot lives and what it holds) from which
:meth:`Snapshot.load` reopens it, e.g. when a training run resumes in a new process.

Peers, the other kind of frozen ingredient, live in :mod:`resilient_tune.peers`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .checkpoint import CheckpointReader, StreamingWriter, TensorInfo, atomic_dir
from .distributed import is_sharded, local_tensor, rank, world_size
from .errors import IncompatibleModelsError, UsageError
from .recipe import normalize_dtype_name

__all__ = ["Snapshot", "trainable_parameters"]

FORMAT = "resilient-tune/snapshot"
_INFO_FILE = "snapshot.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` with ``requires_grad=True``, in registration order.

    Sharded parameters (FSDP2 ``DTensor``, DeepSpeed ZeRO-3) are returned as they are: the snapshot, the swap and
    the merge work on each rank's shard (:func:`resilient_tune.distributed.local_tensor`).

    Raises:
        NotImplementedError: The model is a PEFT model (use :class:`~resilient_tune.engine.LoraEngine`).
    """
    if hasattr(model, "peft_config"):
        raise NotImplementedError(
            "PEFT models need no snapshot: with LoRA θ₀ + α·Δ is the adapter scaled by α. Use "
            "resilient_tune.engine.LoraEngine (CocktailCallback picks it for PEFT models by itself)"
        )
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Snapshot:
    """θ₀: a frozen copy of the trainable parameters, in memory or on disk.

    Build one with :meth:`take` (from a live model) or :meth:`load` (from :meth:`state`).

    Of a sharded model (FSDP2 ``DTensor`` or ZeRO-3 parameters) it holds this rank's shards only: names are the
    parameters', shapes the local shards' (merging is elementwise, so every rank merges its own part).

    Attributes:
        folder: Where the on-disk copy lives (the storage itself when ``storage == "disk"``, or a persisted copy
            of an in-memory snapshot, see :meth:`persist`); ``None`` if there is none.
        shard: ``{"rank": r, "world_size": n}`` when the snapshot holds rank ``r``'s shards, else ``None``.
    """

    def __init__(
        self,
        specs: Mapping[str, TensorInfo],
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        reader: CheckpointReader | None = None,
        folder: Path | None = None,
        source_dtypes: Mapping[str, torch.dtype] | None = None,
        shard: Mapping[str, int] | None = None,
    ) -> None:
        """Internal: use :meth:`take` or :meth:`load`."""
        if (tensors is None) == (reader is None):
            raise UsageError(
                "a Snapshot holds either in-memory tensors or a reader; build it with take() or load()"
            )
        self._specs = dict(specs)
        self._tensors = tensors
        self._reader = reader
        self.folder = folder
        self._source_dtypes = dict(source_dtypes or {k: v.dtype for k, v in self._specs.items()})
        self.shard = (
            None if shard is None else dict(shard)
        )  # {"rank", "world_size"} of a sharded model's shard

    # ---------------------------------------------------------------- construction
    @classmethod
    @torch.no_grad()
    def take(
        cls,
        model: torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        folder: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> Snapshot:
        """Copy the trainable parameters of ``model`` (θ₀).

        Args:
            model: The live model, before its first optimizer step.
            device: Where an in-memory snapshot lives (ignored with ``folder``).
            dtype: Storage dtype of floating parameters: ``None`` (same as the parameter), ``"bfloat16"`` /
                ``"bf16"``, ``"float16"`` / ``"fp16"`` or ``"float32"``. Non-floating parameters keep theirs.
            folder: Store on disk in this folder (a safetensors checkpoint, written atomically) instead of in
                memory; reading it back costs one tensor at a time.
            overwrite: Replace an existing ``folder``.

        Raises:
            UsageError: No trainable parameters, a bad dtype, or ``folder`` exists without ``overwrite``.
            NotImplementedError: A PEFT model (use LoraEngine).
        """
        params = trainable_parameters(model)
        if not params:
            raise UsageError(
                "the model has no trainable parameters (requires_grad=True); there is nothing to snapshot"
            )
        target = _storage_dtype(dtype)
        local = [(name, local_tensor(p)) for name, p in params]  # a rank's shard of a sharded parameter
        source_dtypes = {name: t.dtype for name, t in local}
        specs = {name: TensorInfo(_cast_dtype(t.dtype, target), tuple(t.shape)) for name, t in local}
        shard = _shard_of(params)
        if folder is not None:
            stored = _write_folder(Path(folder), specs, source_dtypes, iter(local), overwrite)
            return cls(
                specs,
                reader=CheckpointReader(stored),
                folder=stored,
                source_dtypes=source_dtypes,
                shard=shard,
            )
        dev = torch.device(device)
        tensors = {
            name: t.detach().to(device=dev, dtype=specs[name].dtype, copy=True).contiguous()
            for name, t in local
        }
        return cls(specs, tensors=tensors, source_dtypes=source_dtypes, shard=shard)

    @classmethod
    def load(cls, state: Mapping[str, Any], *, device: str | torch.device | None = None) -> Snapshot:
        """Reopen a snapshot from :meth:`state` (e.g. after a resume in a new process).

        Args:
            state: The dict :meth:`state` returned.
            device: Read the whole snapshot into memory on this device; ``None`` keeps it on disk (lazy).

        Raises:
            UsageError: ``state`` is malformed, or describes an in-memory snapshot that was never persisted.
            CheckpointFormatError: The folder is missing or its files are damaged.
            IncompatibleModelsError: The folder does not hold what ``state`` says (names or fingerprint differ).
        """
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise UsageError(f"not a snapshot state (expected format {FORMAT!r}): {str(state)[:200]}")
        folder = state.get("folder")
        if folder is None:
            raise UsageError(
                "this snapshot was held in memory and never persisted, so it cannot be reopened; "
                "call Snapshot.persist(folder) before saving its state"
            )
        shard = state.get("shard")
        if shard is not None and shard != {"rank": rank(), "world_size": world_size()}:
            raise UsageError(
                f"snapshot folder {folder} holds the shards of rank {shard.get('rank')} of {shard.get('world_size')}, "
                f"not this process's (rank {rank()} of {world_size()}); a sharded run's base cannot be reloaded "
                "by another rank: resume without CocktailCallback, or restart the run"
            )
        reader = CheckpointReader(folder)
        try:
            names = list(state["names"])
            if reader.keys() != names:
                missing = next((n for n in names if n not in reader), None)
                raise IncompatibleModelsError(
                    f"snapshot folder {folder} does not hold the tensors its state lists "
                    f"(first missing: {missing!r}); it was replaced or damaged"
                )
            fingerprint = state.get("fingerprint")
            if fingerprint is not None and reader.fingerprint() != fingerprint:
                raise IncompatibleModelsError(
                    f"snapshot folder {folder} changed since its state was saved (fingerprint differs); "
                    "restore the original folder or start the run again"
                )
        except BaseException:
            reader.close()
            raise
        specs = reader.specs()
        source = {n: _DTYPES.get(d, specs[n].dtype) for n, d in (state.get("source_dtypes") or {}).items()}
        snap = cls(specs, reader=reader, folder=Path(folder), source_dtypes=source or None, shard=shard)
        if device is not None:
            snap = snap.to_memory(device)
        return snap

    def to_memory(self, device: str | torch.device = "cpu") -> Snapshot:
        """An in-memory copy on ``device`` (the on-disk folder, if any, is remembered as its persisted copy)."""
        dev = torch.device(device)
        tensors = {name: self.get(name).to(dev) for name in self._specs}
        return Snapshot(
            self._specs,
            tensors=tensors,
            folder=self.folder,
            source_dtypes=self._source_dtypes,
            shard=self.shard,
        )

    def persist(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write an in-memory snapshot to ``folder`` (atomically) so that :meth:`state` can be reloaded later.

        Returns:
            The folder. A disk snapshot is already persisted: its own folder is returned (``folder`` must be it or
            ``overwrite`` must allow replacing another path with a copy).
        """
        dest = Path(os.path.abspath(folder))
        if self.folder is not None and dest == Path(os.path.abspath(self.folder)):
            return self.folder
        stored = _write_folder(dest, self._specs, self._source_dtypes, self.items(), overwrite)
        if self._tensors is not None:
            self.folder = stored
        return stored

    # ---------------------------------------------------------------- access
    @property
    def storage(self) -> str:
        """``"memory"`` or ``"disk"``."""
        return "memory" if self._tensors is not None else "disk"

    @property
    def names(self) -> list[str]:
        """Parameter names, in ``model.named_parameters()`` order."""
        return list(self._specs)

    def specs(self) -> dict[str, TensorInfo]:
        """Stored dtype and shape of every tensor."""
        return dict(self._specs)

    def source_dtype(self, name: str) -> torch.dtype:
        """The dtype the parameter had when the snapshot was taken (merges are written back in it)."""
        return self._source_dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        """θ₀ of parameter ``name`` in the storage dtype (memory: the stored tensor itself, do not modify it;
        disk: a fresh CPU tensor)."""
        if name not in self._specs:
            raise UsageError(f"no parameter {name!r} in the snapshot ({len(self._specs)} parameters)")
        if self._tensors is not None:
            return self._tensors[name]
        assert self._reader is not None
        return self._reader.get(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, θ₀)`` one at a time (disk snapshots read each tensor when its turn comes)."""
        for name in self._specs:
            yield name, self.get(name)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (RAM or device) by the snapshot: 0 for an on-disk snapshot."""
        if self._tensors is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data the snapshot stores, wherever it lives."""
        return sum(info.nbytes for info in self._specs.values())

    def check(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """Pair the model's trainable parameters with the snapshot, by name.

        Returns:
            ``trainable_parameters(model)``.

        A parameter with rows appended since the snapshot (an embedding or output head resized for new tokens, on
        one process) matches: the merge takes the appended rows from the live model.

        Raises:
            IncompatibleModelsError: The names or shapes differ (the message names the first difference).
        """
        params = trainable_parameters(model)
        names = [name for name, _ in params]
        for name in names:
            if name not in self._specs:
                raise IncompatibleModelsError(
                    f"trainable parameter {name!r} is not in the base snapshot; the set of trainable parameters "
                    "changed since the snapshot was taken (freeze/unfreeze after train begin is not supported)"
                )
        for name in self._specs:
            if name not in names:
                raise IncompatibleModelsError(
                    f"the base snapshot holds {name!r}, which is not a trainable parameter of the model; "
                    "the set of trainable parameters changed since the snapshot was taken"
                )
        for name, p in params:
            shape = tuple(local_tensor(p).shape)  # a rank's shard of a sharded parameter
            if shape != self._specs[name].shape and not _grown(shape, self._specs[name].shape, p):
                raise IncompatibleModelsError(
                    f"parameter {name!r} has shape {shape} but {self._specs[name].shape} in the base "
                    "snapshot; the model is not the one the snapshot was taken from"
                )
        return params

    # ---------------------------------------------------------------- resume
    def state(self) -> dict[str, Any]:
        """A JSON-able description for :meth:`load`: storage, folder, names, dtypes, fingerprint, sizes."""
        fingerprint = None
        if self.folder is not None:
            with CheckpointReader(self.folder) as reader:
                fingerprint = reader.fingerprint()
        return {
            "format": FORMAT,
            "storage": self.storage,
            "folder": None if self.folder is None else str(self.folder),
            "names": self.names,
            "dtype": _dtype_name(next(iter(self._specs.values())).dtype) if self._specs else None,
            "source_dtypes": {n: _dtype_name(d) for n, d in self._source_dtypes.items()},
            "stored_bytes": self.stored_bytes,
            "fingerprint": fingerprint,
            "shard": self.shard,
        }

    def close(self) -> None:
        """Release the on-disk reader (if any) and the in-memory tensors. Idempotent."""
        if self._reader is not None:
            self._reader.close()
        if self._tensors is not None:
            self._tensors = {}

    def __repr__(self) -> str:
        where = f"folder={str(self.folder)!r}" if self.storage == "disk" else f"nbytes={self.nbytes}"
        return f"Snapshot({len(self._specs)} parameters, storage={self.storage!r}, {where})"


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    name = normalize_dtype_name(dtype)
    return None if name is None else _DTYPES[name]


def _cast_dtype(source: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and source.is_floating_point else source


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_folder(
    folder: Path,
    specs: Mapping[str, TensorInfo],
    source_dtypes: Mapping[str, torch.dtype],
    tensors: Iterator[tuple[str, torch.Tensor]] | Any,
    overwrite: bool,
) -> Path:
    """Write the snapshot atomically: ``model.safetensors`` (or shards) plus ``snapshot.json``."""
    info = {
        "format": FORMAT,
        "created_by": f"resilient-tune {__version__}",
        "source_dtypes": {n: _dtype_name(d) for n, d in source_dtypes.items()},
    }
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with StreamingWriter(
            tmp, specs, metadata={"resilient_tune": __version__, "content": "base snapshot"}
        ) as w:
            for name, tensor in tensors:
                w.write(name, tensor.detach().to(dtype=specs[name].dtype))
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return Path(os.path.abspath(folder))


def _grown(now: tuple[int, ...], then: tuple[int, ...], p: torch.Tensor) -> bool:
    """``now`` is ``then`` with rows appended (dimension 0 larger, the others equal), on an unsharded parameter."""
    return (
        bool(now) and len(now) == len(then) and now[0] > then[0] and now[1:] == then[1:] and not is_sharded(p)
    )


def _shard_of(params: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, int] | None:
    """``{"rank", "world_size"}`` when some parameter is sharded (the snapshot then holds this rank's shards)."""
    if any(is_sharded(p) for _, p in params):
        return {"rank": rank(), "world_size": world_size()}
    return None
