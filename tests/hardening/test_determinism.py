"""Determinism (issue 6): the same inputs and seed give bit-identical checkpoints, whatever the process, the
thread count, the input shard layout or the output sharding; an interrupted and resumed Trainer run reproduces
the α history and the resilient weights of an uninterrupted one.

State-dict-level properties live next to the merge core and are not repeated here:
``tests/merging/test_state_dicts.py`` (every method deterministic; DARE independent of key order and of which
other keys are merged), ``tests/merging/test_properties.py`` (DARE per seed and key; task methods symmetric in the
input order), ``tests/merging/test_sparsify.py`` (DARE generators stable across processes and hash seeds).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch
from _contract import fit  # tests/ is on sys.path (tests/conftest.py)
from safetensors.torch import load_file, save_file

from resilient_tune import merge
from resilient_tune.checkpoint import StreamingWriter, TensorInfo
from resilient_tune.merging import METHODS, method_names

_SHAPES = {
    "embed.weight": (40, 16),
    "layers.0.attn.weight": (16, 16),
    "layers.0.attn.bias": (16,),
    "layers.1.attn.weight": (16, 16),
    "layers.1.attn.bias": (16,),
    "head.weight": (40, 16),
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(*shape, generator=g) for key, shape in _SHAPES.items()}
    state["position_ids"] = torch.arange(8)
    return state


def _save(folder: Path, state: dict[str, torch.Tensor], *, shard_bytes: int | None = None) -> str:
    """A checkpoint folder: one model.safetensors, or shards of at most ``shard_bytes`` with an index."""
    folder.mkdir(parents=True)
    if shard_bytes is None:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        plan = {key: TensorInfo(value.dtype, tuple(value.shape)) for key, value in state.items()}
        with StreamingWriter(folder, plan, max_shard_size=shard_bytes) as writer:
            for key, value in state.items():
                writer.write(key, value)
    return str(folder)


def _kwargs(method: str, base: str, seed: int = 3) -> dict[str, object]:
    if method == "linear":
        return {"weights": [0.2, 0.3, 0.5], "seed": seed}
    _, weights = fit(method, [None] * 3, [0.6, 0.8, 1.1])
    return {"weights": weights, "method": method, "base": base, "seed": seed}


def _models(method: str, paths: list[str]) -> list[str]:
    """The models a method merges: all three, but one for SLERP."""
    return fit(method, paths, [1.0] * len(paths))[0]


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str] | str]:
    root = tmp_path_factory.mktemp("determinism")
    base = _state(0)
    states = [
        {k: (v + 0.1 * _state(10 + i)[k] if v.is_floating_point() else v) for k, v in base.items()}
        for i in range(3)
    ]
    return {
        "single": [_save(root / f"single{i}", s) for i, s in enumerate(states)],
        "sharded": [_save(root / f"sharded{i}", s, shard_bytes=3000) for i, s in enumerate(states)],
        "base": _save(root / "base", base),
        "base_sharded": _save(root / "base_sharded", base, shard_bytes=2000),
    }


def _weights_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


# The other process: another hash seed, two intra-op threads (the tests run with one), the API called afresh.
_OTHER_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(2)
    from resilient_tune import merge
    jobs = json.loads(sys.argv[1])
    for out, models, kwargs in jobs:
        merge(models, out=out, **kwargs)
    """
)


def test_every_method_writes_bit_identical_checkpoints_across_processes(
    ingredients: dict[str, list[str] | str], tmp_path: Path
) -> None:
    jobs = []
    for method in method_names():
        kwargs, models = _kwargs(method, ingredients["base"]), _models(method, ingredients["single"])
        merge(models, out=tmp_path / f"here-{method}", **kwargs)
        jobs.append((str(tmp_path / f"there-{method}"), models, kwargs))
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, json.dumps(jobs)], check=True, env=env, timeout=300)
    for method in method_names():
        here, there = tmp_path / f"here-{method}", tmp_path / f"there-{method}"
        assert _weights_bytes(here) == _weights_bytes(there), method
        assert (here / "cocktail.json").read_text() == (there / "cocktail.json").read_text(), method


@pytest.mark.parametrize(
    "method", [m for m in method_names() if METHODS[m].sparsify in ("random", "magnitude_rank")]
)
def test_dare_same_seed_identical_other_seed_different(
    ingredients: dict[str, list[str] | str], method: str
) -> None:
    first = merge(ingredients["single"], **_kwargs(method, ingredients["base"], seed=3))
    again = merge(ingredients["single"], **_kwargs(method, ingredients["base"], seed=3))
    other = merge(ingredients["single"], **_kwargs(method, ingredients["base"], seed=4))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(
        first["embed.weight"], other["embed.weight"]
    )  # the seed matters: the test can fail


