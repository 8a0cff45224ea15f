"""A tiny transformers ``Trainer`` fine-tune with ``CocktailCallback``, for one process or ``torchrun``.

    torchrun --standalone --nproc_per_node 2 hf_train.py OUT [--alpha 0.3] [--policy budget] [--drift-budget 0.01] [--fail-write]
             [--max-steps 4] [--zero3] [--snapshot-on-disk] [--resume CHECKPOINT]

The model is a 2-layer GPT-2 built from a config (offline); the task is one repeated token pattern, the general
probes random tokens. Rank 0 saves θ₀ to ``OUT/theta0.safetensors`` before training and the final weights to
``OUT/final.safetensors``. Every rank prints one line ``SUMMARY {json}`` and writes it to ``OUT/summary-rank<r>.json``: its rank, the world size, the α history
and how many resilient folders it wrote. ``--fail-write`` makes rank 0's folder writes fail (an injected
``OSError``, as a full disk would); every rank then records the error it ended with in ``OUT/rank<r>.error``.
``--zero3`` trains with DeepSpeed ZeRO-3 on the GPUs (needs CUDA and deepspeed): parameters are partitioned, the
callback snapshots and merges each rank's partition and gathers only to write. (FSDP2 is not exercised here: on
the CPU accelerate ignores the Trainer's ``fsdp`` options and runs plain DDP; see ``fsdp2_train.py`` for FSDP2.)
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from _e2e import arguments, count_calls, examples, model
from safetensors.torch import save_file

from resilient_tune import distributed
from resilient_tune.integrations.transformers import CocktailCallback


def save_state(module: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path))


def main() -> None:
    parser = arguments("A tiny transformers Trainer fine-tune with CocktailCallback")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--zero3", action="store_true")
    parser.add_argument(
        "--snapshot-on-disk", action="store_true", help="CocktailCallback(snapshot_on_disk=True)"
    )
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    calls: dict[str, int] = {}
    count_calls(calls, "write_model_folder", fail=args.fail_write)
    general = examples(16, 2, False) if args.policy == "budget" else None
    callback = CocktailCallback(
        args.alpha,
        policy=args.policy,
        general_data=general,
        drift_budget=args.drift_budget,
        strict=args.strict,
        snapshot_on_disk=args.snapshot_on_disk,
    )
    net = model()
    if rank == 0 and args.resume is None:  # a resumed run's initial weights are not its base
        args.out.mkdir(parents=True, exist_ok=True)
        save_state(net, args.out / "theta0.safetensors")
    accelerator: dict = {"use_cpu": True, "ddp_backend": "gloo" if world > 1 else None}
    if args.zero3:
        zero3 = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
        config = {"zero_optimization": zero3, "train_micro_batch_size_per_gpu": "auto"}
        accelerator = {
            "deepspeed": {**config, "train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
        }
    training = transformers.TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        seed=0,
        disable_tqdm=True,
        **accelerator,
    )
    trainer = transformers.Trainer(
        model=net,
        args=training,
        train_dataset=examples(32, 0, True),
        eval_dataset=examples(8, 1, True),
        callbacks=[callback],
    )
    try:
        trainer.train(resume_from_checkpoint=args.resume)
    except BaseException as exc:
        (args.out / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    final = distributed.full_state_dict(trainer.model)  # every rank (a gather under ZeRO-3); rank 0 gets it
    if rank == 0:
        save_file({k: v.contiguous() for k, v in final.items()}, str(args.out / "final.safetensors"))
    summary = {
        "rank": rank,
        "world_size": distributed.world_size(),
        "sharded": distributed.is_sharded_model(trainer.model),
        "snapshot_bytes": callback.engine.snapshot.nbytes,
        "writes": calls["write_model_folder"],
        "history": [
            {
                k: h[k]
                for k in ("step", "alpha", "general_loss", "general_loss_base", "probe_passes")
                if k in h
            }
            for h in callback.history
        ],
    }
    (args.out / f"summary-rank{rank}.json").write_text(
        json.dumps(summary)
    )  # stdout lines of ranks may interleave
    print("SUMMARY " + json.dumps(summary), flush=True)
    distributed.close_process_group(exit_code=0)  # past gloo's teardown abort: see close_process_group


if __name__ == "__main__":
    main()
