"""PEFT DoRA interchange (`use_dora=True`), against files produced by PyTorch +
PEFT (`tests/fixtures/make_peft_fixtures.py`, `dora_fixtures`; this test needs
neither)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quax

import quaxlora as ql
from quaxlora._safetensors import read_safetensors

from .fixtures.make_peft_fixtures import eqx_base, HERE, MAPPING, ours_dora


@pytest.fixture(scope="module")
def io():
    return read_safetensors(os.path.join(HERE, "dora_io.safetensors"))[0]


@pytest.fixture(scope="module")
def base():
    return eqx_base(read_safetensors(os.path.join(HERE, "base.safetensors"))[0])


def _run(model, io, quaxify=True):
    f = quax.quaxify(model) if quaxify else model
    return np.asarray(jax.vmap(f)(jnp.asarray(io["tokens"]), jnp.asarray(io["image"])))


def test_load_peft_dora(base, io):
    model = ql.load_peft(os.path.join(HERE, "peft_dora"), base, MAPPING)
    assert np.max(np.abs(io["peft_dora"] - io["base"])) > 0.05  # the adapter matters
    for name, axis in [("emb", 1), ("conv", 0), ("fc1", 0), ("fc2", 0)]:
        lora = getattr(model, name).weight
        assert lora.use_dora and lora.dora_axis == axis
    assert model.emb.weight.magnitude.shape == (8,)  # per embedding feature
    assert model.conv.weight.magnitude.shape == (8,)
    np.testing.assert_allclose(_run(model, io), io["peft_dora"], atol=1e-5)
    # Merged, as PEFT's merge_and_unload: the same outputs, a plain model.
    merged = _run(ql.merge(model), io, False)
    np.testing.assert_allclose(merged, io["peft_dora_merged"], atol=1e-5)


def test_save_peft_dora_matches_what_peft_loaded(base, io, tmp_path):
    """`ours_dora/` was written by `save_peft` and loaded by PEFT, whose output is
    `io["ours_dora"]`: writing it again gives the same tensors, and our own output
    equals PEFT's."""
    model = ours_dora(base)
    ql.save_peft(tmp_path, model, MAPPING)
    got, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    want, _ = read_safetensors(
        os.path.join(HERE, "ours_dora", "adapter_model.safetensors")
    )
    assert set(got) == set(want)
    assert want["base_model.model.conv.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True
    np.testing.assert_allclose(_run(model, io), io["ours_dora"], atol=1e-5)
    # And back.
    again = ql.load_peft(tmp_path, base, MAPPING)
    np.testing.assert_allclose(_run(again, io), io["ours_dora"], atol=1e-5)


def test_save_peft_dora_errors(base, tmp_path):
    model = ours_dora(base)
    mixed = ql.loraify(base, rank=2, key=jax.random.key(0), where=["fc1", "fc2"])
    mixed = eqx_tree_at_fc1(mixed, model.fc1.weight)
    with pytest.raises(ValueError, match="use_dora"):
        ql.save_peft(tmp_path, mixed, MAPPING)


def eqx_tree_at_fc1(model, weight):
    import equinox as eqx

    return eqx.tree_at(lambda m: m.fc1.weight, model, weight)
