"""A LoRA adapter over a quantised base (QLoRA-style): rules re-dispatch on the base."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import quax
from jaxtyping import ArrayLike

import quaxlora as ql

from .helpers import assert_tree_allclose, nonzero_lora


class Int8Array(quax.ArrayValue):
    """Symmetric per-row int8 quantisation: `value = q * scale`."""

    q: jax.Array
    scale: jax.Array
    calls: list = eqx.field(static=True)

    @staticmethod
    def quantise(w, calls):
        scale = jnp.max(jnp.abs(w), axis=-1, keepdims=True) / 127
        return Int8Array(jnp.round(w / scale).astype(jnp.int8), scale, calls)

    def aval(self):
        return jax.core.ShapedArray(self.q.shape, self.scale.dtype)

    def materialise(self):
        return self.q.astype(self.scale.dtype) * self.scale


@quax.register(lax.dot_general_p)
def _(x: ArrayLike, w: Int8Array, *, dimension_numbers, **params):
    # Only the (batch, in) x (out, in) -> (batch, out) form is needed here.
    w.calls.append("dot")
    (xc, wc), (xb, wb) = dimension_numbers
    assert wc == (1,) and not xb
    del params
    y = lax.dot_general(x, w.q.astype(x.dtype), dimension_numbers)
    return y * w.scale[:, 0][None]


def test_lora_over_int8_base(getkey):
    calls = []
    w = jr.normal(getkey(), (6, 5), jnp.float32)
    qw = Int8Array.quantise(w, calls)
    lora = nonzero_lora(ql.LoraArray(qw, rank=2, key=getkey()), getkey())
    assert lora.shape == (6, 5) and lora.dtype == jnp.float32
    x = jr.normal(getkey(), (3, 5), jnp.float32)
    matvec = jax.vmap(lambda w, x: w @ x, in_axes=(None, 0))
    out = quax.quaxify(matvec)(lora, x)
    assert calls == ["dot"]  # the base product went to the int8 rule, x first
    ref = x @ (qw.materialise() + lora.delta()).T
    assert_tree_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # merge dequantises.
    np.testing.assert_allclose(lora.merged(), ref_w := qw.materialise() + lora.delta())
    assert ref_w.dtype == jnp.float32

    # Adapters train; the int8 base gets no gradient.
    def loss(a, b):
        l = eqx.tree_at(lambda l: (l.a, l.b), lora, (a, b))
        return jnp.sum(quax.quaxify(matvec)(l, x) ** 2)

    def loss_ref(a, b):
        dense = qw.materialise() + lora.scaling * b @ a
        return jnp.sum((x @ dense.T) ** 2)

    g = jax.grad(loss, argnums=(0, 1))(lora.a, lora.b)
    assert_tree_allclose(
        g, jax.grad(loss_ref, argnums=(0, 1))(lora.a, lora.b), rtol=1e-4, atol=1e-4
    )


def test_merge_dequantises_a_quax_valued_base(getkey):
    # `merge` must add the update to the dequantised base, never to the raw codes.
    calls = []
    lin = eqx.nn.Linear(5, 6, key=getkey())
    qw = Int8Array.quantise(lin.weight, calls)
    lora = nonzero_lora(ql.LoraArray(qw, rank=2, key=getkey()), getkey())
    merged = ql.merge(eqx.tree_at(lambda l: l.weight, lin, lora))
    assert isinstance(merged.weight, jax.Array)
    assert merged.weight.dtype == lin.weight.dtype
    np.testing.assert_allclose(
        merged.weight, qw.materialise() + lora.delta(), rtol=1e-6, atol=1e-6
    )
