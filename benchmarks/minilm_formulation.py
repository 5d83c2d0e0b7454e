"""MiniLM (examples/bert/minilm.py) formulations, same model, same weights, timed
interleaved: the frozen floor step (forward + backward, every weight frozen: the
gradient is taken only w.r.t. the 768 parameters of the embeddings' LayerNorm, so
the backward pass computes activation gradients but no weight gradient) and the
LoRA fine-tuning step (rank 8 on every attention and MLP linear, AdamW), batch 32
sequences x 64 tokens, the contrastive loss of examples/bert/finetune.py.

Formulations (each a function over the *same* `Bert` pytree, so parameter paths
and loraify targets are unchanged):

- `minilm.py`: `Bert.embed` as examples/bert/minilm.py now has it (= `all`).
- `eqx`:      the original (minilm.py before issue 16):
              `eqx.nn.MultiheadAttention.__call__`, `jax.vmap` of
              `eqx.nn.LayerNorm` and `eqx.nn.Linear` per token.
- `matmul`:   linears as `x @ w.T + b` on the whole (seq, dim) matrix.
- `ln`:       layer norm over the whole (seq, dim) array (mean/var on the last axis).
- `sdpa`:     attention through `jax.nn.dot_product_attention` (padding mask),
              still with the `query_proj`/... submodules.
- `all`:      matmul + ln + sdpa.
- `all_gelu_tanh` is NOT exact (tanh GELU) and only shown for scale.

Prints per-step median wall-clock and median process CPU seconds (the machine is
shared; CPU seconds are the less noisy figure); with --flops, XLA's cost analysis
flops of the floor step.
Run: python benchmarks/minilm_formulation.py [--rounds 5]
"""

import argparse
import math
import os
import pathlib
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

import quaxlora as ql


sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples" / "bert"))
import minilm  # noqa: E402
from finetune import TARGETS  # noqa: E402  (the main job's targets)


# --- formulation pieces ------------------------------------------------------------


def lin_vmap(linear, x):
    return jax.vmap(linear)(x)


def lin_matmul(linear, x):
    y = x @ linear.weight.T
    return y if linear.bias is None else y + linear.bias


def ln_vmap(norm, x):
    return jax.vmap(norm)(x)


def ln_whole(norm, x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.var(x, axis=-1, keepdims=True))
    out = (x - mean) * jax.lax.rsqrt(var + norm.eps)
    return norm.weight * out + norm.bias


def attn_eqx(attn, x, mask, lin):
    m = jnp.broadcast_to(mask[None, :], (x.shape[0], x.shape[0]))
    return attn(x, x, x, mask=m)


def attn_sdpa(attn, x, mask, lin):
    s, h = x.shape[0], attn.num_heads
    q = lin(attn.query_proj, x).reshape(s, h, -1)
    k = lin(attn.key_proj, x).reshape(s, h, -1)
    v = lin(attn.value_proj, x).reshape(s, h, -1)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None, :])
    return lin(attn.output_proj, o.reshape(s, -1))


def attn_einsum(attn, x, mask, lin):
    s, h = x.shape[0], attn.num_heads
    q = lin(attn.query_proj, x).reshape(s, h, -1)
    k = lin(attn.key_proj, x).reshape(s, h, -1)
    v = lin(attn.value_proj, x).reshape(s, h, -1)
    logits = jnp.einsum("qhd,khd->hqk", q / math.sqrt(q.shape[-1]), k)
    logits = jnp.where(mask[None, None, :], logits, jnp.finfo(logits.dtype).min)
    w = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("hqk,khd->qhd", w, v)
    return lin(attn.output_proj, o.reshape(s, -1))


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def make_embed(lin, ln, attn, gelu=gelu_exact):
    def forward(model, ids, mask):
        e = model.embeddings
        positions = jnp.arange(ids.shape[0])
        x = (
            jax.vmap(e.word_embeddings)(ids)
            + jax.vmap(e.position_embeddings)(positions)
            + e.token_type_embeddings(jnp.zeros((), ids.dtype))
        )
        x = ln(e.norm, x)
        for layer in model.layers:
            x = ln(layer.attention_norm, x + attn(layer.attention, x, mask, lin))
            hdn = gelu(lin(layer.intermediate, x))
            x = ln(layer.output_norm, x + lin(layer.output, hdn))
        m = mask.astype(x.dtype)[:, None]
        pooled = jnp.sum(x * m, axis=0) / jnp.maximum(jnp.sum(m), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled), 1e-12)

    return forward


