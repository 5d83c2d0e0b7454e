"""Many adapters, one batch: inference on the benchmark GPT with 8 adapters.

A batch of 8 sequences, each for a different adapter, run four ways:

- `single`: the same batch through one adapter (the bar to meet);
- `mixed`: one call, `jax.vmap` of `quaxlora.select_adapter` with one adapter index
  per example (each example's factors gathered);
- `grouped`: one compiled program that runs each adapter on its own examples (the
  groups fixed at trace time, so a new mix of adapters recompiles);
- `loop`: adapter by adapter, one call per adapter on its examples (PEFT's
  `adapter_names`).

Targets (issue 15): `mixed` ≤ 1.25× `single`, and `loop` ≥ 4× `mixed`.

Run from the repository root: `python -m benchmarks.multi_adapter [--quick]`.
"""

import argparse
import json
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import quax

import quaxlora as ql


if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.models import Config, GPT, QUICK, RANK  # noqa: E402
from benchmarks.timing import time_interleaved, Variant  # noqa: E402


ADAPTERS = 8


def _trained(model, key):
    """Random non-zero `b`, so that every adapter changes the output."""
    trainable, frozen = ql.partition(model)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jr.split(key, len(leaves))
    leaves = [x + 0.01 * jr.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


class _Loop:
    """A timed variant that is a Python loop of calls, not one compiled function."""

    def __init__(self, fn):
        self.fn = fn

    def call(self):
        jax.block_until_ready(self.fn())


def build(cfg: Config, key, adapters: int = ADAPTERS) -> dict:
    km, kt, ka = jr.split(key, 3)
    base = GPT(cfg.vocab, cfg.d_model, cfg.heads, cfg.blocks, key=km)
    keys = jr.split(ka, 2 * adapters)
    models = [
        _trained(ql.loraify(base, rank=RANK, key=k1, exclude="head"), k2)
        for k1, k2 in zip(keys[::2], keys[1::2])
    ]
    stacked = ql.stack_adapters(models)
    x = jr.randint(kt, (adapters, cfg.seq), 0, cfg.vocab)
    ids = jnp.arange(adapters, dtype=jnp.int32)  # one example per adapter
    arrays, static = eqx.partition(stacked, eqx.is_array)
    one_arrays, one_static = eqx.partition(models[0], eqx.is_array)

    def single(arrays, x):
        return jax.vmap(quax.quaxify(eqx.combine(arrays, one_static)))(x)

    def mixed(arrays, x, ids):
        model = eqx.combine(arrays, static)
        run = lambda x, i: quax.quaxify(ql.select_adapter(model, i))(x)
        return jax.vmap(run)(x, ids)

    def grouped(arrays, x):
        model = eqx.combine(arrays, static)
        outs = [
            jax.vmap(quax.quaxify(ql.select_adapter(model, i)))(x[i : i + 1])
            for i in range(adapters)
        ]
        return jnp.concatenate(outs)

    variants = dict(
        single=Variant(lambda: single, (one_arrays, x)),
        mixed=Variant(lambda: mixed, (arrays, x, ids)),
        grouped=Variant(lambda: grouped, (arrays, x)),
    )
    # The loop: separate calls of one compiled single-example function.
    per_adapter = [eqx.partition(m, eqx.is_array)[0] for m in models]
    one = jax.jit(single)
    loop = _Loop(lambda: [one(a, x[i : i + 1]) for i, a in enumerate(per_adapter)])
    return dict(
        variants=variants,
        loop=loop,
        models=models,
        stacked=stacked,
        x=x,
        ids=ids,
        base=base,
    )


def run(cfg: Config, key, reps: int | None = None) -> dict:
    print("\n## many adapters, one batch (GPT, 8 adapters, batch 8)", flush=True)
    b = build(cfg, key)
    for v in b["variants"].values():
        v.compile()
    names = [*b["variants"], "loop"]
    timed = [*b["variants"].values(), b["loop"]]
    med, ratio = time_interleaved(timed, reps or cfg.reps)
    res = dict(time=dict(zip(names, med)), ratio_to_single=dict(zip(names, ratio)))
    res["loop_over_mixed"] = res["time"]["loop"] / res["time"]["mixed"]
    res["grouped_over_mixed"] = res["time"]["grouped"] / res["time"]["mixed"]
    print(json.dumps(res, indent=1), flush=True)
    return res


def fmt(res: dict) -> str:
    t, r = res["time"], res["ratio_to_single"]
    return (
        "| variant | s per batch | ratio to single adapter |\n|---|---|---|\n"
        + "".join(f"| {k} | {t[k]:.4f} | {r[k]:.3f}× |\n" for k in t)
        + f"\nadapter by adapter ÷ mixed: {res['loop_over_mixed']:.2f}×; "
        f"grouped ÷ mixed: {res['grouped_over_mixed']:.2f}×\n"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args(argv)
    res = run(QUICK if args.quick else Config(), jr.key(0), args.reps)
    print("\n" + fmt(res))
    return res


if __name__ == "__main__":
    main()
