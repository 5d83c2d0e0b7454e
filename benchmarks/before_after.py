"""Full fine-tuning vs the LoRA step with and without `contract`'s hand-written
backward, compiled in one process and timed interleaved (medians of per-round ratios).

    python -m benchmarks.before_after [--reps N] [--quick]

"Without" is the same rule with autodiff's own backward: `contract` with its
`custom_vjp` bypassed (`_contract` replaced by the plain forward).
"""

import argparse

import equinox as eqx
import jax.random as jr
import optax

import quaxlora as ql
import quaxlora._rules._contract as _c
from benchmarks.run import (
    Config,
    gpt_task,
    make_full_step,
    make_lora_step,
    mlp_task,
    QUICK,
    time_interleaved,
    Variant,
)


def _autodiff_contract(spec, x, y):
    return _c._dot(x, spec[0], y, *spec[1:])


def variants(task):
    model, (x, y), loss, exclude, _ = task
    opt = optax.adam(1e-4)
    params, static = eqx.partition(model, eqx.is_array)
    lora = ql.loraify(model, rank=16, key=jr.key(1), exclude=exclude)
    arrays, lstatic = eqx.partition(lora, eqx.is_array)
    tr, fr = eqx.partition(arrays, ql.is_trainable(lora))
    full = Variant(make_full_step(loss, static, opt), (params, opt.init(params), x, y))
    args = (tr, opt.init(tr), fr, x, y)
    new = Variant(make_lora_step(loss, lstatic, opt), args)
    full.compile()
    new.compile()
    custom = _c._contract
    _c._contract = _autodiff_contract
    try:
        old = Variant(make_lora_step(loss, lstatic, opt), args)
        old.compile()
    finally:
        _c._contract = custom
    return [full, new, old]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    for name, task in (("mlp", mlp_task), ("gpt", gpt_task)):
        vs = variants(task(cfg, jr.key(0)))
        med, ratio = time_interleaved(vs, args.reps)
        flops = [v.cost()["flops"] / 1e9 for v in vs]
        mem = [v.cost()["bytes"] / 2**20 for v in vs]
        print(
            f"{name}: full {med[0]:.4f} s | LoRA, custom backward {med[1]:.4f} s "
            f"({ratio[1]:.3f}×) | LoRA, autodiff backward {med[2]:.4f} s "
            f"({ratio[2]:.3f}×) | GFLOP {flops[0]:.2f} / {flops[1]:.2f} / "
            f"{flops[2]:.2f} | MiB {mem[0]:.1f} / {mem[1]:.1f} / {mem[2]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
