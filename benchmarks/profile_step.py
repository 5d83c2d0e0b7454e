"""The LoRA step against the frozen floor and full fine-tuning, with and without
`contract_p`'s CPU lowering (which pins small relayouts so that XLA cannot fold the
transpose of `(tᵀ·g)ᵀ`, the gradient of `b`, back into a slow `gᵀ·t`).

    python -m benchmarks.profile_step [mlp|gpt] [rounds]

Prints XLA's deterministic counts (GFLOP, bytes accessed, temporaries, total memory)
and, interleaved round by round in one process, the median seconds per step, the
median per-round ratios to full fine-tuning and to the floor, and the ratio of the
fastest rounds (the least disturbed by other load on the machine), and the median
CPU seconds of the process per step (all threads).
"""

import statistics
import sys
import time

import jax
import jax.random as jr
from jax.interpreters import mlir

from benchmarks.models import Config, gpt_task, mlp_task
from benchmarks.run import build
from benchmarks.timing import Variant
from quaxlora._rules import _contract


def _lowering(pinned: bool):
    impl = _contract._impl_cpu if pinned else _contract._impl
    rule = mlir.lower_fun(impl, multiple_results=False)
    mlir.register_lowering(_contract.contract_p, rule, platform="cpu")


def main(which: str = "mlp", rounds: int = 21):
    cfg = Config()
    task = (mlp_task if which == "mlp" else gpt_task)(cfg, jr.key(0))
    b = build(task, jr.key(1), extras=False).train
    steps = {"full": b["full"], "floor": b["floor"]}
    for name, pinned in (("lora, XLA's folding", False), ("lora", True)):
        _lowering(pinned)
        jax.clear_caches()  # a fresh trace and lowering
        v = b["quaxlora"]
        steps[name] = Variant(v.make, v.args, v.donate, v.stateful)
        steps[name].compile()
    _lowering(True)
    steps["full"].compile()
    steps["floor"].compile()
    for name, v in steps.items():
        c = v.compiled.cost_analysis()
        c = c[0] if isinstance(c, list) else c
        temp = v.compiled.memory_analysis().temp_size_in_bytes
        print(
            f"{name:20s} GFLOP {c['flops'] / 1e9:7.3f}  bytes accessed "
            f"{c.get('bytes accessed', 0) / 2**20:7.1f} MiB  temporaries "
            f"{temp / 2**20:6.1f} MiB  total {v.cost()['bytes'] / 2**20:6.1f} MiB"
        )
    for v in steps.values():
        v.call()
    times = {n: [] for n in steps}
    cpu = {n: [] for n in steps}
    for _ in range(rounds):
        for n, v in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            v.call()
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    ratio = lambda n, m: statistics.median(a / b for a, b in zip(times[n], times[m]))
    for n in steps:
        print(
            f"{n:20s} {statistics.median(times[n]):.4f} s (fastest "
            f"{min(times[n]):.4f})  / full {ratio(n, 'full'):.3f}  / floor "
            f"{ratio(n, 'floor'):.3f}  fastest / fastest floor "
            f"{min(times[n]) / min(times['floor']):.3f}  CPU s "
            f"{statistics.median(cpu[n]):.4f} (/ floor "
            f"{statistics.median(cpu[n]) / statistics.median(cpu['floor']):.3f})"
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
