"""Merge speed: resilient-tune vs mergekit vs LM_Cocktail on the same three checkpoints, side by side.

Builds three seeded GPT-2-shaped checkpoints once (cached), then times each tool as a separate process
under ``/usr/bin/time -v`` (wall time and peak RSS, imports included), rotating the tool order every
repeat, and prints the median of the repeats, the ratios to mergekit (paired per repeat), how far the
outputs agree, and PASS/FAIL against the issue's targets.

    python benchmarks/merge_speed.py                      # gpt2-small, 3 repeats, every tool
    python benchmarks/merge_speed.py --size gpt2-medium
    python benchmarks/merge_speed.py --size tiny --repeats 1 --tools resilient-tune --json
    python benchmarks/merge_speed.py --plot docs/img/merge-speed.png   # the table's bars as a PNG too
    python benchmarks/merge_speed.py --from-json run.json --plot x.png  # report and plot of a run saved with --json

Building the checkpoints (transformers, torch) runs in a child process; this process imports only the standard
library while it measures, and numpy + safetensors afterwards to check the outputs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # the benchmarks folder is not a package: imported from its own directory
    Measurement,
    MissingToolError,
    add_result_options,
    drop_tree,
    load_result,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    require_gnu_time,
    rotated_orders,
    run_timed,
    wait_for_idle,
    warm_read,
)

WEIGHTS = (0.5, 0.3, 0.2)
MODEL_NAMES = ("model_a", "model_b", "model_c")
BUILD_VERSION = 1  # bump when the way checkpoints are built changes: invalidates the cache
AGREEMENT_ATOL = 1e-5  # fp32 sums taken in another order differ by ~1e-7 here; 1e-5 flags real differences
TARGET_WALL_RATIO = 0.45  # issue: resilient-tune wall <= 0.45x mergekit's
TARGET_RSS_MIB = 640.0  # issue: resilient-tune peak RSS <= 640 MiB (gpt2-small)
TARGET_SIZE = "gpt2-small"  # the size the targets are stated for


@dataclass(frozen=True)
class Size:
    """A checkpoint size: GPT2Config overrides and what it is meant to resemble."""

    name: str
    config: dict
    note: str


SIZES = {
    s.name: s
    for s in (
        Size(
            "tiny",
            {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 1000},
            "smoke-test size (~0.2M params): measures start-up, not merging",
        ),
        Size(
            "gpt2-small",
            {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 30522},
            "GPT-2-small body with a 30522-token vocabulary: 109.3M params, 417 MiB fp32 per file, "
            "largest tensor the 94 MB embedding (the reference anchor's model)",
        ),
        Size(
            "gpt2-medium",
            {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
            "GPT-2-medium exactly: 354.8M params, 1353 MiB fp32 per file, largest tensor the 206 MB embedding",
        ),
    )
}


# ----------------------------------------------------------------------------------------------- inputs


def _config_hash(size: Size) -> str:
    blob = json.dumps(
        {"config": size.config, "version": BUILD_VERSION, "models": MODEL_NAMES}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _build_checkpoints(size_config: dict, folder: str) -> dict:
    """Child process: write the three seeded checkpoints (safetensors, config, tokenizer) into ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # A character-level tokenizer: LM_Cocktail and mergekit copy the tokenizer, so one must exist.
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>"
    )
    config = GPT2Config(**size_config, bos_token_id=0, eos_token_id=0)
    info: dict = {}
    for seed, name in enumerate(MODEL_NAMES):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
        model.save_pretrained(Path(folder) / name)
        tokenizer.save_pretrained(Path(folder) / name)
        if not info:
            state = model.state_dict()
            info["params"] = sum(p.numel() for p in model.parameters())
            info["largest_tensor_bytes"] = max(t.numel() * t.element_size() for t in state.values())
        del model
    files = sorted(Path(folder).glob(f"{MODEL_NAMES[0]}/*.safetensors"))
    info["file_bytes"] = sum(f.stat().st_size for f in files)
    info["tied_lm_head"] = bool(config.tie_word_embeddings)
    return info


