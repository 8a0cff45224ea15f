"""Robustness of the online ``budget`` policy against LM-Cocktail's static α = 0.5, over fine-tunes of every strength.

Each scenario of the demo is fine-tuned over a grid of learning rates × lengths × seeds. For every run the fine-tuned
model, static α = 0.5 and the online ``budget`` policy (the scenario's budget) are scored on **held-out** target and
general test sets, with the **held-out general loss**: the probes' loss measured on the general test set, the quantity
the budget bounds, on data the policy never saw. Per run and in aggregate:

- **budget honoured**: held-out general loss ≤ (1 + budget) × the base's, for static α = 0.5 and for the policy;
- **target gain kept** = (merged − base) / (fine-tuned − base) and **general vs base**, relative;
- **online vs static**, paired on the same test examples (McNemar's exact p), and a sign count over runs;
- **not dominated**: no α of the run's measured front (α 0, 0.2, ..., 1) is at least as good on held-out general and
  more than 2 points better on held-out target than the policy's α (or the reverse).

Grids (the scenario's own recipe otherwise):

- ``encoder`` (real all-MiniLM-L6-v2, contrastive, budget 5%): lr 3e-5 / 1e-4 / 3e-4 × 75 / 200 steps;
- ``decoder`` (a 0.82M GPT-2 pre-trained once on prose, fine-tuned on code, budget 2%): lr 1e-4 / 3e-4 / 1e-3 ×
  100 / 250 steps; the seeds change the fine-tune's windows and the probe and test windows; every run starts from the
  same pre-trained base (the first run's).

Usage::

    python benchmarks/resilience_grid.py                       # both grids, 2 seeds: ~1 h on 2 CPU cores
    python benchmarks/resilience_grid.py --scenarios decoder --seeds 0
    python benchmarks/resilience_grid.py --reuse --out runs/grid --json > grid.json   # tables from earlier runs
    python benchmarks/resilience_grid.py --smoke --seeds 0        # seconds: tiny settings, numbers meaningless
    python benchmarks/resilience_grid.py --confidence 0.95 --out runs/grid-conf   # bound the loss, not its mean

Each run goes in-process into ``OUT/<scenario>-lr<lr>-s<steps>-seed<seed>/`` (its ``report.json``); the tables go
to stdout, ``OUT/grid.json`` and ``OUT/grid.png`` are written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from math import comb
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # the benchmarks folder is not a package: imported from its own directory
from resilience import _paired

CURVE = (0.2, 0.4, 0.6, 0.8)  # the measured front besides 0, the static 0.5, the policy's α and 1
MARGIN = 0.02  # "more than 2 points better": the not-dominated rule of issue 15
GRIDS: dict[str, dict[str, Any]] = {
    "encoder": {"lrs": (3e-5, 1e-4, 3e-4), "steps": (75, 200), "budget": 0.05, "decisions": {75: 3, 200: 4}},
    "decoder": {
        "lrs": (1e-4, 3e-4, 1e-3),
        "steps": (100, 250),
        "budget": 0.02,
        "decisions": {100: 5, 250: 5},
    },
}
SMOKE = {
    "encoder": {"probe_pairs": 8, "target_test": 40, "general_test": 40, "eval_batch_size": 8},
    "decoder": {
        "pretrain_steps": 6,
        "probe_windows": 8,
        "test_windows": 20,
        "context": 16,
        "n_layer": 1,
        "n_embd": 32,
    },
}
_SMOKE_STEPS = {"encoder": (2, 3), "decoder": (4, 6)}


def run_name(
    scenario: str,
    lr: float,
    steps: int,
    seed: int,
    metric_drop: float | None = None,
    confidence: float | None = None,
) -> str:
    name = f"{scenario}-lr{lr:g}-s{steps}-seed{seed}"
    name = name if metric_drop is None else f"{name}-metric{metric_drop:g}"
    return name if confidence is None else f"{name}-conf{confidence:g}"


def plan(
    scenarios: Sequence[str],
    seeds: Sequence[int],
    smoke: bool,
    metric_drop: float | None = None,
    only: Sequence[str] = (),
    confidence: float | None = None,
) -> list[dict[str, Any]]:
    """The runs: scenario, learning rate, steps, seed, decisions, the metric budget (``None``: the loss budget), the
    loss bound's confidence (``None``: the mean) and the run's name; ``only`` keeps the runs of those plain names."""
    runs = []
    for scenario in scenarios:
        grid = GRIDS[scenario]
        lengths = _SMOKE_STEPS[scenario] if smoke else grid["steps"]
        for steps in lengths:
            for lr in grid["lrs"]:
                for seed in seeds:
                    decisions = 1 if smoke else grid["decisions"][steps]
                    runs.append(
                        {"scenario": scenario, "lr": lr, "steps": steps, "seed": seed, "decisions": decisions}
                    )
    if only:
        unknown = sorted(set(only) - {run_name(r["scenario"], r["lr"], r["steps"], r["seed"]) for r in runs})
        if unknown:
            raise SystemExit(f"resilience_grid: --only {unknown} are not runs of this grid")
        runs = [r for r in runs if run_name(r["scenario"], r["lr"], r["steps"], r["seed"]) in only]
    for run in runs:
        run["metric_drop"], run["confidence"] = metric_drop, confidence
        run["name"] = run_name(run["scenario"], run["lr"], run["steps"], run["seed"], metric_drop, confidence)
    return runs


def _execute(run: Mapping[str, Any], out: Path, smoke: bool, base: Path | None, echo: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "steps": run["steps"],
        "learning_rate": run["lr"],
        "seed": run["seed"],
        "decisions": run["decisions"],
        "curve": () if smoke else CURVE,
        "metric_drop": run.get("metric_drop"),
        "confidence": run.get("confidence"),
    }
    if smoke:
        options.update(SMOKE[run["scenario"]])
    folder = out / run["name"]
    if run["scenario"] == "decoder":
        from resilient_tune.demo.decoder import DecoderConfig, run_decoder

        return run_decoder(folder, DecoderConfig(**options), base_path=base, echo=echo)
    from resilient_tune.demo.encoder import EncoderConfig, run_encoder

    return run_encoder(folder, EncoderConfig(**options), echo=echo)


# ---------------------------------------------------------------------------- one run's figures
def summarize_run(report: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run: per model (fine-tuned, static, budget) the held-out scores, held-out general loss
    against the base's, budget honoured, gain kept, general vs base; paired tests online vs static; domination."""
    models = report["models"]
    budget = (report.get("policy") or {}).get("drift_budget", GRIDS[run["scenario"]]["budget"])
    base = models["base"]
    base_loss = (base.get("test_loss") or {}).get("general")
    base_spread = (base.get("test_loss_spread") or {}).get("general")  # encoder: chunks drawn like the probe batch
    gain = models["fine_tuned"]["target"] - base["target"]
    rows = {}
    for name in ("fine_tuned", "static", "resilient"):
        m = models[name]
        loss = (m.get("test_loss") or {}).get("general")
        ratio = None if loss is None or not base_loss else loss / base_loss
        spread = (m.get("test_loss_spread") or {}).get("general")
        rows[name] = {
            "alpha": m["alpha"],
            "target": m["target"],
            "general": m["general"],
            "general_loss_ratio": ratio,
            "budget_honoured": None if ratio is None else ratio <= 1 + budget,
            "budget_honoured_spread": None
            if spread is None or not base_spread
            else spread <= (1 + budget) * base_spread,
            # with a metric budget: the held-out general score within metric_drop of the base's
            "metric_honoured": None
            if run.get("metric_drop") is None
            else m["general"] >= base["general"] - run["metric_drop"] - 1e-12,
            "target_gain_kept": (m["target"] - base["target"]) / gain if gain > 0 else None,
            "general_vs_base": (m["general"] - base["general"]) / base["general"]
            if base["general"]
            else None,
        }
    return {
        **{k: run[k] for k in ("name", "scenario", "lr", "steps", "seed")},
        "metric_drop": run.get("metric_drop"),
        "confidence": run.get("confidence"),
        "budget": budget,
        "base": {"target": base["target"], "general": base["general"], "general_loss": base_loss},
        "models": rows,
        "history_alpha": [e.get("alpha") for e in report.get("history") or []],
        "probe_passes": [e.get("probe_passes") for e in report.get("history") or []],
        "online_vs_static_pairs": _paired(report.get("hits"), "resilient", "static"),
        "dominated_by": dominated_by(report.get("curve") or [], models["resilient"]),
        "wall_s": (report.get("timing") or {}).get("total"),
    }


