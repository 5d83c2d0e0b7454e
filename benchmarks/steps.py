"""The compiled functions the benchmarks time: one training step for every variant
(full fine-tuning, LoRA, QLoRA, quax's example, the frozen floor), and inference.

The variants differ only in what trains (a filter spec over the model) and whether
the loss runs under `quax.quaxify` (needed when the model holds LoRA arrays).
"""

import equinox as eqx
import jax
import optax
import quax
import quax.examples.lora as quax_lora

import quaxlora as ql
from benchmarks.timing import Variant


def make_step(loss, static, opt, *, quaxified: bool):
    """`step(trainable, opt_state, frozen, *batch) -> (trainable, opt_state, loss)`:
    one optimiser step on the gradient with respect to `trainable` only."""
    f = quax.quaxify(loss) if quaxified else loss

    def step(trainable, opt_state, frozen, *batch):
        def value(t):
            return f(eqx.combine(t, frozen, static), *batch)

        value, grads = jax.value_and_grad(value)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def step_variant(
    task, model, spec, opt, *, quaxified: bool, donate: tuple = (0, 1)
) -> Variant:
    """The training step of `task`'s loss on `model`, training what the filter `spec`
    selects; by default the trainable arrays and the optimiser state are donated."""
    trainable, rest = eqx.partition(model, spec)
    frozen, static = eqx.partition(rest, eqx.is_array)
    args = (trainable, opt.init(trainable), frozen, *task.batch)
    make = lambda: make_step(task.loss, static, opt, quaxified=quaxified)
    return Variant(make, args, donate=donate, stateful=2)


def infer_variant(task, model, *, quaxified: bool) -> Variant:
    """`task.predict` on `model`, for the task's batch."""
    arrays, static = eqx.partition(model, eqx.is_array)

    def make():
        def infer(arrays, *batch):
            f = quax.quaxify(task.predict) if quaxified else task.predict
            return f(eqx.combine(arrays, static), *batch)

        return infer

    return Variant(make, (arrays, *task.batch))


def first_bias_spec(model):
    """The frozen floor's filter spec: only the bias of the first `eqx.nn.Linear`
    trains, so the backward still runs through every layer after it, but computes
    no weight gradient."""
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)

    def first_bias(tree):
        leaves = jax.tree.leaves(tree, is_leaf=is_linear)
        return next(x for x in leaves if is_linear(x)).bias

    return eqx.tree_at(first_bias, jax.tree.map(lambda _: False, model), True)


def quax_example_loraify(model, lora_model, rank, key):
    """quax's own `quax.examples.lora`, on the linear layers quaxlora adapted."""
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)
    keys = iter(jax.random.split(key, 10_000))

    def adapt(layer, lora_layer):
        if is_linear(layer) and isinstance(lora_layer.weight, ql.LoraArray):
            return quax_lora.loraify(layer, rank=rank, key=next(keys))
        return layer

    return jax.tree.map(adapt, model, lora_model, is_leaf=is_linear)


def quax_example_spec(model):
    """The best case for quax's example: the user trains its `a` and `b` only."""
    is_lora = lambda x: isinstance(x, quax_lora.LoraArray)

    def spec(x):
        if is_lora(x):
            s = jax.tree.map(lambda _: False, x)
            return eqx.tree_at(lambda l: (l.a, l.b), s, (True, True))
        return False

    return jax.tree.map(spec, model, is_leaf=is_lora)
