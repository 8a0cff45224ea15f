"""Shared helpers for the benchmark scripts: time a subprocess, take medians, print tables.

Every tool runs as its own process under GNU time (``/usr/bin/time -v``), so wall time and peak resident
memory (max RSS) are measured the same way for every tool, imports included. Only the standard library
is imported here: the orchestrating process stays light and never skews what it measures.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "GNU_TIME",
    "Measurement",
    "MissingToolError",
    "busy_cpu_seconds",
    "drop_tree",
    "machine_info",
    "markdown_table",
    "median",
    "paired_ratios",
    "parse_time_v",
    "require_gnu_time",
    "rotated_orders",
    "run_timed",
    "wait_for_idle",
    "warm_read",
]

GNU_TIME = "/usr/bin/time"
_MIB = 1024 * 1024


class MissingToolError(RuntimeError):
    """A program the benchmark needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Measurement:
    """One timed run of one command.

    Attributes:
        wall_s: elapsed wall-clock time in seconds, as GNU time reports it (10 ms resolution).
        max_rss_mib: peak resident set size of the process in MiB (GNU time's "Maximum resident set size").
        returncode: exit status of the command (GNU time passes it through).
        stderr_tail: last lines of the command's stderr, for error messages.
        fields: every "name: value" line of GNU time's report, unparsed (user/system time, page faults, ...).
        background_cores: mean number of cores kept busy by *other* processes during the run (machine-wide
            busy CPU time from ``/proc/stat`` minus the command's own, over the wall time); None where
            ``/proc/stat`` is unavailable. Above ~0.2 on a small machine, the run competed for CPU.
    """

    wall_s: float
    max_rss_mib: float
    returncode: int
    stderr_tail: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)
    background_cores: float | None = None

    @property
    def cpu_s(self) -> float:
        """User plus system CPU time in seconds (more than ``wall_s`` when the command used several cores)."""
        return float(self.fields.get("User time (seconds)", 0.0)) + float(
            self.fields.get("System time (seconds)", 0.0)
        )


def require_gnu_time() -> str:
    """Return the path of GNU time, or raise `MissingToolError` telling how to install it."""
    if not (os.path.isfile(GNU_TIME) and os.access(GNU_TIME, os.X_OK)):
        raise MissingToolError(
            f"{GNU_TIME} not found: the benchmarks measure peak memory with GNU time; "
            "install it with `apt-get install time` (Debian/Ubuntu) or `dnf install time` (Fedora)"
        )
    return GNU_TIME


def parse_time_v(report: str) -> tuple[float, float, dict[str, str]]:
    """Parse the report that ``/usr/bin/time -v`` writes.

    Args:
        report: the text GNU time wrote (``-o FILE`` or stderr).

    Returns:
        ``(wall_s, max_rss_mib, fields)``: wall time in seconds, peak RSS in MiB, and all "name: value" fields.

    Raises:
        ValueError: the report lacks the wall-clock or the maximum-resident-set line.
    """
    fields: dict[str, str] = {}
    for line in report.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if sep:
            fields[name] = value.strip()
    wall_key = next((k for k in fields if k.startswith("Elapsed (wall clock) time")), None)
    rss_key = "Maximum resident set size (kbytes)"
    if wall_key is None or rss_key not in fields:
        raise ValueError(f"not a GNU `time -v` report (no wall-clock or max-RSS line): {report[-400:]!r}")
    wall_s = 0.0
    for part in fields[wall_key].split(":"):  # h:mm:ss.ss or m:ss.ss
        wall_s = wall_s * 60 + float(part)
    return wall_s, int(fields[rss_key]) / 1024, fields


