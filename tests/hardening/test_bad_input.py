"""Bad input across the API, the CLI and both callbacks' constructors (issue 6).

Every case asserts the error type, that the message names the thing, the value and the fix (substrings), and
that nothing was written: the destination is absent and no temporary sibling folder is left behind.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from resilient_tune import Recipe, merge, mix_models, mix_models_with_data
from resilient_tune import lm_cocktail as lm_cocktail_module
from resilient_tune.cli import main
from resilient_tune.errors import CheckpointFormatError, UsageError
from resilient_tune.weights import compute_auto_weights

_EXAMPLES = [{"input": "question", "output": "answer"}]


def _checkpoint(folder: Path, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file(
        {"a.weight": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        folder / "model.safetensors",
    )
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return str(folder)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    inputs = tmp_path / "inputs"
    m0, m1 = _checkpoint(inputs / "m0", 0), _checkpoint(inputs / "m1", 1)
    (inputs / "x.gguf").write_bytes(b"GGUF" + bytes(60))
    (inputs / "bad.jsonl").write_text('{"input": "a", "output": "b"}\nnot json\n')
    (inputs / "good.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (inputs / "exists").mkdir()
    base = _checkpoint(inputs / "base", 2)
    return {"m0": m0, "m1": m1, "base": base, "root": inputs, "out": tmp_path / "out"}


def _nothing_written(env: dict[str, Any]) -> None:
    out: Path = env["out"]
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if ".rt-" in p.name]
    leftovers += [p.name for p in env["root"].iterdir() if ".rt-" in p.name]
    assert leftovers == []


def _refused(env: dict[str, Any], call: Callable[[], object], error: type[Exception], *needles: str) -> None:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    _nothing_written(env)


# --- merge() --------------------------------------------------------------------------------------------------

_MERGE_CASES: dict[str, tuple[Callable[[dict], dict], type[Exception], tuple[str, ...]]] = {
    "weights_as_string": (
        lambda e: {"weights": "0.5 0.5"},
        UsageError,
        ("weights=", "'0.5 0.5'", "sequence of numbers"),
    ),
    "weights_wrong_count": (
        lambda e: {
            "weights": [1.0],
            "models": [e["m0"], str(e["root"] / "nope")],
        },  # before opening any input
        UsageError,
        ("1 weights for 2 models", "one weight per model"),
    ),
    "weights_nan": (lambda e: {"weights": [float("nan"), 0.5]}, UsageError, ("nan", "finite")),
    "normalize_zero_sum": (
        lambda e: {"weights": [1, -1], "normalize": True},
        UsageError,
        ("sum to 0", "nonzero sum"),
    ),
    "recipe_is_a_dict": (
        lambda e: {"recipe": {"method": "linear"}},
        UsageError,
        ("recipe is a dict", "Recipe.from_dict"),
    ),
    "allow_pickle_string": (
        lambda e: {"allow_pickle": "no"},
        UsageError,
        ("allow_pickle='no'", "True or False"),
    ),
    "overwrite_string": (
        lambda e: {"overwrite": "false"},
        UsageError,
        ("overwrite='false'", "True or False"),
    ),
    "metadata_not_json": (
        lambda e: {"metadata": {"when": object()}, "models": [e["m0"], str(e["root"] / "nope")]},
        UsageError,
        ("metadata", "JSON", "pass str"),
    ),
    "metadata_reserved_key": (
        lambda e: {"metadata": {"recipe": 1}, "models": [e["m0"], str(e["root"] / "nope")]},
        UsageError,
        ("'recipe'", "reserved", "rename"),
    ),
    "max_shard_size_zero": (
        lambda e: {"max_shard_size": "0MB"},
        UsageError,
        ("max_shard_size='0MB'", "at least 1 byte"),
    ),
    "dtype_integer": (lambda e: {"dtype": "int8"}, UsageError, ("'int8'", "float16", "auto")),
    "method_unknown": (lambda e: {"method": "soup"}, UsageError, ("'soup'", "ties", "dare_linear")),
    "ties_density_out_of_range": (
        lambda e: {"weights": [1, 1], "method": "ties", "base": e["m0"], "density": 1.5},
        UsageError,
        ("density=1.5", "'ties'", "(0, 1]"),
    ),
    "option_of_another_method": (
        lambda e: {"weights": [1, 1], "method": "ties", "base": e["m0"], "gamma": 0.1},
        UsageError,
        ("'gamma'", "'ties'", "valid options: lambda, density"),
    ),
    "seed_float": (lambda e: {"seed": 1.5}, UsageError, ("seed", "1.5", "seed=0")),
    "output_is_an_input": (
        lambda e: {"out": e["m0"], "overwrite": True},
        UsageError,
        ("models[0]", "destroy an ingredient", "outside every input"),
    ),
    "output_contains_the_base": (
        lambda e: {
            "weights": [1, 1],
            "method": "task_arithmetic",
            "base": e["base"],
            "out": e["base"],
            "overwrite": True,
        },
        UsageError,
        ("input checkpoint base", "outside every input"),
    ),
    "missing_checkpoint": (
        lambda e: {"models": [e["m0"], str(e["root"] / "nope")]},
        CheckpointFormatError,
        ("no such file or folder", "nope", "pass an existing checkpoint"),
    ),
    "gguf_named_unsupported": (
        lambda e: {"models": [e["m0"], str(e["root"] / "x.gguf")]},
        CheckpointFormatError,
        ("'.gguf'", "x.gguf", "convert the checkpoint to safetensors"),
    ),
    "state_dict_with_non_tensor": (
        lambda e: {"models": [{"a": 1}]},
        UsageError,
        ("models[0]", "'a'", "model.state_dict()"),
    ),
    "models_not_a_list": (
        lambda e: {"models": 3},
        UsageError,
        ("models is a int", "list of checkpoint paths"),
    ),
}


@pytest.mark.parametrize("case", sorted(_MERGE_CASES))
def test_merge_refuses(env: dict[str, Any], case: str) -> None:
    build, error, needles = _MERGE_CASES[case]
    kwargs = {"models": [env["m0"], env["m1"]], "out": env["out"], **build(env)}
    models = kwargs.pop("models")
    before = {p: Path(p, "model.safetensors").read_bytes() for p in (env["m0"], env["m1"])}
    _refused(env, lambda: merge(models, **kwargs), error, *needles)
    assert {p: Path(p, "model.safetensors").read_bytes() for p in before} == before  # inputs untouched


# --- Recipe ---------------------------------------------------------------------------------------------------

_RECIPE_CASES: dict[str, tuple[Callable[[], object], tuple[str, ...]]] = {
    "weights_as_string": (lambda: Recipe(weights="ab"), ("weights='ab'", "sequence of numbers")),
    "weights_with_bool": (lambda: Recipe(weights=(True, 0.5)), ("weights[0]", "True", "real number")),
    "options_not_a_mapping": (lambda: Recipe(options=[1]), ("options=[1]", "mapping", "{'density': 0.5}")),
    "normalize_string": (lambda: Recipe(normalize="no"), ("normalize='no'", "True or False")),
    "from_dict_of_a_list": (lambda: Recipe.from_dict([1, 2]), ("JSON object", "list", "cocktail.json")),
    "from_dict_bad_seed": (lambda: Recipe.from_dict({"seed": "abc"}), ("seed", "'abc'", "seed=0")),
    "from_json_garbage": (lambda: Recipe.from_json("{"), ("not valid JSON", "cocktail.json")),
    "lambda_infinite": (
        lambda: Recipe(method="task_arithmetic", options={"lambda": float("inf")}),
        ("lambda=inf", "'task_arithmetic'", "finite number"),
    ),
}


@pytest.mark.parametrize("case", sorted(_RECIPE_CASES))
def test_recipe_refuses(env: dict[str, Any], case: str) -> None:
    call, needles = _RECIPE_CASES[case]
    _refused(env, call, UsageError, *needles)


# --- auto weights and the LM_Cocktail drop-ins: checked before any model is loaded --------------------------


def _forbid_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model loading or scoring fail loudly: the checks must come first."""

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("resilient_tune.weights._auto._resolve_model_path", started)  # where it is called
    monkeypatch.setattr(lm_cocktail_module, "resolve_model_path", started)
    monkeypatch.setattr(lm_cocktail_module, "compute_auto_weights", started)


