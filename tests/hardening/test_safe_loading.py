"""Safe loading (issue 6), end to end through ``merge`` and the CLI.

The reader-level checks live in ``tests/checkpoint``: malformed safetensors headers (huge header length, offsets
out of range, overlapping, unknown dtype, size mismatch, absurd sizes refused fast without allocating) in
``test_checkpoint_format.py``; the pickle opt-in, ``weights_only=True``, index entries that are not plain names or
symlink out of the folder, and unsupported formats in ``test_checkpoint_reader.py``. Here: the same guarantees
seen by a user of ``merge``/``resilient-tune merge``, with a side effect that would show if code ran, plus
``trust_remote_code`` defaults.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from resilient_tune import merge, mix_models
from resilient_tune.cli import main
from resilient_tune.errors import CheckpointFormatError


def _good(folder: Path, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file(
        {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}, folder / "model.safetensors"
    )
    return str(folder)


def _refused_everywhere(tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """``merge`` raises CheckpointFormatError and ``resilient-tune merge`` exits 1 with one line; no output."""
    good = _good(tmp_path / "good")
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError) as info:
        merge([good, bad], out=out)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    capsys.readouterr()
    assert main(["merge", good, bad, "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(needle in err for needle in needles), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".rt-" in p.name]


# --- pickles ----------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the marker folder appears iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def _malicious(folder: Path, marker: Path) -> str:
    folder.mkdir(parents=True)
    torch.save({"w": _Payload(marker), "b": torch.zeros(4)}, folder / "pytorch_model.bin")
    return str(folder)


def test_pickle_is_refused_without_opt_in_naming_allow_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"w": torch.zeros(4, 4), "b": torch.zeros(4)}, folder / "pytorch_model.bin")
    _refused_everywhere(
        tmp_path, str(folder), capsys, "pickle", "allow_pickle=True", "--allow-pickle", "safetensors"
    )


def test_malicious_pickle_does_not_run_even_with_opt_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    bad = _malicious(tmp_path / "evil", marker)
    good = _good(tmp_path / "good")
    with pytest.raises(CheckpointFormatError, match=r"weights_only=True"):
        merge([good, bad], out=tmp_path / "out", allow_pickle=True)
    assert main(["merge", good, bad, "--out", str(tmp_path / "out"), "--allow-pickle", "-q"]) == 1
    assert "weights_only=True" in capsys.readouterr().err
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "out").exists()


def test_allow_pickle_must_be_a_real_bool(tmp_path: Path) -> None:
    """``allow_pickle="false"`` is truthy: refused rather than taken as consent."""
    marker = tmp_path / "code-ran"
    bad = _malicious(tmp_path / "evil", marker)
    with pytest.raises(ValueError, match=r"allow_pickle='false' must be True or False"):
        merge([bad], out=tmp_path / "out", allow_pickle="false")  # type: ignore[arg-type]
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- trust_remote_code ------------------------------------------------------------------------------------------


def test_trust_remote_code_defaults_to_false_everywhere() -> None:
    from resilient_tune import lm_cocktail, weights

    functions = [
        weights.compute_auto_weights,
        weights.compute_weights,
        weights._load_auto_model,
        lm_cocktail.mix_models,
        lm_cocktail.mix_models_with_data,
    ]
    for function in functions:
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function.__name__
    # every from_pretrained call in the library passes the user's choice or relies on transformers' False default
    root = Path(weights.__file__).parent
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert "trust_remote_code=True" not in line, f"{path}:{number}"


_REMOTE_CODE = """
import pathlib
pathlib.Path({marker!r}).mkdir()
from transformers import GPT2Config, GPT2LMHeadModel
class EvilConfig(GPT2Config):
    model_type = "evil"
class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig
"""


def test_checkpoint_with_custom_code_is_not_executed_by_default(tmp_path: Path) -> None:
    """A checkpoint whose config.json points at its own Python code (``auto_map``): ``mix_models`` merges the
    weights but transformers refuses to import the code unless ``trust_remote_code=True``."""
    transformers = pytest.importorskip("transformers")
    marker = tmp_path / "code-ran"
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        config = transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8)
        folder = tmp_path / f"m{i}"
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
        data = json.loads((folder / "config.json").read_text())
        data["model_type"] = "evil"
        data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(data))
        (folder / "evil.py").write_text(_REMOTE_CODE.format(marker=str(marker)))
        folders.append(str(folder))
    with pytest.raises(ValueError, match="trust_remote_code"):
        mix_models(folders, "decoder", [0.5, 0.5], progress=False)
    assert not marker.exists()


# --- malformed safetensors, escaping indexes, unsupported formats: through merge and the CLI ----------------------


def _crafted(path: Path, header: dict, data: bytes = bytes(16)) -> str:
    text = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ({"w": {"dtype": "F32", "shape": [10**7, 10**8], "data_offsets": [0, 16]}}, "needs"),
        ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 4 * 10**15]}}, "truncated"),
        ({"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 16]}}, "unknown dtype 'Q4_K'"),
    ],
    ids=["size-mismatch", "offset-out-of-range", "unknown-dtype"],
)
def test_malformed_safetensors_refused_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], header: dict, needle: str
) -> None:
    bad = _crafted(tmp_path / "bad" / "model.safetensors", header)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused_everywhere(tmp_path, bad, capsys, "bad/model.safetensors", needle)
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024
    )  # KiB: nothing big allocated


def test_huge_header_length_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge" / "model.safetensors"
    path.parent.mkdir()
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 2**40))
        file.truncate(4096)
    _refused_everywhere(tmp_path, str(path), capsys, "huge/model.safetensors", str(2**40))


def test_index_shard_name_escaping_the_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = _good(tmp_path / "elsewhere", seed=1)  # a real safetensors file the index tries to reach
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"b": torch.zeros(4)}, folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"b": "model-00001-of-00002.safetensors", "w": "../elsewhere/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert Path(secret, "model.safetensors").is_file()
    _refused_everywhere(
        tmp_path, str(folder), capsys, "'w'", "../elsewhere/model.safetensors", "plain file name"
    )


@pytest.mark.parametrize("layout", ["gguf-file", "pt-folder"])
def test_unsupported_formats_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    if layout == "gguf-file":
        bad = tmp_path / "model.gguf"
        bad.write_bytes(b"GGUF" + bytes(64))
        needles = ("unsupported checkpoint format '.gguf'", "convert the checkpoint to safetensors")
    else:
        bad = tmp_path / "pt"
        bad.mkdir()
        torch.save({"w": torch.zeros(4, 4)}, bad / "model.pt")
        needles = ("no weights in folder", "model.safetensors", "found model.pt")
    _refused_everywhere(tmp_path, str(bad), capsys, *needles)
