"""Auto weights: softmax(−loss/τ), the decoder / encoder / reranker few-shot losses, checks and parity with LM_Cocktail."""

from __future__ import annotations

import gc
import math
import random
import subprocess
import sys
import weakref

import pytest
import torch

from resilient_tune.errors import IncompatibleModelsError, NonFiniteError, UsageError
from resilient_tune.weights import (
    AutoWeights,
    _decoder_batches,
    _encoder_batches,
    compute_auto_weights,
    compute_weights,
    example_losses,
    softmax_weights,
)

DECODER_EXAMPLES = [
    {"input": "question: what is two plus two?", "output": "four"},
    {"input": "translate to french: good morning", "output": "bonjour, a good morning to you"},
    {"input": "the quick brown", "output": "fox jumps over the lazy dog"},
    {"input": "a merge of models", "output": "keeps what the base model knew"},
    {"input": "fine-tuning", "output": "can forget"},
]


def _retrieval_examples(n: int = 5, n_neg: int = 9) -> list[dict]:
    topics = [
        "model merging",
        "catastrophic forgetting",
        "french greetings",
        "lazy dogs",
        "arithmetic",
        "foxes",
    ]
    return [
        {
            "query": f"what do we know about {topics[i % len(topics)]}?",
            "pos": [f"a passage on {topics[i % len(topics)]} and why it matters", "a second positive"],
            "neg": [
                f"unrelated text number {j} about {topics[(i + j + 1) % len(topics)]}" for j in range(n_neg)
            ],
        }
        for i in range(n)
    ]


class _Dict(dict):
    """A state dict that supports weak references (to check it is released)."""


def _load(folder, kind):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    cls = {
        "decoder": AutoModelForCausalLM,
        "encoder": AutoModel,
        "reranker": AutoModelForSequenceClassification,
    }[kind]
    return cls.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


# --- softmax_weights ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [5.0, 1.0, 0.3, 2])
def test_softmax_weights_bit_identical_to_reference_formula(temperature):
    losses = [2.5, 1.75, 3.125, 2.0000001]
    expected = torch.softmax(-torch.FloatTensor(losses) / temperature, -1).numpy().tolist()
    got = softmax_weights(losses, temperature)
    assert got == expected
    assert math.isclose(sum(got), 1.0, abs_tol=1e-6)
    assert max(range(4), key=got.__getitem__) == 1  # lowest loss, highest weight


def test_softmax_weights_lower_temperature_is_more_peaked():
    losses = [1.0, 1.5, 2.0]
    assert softmax_weights(losses, 0.5)[0] > softmax_weights(losses, 5.0)[0] > 1 / 3


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_softmax_weights_rejects_bad_temperature(temperature):
    with pytest.raises(UsageError, match="temperature"):
        softmax_weights([1.0, 2.0], temperature)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_softmax_weights_names_the_non_finite_model(bad):
    with pytest.raises(NonFiniteError, match=r"model 1 \(peer-a\)"):
        softmax_weights([1.0, bad, 2.0], names=["base", "peer-a", "peer-b"])


def test_softmax_weights_rejects_empty():
    with pytest.raises(UsageError, match="empty"):
        softmax_weights([])