def dominated_by(curve: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any]) -> list[dict[str, float]]:
    """The measured α of the front that beat ``chosen`` by the rule: at least as good on held-out general and more
    than :data:`MARGIN` better on held-out target, or the reverse."""
    out = []
    for point in curve:
        if abs(point["alpha"] - chosen["alpha"]) < 1e-9:
            continue
        d_target, d_general = point["target"] - chosen["target"], point["general"] - chosen["general"]
        # (a tolerance of 1e-9 so that a difference of exactly 2 points, computed in floats, is not "more")
        if (d_general >= -1e-9 and d_target > MARGIN + 1e-9) or (
            d_target >= -1e-9 and d_general > MARGIN + 1e-9
        ):
            out.append({"alpha": point["alpha"], "target": point["target"], "general": point["general"]})
    return out


# ---------------------------------------------------------------------------- aggregate
def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of ``wins`` against ``losses`` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per scenario and overall: budget honoured (static, policy), mean gain kept and general vs base, online vs
    static wins per task with a sign test, runs where the policy was dominated."""
    out: dict[str, Any] = {}
    for scope in [*sorted({s["scenario"] for s in summaries}), "all"]:
        runs = [s for s in summaries if scope in ("all", s["scenario"])]
        entry: dict[str, Any] = {"runs": len(runs)}
        for name in ("static", "resilient", "fine_tuned"):
            rows = [s["models"][name] for s in runs]
            honoured = [r["budget_honoured"] for r in rows if r["budget_honoured"] is not None]
            spread = [r["budget_honoured_spread"] for r in rows if r.get("budget_honoured_spread") is not None]
            kept = [r["target_gain_kept"] for r in rows if r["target_gain_kept"] is not None]
            vs_base = [r["general_vs_base"] for r in rows if r["general_vs_base"] is not None]
            entry[name] = {
                "budget_honoured": sum(honoured),
                "budget_honoured_spread": sum(spread) if spread else None,  # of the runs that measured it
                "measured": len(honoured),
                "mean_gain_kept": sum(kept) / len(kept) if kept else None,
                "mean_general_vs_base": sum(vs_base) / len(vs_base) if vs_base else None,
            }
        for task in ("target", "general"):
            deltas = [s["models"]["resilient"][task] - s["models"]["static"][task] for s in runs]
            wins, losses = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
            entry[f"online_vs_static_{task}"] = {
                "wins": wins,
                "losses": losses,
                "ties": len(deltas) - wins - losses,
                "sign_p": sign_test(wins, losses),
                "mean_delta": sum(deltas) / len(deltas) if deltas else None,
            }
        entry["dominated_runs"] = [s["name"] for s in runs if s["dominated_by"]]
        out[scope] = entry
    return out


# ---------------------------------------------------------------------------- output
def _pct(value: float | None, signed: bool = False) -> str:
    return "n/a" if value is None else (f"{100 * value:+.1f}%" if signed else f"{100 * value:.0f}%")


def render(summaries: Sequence[Mapping[str, Any]], totals: Mapping[str, Any]) -> str:
    headers = [
        "run", "forgetting", "static 0.5: gen. loss / base", "budget: α", "budget: gen. loss / base",
        "kept static / budget", "general vs base static / budget", "online − static (pairs, p)", "dominated",
    ]  # fmt: skip
    rows = []
    for s in summaries:
        st, on, ft = (s["models"][n] for n in ("static", "resilient", "fine_tuned"))
        pairs = s["online_vs_static_pairs"] or {}

        def pair(task: str, pairs: Mapping[str, Any] = pairs) -> str:
            p = pairs.get(task)
            return "n/a" if p is None else f"{p['online_only'] - p['static_only']:+d} (p {p['p']:.2g})"

        def loss(row: Mapping[str, Any], budget: float = s["budget"]) -> str:
            ratio = row["general_loss_ratio"]
            if ratio is None:
                return "n/a"
            return f"{ratio:.4f} {'✓' if ratio <= 1 + budget else '✗'}"

        rows.append([
            s["name"], _pct(ft["general_vs_base"], True), loss(st), f"{on['alpha']:.2f}", loss(on),
            f"{_pct(st['target_gain_kept'])} / {_pct(on['target_gain_kept'])}",
            f"{_pct(st['general_vs_base'], True)} / {_pct(on['general_vs_base'], True)}",
            f"target {pair('target')}; general {pair('general')}",
            ", ".join(f"α {d['alpha']:g}" for d in s["dominated_by"]) or "no",
        ])  # fmt: skip
    lines = [markdown_table(headers, rows), ""]
    agg_rows = []
    for scope, t in totals.items():
        agg_rows.append([
            scope, t["runs"],
            f"{t['static']['budget_honoured']}/{t['static']['measured']}",
            f"{t['resilient']['budget_honoured']}/{t['resilient']['measured']}",
            f"{_pct(t['static']['mean_gain_kept'])} / {_pct(t['resilient']['mean_gain_kept'])}",
            f"{_pct(t['static']['mean_general_vs_base'], True)} / {_pct(t['resilient']['mean_general_vs_base'], True)}",
            *(
                f"{t[k]['wins']}–{t[k]['losses']} (sign p {t[k]['sign_p']:.2g})"
                for k in ("online_vs_static_target", "online_vs_static_general")
            ),
            len(t["dominated_runs"]),
        ])  # fmt: skip
    lines.append(
        markdown_table(
            [
                "scope",
                "runs",
                "budget honoured: static",
                "budget honoured: budget",
                "mean kept static / budget",
                "mean general vs base static / budget",
                "online vs static, target (runs won–lost)",
                "online vs static, general",
                "runs dominated",
            ],
            agg_rows,
        )
    )
    return "\n".join(lines)


def plot(summaries: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Two panels: held-out general loss / base's per run (static, budget; the budget line), and target gain kept
    against general vs base (static, budget) per run."""
    from resilient_tune.report import new_figure, save_figure

    figure = new_figure("grid.png", figsize=(12.0, 4.6), dpi=100)
    if figure is None:
        return None
    left, right = figure.subplots(1, 2)
    xs = list(range(len(summaries)))
    for name, label, marker in (("static", "static α = 0.5", "s"), ("resilient", "budget policy", "o")):
        ys = [s["models"][name]["general_loss_ratio"] for s in summaries]
        left.plot(xs, ys, marker, label=label, linestyle="none")
        right.plot(
            [100 * (s["models"][name]["general_vs_base"] or 0) for s in summaries],
            [100 * (s["models"][name]["target_gain_kept"] or 0) for s in summaries],
            marker,
            label=label,
            linestyle="none",
        )
    for i, s in enumerate(summaries):
        left.hlines(1 + s["budget"], i - 0.4, i + 0.4, color="C3", linewidth=1)
    left.set_xticks(xs, [s["name"].replace("-seed", "/") for s in summaries], rotation=90, fontsize=6)
    left.set_ylabel("held-out general loss / base's")
    left.set_title("budget honoured on held-out data (red: 1 + budget)", fontsize=9)
    left.legend(fontsize=7)
    right.axvline(0, color="C7", linestyle=":")
    right.set_xlabel("held-out general score vs base (%)")
    right.set_ylabel("held-out target gain kept (%)")
    right.set_title("every run: gain kept against general vs base", fontsize=9)
    right.legend(fontsize=7)
    figure.suptitle("resilience over fine-tune strengths: static α = 0.5 vs the online budget", fontsize=10)
    return save_figure(figure, path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenarios", nargs="+", choices=sorted(GRIDS), default=list(GRIDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="fine-tune seeds (default 0 1)")
    p.add_argument("--out", type=Path, default=Path("runs/grid"), help="run folder (default runs/grid)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds; checks the pipeline only)")
    p.add_argument("--reuse", action="store_true", help="read OUT/<run>/report.json where it exists")
    p.add_argument(
        "--metric-drop",
        type=float,
        default=None,
        help="a budget on the general probes' own score instead of their loss: at most D below the base's",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=None,
        help="bound the general-probe loss with this one-sided confidence (e.g. 0.95) instead of its mean",
    )
    p.add_argument(
        "--only", nargs="+", default=[], metavar="RUN", help="only these runs of the grid (by name)"
    )
    p.add_argument(
        "--decoder-base",
        type=Path,
        default=None,
        help="a pre-trained decoder base/ folder to start every decoder run from (default: the first run's)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    echo = (lambda line: print(line, file=sys.stderr)) if args.json else (lambda line: None)
    summaries = []
    base: Path | None = args.decoder_base
    for run in plan(args.scenarios, args.seeds, args.smoke, args.metric_drop, args.only, args.confidence):
        path = args.out / run["name"] / "report.json"
        if args.reuse and path.is_file():
            report = json.loads(path.read_text())
        else:
            print(f"grid: {run['name']}", file=sys.stderr, flush=True)
            report = _execute(run, args.out, args.smoke, base if run["scenario"] == "decoder" else None, echo)
        if run["scenario"] == "decoder" and base is None:
            base = Path((report.get("files") or {}).get("base", "base"))
            base = base if base.is_absolute() else args.out / run["name"] / base
        summaries.append(summarize_run(report, run))
    totals = aggregate(summaries)
    result = {
        "runs": summaries,
        "aggregate": totals,
        "smoke": args.smoke,
        "curve": list(CURVE),
        "margin": MARGIN,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_s": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid.json").write_text(json.dumps(result, indent=2) + "\n")
    image = plot(summaries, args.out / "grid.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(summaries, totals))
        if image is not None:
            print(f"\nplot: {image}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
