"""`python -m benchmarks.multi_adapter --quick` runs, and its variants compute the
same outputs. Timings are not asserted: they belong to the benchmarks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import quaxlora as ql
from benchmarks import models, multi_adapter


# `eqx.error_if` under `jax.vmap` inside `jit` (`select_adapter`'s check of a traced
# index) crashes JAX's tracer-leak checker itself (an IndexError in its report), with
# no quaxlora code involved (reproduced with a bare `eqx.error_if`); so CI's
# leak-check run leaves these tests out.
pytestmark = pytest.mark.no_leak_check


def test_variants_agree():
    with jax.enable_x64(False), jax.default_matmul_precision("default"):
        b = multi_adapter.build(models.QUICK, jr.key(0), adapters=3)
        v = b["variants"]
        mixed = v["mixed"].jit(*v["mixed"].args)
        grouped = v["grouped"].jit(*v["grouped"].args)
        x = b["x"]
        for i, model in enumerate(b["models"]):
            alone = jax.vmap(quax.quaxify(ql.merge(model)))(x[i : i + 1])[0]
            np.testing.assert_allclose(mixed[i], alone, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(grouped[i], alone, rtol=1e-4, atol=1e-4)
        assert not np.allclose(mixed[0], jnp.asarray(mixed[1]))
        assert isinstance(b["stacked"].blocks[0].q.weight, ql.StackedLoraArray)
        assert eqx.tree_equal(ql.unstack_adapters(b["stacked"]), b["models"])


def test_quick_run():
    with jax.enable_x64(False), jax.default_matmul_precision("default"):
        res = multi_adapter.main(["--quick", "--reps", "1"])
    assert set(res["time"]) == {"single", "mixed", "grouped", "loop"}
    assert all(t > 0 for t in res["time"].values())
