"""Choose the ``budget`` policy's probe statistic (the mean, or an upper confidence bound at level c) on validation
data, never on the test sets the grid reports (issue 15).

The encoder scenario's grid (lr 3e-5 / 1e-4 / 3e-4 × 75 / 200 steps × seeds, budget 5%) is fine-tuned on
:func:`~resilient_tune.demo.data.validation_data`: the same construction as the demo over another partition of the
packages, holding none of the demo's test pairs. For each fine-tune, at its final weights θ:

1. the contrastive loss of each of the 64 general probe pairs (one probe batch, as the callback scores it) at
   α = 0, 0.05, ..., 1 of θ₀ + α(θ − θ₀);
2. for each level c, the α the policy aims at: the largest α on that grid whose bound ``L(α) + z_c·SE`` (the
   session's :func:`~resilient_tune.probe_bound.bounded_loss`, c = 0.5 is the mean) is within 1.05 × the base's
   probe loss (the search finds it to its tolerance, 0.05);
3. every such α and the grid's front (0, 0.2, 0.4, 0.5, 0.6, 0.8, 1) scored on the validation test sets: recall@1
   on target and general, and the held-out general loss in chunks of 64 pairs drawn across the set as the probe
   batch is (the loss in runs of consecutive pairs, whose negatives mostly share the query's package, is recorded
   beside it: the grid's ``resilience_grid.py`` figure).

A level's run is **dominated** when some scored α is at least as good on general and more than 2 points better on
target (or the reverse), and **within budget** when its held-out general loss is ≤ 1.05 × the base's. The rule,
fixed before any run: the level with the fewest dominated runs; ties go to the most runs within budget, then to
the most target gain kept.

Usage::

    python benchmarks/confidence_validation.py --out runs/validation --json > validation.json   # ~1 h on 2 cores
    python benchmarks/confidence_validation.py --seeds 0 --out runs/validation                  # half of it
    python benchmarks/confidence_validation.py --reuse --out runs/validation                    # the tables again
    python benchmarks/confidence_validation.py --smoke --out /tmp/v                             # seconds, meaningless

Each run's measurements go to ``OUT/<run>.json`` as soon as it is done (``--reuse`` reads them back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table
from resilience_grid import GRIDS, MARGIN

from resilient_tune.probe_bound import bounded_loss, z_of

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # 0.5: z = 0, the mean
ALPHAS = tuple(i / 20 for i in range(21))
FRONT = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
BUDGET = GRIDS["encoder"]["budget"]
SMOKE = {"probe_pairs": 8, "target_test": 24, "general_test": 24, "eval_batch_size": 8}


def aimed_alpha(losses: Mapping[float, Sequence[float]], level: float, budget: float = BUDGET) -> float:
    """The largest α of ``losses`` (α -> per-pair probe losses) whose bound at ``level`` is within budget."""
    base = losses[0.0]
    bound = (1 + budget) * sum(base) / len(base)
    z = z_of(level)
    fits = [a for a, units in losses.items() if bounded_loss(sum(units) / len(units), units, base, z)[0] <= bound]
    return max(fits, default=0.0)


def _run(
    run: Mapping[str, Any],
    data: Any,
    path: Path,
    smoke: bool,
    every_alpha: bool = False,
    probe_batches: Sequence[Any] = (),
) -> dict[str, Any]:
    """Fine-tune one grid point on the validation data; measure the probes on ALPHAS and score the needed α (every
    α of ALPHAS with ``every_alpha``). The probes are ``data.general_probe`` in one batch, or each of
    ``probe_batches`` (pairs) in a batch of its own, their per-pair losses concatenated in that order."""
    from transformers import AutoModel, AutoTokenizer

    from resilient_tune.demo._progress import use_demo_progress
    from resilient_tune.demo._scenario import mix, training_args
    from resilient_tune.demo.encoder import (
        ContrastiveTrainer,
        EncoderConfig,
        PairCollator,
        _examples,
        pair_losses,
    )

    started = time.perf_counter()
    options = {"steps": run["steps"], "learning_rate": run["lr"], "seed": run["seed"], "decisions": 1}
    cfg = EncoderConfig(**{**options, **(SMOKE if smoke else {})})
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    collate = PairCollator(tokenizer, cfg.max_length)
    trainer = ContrastiveTrainer(
        model=model,
        args=training_args(Path(run["out"]), cfg, eval_strategy="no"),
        train_dataset=_examples(data.target_train),
        data_collator=collate,
        processing_class=tokenizer,
        scale=cfg.scale,
    )
    use_demo_progress(trainer, run["name"])  # a bar on stderr, not the log dicts on stdout
    trainer.train()
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # one batch each: the callback's probe batches (eval batch 64)
    probes = [collate(_examples(pairs)) for pairs in (probe_batches or [data.general_probe])]
    losses: dict[float, list[float]] = {}
    model.eval()
    for alpha in ALPHAS:
        model.load_state_dict(mix(base, tuned, alpha))
        with torch.no_grad():
            losses[alpha] = [x for probe in probes for x in pair_losses(model, probe, cfg.scale).tolist()]
    aimed = {str(level): aimed_alpha(losses, level) for level in LEVELS}
    scores = {}
    for alpha in sorted(set(ALPHAS if every_alpha else FRONT) | set(aimed.values())):
        model.load_state_dict(mix(base, tuned, alpha))
        scores[str(alpha)] = _scores(model, tokenizer, data, cfg)
    return {**run, "probe_losses": {str(a): v for a, v in losses.items()}, "aimed": aimed, "scores": scores,
            "wall_s": time.perf_counter() - started}  # fmt: skip


def _scores(model: Any, tokenizer: Any, data: Any, cfg: Any) -> dict[str, float]:
    """Recall@1 on both validation sets, and the general set's held-out loss in chunks of the probe batch: drawn
    across the set like the probe batch (``general_loss``, what the budget is judged on) and in runs of
    consecutive pairs (``general_loss_contiguous``, the grid's; mostly same-package negatives)."""
    from resilient_tune.demo.encoder import _score

    scored = _score(model, tokenizer, {"target": data.target_test, "general": data.general_test}, "validation", cfg)
    out = {name: sum(hits) / len(hits) for name, hits in scored.items()}
    out["general_loss"] = scored.spread_losses["general"]
    out["general_loss_contiguous"] = scored.losses["general"]
    return out


def judge(row: Mapping[str, Any], level: float, margin: float = MARGIN) -> dict[str, Any]:
    """One run at one level: its α, within budget on held-out loss, dominated (by which α), gain kept."""
    scores = {float(a): s for a, s in row["scores"].items()}
    alpha = row["aimed"][str(level)]
    mine, base, tuned = scores[alpha], scores[0.0], scores[1.0]
    by = [
        a
        for a, s in sorted(scores.items())
        if (s["general"] >= mine["general"] and s["target"] > mine["target"] + margin)
        or (s["target"] >= mine["target"] and s["general"] > mine["general"] + margin)
    ]
    gain = tuned["target"] - base["target"]
    return {
        "alpha": alpha,
        "within_budget": mine["general_loss"] <= (1 + BUDGET) * base["general_loss"],
        "loss_ratio": mine["general_loss"] / base["general_loss"],
        "dominated_by": by,
        "kept": (mine["target"] - base["target"]) / gain if abs(gain) > 1e-12 else None,
        "general_vs_base": mine["general"] - base["general"],
    }


def choose(rows: Sequence[Mapping[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """The chosen level by the rule of the module docstring, and one summary row per level."""
    table = []
    for level in LEVELS:
        judged = [judge(row, level) for row in rows]
        kept = [j["kept"] for j in judged if j["kept"] is not None]
        table.append(
            {
                "level": level,
                "dominated": sum(bool(j["dominated_by"]) for j in judged),
                "within_budget": sum(j["within_budget"] for j in judged),
                "runs": len(judged),
                "mean_kept": sum(kept) / len(kept) if kept else None,
                "mean_general_vs_base": sum(j["general_vs_base"] for j in judged) / len(judged),
            }
        )
    best = min(table, key=lambda t: (t["dominated"], -t["within_budget"], -(t["mean_kept"] or 0.0)))
    return best["level"], table


def _plan(seeds: Sequence[int], out: Path, smoke: bool) -> list[dict[str, Any]]:
    grid = GRIDS["encoder"]
    steps = (2,) if smoke else grid["steps"]
    runs = []
    for length in steps:
        for lr in grid["lrs"]:
            for seed in seeds:
                name = f"validation-encoder-lr{lr:g}-s{length}-seed{seed}"
                runs.append({"name": name, "lr": lr, "steps": length, "seed": seed, "out": str(out / name)})
    return runs


def cell(judged: Mapping[str, Any]) -> str:
    """A run's judgement at one level, for the per-run table: ``"0.55 ✓ dom. by 0.8"``."""
    by = judged["dominated_by"]
    mark = "✓" if judged["within_budget"] else "✗"
    return f"{judged['alpha']:.2f} {mark}" + (f" dom. by {', '.join(f'{a:g}' for a in by)}" if by else "")


def command_line(description: str, out: str, json_help: str) -> argparse.ArgumentParser:
    """The options of the validation scripts: ``--out``, ``--seeds``, ``--reuse``, ``--smoke``, ``--json``, ``--model``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reuse", action="store_true", help="read OUT/<run>.json, run nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: seconds, numbers meaningless")
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--model", type=Path, default=None, help="a MiniLM folder (default: the packaged one)")
    return parser


def reuse(runs: Sequence[Mapping[str, Any]], out: Path, script: str) -> list[dict[str, Any]]:
    """The rows an earlier invocation wrote to ``out/<run>.json``; every run's must be there."""
    missing = [r["name"] for r in runs if not (out / f"{r['name']}.json").exists()]
    if missing:
        raise SystemExit(f"{script}: --reuse found no results for {missing} in {out}")
    return [json.loads((out / f"{r['name']}.json").read_text()) for r in runs]


def _tables(rows: Sequence[Mapping[str, Any]], chosen: float, table: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        markdown_table(
            ["level", "runs dominated", "within budget (held-out loss)", "mean gain kept", "mean general vs base"],
            [
                [
                    "mean" if t["level"] == 0.5 else f"{t['level']:g}",
                    f"{t['dominated']}/{t['runs']}",
                    f"{t['within_budget']}/{t['runs']}",
                    "" if t["mean_kept"] is None else f"{t['mean_kept']:.0%}",
                    f"{100 * t['mean_general_vs_base']:+.1f} points",
                ]
                for t in table
            ],
        ),
        "",
        markdown_table(
            ["run", *("mean" if level == 0.5 else f"{level:g}" for level in LEVELS)],
            [
                [
                    row["name"],
                    *(cell(judge(row, level)) for level in LEVELS),
                ]
                for row in rows
            ],
        ),
        "",
        f"chosen level: {'the mean' if chosen == 0.5 else chosen}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = command_line(
        __doc__.splitlines()[0], "runs/validation", "print the rows, the table and the choice as JSON"
    ).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = _plan(args.seeds, args.out, args.smoke)
    rows = []
    if args.reuse:
        rows = reuse(runs, args.out, "confidence_validation")
    else:
        from resilient_tune.demo.data import validation_data
        from resilient_tune.demo.encoder import _packaged_model

        smoke = SMOKE if args.smoke else {}
        sizes = {k: smoke[k] for k in ("target_test", "general_test") if k in smoke}
        data = validation_data(**sizes, probe=smoke.get("probe_pairs", 64))
        path = args.model or _packaged_model()
        args.out.mkdir(parents=True, exist_ok=True)
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {run['name']}", file=sys.stderr, flush=True)
            row = _run(run, data, path, args.smoke)
            row["data_sizes"] = data.sizes()
            (args.out / f"{run['name']}.json").write_text(json.dumps(row))
            rows.append(row)
    chosen, table = choose(rows)
    if args.json:
        print(json.dumps({"rows": rows, "levels": table, "chosen": chosen, "budget": BUDGET, "margin": MARGIN}))
    else:
        print(_tables(rows, chosen, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
