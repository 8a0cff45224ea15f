"""LiNeS layer depths parsed from tensor names."""

from __future__ import annotations

import pytest

from resilient_tune.merging import layer_depths


def test_llama_style_keys() -> None:
    keys = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)),
        "model.norm.weight",
        "lm_head.weight",
    ]
    depths = layer_depths(keys)
    assert list(depths) == keys
    assert depths["model.embed_tokens.weight"] == 0.0
    assert [depths[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(5)] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
    ]
    assert depths["model.norm.weight"] == 1.0
    assert depths["lm_head.weight"] == 1.0


def test_gpt2_style_keys_without_prefix_and_with_it() -> None:
    depths = layer_depths(
        ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.2.mlp.c_fc.bias", "ln_f.weight"]
    )
    assert depths == {
        "wte.weight": 0.0,
        "wpe.weight": 0.0,
        "h.0.attn.c_attn.weight": 0.0,
        "h.2.mlp.c_fc.bias": 1.0,
        "ln_f.weight": 1.0,
    }
    assert layer_depths(["transformer.h.1.ln_1.weight", "transformer.h.3.ln_1.weight"]) == {
        "transformer.h.1.ln_1.weight": 1 / 3,
        "transformer.h.3.ln_1.weight": 1.0,
    }


def test_bert_style_keys() -> None:
    depths = layer_depths(
        [
            "embeddings.word_embeddings.weight",
            "embeddings.position_ids",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.output.dense.bias",
            "pooler.dense.weight",
        ]
    )
    assert depths["embeddings.word_embeddings.weight"] == 0.0
    assert depths["embeddings.position_ids"] == 0.0
    assert depths["encoder.layer.0.attention.self.query.weight"] == 0.0
    assert depths["encoder.layer.1.output.dense.bias"] == 1.0
    assert depths["pooler.dense.weight"] == 1.0


@pytest.mark.parametrize("word", ["blocks", "block"])
def test_block_patterns(word: str) -> None:
    depths = layer_depths([f"vit.{word}.0.mlp.weight", f"vit.{word}.4.mlp.weight", "head.weight"])
    assert depths == {f"vit.{word}.0.mlp.weight": 0.0, f"vit.{word}.4.mlp.weight": 1.0, "head.weight": 1.0}


def test_single_layer_gives_zero() -> None:
    assert layer_depths(["model.layers.0.w", "model.norm.weight"]) == {
        "model.layers.0.w": 0.0,
        "model.norm.weight": 1.0,
    }


def test_layer_index_wins_over_embedding_words() -> None:
    depths = layer_depths(["model.layers.0.rel_embed.weight", "model.layers.2.w"])
    assert depths["model.layers.0.rel_embed.weight"] == 0.0
    depths = layer_depths(["model.layers.2.rel_embed.weight", "model.layers.0.w"])
    assert depths["model.layers.2.rel_embed.weight"] == 1.0


def test_lookalike_names_are_not_layers() -> None:
    depths = layer_depths(["heads.3.weight", "shared.h.weight", "model.layers.x.weight", "model.layers.1.w"])
    assert depths["heads.3.weight"] == 1.0
    assert depths["shared.h.weight"] == 1.0
    assert depths["model.layers.x.weight"] == 1.0


def test_case_insensitive_and_empty() -> None:
    assert layer_depths(["Model.Layers.1.W", "Model.Layers.0.W", "Embed.W"]) == {
        "Model.Layers.1.W": 1.0,
        "Model.Layers.0.W": 0.0,
        "Embed.W": 0.0,
    }
    assert layer_depths([]) == {}


def test_accepts_any_iterable_such_as_a_state_dict() -> None:
    depths = layer_depths({"layers.0.w": 1, "layers.1.w": 2}.keys())
    assert depths == {"layers.0.w": 0.0, "layers.1.w": 1.0}
