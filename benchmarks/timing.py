"""Timing: compiled variants, timed in interleaved rounds.

Every wall-clock figure of the benchmarks is a median over rounds in which each
variant runs once, in turn; every ratio is the median of the per-round ratios to the
round's first variant, so that a slow drift of the machine's load cancels.
"""

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Variant:
    """One jitted function with its argument state; `call()` runs one repetition.

    **Arguments:**

    - `make`: returns the function; called again for each fresh trace.
    - `args`: its arguments.
    - `donate`: the indices of the arguments to donate.
    - `stateful`: how many leading outputs feed back as the leading arguments.
    """

    make: Callable
    args: tuple
    donate: tuple = ()
    stateful: int = 0

    def __post_init__(self):
        self.fn = self.make()
        self.jit = jax.jit(self.fn, donate_argnums=self.donate)
        # donated arguments are copies: the originals are shared between variants
        self.state = tuple(
            jax.tree.map(jnp.copy, a) if i in self.donate else a
            for i, a in enumerate(self.args)
        )
        self.compiled = None

    def compile(self):
        self.compiled = self.jit.trace(*self.args).lower().compile()
        return self.compiled

    def call(self):
        out = self.compiled(*self.state)
        if self.stateful:
            self.state = (*out[: self.stateful], *self.state[self.stateful :])
        jax.block_until_ready(out)

    def cost(self) -> dict:
        """XLA's FLOP count and memory (arguments + outputs + temporaries − aliased)
        of the compiled function: deterministic, unlike the timings."""
        c = self.compiled.cost_analysis()
        c = c[0] if isinstance(c, list) else c
        m = self.compiled.memory_analysis()
        mem = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        return dict(flops=float(c.get("flops", 0.0)), bytes=int(mem))


def _medians(times: list[list[float]]) -> tuple[list[float], list[float]]:
    med = [statistics.median(t) for t in times]
    ratios = [statistics.median([a / b for a, b in zip(t, times[0])]) for t in times]
    return med, ratios


def interleaved(calls: list[Callable[[], object]], reps: int):
    """Median seconds per call of each of `calls`, interleaved per round after one
    warm-up call each, and the median per-round ratio to the first."""
    for call in calls:
        call()
    times = [[] for _ in calls]
    for _ in range(reps):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t0)
    return _medians(times)


def time_interleaved(variants: list, reps: int):
    """`interleaved` for objects with a `call()` method (`Variant`, loops)."""
    return interleaved([v.call for v in variants], reps)


def time_build(
    variants: list[Variant], reps: int, compile_reps: int, *, fresh: bool = True
):
    """Seconds to build a fresh copy of each variant's function, interleaved per round
    (with `fresh`, JAX's caches cleared before each, so nothing traced or compiled
    before is reused, and Python's garbage collected, so that the garbage of the
    previous build is not collected during the timed one): `reps` rounds of tracing
    to a jaxpr, the first `compile_reps` of which also lower and compile.

    The objects alive when it starts (the benchmark's own: other models, their
    compiled programs, PyTorch) are frozen out of the garbage collector meanwhile
    (`gc.freeze`): a full collection during a build would otherwise traverse all of
    them, at a cost that depends on the harness rather than on the step, and falls
    more often on the build that allocates more.

    **Returns:**

    A dict from each stage (`trace`, `lower`, `compile`) to the pair
    `(medians, median ratios to the first variant)`.
    """
    times = {s: [[] for _ in variants] for s in ("trace", "lower", "compile")}
    gc.collect()
    gc.freeze()
    try:
        _build_rounds(variants, reps, compile_reps, fresh, times)
    finally:
        gc.unfreeze()
    return {s: _medians(t) for s, t in times.items()}


def _build_rounds(variants, reps, compile_reps, fresh, times):
    for round in range(max(reps, compile_reps)):
        for i, v in enumerate(variants):
            if fresh:
                jax.clear_caches()
                gc.collect()
            fn = jax.jit(v.make(), donate_argnums=v.donate)
            t0 = time.perf_counter()
            traced = fn.trace(*v.args)
            times["trace"][i].append(time.perf_counter() - t0)
            if round < compile_reps:
                t0 = time.perf_counter()
                lowered = traced.lower()
                t1 = time.perf_counter()
                lowered.compile()
                times["lower"][i].append(t1 - t0)
                times["compile"][i].append(time.perf_counter() - t1)


def time_trace_compile(make_fn: Callable, args: tuple):
    """Seconds to trace, lower and compile a fresh function, once, and the number of
    lines of its optimised HLO (deterministic, unlike the timings)."""
    jax.clear_caches()
    fn = make_fn()
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, len(compiled.as_text().splitlines())
