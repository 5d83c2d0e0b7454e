import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
import quax
import safetensors
import safetensors.numpy

import quaxlora as ql
from quaxlora._io import digest
from quaxlora._safetensors import read_safetensors, write_safetensors


def _trained(model, key, scale=0.3):
    """`model` with every trainable array moved by random noise."""
    trainable, frozen = ql.partition(model)
    leaves, treedef = jtu.tree_flatten(trainable)
    keys = jr.split(key, len(leaves))
    leaves = [x + scale * jr.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return eqx.combine(jtu.tree_unflatten(treedef, leaves), frozen)


def _mlp(key, width=8, dtype=jnp.float32):
    mlp = eqx.nn.MLP(4, 3, width, 2, key=key)
    return jtu.tree_map(lambda x: x.astype(dtype) if eqx.is_array(x) else x, mlp)


def _lora(base, key, **kwargs):
    kwargs.setdefault("rank", 2)
    return _trained(ql.loraify(base, key=key, **kwargs), jr.fold_in(key, 1))


def _assert_same(m1, m2):
    """Same structure, and the same arrays bit for bit."""
    (d1, s1), (d2, s2) = (
        eqx.partition(m1, eqx.is_array),
        eqx.partition(m2, eqx.is_array),
    )
    assert eqx.tree_equal(s1, s2)
    l1, t1 = jtu.tree_flatten(d1)
    l2, t2 = jtu.tree_flatten(d2)
    assert t1 == t2
    for x, y in zip(l1, l2):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_onto_base(getkey, tmp_path):
    base = _mlp(getkey())
    model = _lora(base, getkey(), modules_to_save="layers.2")
    path = tmp_path / "adapters.safetensors"
    ql.save_adapters(path, model)
    loaded = ql.load_adapters(path, base)
    _assert_same(loaded, model)
    x = jnp.arange(4.0, dtype=jnp.float32)
    np.testing.assert_array_equal(quax.quaxify(loaded)(x), quax.quaxify(model)(x))


def test_roundtrip_onto_loraified(getkey, tmp_path):
    base = _mlp(getkey())
    model = _lora(base, getkey())
    other = ql.loraify(base, rank=2, key=getkey())
    ql.save_adapters(tmp_path / "a.safetensors", model)
    _assert_same(ql.load_adapters(tmp_path / "a.safetensors", other), model)


def test_per_target_rank_alpha_rslora(getkey, tmp_path):
    base = _mlp(getkey())
    model = _lora(
        base,
        getkey(),
        rank={"layers.0": 3, ".*": 1},
        alpha={"layers.1": 5.0, ".*": 2.0},
        rslora=True,
    )
    ql.save_adapters(tmp_path / "a.safetensors", model)
    loaded = ql.load_adapters(tmp_path / "a.safetensors", base)
    for i, (rank, alpha) in enumerate([(3, 2.0), (1, 5.0), (1, 2.0)]):
        lora = loaded.layers[i].weight
        assert (lora.rank, lora.alpha, lora.rslora) == (rank, alpha, True)
        assert lora.scaling == alpha / np.sqrt(rank)
    _assert_same(loaded, model)


def test_metadata_and_keys(getkey, tmp_path):
    model = _lora(_mlp(getkey()), getkey(), alpha=4.0, modules_to_save="layers.2")
    path = tmp_path / "a.safetensors"
    ql.save_adapters(path, model)
    tensors, meta = read_safetensors(path)
    assert set(tensors) == {
        "layers.0.weight.a",
        "layers.0.weight.b",
        "layers.1.weight.a",
        "layers.1.weight.b",
        "layers.2.weight",
        "layers.2.bias",
    }
    assert meta["format"] == "quaxlora.adapters"
    assert meta["format_version"] == "1"
    assert meta["quaxlora_version"] == ql.__version__
    targets = json.loads(meta["targets"])
    assert targets["layers.0.weight"] == dict(
        rank=2,
        alpha=4.0,
        rslora=False,
        batch_ndim=0,
        dtype="float32",
        weight_shape=[8, 4],
        weight_dtype="float32",
    )
    assert json.loads(meta["trainable"])["layers.2.bias"] == dict(
        shape=[3], dtype="float32"
    )
    # The reference implementation reads our files, metadata included.
    ref = safetensors.numpy.load_file(path)
    assert set(ref) == set(tensors)
    np.testing.assert_array_equal(ref["layers.1.weight.b"], model.layers[1].weight.b)
    with safetensors.safe_open(path, "np") as f:
        assert f.metadata() == meta


def test_file_is_small(getkey, tmp_path):
    base = eqx.nn.MLP(256, 10, 256, 2, key=getkey())
    model = ql.loraify(base, rank=4, key=getkey())
    ql.save_adapters(tmp_path / "a.safetensors", model)
    full = sum(x.nbytes for x in jtu.tree_leaves(eqx.filter(base, eqx.is_array)))
    size = os.path.getsize(tmp_path / "a.safetensors")
    assert size < 0.05 * full


@pytest.mark.parametrize(
    "dtype",
    [jnp.bfloat16, jnp.float16, pytest.param(jnp.float64, marks=pytest.mark.x64)],
)
def test_dtypes(getkey, tmp_path, dtype):
    base = _mlp(getkey(), dtype=dtype)
    model = _lora(base, getkey(), modules_to_save="layers.2")
    ql.save_adapters(tmp_path / "a.safetensors", model)
    _assert_same(ql.load_adapters(tmp_path / "a.safetensors", base), model)


def test_conv_embedding_and_stacks(getkey, tmp_path):
    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        emb: eqx.nn.Embedding
        stack: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jr.split(key, 3)
            self.conv = eqx.nn.Conv2d(2, 3, 3, key=k1)
            self.emb = eqx.nn.Embedding(7, 5, key=k2)
            self.stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(5, 5, key=k))(
                jr.split(k3, 3)
            )

    base = Net(getkey())
    model = _lora(base, getkey(), where=[eqx.nn.Conv, eqx.nn.Embedding, "stack"])
    assert model.stack.weight.batch_ndim == 1
    ql.save_adapters(tmp_path / "a.safetensors", model)
    _assert_same(ql.load_adapters(tmp_path / "a.safetensors", base), model)


