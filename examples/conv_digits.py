"""LoRA fine-tuning of a small convolutional network on scikit-learn's digits.

1. Pretrain a small CNN (a dense conv, a strided conv, a depthwise conv and a linear
   head) on the 8×8 digits, in plain Equinox.
2. Shift the task: the same digits rotated by 90 degrees. The pretrained network
   does badly on them.
3. Adapt with LoRA on every conv (`where=eqx.nn.Conv`) and retrain the classifier
   head in full (`modules_to_save="head"`, as in PEFT): nothing else is trained.
   The dense convs run factored; the depthwise conv, whose kernel is tiny next to
   its activations, runs through the delta kernel (see `quaxlora.conv.conv_plan`).

Run: `python examples/conv_digits.py` (under a minute on 2 CPU cores).
"""

import argparse
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


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    depthwise: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, width: int, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        f32 = jnp.float32
        self.conv1 = eqx.nn.Conv2d(1, width, 3, padding=1, key=k1, dtype=f32)
        self.conv2 = eqx.nn.Conv2d(
            width, 2 * width, 3, stride=2, padding=1, key=k2, dtype=f32
        )
        self.depthwise = eqx.nn.Conv2d(
            2 * width, 2 * width, 3, padding=1, groups=2 * width, key=k3, dtype=f32
        )
        self.head = eqx.nn.Linear(2 * width * 16, 10, key=k4, dtype=f32)

    def __call__(self, image):
        x = jax.nn.relu(self.conv1(image[None]))  # (width, 8, 8)
        x = jax.nn.relu(self.conv2(x))  # (2 width, 4, 4)
        x = x + jax.nn.relu(self.depthwise(x))
        return self.head(x.reshape(-1))


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


def shift(x: np.ndarray) -> np.ndarray:
    """The new task: every 8×8 image rotated by 90 degrees."""
    return np.rot90(x, axes=(1, 2)).copy()


def cross_entropy(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, x, y) -> float:
    logits = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(model, x)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def batches(x, y, batch_size, key):
    n = len(x)
    while True:
        key, sub = jr.split(key)
        idx = np.asarray(jr.choice(sub, n, (min(batch_size, n),), replace=False))
        yield x[idx], y[idx]


def train(params, static, loss_fn, data, *, steps, lr, desc, progress):
    """Adam on `params` (a pytree of arrays); `loss_fn(params, static, x, y)`."""
    opt = optax.adam(lr)
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
        if i % 25 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def main(
    *,
    width: int = 16,
    rank: int = 4,
    pretrain_steps: int = 600,
    lora_steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(seed)
    k_model, k_pre, k_lora, k_data = jr.split(jr.key(seed), 4)

    # 1. Pretrain in full.
    params, static = eqx.partition(CNN(width, key=k_model), eqx.is_inexact_array)
    plain_loss = lambda p, s, x, y: cross_entropy(eqx.combine(p, s), x, y)
    params, _ = train(
        params,
        static,
        plain_loss,
        batches(x_train, y_train, batch_size, k_pre),
        steps=pretrain_steps,
        lr=1e-2,
        desc="pretrain",
        progress=progress,
    )
    model = eqx.combine(params, static)
    xs_train, xs_test = shift(x_train), shift(x_test)
    acc_original = accuracy(model, x_test, y_test)
    acc_before = accuracy(model, xs_test, y_test)

    # 2. Adapt with LoRA: train the adapters only.
    lora_model = ql.loraify(
        model, rank=rank, key=k_lora, where=eqx.nn.Conv, modules_to_save="head"
    )
    trainable, frozen = ql.partition(lora_model)
    lora_loss = lambda t, f, x, y: cross_entropy(quax.quaxify(eqx.combine(t, f)), x, y)
    trainable, losses = train(
        trainable,
        frozen,
        lora_loss,
        batches(xs_train, y_train, batch_size, k_data),
        steps=lora_steps,
        lr=3e-3,
        desc=f"LoRA r={rank}",
        progress=progress,
    )
    lora_model = eqx.combine(trainable, frozen)
    acc_after = accuracy(quax.quaxify(lora_model), xs_test, y_test)
    acc_merged = accuracy(ql.merge(lora_model), xs_test, y_test)
    counts = ql.count_parameters(lora_model)
    h = jax.ShapeDtypeStruct((batch_size, 2 * width, 4, 4), jnp.float32)
    plan = ql.conv.conv_plan(
        h,
        lora_model.depthwise.weight,
        (1, 1),
        ((1, 1), (1, 1)),
        feature_group_count=2 * width,
    )

    say("\n=== quaxlora: LoRA on a CNN, scikit-learn digits ===")
    say(f"pretrained CNN on upright digits:      {acc_original:6.1%} test accuracy")
    say(f"on rotated digits, before LoRA:        {acc_before:6.1%}")
    say(f"on rotated digits, after LoRA:         {acc_after:6.1%}")
    say(f"merged model (plain Equinox, no quax): {acc_merged:6.1%}")
    say(f"LoRA loss: {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f}")
    say(f"{counts}")
    say(f"depthwise conv plan: {plan.plan} (training FLOPs {plan.training})")
    say(f"wall time: {time.perf_counter() - start:.1f} s")
    return dict(
        acc_original=acc_original,
        acc_before=acc_before,
        acc_after=acc_after,
        acc_merged=acc_merged,
        losses=losses,
        trainable=counts.trainable,
        total=counts.total,
        depthwise_plan=plan.plan,
        model=lora_model,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lora-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    main(
        width=args.width,
        rank=args.rank,
        pretrain_steps=args.pretrain_steps,
        lora_steps=args.lora_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
