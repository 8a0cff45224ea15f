"""Programmatic use: ``Trainer(callbacks=[CocktailCallback(...)])`` on the tiny LM of ``lit_app.py``.

    python lit_train.py ROOT [--alpha 0.3] [--policy budget] [--max-steps 8] [--ddp] [--seed-per-rank]
                             [--resume CKPT] [--seed 0] [--fail-write]

Checkpoints every 2 steps (all kept) in ``ROOT/ckpts``. ``--ddp``: 2 processes on the CPU
(``strategy="ddp", accelerator="cpu", devices=2``). Each process prints one JSON line: its rank, the α history and
how many resilient folders it wrote (only global rank 0 may write). ``--fail-write`` makes the resilient writes
fail (an injected ``OSError``); each rank then records the error it ended with in ``ROOT/rank<r>.error``, and writes it to ``ROOT/summary-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_app import TinyLM, TokenData, tokens

import resilient_tune.engine._full_write as engine_module  # where the full-weight engine looks its writer up
from resilient_tune.distributed import close_process_group
from resilient_tune.integrations.lightning import CocktailCallback


def count_writes(fail: bool) -> dict[str, int]:
    """Count the resilient folders this process writes (the engine's folder writer); with ``fail`` each write
    raises the ``OSError`` of a full disk instead."""
    calls = {"writes": 0}
    original = engine_module.write_model_folder

    def write_model_folder(*args, **kwargs):
        calls["writes"] += 1
        if fail:
            raise OSError(28, "No space left on device (injected by lit_train.py --fail-write)")
        return original(*args, **kwargs)

    engine_module.write_model_folder = write_model_folder
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--policy", default="fixed")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-per-rank", action="store_true")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--fail-write", action="store_true")
    parser.add_argument(
        "--snapshot-on-disk", action="store_true", help="CocktailCallback(snapshot_on_disk=True)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="CocktailCallback(strict=True): a failed save stops"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    general = tokens(16, 2, False) if args.policy == "budget" else None
    calls = count_writes(args.fail_write)
    callback = CocktailCallback(
        alpha=args.alpha,
        policy=args.policy,
        general_data=general,
        strict=args.strict,
        snapshot_on_disk=args.snapshot_on_disk,
    )
    every = ModelCheckpoint(dirpath=args.root / "ckpts", every_n_train_steps=2, save_top_k=-1)
    distributed = (
        {"strategy": "ddp", "accelerator": "cpu", "devices": 2} if args.ddp else {"accelerator": "cpu"}
    )
    trainer = L.Trainer(
        default_root_dir=str(args.root),
        max_steps=args.max_steps,
        val_check_interval=2,
        callbacks=[callback, every],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **distributed,
    )
    module = TinyLM(seed=args.seed, seed_per_rank=args.seed_per_rank)
    try:
        trainer.fit(module, datamodule=TokenData(), ckpt_path=args.resume)
    except BaseException as exc:  # each rank records how it ended (the tests read it)
        (args.root / f"rank{trainer.global_rank}.error").write_text(f"{type(exc).__name__}: {exc}\n")
        raise
    summary = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "writes": calls["writes"],
        "save_failures": [f["path"] for f in callback.save_failures],
        "history": [{"step": h["step"], "alpha": h["alpha"]} for h in callback.history],
        "snapshot_bytes": callback.engine.snapshot.nbytes,
    }
    # one file per rank: the ranks' stdout lines may interleave under load
    (args.root / f"summary-rank{trainer.global_rank}.json").write_text(json.dumps(summary))
    print("SUMMARY " + json.dumps(summary), flush=True)
    close_process_group(exit_code=0)  # past gloo's teardown abort: see close_process_group


if __name__ == "__main__":
    main()
