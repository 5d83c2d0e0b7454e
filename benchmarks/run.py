"""quaxlora benchmarks: LoRA vs full fine-tuning, inference, trace/compile times.

Run from the repository root:

    python -m benchmarks.run            # the full suite (≈ 10 minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # small models, a smoke test (< 1 minute)

Three models (`benchmarks/models.py`): an MLP, a GPT-style transformer, and the
all-MiniLM-L6-v2 fine-tune of `examples/bert/`. Everything is measured in one
process; wall-clock figures are medians of repetitions interleaved between the
variants compared (`benchmarks/timing.py`), and every ratio is taken against a
figure from the same round. XLA FLOP counts and memory come from XLA's own
`cost_analysis()` / `memory_analysis()` and are deterministic. Results are printed as
a markdown table and written to `--out` (`results.md`, `results.json`, `results.png`,
by `benchmarks/report.py`).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import equinox as eqx
import jax.random as jr
import optax


if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import quaxlora as ql  # noqa: E402
from benchmarks import flops, report, steps, timing  # noqa: E402
from benchmarks.models import Config, gpt_task, minilm_task, mlp_task, QUICK  # noqa: E402


@dataclasses.dataclass
class Suite:
    """The compiled variants of one task, and the models they came from."""

    train: dict  # label -> training step `Variant`; "full" first
    infer: dict  # label -> inference `Variant`; "base" first
    lora: eqx.Module
    qlora: eqx.Module | None


def build(task, key, *, extras: bool) -> Suite:
    """Full fine-tuning, quaxlora's LoRA and the frozen floor; with `extras`, also
    QLoRA and quax's example."""
    kl, kq = jr.split(key)
    opt = optax.adam(1e-4)
    model = task.model
    lora = ql.loraify(model, rank=task.rank, key=kl, **task.lora)

    def train(m, spec, quaxified=True):
        return steps.step_variant(task, m, spec, opt, quaxified=quaxified)

    def infer(m, quaxified=True):
        return steps.infer_variant(task, m, quaxified=quaxified)

    suite = Suite(
        train=dict(
            full=train(model, eqx.is_array, quaxified=False),
            quaxlora=train(lora, ql.trainable_spec(lora)),
            floor=train(model, steps.first_bias_spec(model), quaxified=False),
        ),
        infer=dict(
            base=infer(model, quaxified=False),
            unmerged=infer(lora),
            merged=infer(ql.merge(lora), quaxified=False),
        ),
        lora=lora,
        qlora=None,
    )
    if extras:
        # QLoRA: the same adapters over an NF4 base (every linear and embedding)
        suite.qlora = qlora = ql.quantise(lora, "nf4")
        suite.train["qlora"] = train(qlora, ql.trainable_spec(qlora))
        example = steps.quax_example_loraify(model, lora, task.rank, kq)
        suite.train["quax_example"] = train(example, steps.quax_example_spec(example))
        suite.infer["quax_example"] = infer(example)
    return suite


def run_model(task, cfg, key) -> dict:
    print(f"\n## {task.name}", flush=True)
    suite = build(task, key, extras=task.name in cfg.extras)
    for v in (*suite.train.values(), *suite.infer.values()):
        v.compile()
    adapted = dict(lora=suite.lora, qlora=suite.qlora)
    res = dict(
        frozen_bytes={k: ql.stored_bytes(m) for k, m in adapted.items() if m},
        analytic_flops_full=flops.analytic_matmul_flops(task, suite.lora, lora=False),
        analytic_flops_lora=flops.analytic_matmul_flops(task, suite.lora, lora=True),
    )
    for kind, variants in (("step", suite.train), ("infer", suite.infer)):
        for label, v in variants.items():
            res[f"{kind}_{label}"] = v.cost()
        med, ratio = timing.time_interleaved(list(variants.values()), cfg.reps)
        res[f"{kind}_time"] = dict(zip(variants, med))
        res[f"{kind}_ratio"] = dict(zip(variants, ratio))
    # Building the step, LoRA against full fine-tuning: fresh traces, interleaved.
    pair = [suite.train["full"], suite.train["quaxlora"]]
    builds = timing.time_build(
        pair, cfg.trace_reps, cfg.compile_reps, fresh=cfg.fresh_builds
    )
    for stage, (med, ratio) in builds.items():
        res[f"{stage}_time"] = dict(full=med[0], quaxlora=med[1], ratio=ratio[1])
    print(json.dumps(res, indent=1, default=float), flush=True)
    return res


def run_scan(cfg, key) -> dict:
    """Trace, lower and compile time of the scan-stacked GPT's LoRA step, by depth."""
    print("\n## scan-stacked GPT: compile time vs depth", flush=True)
    out = {}
    for depth in cfg.scan_depths:
        task = gpt_task(cfg, key, blocks=depth, scan=True)
        lora = ql.loraify(task.model, rank=task.rank, key=key, **task.lora)
        v = steps.step_variant(
            task, lora, ql.trainable_spec(lora), optax.adam(1e-4), quaxified=True
        )
        out[depth] = dict(quaxlora=timing.time_trace_compile(v.make, v.args))
        print(depth, out[depth], flush=True)
    return out


def run_peft(cfg, tasks) -> dict | None:
    try:
        import peft
        import torch
    except ImportError:
        return None
    from benchmarks import torch_models

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("\n## PyTorch: PEFT LoRA, full fine-tuning, frozen floor", flush=True)
    return torch_models.run(cfg, tasks, peft, torch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, < 1 min")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--no-peft", action="store_true", help="skip PyTorch/PEFT")
    parser.add_argument("--no-scan", action="store_true", help="skip 6 vs 24 blocks")
    parser.add_argument(
        "--multi-adapter",
        action="store_true",
        help="also 8 adapters in one batch (benchmarks/multi_adapter.py)",
    )
    parser.add_argument("--no-dora", action="store_true", help="skip DoRA vs LoRA")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    key = jr.key(0)
    t0 = time.perf_counter()
    results = dict(machine=report.machine(), config=dataclasses.asdict(cfg))
    tasks = [mlp_task(cfg, key), gpt_task(cfg, key), minilm_task(cfg, key)]
    for task in tasks:
        results[task.name] = run_model(task, cfg, key)
    results["scan"] = {} if args.no_scan else run_scan(cfg, key)
    if args.multi_adapter:
        from benchmarks import multi_adapter

        results["multi_adapter"] = multi_adapter.run(cfg, key)
    results["peft"] = None if args.no_peft else run_peft(cfg, tasks)
    if not args.no_dora:
        from benchmarks import dora

        results["dora"] = dora.run_all(cfg, key, with_peft=not args.no_peft)
    report.write(results, pathlib.Path(args.out))
    print(f"\nwritten to {args.out}/ in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
