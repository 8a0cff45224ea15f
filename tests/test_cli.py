"""The `resilient-tune` command line: merges, exit codes, one-line errors, lean imports, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from resilient_tune.cli import main


def _write(folder, seed: int, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (6, 4), "b.weight": (4,), "layers.0.w": (3, 3)}
    folder.mkdir(parents=True)
    state = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return folder, state


@pytest.fixture
def models(tmp_path):
    return [_write(tmp_path / f"m{i}", i) for i in range(3)]


def test_merge_writes_expected_weights(models, tmp_path, capsys):
    paths = [str(p) for p, _ in models]
    code = main(
        ["merge", *paths, "--weights", "0.5", "0.3", "0.2", "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert code == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in merged.items():
        expected = sum(w * s[key] for w, (_, s) in zip([0.5, 0.3, 0.2], models))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert capsys.readouterr().out == ""


def test_ties_with_options(models, tmp_path):
    paths = [str(p) for p, _ in models]
    out = tmp_path / "ties"
    code = main(
        [
            "merge",
            *paths[:2],
            "--base",
            paths[2],
            "--method",
            "ties",
            "--density",
            "0.5",
            "--lambda",
            "0.8",
            "--weights",
            "1",
            "1",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    recipe = json.loads((out / "cocktail.json").read_text())["recipe"]
    assert recipe["method"] == "ties"
    assert recipe["options"]["density"] == 0.5
    assert recipe["options"]["lambda"] == 0.8


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        (["--weights", "0.5", "0.5"], 2, "weight"),
        (["--weights", "0.5", "0.6", "0.2"], 2, "normalize"),
        (["--weights", "nan", "0.5", "0.5"], 2, "nan"),
        (["--weights", "0.5", "0.3", "0.2", "--method", "bogus"], 2, "ties"),
        (["--weights", "0.5", "0.3", "0.2", "--method", "ties"], 2, "base"),
        (["--weights", "1", "1", "1", "--method", "ties", "--density", "0"], 2, "(0, 1]"),
        (["--weights", "0.5", "0.3", "0.2", "--dtype", "int4"], 2, "float16"),
        (["--weights", "0.5", "0.3", "0.2", "--max-shard-size", "lots"], 2, "lots"),
    ],
)
def test_usage_errors_exit_2_with_one_line(models, tmp_path, capsys, extra, code, fragment):
    paths = [str(p) for p, _ in models]
    assert main(["merge", *paths, "--out", str(tmp_path / "out"), "-q", *extra]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("resilient-tune: error:")
    assert fragment.lower() in err.lower()
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_failures_exit_1(models, tmp_path, capsys):
    paths = [str(p) for p, _ in models]
    assert main(["merge", paths[0], str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "-q"]) == 1
    assert "missing" in capsys.readouterr().err
    odd, _ = _write(tmp_path / "odd", 9, {"a.weight": (6, 5), "b.weight": (4,), "layers.0.w": (3, 3)})
    assert main(["merge", paths[0], str(odd), "--out", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "a.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_existing_destination_refused_unless_overwrite(models, tmp_path, capsys):
    paths = [str(p) for p, _ in models]
    out = tmp_path / "out"
    out.mkdir()
    assert main(["merge", *paths, "--out", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", *paths, "--out", str(out), "-q", "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()


def test_argparse_errors_exit_2(capsys):
    assert main(["merge", "--out", "x"]) == 2  # returned, not raised: main() is callable from Python
    assert capsys.readouterr().err.count("\n") == 1


def test_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "lines"):
        assert name in out


def test_plain_merge_does_not_import_transformers(models, tmp_path):
    paths = [str(p) for p, _ in models]
    code = (
        "import sys; from resilient_tune.cli import main; "
        f"rc = main(['merge', *{paths!r}, '--out', {str(tmp_path / 'o')!r}, '-q']); "
        "print(rc, 'transformers' in sys.modules, 'safetensors' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False", "False"]


_SLOW_WRITER = r"""
import sys, time, torch
import resilient_tune.checkpoint as ck
real_write = ck.StreamingWriter.write
def slow_write(self, key, tensor):
    real_write(self, key, tensor)
    print("wrote", key, flush=True)
    time.sleep(0.2)
ck.StreamingWriter.write = slow_write
from resilient_tune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_merge_leaves_no_partial_destination(tmp_path):
    shapes = {f"layers.{i}.w": (64, 64) for i in range(12)}
    paths = [str(_write(tmp_path / f"k{i}", i, shapes)[0]) for i in range(2)]
    out = tmp_path / "out"
    args = [sys.executable, "-c", _SLOW_WRITER, "merge", *paths, "--out", str(out), "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it write a few tensors, then kill it hard
        assert proc.stdout.readline().startswith("wrote")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers, "the killed run's temp folder is expected until the next run cleans it"
    # the next run recognises the stale temp of a dead process, cleans it and completes
    assert main(["merge", *paths, "--out", str(out), "-q"]) == 0
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
