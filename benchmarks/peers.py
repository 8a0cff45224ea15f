"""Peers where they help: the decoder scenario with a peer model, ``budget`` vs ``cocktail`` vs static α = 0.5.

LM-Cocktail's "+ peers" mixture lifted general skill above the base-only mix in the paper (Llama 48.3 vs 47.7).
This benchmark shows when that pays on real text: the decoder scenario of the demo (a small causal LM pre-trained
on the standard library's English prose, fine-tuned on its Python source) with one **peer**, the same base
fine-tuned on more prose (a general-domain fine-tune; its windows are drawn apart from the pre-training ones). Each
run fine-tunes on code with a plain ``Trainer`` (learning rate × seed grid), then makes one decision on the
fine-tuned model with the library's own :class:`resilient_tune.Cocktail` session for each recipe, writes the
resilient folder, loads it back with ``from_pretrained`` and scores it on **held-out** test windows:

- ``static``: LM-Cocktail's α = 0.5 with the base only;
- ``budget``: the online policy at the scenario's 2% budget, base only (the project's default recipe);
- ``cocktail``: α = 0.5 with the base and the peer weighed ``softmax(−L/5)`` by their loss on the target probes
  (the paper's recipe with peers);
- ``budget+peer``: the budget policy searching α over ``α·θₜ + (1 − α)·(½θ₀ + ½θ_peer)``; its budget is relative
  to the α = 0 point, the base/peer mix;
- ``peer``: the peer itself, for context.

Reported per run and on average: α (and the base/peer weights), held-out target and general next-character
accuracy, held-out general loss against the base's, and paired McNemar tests (cocktail vs static, budget+peer vs
budget) on the same test characters.

Usage::

    python benchmarks/peers.py --base runs/grid/decoder-lr0.0001-s100-seed0/base   # ~6 min on 2 CPU cores
    python benchmarks/peers.py                      # pre-trains the base first (~3 min more)
    python benchmarks/peers.py --smoke --seeds 0    # seconds: tiny settings, numbers meaningless

Runs go into ``OUT/`` (``base/`` when pre-trained here, ``peer-seed<s>/``, ``<run>/fine-tuned`` and one folder per
recipe); the table goes to stdout and ``OUT/peers.json`` is written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # the benchmarks folder is not a package: imported from its own directory
from resilience_grid import SMOKE

BUDGET = 0.02  # the decoder scenario's budget (docs/demo.md)
RECIPES = ("static", "budget", "cocktail", "budget+peer")
_SMOKE = {**SMOKE["decoder"], "steps": 4}  # the grid's tiny decoder


def _quiet_trainer(
    model: Any, tokenizer: Any, block: Any, out: Path, cfg: Any, *, lr: float, steps: int
) -> None:
    """Fine-tune ``model`` on the windows ``block`` with a plain ``Trainer`` (constant ``lr``, ``steps`` steps)."""
    from transformers import Trainer

    from resilient_tune.demo._decoder_parts import LMCollator, _examples
    from resilient_tune.demo._scenario import training_args

    args = training_args(out, cfg, max_steps=steps, learning_rate=lr, eval_strategy="no")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_examples(block),
        data_collator=LMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # the Trainer prints its final metrics: keep stdout the result's
        trainer.train()


def _session(recipe: str, peer: Path, data: Any, tokenizer: Any, cfg: Any) -> Any:
    """The :class:`~resilient_tune.Cocktail` session of ``recipe`` (probes batched as the demo batches them)."""
    import resilient_tune as rt
    from resilient_tune.demo._decoder_parts import LMCollator, _examples

    probes = {
        "general_data": _examples(data.general_probe),
        "target_data": _examples(data.target_probe),
        "batch_size": cfg.eval_batch_size,
        "collate_fn": LMCollator(tokenizer.pad_token_id),
    }
    peers = [str(peer)] if recipe in ("cocktail", "budget+peer") else None
    if recipe in ("budget", "budget+peer"):
        return rt.Cocktail(policy="budget", drift_budget=BUDGET, peers=peers, **probes)
    if recipe == "cocktail":
        return rt.Cocktail(alpha=0.5, policy="cocktail", peers=peers, **probes)
    return rt.Cocktail(alpha=0.5, **probes)


def _decide_and_write(recipe: str, base: Path, tuned: Mapping[str, Any], peer: Path, data: Any, tok: Any,
                      cfg: Any, folder: Path) -> dict[str, Any]:  # fmt: skip
    """One decision of ``recipe`` on the fine-tuned weights ``tuned`` (the session snapshots the base first, as
    at the start of training), the resilient folder written to ``folder``; the decision's entry."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    session = _session(recipe, peer, data, tok, cfg)
    session.begin(model)
    model.load_state_dict(tuned)  # "training": the fine-tuned weights
    session.decide(1, model)
    session.write(model, folder, tokenizer=tok)
    return dict(session.last_entry or {})


