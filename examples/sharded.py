"""LoRA training on a device mesh, with JAX's own sharding.

- the batch is split across devices (data parallel);
- each frozen weight is split along its output axis across the same devices
  (FSDP-style: no device holds a whole copy; XLA gathers it where it is used);
- each adapter is either replicated (`--adapters replicated`, the default) or split
  along with its base (`--adapters with-base`: `b`, of shape `(out, rank)`, is split on
  `out` like `w`; `a`, of shape `(rank, in)`, is replicated).

The program is the ordinary single-device training step: only the placement of its
inputs changes, and `jax.jit` propagates it. The run checks that the losses and the
trained adapters equal those of the same training on one device.

Run on 8 simulated CPU devices:

    python examples/sharded.py

On a machine with several GPUs/TPUs, drop the `XLA_FLAGS` line; across hosts, call
`jax.distributed.initialize()` first (see docs/distributed.md).
"""

import os


# Simulate 8 devices on the CPU; must happen before JAX is imported. A no-op if the
# variable is already set (e.g. by the test suite).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import quax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import quaxlora as ql  # noqa: E402


def shardings(tree, mesh, adapters="replicated"):
    """A `NamedSharding` for every array of a (partitioned) LoRA model: frozen
    weights split along their first (output) axis where it divides evenly; `b`
    factors too with `adapters="with-base"`; everything else replicated."""
    n = mesh.shape["data"]
    split = NamedSharding(mesh, P("data"))
    whole = NamedSharding(mesh, P())

    def leaf(path, x):
        name = jtu.keystr(path)
        if name.endswith(".a"):
            return whole
        if name.endswith(".b") and adapters != "with-base":
            return whole
        return split if x.ndim >= 2 and x.shape[0] % n == 0 else whole

    return jtu.tree_map_with_path(leaf, tree)


def place(tree, mesh, *, adapters="replicated"):
    """`jax.device_put` every array of `tree` onto `mesh` (see `shardings`)."""
    return jax.device_put(tree, shardings(tree, mesh, adapters))


def make_mesh(n):
    """A one-axis mesh `"data"` over `n` devices. `Auto` axes: shardings propagate
    from the inputs through the unchanged program (XLA's GSPMD partitioner)."""
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_step(static, opt):
    def loss_fn(trainable, frozen, x, y):
        model = eqx.combine(trainable, frozen, static)
        pred = quax.quaxify(lambda m, x: jax.vmap(m)(x))(model, x)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def step(trainable, opt_state, frozen, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def train(model, data, *, mesh=None, adapters="replicated", steps=5, lr=1e-2):
    """LoRA-train `model` on `data = (x, y)`; on `mesh` if given, else one device.
    Returns the per-step losses and the trained `trainable` pytree."""
    arrays, static = eqx.partition(model, eqx.is_array)
    trainable, frozen = eqx.partition(arrays, ql.trainable_spec(model))
    x, y = data
    if mesh is None:
        device = jax.devices()[0]
        trainable, frozen, x, y = jax.device_put((trainable, frozen, x, y), device)
    else:
        trainable = place(trainable, mesh, adapters=adapters)
        frozen = place(frozen, mesh)
        batch = NamedSharding(mesh, P("data"))
        x, y = jax.device_put((x, y), batch)
    opt = optax.adam(lr)
    opt_state = opt.init(trainable)
    step = make_step(static, opt)
    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, x, y)
        losses.append(float(loss))
    return losses, trainable, frozen


def setup(key, *, width=64, depth=3, batch=64, rank=4):
    kmodel, klora, kx = jr.split(key, 3)
    mlp = eqx.nn.MLP(width, width, width, depth, key=kmodel)
    model = ql.loraify(mlp, rank=rank, key=klora)
    x = jr.normal(kx, (batch, width))
    y = jnp.sin(x)
    return model, (x, y)


def main(argv=None):
    parser = argparse.ArgumentParser(description="LoRA training on a device mesh.")
    parser.add_argument(
        "--adapters", choices=("replicated", "with-base"), default="replicated"
    )
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    devices = jax.devices()
    mesh = make_mesh(len(devices))
    print(f"{len(devices)} devices: {devices}")
    model, data = setup(jr.key(0))
    one_losses, one_trained, _ = train(model, data, steps=args.steps)
    losses, trained, frozen = train(
        model, data, mesh=mesh, adapters=args.adapters, steps=args.steps
    )
    w = frozen.layers[0].weight.weight
    print(
        f"frozen weight {w.shape}: sharding {w.sharding.spec}, per device "
        f"{w.addressable_shards[0].data.shape}"
    )
    for i, (l1, ln) in enumerate(zip(one_losses, losses)):
        print(f"step {i:3d}  loss one device {l1:.6f}  mesh {ln:.6f}")
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jtu.tree_leaves(one_trained), jtu.tree_leaves(trained))
    )
    print(f"max |adapter difference| between one device and the mesh: {diff:.2e}")


if __name__ == "__main__":
    main()
