"""The benchmark models and their tasks.

An MLP and a GPT-style transformer (unrolled or scan-stacked), plain Equinox modules
written for single examples (the batch is `jax.vmap`); and the pretrained
all-MiniLM-L6-v2 of `examples/bert/`, with that example's batch, loss and targets.
A `Task` holds a model with one batch, its loss and where LoRA goes.

The GPT applies its `eqx.nn.Linear` and `eqx.nn.LayerNorm` layers to the whole
sequence at once (`linear`, `layer_norm` below), as `examples/bert/minilm.py` does:
`jax.vmap(linear)` over the tokens lowers to `weight @ x` batched over the tokens,
which XLA:CPU transposes back, forward and backward (on this GPT the frozen floor
took 1.26x as long; docs/benchmarks.md has the measurement).
"""

import dataclasses
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import optax


RANK = 16  # the MLP's and the GPT's; the MiniLM task uses its example's rank, 8


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of the benchmark models and how many repetitions to time."""

    mlp_width: int = 1024
    mlp_depth: int = 8
    mlp_batch: int = 512
    d_model: int = 512
    heads: int = 8
    blocks: int = 6
    seq: int = 128
    batch: int = 8
    vocab: int = 2048
    minilm_pairs: int = 16  # sequences: two per pair
    minilm_seq: int = 64
    minilm_layers: int | None = None  # all six
    scan_depths: tuple = (6, 24)
    extras: tuple = ("mlp", "gpt", "minilm")  # the models with QLoRA, quax's example
    reps: int = 15
    trace_reps: int = 15  # the first `compile_reps` of them also compile
    compile_reps: int = 3
    # Clear JAX's caches before each timed build, so every build traces from scratch
    # (off in `--quick`, the test suite's smoke run: clearing would make the rest of
    # that test process recompile everything it had compiled).
    fresh_builds: bool = True


QUICK = Config(
    mlp_width=128,
    mlp_depth=3,
    mlp_batch=64,
    d_model=64,
    heads=2,
    blocks=1,
    seq=16,
    batch=2,
    vocab=128,
    minilm_pairs=2,
    minilm_seq=16,
    minilm_layers=1,
    scan_depths=(),
    extras=("mlp",),
    reps=1,
    trace_reps=1,
    compile_reps=1,
    fresh_builds=False,
)


class MLP(eqx.Module):
    layers: list

    def __init__(self, width, depth, *, key):
        keys = jr.split(key, depth)
        self.layers = [eqx.nn.Linear(width, width, key=k) for k in keys]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def linear(layer: eqx.nn.Linear, x):
    """`jax.vmap(layer)(x)` as one product over the sequence: `x @ weight.T + bias`.
    Written with `lax.dot_general` against the weight, so a `LoraArray` weight
    dispatches to its factored product under `quax.quaxify`."""
    y = lax.dot_general(x, layer.weight, (((x.ndim - 1,), (1,)), ((), ())))
    return y if layer.bias is None else y + layer.bias


def layer_norm(norm: eqx.nn.LayerNorm, x):
    """`jax.vmap(norm)(x)` over the last axis, with the scale folded into the
    normaliser as in `examples/bert/minilm.py` (which says why)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.maximum(0.0, jnp.var(x, axis=-1, keepdims=True))
    scale = lax.rsqrt(variance + norm.eps) * norm.weight
    return (x - mean) * scale + norm.bias


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
        h = layer_norm(self.ln1, x)
        q, k, v = (
            linear(f, h).reshape(seq, self.heads, dh) for f in (self.q, self.k, self.v)
        )
        logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(dh)
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        attn = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        z = jnp.einsum("hqk,khd->qhd", attn, v).reshape(seq, d)
        x = x + linear(self.o, z)
        h = layer_norm(self.ln2, x)
        return x + linear(self.fc2, jax.nn.gelu(linear(self.fc1, h)))


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
        return linear(self.head, layer_norm(self.ln, x))


