"""Sharded Lightning runs over 2 processes: FSDP2 (``ModelParallelStrategy`` + ``fully_shard`` in ``configure_model``,
on the CPU over gloo) or DeepSpeed ZeRO-3 (``--deepspeed``, 2 CUDA devices).

    python lit_sharded.py ROOT [--alpha 0.3] [--policy budget] [--max-steps 8] [--resume CKPT] [--seed 7]
                               [--fail-write] [--deepspeed]

The tiny GPT-2 of ``lit_app.py`` with each transformer block and the whole model sharded over 2 ranks. Checkpoints
every 2 steps (all kept; full state dicts under FSDP2, DeepSpeed's folders under ZeRO-3) in ``ROOT/ckpts``. θ₀ is saved by ``TinyLM.setup`` (before sharding);
the final weights are gathered to rank 0 and saved as ``final.safetensors``. Each rank writes
``ROOT/summary-rank<r>.json`` (α history, parameter classes) or, when the run fails, ``ROOT/rank<r>.error``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lit_app import FINAL, TinyLM, TokenData, tokens
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import resilient_tune.engine._full_write as engine_module  # where the full-weight engine looks its writer up
from resilient_tune.distributed import close_process_group, full_state_dict
from resilient_tune.integrations.lightning import CocktailCallback


class ShardedLM(TinyLM):
    """``TinyLM`` sharded with FSDP2 over the data-parallel mesh (DeepSpeed partitions it itself)."""

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def on_fit_end(self) -> None:  # every rank takes part in the gather
        state = full_state_dict(self)
        if self.trainer.is_global_zero:
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(Path(self.trainer.default_root_dir) / FINAL),
            )


def fail_writes() -> None:
    """Every resilient folder write raises the ``OSError`` of a full disk (on rank 0, which writes)."""

    def write_model_folder(*args, **kwargs):
        raise OSError(28, "No space left on device (injected by lit_sharded.py --fail-write)")

    engine_module.write_model_folder = write_model_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--policy", default="fixed")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--resume", default=None)
    parser.add_argument(
        "--seed", type=int, default=0, help="initialisation seed (a resume must not take it as θ₀)"
    )
    parser.add_argument("--fail-write", action="store_true")
    parser.add_argument(
        "--strict", action="store_true", help="CocktailCallback(strict=True): a failed save stops"
    )
    parser.add_argument(
        "--deepspeed", action="store_true", help="DeepSpeed ZeRO-3 on 2 GPUs instead of FSDP2"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    general = tokens(16, 2, False) if args.policy == "budget" else None
    callback = CocktailCallback(
        alpha=args.alpha, policy=args.policy, general_data=general, strict=args.strict
    )
    if args.fail_write:
        fail_writes()
    every = ModelCheckpoint(dirpath=args.root / "ckpts", every_n_train_steps=2, save_top_k=-1)
    if args.deepspeed:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        distributed = {"accelerator": "gpu", "devices": 2, "strategy": DeepSpeedStrategy(stage=3)}
    else:
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
        distributed = {"accelerator": "cpu", "devices": 2, "strategy": strategy}
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
    try:
        trainer.fit(ShardedLM(seed=args.seed), datamodule=TokenData(), ckpt_path=args.resume)
    except BaseException as exc:  # each rank records how it ended (the tests read it)
        (args.root / f"rank{trainer.global_rank}.error").write_text(f"{type(exc).__name__}: {exc}\n")
        raise
    summary = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "save_failures": [f["path"] for f in callback.save_failures],
        "history": [
            {"step": h["step"], "alpha": h["alpha"], "passes": h.get("passes")} for h in callback.history
        ],
        "sharded": sorted({type(p).__name__ for p in trainer.lightning_module.parameters()}),
    }
    (args.root / f"summary-rank{trainer.global_rank}.json").write_text(json.dumps(summary))
    close_process_group(exit_code=0)  # past the teardown where an FSDP2 gloo group can abort


if __name__ == "__main__":
    main()