def run_timed(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
) -> Measurement:
    """Run ``cmd`` under ``/usr/bin/time -v`` and measure its wall time and peak RSS.

    The command's stdout is discarded; its stderr is kept (last 20 lines) for error reports. GNU time
    writes its report to a temporary file, so it never mixes with the command's own output.

    Args:
        cmd: the program and its arguments.
        env: full environment of the command (default: this process's environment).
        cwd: working directory of the command.
        timeout_s: kill the command after this many seconds (`subprocess.TimeoutExpired` is raised).

    Returns:
        The `Measurement`; a failed command (non-zero exit) is returned, not raised: check ``returncode``.
    """
    time_bin = require_gnu_time()
    busy_before = busy_cpu_seconds()
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as report_file:
        report_path = report_file.name
    try:
        proc = subprocess.run(
            [time_bin, "-v", "-o", report_path, *cmd],
            env=None if env is None else dict(env),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        report = Path(report_path).read_text()
    finally:
        os.unlink(report_path)
    busy_after = busy_cpu_seconds()
    wall_s, rss_mib, fields = parse_time_v(report)
    tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
    m = Measurement(wall_s, rss_mib, proc.returncode, tail, fields)
    if busy_before is not None and busy_after is not None and wall_s > 0:
        background = max(0.0, (busy_after - busy_before - m.cpu_s) / wall_s)
        m = replace(m, background_cores=round(background, 2))
    return m


def busy_cpu_seconds() -> float | None:
    """Machine-wide busy CPU time in seconds since boot (all cores, from ``/proc/stat``); None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_idle(
    threshold_cores: float = 0.3, max_wait_s: float = 120.0, window_s: float = 2.0, windows: int = 3
) -> float | None:
    """Wait until other processes use less than ``threshold_cores`` cores in ``windows`` consecutive windows.

    On a shared machine a benchmark run next to someone's test suite measures the test suite. This waits
    (up to ``max_wait_s``) until the machine has been quiet for ``windows x window_s`` seconds in a row
    before a timed run; bursty neighbours pass one short quiet window too easily. It never kills anything.

    Returns:
        The load (busy cores) of the last window; None when ``/proc/stat`` is unavailable.
    """
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    while True:
        before = busy_cpu_seconds()
        time.sleep(window_s)
        after = busy_cpu_seconds()
        if before is None or after is None:
            return None
        load = (after - before) / window_s
        quiet = quiet + 1 if load < threshold_cores else 0
        if quiet >= windows or time.monotonic() >= deadline:
            return round(load, 2)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of no values; run at least one repeat")
    return float(statistics.median(values))


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repeat ratios ``numerators[i] / denominators[i]`` of runs measured in the same repeat.

    Pairing cancels drift that hits both tools of a repeat alike (thermal state, background load);
    take the `median` of the result.
    """
    if len(numerators) != len(denominators):
        raise ValueError(
            f"paired ratios need as many runs on each side, got {len(numerators)} and {len(denominators)}"
        )
    return [n / d for n, d in zip(numerators, denominators)]


def rotated_orders(names: Sequence[str], repeats: int) -> list[list[str]]:
    """Run orders for ``repeats`` repeats: repeat ``r`` starts with tool ``r mod n`` (a rotation).

    With two tools the order alternates; with more, each tool takes each position in turn, so no tool
    always runs right after the same neighbour or always first (cold-ish caches).
    """
    n = len(names)
    return [list(names[r % n :]) + list(names[: r % n]) for r in range(repeats)] if n else []


def warm_read(paths: Sequence[str | os.PathLike[str]], chunk_bytes: int = 16 * _MIB) -> int:
    """Read every file once, untimed, so all tools start from the same warm page cache.

    Returns:
        The number of bytes read.
    """
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(chunk_bytes):
                total += len(chunk)
    return total


def drop_tree(path: str | os.PathLike[str]) -> None:
    """Remove a folder (or file) if it exists, then flush dirty pages so the next run starts clean.

    ``os.sync`` makes the kernel write back what the previous tool wrote now, untimed, instead of
    during the next tool's run.
    """
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    os.sync()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(
    distributions: Sequence[str] = ("torch", "safetensors", "transformers"),
) -> dict[str, object]:
    """Describe the machine and package versions without importing the packages.

    Returns:
        cores (logical CPUs usable by this process), RAM in GiB, CPU model, OS, Python, and the version
        of each distribution in ``distributions``.
    """
    ram_gib = None
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram_gib = round(int(line.split()[1]) / _MIB, 1)
        with open("/proc/cpuinfo") as fh:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu_model
            )
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": cores,
        "ram_gib": ram_gib,
        "cpu": cpu_model,
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in distributions},
        "date": time.strftime("%Y-%m-%d"),
        "executable": sys.executable,
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """Format rows as a GitHub markdown table.

    Args:
        headers: column titles.
        rows: one sequence of cells per row (converted with ``str``).
        align: one character per column, ``l`` or ``r`` (default: first column left, the rest right).

    Returns:
        The table, one line per row, without a trailing newline.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns; give one per column")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells for {len(headers)} columns")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [headers, rule, *[[str(c) for c in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


# ---------------------------------------------------------------------------------------------- saved results
def add_result_options(parser: Any, plot_help: str) -> None:
    """``--plot PNG`` (``plot_help`` says what is drawn) and ``--from-json FILE`` (report a saved result again)."""
    parser.add_argument("--plot", type=Path, metavar="PNG", help=f"{plot_help} (needs matplotlib)")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="do not run: read a result written with --json and print its report (and --plot it)",
    )


def load_result(path: Path, keys: set[str], benchmark: str) -> dict:
    """A result that ``benchmark`` saved with ``--json``: a JSON object holding every one of ``keys``.

    Raises:
        ValueError: The file cannot be read, is not JSON, or is not such a result (the message names the file,
            what is wrong and the fix).
    """
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read --from-json {path}: {exc}; pass a file written with --json") from exc
    missing = sorted(keys - set(result)) if isinstance(result, dict) else sorted(keys)
    if missing:
        raise ValueError(
            f"{path} is not a {benchmark} result (no {', '.join(missing)}); pass a file written with --json"
        )
    return result
