"""The merge-speed benchmark's settings (what is merged: linear over three models, SLERP between two) and its tools
(resilient-tune, an earlier resilient-tune tree, mergekit, LM_Cocktail, a bare read-sum-write floor): for each, whether
it is installed and the command line that merges."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from _merge_inputs import MODEL_NAMES


@dataclass(frozen=True)
class Setting:
    """One merge to time: its method, the models it reads (by index into MODEL_NAMES) and its parameters.

    ``weights`` are the linear weights; for SLERP, ``models[0]`` is the base and ``t`` the weight of ``models[1]``.
    """

    method: str
    models: tuple[int, ...]
    weights: tuple[float, ...] = ()
    t: float | None = None

    def describe(self) -> str:
        names = ", ".join(MODEL_NAMES[i] for i in self.models)
        if self.method == "slerp":
            return f"SLERP from {MODEL_NAMES[self.models[0]]} (the base) to {MODEL_NAMES[self.models[1]]}, t = {self.t}"
        return f"linear over {names}, weights {list(self.weights)}"


SETTINGS = {
    "linear": Setting("linear", (0, 1, 2), weights=(0.5, 0.3, 0.2)),
    "slerp": Setting("slerp", (0, 1), t=0.3),
}

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

# The CLI of a resilient-tune source tree (an earlier revision), whatever is installed.
_TREE_SRC = """\
import sys
sys.path.insert(0, sys.argv[1])
from resilient_tune.cli import main
raise SystemExit(main(sys.argv[2:]))
"""

Command = Callable[
    [Setting, Sequence[Path], Path, Path], list[str]
]  # (setting, model dirs, out, work) -> argv


@dataclass(frozen=True)
class Tool:
    """A merge tool under test: the settings it can run, how to check it is installed, and the command that merges."""

    name: str
    label: str
    methods: tuple[str, ...]
    available: Callable[[], str | None]  # None when usable, else what to install
    command: Command
    warm_import: str  # imported once, untimed, before the first run (bytecode caches, page cache)


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


def _merge_args(setting: Setting, models: Sequence[Path], out: Path) -> list[str]:
    """``resilient-tune merge``'s arguments for ``setting`` (``models`` are the setting's own, in order)."""
    if setting.method == "slerp":
        picked = [str(models[1]), "--base", str(models[0]), "--method", "slerp", "--t", str(setting.t)]
    else:
        picked = [*map(str, models), "--weights", *map(str, setting.weights)]
    return ["merge", *picked, "--out", str(out), "--quiet", "--overwrite"]


def _cmd_ours(setting: Setting, models: Sequence[Path], out: Path, work: Path) -> list[str]:
    return [_bin("resilient-tune"), *_merge_args(setting, models, out)]


def baseline_tool(tree: Path) -> Tool:
    """resilient-tune's CLI run from an earlier source tree (``git worktree add DIR REV``), the same way as ours."""
    rev = _tree_revision(tree)

    def command(setting: Setting, models: Sequence[Path], out: Path, work: Path) -> list[str]:
        return [sys.executable, "-c", _TREE_SRC, str(tree), *_merge_args(setting, models, out)]

    def available() -> str | None:
        if (tree / "resilient_tune" / "cli.py").is_file():
            return None
        return f"{tree} holds no resilient_tune/cli.py; pass a checkout, e.g. `git worktree add {tree} <rev>`"

    warm = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); import torch, resilient_tune.cli, resilient_tune.api"
    )
    return Tool("baseline", f"resilient-tune `merge` at {rev}", ("linear", "slerp"), available, command, warm)


def _tree_revision(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return str(tree)
    return out.stdout.strip()


def _cmd_mergekit(setting: Setting, models: Sequence[Path], out: Path, work: Path) -> list[str]:
    config = work / f"mergekit_{setting.method}.yml"
    config.write_text(mergekit_config(setting, models))
    # --lazy-unpickle only matters for .bin inputs; safetensors are always read lazily (safe_open per tensor).
    return [_bin("mergekit-yaml"), str(config), str(out), "--lazy-unpickle", "--quiet"]


def mergekit_config(setting: Setting, models: Sequence[Path]) -> str:
    """mergekit's YAML for ``setting``: linear without normalisation, or SLERP from ``models[0]`` (its base_model)."""
    if setting.method == "slerp":
        lines = [
            "merge_method: slerp",
            f"base_model: {models[0]}",
            "dtype: float32",
            "parameters:",
            f"  t: {setting.t}",
            "models:",
            *(f"  - model: {m}" for m in models),
        ]
    else:
        lines = ["merge_method: linear", "dtype: float32", "parameters:", "  normalize: false", "models:"]
        for model, weight in zip(models, setting.weights):
            lines += [f"  - model: {model}", "    parameters:", f"      weight: {weight}"]
    return "\n".join(lines) + "\n"


def _cmd_cocktail(setting: Setting, models: Sequence[Path], out: Path, work: Path) -> list[str]:
    paths = json.dumps([str(m) for m in models])
    return [sys.executable, "-c", _COCKTAIL_SRC, paths, json.dumps(list(setting.weights)), str(out)]


def _cmd_floor(setting: Setting, models: Sequence[Path], out: Path, work: Path) -> list[str]:
    pairs = [x for m, w in zip(models, setting.weights) for x in (str(m / "model.safetensors"), str(w))]
    return [sys.executable, "-c", _FLOOR_SRC, str(out), *pairs]


TOOLS = {
    t.name: t
    for t in (
        Tool(
            "resilient-tune",
            "resilient-tune `merge`",
            ("linear", "slerp"),
            _need_bin("resilient-tune", "pip install -e . (from the repository root)"),
            _cmd_ours,
            "import torch, resilient_tune.cli, resilient_tune.api",
        ),
        Tool(
            "mergekit",
            "mergekit 0.1.5",
            ("linear", "slerp"),
            _need_bin("mergekit-yaml", "pip install 'resilient-tune[bench]'"),
            _cmd_mergekit,
            "import torch, transformers, mergekit.merge",
        ),
        Tool(
            "lm-cocktail",
            "LM_Cocktail 0.0.4 `mix_models`",
            ("linear",),
            _need_module("LM_Cocktail", "pip install 'resilient-tune[bench]'"),
            _cmd_cocktail,
            "import torch, transformers, LM_Cocktail",
        ),
        Tool(
            "floor",
            "floor: load, weighted sum, one `save_file`",
            ("linear",),
            _need_module("safetensors", "pip install safetensors"),
            _cmd_floor,
            "import torch, safetensors.torch",
        ),
    )
}
REFERENCE_TOOL = "mergekit"  # ratios are given against it


def display_command(tool: Tool, setting: Setting, models: Sequence[Path], work: Path) -> str:
    """The command as a reader would type it: inputs as A B C, the output as OUT."""
    if tool.name == "lm-cocktail":
        return (
            "python -c 'from LM_Cocktail import mix_models; "
            f'mix_models([A, B, C], "decoder", {list(setting.weights)}, output_path=OUT)\''
        )
    if tool.name == "floor":
        return "python -c 'merged = load_file(A) * 0.5; merged += 0.3 * B + 0.2 * C (safe_open, per tensor); save_file(merged, OUT)'"
    names = {str(m): letter for m, letter in zip(models, "ABC")}
    names[str(work / f"mergekit_{setting.method}.yml")] = "config.yml"
    argv = tool.command(setting, models, Path("OUT"), work)
    if tool.name == "baseline":
        argv = ["python", "-c", "<cli of TREE>", "TREE", *argv[4:]]
    return shlex.join([Path(c).name if i == 0 else names.get(c, c) for i, c in enumerate(argv)])