# --- example validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("examples", "match"),
    [
        ([], "empty"),
        (None, "missing"),
        ({"input": "a", "output": "b"}, "list"),
        ([{"input": "a", "output": "b"}, {"input": "a"}], "example 1 has no 'output'"),
        ([{"input": 3, "output": "b"}], "example 0 field 'input' is a int"),
        (["just text"], "example 0 is a str"),
    ],
)
def test_decoder_examples_are_validated(tiny_gpt2_dirs, examples, match):
    model, tokenizer = _load(tiny_gpt2_dirs(1)[0], "decoder")
    with pytest.raises(UsageError, match=match):
        example_losses(model, tokenizer, [None], "decoder", examples)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e: e.pop("query"), "example 2 has no 'query'"),
        (lambda e: e.pop("neg"), "example 2 has no 'neg'"),
        (lambda e: e.update(pos=[]), "example 2 field 'pos' is empty"),
        (lambda e: e.update(pos="one passage"), "example 2 field 'pos' is a str"),
        (lambda e: e.update(neg=["a", 3]), "example 2 field 'neg' holds a non-str"),
        (lambda e: e.update(neg=["a", "b"]), "example 2 has 2 negatives but neg_number=7"),
    ],
)
def test_retrieval_examples_are_validated_before_loading(edit, match):
    examples = _retrieval_examples()
    edit(examples[2])
    for kind in ("encoder", "reranker"):
        with pytest.raises(UsageError, match=match):  # checked before the (missing) models are looked up
            compute_weights(["/nonexistent/a", "/nonexistent/b"], kind, examples)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_type": "embedder"}, "model_type is 'embedder'; use one of 'decoder', 'encoder', 'reranker'"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"neg_number": -1}, "neg_number"),
        ({"model_names_or_paths": []}, "empty"),
        ({"model_names_or_paths": "single/path"}, "list"),
    ],
)
def test_compute_weights_rejects_bad_arguments_before_loading(kwargs, match):
    args = {
        "model_names_or_paths": ["/nonexistent/a"],
        "model_type": "decoder",
        "example_data": DECODER_EXAMPLES,
    }
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        compute_weights(**args)


def test_missing_model_offline_names_it():
    with pytest.raises(
        UsageError, match=r"'no-such-org/no-such-model' is not a local folder.*HF_HUB_OFFLINE"
    ):
        compute_weights(["no-such-org/no-such-model"], "decoder", DECODER_EXAMPLES)


# --- decoder ------------------------------------------------------------------------------------------------------


def test_decoder_batches_pad_to_batch_longest_with_masked_prompt(tiny_gpt2_dirs):
    _, tokenizer = _load(tiny_gpt2_dirs(1)[0], "decoder")
    batches = _decoder_batches(tokenizer, DECODER_EXAMPLES, 2, 2048, 0, 0, torch.device("cpu"))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    for start, batch in zip(range(0, 5, 2), batches):
        rows = DECODER_EXAMPLES[start : start + 2]
        full = [[*tokenizer.encode(r["input"] + " " + r["output"]), tokenizer.eos_token_id] for r in rows]
        assert batch["input_ids"].shape[1] == max(map(len, full)) < 2048
        for j, (row, ids) in enumerate(zip(rows, full)):
            n_prompt = len(tokenizer.encode(row["input"]))
            assert batch["input_ids"][j, : len(ids)].tolist() == ids
            assert batch["labels"][j, :n_prompt].eq(-100).all()
            assert batch["labels"][j, n_prompt : len(ids)].tolist() == ids[n_prompt:]
            assert batch["labels"][j, len(ids) :].eq(-100).all()
            assert batch["attention_mask"][j].sum() == len(ids)


def test_decoder_truncation_to_max_input_length(tiny_gpt2_dirs):
    _, tokenizer = _load(tiny_gpt2_dirs(1)[0], "decoder")
    batches = _decoder_batches(tokenizer, DECODER_EXAMPLES, 5, 12, 0, 0, torch.device("cpu"))
    assert batches[0]["input_ids"].shape == (5, 12)
    with pytest.raises(UsageError, match=r"examples 0\.\.1 have no output tokens left.*max_input_length=3"):
        _decoder_batches(tokenizer, DECODER_EXAMPLES, 2, 3, 0, 0, torch.device("cpu"))


def _unpadded_decoder_loss(model, tokenizer, examples, batch_size):
    """Mean over batches of the per-batch token-mean NLL, each example run alone (no padding at all)."""
    batch_means = []
    for start in range(0, len(examples), batch_size):
        nll, count = 0.0, 0
        for row in examples[start : start + batch_size]:
            ids = [*tokenizer.encode(row["input"] + " " + row["output"]), tokenizer.eos_token_id]
            n_prompt = len(tokenizer.encode(row["input"]))
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            nll -= sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
            count += len(ids) - n_prompt
        batch_means.append(nll / count)
    return sum(batch_means) / len(batch_means)


