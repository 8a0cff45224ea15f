"""The LM_Cocktail drop-in: mix_models / mix_models_with_data, parity with LM_Cocktail 0.0.4, outputs and checks."""

from __future__ import annotations

import inspect
import json
import math
import random

import pytest
import torch

from resilient_tune.errors import UsageError
from resilient_tune.lm_cocktail import mix_models, mix_models_with_data

DECODER_EXAMPLES = [
    {"input": "question: what is two plus two?", "output": "four"},
    {"input": "translate to french: good morning", "output": "bonjour, a good morning to you"},
    {"input": "the quick brown", "output": "fox jumps over the lazy dog"},
    {"input": "a merge of models", "output": "keeps what the base model knew"},
]
WEIGHTS = [0.2, 0.3, 0.5]
_KINDS = {"decoder": "tiny_gpt2_dirs", "encoder": "tiny_bert_dirs", "reranker": "tiny_bert_reranker_dirs"}


def _retrieval_examples(n, n_neg):
    topics = ["model merging", "forgetting", "french greetings", "lazy dogs", "arithmetic"]
    return [
        {
            "query": f"tell me about {topics[i % 5]}",
            "pos": [f"{topics[i % 5]} explained in a short passage"],
            "neg": [f"off-topic text {j} on {topics[(i + j + 1) % 5]}" for j in range(n_neg)],
        }
        for i in range(n)
    ]


def _dirs(request, kind, n=3, **kw):
    return [str(d) for d in request.getfixturevalue(_KINDS[kind])(n, **kw)]


def _examples(kind):
    return DECODER_EXAMPLES if kind == "decoder" else _retrieval_examples(5, 9)


def _load(folder, kind, **kw):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {
        "decoder": AutoModelForCausalLM,
        "encoder": AutoModel,
        "reranker": AutoModelForSequenceClassification,
    }[kind]
    return cls.from_pretrained(folder, **kw)


def _by_hand(dirs, kind, weights):
    """Σ wᵢ θᵢ over every tensor of the loaded models, in float64."""
    states = [_load(d, kind).state_dict() for d in dirs]
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)) for k in states[0]}


def _assert_state_close(model, expected, atol=1e-6):
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value.double(), atol=atol, rtol=0, msg=key)


def _printed_weights(text):
    lines = text.split("***weight for each model***: ")[-1].strip().splitlines()
    return [float(line.rsplit(" ", 1)[1]) for line in lines[:3]]


# --- parity with LM_Cocktail --------------------------------------------------------------------------------------


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_mix_models_matches_reference(request, tmp_path, kind):
    cocktail = pytest.importorskip("LM_Cocktail")
    dirs = _dirs(request, kind)
    ref = cocktail.mix_models(dirs, kind, WEIGHTS, output_path=str(tmp_path / "ref"))
    expected = ref.state_dict()
    _assert_state_close(mix_models(dirs, kind, WEIGHTS, progress=False), expected)
    ours = mix_models(dirs, kind, WEIGHTS, output_path=tmp_path / "ours", progress=False)
    _assert_state_close(ours, expected)
    _assert_state_close(_load(tmp_path / "ours", kind), _load(tmp_path / "ref", kind).state_dict())
    _assert_state_close(ours, _by_hand(dirs, kind, WEIGHTS))


@pytest.mark.peers
@pytest.mark.parametrize(("kind", "temperature"), [("decoder", 0.05), ("encoder", 0.001)])
def test_mix_models_with_data_matches_reference(request, tmp_path, capsys, kind, temperature):
    cocktail = pytest.importorskip("LM_Cocktail")
    dirs = _dirs(request, kind)
    kw = {"temperature": temperature, "batch_size": 2, "max_input_length": 64, "neg_number": 7}
    random.seed(42)
    ref = cocktail.mix_models_with_data(dirs, kind, _examples(kind), output_path=str(tmp_path / "ref"), **kw)
    ref_weights = _printed_weights(capsys.readouterr().out)
    model, weights = mix_models_with_data(
        dirs, kind, _examples(kind), output_path=tmp_path / "ours", seed=42, return_weights=True, **kw
    )
    assert weights == pytest.approx(ref_weights, abs=1e-6, rel=0)
    assert max(weights) - min(weights) > 0.01  # the auto weights really differ
    assert _printed_weights(capsys.readouterr().out) == weights
    _assert_state_close(model, ref.state_dict())
    _assert_state_close(_load(tmp_path / "ours", kind), _load(tmp_path / "ref", kind).state_dict())
    in_memory = mix_models_with_data(dirs, kind, _examples(kind), seed=42, progress=False, **kw)
    _assert_state_close(in_memory, ref.state_dict())


@pytest.mark.peers
def test_signatures_are_drop_in():
    cocktail = pytest.importorskip("LM_Cocktail")
    for ours, theirs in (
        (mix_models, cocktail.mix_models),
        (mix_models_with_data, cocktail.mix_models_with_data),
    ):
        ref_params = list(inspect.signature(theirs).parameters.values())
        our_params = list(inspect.signature(ours).parameters.values())
        for ref, our in zip(ref_params, our_params, strict=False):
            assert our.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
            assert our.name == ("example_data" if ref.name == "example_ata" else ref.name)
            if ref.default is not inspect.Parameter.empty:
                assert our.default == ref.default
        assert "example_ata" in inspect.signature(ours).parameters or ours is mix_models


