"""XLA memory analysis of one training step of a scan-stacked GPT, from abstract
shapes (nothing is allocated, so a Llama-7B-shaped step compiles on a laptop).

    python -m benchmarks.scan_memory            # d 4096, 32 heads, 32 blocks, T 512
    python -m benchmarks.scan_memory --small    # d 512, 8 heads, 4 blocks, T 128

Three steps, each with Adam and its parameters and optimiser state donated: the
frozen floor (every weight frozen, only the embedding trains), LoRA r16 on q, k, v,
o, fc1 and fc2, and full fine-tuning. Prints XLA's argument and temporary bytes.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import quax

import quaxlora as ql

from .models import GPT


TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


def _loss(model, tokens):
    logits = jax.vmap(model)(tokens[:, :-1])
    labels = tokens[:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


def step_memory(model, trainable_spec, tokens, *, quaxified: bool):
    """`(argument bytes, temporary bytes)` of one Adam step on abstract `model`."""
    arrays, static = eqx.partition(model, _is_array)
    trainable, frozen = eqx.partition(arrays, trainable_spec)
    opt = optax.adam(1e-4)

    def step(trainable, opt_state, frozen, tokens):
        def loss(t):
            m = eqx.combine(t, frozen, static)
            return (quax.quaxify(_loss) if quaxified else _loss)(m, tokens)

        grads = jax.grad(loss)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    opt_state = jax.eval_shape(opt.init, trainable)
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
        trainable, opt_state, frozen, tokens
    )
    m = lowered.compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes


def measure(vocab, d, heads, depth, seq, batch=1, rank=16):
    key = jr.key(0)
    make = lambda: GPT(vocab, d, heads, depth, scan=True, key=key)
    base = eqx.filter_eval_shape(make)
    lora = eqx.filter_eval_shape(
        lambda: ql.loraify(make(), rank=rank, key=key, where=TARGETS)
    )
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    floor_spec = eqx.tree_at(
        lambda m: m.embed.weight,
        jax.tree.map(lambda _: False, base),
        True,
    )
    full_spec = jax.tree.map(
        lambda x: _is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact), base
    )
    return {
        "frozen floor": step_memory(base, floor_spec, tokens, quaxified=False),
        "quaxlora LoRA": step_memory(
            lora, ql.trainable_spec(lora), tokens, quaxified=True
        ),
        "full fine-tuning": step_memory(base, full_spec, tokens, quaxified=False),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    shape = (1000, 512, 8, 4, 128) if args.small else (32000, 4096, 32, 32, 512)
    results = measure(*shape)
    gib = 2**30
    print(f"vocab, d, heads, blocks, tokens = {shape}")
    print(f"{'step':<18} {'arguments':>12} {'temporaries':>12}")
    for name, (arg, temp) in results.items():
        print(f"{name:<18} {arg / gib:>10.2f} G {temp / gib:>10.2f} G")
    floor = results["frozen floor"][1]
    print(f"LoRA temporaries / floor: {results['quaxlora LoRA'][1] / floor:.3f}")


if __name__ == "__main__":
    main()
