"""How many general probe pairs the ``budget`` policy needs, measured on validation data (issue 15).

On the encoder grid a 5% loss budget over 64 contrastive probe pairs was dominated in some runs whatever the
statistic (the mean, a 0.7 or a 0.95 confidence bound): the probes missed forgetting, or their noise stopped the
search early. This measures whether a larger probe set helps, on the validation scenario
(:func:`~resilient_tune.demo.data.validation_data`, none of the demo's test pairs), never on the test sets.

The validation fine-tunes are the ones ``confidence_validation.py`` makes (same target pairs, recipes and seeds). The
381 general validation pairs are split differently: **128 probe pairs** spread evenly over the set (in package order)
and the other **253 held out**. At each run's final weights θ:

1. the contrastive loss of each of the 128 probe pairs at α = 0, 0.05, ..., 1 of θ₀ + α(θ − θ₀), in two batches of
   64 (the callback's probe batches at ``per_device_eval_batch_size=64``): the even and the odd probes, each spread
   over the set;
2. every α of that grid scored on the held-out sets: recall@1 on target (314 pairs) and general (253), and the
   general loss in chunks of 64 drawn across the set;
3. the α each statistic aims at (the largest whose bound fits 1.05 × the base's probe loss, as the search finds it
   to its 0.05 tolerance) from **each batch alone** (64 probe pairs, as the demo has) and from **both** (128).

Per probe-set size and statistic: runs dominated (some α of the 21 at least as good on held-out general and more
than 2 points better on target, or the reverse), within budget on the held-out loss, gain kept, general vs base.
The 64-pair figures count both batches (two probe sets per run). Every loss has 63 in-batch negatives, the
probes' and the held-out set's alike.

Usage::

    python benchmarks/probe_size_validation.py --seeds 0 --out runs/probe-size --json > probe-size.json   # ~35 min
    python benchmarks/probe_size_validation.py --reuse --seeds 0 --out runs/probe-size                    # tables
    python benchmarks/probe_size_validation.py --smoke --seeds 0 --out /tmp/p                             # seconds
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table
from confidence_validation import BUDGET, SMOKE, _plan, _run, aimed_alpha, cell, command_line, judge, reuse

PROBES = 128
LEVELS = (0.5, 0.7, 0.95)  # the mean and the two levels measured on the test grid


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` indices of ``range(n)`` spread evenly from the first to the end (``k <= n``)."""
    if not 0 < k <= n:
        raise ValueError(f"spread_indices: need 0 < k <= n, got k={k}, n={n}")
    return [i * n // k for i in range(k)]


def probe_split(pairs: Any, k: int) -> tuple[Any, Any]:
    """``(probes, held-out)``: ``k`` pairs spread evenly over ``pairs`` and the rest, both in their order."""
    from resilient_tune.demo.data import Pairs

    picked = set(spread_indices(len(pairs), k))
    take = lambda keep: Pairs(  # noqa: E731
        [q for i, q in enumerate(pairs.queries) if (i in picked) == keep],
        [p for i, p in enumerate(pairs.passages) if (i in picked) == keep],
    )
    return take(True), take(False)


def halves(pairs: Any) -> list[Any]:
    """The even and the odd pairs of ``pairs``: two probe batches, each spread over the set like the whole."""
    from resilient_tune.demo.data import Pairs

    return [Pairs(pairs.queries[k::2], pairs.passages[k::2]) for k in (0, 1)]


def probe_sets(n: int) -> dict[str, list[int]]:
    """The probe sets judged per run, as positions in the per-pair losses of the two batches (even probes first):
    ``"64a"`` and ``"64b"`` (each batch alone) and all ``n``."""
    return {f"{n // 2}a": list(range(n // 2)), f"{n // 2}b": list(range(n // 2, n)), f"{n}": list(range(n))}


def judge_sets(row: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``probe set -> level -> judgement`` of one run (every α of the run's scores is the front)."""
    losses = {float(a): v for a, v in row["probe_losses"].items()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, picks in probe_sets(len(losses[0.0])).items():
        sub = {a: [v[i] for i in picks] for a, v in losses.items()}
        aimed = {str(level): aimed_alpha(sub, level, BUDGET) for level in LEVELS}
        out[name] = {str(level): judge({**row, "aimed": aimed}, level) for level in LEVELS}
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per probe-set size and level over runs (and both halves for the smaller size)."""
    judged = [judge_sets(row) for row in rows]
    table = []
    sizes = sorted({name.rstrip("ab") for j in judged for name in j}, key=int)
    for size in sizes:
        for level in LEVELS:
            js = [j[name][str(level)] for j in judged for name in j if name.rstrip("ab") == size]
            kept = [x["kept"] for x in js if x["kept"] is not None]
            table.append({
                "probes": int(size), "level": level, "trials": len(js),
                "dominated": sum(bool(x["dominated_by"]) for x in js),
                "within_budget": sum(x["within_budget"] for x in js),
                "mean_kept": sum(kept) / len(kept) if kept else None,
                "mean_general_vs_base": sum(x["general_vs_base"] for x in js) / len(js),
            })  # fmt: skip
    return table


def render(rows: Sequence[Mapping[str, Any]], table: Sequence[Mapping[str, Any]]) -> str:
    head = ["probes", "statistic", "dominated", "within budget (held-out loss)", "mean gain kept", "general vs base"]
    lines = [markdown_table(head, [[
        t["probes"], "mean" if t["level"] == 0.5 else f"{t['level']:g}", f"{t['dominated']}/{t['trials']}",
        f"{t['within_budget']}/{t['trials']}", "" if t["mean_kept"] is None else f"{t['mean_kept']:.0%}",
        f"{100 * t['mean_general_vs_base']:+.1f} points"] for t in table])]  # fmt: skip
    per_run = []
    for row in rows:
        for name, levels in judge_sets(row).items():
            per_run.append([row["name"], name, *(cell(j) for j in levels.values())])
    lines += ["", markdown_table(["run", "probes", *("mean" if x == 0.5 else f"{x:g}" for x in LEVELS)], per_run)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = command_line(__doc__.splitlines()[0], "runs/probe-size", "print the rows and the table as JSON").parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = _plan(args.seeds, args.out, args.smoke)
    if args.reuse:
        rows = reuse(runs, args.out, "probe_size_validation")
    else:
        from resilient_tune.demo.data import _validation_pairs, validation_data
        from resilient_tune.demo.encoder import _packaged_model

        smoke = SMOKE if args.smoke else {}
        data = validation_data(**{k: smoke[k] for k in ("target_test",) if k in smoke})  # the same fine-tunes
        general = _validation_pairs()["general"]
        n = 16 if args.smoke else PROBES
        probes, held = probe_split(general.head(48) if args.smoke else general, n)
        data = dataclasses.replace(data, general_probe=probes, general_test=held)
        path = args.model or _packaged_model()
        args.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {run['name']}", file=sys.stderr, flush=True)
            row = _run(run, data, path, args.smoke, every_alpha=True, probe_batches=halves(probes))
            row["data_sizes"] = data.sizes()
            (args.out / f"{run['name']}.json").write_text(json.dumps(row))
            rows.append(row)
    table = summarize(rows)
    if args.json:
        print(json.dumps({"rows": rows, "table": table, "budget": BUDGET, "probes": PROBES}))
    else:
        print(render(rows, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