# --- behaviour ----------------------------------------------------------------------------------------------------


def test_reranker_with_data_and_return_weights(request, tmp_path, capsys):
    dirs = _dirs(request, "reranker")
    examples = _retrieval_examples(4, 7)
    model, weights = mix_models_with_data(dirs, "reranker", examples, 0.01, return_weights=True, seed=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.cocktail_weights == weights and math.isclose(sum(weights), 1.0, abs_tol=1e-5)
    assert max(weights) - min(weights) > 0.01
    _assert_state_close(model, _by_hand(dirs, "reranker", weights))
    out = capsys.readouterr().out
    assert "***weight for each model***" in out and all(d in out for d in dirs)
    written = mix_models_with_data(
        dirs, "reranker", examples, 0.01, output_path=tmp_path / "m", seed=3, progress=False
    )
    assert capsys.readouterr().out == ""
    _assert_state_close(written, model.state_dict())
    doc = json.loads((tmp_path / "m" / "cocktail.json").read_text())
    assert "losses" in json.dumps(doc) and len(doc["lm_cocktail"]["losses"]) == 3


def test_example_ata_alias(request):
    dirs = _dirs(request, "decoder")
    kw = {"temperature": 0.1, "max_input_length": 64, "progress": False, "return_weights": True}
    _, positional = mix_models_with_data(dirs, "decoder", DECODER_EXAMPLES, **kw)
    _, legacy = mix_models_with_data(dirs, "decoder", example_ata=DECODER_EXAMPLES, **kw)
    _, keyword = mix_models_with_data(dirs, "decoder", example_data=DECODER_EXAMPLES, **kw)
    assert positional == legacy == keyword
    with pytest.raises(UsageError, match="both example_data and example_ata"):
        mix_models_with_data(dirs, "decoder", DECODER_EXAMPLES, example_ata=DECODER_EXAMPLES)
    with pytest.raises(UsageError, match="example_data is missing"):
        mix_models_with_data(dirs, "decoder")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([0.5, 0.5], "2 weights for 3 models"),
        ([0.3, 0.3, 0.3], "sum to 0.9"),
        ([0.5, 0.5, 0.5], "sum to 1.5"),  # the reference only checks one side
        ([0.5, float("nan"), 0.5], "nan"),
        ([0.5, "0.2", 0.3], "weight 1"),
    ],
)
def test_mix_models_rejects_bad_weights(weights, match):
    with pytest.raises(UsageError, match=match):
        mix_models(["/nonexistent/a", "/nonexistent/b", "/nonexistent/c"], "decoder", weights)


def test_bad_model_type_and_temperature():
    paths = ["/nonexistent/a", "/nonexistent/b"]
    with pytest.raises(UsageError, match="'decoder', 'encoder', 'reranker'"):
        mix_models(paths, "llm", [0.5, 0.5])
    with pytest.raises(UsageError, match="'decoder', 'encoder', 'reranker'"):
        mix_models_with_data(paths, "llm", DECODER_EXAMPLES)
    for temperature in (0, -1.0, float("nan")):
        with pytest.raises(UsageError, match="temperature"):
            mix_models_with_data(paths, "decoder", DECODER_EXAMPLES, temperature)
    with pytest.raises(UsageError, match="example 1 has no 'output'"):
        mix_models_with_data(paths, "decoder", [DECODER_EXAMPLES[0], {"input": "x"}])


def test_missing_model_offline_is_named(request):
    dirs = _dirs(request, "decoder", n=1)
    with pytest.raises(UsageError, match=r"'nobody/missing-model' is not a local folder"):
        mix_models([dirs[0], "nobody/missing-model"], "decoder", [0.5, 0.5], progress=False)


def test_encoder_output_loads_with_sentence_transformers(request, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer

    dirs = _dirs(request, "encoder")
    model = mix_models(dirs, "encoder", WEIGHTS, output_path=tmp_path / "enc", progress=False)
    encoder = st.SentenceTransformer(str(tmp_path / "enc"), device="cpu")
    texts = ["model merging keeps old skills", "a lazy dog", "bonjour"]
    got = encoder.encode(texts, convert_to_tensor=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "enc")
    with torch.no_grad():
        cls = model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(got, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    modules = json.loads((tmp_path / "enc" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]


def test_dtype_of_inputs_is_kept(request, tmp_path):
    dirs = _dirs(request, "decoder", dtype=torch.float16)
    expected = _by_hand(dirs, "decoder", WEIGHTS)
    in_memory = mix_models(dirs, "decoder", WEIGHTS, progress=False)
    written = mix_models(dirs, "decoder", WEIGHTS, output_path=tmp_path / "fp16", progress=False)
    for model in (in_memory, written, _load(tmp_path / "fp16", "decoder")):
        assert model.dtype == torch.float16
        _assert_state_close(model, {k: v.half() for k, v in expected.items()}, atol=1e-3)
    bf16 = mix_models(dirs, "decoder", WEIGHTS, dtype="bfloat16", progress=False)
    assert bf16.dtype == torch.bfloat16


def test_existing_output_path_needs_overwrite(request, tmp_path):
    dirs = _dirs(request, "decoder")
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        mix_models(dirs, "decoder", WEIGHTS, output_path=tmp_path / "out", progress=False)
    model = mix_models(dirs, "decoder", WEIGHTS, output_path=tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "config.json").exists() and model.cocktail_weights == WEIGHTS
