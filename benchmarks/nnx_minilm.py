"""all-MiniLM-L6-v2 in Equinox (`examples/bert/minilm.py`) against the same model in
Flax NNX: the frozen-floor training step and full fine-tuning, timed interleaved in
one process.

Both models have the same shapes and the same (pretrained) weights, copied from the
Equinox model into the NNX one, and the same loss: the symmetric InfoNCE of
`examples/bert/finetune.py` (scale 20) over the benchmark's MiniLM batch of
32 sequences x 64 tokens (`benchmarks.models.minilm_task`). The NNX model is written
the idiomatic NNX way: batched `nnx.Embed`, `nnx.Linear` (kernel `(in, out)`),
`nnx.LayerNorm` (its default fast variance), attention through
`jax.nn.dot_product_attention` (as the Equinox model) on `(batch, seq, heads, dim)`,
exact erf GELU, post-LN, mean pooling over the mask, unit-norm embeddings.

Steps (Adam, lr 1e-4, as `benchmarks/run.py`):

- `eqx floor` / `eqx full`: exactly the benchmark's steps (`benchmarks.steps.
  step_variant`, `jax.jit` with the trainable arrays and optimiser state donated):
  the floor trains only `first_bias_spec`'s parameter, the bias of
  `layers[0].attention.query_proj` (384 numbers), so the backward runs through
  every layer but computes no weight gradient; full trains every array.
- `nnx floor` / `nnx full`: the same, NNX-style: `nnx.split(model, wrt, ...)` into
  the trainable `nnx.State` and the rest, `jax.value_and_grad` of the loss of
  `nnx.merge(...)`, optax Adam on the trainable state, `jax.jit` with the same
  donation. `wrt` selects `layers[0].query.bias` (floor) or `nnx.Param` (full).
- `nnx.jit floor` / `nnx.jit full`: the NNX tutorial way: `nnx.Optimizer(model, tx,
  wrt=...)`, `nnx.value_and_grad(..., argnums=nnx.DiffState(0, wrt))`,
  `optimizer.update(model, grads)` inside `nnx.jit` (Python graph traversal on
  every call, no donation).
- `eqx floor LN*` / `eqx full LN*` (diagnostic; `--no-ln-fold` skips them): the
  Equinox steps traced with `minilm._layer_norm` computing as `eqx.nn.LayerNorm`
  does, `weight * normalised + bias` (`unfolded_layer_norm`), where `minilm.py` folds
  the scale into the normaliser as `nnx.LayerNorm` does. Unfolded, XLA's CPU fusion
  recomputes the chain of layer-norm backwards in ever larger loop fusions (up to
  223 instructions, 5469 in all, vs 1582 for NNX): ~1.4 GFLOP more per floor step,
  which took 1.07x as long.

Prints XLA's `cost_analysis()` GFLOP of each `jax.jit` step with a summary of its
optimised HLO (loop/custom fusions, instructions in the loop-fusion bodies), the
median wall and process-CPU seconds per step over `--rounds` interleaved rounds (each
calls every step once, after a warm-up call each), the medians of the per-round
ratios, and the load average before and after; with `--hlo DIR`, writes the
optimised HLO of the `jax.jit` steps there. Keep the machine otherwise idle.

Run with flax installed, e.g. in a venv layered over the main one (flax 0.12.8
works with jax 0.10.2):

    python3.11 -m venv /work/venvs/nnx
    # a .pth file in its site-packages holding the main venv's site-packages path
    echo /work/main/.venv/lib/python3.11/site-packages > $SITE/zz_main_venv.pth
    /work/venvs/nnx/bin/pip install --no-deps flax==0.12.8 msgpack treescope
    /work/venvs/nnx/bin/python -m benchmarks.nnx_minilm [--rounds 11] [--hlo DIR]
"""

import argparse
import contextlib
import os
import pathlib
import re
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import models, steps
from benchmarks.timing import Variant


SCALE = 20.0  # finetune.py's contrastive scale
LR = 1e-4  # benchmarks/run.py's Adam


