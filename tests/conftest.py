import atexit
import os
import shutil
import tempfile


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

# One compilation cache for the whole run, shared by the xdist workers (they inherit
# this environment from the controlling process, which loads this file first): the
# workers compile many of the same small programs (the eager `jr.normal`, `astype`,
# `loraify` of the same shapes), and each compiles once per run instead of once per
# worker. A fresh folder per run, removed at its end, so a run never reads a previous
# run's programs; set JAX_COMPILATION_CACHE_DIR to keep one across runs instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="quaxlora-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


# The property tests draw the same examples on every run, so CI cannot fail on one
# machine and pass on the next. `HYPOTHESIS_PROFILE=explore` draws fresh, and more.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# As Equinox's own tests do: no implicit dtype promotion (a rule that silently
# promotes, e.g. float32 adapters meeting a bfloat16 input, fails its test) and no
# implicit rank promotion (broadcasting a rank-1 array against a rank-2 one).
# Code that needs standard promotion (optax's updates) opts in, narrowly, with
# `jax.numpy_dtype_promotion("standard")`.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")


# Tests that run the examples, the benchmarks or documentation pages: that code is
# written as users write theirs, with optax (whose updates mix Python floats with an
# int32 step count) and NumPy-style broadcasting, so it runs with JAX's default
# promotion rules. quaxlora's own code inside it is checked strictly by the other
# tests. Keys: test file, or `file::test` for one test of a file.
_USER_CODE = {
    "test_benchmarks.py",
    "test_benchmarks_multi_adapter.py",
    "test_examples_conv_lm.py",
    "test_examples_multi_adapter.py",
    "test_bert.py",
    "test_peft_bert.py",
    "test_sharding.py",
    "test_train.py::test_digits_example_smoke",
    "test_qlora.py::test_memory",  # benchmarks' training step and GPT
    "test_cost.py::test_scanned_lora_step_stores_no_weight_copy",  # benchmarks'
    "test_docs.py::test_examples_run",  # the pages train with optax
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        if file in _USER_CODE or f"{file}::{item.originalname}" in _USER_CODE:
            item.add_marker(pytest.mark.standard_promotion)


@pytest.fixture(autouse=True)
def _standard_promotion(request):
    """Tests marked `standard_promotion` run with JAX's default dtype and rank
    promotion instead of the suite's strict ones (see `_USER_CODE`)."""
    if request.node.get_closest_marker("standard_promotion") is None:
        yield
    else:
        with (
            jax.numpy_dtype_promotion("standard"),
            jax.numpy_rank_promotion("allow"),
        ):
            yield


@pytest.fixture
def getkey():
    keys = iter(jr.split(jr.key(5678), 10_000))
    return lambda: next(keys)
