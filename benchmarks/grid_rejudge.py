"""Judge every probe statistic of the encoder grid on one front, with the held-out loss in both chunk layouts.

``resilience_grid.py`` runs one statistic per grid (the mean, ``--confidence 0.95``, ``--confidence 0.7``), and its
held-out general loss takes chunks of 64 *consecutive* test pairs, whose negatives mostly share the query's package,
while the probe batch draws its pairs across the set. This script re-scores, from one grid's saved fine-tuned
weights, the α every statistic chose on the same fine-tune (the grids' fine-tunes are bit-identical: same recipe,
seed and data), together with the front (0, 0.2, 0.4, 0.5, 0.6, 0.8, 1), on the demo's held-out test sets, and
reports per statistic:

- **within budget**: held-out general loss ≤ (1 + budget) × the base's, in chunks drawn across the set like the
  probe batch (``spread``, the quantity the budget is about) and in consecutive chunks (the grids' tables);
- **dominated**: some α of the shared front (the points above and every statistic's α) at least as good on held-out
  general recall and more than 2 points better on target, or the reverse (issue 15's rule);
- gain kept and general vs base.

Before judging, the re-scored recall of every α the source grids measured is checked against what they recorded
(a mismatch means the fine-tune or the data differ: the script stops).

Usage::

    python benchmarks/grid_rejudge.py --runs runs/grid-conf07 \\
        --results benchmarks/results/resilience-grid.json benchmarks/results/resilience-grid-confidence.json \\
                  benchmarks/results/resilience-grid-confidence0.7.json --json > rejudged.json   # ~10 min
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table
from resilience_grid import dominated_by, run_name

FRONT = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)


def label(summary: Mapping[str, Any]) -> str:
    """The statistic a grid run used: ``"mean"`` or its confidence level."""
    return "mean" if summary.get("confidence") is None else f"{summary['confidence']:g}"


def chosen_alphas(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``plain run name -> statistic -> its grid run`` (encoder runs of plain loss budgets only)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results:
        for run in result["runs"]:
            if run["scenario"] != "encoder" or run.get("metric_drop") is not None:
                continue
            name = run_name("encoder", run["lr"], run["steps"], run["seed"])
            out.setdefault(name, {})[label(run)] = run
    return out


def judge(
    scores: Mapping[float, Mapping[str, float]], alpha: float, budget: float, front: Sequence[float]
) -> dict[str, Any]:
    """One statistic's α against the base, the fine-tuned model and the shared ``front``."""
    mine, base, tuned = scores[alpha], scores[0.0], scores[1.0]
    gain = tuned["target"] - base["target"]
    curve = [{"alpha": a, **scores[a]} for a in front]
    return {
        "alpha": alpha,
        "within_budget_spread": mine["general_loss_spread"] <= (1 + budget) * base["general_loss_spread"],
        "within_budget_consecutive": mine["general_loss"] <= (1 + budget) * base["general_loss"],
        "loss_ratio_spread": mine["general_loss_spread"] / base["general_loss_spread"],
        "loss_ratio_consecutive": mine["general_loss"] / base["general_loss"],
        "dominated_by": [d["alpha"] for d in dominated_by(curve, {"alpha": alpha, **mine})],
        "gain_kept": (mine["target"] - base["target"]) / gain if gain > 0 else None,
        "general_vs_base": mine["general"] - base["general"],
    }


def rescore(folder: Path, alphas: Sequence[float]) -> dict[float, dict[str, float]]:
    """Recall@1 and the held-out general loss (both layouts) of θ₀ + α(θ − θ₀) for each α, θ from ``folder``."""
    from transformers import AutoModel, AutoTokenizer

    from resilient_tune.demo._scenario import mix
    from resilient_tune.demo.data import demo_data
    from resilient_tune.demo.encoder import EncoderConfig, _packaged_model, _score

    report = json.loads((folder / "report.json").read_text())
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()}
    cfg = EncoderConfig(**config)
    data = demo_data(target_test=cfg.target_test, general_test=cfg.general_test, probe=cfg.probe_pairs)
    path = _packaged_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = AutoModel.from_pretrained(folder / "fine-tuned").state_dict()
    sets = {"target": data.target_test, "general": data.general_test}
    out = {}
    for alpha in sorted(set(alphas)):
        model.load_state_dict(mix(base, tuned, alpha))
        scored = _score(model, tokenizer, sets, f"{folder.name} α {alpha:.2f}", cfg)
        out[alpha] = {
            **{name: sum(hits) / len(hits) for name, hits in scored.items()},
            "general_loss": scored.losses["general"],
            "general_loss_spread": scored.spread_losses["general"],
        }
    return out