_WEIGHTS_CASES: dict[str, tuple[Callable[[dict], object], tuple[str, ...]]] = {
    "auto_weights_model_type": (
        lambda e: compute_auto_weights([e["m0"]], "seq2seq", _EXAMPLES),
        ("model_type", "'seq2seq'", "'decoder'"),
    ),
    "auto_weights_encoder_negatives": (
        lambda e: compute_auto_weights([e["m0"]], "encoder", [{"query": "q", "pos": ["p"], "neg": ["n"]}]),
        ("1 negatives", "neg_number=7", "lower neg_number"),
    ),
    "auto_weights_examples_not_a_list": (
        lambda e: compute_auto_weights([e["m0"]], "decoder", "text"),
        ("example_data is a str", "list of example dicts"),
    ),
    "mix_models_output_exists": (
        lambda e: mix_models([e["m0"], e["m1"]], "decoder", [0.5, 0.5], output_path=e["root"] / "exists"),
        ("exists already exists", "overwrite=True"),
    ),
    "mix_models_dtype": (
        lambda e: mix_models([e["m0"], e["m1"]], "decoder", [0.5, 0.5], dtype="int8"),
        ("'int8'", "float16"),
    ),
    "mix_with_data_output_exists": (
        lambda e: mix_models_with_data(
            [e["m0"], e["m1"]], "decoder", _EXAMPLES, output_path=e["root"] / "exists"
        ),
        ("exists already exists", "overwrite=True"),
    ),
    "mix_with_data_dtype": (
        lambda e: mix_models_with_data([e["m0"], e["m1"]], "decoder", _EXAMPLES, dtype="fp8"),
        ("'fp8'", "bfloat16"),
    ),
    "mix_with_data_both_example_names": (
        lambda e: mix_models_with_data([e["m0"]], "decoder", _EXAMPLES, example_ata=_EXAMPLES),
        ("example_ata", "pass the examples once"),
    ),
}