def _in_child(fn: Callable, *args: object) -> object:
    """Run ``fn(*args)`` in a fresh (spawned) process, so torch never loads into this one."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def prepare_inputs(size: Size, cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    """Return the folder holding the three checkpoints of ``size`` (built unless cached) and their facts."""
    root = cache_dir / f"{size.name}-{_config_hash(size)}"
    marker = root / "bench_config.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if all((root / m / "model.safetensors").is_file() for m in MODEL_NAMES):
            log(f"reusing cached checkpoints in {root}")
            return root, info
    log(f"building three {size.name} checkpoints in {root} (once; cached by config hash)")
    drop_tree(root)
    staging = Path(tempfile.mkdtemp(prefix=f".{size.name}-", dir=cache_dir))
    try:
        info = _in_child(_build_checkpoints, size.config, str(staging))
        info = {"size": size.name, "config": size.config, "hash": _config_hash(size), **info}
        (staging / "bench_config.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            staging.rename(root)  # the cache entry appears whole or not at all
        except OSError:
            if not marker.is_file():  # not a concurrent run that built the same entry first
                raise
            info = json.loads(marker.read_text())
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root, info


# ------------------------------------------------------------------------------------------------ tools

_FLOOR_SRC = """\
import os, sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
out_dir, args = sys.argv[1], sys.argv[2:]
paths, weights = args[0::2], [float(w) for w in args[1::2]]
os.makedirs(out_dir, exist_ok=True)
merged = load_file(paths[0])
for t in merged.values():
    t.mul_(weights[0])
for path, w in zip(paths[1:], weights[1:]):
    with safe_open(path, framework="pt") as f:
        for k in merged:
            merged[k].add_(f.get_tensor(k), alpha=w)
