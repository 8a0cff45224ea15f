"""The ``resilient-tune`` command line.

Subcommands import what they need when they run, so ``resilient-tune merge`` never imports transformers.
Errors are one line on stderr, no traceback: exit status 2 for usage errors, 1 for failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

PROG = "resilient-tune"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage first; keep it short)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Merge fine-tuned models with their base and peers (LM-Cocktail)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("merge", help="merge checkpoints into a new checkpoint folder")
    m.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint folders or .safetensors files")
    m.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one weight per model (default: equal)"
    )
    m.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output folder (written atomically)"
    )
    m.add_argument(
        "--method", default="linear", help="merge method (see `resilient-tune methods`); default linear"
    )
    m.add_argument("--base", metavar="PATH", help="base model for task-vector methods (ties, dare_*, ...)")
    m.add_argument("--density", type=float, help="fraction of task-vector entries kept, in (0, 1]")
    m.add_argument(
        "--lambda", dest="lambda_", type=float, metavar="L", help="scale of the merged task vector"
    )
    m.add_argument("--gamma", type=float, help="breadcrumbs: fraction of largest magnitudes dropped")
    m.add_argument("--lines-alpha", type=float, help="LiNeS: scale of the shallowest layer")
    m.add_argument("--lines-beta", type=float, help="LiNeS: extra scale of the deepest layer")
    m.add_argument(
        "--epsilon", type=float, help="DELLA: spread of the keep probabilities, density +/- epsilon"
    )
    m.add_argument("--t", type=float, metavar="T", help="SLERP: 0 = the base, 1 = the model; default 0.5")
    m.add_argument(
        "--dtype", default="auto", help="output dtype: auto (as inputs), float32, float16, bfloat16"
    )
    m.add_argument("--max-shard-size", default="5GB", help="shard the output above this size (default 5GB)")
    m.add_argument("--normalize", action="store_true", help="divide the weights by their sum")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.add_argument("--seed", type=int, default=0, help="seed of random methods (DARE); default 0")
    m.add_argument(
        "--allow-pickle", action="store_true", help="allow .bin pickle checkpoints (trusted files only)"
    )
    m.add_argument(
        "--allow-grown-vocab",
        action="store_true",
        help="merge inputs whose embedding/head differ only by appended rows (tokens added before fine-tuning; "
        "the grown model first, linear only)",
    )
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    w = sub.add_parser("weights", help="auto weights from a few examples (LM-Cocktail: softmax(-loss/T))")
    w.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint folders (transformers layout)")
    w.add_argument(
        "--examples", required=True, type=Path, metavar="FILE.jsonl", help="one JSON example per line"
    )
    w.add_argument("--model-type", required=True, choices=["decoder", "encoder", "reranker"])
    w.add_argument("--temperature", type=float, default=5.0, help="softmax temperature (default 5.0)")
    w.add_argument("--batch-size", type=int, default=2)
    w.add_argument("--max-input-length", type=int, default=2048)
    w.add_argument("--neg-number", type=int, default=7, help="negatives per query (encoder, reranker)")
    w.add_argument("--seed", type=int, default=0, help="seed of negative sampling")
    w.add_argument("--json", action="store_true", help="print JSON (weights and losses) instead of a table")

    sub.add_parser("methods", help="list the registered merge methods")

    d = sub.add_parser(
        "demo",
        help="fine-tune a real pre-trained model, watch it forget, recover (the main job; ~4 min on 2 CPU cores)",
    )
    d.add_argument(
        "--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="run folder (default runs/demo)"
    )
    d.add_argument(
        "--scenario",
        default="encoder",
        choices=["encoder", "decoder"],
        help="what to fine-tune (default encoder)",
    )
    d.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="fine-tuning steps (default: the documented recipe: encoder 75, decoder 100)",
    )
    d.add_argument("--seed", type=int, help="seed of data order and dropout (default 0)")
    d.add_argument(
        "--lr", type=float, metavar="LR", help="learning rate (default: encoder 5e-4, decoder 3e-4)"
    )
    d.add_argument(
        "--drift-budget",
        type=float,
        metavar="B",
        help="budget policy: allowed general-loss increase (default: encoder 0.05, decoder 0.02)",
    )
    d.add_argument(
        "--metric-drop",
        type=float,
        metavar="D",
        help="bound the general probes' own score (recall@1 / next-char accuracy) instead of their loss: at most "
        "D below the base's (0.01 = one point)",
    )
    d.add_argument(
        "--confidence",
        type=float,
        metavar="C",
        help="budget policy: bound the general-probe loss with one-sided confidence C (e.g. 0.95) instead of its "
        "mean, from the spread of its per-example increase",
    )

    r = sub.add_parser(
        "report", help="rebuild the table and plot of a run (demo or any CocktailCallback run)"
    )
    r.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="demo --out folder, a Trainer output_dir or checkpoint"
    )
    r.add_argument("--plot", type=Path, metavar="PNG", help="where to draw the plot (default: in RUN_DIR)")
    r.add_argument("--json", action="store_true", help="print the report JSON instead of the table")
    return parser


def _version() -> str:
    from ._version import __version__

    return __version__


def _cmd_merge(args: argparse.Namespace) -> int:
    from .api import merge

    options = {
        name: value
        for name, value in (
            ("density", args.density),
            ("lambda", args.lambda_),
            ("gamma", args.gamma),
            ("lines_alpha", args.lines_alpha),
            ("lines_beta", args.lines_beta),
            ("epsilon", args.epsilon),
            ("t", args.t),
        )
        if value is not None
    }
    out = merge(
        args.models,
        args.weights,
        method=args.method,
        base=args.base,
        out=args.out,
        dtype=args.dtype,
        normalize=args.normalize,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        allow_grown_vocab=args.allow_grown_vocab,
        seed=args.seed,
        progress=not args.quiet,
        options=options,
    )
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _read_examples(path: Path) -> list[dict]:
    from .errors import UsageError

    if not path.is_file():
        raise UsageError(f"examples file {str(path)!r} does not exist; pass a JSON-lines file to --examples")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path}:{number}: not valid JSON ({exc.msg}); write one JSON object per line"
            ) from None
    return examples


def _cmd_weights(args: argparse.Namespace) -> int:
    from .weights import compute_auto_weights

    result = compute_auto_weights(
        args.models,
        args.model_type,
        _read_examples(args.examples),
        temperature=args.temperature,
        batch_size=args.batch_size,
        max_input_length=args.max_input_length,
        neg_number=args.neg_number,
        seed=args.seed,
    )
    if args.json:
        print(
            json.dumps(
                {"models": args.models, "weights": list(result.weights), "losses": list(result.losses)}
            )
        )
    else:
        width = max(len(m) for m in args.models)
        print(f"{'model':<{width}}  {'loss':>10}  {'weight':>8}")
        for model, loss, weight in zip(args.models, result.losses, result.weights):
            print(f"{model:<{width}}  {loss:>10.4f}  {weight:>8.4f}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .merging import METHODS

    for spec in METHODS.values():
        defaults = ", ".join(f"{k}={v:g}" for k, v in spec.defaults.items()) or "-"
        print(f"{spec.name:<18} {spec.description}  [{defaults}]  {spec.paper}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    options = {
        name: value
        for name, value in (
            ("seed", args.seed),
            ("learning_rate", args.lr),
            ("drift_budget", args.drift_budget),
            ("metric_drop", args.metric_drop),
            ("confidence", args.confidence),
        )
        if value is not None
    }
    run_demo(args.out, args.scenario, steps=args.steps, **options)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .demo.report import load_run, render_run

    if args.json:
        print(json.dumps(load_run(args.run_dir)[1], indent=2, ensure_ascii=False))
        return 0
    table, plot = render_run(args.run_dir, args.plot)
    print(table)
    if plot is not None:
        print(f"\nplot: {plot}")
    return 0


_COMMANDS = {
    "merge": _cmd_merge,
    "weights": _cmd_weights,
    "methods": _cmd_methods,
    "demo": _cmd_demo,
    "report": _cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 usage error, 130 interrupted)."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed --help / --version (0) or a usage error (2) already
        return exc.code if isinstance(exc.code, int) else 2
    from .errors import ResilientTuneError, UsageError

    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except (ResilientTuneError, OSError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; nothing was written\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
