"""DoRA against LoRA, in quaxlora and in PEFT: the training step of both benchmark
models (`python -m benchmarks.run` runs this too; `--no-dora` skips it).

The two steps of each library are timed interleaved in one process, and the DoRA
step is reported as a ratio to the same library's LoRA step (the issue's target:
quaxlora's DoRA step at most 1.15× its LoRA step; PEFT's measured 1.26×). XLA's
FLOP and memory counts come from the compiled steps and are deterministic.
"""

import copy

import optax

import quaxlora as ql
from benchmarks import models, steps, timing
from benchmarks.models import RANK


def _lora_step(task, key, **kw):
    lora = ql.loraify(task.model, rank=task.rank, key=key, **task.lora, **kw)
    spec = ql.trainable_spec(lora)
    return steps.step_variant(task, lora, spec, optax.adam(1e-4), quaxified=True)


def run_model(task, cfg, key):
    """quaxlora's LoRA and DoRA training steps: seconds, ratio, XLA FLOPs, memory."""
    print(f"\n## {task.name}: DoRA vs LoRA", flush=True)
    variants = [_lora_step(task, key, use_dora=d) for d in (False, True)]
    for v in variants:
        v.compile()
    med, ratio = timing.time_interleaved(variants, cfg.reps)
    res = dict(
        lora_step=med[0],
        dora_step=med[1],
        dora_ratio=ratio[1],
        lora_cost=variants[0].cost(),
        dora_cost=variants[1].cost(),
    )
    print(res, flush=True)
    return res


def run_peft(cfg, rank, peft, torch):
    """PEFT's LoRA and DoRA training steps on the same PyTorch models."""
    from benchmarks import torch_models

    torch.manual_seed(0)
    MLP, GPT = torch_models._models(torch)
    out = {}

    def bench(model, targets, x, loss_fn):
        def make(use_dora):
            config = peft.LoraConfig(
                r=rank,
                lora_alpha=rank,
                lora_dropout=0.0,
                target_modules=targets,
                use_dora=use_dora,
            )
            m = peft.get_peft_model(copy.deepcopy(model), config)
            return torch_models._step(m, lambda m: m(x), loss_fn, torch)

        (lora, dora), (_, ratio) = timing.interleaved(
            [make(False), make(True)], cfg.reps
        )
        return dict(lora_step=lora, dora_step=dora, dora_ratio=ratio)

    mlp = MLP(cfg.mlp_width, cfg.mlp_depth)
    x = torch.randn(cfg.mlp_batch, cfg.mlp_width)
    y = torch.randn(cfg.mlp_batch, cfg.mlp_width)
    names = [f"layers.{i}" for i in range(cfg.mlp_depth)]
    out["mlp"] = bench(mlp, names, x, lambda p: ((p - y) ** 2).mean())
    print("peft mlp", out["mlp"], flush=True)
    gpt = GPT(cfg.vocab, cfg.d_model, cfg.heads, cfg.blocks)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def ce(logits):
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, cfg.vocab), y.reshape(-1)
        )

    out["gpt"] = bench(gpt, ["q", "k", "v", "o", "fc1", "fc2"], x, ce)
    print("peft gpt", out["gpt"], flush=True)
    return out


def run_all(cfg, key, *, with_peft: bool):
    res = {
        "mlp": run_model(models.mlp_task(cfg, key), cfg, key),
        "gpt": run_model(models.gpt_task(cfg, key), cfg, key),
        "peft": None,
    }
    if with_peft:
        try:
            import peft
            import torch
        except ImportError:
            return res
        res["peft"] = run_peft(cfg, RANK, peft, torch)
    return res


def fmt_table(res) -> str:
    lines = [
        "| model | DoRA vs LoRA | quaxlora | PEFT |",
        "|---|---|---|---|",
    ]
    for name in ("mlp", "gpt"):
        r, p = res[name], (res.get("peft") or {}).get(name)
        lines.append(
            f"| {name} | train step, s: LoRA / DoRA (DoRA ÷ LoRA) | "
            f"{r['lora_step']:.4f} / {r['dora_step']:.4f} ({r['dora_ratio']:.3f}×) | "
            + (
                f"{p['lora_step']:.4f} / {p['dora_step']:.4f} "
                f"({p['dora_ratio']:.3f}×) |"
                if p
                else "— |"
            )
        )
        fl, fd = r["lora_cost"]["flops"], r["dora_cost"]["flops"]
        bl, bd = r["lora_cost"]["bytes"], r["dora_cost"]["bytes"]
        lines.append(
            f"| {name} | XLA GFLOP / MiB per step: LoRA → DoRA | "
            f"{fl / 1e9:.2f} → {fd / 1e9:.2f}; {bl / 2**20:.1f} → {bd / 2**20:.1f} "
            "| — |"
        )
    return "\n".join(lines)