@pytest.mark.parametrize("method", method_names())
def test_input_shard_layout_does_not_change_the_merge(
    ingredients: dict[str, list[str] | str], tmp_path: Path, method: str
) -> None:
    single = merge(
        _models(method, ingredients["single"]),
        out=tmp_path / "single",
        **_kwargs(method, ingredients["base"]),
    )
    sharded = merge(
        _models(method, ingredients["sharded"]),
        out=tmp_path / "sharded",
        **_kwargs(method, ingredients["base_sharded"]),
    )
    # the output follows models[0]'s key order (file order differs between the layouts); every tensor is identical
    a, b = load_file(single / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["linear", "dare_ties"])
def test_output_sharding_does_not_change_the_tensors(
    ingredients: dict[str, list[str] | str], tmp_path: Path, method: str
) -> None:
    whole = merge(ingredients["single"], out=tmp_path / "whole", **_kwargs(method, ingredients["base"]))
    parts = merge(
        ingredients["single"],
        out=tmp_path / "parts",
        max_shard_size=2500,
        **_kwargs(method, ingredients["base"]),
    )
    index = json.loads((parts / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reread = {}
    for shard in sorted(set(index["weight_map"].values())):
        reread.update(load_file(parts / shard))
    expected = load_file(whole / "model.safetensors")
    assert reread.keys() == expected.keys()
    assert all(torch.equal(reread[k], expected[k]) for k in expected)


def test_linear_does_not_depend_on_input_order(ingredients: dict[str, list[str] | str]) -> None:
    """Linear (like every task method but DARE, see tests/merging/test_properties.py) is symmetric in the inputs;
    DARE's masks follow the input index by design, so only its result for a fixed order is reproducible."""
    models = ingredients["single"]
    forward = merge(models, [0.2, 0.3, 0.5])
    backward = merge(models[::-1], [0.5, 0.3, 0.2])
    for key, value in forward.items():
        torch.testing.assert_close(value, backward[key], rtol=0, atol=1e-6)


# --- resume determinism of the callback ----------------------------------------------------------------------


def _load_tiny() -> ModuleType:
    """``tests/integrations/_tiny.py`` (the shared tiny-model helpers), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "integrations" / "_tiny.py"
    spec = importlib.util.spec_from_file_location("_hardening_tiny", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resumed_trainer_run_reproduces_alpha_history_and_resilient_weights(tmp_path: Path) -> None:
    """A run interrupted after checkpoint-2 and resumed in a fresh Trainer and callback ends with the same α at
    every decision and the same resilient weights (bit for bit) as the run that was never interrupted.

    ``tests/integrations/test_hf_callback.py::test_resume_reloads_the_base_and_continues_the_history`` covers the
    moved-snapshot case (α within 1e-6 and the resumed folder's own θ₀ + α·Δ); this test pins exact equality with
    the uninterrupted run.
    """
    transformers = pytest.importorskip("transformers")
    from resilient_tune import CocktailCallback

    tiny = _load_tiny()
    tiny_gpt2, token_examples = tiny.tiny_gpt2, tiny.token_examples
    train, evaluate, general = (
        token_examples(32, 0, True),
        token_examples(8, 1, True),
        token_examples(16, 2, False),
    )

    class Interrupt(transformers.TrainerCallback):
        """Ends the run after step 2 (its checkpoint is still saved), as a killed job would have."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out: Path, *, interrupt: bool = False, resume: str | None = None) -> CocktailCallback:
        callback = CocktailCallback(policy="budget", drift_budget=0.02, general_data=general)
        args = transformers.TrainingArguments(
            output_dir=str(out),
            max_steps=6,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            learning_rate=3e-2,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            report_to=[],
            use_cpu=True,
            seed=0,
            data_seed=0,
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=tiny_gpt2(),
            args=args,
            train_dataset=train,
            eval_dataset=evaluate,
            callbacks=[callback, Interrupt()] if interrupt else [callback],
        )
        trainer.train(resume_from_checkpoint=resume)
        return callback

    full = run(tmp_path / "full")
    cut = run(tmp_path / "cut", interrupt=True)
    assert [h["step"] for h in cut.history] == [2] and not (tmp_path / "cut" / "checkpoint-4").exists()
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert [h["step"] for h in full.history] == [2, 4, 6]
    assert [(h["step"], h["alpha"]) for h in resumed.history] == [
        (h["step"], h["alpha"]) for h in full.history
    ]
    assert 0 < full.history[-1]["alpha"] < 1  # the budget bites: α is a real decision, not a constant
    for folder in ("checkpoint-4/resilient", "checkpoint-6/resilient", "resilient"):
        assert _weights_bytes(tmp_path / "cut" / folder) == _weights_bytes(tmp_path / "full" / folder), folder