def batched_embed(model, ids, mask):
    """`minilm.py`'s formulation written over the whole batch (no `vmap` at all)."""
    e = model.embeddings
    b, s_ = ids.shape
    x = (
        e.word_embeddings.weight[ids]
        + e.position_embeddings.weight[jnp.arange(s_)]
        + e.token_type_embeddings.weight[0]
    )
    x = ln_whole(e.norm, x)
    for layer in model.layers:
        a = layer.attention
        h = a.num_heads
        q = lin_dot(a.query_proj, x).reshape(b, s_, h, -1)
        k = lin_dot(a.key_proj, x).reshape(b, s_, h, -1)
        v = lin_dot(a.value_proj, x).reshape(b, s_, h, -1)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        x = ln_whole(
            layer.attention_norm, x + lin_dot(a.output_proj, o.reshape(b, s_, -1))
        )
        hdn = gelu_exact(lin_dot(layer.intermediate, x))
        x = ln_whole(layer.output_norm, x + lin_dot(layer.output, hdn))
    m = mask.astype(x.dtype)[..., None]
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def lin_dot(linear, x):
    y = jax.lax.dot_general(x, linear.weight, (((x.ndim - 1,), (1,)), ((), ())))
    return y if linear.bias is None else y + linear.bias


FORMULATIONS = {
    "eqx": make_embed(lin_vmap, ln_vmap, attn_eqx),  # minilm.py before issue 16
    "minilm.py": None,  # model.embed itself, as examples/bert/minilm.py has it now
    "matmul": make_embed(lin_matmul, ln_vmap, attn_eqx),
    "ln": make_embed(lin_vmap, ln_whole, attn_eqx),
    "sdpa": make_embed(lin_vmap, ln_vmap, attn_sdpa),
    "einsum_attn": make_embed(lin_vmap, ln_vmap, attn_einsum),
    "all": make_embed(lin_matmul, ln_whole, attn_sdpa),
    "all_einsum": make_embed(lin_matmul, ln_whole, attn_einsum),
    "batched(no vmap)": batched_embed,
    "all_gelu_tanh(inexact)": make_embed(lin_matmul, ln_whole, attn_sdpa, gelu_tanh),
}


def embed_fn(name):
    f = FORMULATIONS[name]
    if f is None:
        return lambda m, i, k: jax.vmap(quax.quaxify(m.embed))(i, k)
    if f is batched_embed:
        return lambda m, i, k: quax.quaxify(f)(m, i, k)
    return lambda m, i, k: jax.vmap(quax.quaxify(f), in_axes=(None, 0, 0))(m, i, k)


def loss_fn(embed, model, ids, mask):
    e = embed(model, ids, mask)
    n = e.shape[0] // 2
    logits = 20.0 * e[:n] @ e[n:].T
    labels = jnp.arange(n)
    a = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    b = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return jnp.mean(a + b) / 2


def floor_step(embed, model):
    def is_ln_param(m):
        return (m.embeddings.norm.weight, m.embeddings.norm.bias)

    params = is_ln_param(model)

    @eqx.filter_jit
    def step(params, model, ids, mask):
        def f(p):
            m = eqx.tree_at(is_ln_param, model, p)
            return loss_fn(embed, m, ids, mask)

        return jax.value_and_grad(f)(params)

    return step, params


