"""PEFT interchange, against files produced by PyTorch + PEFT
(`tests/fixtures/make_peft_fixtures.py`; this test needs neither)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quax

import quaxlora as ql
from quaxlora._safetensors import read_safetensors

from .fixtures.make_peft_fixtures import eqx_base, HERE, MAPPING, ours


@pytest.fixture(scope="module")
def io():
    return read_safetensors(os.path.join(HERE, "io.safetensors"))[0]


@pytest.fixture(scope="module")
def base():
    return eqx_base(read_safetensors(os.path.join(HERE, "base.safetensors"))[0])


def _run(model, io, quaxify=True):
    f = quax.quaxify(model) if quaxify else model
    return np.asarray(jax.vmap(f)(jnp.asarray(io["tokens"]), jnp.asarray(io["image"])))


def test_base_matches_torch(base, io):
    np.testing.assert_allclose(_run(base, io, quaxify=False), io["base"], atol=1e-5)


@pytest.mark.parametrize("name", ["peft_adapter", "peft_rslora"])
def test_load_peft_output(base, io, name):
    model = ql.load_peft(os.path.join(HERE, name), base, MAPPING)
    assert np.max(np.abs(io[name] - io["base"])) > 0.1  # the adapter matters
    np.testing.assert_allclose(_run(model, io), io[name], atol=1e-5)
    # Merged for serving: the same outputs, a plain model.
    np.testing.assert_allclose(_run(ql.merge(model), io, False), io[name], atol=1e-5)


def test_load_peft_config(base):
    model = ql.load_peft(os.path.join(HERE, "peft_adapter"), base, MAPPING)
    # r=4, lora_alpha=8, rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3}
    for name, rank, alpha in [
        ("emb", 4, 8),
        ("conv", 4, 8),
        ("fc1", 4, 3),
        ("fc2", 2, 8),
    ]:
        lora = getattr(model, name).weight
        assert (lora.rank, lora.alpha, lora.rslora) == (rank, alpha, False)
    assert isinstance(model.head.weight, ql.Trainable)
    assert isinstance(model.head.bias, ql.Trainable)
    rs = ql.load_peft(os.path.join(HERE, "peft_rslora"), base, MAPPING)
    assert rs.fc1.weight.rslora and rs.fc1.weight.scaling == 3 / 2
    assert not isinstance(rs.emb.weight, ql.LoraArray)


def test_save_peft_matches_what_peft_loaded(base, io, tmp_path):
    """`ours/` was written by `save_peft` and loaded by PEFT, whose output is
    `io["ours"]`: writing the same model again gives the same files, and our own
    output equals PEFT's."""
    model = ours(base)
    ql.save_peft(tmp_path, model, MAPPING)
    got, meta = read_safetensors(tmp_path / "adapter_model.safetensors")
    want, _ = read_safetensors(os.path.join(HERE, "ours", "adapter_model.safetensors"))
    assert meta == {"format": "pt"}
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with (
        open(tmp_path / "adapter_config.json") as f,
        open(os.path.join(HERE, "ours", "adapter_config.json")) as g,
    ):
        assert json.load(f) == json.load(g)
    np.testing.assert_allclose(_run(model, io), io["ours"], atol=1e-5)
    with open(os.path.join(HERE, "result.json")) as f:
        assert json.load(f)["peft_loaded_ranks"] == {
            "emb": 3,
            "conv": 2,
            "fc1": 4,
            "fc2": 4,
        }


def test_save_peft_keys_and_config(base, tmp_path):
    ql.save_peft(tmp_path, ours(base), MAPPING, base_model_name_or_path="tiny")
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    shapes = {k: v.shape for k, v in tensors.items()}
    assert shapes == {
        "base_model.model.emb.lora_embedding_A": (3, 11),
        "base_model.model.emb.lora_embedding_B": (8, 3),
        "base_model.model.conv.lora_A.weight": (2, 2, 3, 3),
        "base_model.model.conv.lora_B.weight": (8, 2, 1, 1),
        "base_model.model.fc1.lora_A.weight": (4, 8),
        "base_model.model.fc1.lora_B.weight": (16, 4),
        "base_model.model.fc2.lora_A.weight": (4, 16),
        "base_model.model.fc2.lora_B.weight": (8, 4),
        "base_model.model.head.weight": (3, 8),
        "base_model.model.head.bias": (3,),
    }
    with open(tmp_path / "adapter_config.json") as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "tiny"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 6.0, False)
    assert config["rank_pattern"] == {"^conv": 2, "^fc1": 4, "^fc2": 4}
    assert config["alpha_pattern"] == {"^fc1": 2.0}
    assert config["modules_to_save"] == ["head"]
    assert config["target_modules"] == "^(emb|conv|fc1|fc2)$"


def test_roundtrip(base, io, tmp_path):
    model = ours(base)
    ql.save_peft(tmp_path, model, MAPPING)
    loaded = ql.load_peft(tmp_path, base, MAPPING)
    np.testing.assert_allclose(_run(loaded, io), _run(model, io), atol=1e-6)


def test_errors(base, tmp_path):
    src = os.path.join(HERE, "peft_adapter")
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        ql.load_peft(tmp_path, base, MAPPING)
    with pytest.raises(ValueError, match="`mapping` has no entry for the PEFT module"):
        ql.load_peft(src, base, {k: v for k, v in MAPPING.items() if k != "fc2"})
    with pytest.raises(ValueError, match="PEFT module `fc1` does not fit"):
        ql.load_peft(src, base, {**MAPPING, "fc1": "fc2", "fc2": "fc1"})
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    with open(bad / "adapter_config.json") as f:
        config = json.load(f)
    with open(bad / "adapter_config.json", "w") as f:
        json.dump({**config, "use_dora": True}, f)
    # DoRA is supported (test_peft_dora.py), but then each module needs a magnitude.
    with pytest.raises(ValueError, match="needs `lora_magnitude_vector`"):
        ql.load_peft(bad, base, MAPPING)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="bad adapter_config.json"):
        ql.load_peft(bad, base, MAPPING)
    model = ours(base)
    with pytest.raises(ValueError, match=r"no PEFT module name to .* \['fc1'\]"):
        ql.save_peft(
            tmp_path / "x", model, {k: v for k, v in MAPPING.items() if k != "fc1"}
        )
    with pytest.raises(ValueError, match=r"\['head.bias', 'head.weight'\]"):
        ql.save_peft(
            tmp_path / "x", model, {k: v for k, v in MAPPING.items() if k != "head"}
        )


def test_rslora_roundtrip_keeps_scaling(base, io, tmp_path):
    # An rsLoRA model must be saved with `use_rslora: true`, or PEFT (and
    # `load_peft`) would reload it with the plain `alpha / r` scaling.
    rs = ql.load_peft(os.path.join(HERE, "peft_rslora"), base, MAPPING)
    ql.save_peft(tmp_path, rs, MAPPING)
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["use_rslora"] is True
    loaded = ql.load_peft(tmp_path, base, MAPPING)
    assert loaded.fc1.weight.scaling == rs.fc1.weight.scaling == 3 / 2
    np.testing.assert_allclose(_run(loaded, io), _run(rs, io), atol=1e-6)
