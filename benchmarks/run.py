"""quaxlora benchmarks: LoRA vs full fine-tuning, inference, trace/compile times.

Run from the repository root:

    python -m benchmarks.run            # the full suite (< ~10 minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # small models, a smoke test (< 1 minute)

Everything is measured in one process; wall-clock figures are medians of repetitions
interleaved between the variants being compared, and every ratio is taken against a
figure from the same round. XLA FLOP counts and memory come from XLA's own
`cost_analysis()` / `memory_analysis()` and are deterministic. Results are printed as
a markdown table and written to `--out` (`results.md`, `results.json`, `results.png`).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax
import quax.examples.lora as quax_lora

import quaxlora as ql


if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.models import GPT, MLP  # noqa: E402


RANK = 16


@dataclasses.dataclass
class Config:
    mlp_width: int = 1024
    mlp_depth: int = 8
    mlp_batch: int = 512
    d_model: int = 512
    heads: int = 8
    blocks: int = 6
    seq: int = 128
    batch: int = 8
    vocab: int = 2048
    scan_depths: tuple = (6, 24)
    reps: int = 15
    trace_reps: int = 7


QUICK = Config(128, 3, 64, 64, 2, 1, 16, 2, 128, (), 3, 3)


# ----------------------------------------------------------------------------- setup


def mlp_task(cfg, key):
    km, kx, ky = jr.split(key, 3)
    model = MLP(cfg.mlp_width, cfg.mlp_depth, key=km)
    x = jr.normal(kx, (cfg.mlp_batch, cfg.mlp_width))
    y = jr.normal(ky, (cfg.mlp_batch, cfg.mlp_width))

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    return model, (x, y), loss, None, dict(no_dx_full=1, no_dx_lora=1, attention=0)


def gpt_task(cfg, key, *, blocks=None, scan=False):
    km, kt = jr.split(key)
    depth = cfg.blocks if blocks is None else blocks
    model = GPT(cfg.vocab, cfg.d_model, cfg.heads, depth, scan=scan, key=km)
    tokens = jr.randint(kt, (cfg.batch, cfg.seq + 1), 0, cfg.vocab)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # attention products QKᵀ and AV: 4·s²·d per sequence and block forward, twice
    # that backward; block 0's q, k, v read the frozen embedding (no dx under LoRA).
    attention = 12 * cfg.batch * cfg.seq**2 * cfg.d_model * depth
    extra = dict(no_dx_full=0, no_dx_lora=3, attention=attention)
    return model, (x, y), loss, "head", extra


def _quax_is_lora(x):
    return isinstance(x, quax_lora.LoraArray)


def quax_example_loraify(model, exclude, key):
    """quax's own `quax.examples.lora`, on the same targets (not the head)."""
    if exclude is None:
        return quax_lora.loraify(model, rank=RANK, key=key)
    return eqx.tree_at(
        lambda m: m.blocks,
        model,
        quax_lora.loraify(model.blocks, rank=RANK, key=key),
    )


def quax_example_partition(model):
    """The best case for quax's example: the user partitions out `a` and `b`."""

    def spec(x):
        if _quax_is_lora(x):
            s = jtu_map(lambda _: False, x)
            return eqx.tree_at(lambda l: (l.a, l.b), s, (True, True))
        return False

    return eqx.partition(model, jtu_map(spec, model, is_leaf=_quax_is_lora))


def jtu_map(f, tree, **kw):
    return jax.tree_util.tree_map(f, tree, **kw)


# ----------------------------------------------------------------------------- steps


def make_full_step(loss, static, opt):
    def step(params, opt_state, x, y):
        model = eqx.combine(params, static)
        value, grads = eqx.filter_value_and_grad(lambda m: loss(m, x, y))(model)
        grads = eqx.filter(grads, eqx.is_array)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def make_lora_step(loss, static, opt):
    def step(trainable, opt_state, frozen, x, y):
        def f(t):
            return quax.quaxify(loss)(eqx.combine(t, frozen, static), x, y)

        value, grads = jax.value_and_grad(f)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def make_floor_step(loss, static, opt):
    """The physical bar: the frozen model's forward and backward, with no weight
    gradient and no adapter. Only the first linear layer's bias trains, so the
    backward still runs through every layer."""

    def step(trainable, opt_state, frozen, x, y):
        def f(t):
            return loss(eqx.combine(t, frozen, static), x, y)

        value, grads = jax.value_and_grad(f)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def first_bias_spec(params):
    """Filter spec selecting the bias of the first `eqx.nn.Linear` of `params`."""
    is_linear = lambda x: isinstance(x, eqx.nn.Linear)

    def first_bias(tree):
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_linear)
        return next(l for l in leaves if is_linear(l)).bias

    return eqx.tree_at(first_bias, jtu_map(lambda _: False, params), True)