@pytest.mark.parametrize("pad_token", [True, False])
def test_decoder_loss_equals_unpadded_computation(tiny_gpt2_dirs, pad_token):
    """Batch-longest padding (with <pad>, or with eos when the tokenizer has no pad token) changes nothing."""
    folder = tiny_gpt2_dirs(1, pad_token=pad_token)[0]
    model, tokenizer = _load(folder, "decoder")
    assert (tokenizer.pad_token_id is None) is not pad_token  # the reference crashes on this tokenizer
    got = example_losses(model, tokenizer, [None], "decoder", DECODER_EXAMPLES, batch_size=2)[0]
    assert got == pytest.approx(_unpadded_decoder_loss(model, tokenizer, DECODER_EXAMPLES, 2), abs=1e-5)


@pytest.mark.peers
def test_decoder_losses_match_reference_padding_to_max_length(tiny_gpt2_dirs):
    utils = pytest.importorskip("LM_Cocktail.utils")
    dirs = tiny_gpt2_dirs(3)
    model, tokenizer = _load(dirs[0], "decoder")
    states = [_load(d, "decoder")[0].state_dict() for d in dirs]
    ref_batches = utils.preprocess_data_for_llm(
        DECODER_EXAMPLES, tokenizer, "cpu", batch_size=2, max_input_length=100
    )
    assert ref_batches[0]["input_ids"].shape[1] == 100  # the reference pads to max_input_length
    expected = []
    for state in states:
        model.load_state_dict(state)
        expected.append(utils.llm_loss(model, ref_batches))
    got = example_losses(model, tokenizer, states, "decoder", DECODER_EXAMPLES, max_input_length=100)
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert len(set(got)) == 3


@pytest.mark.peers
def test_decoder_weights_match_reference(tiny_gpt2_dirs):
    utils = pytest.importorskip("LM_Cocktail.utils")
    dirs = [str(d) for d in tiny_gpt2_dirs(3)]
    model, tokenizer = _load(dirs[0], "decoder")
    params = [_load(d, "decoder")[0].state_dict() for d in dirs]
    kw = {"temperature": 0.05, "batch_size": 2, "max_input_length": 64}
    expected = utils.compute_weights(model, tokenizer, params, "decoder", DECODER_EXAMPLES, **kw)
    auto = compute_auto_weights(dirs, "decoder", DECODER_EXAMPLES, **kw)
    assert isinstance(auto, AutoWeights) and auto.temperature == 0.05
    assert list(auto.weights) == pytest.approx(expected, abs=1e-6, rel=0)
    assert max(auto.weights) - min(auto.weights) > 0.01  # the models really differ at this temperature
    assert list(auto.weights) == softmax_weights(auto.losses, 0.05)
    assert compute_weights(dirs, "decoder", DECODER_EXAMPLES, **kw) == list(auto.weights)


# --- encoder ------------------------------------------------------------------------------------------------------


@pytest.mark.peers
def test_encoder_seeded_negatives_and_losses_match_reference_under_random_seed(tiny_bert_dirs):
    utils = pytest.importorskip("LM_Cocktail.utils")
    dirs = tiny_bert_dirs(3)
    model, tokenizer = _load(dirs[0], "encoder")
    states = [_load(d, "encoder")[0].state_dict() for d in dirs]
    examples = _retrieval_examples(5, 9)
    random.seed(1234)
    ref = utils.preprocess_data_for_embedder(
        examples, tokenizer, "cpu", batch_size=2, max_input_length=64, neg_number=3
    )
    ours = _encoder_batches(tokenizer, examples, 2, 64, 3, 1234, torch.device("cpu"))
    for (rq, rp), (q, p) in zip(ref, ours, strict=True):
        assert torch.equal(rq["input_ids"], q["input_ids"])
        assert torch.equal(rp["input_ids"], p["input_ids"])  # same sampled negatives in the same order
    other = _encoder_batches(tokenizer, examples, 2, 64, 3, 99, torch.device("cpu"))
    assert any(not torch.equal(a[1]["input_ids"], b[1]["input_ids"]) for a, b in zip(ours, other))
    expected = []
    for state in states:
        model.load_state_dict(state)
        expected.append(utils.embedder_loss(model, ref))
    got = example_losses(
        model, tokenizer, states, "encoder", examples, max_input_length=64, neg_number=3, seed=1234
    )
    assert got == pytest.approx(expected, abs=1e-6, rel=0)


