"""Probe data in the user's own format: detection, tokenization for causal and seq2seq LMs, padding, refusals."""

from __future__ import annotations

import pytest
import torch

from resilient_tune.errors import UsageError
from resilient_tune.probe_data import IGNORE, detect_format, lm_examples, pad_lm_batch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_tokenizer(tiny_gpt2_dirs):
    return transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dirs(1)[0])


@pytest.mark.parametrize(
    ("example", "fmt"),
    [
        ("plain text", "text"),
        ({"text": "plain text"}, "text"),
        ({"prompt": "q", "completion": "a"}, "prompt-completion"),
        ({"input": "q", "output": "a"}, "prompt-completion"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ({"input_ids": [1, 2], "labels": [1, 2]}, "tokenized"),
        ({"anchor": "a", "positive": "b"}, None),
        (3, None),
    ],
)
def test_detect_format(example, fmt):
    assert detect_format(example) == fmt


def test_text_scores_every_token_and_ends_with_eos(gpt2_tokenizer):
    (row,) = lm_examples(["the quick brown fox"], gpt2_tokenizer)
    ids = gpt2_tokenizer("the quick brown fox")["input_ids"]
    assert row["input_ids"] == [*ids, gpt2_tokenizer.eos_token_id] and row["labels"] == row["input_ids"]


def test_prompt_completion_masks_the_prompt(gpt2_tokenizer):
    (row,) = lm_examples(
        [{"prompt": "question: two plus two? answer:", "completion": " four"}], gpt2_tokenizer
    )
    prompt = gpt2_tokenizer("question: two plus two? answer:")["input_ids"]
    assert row["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert row["labels"][len(prompt) :] == row["input_ids"][len(prompt) :] and row["labels"][-1] != IGNORE


def test_lm_cocktail_input_output_joins_with_a_space(gpt2_tokenizer):
    (a,) = lm_examples([{"input": "good morning ->", "output": "bonjour"}], gpt2_tokenizer)
    (b,) = lm_examples([{"prompt": "good morning ->", "completion": " bonjour"}], gpt2_tokenizer)
    assert a == b


def test_preference_scores_the_chosen_answer(gpt2_tokenizer):
    (a,) = lm_examples([{"prompt": "q ", "chosen": "yes", "rejected": "no"}], gpt2_tokenizer)
    (b,) = lm_examples([{"prompt": "q ", "completion": "yes"}], gpt2_tokenizer)
    assert a == b


def test_chat_messages_use_the_chat_template(gpt2_tokenizer):
    tok = gpt2_tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(UsageError, match="no chat template"):
        lm_examples([{"messages": messages}], tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    try:
        (row,) = lm_examples([{"messages": messages}], tok)
        assert row["input_ids"] == tok("user: hi\nassistant: hello\n")["input_ids"]
        (conv,) = lm_examples([{"prompt": messages[:1], "completion": messages[1:]}], tok)
        assert (
            conv["input_ids"] == row["input_ids"]
            and conv["labels"][0] == IGNORE
            and conv["labels"][-1] != IGNORE
        )
    finally:
        tok.chat_template = None


def test_seq2seq_prompt_is_the_encoder_input(gpt2_tokenizer):
    (row,) = lm_examples([{"prompt": "translate: hi", "completion": "salut"}], gpt2_tokenizer, kind="seq2seq")
    assert row["input_ids"] == gpt2_tokenizer("translate: hi")["input_ids"]
    assert row["labels"] == gpt2_tokenizer("salut")["input_ids"]
    with pytest.raises(UsageError, match="sequence-to-sequence"):
        lm_examples([{"messages": [{"role": "user", "content": "x"}]}], gpt2_tokenizer, kind="seq2seq")


def test_tokenized_examples_pass_through(gpt2_tokenizer):
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    assert lm_examples(rows, None) == rows


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"anchor": "a", "positive": "b"}], "no format a language model's probes take"),
        (["text", {"prompt": "q", "completion": "a"}], "one format per probe set"),
        ([{"prompt": "q", "completion": ""}], "no token to score"),
    ],
)
def test_refusals_name_the_fix(gpt2_tokenizer, data, match):
    tok = gpt2_tokenizer
    if match == "no token to score":
        tok = _NoEos(tok)
    with pytest.raises(UsageError, match=match):
        lm_examples(data, tok)


def test_raw_text_without_a_tokenizer_is_refused():
    with pytest.raises(UsageError, match="processing_class=tokenizer"):
        lm_examples(["text"], None)


def test_pad_lm_batch_pads_ids_and_masks_labels():
    batch = pad_lm_batch(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    unlabeled = pad_lm_batch([{"input_ids": torch.tensor([1, 2])}, {"input_ids": [3]}], 9)
    assert unlabeled["labels"].tolist() == [[1, 2], [3, -100]]


class _NoEos:
    """A tokenizer without an end-of-sequence token (an empty completion then has nothing to score)."""

    def __init__(self, inner):
        self._inner = inner
        self.eos_token_id = None

    def __call__(self, text):
        return self._inner(text)
