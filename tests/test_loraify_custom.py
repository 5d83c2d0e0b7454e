"""`loraify` on layers a model defines itself, written the way third-party libraries
write them: a `Linear` with an `(in, out)` weight, a convolution that calls
`lax.conv_general_dilated` itself (as pdequinox's `PhysicsConv`), bare arrays used
through `jnp.einsum`."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose, nonzero_lora


# Reference comparisons: float64 at the highest matmul precision, so the
# tolerances see a wrong rule and not rounding (see tests/conftest.py).
pytestmark = pytest.mark.x64


TOL = dict(rtol=1e-10, atol=1e-10)


class FlowLinear(eqx.Module):
    """A flow library's own `Linear`: weight `(in, out)`, used as `x @ weight`."""

    weight: jax.Array
    bias: jax.Array

    def __init__(self, n_in, n_out, key):
        self.weight = jr.normal(key, (n_in, n_out), jnp.float64) / n_in**0.5
        self.bias = jnp.zeros(n_out, jnp.float64)

    def __call__(self, x):
        return x @ self.weight + self.bias


class PhysicsConv(eqx.Module):
    """A PDE library's convolution: weight `(out, in, *kernel)`, periodic padding
    done by hand, then `lax.conv_general_dilated`."""

    weight: jax.Array

    def __init__(self, c_in, c_out, k, key):
        self.weight = jr.normal(key, (c_out, c_in, k, k), jnp.float64) / (c_in * k * k)

    def __call__(self, x):
        k = self.weight.shape[-1]
        x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), mode="wrap")
        return lax.conv_general_dilated(x[None], self.weight, (1, 1), "VALID")[0]


class Mixer(eqx.Module):
    """Bare arrays: a `(out, in)` matrix and a stack `(layers, out, in)` of them,
    used through `jnp.einsum`, and a vector that is not a weight."""

    proj: jax.Array
    stack: jax.Array
    gain: jax.Array

    def __init__(self, n, key):
        k1, k2 = jr.split(key)
        self.proj = jr.normal(k1, (n, n), jnp.float64) / n**0.5
        self.stack = jr.normal(k2, (2, n, n), jnp.float64) / n**0.5
        self.gain = jnp.ones(n, jnp.float64)

    def __call__(self, x):
        x = jnp.tanh(jnp.einsum("oi,i->o", self.proj, x))
        for layer in range(self.stack.shape[0]):
            x = jnp.tanh(jnp.einsum("loi,i->lo", self.stack, x)[layer])
        return x * self.gain


class Net(eqx.Module):
    conv: PhysicsConv
    flow: FlowLinear
    mixer: Mixer
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jr.split(key, 4)
        self.conv = PhysicsConv(2, 3, 3, k[0])
        self.flow = FlowLinear(3 * 5 * 5, 6, k[1])
        self.mixer = Mixer(6, k[2])
        self.head = eqx.nn.Linear(6, 2, key=k[3], dtype=jnp.float64)

    def __call__(self, x):
        x = jnp.tanh(self.conv(x)).reshape(-1)
        return self.head(self.mixer(jnp.tanh(self.flow(x))))


WHERE = [PhysicsConv, "flow", "mixer.proj", "mixer.stack", eqx.nn.Linear]
LAYOUT = dict(
    fan_in_fan_out={"flow": True}, out_axis={"mixer.proj": 0, "mixer.stack": 1}
)


def _trained(model, key):
    keys = iter(jr.split(key, 100))
    return jax.tree_util.tree_map(
        lambda x: nonzero_lora(x, next(keys)) if isinstance(x, ql.LoraArray) else x,
        model,
        is_leaf=lambda x: isinstance(x, ql.LoraArray),
    )


@pytest.fixture
def nets(getkey):
    base = Net(getkey())
    lora = ql.loraify(base, rank=2, alpha=3.0, key=getkey(), where=WHERE, **LAYOUT)
    return base, lora