def lora_step(embed, lora_model):
    params, static = ql.partition(lora_model)
    optim = optax.adamw(1e-4)
    opt_state = optim.init(params)

    @eqx.filter_jit
    def step(params, opt_state, ids, mask):
        loss, g = eqx.filter_value_and_grad(
            lambda p: loss_fn(embed, eqx.combine(p, static), ids, mask)
        )(params)
        updates, opt_state = optim.update(g, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    return step, (params, opt_state)


def timeit(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--flops", action="store_true", help="XLA cost analysis flops")
    p.add_argument(
        "--save",
        help="save the reference embeddings here (.npy), e.g. to compare "
        "runs under different XLA_FLAGS",
    )
    args = p.parse_args()

    model, tok = minilm.load_pretrained(max_length=64)
    rng = np.random.default_rng(0)
    words = "the a function class import module value return error list".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(5, 80))) for _ in range(32)]
    ids, mask = tok(texts)
    names = args.only or list(FORMULATIONS)
    print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))

    # exactness: embeddings of the plain model and of a LoRA model
    ref = np.asarray(eqx.filter_jit(embed_fn("eqx"))(model, ids, mask))
    lora_model = ql.loraify(model, rank=8, key=jr.key(0), where=TARGETS)
    # non-zero B (and A) so that the adapters matter
    lp, ls = ql.partition(lora_model)
    leaves, tdef = jax.tree_util.tree_flatten(lp)
    keys = jr.split(jr.key(1), len(leaves))
    leaves = [x + 0.02 * jr.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    lora_model = eqx.combine(jax.tree_util.tree_unflatten(tdef, leaves), ls)
    ref_lora = np.asarray(eqx.filter_jit(embed_fn("eqx"))(lora_model, ids, mask))
    print(
        f"LoRA (random A, B) moves the embeddings by {np.abs(ref_lora - ref).max():.2e}"
    )
    if args.save:
        np.save(args.save, ref)
    for n in names:
        e = np.asarray(eqx.filter_jit(embed_fn(n))(model, ids, mask))
        el = np.asarray(eqx.filter_jit(embed_fn(n))(lora_model, ids, mask))
        print(
            f"{n:24s} max|diff| plain {np.abs(e - ref).max():.2e}  "
            f"lora {np.abs(el - ref_lora).max():.2e}",
            flush=True,
        )

    steps = {}
    for n in names:
        emb = embed_fn(n)
        fs, fp = floor_step(emb, model)
        cost = {}
        if args.flops:  # an extra compilation per formulation
            dyn, st = eqx.partition(model, eqx.is_array)
            jf = jax.jit(
                lambda p, d, i, k, fs=fs, st=st: fs(p, eqx.combine(d, st), i, k)
            )
            cost = jf.lower(fp, dyn, ids, mask).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
        steps[("floor", n)] = (
            lambda fs=fs, fp=fp: fs(fp, model, ids, mask),
            cost.get("flops", float("nan")),
        )
        if not args.no_lora:
            ls, (lp, lo) = lora_step(emb, lora_model)
            steps[("lora", n)] = (
                lambda ls=ls, lp=lp, lo=lo: ls(lp, lo, ids, mask),
                float("nan"),
            )
    for f, _ in steps.values():  # compile + warm
        f()
        timeit(f)
    times = {k: ([], []) for k in steps}
    for _ in range(args.rounds):
        for k, (f, _) in steps.items():
            w, c = timeit(f)
            times[k][0].append(w)
            times[k][1].append(c)
    for kind in ("floor", "lora"):
        base = times.get((kind, "eqx"))
        for n in names:
            if (kind, n) not in times:
                continue
            w, c = times[(kind, n)]
            mw, mc = statistics.median(w), statistics.median(c)
            rel = (
                f"  CPU / eqx {mc / statistics.median(base[1]):.3f}"
                f"  wall / eqx {mw / statistics.median(base[0]):.3f}"
                if base
                else ""
            )
            print(
                f"{kind:5s} {n:24s} wall {mw:.3f} s (min {min(w):.3f})  "
                f"CPU {mc:.3f} s{rel}  flops {steps[(kind, n)][1]:.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
