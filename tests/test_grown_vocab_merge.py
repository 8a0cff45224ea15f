"""Offline merges across a grown vocabulary (``allow_grown_vocab=True`` / ``--allow-grown-vocab``): rows the base has
are mixed, rows only the fine-tuned model has keep its values; everything else is refused with the fix named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import resilient_tune as rt
from resilient_tune import cli
from resilient_tune.errors import IncompatibleModelsError, UsageError

transformers = pytest.importorskip("transformers")

NEW = ["<tool>", "<result>"]


@pytest.fixture
def grown(tiny_gpt2_dirs, tmp_path):
    """``(fine_tuned, base)`` folders: the fine-tuned one has two tokens (rows) more, and other weights."""
    base = tmp_path / "base"
    shutil.copytree(tiny_gpt2_dirs(1)[0], base)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tok.add_tokens(NEW)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    return tuned, base


def test_rows_only_the_fine_tuned_model_has_keep_its_values(grown, tmp_path):
    tuned, base = grown
    with pytest.raises(IncompatibleModelsError, match="allow_grown_vocab=True"):
        rt.merge([tuned, base], [0.5, 0.5], out=tmp_path / "refused")
    out = rt.merge([tuned, base], [0.5, 0.5], out=tmp_path / "merged", allow_grown_vocab=True)
    a, b = load_file(str(tuned / "model.safetensors")), load_file(str(base / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    rows = b["transformer.wte.weight"].shape[0]
    wte = merged["transformer.wte.weight"]
    assert wte.shape[0] == rows + len(NEW)
    torch.testing.assert_close(
        wte[:rows], 0.5 * a["transformer.wte.weight"][:rows] + 0.5 * b["transformer.wte.weight"]
    )
    assert torch.equal(wte[rows:], a["transformer.wte.weight"][rows:])
    torch.testing.assert_close(
        merged["transformer.h.0.mlp.c_fc.weight"],
        0.5 * a["transformer.h.0.mlp.c_fc.weight"] + 0.5 * b["transformer.h.0.mlp.c_fc.weight"],
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows + len(NEW)
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == rows + len(NEW)
    assert not (tmp_path / "refused").exists()


def test_the_command_line_flag(grown, tmp_path):
    tuned, base = grown
    code = cli.main(
        [
            "merge",
            str(tuned),
            str(base),
            "--weights",
            "0.7",
            "0.3",
            "--out",
            str(tmp_path / "cli"),
            "--allow-grown-vocab",
            "-q",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "cli" / "cocktail.json").read_text())["recipe"]["weights"] == [0.7, 0.3]


def test_refusals(grown, tmp_path):
    tuned, base = grown
    with pytest.raises(UsageError, match="put the model with the grown vocabulary first"):
        rt.merge([base, tuned], [0.5, 0.5], allow_grown_vocab=True)
    with pytest.raises(UsageError, match="method='linear'"):
        rt.merge([tuned], [1.0], base=base, method="task_arithmetic", allow_grown_vocab=True)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tuned, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two shared ids now mean other tokens
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelsError, match="tokenizers disagree on id 5"):
        rt.merge([other, base], [0.5, 0.5], allow_grown_vocab=True)
    with pytest.raises(UsageError, match="allow_grown_vocab='yes' must be True or False"):
        rt.merge([tuned, base], [0.5, 0.5], allow_grown_vocab="yes")
