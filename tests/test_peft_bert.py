"""A real PEFT adapter on all-MiniLM-L6-v2 (`examples/bert/peft_adapter/`, made by
`examples/bert/make_peft_adapter.py` with PEFT on transformers' `BertModel`): loaded
into the Equinox BERT by module renaming alone, it gives PEFT's sentence embeddings,
and `save_peft` writes it back under the names PEFT wrote."""

import json
import pathlib
import shutil
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
import quax

import quaxlora as ql
from quaxlora._peft import _alpha
from quaxlora._peft_config import rank
from quaxlora._safetensors import read_safetensors, write_safetensors


BERT_DIR = pathlib.Path(__file__).parents[1] / "examples" / "bert"
ADAPTER = BERT_DIR / "peft_adapter"
sys.path.insert(0, str(BERT_DIR))
import minilm  # noqa: E402


# The same correspondence as `minilm.peft_name`, written as pattern pairs.
LAYER, HF_LAYER = r"layers\.(\d+)\.", r"encoder.layer.\1."
PAIRS = [
    (LAYER + r"attention\.(query|key|value)_proj", HF_LAYER + r"attention.self.\2"),
    (LAYER + r"attention\.output_proj", HF_LAYER + "attention.output.dense"),
    (LAYER + r"attention_norm", HF_LAYER + "attention.output.LayerNorm"),
    (LAYER + r"intermediate", HF_LAYER + "intermediate.dense"),
    (LAYER + r"output", HF_LAYER + "output.dense"),
    (LAYER + r"output_norm", HF_LAYER + "output.LayerNorm"),
    (r"embeddings\.norm", "embeddings.LayerNorm"),
    (r"embeddings\.\w+", r"\g<0>"),
]


@pytest.fixture(scope="module")
def pretrained():
    return minilm.load_pretrained(max_length=64)


@pytest.fixture(scope="module")
def reference():
    return json.loads((BERT_DIR / "peft_reference.json").read_text())


@pytest.fixture(scope="module")
def loaded(pretrained):
    return ql.load_peft(ADAPTER, pretrained[0], minilm.peft_name)


@eqx.filter_jit
def _embed(model, ids, mask):
    return quax.quaxify(lambda m: jax.vmap(m.embed)(ids, mask))(model)


def _tensors(directory):
    return read_safetensors(pathlib.Path(directory) / "adapter_model.safetensors")[0]


def test_embeddings_match_peft(pretrained, reference, loaded):
    model, tokenizer = pretrained
    ids, mask = tokenizer(reference["sentences"])
    want = np.asarray(reference["embeddings"])
    assert reference["max_abs_change_from_base"] > 0.1  # the adapter matters
    np.testing.assert_allclose(_embed(loaded, ids, mask), want, rtol=0, atol=1e-5)
    # Every bias is trained (`bias="all"`), and matters.
    counts = ql.count_parameters(loaded)
    assert isinstance(loaded.layers[3].attention_norm.bias, ql.Trainable)
    assert isinstance(loaded.layers[3].attention.key_proj.bias, ql.Trainable)
    assert isinstance(loaded.layers[3].attention.query_proj.weight, ql.LoraArray)
    assert loaded.embeddings.word_embeddings.weight.rank == 1
    assert loaded.layers[0].attention.value_proj.weight.alpha == 3
    assert counts.trainable == sum(x.size for x in _tensors(ADAPTER).values())
    frozen_biases = eqx.tree_at(
        lambda m: [layer.output_norm.bias for layer in m.layers],
        loaded,
        [layer.output_norm.bias for layer in model.layers],
    )
    stale = _embed(frozen_biases, ids, mask)
    assert np.max(np.abs(stale - want)) > 1e-3


def test_pattern_pairs_load_the_same(pretrained, loaded):
    assert eqx.tree_equal(ql.load_peft(ADAPTER, pretrained[0], PAIRS), loaded)


def test_save_peft_writes_peft_names(loaded, reference, tmp_path):
    """The names, shapes and values PEFT wrote, and a config PEFT reads the same:
    the script loaded this very output into PEFT and got its embeddings back."""
    ql.save_peft(tmp_path, loaded, minilm.peft_name)
    got, want = _tensors(tmp_path), _tensors(ADAPTER)
    assert set(got) == set(want)
    keys = {k.removeprefix("base_model.model.") for k in got}
    assert "encoder.layer.2.attention.self.query.base_layer.bias" in keys
    assert "embeddings.LayerNorm.bias" in keys
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    peft = json.loads((ADAPTER / "adapter_config.json").read_text())
    for field in ("bias", "use_rslora", "fan_in_fan_out", "use_dora"):
        assert config[field] == peft[field]
    targets = {k.split(".lora_")[0] for k in got if ".lora_" in k}
    assert len(targets) == 6 * 3 + 1
    for name in targets:
        name = name.removeprefix("base_model.model.")
        assert rank(config, name) == rank(peft, name)
        assert _alpha(config, name) == _alpha(peft, name)
    assert reference["quaxlora_saved_keys_equal_peft"]
    assert reference["max_abs_diff_peft_with_quaxlora_saved"] < 1e-6


def test_left_over_modules_listed(pretrained):
    """Pairs that forget the layer norms leave PEFT's biases of them unmatched."""
    pairs = [p for p in PAIRS if "norm" not in p[0]]
    with pytest.raises(
        ValueError,
        match=r"no entry for the PEFT module\(s\) \['embeddings.LayerNorm', "
        r"'encoder.layer.0.attention.output.LayerNorm', .*\] and 3 more",
    ):
        ql.load_peft(ADAPTER, pretrained[0], pairs)
    with pytest.raises(
        ValueError,
        match=r"no PEFT module name to .*'layers.0.attention.query_proj'",
    ):
        ql.save_peft("unused", ql.load_peft(ADAPTER, pretrained[0], PAIRS), PAIRS[1:])


def test_layers_to_transform(pretrained, tmp_path):
    """PEFT's `layers_to_transform` selects layers by the index after
    `layers_pattern`; factors of another layer are an error naming it."""
    tensors = {k: v for k, v in _tensors(ADAPTER).items() if "word_embeddings" not in k}
    config = json.loads((ADAPTER / "adapter_config.json").read_text())

    def write(directory, **fields):
        directory.mkdir()
        write_safetensors(directory / "adapter_model.safetensors", tensors, {})
        text = json.dumps({**config, **fields})
        (directory / "adapter_config.json").write_text(text)
        return directory

    model = pretrained[0]
    for pattern in ["layer", None]:
        ok = write(
            tmp_path / f"ok{pattern}",
            layers_to_transform=list(range(6)),
            layers_pattern=pattern,
        )
        lora = ql.load_peft(ok, model, minilm.peft_name)
        assert isinstance(lora.layers[5].intermediate.weight, ql.LoraArray)
        bad = write(
            tmp_path / f"bad{pattern}",
            layers_to_transform=[0, 1, 3, 4, 5],
            layers_pattern=pattern,
        )
        with pytest.raises(ValueError, match="`encoder.layer.2.* has LoRA factors"):
            ql.load_peft(bad, model, minilm.peft_name)
    # Without a layer index, the word embeddings are not selected at all.
    bad = tmp_path / "emb"
    shutil.copytree(ADAPTER, bad)
    text = json.dumps({**config, "layers_to_transform": list(range(6))})
    (bad / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="`embeddings.word_embeddings` has LoRA"):
        ql.load_peft(bad, model, minilm.peft_name)