@pytest.mark.peers
def test_encoder_weights_match_reference(tiny_bert_dirs):
    utils = pytest.importorskip("LM_Cocktail.utils")
    dirs = [str(d) for d in tiny_bert_dirs(3)]
    model, tokenizer = _load(dirs[0], "encoder")
    params = [_load(d, "encoder")[0].state_dict() for d in dirs]
    examples = _retrieval_examples(5, 9)
    kw = {"temperature": 0.001, "batch_size": 2, "max_input_length": 64, "neg_number": 7}
    random.seed(7)
    expected = utils.compute_weights(model, tokenizer, params, "encoder", examples, **kw)
    got = compute_weights(dirs, "encoder", examples, seed=7, **kw)
    assert got == pytest.approx(expected, abs=1e-6, rel=0)
    assert max(got) - min(got) > 0.01


def test_encoder_in_batch_negatives_by_hand(tiny_bert_dirs):
    """Recompute the loss query by query from separately embedded texts."""
    model, tokenizer = _load(tiny_bert_dirs(1)[0], "encoder")
    examples = _retrieval_examples(3, 4)
    got = example_losses(model, tokenizer, [None], "encoder", examples, batch_size=3, neg_number=2, seed=5)[0]
    rng = random.Random(5)
    passages = [t for e in examples for t in [e["pos"][0], *rng.sample(e["neg"], 2)]]

    def embed(text):
        with torch.no_grad():
            out = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0, 0]
        return out / out.norm()

    p = torch.stack([embed(t) for t in passages])
    terms = [-torch.log_softmax(embed(e["query"]) @ p.T / 0.05, -1)[3 * i] for i, e in enumerate(examples)]
    assert got == pytest.approx(float(sum(terms) / 3), abs=1e-4)


# --- reranker -----------------------------------------------------------------------------------------------------


def test_reranker_loss_is_group_cross_entropy_with_positive_first(tiny_bert_reranker_dirs):
    dirs = tiny_bert_reranker_dirs(2)
    model, tokenizer = _load(dirs[0], "reranker")
    examples = _retrieval_examples(3, 5)
    got = example_losses(
        model, tokenizer, [None, dirs[1]], "reranker", examples, batch_size=2, neg_number=3, seed=11
    )
    rng = random.Random(11)
    groups = [[e["pos"][0], *rng.sample(e["neg"], 3)] for e in examples]
    expected = []
    for folder in dirs:
        scorer, _ = _load(folder, "reranker")
        per_query = []
        for e, group in zip(examples, groups):
            with torch.no_grad():
                logits = [
                    scorer(**tokenizer([e["query"]], [t], return_tensors="pt")).logits[0, 0] for t in group
                ]
            per_query.append(-torch.log_softmax(torch.stack(logits), -1)[0])
        expected.append(float((per_query[0] + per_query[1]) / 2 + per_query[2]) / 2)  # batches [0, 1], [2]
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(got[0] - got[1]) > 1e-3


def test_reranker_needs_one_logit(tiny_bert_dirs):
    from transformers import AutoModelForSequenceClassification

    folder = tiny_bert_dirs(1)[0]
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    _, tokenizer = _load(folder, "encoder")
    with pytest.raises(UsageError, match="2 outputs per pair"):
        example_losses(model, tokenizer, [None], "reranker", _retrieval_examples(2, 7))


# --- loading ingredients ------------------------------------------------------------------------------------------


