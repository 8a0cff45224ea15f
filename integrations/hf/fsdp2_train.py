"""FSDP2 on the CPU: a plain torch training loop, sharded with ``fully_shard``, drives a ``Cocktail`` session.

    torchrun --standalone --nproc_per_node 2 fsdp2_train.py OUT [--policy budget --drift-budget 0.002]
             [--policy cocktail --peer PEER_FOLDER] [--alpha 0.4] [--fail-write] [--no-callback]

The transformers ``Trainer`` cannot drive FSDP2 on the CPU (accelerate ignores its ``fsdp`` options there and runs
plain DDP), so this loop does what the Trainer would and calls the session as ``CocktailCallback`` does, through its
public lifecycle: ``begin`` before the first step (it batches the probes; the base's KL reference is a forward, i.e.
an all-gather, on every rank), ``decide`` and ``write`` at steps 2 and 4 on every rank. The session is strict: a
failed write stops every rank.

The model is a 2-layer GPT-2 (tied embeddings), each block and the root wrapped with
``fully_shard(module, mesh=init_device_mesh("cpu", (2,)))`` over gloo: its parameters become ``DTensor`` shards.
Rank 0 saves θ₀ (``OUT/theta0.safetensors``, before sharding), θ at each decision (``OUT/step-<n>/theta.safetensors``)
and the final weights (``OUT/final.safetensors``), gathered on every rank. Every rank prints ``SUMMARY {json}`` and writes it to ``OUT/summary-rank<r>.json``: whether the model is sharded, the snapshot's bytes
against the full trainable bytes, how many folders it wrote and how many full gathers it made while deciding, the
α history, and the largest deviation of a swapped-in shard from the expected θ₀ + α(θ − θ₀) cut to that shard.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
import transformers
from _e2e import arguments, count_calls, examples, model
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from resilient_tune import Cocktail, distributed


def batches(data: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    return [transformers.default_data_collator(data[i : i + size]) for i in range(0, len(data), size)]


def swap_deviation(core: Cocktail, net: torch.nn.Module, alpha: float, base: dict) -> float:
    """Inside ``engine.swapped(net, α)``: the largest |shard − cut of θ₀ + α(θ − θ₀)| over the parameters. The full
    θ is gathered (``full_tensor``, every rank) before the swap; the swap itself gathers nothing."""
    distributed.reshard(net)  # a no-grad forward (the probes) leaves the root's parameters unsharded
    params = dict(net.named_parameters())
    full = {n: p.full_tensor().detach() for n, p in params.items()}
    worst = 0.0
    with core.engine.swapped(net, alpha):
        for name, p in params.items():
            expected = base[name] + alpha * (full[name] - base[name])
            local = distributed.local_tensor(p).detach()
            diff = (local - distributed.local_part(p, expected)).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def main() -> None:
    parser = arguments("FSDP2 on the CPU: a plain loop driving a Cocktail session")
    parser.add_argument("--peer", type=Path, default=None)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--no-callback", action="store_true", help="train only (the reference of bit-exactness)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = model()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in base.items()}, str(args.out / "theta0.safetensors"))
    dist.barrier()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in net.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)

    calls: dict[str, int] = {}
    count_calls(calls, "write_model_folder", fail=args.fail_write)
    count_calls(calls, "full_state_dict")
    core = Cocktail(
        args.alpha,
        policy=args.policy,
        drift_budget=args.drift_budget,
        general_data=examples(16, 2, False, low=12) if args.policy == "budget" else None,
        target_data=examples(8, 1, True) if args.policy == "cocktail" else None,
        peers=[args.peer] if args.peer else None,
        strict=True,  # a failed write stops every rank (the test of --fail-write)
        batch_size=8,
        collate_fn=transformers.default_data_collator,
    )
    core.begin(net, base_dir=args.out / "resilient_base")

    train = examples(32, 0, True)[
        rank::2
    ]  # each rank its half of the data, as a distributed sampler gives it
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr)
    deviation, gathers_while_deciding = 0.0, 0
    try:
        for step, batch in enumerate(batches(train, 4) * args.epochs, start=1):
            net.train()
            optimizer.zero_grad()
            net(**batch).loss.backward()
            optimizer.step()
            if step % 2 == 0 and not args.no_callback:
                before = calls["full_state_dict"]
                core.decide(step, net)
                gathers_while_deciding += calls["full_state_dict"] - before
                deviation = max(deviation, swap_deviation(core, net, 0.3, base))
                core.write(net, args.out / f"step-{step}" / "resilient", step)
                live = distributed.full_state_dict(net)  # θ at this step, for the tests (not counted above)
                if rank == 0:
                    save_file(
                        {k: v.contiguous() for k, v in live.items()},
                        str(args.out / f"step-{step}" / "theta.safetensors"),
                    )
    except BaseException as exc:
        (args.out / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    final = distributed.full_state_dict(net)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in final.items()}, str(args.out / "final.safetensors"))
    full_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    summary = {
        "rank": rank,
        "sharded": distributed.is_sharded_model(net),
        "snapshot_bytes": core.engine.snapshot.nbytes,
        "full_bytes": full_bytes,
        "writes": calls["write_model_folder"],
        "gathers": calls["full_state_dict"],
        "gathers_while_deciding": gathers_while_deciding,
        "swap_deviation": deviation,
        "history": [
            {
                k: h[k]
                for k in (
                    "step",
                    "alpha",
                    "general_loss",
                    "general_loss_base",
                    "general_loss_finetuned",
                    "general_kl",
                    "general_kl_merged",
                    "weights",
                    "drift_norm",
                    "probe_passes",
                )
                if k in h
            }
            for h in core.history
        ],
    }
    (args.out / f"summary-rank{rank}.json").write_text(
        json.dumps(summary)
    )  # stdout lines of ranks may interleave
    print("SUMMARY " + json.dumps(summary), flush=True)
    distributed.close_process_group(exit_code=0)  # past the teardown where an FSDP2 gloo group can abort


if __name__ == "__main__":
    main()
