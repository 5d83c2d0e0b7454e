import os
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
import quax

import quaxlora as ql

from .helpers import device, normal, np_rng, random_arrays


# Random data drawn by NumPy (tests/helpers.py): an eager `jr.normal` of each new shape
# and dtype would compile its own program.


def _trained(model, key, scale=0.5):
    """`model` with random `b` factors (so the adapters matter) and trained arrays."""
    rng = np_rng(key)

    def f(x):
        if isinstance(x, ql.LoraArray):
            b = normal(rng, x.b.shape, x.b.dtype, scale)
            return eqx.tree_at(lambda l: l.b, x, b)
        if isinstance(x, ql.Trainable):
            noise = scale * rng.standard_normal(x.shape)
            trained = np.asarray(x.array, np.float64) + noise
            return ql.Trainable(device(trained, x.dtype))
        return x

    is_leaf = lambda x: isinstance(x, (ql.LoraArray, ql.Trainable))
    return jtu.tree_map(f, model, is_leaf=is_leaf)


def _mlp(key, dtype=jnp.float32, width=8):
    """`eqx.nn.MLP(4, 3, width, 2)` in `dtype`, its arrays drawn by NumPy."""
    shapes = eqx.filter_eval_shape(eqx.nn.MLP, 4, 3, width, 2, key=key)
    cast = lambda x: (
        jax.ShapeDtypeStruct(x.shape, dtype)
        if isinstance(x, jax.ShapeDtypeStruct)
        else x
    )
    shapes = jtu.tree_map(cast, shapes)
    return random_arrays(shapes, key)


# Each forward pass as one compiled program (cached by the model's structure), not
# its dozens of eager ops.
@eqx.filter_jit
def _run(model, x):
    return quax.quaxify(model)(x)


@eqx.filter_jit
def _call(model, x):  # a plain (merged, or base) model
    return model(x)


class Net(eqx.Module):
    """Linear, conv and embedding targets, and a `filter_vmap` layer stack."""

    emb: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    stack: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key, dtype=jnp.float32):
        k = jr.split(key, 4)
        self.emb = eqx.nn.Embedding(7, 4, key=k[0], dtype=dtype)
        self.conv = eqx.nn.Conv1d(4, 4, 3, padding=1, key=k[1], dtype=dtype)
        self.stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k, dtype=dtype))(
            jr.split(k[2], 2)
        )
        self.head = eqx.nn.Linear(4, 2, key=k[3], dtype=dtype)

    @classmethod
    def random(cls, key, dtype=jnp.float32):
        """A `Net` with its arrays drawn by NumPy (no compilation)."""
        return random_arrays(eqx.filter_eval_shape(cls, key, dtype), key)

    def __call__(self, tokens):
        h = jax.vmap(self.emb)(tokens).T  # (channels, length)
        h = jnp.tanh(self.conv(h)).mean(1)
        for i in range(2):
            layer = jtu.tree_map(lambda x: x[i], self.stack)
            h = jnp.tanh(layer(h))
        return self.head(h)


TARGETS = [eqx.nn.Embedding, eqx.nn.Conv, "stack", "head"]
TOKENS = jnp.array([1, 5, 0, 6, 3])


def test_adapters_hold_no_frozen_weight(getkey):
    model = _trained(ql.loraify(_mlp(getkey()), rank=2, key=getkey()), getkey())
    ad = ql.partition(model)[0]
    for layer, full in zip(ad.layers, model.layers):
        assert layer.weight.weight is None
        assert layer.bias is None
        assert layer.weight.a is full.weight.a and layer.weight.b is full.weight.b


def test_with_adapters_rebuilds(getkey):
    base = Net.random(getkey())
    model = _trained(
        ql.loraify(
            base, rank=2, key=getkey(), where=TARGETS[:3], modules_to_save="head"
        ),
        getkey(),
    )
    rebuilt = ql.with_adapters(base, ql.partition(model)[0])
    assert eqx.tree_equal(rebuilt, model)
    np.testing.assert_array_equal(_run(rebuilt, TOKENS), _run(model, TOKENS))