def test_ingredients_are_loaded_one_at_a_time_and_not_kept(tiny_gpt2_dirs):
    dirs = tiny_gpt2_dirs(3)
    model, tokenizer = _load(dirs[0], "decoder")
    states = [_load(d, "decoder")[0].state_dict() for d in dirs]
    alive: list[weakref.ref] = []
    calls = []

    def loader(i):
        def load():
            gc.collect()
            calls.append((i, [ref() is not None for ref in alive]))
            sd = _Dict(states[i])
            alive.append(weakref.ref(sd))
            return sd

        return load

    losses = example_losses(model, tokenizer, [loader(i) for i in range(3)], "decoder", DECODER_EXAMPLES)
    assert calls == [(0, []), (1, [False]), (2, [False, False])]  # each released before the next is loaded
    assert len(set(losses)) == 3
    # nothing is restored: the model holds the last ingredient's weights
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, states[2]["transformer.h.0.mlp.c_fc.weight"])
    paths = example_losses(
        model, tokenizer, [dirs[0], dirs[1], lambda: states[2]], "decoder", DECODER_EXAMPLES
    )
    assert paths == pytest.approx(losses, abs=1e-6)


def test_ingredient_keys_and_shapes_are_checked(tiny_gpt2_dirs):
    model, tokenizer = _load(tiny_gpt2_dirs(1)[0], "decoder")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    tied_once = {k: v for k, v in good.items() if k != "lm_head.weight"}  # tied weights may come once
    assert example_losses(model, tokenizer, [tied_once], "decoder", DECODER_EXAMPLES)
    missing = {k: v for k, v in good.items() if k != "transformer.h.1.attn.c_attn.weight"}
    extra = {**good, "transformer.h.9.attn.c_attn.weight": torch.zeros(1)}
    shape = {**good, "transformer.ln_f.bias": torch.zeros(7)}
    bad_type = [1, 2, 3]
    for state, match in ((missing, "lacks 1 key"), (extra, "1 key"), (shape, r"shape \(7,\)")):
        with pytest.raises(IncompatibleModelsError, match=match):
            example_losses(model, tokenizer, [None, state], "decoder", DECODER_EXAMPLES, names=["a", "b"])
    with pytest.raises(UsageError, match="model 0 is a list"):
        example_losses(model, tokenizer, [bad_type], "decoder", DECODER_EXAMPLES)


def test_prefixed_checkpoint_loads_into_base_model(tiny_bert_reranker_dirs):
    """A BertForSequenceClassification checkpoint ("bert." keys + classifier head) scores as an encoder."""
    from transformers import AutoModel

    folder = tiny_bert_reranker_dirs(1)[0]
    model = AutoModel.from_pretrained(folder)
    _, tokenizer = _load(folder, "encoder")
    reference = example_losses(model, tokenizer, [None], "encoder", _retrieval_examples(2, 7))
    torch.nn.init.zeros_(model.encoder.layer[0].output.dense.weight)
    again = example_losses(model, tokenizer, [folder], "encoder", _retrieval_examples(2, 7))
    assert again == pytest.approx(reference, abs=1e-6)


def test_non_finite_loss_names_the_model(tiny_gpt2_dirs):
    model, tokenizer = _load(tiny_gpt2_dirs(1)[0], "decoder")
    broken = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"model 1 \(broken\)"):
        example_losses(model, tokenizer, [None, broken], "decoder", DECODER_EXAMPLES, names=["ok", "broken"])


def test_importing_does_not_import_transformers():
    code = "import resilient_tune, resilient_tune.weights, resilient_tune.lm_cocktail, sys; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.peers
def test_reference_crashes_without_pad_token_where_we_do_not(tiny_gpt2_dirs):
    utils = pytest.importorskip("LM_Cocktail.utils")
    folder = tiny_gpt2_dirs(1, pad_token=False)[0]
    model, tokenizer = _load(folder, "decoder")
    with pytest.raises(TypeError):
        utils.preprocess_data_for_llm(DECODER_EXAMPLES, tokenizer, "cpu", batch_size=2, max_input_length=64)
    assert math.isfinite(example_losses(model, tokenizer, [None], "decoder", DECODER_EXAMPLES)[0])
