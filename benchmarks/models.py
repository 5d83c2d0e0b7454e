"""The benchmark models: an MLP and a GPT-style transformer, unrolled or scan-stacked.

Both are plain Equinox modules written for single examples; the batch is `jax.vmap`.
"""

import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr


class MLP(eqx.Module):
    layers: list

    def __init__(self, width, depth, *, key):
        keys = jr.split(key, depth)
        self.layers = [eqx.nn.Linear(width, width, key=k) for k in keys]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    ln2: eqx.nn.LayerNorm
    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear
    o: eqx.nn.Linear
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, d, heads, *, key):
        kq, kk, kv, ko, k1, k2 = jr.split(key, 6)
        self.ln1 = eqx.nn.LayerNorm(d)
        self.ln2 = eqx.nn.LayerNorm(d)
        self.q = eqx.nn.Linear(d, d, key=kq)
        self.k = eqx.nn.Linear(d, d, key=kk)
        self.v = eqx.nn.Linear(d, d, key=kv)
        self.o = eqx.nn.Linear(d, d, key=ko)
        self.fc1 = eqx.nn.Linear(d, 4 * d, key=k1)
        self.fc2 = eqx.nn.Linear(4 * d, d, key=k2)
        self.heads = heads

    def __call__(self, x):
        # x has shape (seq, d)
        seq, d = x.shape
        dh = d // self.heads
        h = jax.vmap(self.ln1)(x)
        q, k, v = (
            jax.vmap(f)(h).reshape(seq, self.heads, dh)
            for f in (self.q, self.k, self.v)
        )
        logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh)
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        attn = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        z = jnp.einsum("hqk,khd->qhd", attn, v).reshape(seq, d)
        x = x + jax.vmap(self.o)(z)
        h = jax.vmap(self.ln2)(x)
        return x + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(h)))


class GPT(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list | Block
    ln: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    scan: bool = eqx.field(static=True)

    def __init__(self, vocab, d, heads, depth, *, scan=False, key):
        ke, kb, kh = jr.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, d, key=ke)
        keys = jr.split(kb, depth)
        if scan:
            self.blocks = eqx.filter_vmap(lambda k: Block(d, heads, key=k))(keys)
        else:
            self.blocks = [Block(d, heads, key=k) for k in keys]
        self.ln = eqx.nn.LayerNorm(d)
        self.head = eqx.nn.Linear(d, vocab, key=kh)
        self.scan = scan

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        if self.scan:
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def body(x, p):
                return eqx.combine(p, static)(x), None

            x, _ = lax.scan(body, x, params)
        else:
            for block in self.blocks:
                x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.ln)(x))