def test_overwrite_and_atomic(getkey, tmp_path, monkeypatch):
    base = _mlp(getkey())
    path = tmp_path / "a.safetensors"
    ql.save_adapters(path, _lora(base, getkey()))
    newer = _lora(base, getkey())
    ql.save_adapters(path, newer)  # overwriting works
    _assert_same(ql.load_adapters(path, base), newer)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        ql.save_adapters(path, _lora(base, getkey()))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary file left


def test_file_permissions(getkey, tmp_path):
    path = tmp_path / "a.safetensors"
    ql.save_adapters(path, _lora(_mlp(getkey()), getkey()))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_no_adapters(getkey, tmp_path):
    with pytest.raises(ValueError, match="`model` has no adapters"):
        ql.save_adapters(tmp_path / "a.safetensors", _mlp(getkey()))


def _saved(tmp_path, model):
    path = tmp_path / "a.safetensors"
    ql.save_adapters(path, model)
    return path


def test_wrong_rank(getkey, tmp_path):
    base = _mlp(getkey())
    path = _saved(tmp_path, _lora(base, getkey()))
    other = ql.loraify(base, rank=3, key=getkey())
    with pytest.raises(ValueError, match=r"at `layers.0.weight`: rank 2 != .* rank 3"):
        ql.load_adapters(path, other)


def test_wrong_shape(getkey, tmp_path):
    path = _saved(tmp_path, _lora(_mlp(getkey()), getkey()))
    with pytest.raises(ValueError, match=r"at `layers.0.weight`: base weight shape"):
        ql.load_adapters(path, _mlp(getkey(), width=9))


def test_wrong_dtype(getkey, tmp_path):
    path = _saved(tmp_path, _lora(_mlp(getkey()), getkey()))
    with pytest.raises(ValueError, match=r"`layers.0.weight`: base weight dtype"):
        ql.load_adapters(path, _mlp(getkey(), dtype=jnp.float16))
    base = _mlp(getkey())
    other = ql.loraify(base, rank=2, key=getkey(), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"`layers.0.weight`: factor dtype"):
        ql.load_adapters(path, other)


