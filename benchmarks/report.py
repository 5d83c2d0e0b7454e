"""Reporting: the results as a markdown table, a plot and JSON, and the machine."""

import json
import os
import platform

import jax
import numpy as np


MODELS = ("mlp", "gpt", "minilm")


def _s(seconds, ratio=None):
    return f"{seconds:.4f}" + ("" if ratio is None else f" ({ratio:.3f}×)")


def _gflop(r, key):
    return r[key]["flops"] / 1e9


def _mib(r, key):
    return r[key]["bytes"] / 2**20


def _vs(r, key, of, fmt):
    """`r[key]`'s XLA figure, formatted by `fmt`, with its ratio to `of`'s."""
    value = fmt(r, key)
    return f"{value:.2f} ({value / fmt(r, of):.3f}×)"


def _build(r, stage, who):
    t = r[f"{stage}_time"]
    return f"{t[who]:.3f}" + (f" ({t['ratio']:.2f}×)" if who == "quaxlora" else "")


# Each row: the figure, then a cell per column (full FT / base, quaxlora, quax's
# example, PEFT) as a function of the model's results `r` and PyTorch's `p` (or
# None); a cell that is None prints as "—".
ROWS = [
    (
        "train step, s (ratio to full FT; PEFT: of PyTorch full FT, s)",
        lambda r, p: _s(r["step_time"]["full"]),
        lambda r, p: _s(r["step_time"]["quaxlora"], r["step_ratio"]["quaxlora"]),
        lambda r, p: _s(
            r["step_time"]["quax_example"], r["step_ratio"]["quax_example"]
        ),
        lambda r, p: (
            p and f"{_s(p['lora_step'], p['lora_ratio'])} of {p['full_step']:.4f}"
        ),
    ),
    (
        "frozen floor (no weight gradient, no adapter): step, s (ratio to full FT); "
        "LoRA step ÷ floor",
        lambda r, p: _s(r["step_time"]["floor"], r["step_ratio"]["floor"]),
        lambda r, p: f"{r['step_ratio']['quaxlora'] / r['step_ratio']['floor']:.3f}×",
        lambda r, p: (
            f"{r['step_ratio']['quax_example'] / r['step_ratio']['floor']:.3f}×"
        ),
        lambda r, p: (
            p
            and f"{_s(p['floor_step'], p['floor_ratio'])}; "
            f"{p['lora_ratio'] / p['floor_ratio']:.3f}×"
        ),
    ),
    (
        "QLoRA (NF4 base): step, s (ratio to LoRA); XLA MiB (ratio to LoRA); "
        "frozen base MiB (LoRA's)",
        None,
        lambda r, p: (
            f"{_s(r['step_time']['qlora'])} "
            f"({r['step_ratio']['qlora'] / r['step_ratio']['quaxlora']:.3f}×); "
            f"{_vs(r, 'step_qlora', 'step_quaxlora', _mib)}; "
            f"{r['frozen_bytes']['qlora'] / 2**20:.1f} "
            f"({r['frozen_bytes']['lora'] / 2**20:.1f})"
        ),
        None,
        None,
    ),
    (
        "inference unmerged, s (ratio to base)",
        lambda r, p: _s(r["infer_time"]["base"]),
        lambda r, p: _s(r["infer_time"]["unmerged"], r["infer_ratio"]["unmerged"]),
        lambda r, p: _s(
            r["infer_time"]["quax_example"], r["infer_ratio"]["quax_example"]
        ),
        lambda r, p: p and _s(p["lora_infer"], p["infer_ratio"]),
    ),
    (
        "inference merged, s (ratio to base)",
        lambda r, p: _s(r["infer_time"]["base"]),
        lambda r, p: _s(r["infer_time"]["merged"], r["infer_ratio"]["merged"]),
        None,
        None,
    ),
    (
        "XLA GFLOP per step (ratio to full FT); floor",
        lambda r, p: (
            f"{_gflop(r, 'step_full'):.2f}; "
            f"floor {_vs(r, 'step_floor', 'step_full', _gflop)}"
        ),
        lambda r, p: _vs(r, "step_quaxlora", "step_full", _gflop),
        lambda r, p: _vs(r, "step_quax_example", "step_full", _gflop),
        None,
    ),
    (
        "analytic matmul GFLOP (XLA ÷ analytic)",
        lambda r, p: (
            f"{r['analytic_flops_full'] / 1e9:.2f} "
            f"({r['step_full']['flops'] / r['analytic_flops_full']:.4f})"
        ),
        lambda r, p: (
            f"{r['analytic_flops_lora'] / 1e9:.2f} "
            f"({r['step_quaxlora']['flops'] / r['analytic_flops_lora']:.4f})"
        ),
        None,
        None,
    ),
    (
        "XLA memory per step, MiB (ratio to full FT)",
        lambda r, p: f"{_mib(r, 'step_full'):.1f}",
        lambda r, p: _vs(r, "step_quaxlora", "step_full", _mib),
        lambda r, p: _vs(r, "step_quax_example", "step_full", _mib),
        None,
    ),
    (
        "inference GFLOP: base; unmerged / merged",
        lambda r, p: f"{_gflop(r, 'infer_base'):.3f}",
        lambda r, p: (
            f"{_gflop(r, 'infer_unmerged'):.3f} / {_gflop(r, 'infer_merged'):.3f}"
        ),
        None,
        None,
    ),
    *(
        (
            f"step {phase}, s (ratio to full FT)",
            lambda r, p, phase=phase: _build(r, phase, "full"),
            lambda r, p, phase=phase: _build(r, phase, "quaxlora"),
            None,
            None,
        )
        for phase in ("trace", "compile", "lower")
    ),
]


