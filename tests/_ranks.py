"""Run a script as two processes of one gloo group (each gets ``rank`` and ``root`` as its arguments; ``root`` holds
the rendezvous file) and collect what each printed last, as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_two_ranks(root: Path, script: str, *, hang: str = "a rank hung", timeout: float = 120) -> list[Any]:
    """Start ``script`` as ranks 0 and 1 in ``root``; each must exit 0. Returns each rank's last stdout line, parsed
    as JSON, in rank order; fails the test with ``hang`` when a rank does not finish within ``timeout`` seconds."""
    path = root / "two_ranks.py"
    path.write_text(script)
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), str(rank), str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(hang)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results