def test_wrong_structure(getkey, tmp_path):
    base = _mlp(getkey())
    path = _saved(tmp_path, _lora(base, getkey(), where="layers.1"))
    with pytest.raises(ValueError, match="`layers.1.weight`: the model has no array"):
        ql.load_adapters(path, {"other": base})
    # The model has an adapter the file lacks.
    more = ql.loraify(base, rank=2, key=getkey())
    with pytest.raises(ValueError, match="`layers.0.weight`: the model has an adapter"):
        ql.load_adapters(path, more)
    # The model has a trained array the file lacks.
    saving = ql.loraify(base, rank=2, key=getkey(), where="layers.1", bias="all")
    with pytest.raises(ValueError, match="`layers.0.bias`: the model has a trained"):
        ql.load_adapters(path, saving)
    loaded, mismatched = ql.load_adapters(path, saving, strict=False)
    assert set(mismatched) == {"layers.0.bias", "layers.1.bias", "layers.2.bias"}
    assert loaded.layers[0].bias is saving.layers[0].bias
    # A trained array where the model has an adapter.
    path = _saved(tmp_path, _lora(base, getkey(), modules_to_save="layers.2"))
    with pytest.raises(ValueError, match="`layers.2.weight`: the model has a LoRA"):
        ql.load_adapters(path, ql.loraify(base, rank=2, key=getkey()))


def test_non_strict(getkey, tmp_path):
    base = _mlp(getkey())
    model = _lora(base, getkey(), rank={"layers.0": 3, ".*": 2})
    path = _saved(tmp_path, model)
    other = ql.loraify(base, rank=2, key=getkey())
    loaded, mismatched = ql.load_adapters(path, other, strict=False)
    assert list(mismatched) == ["layers.0.weight"]
    assert "rank 3" in mismatched["layers.0.weight"]
    assert loaded.layers[0].weight is other.layers[0].weight  # left as it was
    _assert_same(loaded.layers[1:], model.layers[1:])
    loaded, mismatched = ql.load_adapters(path, model, strict=False)
    assert mismatched == {}
    _assert_same(loaded, model)


def test_bad_files(getkey, tmp_path):
    base = _mlp(getkey())
    model = _lora(base, getkey())
    with pytest.raises(FileNotFoundError, match="No file at `path`"):
        ql.load_adapters(tmp_path / "missing.safetensors", model)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("hello, I am not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        ql.load_adapters(bad, model)
    data = _saved(tmp_path, model).read_bytes()
    for n in (0, 5, 20, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match="not a valid safetensors file"):
            ql.load_adapters(bad, model)
    bad.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        ql.load_adapters(bad, model)


def _rewrite(path, tensors=None, **changes):
    """Rewrite a file with changes, and a matching checksum."""
    old, meta = read_safetensors(path)
    tensors = old if tensors is None else tensors
    meta = {**meta, **changes}
    write_safetensors(path, tensors, {**meta, "sha256": digest(tensors, meta)})


def test_future_and_foreign_formats(getkey, tmp_path):
    base = _mlp(getkey())
    path = _saved(tmp_path, _lora(base, getkey()))
    _rewrite(path, format_version="3", quaxlora_version="9.0")
    with pytest.raises(ValueError, match="format version 3, newer .* quaxlora 9.0"):
        ql.load_adapters(path, base)
    _rewrite(path, format="pt")
    with pytest.raises(ValueError, match="not a quaxlora adapter file"):
        ql.load_adapters(path, base)
    safetensors.numpy.save_file({"x": np.ones(3)}, path)
    with pytest.raises(ValueError, match="not a quaxlora adapter file"):
        ql.load_adapters(path, base)


def test_inconsistent_metadata(getkey, tmp_path):
    base = _mlp(getkey())
    path = _saved(tmp_path, _lora(base, getkey()))
    tensors, meta = read_safetensors(path)
    del tensors["layers.1.weight.b"]
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match="first difference: `layers.1.weight.b`"):
        ql.load_adapters(path, base)
    targets = json.loads(meta["targets"])
    targets["layers.0.weight"]["rank"] = -1
    _rewrite(path, targets=json.dumps(targets))
    with pytest.raises(ValueError, match="malformed metadata"):
        ql.load_adapters(path, base)
    _rewrite(path, targets="{not json")
    with pytest.raises(ValueError, match="malformed metadata"):
        ql.load_adapters(path, base)


