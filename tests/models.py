"""Small but realistic Equinox models, for tests that loraify whole architectures.

Each takes one example (no batch axis), as Equinox layers do; vmap for batches.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, PRNGKeyArray


class Mlp(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.fc1 = eqx.nn.Linear(dim, hidden, key=k1)
        self.fc2 = eqx.nn.Linear(hidden, dim, key=k2)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class TransformerBlock(eqx.Module):
    """Pre-norm attention + MLP block over a sequence `(length, dim)`."""

    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: Mlp

    def __init__(self, dim: int, heads: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1)
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim, key=k2)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))


class ViT(eqx.Module):
    """Patch-embedding conv, transformer blocks, mean pooling, linear head."""

    patch: eqx.nn.Conv2d
    pos: Array
    blocks: list[TransformerBlock]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(
        self,
        *,
        image: int = 8,
        channels: int = 3,
        patch: int = 4,
        dim: int = 16,
        depth: int = 2,
        heads: int = 2,
        classes: int = 5,
        key: PRNGKeyArray,
    ):
        keys = jr.split(key, depth + 3)
        self.patch = eqx.nn.Conv2d(channels, dim, patch, stride=patch, key=keys[0])
        self.pos = 0.02 * jr.normal(keys[1], ((image // patch) ** 2, dim))
        self.blocks = [TransformerBlock(dim, heads, key=k) for k in keys[3:]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, classes, key=keys[2])

    def __call__(self, image: Array) -> Array:
        x = self.patch(image)  # (dim, h, w)
        x = x.reshape(x.shape[0], -1).T + self.pos  # (tokens, dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(jnp.mean(x, axis=0)))


class ResBlock(eqx.Module):
    """Inverted-residual block: pointwise, depthwise, grouped, with GroupNorm."""

    expand: eqx.nn.Conv2d
    depthwise: eqx.nn.Conv2d
    grouped: eqx.nn.Conv2d
    norm: eqx.nn.GroupNorm

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        k1, k2, k3 = jr.split(key, 3)
        wide = 2 * channels
        self.expand = eqx.nn.Conv2d(channels, wide, 1, key=k1)
        self.depthwise = eqx.nn.Conv2d(wide, wide, 3, padding=1, groups=wide, key=k2)
        self.grouped = eqx.nn.Conv2d(wide, channels, 3, padding=1, groups=4, key=k3)
        self.norm = eqx.nn.GroupNorm(4, channels)

    def __call__(self, x: Array) -> Array:
        h = jax.nn.relu(self.expand(x))
        h = jax.nn.relu(self.depthwise(h))
        return x + self.norm(self.grouped(h))


class ResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    blocks: list[ResBlock]
    down: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(
        self,
        *,
        channels: int = 3,
        width: int = 8,
        depth: int = 2,
        classes: int = 4,
        key: PRNGKeyArray,
    ):
        keys = jr.split(key, depth + 3)
        self.stem = eqx.nn.Conv2d(channels, width, 3, padding=1, key=keys[0])
        self.blocks = [ResBlock(width, key=k) for k in keys[3:]]
        self.down = eqx.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, key=keys[1])
        self.head = eqx.nn.Linear(2 * width, classes, key=keys[2])

    def __call__(self, image: Array) -> Array:
        x = jax.nn.relu(self.stem(image))
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu(self.down(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


class GPT(eqx.Module):
    """Decoder-only LM: token + position embeddings, causal blocks stacked with
    `eqx.filter_vmap` and run with `lax.scan`, output projection tied to the token
    embedding."""

    embed: eqx.nn.Embedding
    pos: eqx.nn.Embedding
    blocks: TransformerBlock  # stacked: every array has a leading `depth` axis
    norm: eqx.nn.LayerNorm

    def __init__(
        self,
        *,
        vocab: int = 13,
        length: int = 8,
        dim: int = 16,
        depth: int = 3,
        heads: int = 2,
        key: PRNGKeyArray,
    ):
        k1, k2, k3 = jr.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1)
        self.pos = eqx.nn.Embedding(length, dim, key=k2)
        make = lambda k: TransformerBlock(dim, heads, key=k)
        self.blocks = eqx.filter_vmap(make)(jr.split(k3, depth))
        self.norm = eqx.nn.LayerNorm(dim)

    def __call__(self, tokens: Array) -> Array:
        n = tokens.shape[0]
        x = jax.vmap(self.embed)(tokens) + jax.vmap(self.pos)(jnp.arange(n))
        mask = jnp.tril(jnp.ones((n, n), bool))
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)

        def step(x, block):
            return eqx.combine(block, static)(x, mask), None

        x, _ = lax.scan(step, x, dynamic)
        x = jax.vmap(self.norm)(x)
        return x @ self.embed.weight.T  # tied output projection: (length, vocab)