def run_one(
    lr: float, seed: int, args: argparse.Namespace, base: Path, peer: Path, echo: Any
) -> dict[str, Any]:
    """Fine-tune on code at ``lr`` (seed ``seed``), make each recipe's decision and score every model held out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resilient_tune.demo._decoder_parts import _data, next_char_scores

    name = f"decoder-lr{lr:g}-s{args.steps}-seed{seed}"
    folder = args.out / name
    cfg = _config(args, seed=seed, learning_rate=lr)
    tok = AutoTokenizer.from_pretrained(base)
    data = _data(tok, *_corpora(), cfg)

    def score(path: Path) -> dict[str, Any]:
        m = AutoModelForCausalLM.from_pretrained(path)
        out = {}
        for task, block in (("target", data.target_test), ("general", data.general_test)):
            hits, loss = next_char_scores(m, block, cfg.eval_batch_size)
            out[task], out[f"{task}_loss"], out[f"{task}_hits"] = sum(hits) / len(hits), loss, hits
        return out

    echo(f"peers: {name}: fine-tuning on code")
    model = AutoModelForCausalLM.from_pretrained(base)
    _quiet_trainer(model, tok, data.target_train, folder / "training", cfg, lr=lr, steps=cfg.steps)
    model.save_pretrained(folder / "fine-tuned")
    tok.save_pretrained(folder / "fine-tuned")
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = {"base": score(base), "fine_tuned": score(folder / "fine-tuned"), "peer": score(peer)}
    entries = {}
    for recipe in RECIPES:
        echo(f"peers: {name}: {recipe}")
        target = folder / recipe.replace("+", "-")
        entries[recipe] = _decide_and_write(recipe, base, tuned, peer, data, tok, cfg, target)
        scores[recipe] = score(target)
    return summarize(name, lr, seed, scores, entries)


def summarize(name: str, lr: float, seed: int, scores: Mapping[str, Any], entries: Mapping[str, Any]) -> dict:
    """Per model: α, weights, held-out scores, general loss against the base's, target gain kept; paired tests."""
    from resilient_tune.demo.report import mcnemar

    base = scores["base"]
    gain = scores["fine_tuned"]["target"] - base["target"]
    models = {}
    for label, s in scores.items():
        entry = entries.get(label, {})
        ratio = s["general_loss"] / base["general_loss"]
        models[label] = {
            "alpha": {"base": 0.0, "fine_tuned": 1.0}.get(label, entry.get("alpha")),
            "weights": entry.get("weights"),
            "target": s["target"],
            "general": s["general"],
            "general_loss_ratio": ratio,
            "budget_honoured": ratio <= 1 + BUDGET,
            "target_gain_kept": (s["target"] - base["target"]) / gain if gain > 0 else None,
            "general_vs_base": (s["general"] - base["general"]) / base["general"],
        }
    pairs = {}
    for a, b in (("cocktail", "static"), ("budget+peer", "budget"), ("budget+peer", "static")):
        pairs[f"{a} vs {b}"] = {
            task: mcnemar(scores[a][f"{task}_hits"], scores[b][f"{task}_hits"])
            for task in ("target", "general")
        }
    return {"name": name, "lr": lr, "seed": seed, "models": models, "pairs": pairs}


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over runs per model, and per comparison how many runs the first model wins / loses on each task."""
    labels = list(runs[0]["models"]) if runs else []
    means = {
        label: {
            key: sum(r["models"][label][key] for r in runs) / len(runs)
            for key in ("target", "general", "general_loss_ratio")
        }
        | {"budget_honoured": sum(r["models"][label]["budget_honoured"] for r in runs)}
        for label in labels
    }
    wins = {}
    for comparison in runs[0]["pairs"] if runs else ():
        a, b = comparison.split(" vs ")
        wins[comparison] = {
            task: {
                "better": sum(r["models"][a][task] > r["models"][b][task] for r in runs),
                "worse": sum(r["models"][a][task] < r["models"][b][task] for r in runs),
                "significant": sum(r["pairs"][comparison][task]["p"] < 0.05 for r in runs),
            }
            for task in ("target", "general")
        }
    return {"runs": len(runs), "means": means, "wins": wins}


def render(runs: Sequence[Mapping[str, Any]], totals: Mapping[str, Any]) -> str:
    """Markdown: one row per run and model, then the means and the win counts."""
    rows = []
    for r in runs:
        for label, m in r["models"].items():
            weights = "" if not m["weights"] else " / ".join(f"{w:.2f}" for w in m["weights"])
            alpha = "" if m["alpha"] is None else f"{m['alpha']:.2f}"
            kept = "" if m["target_gain_kept"] is None else f"{100 * m['target_gain_kept']:.0f}%"
            rows.append([r["name"], label, alpha, weights, f"{100 * m['target']:.1f}", f"{100 * m['general']:.1f}",
                         f"{m['general_loss_ratio']:.3f}", kept])  # fmt: skip
    table = markdown_table(
        ["run", "model", "α", "weights base / peer", "target", "general", "general loss / base", "gain kept"],
        rows,
    )
    mean_rows = [
        [
            label,
            f"{100 * m['target']:.2f}",
            f"{100 * m['general']:.2f}",
            f"{m['general_loss_ratio']:.3f}",
            f"{m['budget_honoured']}/{totals['runs']}",
        ]
        for label, m in totals["means"].items()
    ]
    means = markdown_table(
        ["model", "target (mean)", "general (mean)", "general loss / base", f"within {BUDGET:.0%}"], mean_rows
    )
    win_rows = [
        [comparison, task, w["better"], w["worse"], w["significant"]]
        for comparison, tasks in totals["wins"].items()
        for task, w in tasks.items()
    ]
    wins = markdown_table(["comparison", "task", "runs better", "runs worse", "McNemar p < 0.05"], win_rows)
    return "\n\n".join([table, means, wins])


@functools.cache
def _corpora() -> tuple[Any, Any]:
    """The prose and code corpora, read once per process (parsing the standard library takes seconds)."""
    from resilient_tune.demo.text import code_documents, corpus, prose_documents

    return corpus(prose_documents()), corpus(code_documents())


def _config(args: argparse.Namespace, **changes: Any) -> Any:
    from resilient_tune.demo.decoder import DecoderConfig

    options: dict[str, Any] = {"steps": args.steps, **changes}
    if args.smoke:
        options.update(_SMOKE)
    return replace(DecoderConfig(), **options)


def _base(args: argparse.Namespace, echo: Any) -> Path:
    """The pre-trained base folder: ``--base``, or pre-trained here into ``OUT/base`` (the demo's stage 1)."""
    if args.base is not None:
        return args.base
    if (args.out / "base" / "config.json").is_file():
        return args.out / "base"
    from resilient_tune.demo._decoder_parts import _data, _new_model, _pretrain, char_tokenizer

    echo("peers: pre-training the base on prose")
    prose, code = _corpora()
    cfg = _config(args, seed=0)
    tok = char_tokenizer(prose.texts["train"] + code.texts["train"], cfg.min_char_count)
    _pretrain(_new_model(tok, cfg), tok, _data(tok, prose, code, cfg), args.out, cfg)
    return args.out / "base"


def _peer(args: argparse.Namespace, base: Path, seed: int, echo: Any) -> Path:
    """The general-domain peer of ``seed``: the base fine-tuned on prose windows drawn apart from pre-training's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resilient_tune.demo._decoder_parts import encode, windows

    folder = args.out / f"peer-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    echo(f"peers: fine-tuning the peer (seed {seed}) on prose")
    cfg = _config(args, seed=seed)
    tok = AutoTokenizer.from_pretrained(base)
    prose, _ = _corpora()
    generator = torch.Generator().manual_seed(10_000 + seed)  # not the pre-training windows' stream
    block = windows(
        encode(tok, prose.texts["train"]), args.peer_steps * cfg.batch_size, cfg.context + 1, generator
    )
    model = AutoModelForCausalLM.from_pretrained(base)
    _quiet_trainer(model, tok, block, folder / "training", cfg, lr=args.peer_lr, steps=args.peer_steps)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3], help="fine-tune learning rates")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1], help="fine-tune and peer seeds (default 0 1)"
    )
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps on code (default 100)")
    p.add_argument("--peer-steps", type=int, default=200, help="the peer's fine-tuning steps on prose (200)")
    p.add_argument("--peer-lr", type=float, default=3e-4, help="the peer's learning rate (3e-4)")
    p.add_argument(
        "--base", type=Path, default=None, help="a pre-trained decoder base/ folder (default: pre-train)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/peers"), help="run folder (default runs/peers)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds; checks the pipeline only)")
    args = p.parse_args(argv)
    if args.smoke:
        args.peer_steps = min(args.peer_steps, 4)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    base = _base(args, echo)
    runs = []
    for seed in args.seeds:
        peer = _peer(args, base, seed, echo)
        runs += [run_one(lr, seed, args, base, peer, echo) for lr in args.lrs]
    totals = aggregate(runs)
    result = {
        "runs": runs,
        "aggregate": totals,
        "budget": BUDGET,
        "peer": {"domain": "prose (general)", "steps": args.peer_steps, "lr": args.peer_lr},
        "steps": args.steps,
        "smoke": args.smoke,
        "wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else render(runs, totals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
