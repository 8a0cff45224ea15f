"""What the language-model end-to-end suites share: a word-level tokenizer with a chat template, tiny GPT-2 / T5 / BART
models built from configs, general English sentences (what the model must not forget) and a narrow target task.

Everything is built in code, offline, in well under a second.
"""

from __future__ import annotations

import itertools

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL = ["[PAD]", "[EOS]", "[BOS]", "[UNK]"]
SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the child"]
VERBS = ["sees", "likes", "finds", "paints", "reads about", "walks past"]
OBJECTS = ["the river", "a garden", "the old house", "a red boat", "the market", "a quiet park"]
CODE = ["def", "return", "x", "y", "+", "*", "(", ")", ":", "=", "if", "else", "0", "1", "2", "3"]
CHAT = [
    "user",
    "assistant",
    "question",
    "answer",
    "yes",
    "no",
    "q0",
    "q1",
    "q2",
    "q3",
    "q4",
    "q5",
    "q6",
    "q7",
]
WORDS = sorted(
    {w for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()} | set(CODE) | set(CHAT) | {"."}
)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the suites' words (whitespace split), ``[PAD]``/``[EOS]``, a chat template."""
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]", unk_token="[UNK]"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def gpt2(tok: transformers.PreTrainedTokenizerFast, seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def t5(tok: transformers.PreTrainedTokenizerFast, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def bart(
    tok: transformers.PreTrainedTokenizerFast, seed: int = 0
) -> transformers.BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def sentences(n: int, offset: int = 0) -> list[str]:
    """General English: ``subject verb object .`` in a fixed order (``offset`` picks another slice)."""
    all_ = [f"{s} {v} {o} ." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    return [all_[(offset + 7 * i) % len(all_)] for i in range(n)]


def code_lines(n: int) -> list[str]:
    """The narrow target task: tiny code lines."""
    lines = [f"def {a} ( x ) : return x {op} {b}" for a in "xy" for op in "+*" for b in "0123"]
    return [lines[i % len(lines)] for i in range(n)]


def pretrain(
    model: torch.nn.Module, tok: transformers.PreTrainedTokenizerFast, steps: int = 60
) -> torch.nn.Module:
    """A few steps of plain LM training on general sentences, so that fine-tuning has something to forget."""
    text = sentences(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = tok(text[(8 * step) % 64 : (8 * step) % 64 + 8], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
