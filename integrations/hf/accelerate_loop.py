"""A custom accelerate training loop driving a ``Cocktail`` session, for one process or ``torchrun`` (2 over gloo).

    torchrun --standalone --nproc_per_node 2 accelerate_loop.py OUT [--policy budget --drift-budget 0.002]
             [--resume OUT/checkpoint-2]

What ``docs/custom-loops.md`` shows: θ₀ taken before ``accelerator.prepare`` (every rank), kept on disk for a resume
(``keep_base``), ``decide`` and ``write`` at steps 2 and 4 on every rank with the unwrapped model, and the session's
state saved with each checkpoint (``OUT/checkpoint-<n>/state-rank<r>.pt``: model, optimizer, session). ``--resume``
starts from such a checkpoint in new processes. Rank 0 saves θ₀ (``OUT/theta0.safetensors``) and the final weights
(``OUT/final.safetensors``); every rank writes ``OUT/summary-rank<r>.json`` (world size, α history, writes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from _e2e import arguments, count_calls, examples, model
from accelerate import Accelerator
from safetensors.torch import save_file

from resilient_tune import Cocktail, distributed

STEPS, EVERY = 4, 2


def main() -> None:
    parser = arguments("A custom accelerate loop driving a Cocktail session")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint folder of this script")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    calls: dict[str, int] = {}
    count_calls(calls, "write_model_folder")
    net = model()
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
            str(args.out / "theta0.safetensors"),
        )
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2, weight_decay=0.0)
    session = Cocktail(
        args.alpha,
        policy=args.policy,
        drift_budget=args.drift_budget,
        general_data=examples(16, 2, False) if args.policy == "budget" else None,
        batch_size=8,
        collate_fn=transformers.default_data_collator,
    )
    start = 0
    if args.resume is not None:  # new processes: weights, optimizer and session from the checkpoint
        saved = torch.load(args.resume / f"state-rank{rank}.pt", weights_only=False)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        session.load_state_dict(saved["cocktail"])
        start = saved["step"]
    session.begin(net, step=start, base_dir=args.out / "resilient_base")
    if args.resume is None:
        session.keep_base(args.out / "resilient_base")
    train = examples(32, 0, True)
    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=transformers.default_data_collator)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    for step, batch in enumerate(loader, start=1):
        if step <= start or step > STEPS:
            continue
        net.train()
        accelerator.backward(net(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % EVERY == 0:
            plain = accelerator.unwrap_model(net)
            session.decide(step, plain)
            checkpoint = args.out / f"checkpoint-{step}"
            session.write(plain, checkpoint / "resilient", step)
            checkpoint.mkdir(parents=True, exist_ok=True)
            state = {"model": plain.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save({**state, "cocktail": session.state_dict()}, checkpoint / f"state-rank{rank}.pt")
    plain = accelerator.unwrap_model(net)
    session.write(plain, args.out / "resilient")
    if rank == 0:
        save_file(
            {k: v.detach().clone().contiguous() for k, v in plain.state_dict().items()},
            str(args.out / "final.safetensors"),
        )
        session.report(args.out / "cocktail_report.json")
    summary = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "history": [{k: h[k] for k in ("step", "alpha", "general_loss") if k in h} for h in session.history],
        "writes": calls["write_model_folder"],
    }
    (args.out / f"summary-rank{rank}.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()
    distributed.close_process_group(exit_code=0)  # past gloo's teardown abort: see close_process_group


if __name__ == "__main__":
    main()