@pytest.mark.parametrize("case", sorted(_WEIGHTS_CASES))
def test_weights_and_drop_ins_refuse_before_loading(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    _forbid_loading(monkeypatch)
    call, needles = _WEIGHTS_CASES[case]
    _refused(env, lambda: call(env), UsageError, *needles)
    assert list((env["root"] / "exists").iterdir()) == []


# --- CLI: exit status 2 (usage) or 1 (unreadable input), one line on stderr ------------------------------------


def _cli(argv: list[str]) -> int:
    """``main(argv)``'s status (argparse's own errors are returned as 2 too, never raised)."""
    return main(argv)


_CLI_CASES: dict[str, tuple[Callable[[dict], list[str]], int, tuple[str, ...]]] = {
    "weights_not_a_number": (
        lambda e: ["merge", e["m0"], e["m1"], "--weights", "abc", "--out", str(e["out"])],
        2,
        ("--weights", "invalid float value: 'abc'"),
    ),
    "out_is_an_input": (
        lambda e: ["merge", e["m0"], e["m1"], "--out", e["m0"], "--overwrite"],
        2,
        ("models[0]", "outside every input"),
    ),
    "max_shard_size_zero": (
        lambda e: ["merge", e["m0"], e["m1"], "--max-shard-size", "0", "--out", str(e["out"])],
        2,
        ("max_shard_size='0'", "at least 1 byte"),
    ),
    "option_of_another_method": (
        lambda e: [
            "merge",
            e["m0"],
            e["m1"],
            "--weights",
            "1",
            "1",
            "--method",
            "ties",
            "--base",
            e["m0"],
            "--gamma",
            "0.5",
            "--out",
            str(e["out"]),
        ],
        2,
        ("'gamma'", "'ties'", "valid options"),
    ),
    "base_with_linear": (
        lambda e: ["merge", e["m0"], e["m1"], "--base", e["m0"], "--out", str(e["out"])],
        2,
        ("'linear'", "takes no base", "drop base="),
    ),
    "gguf_input": (
        lambda e: ["merge", e["m0"], str(e["root"] / "x.gguf"), "--out", str(e["out"])],
        1,
        ("'.gguf'", "convert the checkpoint to safetensors"),
    ),
    "examples_not_json": (
        lambda e: ["weights", e["m0"], "--examples", str(e["root"] / "bad.jsonl"), "--model-type", "decoder"],
        2,
        ("bad.jsonl:2", "not valid JSON", "one JSON object per line"),
    ),
    "examples_missing": (
        lambda e: [
            "weights",
            e["m0"],
            "--examples",
            str(e["root"] / "none.jsonl"),
            "--model-type",
            "decoder",
        ],
        2,
        ("none.jsonl", "does not exist", "--examples"),
    ),
    "weights_temperature_zero": (
        lambda e: [
            "weights",
            e["m0"],
            "--examples",
            str(e["root"] / "good.jsonl"),
            "--model-type",
            "decoder",
            "--temperature",
            "0",
        ],
        2,
        ("temperature", "0.0", "> 0"),
    ),
    "report_of_nothing": (
        lambda e: ["report", str(e["root"] / "no-run")],
        2,
        ("no-run", "does not exist", "--out folder of a run"),
    ),
}


@pytest.mark.parametrize("case", sorted(_CLI_CASES))
def test_cli_refuses_with_one_line(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    _forbid_loading(monkeypatch)
    build, status, needles = _CLI_CASES[case]
    assert _cli(build(env)) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    _nothing_written(env)


def test_cli_demo_bad_drift_budget_fails_before_any_work(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started before drift_budget was checked")

    monkeypatch.setattr("resilient_tune.demo.encoder.run_encoder", started)
    assert _cli(["demo", "--drift-budget", "-1", "--out", str(env["out"])]) == 2
    err = capsys.readouterr().err
    assert "drift_budget" in err and "-1" in err and err.count("\n") == 1
    _nothing_written(env)


# --- both callbacks: construction only, no training ------------------------------------------------------------


def _callbacks() -> list[Any]:
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    from resilient_tune import CocktailCallback as HFCallback
    from resilient_tune.integrations.lightning import CocktailCallback as LightningCallback

    return [HFCallback, LightningCallback]


_GENERAL = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]}]