class Task(NamedTuple):
    """A benchmark: a model, one batch, its loss, and where LoRA goes.

    `loss(model, *batch)` is a scalar, `predict(model, *batch)` the inference (which
    ignores the targets). The last four fields feed the analytic FLOP count
    (`benchmarks/flops.py`).
    """

    name: str
    model: eqx.Module
    batch: tuple
    loss: Callable[..., Any]
    predict: Callable[..., Any]
    rank: int
    lora: dict  # keyword arguments of `quaxlora.loraify`: `where=` or `exclude=`
    tokens: int  # rows each linear layer sees
    # how many leading linear layers need no input gradient, in full FT / under LoRA
    no_dx_full: int
    no_dx_lora: int
    attention: int = 0  # FLOPs of attention's two batched products, per step


def mlp_task(cfg, key) -> Task:
    km, kx, ky = jr.split(key, 3)
    model = MLP(cfg.mlp_width, cfg.mlp_depth, key=km)
    x = jr.normal(kx, (cfg.mlp_batch, cfg.mlp_width))
    y = jr.normal(ky, (cfg.mlp_batch, cfg.mlp_width))

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    predict = lambda model, x, y: jax.vmap(model)(x)
    return Task("mlp", model, (x, y), loss, predict, RANK, {}, cfg.mlp_batch, 1, 1)


def _attention_flops(batch, seq, d, depth):
    # QKᵀ and AV: 4·s²·d per sequence and block forward, twice that backward.
    return 12 * batch * seq**2 * d * depth


def gpt_task(cfg, key, *, blocks=None, scan=False) -> Task:
    km, kt = jr.split(key)
    depth = cfg.blocks if blocks is None else blocks
    model = GPT(cfg.vocab, cfg.d_model, cfg.heads, depth, scan=scan, key=km)
    tokens = jr.randint(kt, (cfg.batch, cfg.seq + 1), 0, cfg.vocab)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    attention = _attention_flops(cfg.batch, cfg.seq, cfg.d_model, depth)
    predict = lambda model, x, y: jax.vmap(model)(x)
    # Block 0's q, k, v read the frozen embedding: no input gradient under LoRA.
    lora = dict(exclude="head")
    return Task(
        "gpt", model, (x, y), loss, predict, RANK, lora, x.size, 0, 3, attention
    )


def bert_example():
    """`examples/bert/finetune.py` as a module (it puts its folder on the path)."""
    folder = pathlib.Path(__file__).resolve().parent.parent / "examples" / "bert"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import finetune

    return finetune


def minilm_batch(cfg):
    """The first batch of `examples/bert/finetune.py`: `minilm_pairs` pairs of
    paragraphs of the same pydoc topic, tokenised to `minilm_seq` tokens; with the
    model (its first `minilm_layers` layers, all by default) and the example module."""
    finetune = bert_example()
    train, _, _ = finetune.load_task(
        min_words=20, min_paragraphs=4, test_per_topic=3, seed=0
    )
    model, tokenizer = finetune.load_pretrained(max_length=cfg.minilm_seq)
    if cfg.minilm_layers is not None:
        model = eqx.tree_at(
            lambda m: m.layers, model, model.layers[: cfg.minilm_layers]
        )
    [(anchors, positives)] = finetune.pair_batches(
        train, batch_pairs=cfg.minilm_pairs, steps=1, seed=1
    )
    ids, mask = tokenizer(anchors + positives)
    return model, jnp.asarray(ids), jnp.asarray(mask), finetune


def minilm_task(cfg, key) -> Task:
    """all-MiniLM-L6-v2 as `examples/bert/finetune.py` fine-tunes it: its contrastive
    loss, LoRA of rank 8 on its targets (every attention projection and both MLP
    linears), its batch of 32 sequences of 64 tokens."""
    del key
    model, ids, mask, finetune = minilm_batch(cfg)
    embed = lambda model, ids, mask: jax.vmap(model.embed)(ids, mask)

    def loss(model, ids, mask):
        params, static = eqx.partition(model, eqx.is_array)
        return finetune.contrastive_loss(embed, params, static, ids, mask, scale=20.0)

    batch, seq = ids.shape
    depth, d = len(model.layers), model.embeddings.word_embeddings.weight.shape[1]
    attention = _attention_flops(batch, seq, d, depth)
    lora = dict(where=finetune.TARGETS)
    return Task(
        "minilm", model, (ids, mask), loss, embed, 8, lora, ids.size, 0, 3, attention
    )
