"""LoRA training on an 8-device mesh equals training on one device.

`tests/conftest.py` gives the CPU 8 devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
from jax.sharding import PartitionSpec as P

import quaxlora as ql

from .helpers import assert_tree_allclose


_path = pathlib.Path(__file__).parent.parent / "examples" / "sharded.py"
_spec = importlib.util.spec_from_file_location("sharded_example", _path)
sharded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sharded)


def test_eight_devices():
    assert len(jax.devices()) == 8


@pytest.mark.x64  # the mesh and one device agree to 1e-10
@pytest.mark.parametrize("adapters", ["replicated", "with-base"])
def test_mesh_training_matches_one_device(adapters):
    model, data = sharded.setup(jr.key(0), width=32, depth=2, batch=32, rank=4)
    mesh = sharded.make_mesh(8)
    one_losses, one_trained, _ = sharded.train(model, data, steps=4)
    losses, trained, frozen = sharded.train(
        model, data, mesh=mesh, adapters=adapters, steps=4
    )
    assert losses[-1] < losses[0]
    assert jnp.allclose(jnp.array(losses), jnp.array(one_losses), rtol=1e-10)
    assert_tree_allclose(
        jax.device_get(trained), jax.device_get(one_trained), rtol=1e-10, atol=1e-12
    )
    # The frozen weights are split along their output axis: 1/8 per device.
    for lora in jtu.tree_leaves(frozen, is_leaf=lambda x: isinstance(x, ql.LoraArray)):
        if isinstance(lora, ql.LoraArray):
            w = lora.weight
            assert w.sharding.spec == P("data")
            assert w.addressable_shards[0].data.shape == (w.shape[0] // 8, w.shape[1])


def test_placement_of_adapters():
    model, _ = sharded.setup(jr.key(1), width=32, depth=2, batch=32, rank=4)
    arrays, _ = eqx.partition(model, eqx.is_array)
    trainable, frozen = eqx.partition(arrays, ql.trainable_spec(model))
    mesh = sharded.make_mesh(8)
    for adapters, b_spec in (("replicated", P()), ("with-base", P("data"))):
        placed = sharded.place(trainable, mesh, adapters=adapters)
        lora = placed.layers[0].weight
        assert lora.a.sharding.spec == P()
        assert lora.b.sharding.spec == b_spec
    placed = sharded.place(frozen, mesh)
    assert placed.layers[0].weight.weight.sharding.spec == P("data")
    assert placed.layers[0].bias.sharding.spec == P()
