"""Memory: reading is positioned reads into fresh tensors (no mmap), writing copies nothing; no safetensors import.

Runs in a fresh interpreter and measures the peak resident set (VmHWM, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ckpt_testing import write_state

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from resilient_tune.checkpoint import StreamingWriter, open_checkpoint

    def peak_mib():
        # peak resident set since the last reset (VmHWM); ru_maxrss would carry the parent's peak
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["VmHWM"].split()[0]) / 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")

    source, copy = sys.argv[1], sys.argv[2]
    out = {}
    with open_checkpoint(source) as reader:
        reader.get("small")
        reset_peak()
        before = peak_mib()
        big = reader.get("big")
        out["read_growth"] = peak_mib() - before
        out["mapped"] = source in open("/proc/self/maps").read()
        numel = big.numel()
        out["correct"] = bool(big[-1] == numel - 1) and bool(big[numel // 2] == numel // 2)
        reset_peak()
        before = peak_mib()
        with StreamingWriter(copy, reader.specs()) as writer:
            writer.write("big", big)
            writer.write("small", reader.get("small"))
        out["write_growth"] = peak_mib() - before
    out["safetensors_imported"] = "safetensors" in sys.modules
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_reading_and_writing_hold_one_copy(tmp_path: Path) -> None:
    numel = 24 * 2**20  # 96 MiB of float32: the size of GPT-2 small's embedding
    size_mib = numel * 4 / 2**20
    write_state(tmp_path / "src", {"small": torch.ones(16), "big": torch.arange(numel, dtype=torch.float32)})
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "src"), str(tmp_path / "copy")],
        check=True,
        capture_output=True,
        text=True,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["correct"]
    assert not out["mapped"], "the checkpoint file is memory-mapped"
    assert not out["safetensors_imported"], "library code imported the safetensors package"
    # Reading allocates the tensor once (an mmap-then-copy reader would add the touched file pages: 2x).
    assert 0.9 * size_mib < out["read_growth"] < 1.3 * size_mib, out
    # Writing copies nothing (no .tobytes(), no numpy): the peak barely moves.
    assert out["write_growth"] < 0.1 * size_mib, out
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (
        tmp_path / "src" / "model.safetensors"
    ).read_bytes()