def check(scores: Mapping[float, Mapping[str, float]], runs: Mapping[str, Mapping[str, Any]]) -> None:
    """Stop when the re-scored recall differs from a source grid's record of the same α."""
    for stat, run in runs.items():
        for model in run["models"].values():
            got = scores[model["alpha"]]
            if abs(got["target"] - model["target"]) > 1e-9 or abs(got["general"] - model["general"]) > 1e-9:
                raise SystemExit(
                    f"grid_rejudge: {run['name']} ({stat}) recorded {model['target']:.4f} / {model['general']:.4f} "
                    f"at α {model['alpha']:.4f}, re-scored {got['target']:.4f} / {got['general']:.4f}: the "
                    "fine-tune or the test data differ from that grid's; re-run the grids on one revision"
                )


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per statistic over the runs: dominated, within budget (both layouts), mean gain kept and general vs base."""
    table = []
    for stat in sorted({s for row in rows for s in row["judged"]}, key=lambda s: -1.0 if s == "mean" else float(s)):
        judged = [row["judged"][stat] for row in rows if stat in row["judged"]]
        kept = [j["gain_kept"] for j in judged if j["gain_kept"] is not None]
        table.append({
            "statistic": stat,
            "runs": len(judged),
            "dominated": sum(bool(j["dominated_by"]) for j in judged),
            "within_budget_spread": sum(j["within_budget_spread"] for j in judged),
            "within_budget_consecutive": sum(j["within_budget_consecutive"] for j in judged),
            "mean_gain_kept": sum(kept) / len(kept) if kept else None,
            "mean_general_vs_base": sum(j["general_vs_base"] for j in judged) / len(judged),
        })  # fmt: skip
    return table


def render(rows: Sequence[Mapping[str, Any]], table: Sequence[Mapping[str, Any]]) -> str:
    head = ["statistic", "runs dominated", "within budget (spread)", "within budget (consecutive)",
            "mean gain kept", "mean general vs base"]  # fmt: skip
    lines = [markdown_table(head, [[
        t["statistic"], f"{t['dominated']}/{t['runs']}", f"{t['within_budget_spread']}/{t['runs']}",
        f"{t['within_budget_consecutive']}/{t['runs']}",
        "n/a" if t["mean_gain_kept"] is None else f"{100 * t['mean_gain_kept']:.0f}%",
        f"{100 * t['mean_general_vs_base']:+.1f} points"] for t in table])]  # fmt: skip
    per_run = []
    for row in rows:
        cells = [row["name"]]
        for t in table:
            j = row["judged"].get(t["statistic"])
            cells.append("-" if j is None else (
                f"{j['alpha']:.2f} · {j['loss_ratio_spread']:.3f}{'✓' if j['within_budget_spread'] else '✗'}"
                + (f" · dom. by {', '.join(f'{a:.2f}' for a in j['dominated_by'])}" if j["dominated_by"] else "")))  # fmt: skip
        per_run.append(cells)
    head = ["run", *(f"{t['statistic']}: α · spread loss / base" for t in table)]
    lines += ["", markdown_table(head, per_run)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="a grid's run folder holding <run>/fine-tuned/")
    p.add_argument("--results", type=Path, nargs="+", required=True, help="the grids' JSON results (--json)")
    p.add_argument("--budget", type=float, default=0.05, help="the encoder grid's loss budget (default 0.05)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    args = p.parse_args(argv)
    by_run = chosen_alphas([json.loads(path.read_text()) for path in args.results])
    rows = []
    for name, runs in sorted(by_run.items()):
        folders = sorted(args.runs.glob(f"{name}*/fine-tuned"))
        if not folders:
            print(f"grid_rejudge: no {args.runs}/{name}*/fine-tuned; skipped", file=sys.stderr)
            continue
        alphas = {a: run["models"]["resilient"]["alpha"] for a, run in runs.items()}
        needed = {*FRONT, *alphas.values(), *(m["alpha"] for r in runs.values() for m in r["models"].values())}
        scores = rescore(folders[0].parent, sorted(needed))
        check(scores, runs)
        front = sorted({*FRONT, *alphas.values()})
        judged = {stat: judge(scores, alpha, args.budget, front) for stat, alpha in alphas.items()}
        rows.append({"name": name, "scores": {f"{a:g}": s for a, s in scores.items()}, "judged": judged})
    table = aggregate(rows)
    print(json.dumps({"runs": rows, "aggregate": table}, indent=1) if args.json else render(rows, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
