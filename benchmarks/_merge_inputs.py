"""The merge-speed benchmark's inputs: seeded GPT-2-shaped checkpoints of a chosen size, built once in a child
process (torch and transformers never load into the measuring process) and cached by a hash of their config."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import drop_tree

MODEL_NAMES = ("model_a", "model_b", "model_c")
BUILD_VERSION = 1  # bump when the way checkpoints are built changes: invalidates the cache


@dataclass(frozen=True)
class Size:
    """A checkpoint size: GPT2Config overrides and what it is meant to resemble."""

    name: str
    config: dict
    note: str


SIZES = {
    s.name: s
    for s in (
        Size(
            "tiny",
            {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 1000},
            "smoke-test size (~0.2M params): measures start-up, not merging",
        ),
        Size(
            "gpt2-small",
            {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 30522},
            "GPT-2-small body with a 30522-token vocabulary: 109.3M params, 417 MiB fp32 per file, "
            "largest tensor the 94 MB embedding (the reference anchor's model)",
        ),
        Size(
            "gpt2-medium",
            {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
            "GPT-2-medium exactly: 354.8M params, 1353 MiB fp32 per file, largest tensor the 206 MB embedding",
        ),
    )
}


def _config_hash(size: Size) -> str:
    blob = json.dumps(
        {"config": size.config, "version": BUILD_VERSION, "models": MODEL_NAMES}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _build_checkpoints(size_config: dict, folder: str) -> dict:
    """Child process: write the three seeded checkpoints (safetensors, config, tokenizer) into ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # A character-level tokenizer: LM_Cocktail and mergekit copy the tokenizer, so one must exist.
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    config = GPT2Config(**size_config, bos_token_id=0, eos_token_id=0)
    info: dict = {}
    for seed, name in enumerate(MODEL_NAMES):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
        model.save_pretrained(Path(folder) / name)
        tokenizer.save_pretrained(Path(folder) / name)
        if not info:
            state = model.state_dict()
            info["params"] = sum(p.numel() for p in model.parameters())
            info["largest_tensor_bytes"] = max(t.numel() * t.element_size() for t in state.values())
        del model
    files = sorted(Path(folder).glob(f"{MODEL_NAMES[0]}/*.safetensors"))
    info["file_bytes"] = sum(f.stat().st_size for f in files)
    info["tied_lm_head"] = bool(config.tie_word_embeddings)
    return info


def _in_child(fn: Callable, *args: object) -> object:
    """Run ``fn(*args)`` in a fresh (spawned) process, so torch never loads into this one."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def prepare_inputs(size: Size, cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    """Return the folder holding the three checkpoints of ``size`` (built unless cached) and their facts."""
    root = cache_dir / f"{size.name}-{_config_hash(size)}"
    marker = root / "bench_config.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if all((root / m / "model.safetensors").is_file() for m in MODEL_NAMES):
            log(f"reusing cached checkpoints in {root}")
            return root, info
    log(f"building three {size.name} checkpoints in {root} (once; cached by config hash)")
    drop_tree(root)
    staging = Path(tempfile.mkdtemp(prefix=f".{size.name}-", dir=cache_dir))
    try:
        info = _in_child(_build_checkpoints, size.config, str(staging))
        info = {"size": size.name, "config": size.config, "hash": _config_hash(size), **info}
        (staging / "bench_config.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            staging.rename(root)  # the cache entry appears whole or not at all
        except OSError:
            if not marker.is_file():  # not a concurrent run that built the same entry first
                raise
            info = json.loads(marker.read_text())
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root, info
