"""The analytic matmul FLOP count of a training step, against which XLA's own count
is checked (the derivation is in `docs/benchmarks.md`)."""

import equinox as eqx
import jax

import quaxlora as ql
from quaxlora._rules._factored import FUSE_MAX_COPY


def linear_shapes(lora_model) -> list[tuple[int, int, bool]]:
    """`(in, out, adapted)` of every `eqx.nn.Linear` of a LoRA model, in order."""
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)
    return [
        (leaf.in_features, leaf.out_features, isinstance(leaf.weight, ql.LoraArray))
        for leaf in jax.tree.leaves(lora_model, is_leaf=is_linear)
        if is_linear(leaf)
    ]


def analytic_matmul_flops(task, lora_model, *, lora: bool) -> int:
    """Matmul FLOPs of one training step of `task`: per linear layer of `n` rows,
    full FT `2n·d_in·d_out·(2 + δ)`, frozen-base LoRA
    `2n·(d_in·d_out·(1 + δ) + r·(3·d_out + (2 + δ)·d_in))`, δ = 1 where the layer's
    input needs a gradient (all but the first `no_dx` layers); unadapted layers
    count as trained (full) or frozen (LoRA); plus the attention products, the same
    in both. Where the LoRA forward is the merged product `x·(w + s·b·a)` (a float32
    weight with `d_in ≤ 2n`, see `quaxlora/_rules/_factored.py`), its `2n·r·d_out`
    for `t·bᵀ` is `2·d_in·d_out·r` for `b·a` instead."""
    n, r = task.tokens, task.rank
    no_dx = task.no_dx_lora if lora else task.no_dx_full
    total = task.attention
    for i, (din, dout, adapted) in enumerate(linear_shapes(lora_model)):
        delta = 0 if i < no_dx else 1
        if not lora:
            total += 2 * n * din * dout * (2 + delta)
        elif adapted:
            total += (
                2 * n * (din * dout * (1 + delta) + r * (3 * dout + (2 + delta) * din))
            )
            if din * dout <= FUSE_MAX_COPY * n * dout:
                total += 2 * din * dout * r - 2 * n * r * dout
        else:
            total += 2 * n * din * dout * (1 + delta)
    return total