def test_switch_and_disable(getkey, tmp_path):
    base = _mlp(getkey())
    x = jnp.linspace(-1, 1, 4, dtype=jnp.float32)
    model_a = _trained(ql.loraify(base, rank=2, key=getkey()), getkey())
    model_b = _trained(
        ql.loraify(base, rank=3, key=getkey(), where="layers.1"), getkey()
    )
    ql.save_adapters(tmp_path / "a.safetensors", model_a)
    ql.save_adapters(tmp_path / "b.safetensors", model_b)
    ya, yb, y0 = _run(model_a, x), _run(model_b, x), _call(base, x)
    assert not np.allclose(ya, yb) and not np.allclose(ya, y0)
    # Two files onto one base.
    on_a = ql.load_adapters(tmp_path / "a.safetensors", base)
    on_b = ql.load_adapters(tmp_path / "b.safetensors", base)
    np.testing.assert_array_equal(_run(on_a, x), ya)
    np.testing.assert_array_equal(_run(on_b, x), yb)
    # Switching in memory: B's targets are a subset, A's other adapters are dropped.
    switched = ql.with_adapters(on_a, ql.partition(on_b)[0])
    assert not isinstance(switched.layers[0].weight, ql.LoraArray)
    np.testing.assert_array_equal(_run(switched, x), yb)
    np.testing.assert_array_equal(_run(ql.with_adapters(switched, on_a), x), ya)
    # Disabled: exactly the base model.
    np.testing.assert_array_equal(_run(ql.unloraify(switched), x), y0)
    assert eqx.tree_equal(ql.unloraify(on_a), base)


def test_with_adapters_errors(getkey):
    base = _mlp(getkey())
    model = ql.loraify(base, rank=2, key=getkey())
    with pytest.raises(ValueError, match="`layers.0.weight`, which `model` does not"):
        ql.with_adapters({"mlp": base}, ql.partition(model)[0])
    other = _mlp(getkey(), width=9)
    with pytest.raises(ValueError, match="`adapters` at `layers.0.weight` do not fit"):
        ql.with_adapters(other, ql.partition(model)[0])
    saved = ql.loraify(base, rank=2, key=getkey(), modules_to_save="layers.2")
    with pytest.raises(ValueError, match="trained array at `layers.2.bias`"):
        ql.with_adapters(saved, ql.partition(model)[0])
    wide = eqx.tree_at(lambda m: m.layers[2].weight, base, jnp.zeros((3, 9)))
    with pytest.raises(ValueError, match="`adapters` at `layers.2.weight`: array"):
        ql.with_adapters(wide, ql.partition(saved)[0])


def _dense_delta(lora):
    return np.asarray(lora.delta(), np.float64)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -0.3], [1.0, 0.0]])
def test_combine_adapters(getkey, weights):
    base = Net.random(getkey())
    m1 = _trained(ql.loraify(base, rank=2, key=getkey(), where=TARGETS), getkey())
    m2 = _trained(
        ql.loraify(base, rank=3, alpha=6.0, rslora=True, key=getkey(), where=TARGETS),
        getkey(),
    )
    both = ql.combine_adapters([m1, ql.partition(m2)[0]], weights)
    for name in ("emb", "conv", "stack", "head"):
        l1, l2, lc = (getattr(m, name).weight for m in (m1, m2, both))
        assert lc.rank == 5 and lc.scaling == 1.0
        want = weights[0] * _dense_delta(l1) + weights[1] * _dense_delta(l2)
        np.testing.assert_allclose(_dense_delta(lc), want, rtol=1e-5, atol=1e-6)
        assert lc.weight is l1.weight
    want = ql.merge(both)
    np.testing.assert_allclose(
        _run(both, TOKENS), _call(want, TOKENS), rtol=1e-5, atol=1e-6
    )
    if weights == [1.0, 0.0]:
        np.testing.assert_allclose(
            _run(both, TOKENS), _run(m1, TOKENS), rtol=1e-5, atol=1e-6
        )


