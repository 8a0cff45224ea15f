"""The benchmark scripts must keep running: helpers of benchmarks/_common.py, and merge_speed.py end to end on
a tiny model (resilient-tune only), so a change in the CLI or the output layout cannot rot them unseen."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

_REPORT = """\
\tCommand being timed: "python -c pass"
\tUser time (seconds): 1.50
\tSystem time (seconds): 0.25
\tPercent of CPU this job got: 95%
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50
\tMaximum resident set size (kbytes): 2097152
\tExit status: 0
"""


def test_parse_time_v_reads_wall_rss_and_fields() -> None:
    wall, rss, fields = _common.parse_time_v(_REPORT)
    assert wall == pytest.approx(62.5)
    assert rss == pytest.approx(2048.0)
    assert fields["User time (seconds)"] == "1.50"
    hours = _REPORT.replace("1:02.50", "1:00:01.25")
    assert _common.parse_time_v(hours)[0] == pytest.approx(3601.25)


def test_parse_time_v_rejects_other_text() -> None:
    with pytest.raises(ValueError, match="not a GNU"):
        _common.parse_time_v("real 0m1.0s\nuser 0m0.5s\n")


def test_rotated_orders_put_each_tool_first_once() -> None:
    orders = _common.rotated_orders(["a", "b", "c"], 4)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert _common.rotated_orders(["a", "b"], 2) == [["a", "b"], ["b", "a"]]


def test_median_and_paired_ratios() -> None:
    assert _common.median([3.0, 1.0, 2.0]) == 2.0
    assert _common.median([4.0, 1.0]) == 2.5
    assert _common.paired_ratios([2.0, 3.0], [4.0, 6.0]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="no values"):
        _common.median([])
    with pytest.raises(ValueError, match="as many runs"):
        _common.paired_ratios([1.0], [1.0, 2.0])


def test_markdown_table_shapes_rows() -> None:
    table = _common.markdown_table(["tool", "wall"], [["x", "1.0 s"]])
    assert table.splitlines() == ["| tool | wall |", "| --- | ---: |", "| x | 1.0 s |"]
    with pytest.raises(ValueError, match="cells"):
        _common.markdown_table(["tool", "wall"], [["x"]])


@pytest.mark.skipif(not os.path.exists(_common.GNU_TIME), reason="GNU time missing (apt-get install time)")
def test_run_timed_measures_memory_and_exit_status() -> None:
    touch = "b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096])"  # 150 MiB, every page touched
    m = _common.run_timed([sys.executable, "-c", touch])
    assert m.returncode == 0
    assert 150 <= m.max_rss_mib < 400
    assert 0 < m.wall_s < 60
    failed = _common.run_timed([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    assert failed.returncode == 3
    assert "boom" in failed.stderr_tail


def _tiny_gpt2_params(vocab: int, positions: int, width: int, layers: int) -> int:
    """GPT-2 parameter count (lm_head tied to wte): embeddings + per block (attn, mlp, 2 layer norms) + ln_f."""
    return vocab * width + positions * width + layers * (12 * width * width + 13 * width) + 2 * width


@pytest.mark.skipif(not os.path.exists(_common.GNU_TIME), reason="GNU time missing (apt-get install time)")
@pytest.mark.skipif(
    shutil.which("resilient-tune", path=str(Path(sys.executable).parent)) is None,
    reason="resilient-tune console script not installed next to this interpreter",
)
def test_merge_speed_runs_on_tiny(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(BENCH / "merge_speed.py"), "--size", "tiny", "--repeats", "1",
        "--tools", "resilient-tune", "--cache-dir", str(tmp_path), "--max-wait", "0", "--retries", "0", "--json",
        "--plot", str(tmp_path / "plot" / "merge-speed.png"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["inputs"]["params"] == _tiny_gpt2_params(vocab=1000, positions=128, width=64, layers=2)
    assert list(result["methods"]) == ["linear", "slerp"]
    for method, targets in (
        ("linear", ["wall <= 0.45x mergekit", "peak RSS <= 640 MiB"]),
        ("slerp", ["wall < 1.00x mergekit", "peak RSS < 1.00x mergekit"]),
    ):
        run = result["methods"][method]
        (row,) = run["runs"]["resilient-tune"]
        assert row["wall_s"] > 0
        assert row["max_rss_mib"] > 50  # at least a Python interpreter with torch
        check = run["agreement"]["resilient-tune"]
        assert check["ok"], (method, check)
        assert check["missing_keys"] == []
        assert check["max_abs_diff_vs_exact"] < 1e-5
        assert [t["target"] for t in run["targets"]] == targets
    assert "--method slerp --t 0.3" in result["methods"]["slerp"]["commands"]["resilient-tune"]
    assert not any(p.name.startswith("run-") for p in tmp_path.iterdir()), "output folders left behind"
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plot" / "merge-speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "plot written to" in proc.stderr
    # the saved result gives the report again without a run; a file that is not one is refused
    saved = tmp_path / "result.json"
    saved.write_text(proc.stdout)
    again = subprocess.run(
        [sys.executable, str(BENCH / "merge_speed.py"), "--from-json", str(saved)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "## Merge speed: tiny" in again.stdout and "resilient-tune `merge`" in again.stdout
    assert "### linear:" in again.stdout and "### slerp:" in again.stdout
    saved.write_text('{"size": "tiny"}')
    bad = subprocess.run(
        [sys.executable, str(BENCH / "merge_speed.py"), "--from-json", str(saved)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "is not a merge_speed result" in bad.stderr and bad.stdout == ""


def test_check_outputs_flags_a_wrong_or_incomplete_merge(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import merge_speed

    rng = np.random.default_rng(0)
    inputs = []
    for i in range(3):
        folder = tmp_path / f"in{i}"
        folder.mkdir()
        state = {
            "a": rng.standard_normal((4, 3)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),
        }
        safetensors_numpy.save_file(state, str(folder / "model.safetensors"))
        inputs.append(state)
    weights = [0.5, 0.3, 0.2]
    exact = {k: sum(w * s[k] for w, s in zip(weights, inputs)).astype(np.float32) for k in ("a", "b")}
    outputs = {}
    for name, state in {
        "right": exact,
        "wrong": {"a": exact["a"] + 1e-3, "b": exact["b"]},
        "partial": {"a": exact["a"], "extra": exact["b"]},
    }.items():
        (tmp_path / name).mkdir()
        safetensors_numpy.save_file(state, str(tmp_path / name / "model.safetensors"))
        outputs[name] = str(tmp_path / name)
    report = merge_speed.check_outputs(
        [str(tmp_path / f"in{i}") for i in range(3)], weights, outputs, "right"
    )
    assert report["right"]["ok"] and report["right"]["max_abs_diff_vs_exact"] < 1e-6
    assert not report["wrong"]["ok"]
    assert report["wrong"]["max_abs_diff_vs_reference"] == pytest.approx(1e-3, rel=1e-3)
    assert not report["partial"]["ok"]
    assert report["partial"]["missing_keys"] == ["b"] and report["partial"]["extra_keys"] == ["extra"]


def test_check_outputs_slerp_matches_the_engine_and_flags_a_linear_mix(tmp_path: Path) -> None:
    """The benchmark's float64 SLERP reference equals resilient-tune's engine (to float32 rounding), includes the
    (anti)parallel fallback, and tells SLERP apart from the linear mix of the same t."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import merge_speed
    import torch

    from resilient_tune.merging import merge_tensor

    rng = np.random.default_rng(1)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float32)
    base = {"w": a, "near": a, "anti": a}
    model = {"w": b, "near": a * (1 + 1e-4), "anti": -2 * a}  # cos 1 and cos -1: linear
    for name, state in (("base", base), ("model", model)):
        (tmp_path / name).mkdir()
        safetensors_numpy.save_file(state, str(tmp_path / name / "model.safetensors"))
    t = 0.3
    ours = {
        k: merge_tensor(
            "slerp", [torch.from_numpy(model[k])], [1.0], base=torch.from_numpy(base[k]), options={"t": t}
        ).numpy()
        for k in base
    }
    exact = {k: merge_speed.slerp_float64(base[k], model[k], t) for k in base}
    for k in base:
        np.testing.assert_allclose(ours[k], exact[k], atol=1e-6)
    np.testing.assert_allclose(exact["anti"], (1 - t) * a + t * (-2 * a), atol=1e-6)
    linear = {k: ((1 - t) * base[k] + t * model[k]).astype(np.float32) for k in base}
    for name, state in (("ours", ours), ("linear", linear)):
        (tmp_path / name).mkdir()
        safetensors_numpy.save_file(state, str(tmp_path / name / "model.safetensors"))
    report = merge_speed.check_outputs(
        [str(tmp_path / "base"), str(tmp_path / "model")],
        [],
        {"ours": str(tmp_path / "ours"), "linear": str(tmp_path / "linear")},
        "ours",
        t=t,
    )
    assert report["ours"]["ok"] and report["ours"]["max_abs_diff_vs_exact"] < 1e-6
    assert not report["linear"]["ok"] and report["linear"]["max_abs_diff_vs_exact"] > 1e-2