_CALLBACK_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "alpha_nan": ({"alpha": float("nan")}, ("alpha=nan", "[0, 1]", "e.g. 0.5")),
    "alpha_bool": ({"alpha": True}, ("alpha=True", "number in [0, 1]")),
    "alpha_string": ({"alpha": "0.5"}, ("alpha='0.5'", "number in [0, 1]")),
    "drift_budget_negative": (
        {"policy": "budget", "drift_budget": -0.1, "general_data": _GENERAL},
        ("drift_budget=-0.1", ">= 0", "0.05"),
    ),
    "drift_budget_nan": (
        {"policy": "budget", "drift_budget": float("nan"), "general_data": _GENERAL},
        ("drift_budget=nan", ">= 0"),
    ),
    "policy_not_a_name": ({"policy": 3}, ("policy=3", "fixed | cocktail | budget")),
    "peers_a_string": ({"peers": "/models/peer"}, ("peers='/models/peer'", "list of checkpoint paths")),
    "temperature_infinite": (
        {"policy": "cocktail", "temperature": float("inf")},
        ("temperature", "inf", "> 0"),
    ),
    "method_option_out_of_range": (
        {"method": "ties", "method_options": {"density": 2.0}},
        ("density=2.0", "'ties'", "(0, 1]"),
    ),
    "method_option_unknown": ({"method_options": {"bogus": 1.0}}, ("'bogus'", "'linear'", "valid options")),
    "general_data_empty_set": (
        {"general_data": {"code": []}},
        ("general_data['code']", "empty", "a few dozen"),
    ),
    "target_data_empty": ({"target_data": []}, ("target_data", "empty", "a few dozen")),
    "kl_top_k_zero": ({"kl_top_k": 0}, ("kl_top_k=0", "positive int or None")),
    "score_fn_not_callable": ({"score_fn": 3}, ("score_fn=3", "callable")),
    "max_shard_size_negative": ({"max_shard_size": -5}, ("max_shard_size=-5", "at least 1 byte")),
    "seed_string": ({"seed": "x"}, ("seed", "'x'", "seed=0")),
}


@pytest.mark.parametrize("framework", [0, 1], ids=["hf", "lightning"])
@pytest.mark.parametrize("case", sorted(_CALLBACK_CASES))
def test_callback_constructor_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, framework: int
) -> None:
    callback = _callbacks()[framework]
    monkeypatch.chdir(tmp_path)
    kwargs, needles = _CALLBACK_CASES[case]
    with pytest.raises(UsageError) as info:
        callback(**kwargs)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    assert list(tmp_path.iterdir()) == []  # construction writes nothing


# Cases that need a file on disk or were once caught only at train begin (fixed: each is refused at construction).
_CALLBACK_FILE_CASES = {
    "strict_string": (lambda root: {"strict": "no"}, ("strict='no'", "True or False")),
    "snapshot_on_disk_int": (lambda root: {"snapshot_on_disk": 1}, ("snapshot_on_disk=1", "True or False")),
    "save_resilient_string": (
        lambda root: {"save_resilient": "yes"},
        ("save_resilient='yes'", "True or False"),
    ),
    "peer_not_a_checkpoint": (lambda root: {"peers": [str(root / "notes.txt")]}, ("peers", "notes.txt")),
    "peer_folder_without_weights": (
        lambda root: {"peers": [str(root)]},
        ("peers", "no weights", "save_pretrained"),
    ),
    "snapshot_device_unknown": (lambda root: {"snapshot_device": "tpu"}, ("snapshot_device", "'tpu'", "cpu")),
    "snapshot_dtype_integer": (lambda root: {"snapshot_dtype": "int8"}, ("snapshot_dtype", "'int8'", "bf16")),
}


@pytest.mark.parametrize("framework", [0, 1], ids=["hf", "lightning"])
@pytest.mark.parametrize("case", sorted(_CALLBACK_FILE_CASES))
def test_callback_constructor_refuses_flags_devices_and_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, framework: int
) -> None:
    callback = _callbacks()[framework]
    (tmp_path / "notes.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    build, needles = _CALLBACK_FILE_CASES[case]
    with pytest.raises(UsageError) as info:
        callback(**build(tmp_path))
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
