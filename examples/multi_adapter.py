"""Many adapters, one batch: three tasks on scikit-learn's digits, trained together.

1. Pretrain a small MLP on the 8×8 digits (as in `digits.py`).
2. Three new tasks on the same base: digits mirrored and inverted, digits rotated by
   90°, and the original digits relabelled (`y -> (y + 3) % 10`).
3. One LoRA adapter per task, stacked with `quaxlora.stack_adapters` (of ranks 4, 8
   and 8: the first is padded with zeros), and trained in one loop: every step is
   one mixed batch holding examples of all three tasks, each example through its
   own adapter (`quaxlora.select_adapter` under `jax.vmap`), and one gradient that
   updates each adapter from its own examples.
4. Served in one mixed batch: every test example of every task in one call, checked
   against each task's merged model, and timed against running the same examples
   adapter by adapter.

Run: `python examples/multi_adapter.py` (about a minute on 2 CPU cores).
"""

import argparse
import os
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import accuracy, load_data, pretrain, shift  # noqa: E402

import quaxlora as ql  # noqa: E402


def rotate(x: np.ndarray) -> np.ndarray:
    """Rotate each 8×8 image by 90°."""
    return np.rot90(x.reshape(-1, 8, 8), axes=(1, 2)).reshape(-1, 64)


# Each task: (name, input transform, label transform).
TASKS = [
    ("mirrored + inverted", shift, lambda y: y),
    ("rotated 90°", rotate, lambda y: y),
    ("relabelled (y + 3) % 10", lambda x: x, lambda y: (y + 3) % 10),
]


def task_data(x, y):
    """All tasks' examples in one array, with each example's task id."""
    xs = np.concatenate([fx(x) for _, fx, _ in TASKS]).astype(np.float32)
    ys = np.concatenate([fy(y) for _, _, fy in TASKS]).astype(np.int32)
    ids = np.repeat(np.arange(len(TASKS), dtype=np.int32), len(x))
    return xs, ys, ids


def mixed(stacked, xs, ids):
    """One forward of a mixed batch: example `j` through adapter `ids[j]`."""
    run = lambda x, i: quax.quaxify(ql.select_adapter(stacked, i))(x)
    return jax.vmap(run)(xs, ids)


def train(stacked, xs, ys, ids, *, steps, batch_size, lr, key):
    trainable, frozen = ql.partition(stacked)
    opt = optax.adam(lr)
    state = opt.init(trainable)

    def loss_fn(trainable, xb, yb, ib):
        logits = mixed(eqx.combine(trainable, frozen), xb, ib)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @eqx.filter_jit
    def step(trainable, state, xb, yb, ib):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(trainable, xb, yb, ib)
        updates, state = opt.update(grads, state, trainable)
        return eqx.apply_updates(trainable, updates), state, loss

    losses = []
    for k in jr.split(key, steps):
        idx = np.asarray(jr.choice(k, len(xs), (batch_size,), replace=False))
        trainable, state, loss = step(trainable, state, xs[idx], ys[idx], ids[idx])
        losses.append(float(loss))
    return eqx.combine(trainable, frozen), losses


def median_time(fn, reps):
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(
    *,
    width: int = 256,
    depth: int = 2,
    ranks: tuple = (4, 8, 8),
    pretrain_steps: int = 1500,
    steps: int = 1500,
    batch_size: int = 192,
    reps: int = 20,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    x_train, x_test, y_train, y_test = load_data(seed)
    key_model, key_pre, key_lora, key_data = jr.split(jr.key(seed), 4)
    base = eqx.nn.MLP(64, 10, width, depth, activation=jax.nn.gelu, key=key_model)
    base = pretrain(
        base,
        x_train,
        y_train,
        steps=pretrain_steps,
        batch_size=128,
        lr=1e-3,
        key=key_pre,
        progress=progress,
    )

    keys = jr.split(key_lora, len(TASKS))
    adapters = [
        ql.loraify(base, rank=r, alpha=2 * r, key=k) for r, k in zip(ranks, keys)
    ]
    stacked = ql.stack_adapters(adapters)
    xs, ys, ids = task_data(x_train, y_train)
    stacked, losses = train(
        stacked, xs, ys, ids, steps=steps, batch_size=batch_size, lr=3e-3, key=key_data
    )

    # Serve every test example of every task in one mixed batch, shuffled.
    xt, yt, it = task_data(x_test, y_test)
    perm = np.random.default_rng(seed).permutation(len(xt))
    xt, yt, it = xt[perm], yt[perm], it[perm]
    serve = eqx.filter_jit(mixed)
    pred = np.asarray(jnp.argmax(serve(stacked, xt, it), -1))
    merged = [ql.merge(m) for m in ql.unstack_adapters(stacked)]
    results = {}
    for i, (name, _, _) in enumerate(TASKS):
        own = it == i
        results[name] = dict(
            base=accuracy(base, xt[own], yt[own]),
            mixed=float(np.mean(pred[own] == yt[own])),
            merged=accuracy(merged[i], xt[own], yt[own]),
        )

    # The same examples adapter by adapter: one call per adapter on its examples.
    one = eqx.filter_jit(lambda m, x: jax.vmap(quax.quaxify(m))(x))
    selected = [ql.select_adapter(stacked, i) for i in range(len(TASKS))]
    groups = [(selected[i], xt[it == i]) for i in range(len(TASKS))]
    t_mixed = median_time(lambda: serve(stacked, xt, it), reps)
    t_loop = median_time(lambda: [one(m, x) for m, x in groups], reps)

    say("\n=== quaxlora: three adapters, one batch (scikit-learn digits) ===")
    say(f"{'task':26s} {'base':>7s} {'adapter':>8s} {'merged':>7s}")
    for name, r in results.items():
        say(f"{name:26s} {r['base']:7.1%} {r['mixed']:8.1%} {r['merged']:7.1%}")
    say(f"mixed-batch training loss: {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}")
    say(
        f"serving {len(xt)} examples of {len(TASKS)} tasks: one mixed batch "
        f"{1e3 * t_mixed:.2f} ms, adapter by adapter {1e3 * t_loop:.2f} ms "
        f"({t_loop / t_mixed:.2f}×)"
    )
    return dict(
        results=results,
        losses=losses,
        t_mixed=t_mixed,
        t_loop=t_loop,
        model=stacked,
        base=base,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(
        width=args.width,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        seed=args.seed,
    )
