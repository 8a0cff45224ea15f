"""Helpers of the distributed end-to-end tests: run a script under ``torchrun`` with a hard timeout, read what each
rank reported, check a resilient folder against θ₀ and the final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
TIMEOUT = 240  # seconds; a 2-process run takes about 15 s on 2 CPU cores


def torchrun(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 <script> <args>``; its whole process group is killed on timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_TUNE")}
    environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        command, cwd=HERE, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun {args} did not finish within {timeout} s (a hang?)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run(script: str, out: Path, *args: str) -> dict[int, dict]:
    """Run ``script OUT args`` on 2 processes; it must succeed. Returns each rank's summary."""
    done = torchrun(script, str(out), *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return summaries(out)


def summaries(out: Path) -> dict[int, dict]:
    """The ``summary-rank<r>.json`` each rank wrote (its stdout lines may interleave with the other rank's)."""
    rows = [json.loads(path.read_text()) for path in sorted(out.glob("summary-rank*.json"))]
    return {row["rank"]: row for row in rows}


def assert_mix(folder: Path, base: dict, tuned: dict) -> float:
    """``folder`` holds θ₀ + α(θ − θ₀) (α from its cocktail.json); returns α."""
    alpha = json.loads((folder / "cocktail.json").read_text())["alpha"]
    written = load_file(str(folder / "model.safetensors"))
    assert written
    for key, value in written.items():
        torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]), rtol=0, atol=1e-6)
    return alpha