def test_targets_and_layouts(nets):
    base, lora = nets
    conv, flow = lora.conv.weight, lora.flow.weight
    proj, stack = lora.mixer.proj, lora.mixer.stack
    assert all(
        isinstance(x, ql.LoraArray) for x in (conv, flow, proj, stack, lora.head.weight)
    )
    assert not isinstance(lora.mixer.gain, ql.LoraArray)
    assert conv.a.shape == (2, 2, 3, 3) and conv.b.shape == (3, 2)
    assert stack.batch_ndim == 1 and stack.a.shape == (2, 2, 6)
    # fan_in_fan_out: the factors of the `(out, in)` view, as PEFT's, transposed —
    # so the random factor is the one over the inputs, the zero one over the outputs.
    assert flow.b.shape == (75, 2) and flow.a.shape == (2, 6)
    assert jnp.all(flow.a == 0) and jnp.all(flow.b != 0)
    assert jnp.all(flow.b <= 75**-0.5)
    # The base weights are the very arrays of the base model.
    assert flow.weight is base.flow.weight and stack.weight is base.mixer.stack


def test_values_and_gradients(nets, getkey):
    base, lora = nets
    x = jr.normal(getkey(), (2, 5, 5), jnp.float64)
    run = eqx.filter_jit(lambda m, x: quax.quaxify(m)(x))
    base_y = eqx.filter_jit(lambda m, x: m(x))(base, x)
    assert_tree_allclose(run(lora, x), base_y, **TOL)  # b = 0: unchanged
    lora = _trained(lora, getkey())
    merged_y = eqx.filter_jit(lambda m, x: ql.merge(m)(x))(lora, x)
    assert_tree_allclose(run(lora, x), merged_y, **TOL)
    assert not jnp.allclose(merged_y, base_y)
    trainable, frozen = ql.partition(lora)

    def loss(t, x):
        return jnp.sum(jnp.sin(quax.quaxify(eqx.combine(t, frozen))(x)) ** 2)

    def loss_ref(t, x):
        return jnp.sum(jnp.sin(ql.merge(eqx.combine(t, frozen))(x)) ** 2)

    g = eqx.filter_jit(eqx.filter_grad(loss))(trainable, x)
    g_ref = eqx.filter_jit(eqx.filter_grad(loss_ref))(trainable, x)
    assert_tree_allclose(g, g_ref, **TOL)
    assert jnp.any(g.flow.weight.a != 0) and jnp.any(g.mixer.stack.b != 0)


def test_merge_save_load_partition(nets, getkey, tmp_path):
    base, lora = nets
    lora = _trained(lora, getkey())
    x = jr.normal(getkey(), (2, 5, 5), jnp.float64)
    trainable, _ = ql.partition(lora)
    leaves = jax.tree_util.tree_leaves(trainable)
    assert len(leaves) == 2 * 5  # a and b of each target, nothing else
    assert ql.count_parameters(lora).trainable == sum(x.size for x in leaves)
    path = tmp_path / "adapters.safetensors"
    ql.save_adapters(path, lora)
    for into in (base, nets[1]):
        loaded = ql.load_adapters(path, into)
        assert_tree_allclose(ql.merge(loaded)(x), ql.merge(lora)(x), **TOL)
    assert eqx.tree_equal(ql.unloraify(lora), base)


def test_errors(getkey):
    net = Net(getkey())
    with pytest.raises(ValueError, match="cannot infer the layout of the array `mixer"):
        ql.loraify(net, rank=2, key=getkey(), where="mixer.proj")
    with pytest.raises(ValueError, match="`mixer.stack`: pass `out_axis` or"):
        ql.loraify(
            net,
            rank=2,
            key=getkey(),
            where="stack",
            out_axis=1,
            fan_in_fan_out=True,
        )
    with pytest.raises(ValueError, match="`out_axis=2` does not leave an input axis"):
        ql.loraify(net, rank=2, key=getkey(), where="stack", out_axis=2)

    class Scale(eqx.Module):
        weight: jax.Array

        def __call__(self, x):
            return self.weight * x

    with pytest.raises(ValueError, match=r"`scale` has a `weight` of shape \(4,\)"):
        ql.loraify({"scale": Scale(jnp.ones(4))}, rank=2, key=getkey(), where=Scale)
    # Bare arrays are named by path only, never by a regular expression.
    with pytest.raises(ValueError, match="found no layer to adapt"):
        ql.loraify(net.mixer, rank=2, key=getkey(), where=r"pro.*", out_axis=0)
