"""The merge-speed benchmark's report: the markdown tables (one per setting) and the bar plot of the linear merge, from
a run's result (fresh, or loaded with ``--from-json``; results saved before SLERP was timed are read as linear-only)."""

from __future__ import annotations

from pathlib import Path

from _common import markdown_table
from _merge_tools import SETTINGS, TOOLS

_LEGACY_PER_METHOD = (
    "weights", "orders", "commands", "mergekit_config", "runs", "failures", "summary", "agreement",
    "agreement_reference", "targets",
)  # fmt: skip


def as_current(result: dict) -> dict:
    """A result in the current layout: results saved before ``methods`` existed held the linear merge only."""
    if "methods" in result:
        return result
    linear = {key: result.get(key) for key in _LEGACY_PER_METHOD}
    linear["setting"] = SETTINGS["linear"].describe()
    linear["t"] = None
    rest = {key: value for key, value in result.items() if key not in _LEGACY_PER_METHOD}
    return {**rest, "baseline": None, "methods": {"linear": linear}}


def _label(result: dict, name: str) -> str:
    return result.get("labels", {}).get(name) or TOOLS[name].label


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render(result: dict) -> str:
    """The human-readable report: setup, then per setting the timing table, agreement, targets and commands."""
    inp, mach = result["inputs"], result["machine"]
    lines = [
        f"## Merge speed: {result['size']} (median of {result['repeats']} repeats, tool order rotated)",
        "",
        f"Inputs: checkpoints of {inp['params'] / 1e6:.1f}M params, {inp['file_bytes'] / 2**20:.0f} MiB fp32 each, "
        f"largest tensor {inp['largest_tensor_bytes'] / 1e6:.0f} MB.",
        f"Machine: {mach['cores']} cores, {mach['ram_gib']} GiB RAM, {mach['cpu']}; Python {mach['python']}, "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
        + f" (source {result.get('resilient_tune_source') or 'unknown'})",
        "",
    ]
    for method, run in result["methods"].items():
        lines += _render_method(result, method, run)
    if result.get("resilient_tune_source_changed_during_run"):
        lines += ["WARNING: the resilient-tune source changed during the run; the repeats mix versions.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _render_method(result: dict, method: str, run: dict) -> list[str]:
    with_baseline = any("wall_vs_baseline" in s for s in run["summary"].values())
    lines = [f"### {method}: {run['setting']}", ""]
    rows = []
    for name, s in run["summary"].items():
        row = [
            _label(result, name),
            f"{s['wall_s']:.2f} s",
            f"{s['wall_min_s']:.2f}–{s['wall_max_s']:.2f}",
            f"{s['max_rss_mib']:.0f} MiB",
            f"{s['cpu_s']:.1f} s",
            _fmt(s.get("wall_vs_mergekit"), ".2f", "×"),
            _fmt(s.get("rss_vs_mergekit"), ".2f", "×"),
        ]
        if with_baseline:
            row.append(_fmt(s.get("wall_vs_baseline"), ".2f", "×"))
        rows.append(row)
    headers = ["tool", "wall (median)", "wall range", "peak RSS", "CPU (user+sys)", "wall / mergekit"]
    headers += ["RSS / mergekit"] + (["wall / baseline"] if with_baseline else [])
    lines += [markdown_table(headers, rows), ""]
    for name, why in run["failures"].items():
        lines.append(f"FAILED {name}: {why}")
    if run["agreement"]:
        lines += _render_agreement(method, run)
    lines.append(f"Targets ({method}, for gpt2-small; resilient-tune):")
    for t in run["targets"]:
        value = t["value"]
        shown = (
            "not measured"
            if value is None
            else (f"{value:.0f} MiB" if "MiB" in t["target"] else f"{value:.2f}×")
        )
        lines.append(f"  {t['target']:<28} measured {shown:<14} {t['verdict']}")
    lines += ["", "Commands (OUT is a fresh folder per run):"]
    lines += [f"  {n}: {c}" for n, c in run["commands"].items()] + [""]
    return lines


def _render_agreement(method: str, run: dict) -> list[str]:
    ref = run["agreement_reference"]
    rows = []
    for name, a in run["agreement"].items():
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
    exact = "SLERP in float64 from the inputs" if method == "slerp" else "Σ wᵢ·θᵢ in float64 from the inputs"
    return [f"Agreement (shared keys; exact = {exact}):", "", markdown_table(headers, rows), ""]


def plot(result: dict, path: Path) -> Path | None:
    """Two bar panels from the linear merge of one run: wall time (median, whiskers from the fastest to the slowest
    repeat) and peak RSS per tool, each bar labelled with its value. Returns the PNG's path, or ``None`` (with a
    warning) when matplotlib is not installed or the run has no linear merge."""
    from resilient_tune.report import new_figure, save_figure

    run = result["methods"].get("linear")
    summary = run["summary"] if run else {}
    if not summary:
        return None
    names = list(summary)
    labels = [_label(result, n).replace(" `", "\n`").replace("`", "") for n in names]
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
        f"linear merge of 3 checkpoints, {result['size']} ({inp['params'] / 1e6:.1f}M params, "
        f"{inp['file_bytes'] / 2**20:.0f} MiB each), median of {result['repeats']}",
        fontsize=10,
    )
    return save_figure(figure, path)