# --- the model in Flax NNX -----------------------------------------------------------


class Embeddings(nnx.Module):
    def __init__(self, vocab, positions, types, dim, eps, *, rngs):
        self.word_embeddings = nnx.Embed(vocab, dim, rngs=rngs)
        self.position_embeddings = nnx.Embed(positions, dim, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(types, dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)

    def __call__(self, ids):
        positions = jnp.arange(ids.shape[-1])
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(jnp.zeros((), ids.dtype))
        )
        return self.norm(x)


class Layer(nnx.Module):
    def __init__(self, dim, heads, hidden, eps, *, rngs):
        self.heads = heads
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.attention_output = nnx.Linear(dim, dim, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.intermediate = nnx.Linear(dim, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, dim, rngs=rngs)
        self.output_norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)

    def __call__(self, x, mask):
        # x: (batch, seq, dim); mask: (batch, seq)
        b, s, d = x.shape
        split = lambda y: y.reshape(b, s, self.heads, d // self.heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        x = self.attention_norm(x + self.attention_output(o.reshape(b, s, d)))
        h = jax.nn.gelu(self.intermediate(x), approximate=False)
        return self.output_norm(x + self.output(h))


class Bert(nnx.Module):
    def __init__(self, config, *, rngs):
        c = config
        eps = c.layer_norm_eps
        self.embeddings = Embeddings(
            c.vocab_size,
            c.max_position_embeddings,
            c.type_vocab_size,
            c.hidden_size,
            eps,
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                Layer(
                    c.hidden_size,
                    c.num_attention_heads,
                    c.intermediate_size,
                    eps,
                    rngs=rngs,
                )
                for _ in range(c.num_hidden_layers)
            ]
        )

    def __call__(self, ids, mask):
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def embed(self, ids, mask):
        x = self(ids, mask)
        m = mask.astype(x.dtype)[..., None]
        pooled = jnp.sum(x * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)


def from_equinox(eqx_bert, config) -> Bert:
    """An NNX `Bert` holding `eqx_bert`'s weights (linear kernels transposed)."""
    model = Bert(config, rngs=nnx.Rngs(0))

    def lin(dst, src):
        dst.kernel.value = src.weight.T
        dst.bias.value = src.bias

    def norm(dst, src):
        dst.scale.value = src.weight
        dst.bias.value = src.bias

    e, se = model.embeddings, eqx_bert.embeddings
    e.word_embeddings.embedding.value = se.word_embeddings.weight
    e.position_embeddings.embedding.value = se.position_embeddings.weight
    e.token_type_embeddings.embedding.value = se.token_type_embeddings.weight
    norm(e.norm, se.norm)
    for dst, src in zip(model.layers, eqx_bert.layers, strict=True):
        a = src.attention
        lin(dst.query, a.query_proj)
        lin(dst.key, a.key_proj)
        lin(dst.value, a.value_proj)
        lin(dst.attention_output, a.output_proj)
        norm(dst.attention_norm, src.attention_norm)
        lin(dst.intermediate, src.intermediate)
        lin(dst.output, src.output)
        norm(dst.output_norm, src.output_norm)
    return model


def nnx_loss(model, ids, mask):
    """`examples/bert/finetune.py`'s contrastive loss, on the NNX model."""
    return models.bert_example().infonce(model.embed(ids, mask), SCALE)


# The NNX floor's parameter: the same as `first_bias_spec`'s (a filter on the path).
FLOOR = nnx.All(nnx.Param, lambda path, _: path == ("layers", 0, "query", "bias"))


# --- the NNX steps -------------------------------------------------------------------


def nnx_split_variant(model, wrt, opt, batch) -> Variant:
    """`jax.jit` over `nnx.split` state: the trainable state and the optimiser state
    donated, as `benchmarks.steps.step_variant`."""
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)

    def make():
        def step(trainable, opt_state, frozen, ids, mask):
            def value(t):
                return nnx_loss(nnx.merge(graphdef, t, frozen), ids, mask)

            value, grads = jax.value_and_grad(value)(trainable)
            updates, opt_state = opt.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        return step

    args = (trainable, opt.init(trainable), frozen, *batch)
    return Variant(make, args, donate=(0, 1), stateful=2)