def test_merge_speed_reads_a_result_saved_before_slerp() -> None:
    """The kept result (linear only, saved before the settings existed) still prints and its numbers are kept."""
    saved = BENCH / "results" / "merge_speed-gpt2-small.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "merge_speed.py"), "--from-json", str(saved)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### linear: linear over model_a, model_b, model_c, weights [0.5, 0.3, 0.2]" in proc.stdout
    wall = json.loads(saved.read_text())["summary"]["resilient-tune"]["wall_s"]
    assert f"{wall:.2f} s" in proc.stdout
    assert "### slerp" not in proc.stdout


@pytest.mark.skipif(not os.path.exists(_common.GNU_TIME), reason="GNU time missing (apt-get install time)")
@pytest.mark.skipif(
    shutil.which("resilient-tune", path=str(Path(sys.executable).parent)) is None,
    reason="resilient-tune console script not installed next to this interpreter",
)
def test_merge_speed_times_a_baseline_tree_side_by_side(tmp_path: Path) -> None:
    """--baseline-tree runs the CLI of another source tree (here this one) beside ours, paired, and checks its
    output too; a folder that is not a checkout is refused before anything runs."""
    repo = BENCH.parent
    cmd = [
        sys.executable, str(BENCH / "merge_speed.py"), "--size", "tiny", "--repeats", "1", "--methods", "slerp",
        "--tools", "resilient-tune", "--baseline-tree", str(repo), "--cache-dir", str(tmp_path), "--max-wait", "0",
        "--retries", "0", "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    run = result["methods"]["slerp"]
    assert set(run["runs"]) == {"resilient-tune", "baseline"}
    assert run["agreement"]["baseline"]["ok"]
    assert run["agreement"]["baseline"]["max_abs_diff_vs_reference"] == 0.0  # the same code
    assert run["summary"]["resilient-tune"]["wall_vs_baseline"] > 0
    assert run["commands"]["baseline"].startswith("python -c '<cli of TREE>' TREE merge")
    bad = subprocess.run(
        [*cmd[:-1], "--baseline-tree", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "holds no resilient_tune/cli.py" in bad.stderr


def test_slerp_angles_counts_the_linear_fallback_and_the_distance_to_linear(tmp_path: Path) -> None:
    """Hand-made pair: a tensor left unchanged (0°, SLERP = linear), one turned by 90° (SLERP at t = 0.5 is √2 times
    the linear mix: distance √2 − 1), an integer buffer (ignored)."""
    import slerp_angles
    import torch
    from safetensors.torch import save_file

    e1, e2 = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    same = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    save_file({"same": same, "turned": e1, "ids": torch.arange(3)}, str(tmp_path / "base.safetensors"))
    save_file({"same": same, "turned": e2, "ids": torch.arange(3)}, str(tmp_path / "tuned.safetensors"))
    stats = slerp_angles.slerp_angles(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"))
    assert stats["tensors"] == 2 and stats["linear_fallback_tensors"] == 1
    assert stats["linear_fallback_weight_share"] == pytest.approx(12 / 16)
    assert stats["angle_max_deg"] == pytest.approx(90.0)
    assert stats["max_relative_distance_to_linear"] == pytest.approx(2**0.5 - 1, rel=1e-5)
    text = slerp_angles.render(stats)
    assert "1 within 1.81° of (anti)parallel" in text and "max 90.00°" in text
