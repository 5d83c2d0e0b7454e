"""`load_peft` / `save_peft`'s `mapping` as a rename function or `(pattern,
replacement)` pairs, checked against the file or the model."""

import os

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import quax

import quaxlora as ql
from quaxlora._safetensors import read_safetensors

from .fixtures.make_peft_fixtures import eqx_base, HERE, MAPPING, ours


SRC = os.path.join(HERE, "peft_adapter")


@pytest.fixture(scope="module")
def base():
    return eqx_base(read_safetensors(os.path.join(HERE, "base.safetensors"))[0])


def _keys(directory):
    tensors, _ = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.") for k in tensors}


def test_forms_agree(base):
    want = ql.load_peft(SRC, base, MAPPING)
    pairs = [("emb|conv|fc.|head", r"\g<0>")]
    for mapping in [lambda p: p, [(r"(\w+)", r"\1")], pairs]:
        assert eqx.tree_equal(ql.load_peft(SRC, base, mapping), want)


def test_renamed_round_trip(base, tmp_path):
    model = ours(base)
    ql.save_peft(tmp_path, model, lambda p: f"net.{p}")
    assert "net.fc1.lora_A.weight" in _keys(tmp_path)
    assert "net.head.bias" in _keys(tmp_path)
    loaded = ql.load_peft(tmp_path, base, [(r"(.*)", r"net.\1")])
    x = jnp.arange(4), jnp.ones((2, 6, 6), jnp.float32)
    np.testing.assert_allclose(
        quax.quaxify(loaded)(*x), quax.quaxify(model)(*x), rtol=1e-6, atol=1e-6
    )


def test_load_errors(base):
    no_fc2 = lambda p: None if p == "fc2" else p
    with pytest.raises(
        ValueError,
        match=r"no entry for the PEFT module\(s\) \['fc2'\]\. Module paths of `model`",
    ):
        ql.load_peft(SRC, base, no_fc2)
    # `head.weight` and `head.bias` belong to the PEFT module `head`.
    with pytest.raises(ValueError, match=r"PEFT module\(s\) \['emb', 'head'\]"):
        ql.load_peft(SRC, base, [(r"conv|fc\d", r"\g<0>")])
    twice = lambda p: {"head": "fc1"}.get(p, p)
    with pytest.raises(
        ValueError,
        match=r"\['head'\]\. .* several quaxlora modules the same PEFT name: "
        r"`fc1` <- \['fc1', 'head'\]",
    ):
        ql.load_peft(SRC, base, twice)


def test_save_errors(base, tmp_path):
    model = ours(base)
    with pytest.raises(
        ValueError,
        match=r"no PEFT module name to the adapted module\(s\) or trained array\(s\) "
        r"\['fc1', 'head.bias', 'head.weight'\]",
    ):
        ql.save_peft(tmp_path, model, lambda p: None if p in ("fc1", "head") else p)
    with pytest.raises(ValueError, match=r"same PEFT name: `fc` <- \['fc1', 'fc2'\]"):
        ql.save_peft(tmp_path, model, [(r"fc\d", "fc"), (".*", r"\g<0>")])
    assert not os.listdir(tmp_path)  # nothing written


def test_mapping_type_errors(base):
    with pytest.raises(TypeError, match="`mapping` must be a dict"):
        ql.load_peft(SRC, base, 42)
    with pytest.raises(TypeError, match=r"`\(pattern, replacement\)` pairs"):
        ql.load_peft(SRC, base, [("fc1",)])
    with pytest.raises(ValueError, match=r"`mapping`: bad pattern '\('"):
        ql.load_peft(SRC, base, [("(", "x")])
    with pytest.raises(TypeError, match="`mapping` renamed `emb` to 3"):
        ql.load_peft(SRC, base, lambda p: 3)
    with pytest.raises(TypeError, match="must map strings to strings"):
        ql.load_peft(SRC, base, {"fc1": 1})
    with pytest.raises(ValueError, match="names the module `fc1` twice"):
        ql.load_peft(SRC, base, {**MAPPING, "other": "fc1"})