class NnxJitStep:
    """The NNX tutorial step: `nnx.Optimizer`, `nnx.value_and_grad` with a
    `nnx.DiffState`, `nnx.jit`; on its own copy of the model."""

    def __init__(self, model, wrt, opt, batch):
        self.model = nnx.clone(model)
        self.optimizer = nnx.Optimizer(self.model, opt, wrt=wrt)
        self.batch = batch

        @nnx.jit
        def step(model, optimizer, ids, mask):
            grad = nnx.value_and_grad(nnx_loss, argnums=nnx.DiffState(0, wrt))
            loss, grads = grad(model, ids, mask)
            optimizer.update(model, grads)
            return loss

        self.step = step

    def call(self):
        return jax.block_until_ready(self.step(self.model, self.optimizer, *self.batch))


# --- diagnostics ---------------------------------------------------------------------


@contextlib.contextmanager
def unfolded_layer_norm():
    """While tracing: `minilm._layer_norm` as `eqx.nn.LayerNorm` computes it,
    `weight * ((x - mean) * rsqrt(var + eps)) + bias`, instead of `minilm.py`'s
    `(x - mean) * (rsqrt(var + eps) * weight) + bias` (as `nnx.LayerNorm`). Same
    values to rounding; a different backward graph."""
    minilm = sys.modules["minilm"]
    original = minilm._layer_norm

    def layer_norm(norm, x):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.maximum(0.0, jnp.var(x, axis=-1, keepdims=True))
        out = (x - mean) * jax.lax.rsqrt(variance + norm.eps)
        return norm.weight * out + norm.bias

    minilm._layer_norm = layer_norm
    try:
        yield
    finally:
        minilm._layer_norm = original