def _cell(fn, r, p) -> str:
    try:
        return (fn and fn(r, p)) or "—"
    except KeyError:  # not measured for this model (QLoRA, quax's example)
        return "—"


def fmt_table(results) -> str:
    lines = [
        "| model | figure | full FT / base | quaxlora | quax example | PEFT |",
        "|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        r, p = results[name], (results.get("peft") or {}).get(name)
        for figure, *cells in ROWS:
            texts = [_cell(c, r, p) for c in cells]
            lines.append(f"| {name} | {figure} | " + " | ".join(texts) + " |")
    for depth, d in results["scan"].items():
        t, l, c, hlo = d["quaxlora"]
        lines.append(
            f"| gpt scan, {depth} blocks | LoRA step trace / lower / compile, s "
            f"(HLO lines) | — | {t:.2f} / {l:.2f} / {c:.2f} ({hlo}) | — | — |"
        )
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(15, 4))
    for ax, name in zip(axes, MODELS):
        r, p = results[name], (results.get("peft") or {}).get(name)
        labels = ["quaxlora"]
        step = [r["step_ratio"]["quaxlora"]]
        infer = [r["infer_ratio"]["unmerged"]]
        if "quax_example" in r["step_ratio"]:
            labels.append("quax example")
            step.append(r["step_ratio"]["quax_example"])
            infer.append(r["infer_ratio"]["quax_example"])
        if p:
            labels.append("PEFT")
            step.append(p["lora_ratio"])
            infer.append(p["infer_ratio"])
        xs = np.arange(len(labels))
        ax.bar(xs - 0.2, step, 0.4, label="LoRA step / full FT step")
        ax.bar(xs + 0.2, infer, 0.4, label="unmerged inference / base")
        ax.axhline(1.0, color="k", lw=0.8)
        floors = [(r["step_ratio"]["floor"], "frozen floor (JAX)", "--")]
        if p:
            floors.append((p["floor_ratio"], "frozen floor (PyTorch)", ":"))
        floors.sort(reverse=True)  # the upper label above its line, the lower below
        for (y, text, ls), va in zip(floors, ("bottom", "top")):
            ax.axhline(y, color="tab:blue", lw=0.8, ls=ls)
            ax.text(xs[-1] + 0.45, y, text, va=va, ha="right", size=7)
        ax.set_xticks(xs, labels)
        ax.set_title(name.upper() if name != "minilm" else "all-MiniLM-L6-v2")
        ax.set_ylabel("time ratio (lower is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
        python=platform.python_version(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=str(jax.devices()),
    )


def write(results, out):
    """Print the tables; write `results.md`, `results.json` and `results.png`."""
    table = fmt_table(results)
    if "multi_adapter" in results:
        from benchmarks import multi_adapter

        table += "\n\n" + multi_adapter.fmt(results["multi_adapter"])
    if results.get("dora"):
        from benchmarks import dora

        table += "\n\n" + dora.fmt_table(results["dora"])
    print("\n" + table)
    results["machine"]["load_average_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / "results.png")
