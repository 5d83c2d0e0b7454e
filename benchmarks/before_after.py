"""Full fine-tuning vs three versions of the LoRA step, compiled in one process and
timed interleaved (medians of per-round ratios):

    python -m benchmarks.before_after [--reps N] [--quick]

1. quaxlora as it is: the hand-written backward, and under differentiation a
   one-product forward (`x·(w + s·b·a)`, or against `[w | b]`; see
   `quaxlora/_rules/_factored.py`);
2. the hand-written backward with the two-product forward (`FUSE_MAX_COPY = 0`);
3. autodiff's own backward: the product's primitive bypassed, the same forward
   differentiated by JAX.
"""

import argparse
import contextlib
from unittest import mock

import equinox as eqx
import jax.random as jr
import optax

import quaxlora as ql
import quaxlora._rules._dot_general as _dg
import quaxlora._rules._factored as _f
from benchmarks.models import Config, gpt_task, mlp_task, QUICK
from benchmarks.steps import step_variant
from benchmarks.timing import time_interleaved


def _autodiff_factored(spec, x, w, f1, f2, xa=None):
    # The same forward as the shipped rule, without its primitive and rules.
    return _f.forward(spec, x, w, f1, f2, xa, fuse=False)[0]


@contextlib.contextmanager
def two_product_forward():
    with mock.patch.object(_f, "FUSE_MAX_COPY", 0):
        yield


@contextlib.contextmanager
def autodiff_backward():
    with mock.patch.object(_dg, "factored_product", _autodiff_factored):
        yield


LABELS = ["fused forward", "two-product forward", "autodiff backward"]


def variants(task):
    opt = optax.adam(1e-4)
    lora = ql.loraify(task.model, rank=task.rank, key=jr.key(1), **task.lora)
    spec = ql.trainable_spec(lora)
    # No buffer donation: full fine-tuning pays for new parameter buffers.
    full = step_variant(task, task.model, eqx.is_array, opt, quaxified=False, donate=())
    full.compile()
    out = [full]
    for ctx in (contextlib.nullcontext, two_product_forward, autodiff_backward):
        with ctx():
            v = step_variant(task, lora, spec, opt, quaxified=True, donate=())
            v.compile()
        out.append(v)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    print("| model | variant | step, s | ratio to full FT | XLA GFLOP | XLA MiB |")
    print("|---|---|---|---|---|---|")
    for name, task in (("mlp", mlp_task), ("gpt", gpt_task)):
        vs = variants(task(cfg, jr.key(0)))
        med, ratio = time_interleaved(vs, args.reps)
        for label, v, m, r in zip(["full fine-tuning", *LABELS], vs, med, ratio):
            c = v.cost()
            print(
                f"| {name} | {label} | {m:.4f} | {r:.3f}× | {c['flops'] / 1e9:.2f} "
                f"| {c['bytes'] / 2**20:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