def test_corrupted(getkey, tmp_path):
    base = _mlp(getkey())
    path = _saved(tmp_path, _lora(base, getkey()))
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # one bit of a factor
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted"):
        ql.load_adapters(path, base)
    path = _saved(tmp_path, _lora(base, getkey()))
    tensors, meta = read_safetensors(path)
    targets = json.loads(meta["targets"])
    targets["layers.0.weight"]["alpha"] = 3.0
    write_safetensors(path, tensors, {**meta, "targets": json.dumps(targets)})
    with pytest.raises(ValueError, match="is corrupted"):
        ql.load_adapters(path, base)


def test_input_model_unchanged(getkey, tmp_path):
    base = _mlp(getkey())
    model = ql.loraify(base, rank=3, key=getkey())
    before = jtu.tree_leaves(model)
    path = _saved(tmp_path, _lora(base, getkey()))
    with pytest.raises(ValueError):
        ql.load_adapters(path, model)
    ql.load_adapters(path, model, strict=False)
    after = jtu.tree_leaves(model)
    assert all(x is y for x, y in zip(before, after, strict=True))


def test_resume_under_jit(getkey, tmp_path):
    """A loaded model trains and runs like the saved one (same static structure)."""
    base = _mlp(getkey())
    model = _lora(base, getkey())
    loaded = ql.load_adapters(_saved(tmp_path, model), base)
    assert jtu.tree_structure(loaded) == jtu.tree_structure(model)
    x = jnp.ones((2, 4), jnp.float32)
    f = eqx.filter_jit(lambda m, x: jax.vmap(quax.quaxify(m))(x))
    np.testing.assert_array_equal(f(model, x), f(loaded, x))


class _Scaled(quax.ArrayValue):
    """A stand-in for a quantised weight: `value = q * scale`."""

    q: jax.Array
    scale: jax.Array

    def aval(self):
        return jax.core.ShapedArray(self.q.shape, self.scale.dtype)

    def materialise(self):
        return self.q.astype(self.scale.dtype) * self.scale


def test_quax_valued_base(getkey, tmp_path):
    linear = eqx.nn.Linear(4, 3, key=getkey())
    q = jnp.round(linear.weight * 10).astype(jnp.int8)
    base = eqx.tree_at(lambda l: l.weight, linear, _Scaled(q, jnp.float32(0.1)))
    model = _lora(base, getkey(), where=eqx.nn.Linear)
    path = _saved(tmp_path, model)
    targets = json.loads(read_safetensors(path)[1]["targets"])
    assert targets["weight"]["weight_shape"] == [3, 4]
    loaded = ql.load_adapters(path, base)
    assert loaded.weight.weight is base.weight  # the quantised base, kept as it is
    _assert_same(loaded, model)


def test_non_strict_drops_adapters_the_file_lacks(getkey, tmp_path):
    # strict=False: a layer the file has no adapter for goes back to its base weight
    # (not the model's own, untrained-in-this-file adapter).
    base = _mlp(getkey())
    path = _saved(tmp_path, _lora(base, getkey(), where="layers.1"))
    model = _lora(base, getkey())  # adapters on every layer, trained
    loaded, mismatched = ql.load_adapters(path, model, strict=False)
    assert set(mismatched) == {"layers.0.weight", "layers.2.weight"}
    assert not isinstance(loaded.layers[0].weight, ql.LoraArray)
    assert loaded.layers[0].weight is model.layers[0].weight.weight
    assert isinstance(loaded.layers[1].weight, ql.LoraArray)


def test_trained_array_dtype_must_match(getkey, tmp_path):
    # A bf16 model must not get f32 trained arrays back from an f32 file.
    path = _saved(tmp_path, _lora(_mlp(getkey()), getkey(), bias="all"))
    bf16 = ql.loraify(
        _mlp(getkey(), dtype=jnp.bfloat16), rank=2, key=getkey(), bias="all"
    )
    loaded, mismatched = ql.load_adapters(path, bf16, strict=False)
    assert "layers.0.bias" in mismatched
    assert "float32" in mismatched["layers.0.bias"]
    for layer in loaded.layers:
        assert layer.bias.array.dtype == jnp.bfloat16
