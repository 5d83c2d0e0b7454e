"""LoRA fine-tuning of a small transformer language model on text shipped with Python.

1. Pretrain a character-level GPT (token embeddings, causal attention blocks stacked
   with `eqx.filter_vmap` and run with `lax.scan`, output projection tied to the
   token embedding) on the `pydoc_data` help topics, in plain Equinox.
2. Shift the task: the same kind of text, in CAPITALS. The pretrained model has seen
   few capitals, so its perplexity on it is high.
3. Adapt with LoRA on the attention and MLP projections and on the token embedding
   (so on the tied output projection too): only the adapters are trained.

Run: `python examples/tiny_lm.py` (about three minutes on 2 busy CPU cores).
"""

import argparse
import math
import time
from pydoc_data.topics import topics

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax
from tqdm import tqdm

import quaxlora as ql


F32 = jnp.float32


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, dim: int, heads: int, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(dim, dtype=F32)
        self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1, dtype=F32)
        self.norm2 = eqx.nn.LayerNorm(dim, dtype=F32)
        self.fc1 = eqx.nn.Linear(dim, 4 * dim, key=k2, dtype=F32)
        self.fc2 = eqx.nn.Linear(4 * dim, dim, key=k3, dtype=F32)

    def __call__(self, x, mask):
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h, mask=mask)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(lambda v: self.fc2(jax.nn.gelu(self.fc1(v))))(h)


class GPT(eqx.Module):
    embed: eqx.nn.Embedding
    pos: eqx.nn.Embedding
    blocks: Block  # stacked with filter_vmap: a leading `depth` axis on every array
    norm: eqx.nn.LayerNorm

    def __init__(
        self, vocab: int, length: int, dim: int, depth: int, heads: int, *, key
    ):
        k1, k2, k3 = jr.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1, dtype=F32)
        self.pos = eqx.nn.Embedding(length, dim, key=k2, dtype=F32)
        self.blocks = eqx.filter_vmap(lambda k: Block(dim, heads, key=k))(
            jr.split(k3, depth)
        )
        self.norm = eqx.nn.LayerNorm(dim, dtype=F32)

    def __call__(self, tokens):
        n = tokens.shape[0]
        x = jax.vmap(self.embed)(tokens) + jax.vmap(self.pos)(jnp.arange(n))
        mask = jnp.tril(jnp.ones((n, n), bool))
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        x, _ = lax.scan(
            lambda x, b: (eqx.combine(b, static)(x, mask), None), x, dynamic
        )
        # Tied output projection, scaled as in T5 so that logits start near unit size.
        x = jax.vmap(self.norm)(x) * x.shape[-1] ** -0.5
        return x @ self.embed.weight.T


def load_corpus(max_chars: int | None = None) -> tuple[str, str]:
    """The help topics, joined; the last tenth is held out."""
    text = "\n".join(topics[name] for name in sorted(topics))
    text = text[:max_chars] if max_chars else text
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def encode(text: str, vocab: dict[str, int]) -> np.ndarray:
    unk = vocab["\0"]
    return np.array([vocab.get(c, unk) for c in text], np.int32)


def batches(data: np.ndarray, length: int, batch_size: int, key):
    while True:
        key, sub = jr.split(key)
        starts = np.asarray(jr.randint(sub, (batch_size,), 0, len(data) - length - 1))
        idx = starts[:, None] + np.arange(length + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def next_token_loss(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def evaluate(model, data, length, batch_size, key, n_batches=4) -> float:
    """Mean next-character loss (nats) on random windows of `data`."""
    f = eqx.filter_jit(next_token_loss)
    stream = batches(data, length, batch_size, key)
    return float(np.mean([f(model, *next(stream)) for _ in range(n_batches)]))


def train(params, static, loss_fn, data, *, steps, lr, desc, progress):
    opt = optax.adamw(lr, weight_decay=0.0)
    state = opt.init(params)

    @eqx.filter_jit
    def step(params, state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(params, static, xb, yb)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for i in bar:
        params, state, loss = step(params, state, *next(data))
        losses.append(float(loss))
        if i % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def main(
    *,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    length: int = 64,
    batch_size: int = 32,
    rank: int = 8,
    pretrain_steps: int = 400,
    lora_steps: int = 200,
    max_chars: int | None = None,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    train_text, test_text = load_corpus(max_chars)
    chars = sorted(set(train_text) | set(train_text.upper()) | {"\0"})
    vocab = {c: i for i, c in enumerate(chars)}
    train_ids, test_ids = encode(train_text, vocab), encode(test_text, vocab)
    shifted_train = encode(train_text.upper(), vocab)
    shifted_test = encode(test_text.upper(), vocab)
    k_model, k_pre, k_lora, k_data, k_eval = jr.split(jr.key(seed), 5)

    # 1. Pretrain in full on the original text.
    model = GPT(len(vocab), length, dim, depth, heads, key=k_model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    plain_loss = lambda p, s, x, y: next_token_loss(eqx.combine(p, s), x, y)
    params, _ = train(
        params,
        static,
        plain_loss,
        batches(train_ids, length, batch_size, k_pre),
        steps=pretrain_steps,
        lr=3e-3,
        desc="pretrain",
        progress=progress,
    )
    model = eqx.combine(params, static)
    ev = lambda m, data: evaluate(m, data, length, batch_size, k_eval)
    loss_original = ev(model, test_ids)
    loss_before = ev(model, shifted_test)

    # 2. Adapt with LoRA to the capitalised text.
    lora_model = ql.loraify(
        model,
        rank=rank,
        alpha=2 * rank,
        key=k_lora,
        where=(eqx.nn.Linear, "embed"),
    )
    trainable, frozen = ql.partition(lora_model)
    lora_loss = lambda t, f, x, y: next_token_loss(
        quax.quaxify(eqx.combine(t, f)), x, y
    )
    trainable, losses = train(
        trainable,
        frozen,
        lora_loss,
        batches(shifted_train, length, batch_size, k_data),
        steps=lora_steps,
        lr=3e-3,
        desc=f"LoRA r={rank}",
        progress=progress,
    )
    lora_model = eqx.combine(trainable, frozen)
    loss_after = ev(quax.quaxify(lora_model), shifted_test)
    loss_merged = ev(ql.merge(lora_model), shifted_test)
    counts = ql.count_parameters(lora_model)

    say("\n=== quaxlora: LoRA on a character-level GPT, pydoc_data topics ===")
    say(f"vocabulary: {len(vocab)} characters; {len(train_ids):,} training characters")
    for name, value in [
        ("pretrained, original text", loss_original),
        ("CAPITALISED text, before LoRA", loss_before),
        ("CAPITALISED text, after LoRA", loss_after),
        ("merged model (no quax)", loss_merged),
    ]:
        say(f"{name:32s} loss {value:.3f}  perplexity {math.exp(value):7.2f}")
    say(f"{counts}")
    say(f"wall time: {time.perf_counter() - start:.1f} s")
    return dict(
        loss_original=loss_original,
        loss_before=loss_before,
        loss_after=loss_after,
        loss_merged=loss_merged,
        perplexity_before=math.exp(loss_before),
        perplexity_after=math.exp(loss_after),
        losses=losses,
        trainable=counts.trainable,
        total=counts.total,
        vocab=len(vocab),
        model=lora_model,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--max-chars", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    main(
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        length=args.length,
        batch_size=args.batch_size,
        rank=args.rank,
        pretrain_steps=args.pretrain_steps,
        lora_steps=args.lora_steps,
        max_chars=args.max_chars,
        seed=args.seed,
        progress=not args.no_progress,
    )
