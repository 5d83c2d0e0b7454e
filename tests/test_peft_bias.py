"""PEFT's trained biases (`bias="lora_only"` / `"all"`) both ways, against files made
by PyTorch + PEFT (`tests/fixtures/make_peft_fixtures.py`), and the config fields
quaxlora refuses."""

import json
import os
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quax

import quaxlora as ql
from quaxlora._safetensors import read_safetensors, write_safetensors

from .fixtures.make_peft_fixtures import eqx_base, HERE, MAPPING, ours_bias


@pytest.fixture(scope="module")
def io():
    return read_safetensors(os.path.join(HERE, "io_bias.safetensors"))[0]


@pytest.fixture(scope="module")
def base():
    return eqx_base(read_safetensors(os.path.join(HERE, "base.safetensors"))[0])


def _run(model, io):
    f = jax.vmap(quax.quaxify(model))
    return np.asarray(f(jnp.asarray(io["tokens"]), jnp.asarray(io["image"])))


def _tensors(directory):
    return read_safetensors(os.path.join(directory, "adapter_model.safetensors"))[0]


def _config(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return json.load(f)


def _biases(model, names):
    return tuple(getattr(model, n).bias for n in names)


def test_load_lora_only(base, io):
    src = os.path.join(HERE, "peft_bias_lora_only")
    model = ql.load_peft(src, base, MAPPING)
    want = io["peft_bias_lora_only"]
    np.testing.assert_allclose(_run(model, io), want, atol=1e-5)
    names = ("conv", "fc1", "fc2")
    for name, bias in zip(names, _biases(model, names)):
        assert isinstance(bias, ql.Trainable)
        saved = _tensors(src)[f"base_model.model.{name}.base_layer.bias"]
        np.testing.assert_array_equal(bias.array.reshape(-1), saved)
    # The trained biases matter: with the base's, the output is far off.
    stale = eqx.tree_at(lambda m: _biases(m, names), model, _biases(base, names))
    assert np.max(np.abs(_run(stale, io) - want)) > 0.1
    assert not isinstance(model.head.bias, ql.Trainable)
    assert not isinstance(model.emb.weight, ql.LoraArray)


def test_load_all(base, io):
    """`bias="all"`: every bias is trained (`conv` and `fc2` are not adapted); with
    `modules_to_save`, PEFT also writes `head.original_module.bias` (the frozen
    original, skipped) and `head.modules_to_save.bias` (the trained copy again)."""
    src = os.path.join(HERE, "peft_bias_all")
    model = ql.load_peft(src, base, MAPPING)
    want = io["peft_bias_all"]
    np.testing.assert_allclose(_run(model, io), want, atol=1e-5)
    names = ("conv", "fc1", "fc2", "head")
    assert all(isinstance(b, ql.Trainable) for b in _biases(model, names))
    assert isinstance(model.head.weight, ql.Trainable)
    assert isinstance(model.fc1.weight, ql.LoraArray)
    assert not isinstance(model.conv.weight, (ql.LoraArray, ql.Trainable))
    fixed = names[:3]
    stale = eqx.tree_at(lambda m: _biases(m, fixed), model, _biases(base, fixed))
    assert np.max(np.abs(_run(stale, io) - want)) > 0.1


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_load_marks_what_peft_trains(base, bias, tmp_path):
    """A bias the config trains but the file lacks is still `Trainable`, as
    `loraify(..., bias=...)` would mark it."""
    src = os.path.join(HERE, "peft_adapter")  # bias="none"
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    config = _config(src)
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump({**config, "bias": bias}, f)
    model = ql.load_peft(tmp_path, base, MAPPING)
    assert isinstance(model.fc1.bias, ql.Trainable)  # adapted
    np.testing.assert_array_equal(model.fc1.bias.array, base.fc1.bias)
    assert isinstance(model.head.bias, ql.Trainable)  # modules_to_save
    plain = ql.load_peft(src, base, MAPPING)
    assert not isinstance(plain.fc1.bias, ql.Trainable)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_save_matches_what_peft_loaded(base, io, bias, tmp_path):
    """`ours_bias_*/` were written by `save_peft` and loaded by PEFT, whose outputs
    are in `io`: writing the same model again gives the same files, and quaxlora's
    own output equals PEFT's."""
    name = f"ours_bias_{bias}"
    model = ours_bias(base, bias)
    ql.save_peft(tmp_path, model, MAPPING)
    got, want = _tensors(tmp_path), _tensors(os.path.join(HERE, name))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert _config(tmp_path) == _config(os.path.join(HERE, name))
    assert _config(tmp_path)["bias"] == bias
    keys = {k.removeprefix("base_model.model.") for k in got}
    assert {"conv.base_layer.bias", "fc1.base_layer.bias"} <= keys
    assert ("fc2.bias" in keys) == (bias == "all")
    np.testing.assert_allclose(_run(model, io), io[name], atol=1e-5)
    with open(os.path.join(HERE, "result_bias.json")) as f:
        assert json.load(f)[name]["peft_bias"] == bias


@pytest.mark.parametrize("name", ["peft_bias_lora_only", "peft_bias_all"])
def test_peft_round_trip(base, io, name, tmp_path):
    """PEFT's file, loaded and saved again, gives PEFT's tensors and `bias` back
    (without the duplicates PEFT writes for a `modules_to_save` wrapper)."""
    src = os.path.join(HERE, name)
    model = ql.load_peft(src, base, MAPPING)
    ql.save_peft(tmp_path, model, MAPPING)
    want = {
        k: v
        for k, v in _tensors(src).items()
        if ".original_module." not in k and ".modules_to_save." not in k
    }
    got = _tensors(tmp_path)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert _config(tmp_path)["bias"] == _config(src)["bias"]
    again = ql.load_peft(tmp_path, base, MAPPING)
    np.testing.assert_allclose(_run(again, io), io[name], atol=1e-5)


def _edited(tmp_path, src="peft_adapter", **fields):
    shutil.copytree(os.path.join(HERE, src), tmp_path, dirs_exist_ok=True)
    config = {**_config(os.path.join(HERE, src)), **fields}
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump(config, f)
    return tmp_path


@pytest.mark.parametrize(
    "field, value",
    [
        ("fan_in_fan_out", True),
        ("lora_bias", True),
        ("target_parameters", ["experts.gate_up_proj"]),
        ("layer_replication", [[0, 1]]),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("trainable_token_indices", [1, 2]),
        ("alora_invocation_tokens", [5, 6]),
        ("use_qalora", True),
        ("monteclora_config", {"n_samples": 2}),
        ("use_bdlora", {"target_modules_bd_a": ["fc1"]}),
        ("arrow_config", {"top_k": 2}),
        ("kasa_config", {"svd_rank": 2}),
        ("init_lora_weights", "something_new"),
    ],
)
def test_unsupported_config(base, tmp_path, field, value):
    bad = _edited(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"PEFT's `{field}=.*` is not supported"):
        ql.load_peft(bad, base, MAPPING)


@pytest.mark.parametrize(
    "init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"]
)
def test_base_changing_init(base, tmp_path, init):
    bad = _edited(tmp_path, init_lora_weights=init)
    with pytest.raises(ValueError, match=f"`init_lora_weights='{init}'` changes the"):
        ql.load_peft(bad, base, MAPPING)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_harmless_config(base, tmp_path, init):
    """Initialisations and training-only fields that leave a saved adapter's maths
    alone are accepted."""
    ok = _edited(
        tmp_path,
        init_lora_weights=init,
        lora_dropout=0.1,
        velora_config={"rank": 2},
        layers_to_transform=None,
    )
    model = ql.load_peft(ok, base, MAPPING)
    assert isinstance(model.fc1.weight, ql.LoraArray)


