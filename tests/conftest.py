import os


# Several CPU devices for the sharding tests; and LLVM's cheapest code generation:
# the suite compiles hundreds of tiny programs, and compiling dominates its time
# (about a third less with this). XLA's HLO passes, which the cost and memory guards
# read, are unaffected. Must be set before JAX is imported.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
)
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        *(f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")),
    ]
).strip()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


# The property tests draw the same examples on every run, so CI cannot fail on one
# machine and pass on the next. `HYPOTHESIS_PROFILE=explore` draws fresh, and more.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(5678), 10_000))
    return lambda: next(keys)


@pytest.fixture
def strict_promotion():
    """Strict dtype promotion, so a rule that silently promotes fails its test.
    (Used by the rule tests; optax itself needs standard promotion.)"""
    with jax.numpy_dtype_promotion("strict"):
        yield