def hlo_stats(compiled) -> str:
    """Top-level fusions of the optimised HLO and the instructions in the bodies of
    its loop (elementwise) fusions: XLA duplicating elementwise producers into
    several consumers shows as many more body instructions."""
    text = compiled.as_text()
    bodies, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^%?(\S+) \(.*\) -> .* \{", line)
        if head:
            current = bodies[head.group(1)] = [0]
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            trivial = ("parameter(", " broadcast(", " bitcast(", " constant(")
            current[0] += not any(t in line for t in trivial)
    loops = re.findall(r"fusion\(.*kind=kLoop, calls=%?([\w.\-]+)", text)
    customs = len(re.findall(r"fusion\(.*kind=kCustom", text))
    body = sum(bodies[c][0] for c in loops if c in bodies)
    biggest = max((bodies[c][0] for c in loops if c in bodies), default=0)
    return (
        f"{len(loops)} loop + {customs} custom fusions, {body} instructions in loop "
        f"bodies (largest {biggest})"
    )


# --- main ----------------------------------------------------------------------------


def main(rounds: int = 11, hlo: str | None = None, ln_fold: bool = True):
    print(f"jax {jax.__version__}, devices {jax.devices()}, load {os.getloadavg()}")
    task = models.minilm_task(models.Config(), jax.random.key(0))
    ids, mask = task.batch
    print(f"batch {ids.shape}, {int(mask.sum())} real tokens")
    config = sys.modules["minilm"].BertConfig()  # imported by `minilm_task`
    eqx_model = task.model
    nnx_model = from_equinox(eqx_model, config)
    opt = optax.adam(LR)

    variants = {
        "eqx floor": steps.step_variant(
            task, eqx_model, steps.first_bias_spec(eqx_model), opt, quaxified=False
        ),
        "nnx floor": nnx_split_variant(nnx_model, FLOOR, opt, task.batch),
        "eqx full": steps.step_variant(
            task, eqx_model, eqx.is_array, opt, quaxified=False
        ),
        "nnx full": nnx_split_variant(nnx_model, nnx.Param, opt, task.batch),
    }
    if ln_fold:
        for which, spec in [
            ("floor", steps.first_bias_spec(eqx_model)),
            ("full", eqx.is_array),
        ]:
            variants[f"eqx {which} LN*"] = steps.step_variant(
                task, eqx_model, spec, opt, quaxified=False
            )
    n_floor = [
        sum(x.size for x in jax.tree.leaves(variants[k].args[0]))
        for k in ("eqx floor", "nnx floor")
    ]
    n_full = [
        sum(x.size for x in jax.tree.leaves(variants[k].args[0]))
        for k in ("eqx full", "nnx full")
    ]
    print(f"trainable parameters: floor {n_floor}, full {n_full} (eqx, nnx)")

    # Same model: the losses agree (NNX's LayerNorm uses the fast variance).
    l_eqx = task.loss(eqx_model, ids, mask)
    l_nnx = nnx_loss(nnx_model, ids, mask)
    print(f"loss: eqx {float(l_eqx):.6f}, nnx {float(l_nnx):.6f}")

    t0 = time.perf_counter()
    for name, v in variants.items():
        if name.endswith("LN*"):
            with unfolded_layer_norm():
                v.compile()
        else:
            v.compile()
    print(f"compiled the jax.jit steps in {time.perf_counter() - t0:.1f} s")
    print("\nXLA cost_analysis GFLOP per step; optimised HLO:")
    for name, v in variants.items():
        gflop = v.cost()["flops"] / 1e9
        print(f"  {name:14s} {gflop:7.2f}  {hlo_stats(v.compiled)}")

    jit_steps = {
        "nnx.jit floor": NnxJitStep(nnx_model, FLOOR, opt, task.batch),
        "nnx.jit full": NnxJitStep(nnx_model, nnx.Param, opt, task.batch),
    }
    calls = {name: v.call for name, v in variants.items()}
    calls |= {name: s.call for name, s in jit_steps.items()}

    if hlo is not None:
        folder = pathlib.Path(hlo)
        folder.mkdir(parents=True, exist_ok=True)
        for name, v in variants.items():
            text = v.compiled.as_text()
            (folder / (name.replace(" ", "_") + ".hlo.txt")).write_text(text)
        print(f"\nwrote the optimised HLO to {folder}")

    for call in calls.values():  # warm-up (nnx.jit compiles here)
        call()
    load_before = os.getloadavg()
    times = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    load_after = os.getloadavg()

    print(f"\nper step, over {rounds} interleaved rounds (seconds):")
    print(f"  {'':14s} {'wall median':>11s} {'wall min':>9s} {'CPU median':>10s}")
    for name, t in times.items():
        c = statistics.median(cpu[name])
        print(f"  {name:14s} {statistics.median(t):11.4f} {min(t):9.4f} {c:10.4f}")
    print("median per-round ratio (wall, CPU):")
    for a, b in [
        ("eqx floor", "nnx floor"),
        ("eqx full", "nnx full"),
        ("eqx floor", "nnx.jit floor"),
        ("eqx full", "nnx.jit full"),
        ("eqx floor LN*", "nnx floor"),
        ("eqx full LN*", "nnx full"),
        ("eqx floor", "eqx floor LN*"),
        ("eqx full", "eqx full LN*"),
    ]:
        if a not in times:
            continue
        r = statistics.median(x / y for x, y in zip(times[a], times[b]))
        rc = statistics.median(x / y for x, y in zip(cpu[a], cpu[b]))
        print(f"  {a} / {b}: {r:.3f}, {rc:.3f}")
    print(f"load average before {load_before}, after {load_after}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--hlo", default=None, help="write the optimised HLO here")
    parser.add_argument(
        "--no-ln-fold",
        action="store_true",
        help="skip the diagnostic Equinox steps with eqx.nn.LayerNorm's formula",
    )
    args = parser.parse_args()
    main(args.rounds, args.hlo, not args.no_ln_fold)