def test_config_errors(base, tmp_path):
    bad = _edited(tmp_path / "a", bias="some")
    with pytest.raises(ValueError, match="PEFT's `bias='some'` must be 'none', 'all'"):
        ql.load_peft(bad, base, MAPPING)
    # r=4 with rank_pattern={"fc2": 2}: say fc2 is rank 3 and the file disagrees.
    config = _config(os.path.join(HERE, "peft_adapter"))
    bad = _edited(tmp_path / "b", rank_pattern={**config["rank_pattern"], "fc2": 3})
    with pytest.raises(
        ValueError, match="`fc2`: its factors have rank 2, but the config's `r`"
    ):
        ql.load_peft(bad, base, MAPPING)
    bad = _edited(tmp_path / "c", r=5)
    with pytest.raises(ValueError, match="rank 4, but the config's .* give 5"):
        ql.load_peft(bad, base, MAPPING)


@pytest.mark.parametrize(
    "fields",
    [
        dict(target_modules=["conv", "fc1", "fc2"]),
        dict(target_modules="fc.|conv"),
        dict(exclude_modules=["emb"]),
        dict(exclude_modules="em."),
        dict(modules_to_save=["head", "emb"]),
    ],
)
def test_unselected_module(base, tmp_path, fields):
    """Factors of a module the config does not select: PEFT would ignore them."""
    bad = _edited(tmp_path, **fields)
    with pytest.raises(
        ValueError, match="PEFT module `emb` has LoRA factors, but the config's"
    ):
        ql.load_peft(bad, base, MAPPING)


def test_base_layer_without_factors(base, tmp_path):
    """`fc2.base_layer.bias` in a file without `fc2`'s factors cannot be PEFT's."""
    src = os.path.join(HERE, "peft_bias_lora_only")
    bad = _edited(tmp_path, src="peft_bias_lora_only")
    tensors = {
        k: v
        for k, v in _tensors(src).items()
        if not k.startswith("base_model.model.fc2.lora_")
    }
    write_safetensors(bad / "adapter_model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(
        ValueError,
        match="`fc2.base_layer.bias`: the file has no LoRA factors for `fc2`",
    ):
        ql.load_peft(bad, base, MAPPING)
