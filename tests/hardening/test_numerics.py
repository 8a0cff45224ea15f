"""Numerics (issue 6): NaN/Inf caught before anything is committed, half-precision inputs accumulated in float32,
integer and bool buffers copied, never averaged.

Unit-level checks live next to the merge core (``tests/merging/test_merge_tensor.py``: non-finite inputs and
results per method, fp16 sums of 101 inputs; ``tests/test_weights.py::test_non_finite_loss_names_the_model`` for
auto weights). Here they are seen through ``merge`` and the CLI, with files on disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from _contract import fit  # tests/ is on sys.path (tests/conftest.py)
from safetensors.torch import load_file, save_file

from resilient_tune import merge
from resilient_tune.cli import main
from resilient_tune.errors import IncompatibleModelsError, NonFiniteError
from resilient_tune.merging import METHODS, method_names

_KEYS = [f"layers.{i}.w" for i in range(6)]


def _save(folder: Path, state: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    return str(folder)


def _healthy(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(64, 64, generator=g) for key in _KEYS}


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", method_names())
def test_non_finite_input_in_the_last_tensor_commits_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, bad_value: float
) -> None:
    """The NaN/Inf sits in the last tensor, after five were already merged and streamed into the temp folder:
    the previous destination survives untouched and nothing new appears (API and CLI)."""
    sick = _healthy(1)
    sick[_KEYS[-1]] = sick[_KEYS[-1]].clone()
    sick[_KEYS[-1]][3, 5] = bad_value
    paths = [_save(tmp_path / "m0", _healthy(0)), _save(tmp_path / "sick", sick)]
    healthy = paths[0]
    base = _save(tmp_path / "base", _healthy(2))
    single = METHODS[method].inputs[1] == 1  # SLERP merges one model with the base: the sick one
    if single:
        paths = paths[1:]
    label = f"sick (models[{len(paths) - 1}])"
    weights = ["1"] * len(paths)
    extra = [] if method == "linear" else ["--method", method, "--base", base, "--weights", *weights]
    kwargs = {} if method == "linear" else {"method": method, "base": base, "weights": [1] * len(paths)}
    out = tmp_path / "out"
    assert main(["merge", healthy, base, "--out", str(out), "-q"]) == 0  # a previous version
    old = _digest(out)
    with pytest.raises(NonFiniteError) as info:
        merge(paths, out=out, overwrite=True, **kwargs)
    assert repr(_KEYS[-1]) in str(info.value) and label in str(info.value)
    assert "repair or drop that checkpoint" in str(info.value)
    assert main(["merge", *paths, "--out", str(out), "--overwrite", "-q", *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and label in err and "NaN or Inf" in err
    assert _digest(out) == old
    assert [p.name for p in tmp_path.iterdir() if ".rt-" in p.name] == []


def test_overflowing_result_is_caught_and_the_fix_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finite fp16 inputs whose task-arithmetic sum exceeds fp16's 65504: refused, the fix is a float32 output."""
    half = {"w": torch.full((8,), 60000.0, dtype=torch.float16)}
    paths = [_save(tmp_path / f"m{i}", half) for i in range(2)]
    base = _save(tmp_path / "base", {"w": torch.zeros(8, dtype=torch.float16)})
    args = ["merge", *paths, "--method", "task_arithmetic", "--base", base, "--weights", "1", "1"]
    assert main([*args, "--out", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "overflows" in err and "--dtype float32" in err and not (tmp_path / "out").exists()
    assert main([*args, "--dtype", "float32", "--out", str(tmp_path / "out"), "-q"]) == 0
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"], torch.full((8,), 120000.0))


@pytest.mark.parametrize(
    ("dtype", "big"),
    [(torch.float16, 4096.0), (torch.bfloat16, 512.0)],
    ids=["fp16", "bf16"],
)
def test_half_precision_inputs_accumulate_in_float32(tmp_path: Path, dtype: torch.dtype, big: float) -> None:
    """One large model and eight small contributions: summed in the inputs' own dtype, each small term is below
    half the spacing at the large value and rounds away; accumulated in float32 they add up to a visible 8."""
    weights = [0.5] + [1 / 16] * 8
    values = [big] + [16.0] * 8
    paths = [_save(tmp_path / f"m{i}", {"w": torch.full((4,), v, dtype=dtype)}) for i, v in enumerate(values)]
    naive = torch.full((4,), weights[0] * values[0], dtype=dtype)
    for w, v in zip(weights[1:], values[1:]):
        naive = naive + torch.full(
            (4,), w * v, dtype=dtype
        )  # half-precision accumulation, as a naive loop does
    exact = big / 2 + 8.0
    merged = merge(paths, weights)["w"]
    assert merged.dtype == dtype  # the output keeps the inputs' dtype
    assert torch.equal(merged, torch.full((4,), exact, dtype=dtype))
    assert torch.equal(naive, torch.full((4,), big / 2, dtype=dtype))  # the naive sum visibly differs
    written = merge(paths, weights, out=tmp_path / "out")
    assert torch.equal(load_file(written / "model.safetensors")["w"], merged)


@pytest.mark.parametrize("method", method_names())
def test_integer_and_bool_buffers_are_copied_never_averaged(tmp_path: Path, method: str) -> None:
    """Values no float can hold (2**60 + 1) and bool masks come out bit-exact; a differing one is refused."""
    ids = torch.tensor([2**60 + 1, -(2**59) - 3, 7], dtype=torch.int64)
    mask = torch.tensor([True, False, True])
    states = [{"w": torch.randn(4, 4), "ids": ids.clone(), "mask": mask.clone()} for _ in range(3)]
    paths = [_save(tmp_path / f"m{i}", s) for i, s in enumerate(states[:2])]
    kwargs = {} if method == "linear" else {"method": method, "base": _save(tmp_path / "base", states[2])}
    paths, weights = fit(method, paths, [0.3, 0.7])
    out = merge(paths, weights, out=tmp_path / "out", **kwargs)
    written = load_file(out / "model.safetensors")
    assert written["ids"].dtype == torch.int64 and torch.equal(written["ids"], ids)
    assert written["mask"].dtype == torch.bool and torch.equal(written["mask"], mask)
    states[1]["ids"][0] += 1
    other = _save(tmp_path / "other", states[1])
    differing = (
        [other] if len(paths) == 1 else [paths[0], other]
    )  # SLERP: the model's ids differ from the base's
    with pytest.raises(IncompatibleModelsError, match=r"'ids'.*copied, not averaged"):
        merge(differing, weights[: len(differing)], out=tmp_path / "out2", **kwargs)
    assert not (tmp_path / "out2").exists()
