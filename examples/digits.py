"""LoRA fine-tuning on scikit-learn's handwritten digits.

1. Pretrain a small MLP classifier on the 8×8 digits (full training, plain Equinox).
2. Shift the task: the same digits, mirrored left-right and with inverted intensities.
   The pretrained model does badly on it.
3. Adapt with LoRA: `quaxlora.loraify` the MLP, train only the adapters with an
   ordinary `eqx.filter_grad` + optax loop, and compare accuracies, parameter counts
   and sizes.

Run: `python examples/digits.py` (about 25 seconds on 2 idle CPU cores).
"""

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import quaxlora as ql


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


def shift(x: np.ndarray) -> np.ndarray:
    """The new task: mirror each 8×8 image left-right and invert its intensities."""
    return 1.0 - x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)


def cross_entropy(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, x, y) -> float:
    logits = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def batches(x, y, batch_size, key):
    """An endless stream of random minibatches."""
    n = len(x)
    while True:
        key, sub = jr.split(key)
        idx = np.asarray(jr.choice(sub, n, (batch_size,), replace=False))
        yield x[idx], y[idx]


def pretrain(model, x, y, *, steps, batch_size, lr, key, progress=True):
    opt = optax.adam(lr)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = opt.init(params)

    @eqx.filter_jit
    def step(params, state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(
            lambda p: cross_entropy(eqx.combine(p, static), xb, yb)
        )(params)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    data = batches(x, y, batch_size, key)
    for _ in tqdm(range(steps), desc="pretrain", disable=not progress):
        params, state, _ = step(params, state, *next(data))
    return eqx.combine(params, static)


def lora_finetune(model, x, y, *, rank, steps, batch_size, lr, key, progress=True):
    """Train only the LoRA adapters of `model` (a loraified model)."""
    trainable, frozen = ql.partition(model)
    opt = optax.adam(lr)
    state = opt.init(trainable)  # optimiser state for the adapters only

    def loss_fn(trainable, frozen, xb, yb):
        model = quax.quaxify(eqx.combine(trainable, frozen))
        return cross_entropy(model, xb, yb)

    @eqx.filter_jit
    def step(trainable, state, xb, yb):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(trainable, frozen, xb, yb)
        updates, state = opt.update(grads, state, trainable)
        return eqx.apply_updates(trainable, updates), state, loss

    data = batches(x, y, batch_size, key)
    losses = []
    bar = tqdm(range(steps), desc=f"LoRA r={rank}", disable=not progress)
    for i in bar:
        trainable, state, loss = step(trainable, state, *next(data))
        losses.append(float(loss))
        if i % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return eqx.combine(trainable, frozen), losses


def checkpoint_and_resume(lora_model, base_model, x, path):
    """Save the adapters to `path`, load them back onto the base model, and check
    that the resumed model reproduces the outputs exactly."""
    ql.save_adapters(path, lora_model)
    resumed = ql.load_adapters(path, base_model)
    f = eqx.filter_jit(lambda m, x: jax.vmap(quax.quaxify(m))(x))
    same = bool(jnp.array_equal(f(lora_model, x), f(resumed, x)))
    return resumed, same, os.path.getsize(path)


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if eqx.is_array(x))


def main(
    *,
    width: int = 256,
    depth: int = 2,
    rank: int = 8,
    pretrain_steps: int = 1500,
    lora_steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    out_dir: str = "out",
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(seed)
    key_model, key_pre, key_lora, key_data = jr.split(jr.key(seed), 4)

    model = eqx.nn.MLP(64, 10, width, depth, activation=jax.nn.gelu, key=key_model)
    model = pretrain(
        model,
        x_train,
        y_train,
        steps=pretrain_steps,
        batch_size=batch_size,
        lr=1e-3,
        key=key_pre,
        progress=progress,
    )
    xs_train, xs_test = shift(x_train), shift(x_test)
    acc_orig = accuracy(model, x_test, y_test)
    acc_before = accuracy(model, xs_test, y_test)

    lora_model = ql.loraify(model, rank=rank, alpha=2 * rank, key=key_lora)
    lora_model, losses = lora_finetune(
        lora_model,
        xs_train,
        y_train,
        rank=rank,
        steps=lora_steps,
        batch_size=batch_size,
        lr=3e-3,
        key=key_data,
        progress=progress,
    )
    acc_after = accuracy(quax.quaxify(lora_model), xs_test, y_test)
    merged = ql.merge(lora_model)
    acc_merged = accuracy(merged, xs_test, y_test)
    counts = ql.count_parameters(lora_model)
    trainable, _ = ql.partition(lora_model)
    adapter_bytes, model_bytes = nbytes(trainable), nbytes(model)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "digits_adapters.safetensors")
    _, resumed_same, file_bytes = checkpoint_and_resume(
        lora_model, model, xs_test, path
    )

    say("\n=== quaxlora: LoRA on scikit-learn digits ===")
    say(f"pretrained model on the original task:  {acc_orig:6.1%} test accuracy")
    say(f"on the shifted task, before LoRA:       {acc_before:6.1%}")
    say(f"on the shifted task, after LoRA:        {acc_after:6.1%}")
    say(f"merged model (plain Equinox, no quax):  {acc_merged:6.1%}")
    say(f"LoRA loss: {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}")
    say(f"{counts}")
    say(
        f"adapter file: {file_bytes / 1024:.1f} KiB vs model size "
        f"{model_bytes / 1024:.1f} KiB ({file_bytes / model_bytes:.1%}) -> {path}"
    )
    say(f"resumed from the adapter file, same outputs: {resumed_same}")
    say(f"wall time: {time.perf_counter() - start:.1f} s")
    return dict(
        acc_original=acc_orig,
        acc_before=acc_before,
        acc_after=acc_after,
        acc_merged=acc_merged,
        losses=losses,
        trainable=counts.trainable,
        total=counts.total,
        adapter_bytes=adapter_bytes,
        file_bytes=file_bytes,
        resumed_same=resumed_same,
        model_bytes=model_bytes,
        model=lora_model,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--lora-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="out")
    args = parser.parse_args()
    main(
        rank=args.rank,
        width=args.width,
        pretrain_steps=args.pretrain_steps,
        lora_steps=args.lora_steps,
        seed=args.seed,
        out_dir=args.out_dir,
    )