save_file(merged, out_dir + "/model.safetensors", metadata={"format": "pt"})
"""

_COCKTAIL_SRC = """\
import json, sys
from LM_Cocktail import mix_models
mix_models(json.loads(sys.argv[1]), "decoder", json.loads(sys.argv[2]), output_path=sys.argv[3])
"""


@dataclass(frozen=True)
class Tool:
    """A merge tool under test: how to check it is installed and the command that merges."""

    name: str
    label: str
    available: Callable[[], str | None]  # None when usable, else what to install
    command: Callable[[Sequence[Path], Path, Path], list[str]]  # (model dirs, out dir, work dir) -> argv


def _bin(name: str) -> str:
    """An executable next to this interpreter (the venv's console scripts), else on PATH, else ``name``."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _need_bin(name: str, install: str) -> Callable[[], str | None]:
    return lambda: (
        None if Path(_bin(name)).exists() or shutil.which(name) else f"`{name}` not found: {install}"
    )


def _need_module(module: str, install: str) -> Callable[[], str | None]:
    return lambda: (
        None if importlib.util.find_spec(module) else f"python module {module} not found: {install}"
    )


def _cmd_ours(models: Sequence[Path], out: Path, work: Path) -> list[str]:
    weights = [str(w) for w in WEIGHTS]
    return [
        _bin("resilient-tune"),
        "merge",
        *map(str, models),
        "--weights",
        *weights,
        "--out",
        str(out),
        "--quiet",
        "--overwrite",
    ]


def _cmd_mergekit(models: Sequence[Path], out: Path, work: Path) -> list[str]:
    lines = ["merge_method: linear", "dtype: float32", "parameters:", "  normalize: false", "models:"]
    for model, weight in zip(models, WEIGHTS):
        lines += [f"  - model: {model}", "    parameters:", f"      weight: {weight}"]
    config = work / "mergekit_linear.yml"
    config.write_text("\n".join(lines) + "\n")
    # --lazy-unpickle only matters for .bin inputs; safetensors are always read lazily (safe_open per tensor).
    return [_bin("mergekit-yaml"), str(config), str(out), "--lazy-unpickle", "--quiet"]


def _cmd_cocktail(models: Sequence[Path], out: Path, work: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        _COCKTAIL_SRC,
        json.dumps([str(m) for m in models]),
        json.dumps(list(WEIGHTS)),
        str(out),
    ]


def _cmd_floor(models: Sequence[Path], out: Path, work: Path) -> list[str]:
    pairs = [x for m, w in zip(models, WEIGHTS) for x in (str(m / "model.safetensors"), str(w))]
    return [sys.executable, "-c", _FLOOR_SRC, str(out), *pairs]


TOOLS = {
    t.name: t
    for t in (
        Tool(
            "resilient-tune",
            "resilient-tune `merge`",
            _need_bin("resilient-tune", "pip install -e . (from the repository root)"),
            _cmd_ours,
        ),
        Tool(
            "mergekit",
            "mergekit 0.1.5 `linear`",
            _need_bin("mergekit-yaml", "pip install 'resilient-tune[bench]'"),
            _cmd_mergekit,
        ),
        Tool(
            "lm-cocktail",
            "LM_Cocktail 0.0.4 `mix_models`",
            _need_module("LM_Cocktail", "pip install 'resilient-tune[bench]'"),
            _cmd_cocktail,
        ),
        Tool(
            "floor",
            "floor: load, weighted sum, one `save_file`",
            _need_module("safetensors", "pip install safetensors"),
            _cmd_floor,
        ),
    )
}
REFERENCE_TOOL = "mergekit"  # ratios are given against it
_WARM_IMPORTS = {
    "resilient-tune": "import torch, safetensors.torch, resilient_tune",
    "mergekit": "import torch, transformers, mergekit.merge",
    "lm-cocktail": "import torch, transformers, LM_Cocktail",
    "floor": "import torch, safetensors.torch",
}


# ------------------------------------------------------------------------------------------- agreement


def _safetensors_keys(folder: str) -> dict[str, str]:
    from safetensors import safe_open

    where: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            where |= dict.fromkeys(f.keys(), str(path))
    return where


def check_outputs(
    inputs: list[str], weights: list[float], outputs: dict[str, str], reference: str | None
) -> dict:
    """Compare each output with the exact float64 weighted sum of the inputs, and with ``reference``'s output.

    Reads with ``safetensors.numpy`` one tensor at a time (no torch import; float32 checkpoints). Only keys
    present on both sides are compared (transformers' ``save_pretrained`` drops GPT-2's tied
    ``lm_head.weight``; other tools may write it): the keys that differ are listed, not hidden.

    Returns:
        Per output name: keys compared, missing and extra keys, dtypes, the two max abs differences, and
        ``ok`` (every input key present and within ``AGREEMENT_ATOL`` of the exact sum).
    """
    import numpy as np
    from safetensors import safe_open

    in_keys = [_safetensors_keys(p) for p in inputs]
    out_keys = {name: _safetensors_keys(folder) for name, folder in outputs.items()}
    handles: dict[str, object] = {}

    def get(path: str, key: str) -> np.ndarray:
        if path not in handles:
            handles[path] = safe_open(path, framework="np")
        return handles[path].get_tensor(key)  # type: ignore[attr-defined]

    report: dict = {}
    for name, keys in out_keys.items():
        shared = sorted(set(keys) & set(in_keys[0]))
        ref_keys = out_keys.get(reference, {}) if reference and name != reference else {}
        diff_exact = diff_ref = 0.0
        dtypes: set[str] = set()
        for k in shared:
            got = get(keys[k], k)
            dtypes.add(str(got.dtype))
            exact = sum(w * get(src[k], k).astype(np.float64) for w, src in zip(weights, in_keys))
            diff_exact = max(diff_exact, float(np.max(np.abs(got - exact), initial=0.0)))
            if k in ref_keys:
                diff_ref = max(
                    diff_ref, float(np.max(np.abs(got.astype(np.float64) - get(ref_keys[k], k)), initial=0.0))
                )
        missing = sorted(set(in_keys[0]) - set(keys))
        report[name] = {
            "keys_compared": len(shared),
            "missing_keys": missing,
            "extra_keys": sorted(set(keys) - set(in_keys[0])),
            "dtypes": sorted(dtypes),
            "max_abs_diff_vs_exact": diff_exact,
            "max_abs_diff_vs_reference": diff_ref if ref_keys else None,
            "ok": bool(shared) and not missing and diff_exact <= AGREEMENT_ATOL,
        }
    return report


# ------------------------------------------------------------------------------------------------- run


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # Let every tool cache its bytecode, as an installed package does (the warm-up compiles it, untimed);
    # with PYTHONDONTWRITEBYTECODE an editable install would recompile its sources on every run.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    return env


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """Build or reuse the inputs, time every tool ``args.repeats`` times, check the outputs; return the results."""
    require_gnu_time()
    size = SIZES[args.size]
    tools = [TOOLS[name] for name in args.tools]
    missing = [f"{t.name}: {why}" for t in tools if (why := t.available())]
    if missing:
        raise MissingToolError("cannot run " + "; ".join(missing))
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    inputs_dir, facts = prepare_inputs(size, cache_dir, log)
    if args.prepare_only:
        return {"benchmark": "merge_speed", "size": size.name, "inputs": {"folder": str(inputs_dir), **facts}}
    models = [inputs_dir / m for m in MODEL_NAMES]
    revision_at_start = _source_revision()
    code_at_start = _merge_code_hash()  # an editable install can change under a long run: compare at the end
    work = Path(tempfile.mkdtemp(prefix=f"run-{size.name}-", dir=cache_dir))
    env = _environment()
    try:
        log("warm-up (untimed): reading the inputs once and importing each tool once")
        warm_read(sorted(p for m in models for p in m.iterdir() if p.is_file()))
        for tool in tools:
            _ = run_timed([sys.executable, "-c", _WARM_IMPORTS[tool.name]], env=env)
        runs: dict[str, list[dict]] = {t.name: [] for t in tools}
        failures: dict[str, str] = {}
        orders = rotated_orders([t.name for t in tools], args.repeats)
        kept: dict[str, str] = {}
        for r, order in enumerate(orders):
            for name in order:
                if name in failures:
                    continue
                out = work / "out" / name
                m, idle, attempts = _run_quietest(TOOLS[name], models, out, work, env, args, log)
                if m.returncode != 0:
                    failures[name] = f"exit {m.returncode}: {m.stderr_tail}"
                    log(f"  repeat {r + 1}: {name} FAILED (exit {m.returncode})\n{m.stderr_tail}")
                    continue
                runs[name].append(_as_row(m, r, idle, attempts))
                log(
                    f"  repeat {r + 1}: {name:<15} {m.wall_s:7.2f} s  {m.max_rss_mib:7.0f} MiB  "
                    f"cpu {m.cpu_s:6.1f} s  other load {_fmt(m.background_cores, '.2f')} cores"
                )
                if name not in kept:  # keep the first output of each tool for the agreement check
                    kept[name] = str(work / "check" / name)
                    Path(kept[name]).parent.mkdir(exist_ok=True)
                    out.rename(kept[name])
                drop_tree(out.parent)
        log("checking that the outputs agree (untimed)")
        reference = "resilient-tune" if "resilient-tune" in kept else None
        inputs = [str(m) for m in models]
        agreement = check_outputs(inputs, list(WEIGHTS), kept, reference) if kept else {}
        commands = {t.name: _display_command(t, models, work) for t in tools}
        mergekit_yml = work / "mergekit_linear.yml"
        mergekit_config = mergekit_yml.read_text() if mergekit_yml.exists() else None
    finally:
        drop_tree(work)
    return {
        "benchmark": "merge_speed",
        "size": size.name,
        "size_note": size.note,
        "inputs": {"folder": str(inputs_dir), **facts},
        "weights": list(WEIGHTS),
        "repeats": args.repeats,
        "orders": orders,
        "commands": commands,
        "mergekit_config": mergekit_config,
        "resilient_tune_source": revision_at_start,
        "resilient_tune_source_changed_during_run": _merge_code_hash() != code_at_start,
        "machine": machine_info(
            ("torch", "safetensors", "transformers", "mergekit", "LM_Cocktail", "resilient-tune")
        ),
        "runs": runs,
        "failures": failures,
        "summary": summarize(runs),
        "agreement": agreement,
        "agreement_reference": reference,
        "targets": evaluate_targets(size.name, summarize(runs)),
    }


def _run_quietest(
    tool: Tool,
    models: Sequence[Path],
    out: Path,
    work: Path,
    env: dict[str, str],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> tuple[Measurement, float | None, int]:
    """Time one run of ``tool``; re-run (up to ``args.retries`` times) while other processes load the machine.

    Before each attempt, waits for a quiet window. Returns the quietest attempt's measurement, the load
    seen just before it, and the number of attempts; a failed run is returned at once.
    """
    best: tuple[Measurement, float | None] | None = None
    attempts = 0
    for attempts in range(1, args.retries + 2):
        drop_tree(out.parent)
        out.parent.mkdir(parents=True)
        idle = wait_for_idle(args.max_other_load, args.max_wait) if args.max_wait > 0 else None
        m = run_timed(tool.command(models, out, work), env=env, timeout_s=args.timeout)
        if m.returncode != 0:
            return m, idle, attempts
        if best is None or (m.background_cores or 0.0) < (best[0].background_cores or 0.0):
            best = (m, idle)
        if (m.background_cores or 0.0) <= args.max_other_load:
            break
        log(
            f"    {tool.name}: other processes used {m.background_cores:.2f} cores during the run; re-running"
        )
    assert best is not None  # the loop ran at least once
    return best[0], best[1], attempts


# The files `resilient-tune merge` runs: local changes to them make a measurement "+dirty".
_MERGE_PATH = [
    f"resilient_tune/{p}"
    for p in ("merging", "checkpoint", "api.py", "cli.py", "sources.py", "card.py", "recipe.py")
]


def _merge_code_hash() -> str | None:
    """sha256 over the Python sources `resilient-tune merge` runs (detects edits, committed or not)."""
    spec = importlib.util.find_spec("resilient_tune")
    if spec is None or spec.origin is None:
        return None
    repo = Path(spec.origin).resolve().parent.parent
    digest = hashlib.sha256()
    for rel in _MERGE_PATH:
        path = repo / rel
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(str(file.relative_to(repo)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def _source_revision() -> str | None:
    """The git commit of the resilient-tune checkout being measured (``+dirty`` with local changes), if any."""
    spec = importlib.util.find_spec("resilient_tune")
    if spec is None or spec.origin is None:
        return None
    repo = Path(spec.origin).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", *_MERGE_PATH],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _as_row(m: Measurement, repeat: int, idle_before: float | None, attempts: int) -> dict:
    return {
        "repeat": repeat,
        "wall_s": m.wall_s,
        "max_rss_mib": round(m.max_rss_mib, 1),
        "cpu_s": round(m.cpu_s, 2),
        "other_load_cores": m.background_cores,  # CPU used by other processes during the run
        "load_before_cores": idle_before,
        "attempts": attempts,
    }


def _display_command(tool: Tool, models: Sequence[Path], work: Path) -> str:
    """The command as a reader would type it: inputs as A B C, the output as OUT."""
    if tool.name == "lm-cocktail":
        return "python -c 'from LM_Cocktail import mix_models; mix_models([A, B, C], \"decoder\", [0.5, 0.3, 0.2], output_path=OUT)'"
    if tool.name == "floor":
        return "python -c 'merged = load_file(A) * 0.5; merged += 0.3 * B + 0.2 * C (safe_open, per tensor); save_file(merged, OUT)'"
    names = {str(m): letter for m, letter in zip(models, "ABC")} | {
        str(work / "mergekit_linear.yml"): "config.yml"
    }
    cmd = [
        Path(c).name if i == 0 else names.get(c, c)
        for i, c in enumerate(tool.command(models, Path("OUT"), work))
    ]
    return shlex.join(cmd)


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per tool: median wall, RSS and CPU time; wall and RSS ratios to mergekit (median of per-repeat ratios)."""
    ref = {r["repeat"]: r for r in runs.get(REFERENCE_TOOL, [])}
    summary = {}
    for name, rows in runs.items():
        if not rows:
            continue
        walls = [r["wall_s"] for r in rows]
        s = {
            "wall_s": median(walls),
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "max_rss_mib": median([r["max_rss_mib"] for r in rows]),
            "cpu_s": median([r["cpu_s"] for r in rows]),
            "other_load_max_cores": max((r["other_load_cores"] or 0.0) for r in rows),
            "n": len(rows),
        }
        paired = [(r, ref[r["repeat"]]) for r in rows if r["repeat"] in ref]
        if paired:
            s["wall_vs_mergekit"] = median(
                paired_ratios([a["wall_s"] for a, _ in paired], [b["wall_s"] for _, b in paired])
            )
            s["rss_vs_mergekit"] = median(
                paired_ratios([a["max_rss_mib"] for a, _ in paired], [b["max_rss_mib"] for _, b in paired])
            )
        summary[name] = s
    return summary


def evaluate_targets(size: str, summary: dict[str, dict]) -> list[dict]:
    """The issue's two targets for resilient-tune, each with the measured value and PASS/FAIL/n/a."""
    ours = summary.get("resilient-tune", {})
    applies = size == TARGET_SIZE
    wall_ratio = ours.get("wall_vs_mergekit")
    rss = ours.get("max_rss_mib")

    def verdict(value: float | None, limit: float) -> str:
        if value is None:
            return "n/a (not measured)"
        return ("PASS" if value <= limit else "FAIL") if applies else f"n/a (targets are for {TARGET_SIZE})"

    return [
        {
            "target": f"wall <= {TARGET_WALL_RATIO}x mergekit",
            "value": wall_ratio,
            "verdict": verdict(wall_ratio, TARGET_WALL_RATIO),
        },
        {
            "target": f"peak RSS <= {TARGET_RSS_MIB:.0f} MiB",
            "value": rss,
            "verdict": verdict(rss, TARGET_RSS_MIB),
        },
    ]


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render(result: dict) -> str:
    """The human-readable report: setup, the timing table, agreement, targets."""
    inp, mach = result["inputs"], result["machine"]
    lines = [
        f"## Merge speed: {result['size']} (median of {result['repeats']} repeats, tool order rotated)",
        "",
        f"Inputs: 3 checkpoints, {inp['params'] / 1e6:.1f}M params, {inp['file_bytes'] / 2**20:.0f} MiB fp32 each, "
        f"largest tensor {inp['largest_tensor_bytes'] / 1e6:.0f} MB; weights {result['weights']}.",
        f"Machine: {mach['cores']} cores, {mach['ram_gib']} GiB RAM, {mach['cpu']}; Python {mach['python']}, "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
        + f" (source {result.get('resilient_tune_source') or 'unknown'})",
        "",
    ]
    rows = []
    for name, s in result["summary"].items():
        rows.append(
            [
                TOOLS[name].label,
                f"{s['wall_s']:.2f} s",
                f"{s['wall_min_s']:.2f}–{s['wall_max_s']:.2f}",
                f"{s['max_rss_mib']:.0f} MiB",
                f"{s['cpu_s']:.1f} s",
                _fmt(s.get("wall_vs_mergekit"), ".2f", "×"),
                _fmt(s.get("rss_vs_mergekit"), ".2f", "×"),
            ]
        )
    headers = [
        "tool",
        "wall (median)",
        "wall range",
        "peak RSS",
        "CPU (user+sys)",
        "wall / mergekit",
        "RSS / mergekit",
    ]
    lines += [markdown_table(headers, rows), ""]
    for name, why in result["failures"].items():
        lines.append(f"FAILED {name}: {why}")
    if result["agreement"]:
        ref = result["agreement_reference"]
        rows = []
        for name, a in result["agreement"].items():
            vs_ref = a["max_abs_diff_vs_reference"]
            rows.append(
                [
                    name,
                    a["keys_compared"],
                    ", ".join(a["missing_keys"]) or "–",
                    ", ".join(a["extra_keys"]) or "–",
                    "/".join(a["dtypes"]),
                    f"{a['max_abs_diff_vs_exact']:.2e}",
                    "–" if vs_ref is None else f"{vs_ref:.2e}",
                    "yes" if a["ok"] else "NO",
                ]
            )
        headers = [
            "output",
            "keys compared",
            "missing",
            "extra",
            "dtype",
            "max abs diff vs exact",
            f"max abs diff vs {ref or 'reference'}",
            "agrees",
        ]
        lines += [
            "Agreement (shared keys; exact = Σ wᵢ·θᵢ in float64 from the inputs):",
            "",
            markdown_table(headers, rows),
            "",
        ]
    if result.get("resilient_tune_source_changed_during_run"):
        lines += ["WARNING: the resilient-tune source changed during the run; the repeats mix versions.", ""]
    lines.append(f"Targets (issue, for {TARGET_SIZE}; resilient-tune):")
    for t in result["targets"]:
        value = t["value"]
        shown = (
            "not measured"
            if value is None
            else (f"{value:.2f}×" if "mergekit" in t["target"] else f"{value:.0f} MiB")
        )
        lines.append(f"  {t['target']:<28} measured {shown:<14} {t['verdict']}")
    lines += ["", "Commands (OUT is a fresh folder per run):"] + [
        f"  {n}: {c}" for n, c in result["commands"].items()
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Two bar panels from one run's results: wall time (median, whiskers from the fastest to the slowest repeat)
    and peak RSS per tool, each bar labelled with its value. Returns the PNG's path, or ``None`` (with a warning)
    when matplotlib is not installed."""
    from resilient_tune.report import new_figure, save_figure

    summary = result["summary"]
    if not summary:
        return None
    names = list(summary)
    labels = [TOOLS[n].label.replace(" `", "\n`").replace("`", "") for n in names]
    figure = new_figure(path.name, figsize=(10.0, 0.9 + 0.7 * len(names)), dpi=100)
    if figure is None:
        return None
    left, right = figure.subplots(1, 2, sharey=True)
    colours = ["C0" if n == "resilient-tune" else "C7" for n in names]
    ys = list(range(len(names)))
    walls = [summary[n]["wall_s"] for n in names]
    spread = [
        [w - summary[n]["wall_min_s"] for n, w in zip(names, walls)],
        [summary[n]["wall_max_s"] - w for n, w in zip(names, walls)],
    ]
    left.barh(ys, walls, xerr=spread, color=colours, capsize=3)
    left.set_xlabel("wall time, s (median; whiskers: fastest–slowest repeat)")
    rss = [summary[n]["max_rss_mib"] for n in names]
    right.barh(ys, rss, color=colours)
    right.set_xlabel("peak RSS, MiB")
    labels_at = (
        (left, [f"{w:.2f} s" for w in walls], [summary[n]["wall_max_s"] for n in names]),  # past the whisker
        (right, [f"{r:.0f} MiB" for r in rss], rss),
    )
    for ax, texts, ends in labels_at:
        for y, text, end in zip(ys, texts, ends):
            ax.annotate(text, (end, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.margins(x=0.25)
    left.set_yticks(ys, labels, fontsize=8)
    left.invert_yaxis()
    inp = result["inputs"]
    figure.suptitle(
        f"merge of 3 checkpoints, {result['size']} ({inp['params'] / 1e6:.1f}M params, "
        f"{inp['file_bytes'] / 2**20:.0f} MiB each), median of {result['repeats']}",
        fontsize=10,
    )
    return save_figure(figure, path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--size", choices=sorted(SIZES), default="gpt2-small", help="checkpoint size (default gpt2-small)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per tool; the median is reported (default 3)"
    )
    p.add_argument(
        "--tools",
        nargs="+",
        choices=list(TOOLS),
        default=list(TOOLS),
        metavar="TOOL",
        help=f"tools to run, from {', '.join(TOOLS)} (default: all)",
    )
    p.add_argument(
        "--cache-dir",
        default="/tmp/rt-bench",
        help="where the input checkpoints are cached (default /tmp/rt-bench)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before a single run is killed (default 1800)"
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="wait before each run until other processes use fewer cores than this, and re-run a run "
        "during which they used more (default 0.3 cores)",
    )
    p.add_argument(
        "--retries", type=int, default=2, help="re-runs of a run disturbed by other load (default 2)"
    )
    p.add_argument(
        "--max-wait", type=float, default=120.0, help="longest wait for that quiet window, s (0: never wait)"
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="build (or find) the cached inputs, print their facts, exit",
    )
    p.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout (progress goes to stderr)"
    )
    add_result_options(p, "also draw wall time and peak RSS per tool into this PNG")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats is {args.repeats}; pass 1 or more")
    args.tools = list(dict.fromkeys(args.tools))
    return args


_RESULT_KEYS = {
    "size",
    "repeats",
    "inputs",
    "machine",
    "summary",
    "agreement",
    "failures",
    "targets",
    "commands",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 0 when every tool ran and the outputs agree, 1 otherwise, 2 on setup errors."""
    args = _parse_args(argv)
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the output folders are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.from_json is not None:
        try:
            result = load_result(args.from_json, _RESULT_KEYS, "merge_speed")
        except ValueError as exc:
            log(f"merge_speed: {exc}")
            return 2
    else:
        try:
            result = run_benchmark(args, log)
        except MissingToolError as exc:
            log(f"merge_speed: {exc}")
            return 2
    if args.prepare_only:
        print(json.dumps(result["inputs"], indent=2))
        return 0
    print(json.dumps(result, indent=2) if args.json else render(result))
    if args.plot is not None and plot(result, args.plot) is not None:
        log(f"merge_speed: plot written to {args.plot}")
    agree = all(a["ok"] for a in result["agreement"].values())
    return 0 if not result["failures"] and agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
