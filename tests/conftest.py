import atexit
import itertools
import os
import shutil
import tempfile


# Several CPU devices for the sharding tests; and XLA:CPU's cheapest code generation.
# The suite compiles thousands of tiny programs (every eager op on a new shape is one),
# and compiling dominates its time: a tiny program takes about 37 ms to compile by
# default, 25 ms at LLVM's lowest optimisation level, and 12 ms when fusions are also
# emitted by the older elemental emitters, without XNNPACK's rewrites and with the
# default (not the concurrency-optimised) scheduler. The cost and memory guards read
# XLA's cost and memory analyses, which these flags leave within the guards' bounds
# (they compare LoRA with the floor and full steps compiled under the same flags).
# Must be set before JAX is imported.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
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


# Tests that run the examples, the benchmarks or documentation pages: that code is
# written as users write theirs, with optax (whose updates mix Python floats with an
# int32 step count) and NumPy-style broadcasting, so it runs with JAX's default
# promotion rules. quaxlora's own code inside it is checked strictly by the other
# tests. Keys: test file, or `file::test` for one test of a file.
_USER_CODE = {
    "test_benchmarks.py",
    "test_examples.py",
    "test_bert.py",
    "test_peft_bert.py",
    "test_sharding.py",
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


@pytest.fixture(autouse=True)
def _x64(request):
    """Tests marked `x64` compare a factored computation with its dense reference in
    float64 at the highest matmul precision, so a tolerance of 1e-10 sees a wrong
    rule and not rounding. The rest of the suite runs as users' code does: float32
    by default (64-bit types off) at JAX's default precision."""
    if request.node.get_closest_marker("x64") is None:
        yield
    else:
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            yield


@pytest.fixture
def getkey():
    # Indexed rather than iterated: iterating a key array compiles an unstacking
    # program (about 2 s per process and dtype setting); indexing, a small one.
    keys = jr.split(jr.key(5678), 10_000)
    count = itertools.count()
    return lambda: keys[next(count)]