def make_infer(static, *, quaxified):
    def infer(params, x):
        model = eqx.combine(params, static)
        f = lambda m, x: jax.vmap(m)(x)
        return quax.quaxify(f)(model, x) if quaxified else f(model, x)

    return infer


@dataclasses.dataclass
class Variant:
    """One jitted function with its argument state; `call()` runs one repetition."""

    fn: object
    args: tuple
    donate: tuple = ()
    stateful: int = 0  # how many leading outputs feed back as the leading arguments

    def __post_init__(self):
        self.jit = jax.jit(self.fn, donate_argnums=self.donate)
        # donated arguments are copies: the originals are shared between variants
        self.state = tuple(
            jtu_map(jnp.copy, a) if i in self.donate else a
            for i, a in enumerate(self.args)
        )
        self.compiled = None

    def compile(self):
        """Trace, lower and compile; records the seconds each took."""
        t0 = time.perf_counter()
        traced = self.jit.trace(*self.args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        self.compiled = lowered.compile()
        self.times = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        return self.compiled

    def call(self):
        out = self.compiled(*self.state)
        if self.stateful:
            self.state = (*out[: self.stateful], *self.state[self.stateful :])
        jax.block_until_ready(out)

    def cost(self):
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


def time_interleaved(variants, reps):
    """Median seconds per call of each variant, the variants interleaved per round;
    also the per-round ratios to the first variant (median)."""
    for v in variants:
        v.call()  # warm-up
    times = [[] for _ in variants]
    for _ in range(reps):
        for i, v in enumerate(variants):
            t0 = time.perf_counter()
            v.call()
            times[i].append(time.perf_counter() - t0)
    med = [statistics.median(t) for t in times]
    ratios = [statistics.median([a / b for a, b in zip(t, times[0])]) for t in times]
    return med, ratios


def time_traces(makers, args, reps):
    """Median seconds to trace (to a jaxpr) a fresh copy of each function, the
    functions interleaved per round, and the median per-round ratio to the first."""
    times = [[] for _ in makers]
    for _ in range(reps):
        for i, (make, a) in enumerate(zip(makers, args)):
            jax.clear_caches()
            fn = make()
            t0 = time.perf_counter()
            jax.jit(fn).trace(*a)
            times[i].append(time.perf_counter() - t0)
    med = [statistics.median(t) for t in times]
    ratios = [statistics.median([a / b for a, b in zip(t, times[0])]) for t in times]
    return med, ratios


def time_trace_compile(make_fn, args):
    """Seconds to trace, lower and compile a fresh function, once, and the number of
    lines of its optimised HLO."""
    jax.clear_caches()
    fn = make_fn()
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    # The optimised HLO's size: deterministic, unlike the timings.
    return t1 - t0, t2 - t1, t3 - t2, len(compiled.as_text().splitlines())


# ----------------------------------------------------------------------------- analytic


def linear_shapes(model, exclude):
    """(in, out, adapted) of every `eqx.nn.Linear` in model order."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.Linear)
    ):
        if isinstance(leaf, eqx.nn.Linear):
            names = jax.tree_util.keystr(path)
            adapted = exclude is None or exclude not in names
            out.append((leaf.in_features, leaf.out_features, adapted))
    return out


def analytic_matmul_flops(shapes, tokens, rank, *, lora, no_dx=1, attention=0):
    """Matmul FLOPs of one training step (see docs/benchmarks.md): per linear layer
    of `n` rows, full FT `2n·d_in·d_out·(2 + δ)`, frozen-base LoRA
    `2n·(d_in·d_out·(1 + δ) + r·(3·d_out + (2 + δ)·d_in))`, δ = 1 where the layer's
    input needs a gradient (all but the first `no_dx` layers); unadapted layers
    count as trained (full) or frozen (LoRA); plus `attention` FLOPs of the
    attention products, the same in both."""
    total = attention
    for i, (din, dout, adapted) in enumerate(shapes):
        delta = 0 if i < no_dx else 1
        if not lora:
            total += 2 * tokens * din * dout * (2 + delta)
        elif adapted:
            total += (
                2
                * tokens
                * (din * dout * (1 + delta) + rank * (3 * dout + (2 + delta) * din))
            )
        else:
            total += 2 * tokens * din * dout * (1 + delta)
    return total


# ----------------------------------------------------------------------------- suites


def build(task, cfg, key):
    model, (x, y), loss, exclude, extra = task
    kl, kq = jr.split(key)
    opt = optax.adam(1e-4)
    # full fine-tuning
    params, static = eqx.partition(model, eqx.is_array)
    full = Variant(
        make_full_step(loss, static, opt), (params, opt.init(params), x, y), (0, 1), 2
    )
    # quaxlora
    lora = ql.loraify(model, rank=RANK, key=kl, exclude=exclude)
    arrays, lstatic = eqx.partition(lora, eqx.is_array)
    trainable, frozen = eqx.partition(arrays, ql.trainable_spec(lora))
    ql_step = Variant(
        make_lora_step(loss, lstatic, opt),
        (trainable, opt.init(trainable), frozen, x, y),
        (0, 1),
        2,
    )
    # QLoRA: the same adapters over an NF4 base (every linear and embedding)
    qlora = ql.quantise(lora, "nf4")
    qltrain, qlrest = ql.partition(qlora)
    qlfrozen, qlstatic = eqx.partition(qlrest, eqx.is_array)
    qlora_step = Variant(
        make_lora_step(loss, qlstatic, opt),
        (qltrain, opt.init(qltrain), qlfrozen, x, y),
        (0, 1),
        2,
    )
    # quax's own example
    qmodel = quax_example_loraify(model, exclude, kq)
    qarrays, qstatic = eqx.partition(qmodel, eqx.is_array)
    qtrain, qfrozen = quax_example_partition(qarrays)
    qx_step = Variant(
        make_lora_step(loss, qstatic, opt),
        (qtrain, opt.init(qtrain), qfrozen, x, y),
        (0, 1),
        2,
    )
    # the frozen floor
    ftrain, ffrozen = eqx.partition(params, first_bias_spec(params))
    floor = Variant(
        make_floor_step(loss, static, opt),
        (ftrain, opt.init(ftrain), ffrozen, x, y),
        (0, 1),
        2,
    )
    # inference: base, unmerged, merged, quax example
    merged = ql.merge(lora)
    mparams, mstatic = eqx.partition(merged, eqx.is_array)
    infer = [
        Variant(make_infer(static, quaxified=False), (params, x)),
        Variant(make_infer(lstatic, quaxified=True), (arrays, x)),
        Variant(make_infer(mstatic, quaxified=False), (mparams, x)),
        Variant(make_infer(qstatic, quaxified=True), (qarrays, x)),
    ]
    return dict(
        full=full,
        ql=ql_step,
        qx=qx_step,
        floor=floor,
        qlora=qlora_step,
        frozen_bytes=dict(lora=ql.stored_bytes(lora), qlora=ql.stored_bytes(qlora)),
        infer=infer,
        shapes=linear_shapes(model, exclude),
        extra=extra,
        tokens=x.shape[0] if jnp.issubdtype(x.dtype, jnp.floating) else x.size,
        loss=loss,
        static=(static, lstatic),
        trace_args=(
            (params, opt.init(params), x, y),
            (trainable, opt.init(trainable), frozen, x, y),
        ),
        opt=opt,
    )


def run_model(name, task, cfg, key):
    print(f"\n## {name}", flush=True)
    b = build(task, cfg, key)
    steps = [b["full"], b["ql"], b["qx"], b["floor"], b["qlora"]]
    names = ("full", "quaxlora", "quax_example", "floor", "qlora")
    for v in steps + b["infer"]:
        v.compile()
    res = dict(frozen_bytes=b["frozen_bytes"])
    for label, v in zip(names, steps):
        res[f"step_{label}"] = v.cost()
    for label, v in zip(("base", "unmerged", "merged", "quax_example"), b["infer"]):
        res[f"infer_{label}"] = v.cost()
    sh, n, ex = b["shapes"], b["tokens"], b["extra"]
    res["analytic_flops_full"] = analytic_matmul_flops(
        sh, n, RANK, lora=False, no_dx=ex["no_dx_full"], attention=ex["attention"]
    )
    res["analytic_flops_lora"] = analytic_matmul_flops(
        sh, n, RANK, lora=True, no_dx=ex["no_dx_lora"], attention=ex["attention"]
    )
    med, ratio = time_interleaved(steps, cfg.reps)
    res["step_time"] = dict(zip(names, med))
    res["step_ratio"] = dict(zip(names, ratio))
    med, ratio = time_interleaved(b["infer"], cfg.reps)
    keys = ("base", "unmerged", "merged", "quax_example")
    res["infer_time"] = dict(zip(keys, med))
    res["infer_ratio"] = dict(zip(keys, ratio))
    # trace / lower / compile of the training step
    loss, opt = b["loss"], b["opt"]
    static, lstatic = b["static"]
    fa, la = b["trace_args"]
    mk_full = lambda: make_full_step(loss, static, opt)
    mk_lora = lambda: make_lora_step(loss, lstatic, opt)
    res["trace_compile"] = dict(full=b["full"].times, quaxlora=b["ql"].times)
    med, ratio = time_traces([mk_full, mk_lora], [fa, la], cfg.trace_reps)
    res["trace_time"] = dict(full=med[0], quaxlora=med[1], ratio=ratio[1])
    print(json.dumps(res, indent=1, default=float), flush=True)
    return res


def run_scan(cfg, key):
    """Compile time of the scan-stacked GPT's LoRA step at two depths."""
    print("\n## scan-stacked GPT: compile time vs depth", flush=True)
    out = {}
    for depth in cfg.scan_depths:
        model, (x, y), loss, exclude, _ = gpt_task(cfg, key, blocks=depth, scan=True)
        opt = optax.adam(1e-4)
        lora = ql.loraify(model, rank=RANK, key=key, exclude=exclude)
        arrays, lstatic = eqx.partition(lora, eqx.is_array)
        trainable, frozen = eqx.partition(arrays, ql.trainable_spec(lora))
        args = (trainable, opt.init(trainable), frozen, x, y)
        t = time_trace_compile(lambda: make_lora_step(loss, lstatic, opt), args)
        out[depth] = dict(quaxlora=t)
        print(depth, out[depth], flush=True)
    return out


# ----------------------------------------------------------------------------- PEFT


def run_peft(cfg):
    try:
        import peft
        import torch
    except ImportError:
        return None
    from benchmarks import torch_models

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print("\n## PEFT (PyTorch)", flush=True)
    return torch_models.run(cfg, RANK, peft, torch)


# ----------------------------------------------------------------------------- report


def fmt_table(results, cfg):
    lines = [
        "| model | figure | full FT / base | quaxlora | quax example | PEFT |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("mlp", "gpt"):
        r = results[name]
        p = (results.get("peft") or {}).get(name, {})
        st, sr = r["step_time"], r["step_ratio"]
        lines.append(
            f"| {name} | train step, s (ratio to full) | {st['full']:.4f} | "
            f"{st['quaxlora']:.4f} ({sr['quaxlora']:.3f}×) | "
            f"{st['quax_example']:.4f} ({sr['quax_example']:.3f}×) | "
            + (f"{p['lora_step']:.4f} ({p['step_ratio']:.3f}×) |" if p else "— |")
        )
        ffl = r["step_floor"]["flops"]
        lines.append(
            f"| {name} | frozen floor (no weight gradient, no adapter): step, s "
            f"(ratio to full); GFLOP | {st['floor']:.4f} ({sr['floor']:.3f}×); "
            f"{ffl / 1e9:.2f} | quaxlora ÷ floor: "
            f"{st['quaxlora'] / st['floor']:.3f}× | — | — |"
        )
        if "qlora" in st:
            bl, bq, bf = (
                r[f"step_{k}"]["bytes"] for k in ("quaxlora", "qlora", "full")
            )
            fb = r["frozen_bytes"]
            lines.append(
                f"| {name} | QLoRA (NF4 base): step, s (ratio to LoRA); XLA memory, "
                f"MiB (ratio to LoRA, to full); frozen base, MiB | — | "
                f"{st['qlora']:.4f} ({sr['qlora'] / sr['quaxlora']:.3f}×); "
                f"{bq / 2**20:.1f} ({bq / bl:.3f}×, {bq / bf:.3f}×); "
                f"{fb['qlora'] / 2**20:.1f} (LoRA: {fb['lora'] / 2**20:.1f}) | — | — |"
            )
        it, ir = r["infer_time"], r["infer_ratio"]
        lines.append(
            f"| {name} | inference unmerged, s (ratio to base) | {it['base']:.4f} | "
            f"{it['unmerged']:.4f} ({ir['unmerged']:.3f}×) | "
            f"{it['quax_example']:.4f} ({ir['quax_example']:.3f}×) | "
            + (f"{p['lora_infer']:.4f} ({p['infer_ratio']:.3f}×) |" if p else "— |")
        )
        lines.append(
            f"| {name} | inference merged, s (ratio to base) | {it['base']:.4f} | "
            f"{it['merged']:.4f} ({ir['merged']:.3f}×) | — | — |"
        )
        ff, fl = r["step_full"]["flops"], r["step_quaxlora"]["flops"]
        fq = r["step_quax_example"]["flops"]
        lines.append(
            f"| {name} | XLA GFLOP per step (ratio) | {ff / 1e9:.2f} | "
            f"{fl / 1e9:.2f} ({fl / ff:.3f}×) | {fq / 1e9:.2f} ({fq / ff:.3f}×) | — |"
        )
        al = r["analytic_flops_lora"]
        lines.append(
            f"| {name} | analytic matmul GFLOP (LoRA: XLA / analytic) | "
            f"{r['analytic_flops_full'] / 1e9:.2f} | {al / 1e9:.2f} ({fl / al:.4f}) "
            "| — | — |"
        )
        bf, bl = r["step_full"]["bytes"], r["step_quaxlora"]["bytes"]
        bq = r["step_quax_example"]["bytes"]
        lines.append(
            f"| {name} | XLA memory per step, MiB (ratio) | {bf / 2**20:.1f} | "
            f"{bl / 2**20:.1f} ({bl / bf:.3f}×) | {bq / 2**20:.1f} ({bq / bf:.3f}×) "
            "| — |"
        )
        fi = [r[f"infer_{k}"]["flops"] for k in ("base", "unmerged", "merged")]
        lines.append(
            f"| {name} | inference GFLOP: base / unmerged / merged | "
            f"{fi[0] / 1e9:.3f} | {fi[1] / 1e9:.3f} / {fi[2] / 1e9:.3f} | — | — |"
        )
        tf, tl = r["trace_compile"]["full"], r["trace_compile"]["quaxlora"]
        lines.append(
            f"| {name} | step trace / lower / compile, s | "
            f"{tf[0]:.2f} / {tf[1]:.2f} / {tf[2]:.2f} | "
            f"{tl[0]:.2f} / {tl[1]:.2f} / {tl[2]:.2f} | — | — |"
        )
        tt = r["trace_time"]
        lines.append(
            f"| {name} | step trace only, s (median, interleaved) | {tt['full']:.3f} | "
            f"{tt['quaxlora']:.3f} ({tt['ratio']:.2f}×) | — | — |"
        )
    for depth, d in results["scan"].items():
        tl = d["quaxlora"]
        lines.append(
            f"| gpt scan, {depth} blocks | LoRA step trace / lower / compile, s "
            f"(HLO lines) | — | {tl[0]:.2f} / {tl[1]:.2f} / {tl[2]:.2f} ({tl[3]}) "
            "| — | — |"
        )
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("mlp", "gpt")):
        r, p = results[name], (results.get("peft") or {}).get(name)
        labels = ["quaxlora", "quax example"] + (["PEFT"] if p else [])
        step = [r["step_ratio"]["quaxlora"], r["step_ratio"]["quax_example"]]
        infer = [r["infer_ratio"]["unmerged"], r["infer_ratio"]["quax_example"]]
        if p:
            step.append(p["step_ratio"])
            infer.append(p["infer_ratio"])
        xs = np.arange(len(labels))
        ax.bar(xs - 0.2, step, 0.4, label="LoRA step / full FT step")
        ax.bar(xs + 0.2, infer, 0.4, label="unmerged inference / base")
        ax.axhline(1.0, color="k", lw=0.8)
        floor = r["step_ratio"]["floor"]
        ax.axhline(floor, color="tab:blue", lw=0.8, ls="--")
        ax.text(xs[-1] + 0.45, floor, "frozen floor", va="bottom", ha="right", size=7)
        ax.set_xticks(xs, labels)
        ax.set_title(name.upper())
        ax.set_ylabel("time ratio (lower is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine():
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=str(jax.devices()),
    )


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
    results = dict(machine=machine(), config=dataclasses.asdict(cfg))
    results["mlp"] = run_model("MLP", mlp_task(cfg, key), cfg, key)
    results["gpt"] = run_model("GPT", gpt_task(cfg, key), cfg, key)
    results["scan"] = {} if args.no_scan else run_scan(cfg, key)
    if args.multi_adapter:
        from benchmarks import multi_adapter

        results["multi_adapter"] = multi_adapter.run(cfg, key)
    results["peft"] = None if args.no_peft else run_peft(cfg)
    if not args.no_dora:
        from benchmarks import dora

        results["dora"] = dora.run_all(
            sys.modules[__name__], cfg, key, with_peft=not args.no_peft
        )
    table = fmt_table(results, cfg)
    if "multi_adapter" in results:
        from benchmarks import multi_adapter

        table += "\n\n" + multi_adapter.fmt(results["multi_adapter"])
    if results.get("dora"):
        table += "\n\n" + dora.fmt_table(results["dora"])
    print("\n" + table)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / "results.png")
    print(f"\nwritten to {out}/ in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