def test_combine_trainable(getkey):
    base = _mlp(getkey())
    ms = [
        _trained(ql.loraify(base, rank=1, key=getkey(), modules_to_save="layers.2"), k)
        for k in jr.split(getkey(), 2)
    ]
    both = ql.combine_adapters(ms, [0.25, 0.75])
    want = 0.25 * ms[0].layers[2].weight.array + 0.75 * ms[1].layers[2].weight.array
    np.testing.assert_allclose(both.layers[2].weight.array, want, rtol=1e-6)


def test_combine_errors(getkey):
    base = _mlp(getkey())
    m1 = ql.loraify(base, rank=2, key=getkey())
    m2 = ql.loraify(base, rank=2, key=getkey(), where="layers.1")
    with pytest.raises(ValueError, match="different adapters: `layers.0.weight`"):
        ql.combine_adapters([m1, m2])
    with pytest.raises(ValueError, match="`weights` has 1 entries for 2 `models`"):
        ql.combine_adapters([m1, m1], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        ql.combine_adapters([])
    m3 = ql.loraify(base, rank=2, key=getkey(), dtype=jnp.float16)
    with pytest.raises(ValueError, match="`models` differ at `layers.0.weight`"):
        ql.combine_adapters([m1, m3])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_all_target_kinds(getkey, dtype):
    base = Net.random(getkey(), dtype)
    model = _trained(ql.loraify(base, rank=2, key=getkey(), where=TARGETS), getkey())
    merged = ql.merge(model)
    assert not any(isinstance(x, quax.Value) for x in jtu.tree_leaves(merged))
    for x, y in zip(jtu.tree_leaves(merged), jtu.tree_leaves(ql.unloraify(model))):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(atol=5e-2)
    np.testing.assert_allclose(
        np.asarray(_call(merged, TOKENS), np.float32),
        np.asarray(_run(model, TOKENS), np.float32),
        **tol,
    )


@pytest.mark.parametrize(
    "dtype",
    [jnp.float32, jnp.bfloat16, pytest.param(jnp.float64, marks=pytest.mark.x64)],
)
@pytest.mark.parametrize("scale", [0.5, 30.0])
def test_unmerge_error_bound(getkey, dtype, scale):
    base = Net.random(getkey(), dtype)
    model = _trained(
        ql.loraify(base, rank=2, key=getkey(), where=TARGETS), getkey(), scale
    )
    merged = ql.merge(model)
    for adapters in (model, ql.partition(model)[0]):
        recovered = ql.unmerge(merged, adapters)
        u = float(jnp.finfo(dtype).eps) / 2  # unit roundoff
        for w, m, r in zip(
            jtu.tree_leaves(base), jtu.tree_leaves(merged), jtu.tree_leaves(recovered)
        ):
            assert r.dtype == w.dtype and r.shape == w.shape
            w, m, r = (np.asarray(v, np.float64) for v in (w, m, r))
            bound = u * (np.abs(w) + np.abs(m)) * (1 + 4 * u)
            assert np.all(np.abs(r - w) <= bound)


def test_unmerge_errors(getkey):
    model = ql.loraify(_mlp(getkey()), rank=2, key=getkey())
    other = ql.merge(ql.loraify(_mlp(getkey(), width=9), rank=2, key=getkey()))
    with pytest.raises(ValueError, match="no weight of the adapter's shape at `layers"):
        ql.unmerge(other, model)


def test_guide_runs(tmp_path, monkeypatch):
    """The code blocks of `docs/adapters.md`, in order, in one namespace."""
    page = os.path.join(os.path.dirname(__file__), "..", "docs", "adapters.md")
    with open(page) as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)  # the guide writes its files in the working folder
    namespace = {"__name__": "docs_adapters"}
    for code in blocks:
        exec(compile(code, page, "exec"), namespace)
