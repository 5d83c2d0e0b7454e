"""QLoRA: `QuantisedArray`, `quantise`, and LoRA over a quantised base."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
import quax

import quaxlora as ql
from quaxlora._quantised import code_values, NF4_CODE

from .helpers import assert_tree_allclose
from .models import GPT, ResNet


F32 = dict(rtol=1e-5, atol=1e-5)
_is_q = lambda x: isinstance(x, ql.QuantisedArray)


def _dequantised(model):
    """`model` with every `QuantisedArray` replaced by its dequantised array."""
    return jtu.tree_map(
        lambda x: x.materialise() if _is_q(x) else x, model, is_leaf=_is_q
    )


def _f32(model):
    return jtu.tree_map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model
    )


def _nonzero_b(model, key):
    """Every adapter with a random, non-zero `b`."""
    is_lora = lambda x: isinstance(x, ql.LoraArray)
    loras = [x for x in jtu.tree_leaves(model, is_leaf=is_lora) if is_lora(x)]
    keys = jr.split(key, len(loras))
    new = [
        eqx.tree_at(lambda l: l.b, l, 0.3 * jr.normal(k, l.b.shape, l.b.dtype))
        for l, k in zip(loras, keys)
    ]
    it = iter(new)
    return jtu.tree_map(lambda x: next(it) if is_lora(x) else x, model, is_leaf=is_lora)


# ------------------------------------------------------------------ numerics


def _blocks(w, block_size):
    flat = np.asarray(w, np.float64).reshape(-1)
    n = -(-flat.size // block_size) * block_size
    return np.pad(flat, (0, n - flat.size)).reshape(-1, block_size)


@eqx.filter_jit  # one compile per shape and kind, not one per eager op
def _quantise(w, kind, **kwargs):
    """`quantise(w, kind, **kwargs)` and its dequantised array."""
    q = ql.quantise(w, kind, **kwargs)
    return q, q.materialise()


@pytest.mark.parametrize("kind", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("shape", [(8, 16), (5, 7), (3, 2, 3, 3)])
def test_nearest_code_and_error_bound(getkey, kind, shape):
    w = jr.normal(getkey(), shape, jnp.float32)
    q, dense = _quantise(w, kind, block_size=16)
    assert q.shape == shape and q.dtype == jnp.float32
    code = code_values(kind).astype(np.float64)
    blocks = _blocks(w, 16)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(q.scales), absmax[:, 0], rtol=1e-7)
    # numpy reference: nearest code of w / absmax, dequantised.
    nearest = np.abs(blocks[..., None] / absmax[..., None] - code).argmin(-1)
    ref = (code[nearest] * absmax).reshape(-1)[: w.size].reshape(shape)
    dense = np.asarray(dense, np.float64)
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=1e-6)
    half_gap = np.max(np.diff(code)) / 2
    err = np.abs(dense - np.asarray(w)).reshape(-1)
    bound = np.repeat(absmax[:, 0], 16)[: w.size] * half_gap
    assert np.all(err <= bound * (1 + 1e-6) + 1e-7)


def test_nf4_table_and_packing(getkey):
    assert NF4_CODE.shape == (16,) and NF4_CODE[7] == 0 and NF4_CODE[-1] == 1
    assert np.all(np.diff(NF4_CODE) > 0)
    w = jr.normal(getkey(), (64, 32), jnp.float32)
    q, _ = _quantise(w, "nf4", block_size=64)
    # Really 4 bits: two codes per byte, one float32 scale per 64 elements.
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (64 * 32 // 2,)
    assert q.scales.shape == (32,)
    assert q.stored_bytes() == 64 * 32 // 2 + 4 * 32
    assert q.stored_bytes() <= 0.15 * w.size * 4
    i8, _ = _quantise(w, "int8", block_size=64)
    assert i8.codes.dtype == jnp.int8 and i8.codes.shape == (64 * 32,)


def test_padding_round_trip(getkey):
    # 35 elements, block 16: the last block is padded, and dequantised exactly
    # like a block holding only those 3 values.
    w = jr.normal(getkey(), (5, 7), jnp.float32)
    q = ql.quantise(w, "int8", block_size=16)
    assert q.codes.shape == (48,) and q.scales.shape == (3,)
    tail = ql.quantise(w.reshape(-1)[32:], "int8", block_size=16)
    np.testing.assert_array_equal(
        np.asarray(q.materialise()).reshape(-1)[32:], np.asarray(tail.materialise())
    )
    # Values on the grid round-trip (to float rounding of `k / 7 · 7`).
    grid = jnp.arange(-7.0, 8.0, dtype=jnp.float32).reshape(3, 5)
    _, back = _quantise(grid, "int4", block_size=16)
    np.testing.assert_allclose(back, grid, rtol=1e-6)


def test_zero_block_has_no_nan():
    w = jnp.zeros((4, 16), jnp.float32).at[0].set(1.0)
    for kind in ("nf4", "int4", "int8"):
        _, dense = _quantise(w, kind, block_size=16, double_quant=True)
        np.testing.assert_array_equal(dense, w)


def test_double_quant(getkey):
    scale = jnp.linspace(0.1, 3, 64, dtype=jnp.float32)[None]  # per column
    w = jr.normal(getkey(), (96, 64), jnp.float32) * scale
    q, dense = _quantise(w, "nf4", block_size=16, double_quant=True)
    assert q.scales.dtype == jnp.uint8 and q.scales2.dtype == jnp.float32
    assert q.scales.shape == (384,) and q.scales2.shape == (2,)
    scale = np.repeat(np.asarray(q.block_scales()), 16)
    blocks_absmax = np.abs(_blocks(w, 16)).max(axis=1)
    assert np.all(np.repeat(blocks_absmax, 16) <= scale * (1 + 1e-6))  # rounded up
    err = np.abs(np.asarray(dense) - np.asarray(w)).reshape(-1)
    half_gap = np.max(np.diff(NF4_CODE)) / 2
    assert np.all(err <= scale * half_gap * (1 + 1e-6))
    plain, _ = _quantise(w, "nf4", block_size=16)
    assert q.stored_bytes() < plain.stored_bytes()


# ------------------------------------------------------------------ bad input


def test_bad_input(getkey):
    mlp = eqx.filter_jit(lambda k: eqx.nn.MLP(4, 3, 8, 2, key=k))(getkey())  # 1 compile
    with pytest.raises(ValueError, match=r"`kind` must be one of \('nf4', 'int4'"):
        ql.quantise(mlp, "fp4")
    for bs in (0, -4, 48, 2.0, True):
        with pytest.raises(ValueError, match="`block_size` must be a positive power"):
            ql.quantise(mlp, "nf4", block_size=bs)
    bad = eqx.tree_at(
        lambda m: m.layers[1].weight, mlp, mlp.layers[1].weight.at[0, 0].set(jnp.inf)
    )
    with pytest.raises(ValueError, match=r"non-finite value .* in `layers\.1\.weight`"):
        ql.quantise(bad, "nf4")
    ints = eqx.tree_at(lambda m: m.layers[2].weight, mlp, jnp.ones((3, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"`layers\.2\.weight` has dtype int32"):
        ql.quantise(ints, "int8")
    q = ql.quantise(mlp, "nf4")
    with pytest.raises(ValueError, match=r"`layers\.0\.weight` is already quantised"):
        ql.quantise(q, "nf4")


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    "f",
    [
        lambda w, x: w @ x,  # (out, in) @ (in, n)
        lambda w, x: x.T @ w.T,  # quantised on the right, transposed
        lambda w, x: jnp.einsum("oi,in->no", w, x),
        lambda w, x: lax.dot_general(x, w, (((0,), (1,)), ((), ()))),
    ],
)
def test_dot_general(getkey, f):
    w = jr.normal(getkey(), (8, 32), jnp.float32)
    x = jr.normal(getkey(), (32, 3), jnp.float32)
    q = ql.quantise(w, "nf4", block_size=16)
    for got, want in _dot_general_pairs(f, q, x):
        assert_tree_allclose(got, want, **F32)


@eqx.filter_jit  # one compile per `f`, not one per eager op
def _dot_general_pairs(f, q, x):
    """Pairs `(quantised, dense)`: values, gradients, forward-mode derivatives."""
    dense = q.materialise()
    loss = lambda x, w: jnp.sum(jnp.sin(f(w, x)))
    # Forward mode works through the checkpointed dequantisation.
    jvp = lambda w: jax.jvp(lambda x: quax.quaxify(f)(w, x), (x,), (jnp.ones_like(x),))
    return [
        (quax.quaxify(f)(q, x), f(dense, x)),
        (jax.grad(quax.quaxify(loss))(x, q), jax.grad(loss)(x, dense)),
        (jvp(q), jvp(dense)),
    ]


def _float_sizes(jaxpr):
    for e in jaxpr.eqns:
        for v in e.outvars:
            if jnp.issubdtype(v.aval.dtype, jnp.floating):
                yield v.aval.size
        for p in e.params.values():
            if isinstance(p, jax.extend.core.ClosedJaxpr):
                yield from _float_sizes(p.jaxpr)


def test_embedding_reads_only_its_rows(getkey):
    @eqx.filter_jit  # one compile, not one per eager op
    def build(key):
        emb = eqx.nn.Embedding(50, 32, key=key)
        q, q2 = (ql.quantise(emb, "nf4", block_size=b) for b in (16, 64))
        return q, q.weight.materialise(), q2

    q, dense, q2 = build(getkey())
    ids = jnp.array([3, 0, 49, 7])
    for f in _LOOKUPS:
        # No floating array of the table's size (50 × 32) is ever formed.
        jaxpr = jax.make_jaxpr(quax.quaxify(f))(q, ids)
        assert max(_float_sizes(jaxpr.jaxpr)) < 50 * 32
    pairs, oob = _lookup_pairs(q, dense, q2, ids)
    for got, want in pairs:
        assert_tree_allclose(got, want, **F32)
    np.testing.assert_array_equal(oob, -2.0 * np.ones((1, 32)))


_LOOKUPS = (
    lambda e, ids: jax.vmap(e)(ids),
    lambda e, ids: e(ids[0]),
    lambda e, ids: e.weight[2:5],
    lambda e, ids: jnp.take(e.weight, ids, axis=0, mode="fill", fill_value=-2.0),
)


@eqx.filter_jit  # one compile for all the lookups, not one per eager op
def _lookup_pairs(q, dense, q2, ids):
    """Pairs `(quantised, dense)` of `_LOOKUPS` and, for `q2`, of a table whose
    rows are not whole blocks (dequantised first: the same values); and an
    out-of-bounds `take`."""
    pairs = [
        (quax.quaxify(f)(q, ids), f(eqx.tree_at(lambda e: e.weight, q, dense), ids))
        for f in _LOOKUPS
    ]
    dense2 = q2.weight.materialise()
    pairs.append((quax.quaxify(lambda e, ids: jax.vmap(e)(ids))(q2, ids), dense2[ids]))
    oob = quax.quaxify(
        lambda e: jnp.take(
            e.weight, jnp.array([60]), axis=0, mode="fill", fill_value=-2.0
        )
    )(q)
    return pairs, oob


def test_transpose_and_convert(getkey):
    w = jr.normal(getkey(), (2, 6, 4), jnp.float32)
    q = ql.quantise(w, "int8", block_size=8)
    dense = q.materialise()
    f = lambda w: jnp.transpose(w, (0, 2, 1))
    t = quax.quaxify(f)(q)  # lazy: still quantised
    assert isinstance(t, ql.QuantisedArray) and t.shape == (2, 4, 6)
    np.testing.assert_array_equal(t.materialise(), f(dense))
    ones = jnp.ones((6,), jnp.float32)
    out = quax.quaxify(lambda w, x: f(w) @ x)(q, ones)
    assert_tree_allclose(out, f(dense) @ ones, **F32)
    b = quax.quaxify(lambda w, x: w.astype(jnp.bfloat16) @ x)(
        q, jnp.ones((4,), jnp.bfloat16)
    )
    assert b.dtype == jnp.bfloat16
    ref = dense.astype(jnp.bfloat16) @ jnp.ones((4,), jnp.bfloat16)
    assert_tree_allclose(b, ref, rtol=1e-2, atol=1e-2)
    q16 = ql.quantise(w, "nf4", compute_dtype=jnp.bfloat16)
    assert q16.dtype == jnp.bfloat16 and q16.materialise().dtype == jnp.bfloat16


# ------------------------------------------------------------------ QLoRA models


def _gpt_pair(key, kind="nf4", before=True, **kw):
    # Compiled, not hundreds of eager ops: the base by one program (the same for
    # both orders), the rest by another.
    k1, k2, k3 = jr.split(key, 3)
    return _gpt_qlora(_gpt_base(k1), k2, k3, kind, before, **kw)


@eqx.filter_jit
def _gpt_base(key):
    return _f32(GPT(key=key, dim=32))


@eqx.filter_jit
def _gpt_qlora(base, k2, k3, kind, before, **kw):
    where = [eqx.nn.Linear, eqx.nn.Embedding]
    if before:
        model = ql.loraify(
            ql.quantise(base, kind, block_size=16, **kw), rank=3, key=k2, where=where
        )
    else:
        model = ql.quantise(
            ql.loraify(base, rank=3, key=k2, where=where), kind, block_size=16, **kw
        )
    model = _nonzero_b(model, k3)
    return model, _dequantised(model)


def test_gpt_values_and_grads(getkey):
    # Embedding lookups, a tied transposed head, stacked blocks under lax.scan,
    # vmap over the batch, jit, grad and remat: QLoRA equals LoRA on the dequantised
    # base.
    qlora, ref = _gpt_pair(getkey())
    tokens = jr.randint(getkey(), (2, 8), 0, 13)

    def loss(model, tokens):
        logits = jax.vmap(quax.quaxify(model))(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    @eqx.filter_jit
    def value_and_grads(trainable, frozen):
        f = lambda t: loss(eqx.combine(t, frozen), tokens)
        ck = lambda t: eqx.filter_checkpoint(loss)(eqx.combine(t, frozen), tokens)
        return jax.value_and_grad(f)(trainable), jax.grad(ck)(trainable)

    # (The trees differ only in where the frozen base is: compare the leaves.)
    leaves = lambda model: jtu.tree_leaves(value_and_grads(*ql.partition(model)))
    assert_tree_allclose(leaves(qlora), leaves(ref), rtol=1e-4, atol=1e-5)


# Exact equality, one compiled program for the whole tree (not one per leaf shape).
_tree_equal = eqx.filter_jit(eqx.tree_equal)


def test_quantise_before_or_after_loraify(getkey):
    a, _ = _gpt_pair(jr.key(3), before=True)
    b, _ = _gpt_pair(jr.key(3), before=False)
    assert _tree_equal(a, b)
    lora = b.blocks.attn.query_proj.weight
    assert isinstance(lora.weight, ql.QuantisedArray) and lora.a.dtype == jnp.float32


@eqx.filter_jit
def _conv_pair(k1, k2, k3):
    base = _f32(ResNet(depth=1, key=k1))
    q = ql.quantise(base, "int4", block_size=8, double_quant=True)
    model = _nonzero_b(
        ql.loraify(q, rank=2, key=k2, where=[eqx.nn.Conv2d, eqx.nn.Linear]), k3
    )
    return model, _dequantised(model)


def test_conv_model(getkey):
    model, ref = _conv_pair(getkey(), getkey(), getkey())
    x = jr.normal(getkey(), (2, 3, 8, 8), jnp.float32)

    def loss(t, f):
        return jnp.sum(jnp.tanh(jax.vmap(quax.quaxify(eqx.combine(t, f)))(x)) ** 2)

    leaves = lambda m: jtu.tree_leaves(
        jax.jit(jax.value_and_grad(loss))(*ql.partition(m))
    )
    assert_tree_allclose(leaves(model), leaves(ref), rtol=1e-4, atol=1e-5)


def test_conv_transpose(getkey):
    @eqx.filter_jit  # one compile, not one per eager op
    def outputs(k1, k2, k3, x):
        conv = _f32(eqx.nn.ConvTranspose1d(4, 6, 3, stride=2, key=k1))
        model = _nonzero_b(
            ql.loraify(
                ql.quantise(conv, "nf4", block_size=8),
                rank=2,
                key=k2,
                where=eqx.nn.ConvTranspose1d,
            ),
            k3,
        )
        ref = _dequantised(model)
        return quax.quaxify(model)(x), quax.quaxify(ref)(x)

    keys = getkey(), getkey(), getkey()
    x = jr.normal(getkey(), (4, 9), jnp.float32)
    assert_tree_allclose(*outputs(*keys, x), **F32)


@eqx.filter_jit  # one compile for the lot, not one per eager op
def _merge_run_requantise(qlora, tokens):
    merged = ql.merge(qlora)
    again = ql.quantise(merged, "nf4", block_size=16)
    return merged, merged(tokens), quax.quaxify(qlora)(tokens), again


def test_merge_and_requantise(getkey):
    qlora, ref = _gpt_pair(getkey())
    # `pos` is quantised but not adapted: merge dequantises it too.
    qlora = eqx.tree_at(lambda m: m.pos, qlora, ql.unloraify(qlora.pos))
    assert isinstance(qlora.pos.weight, ql.QuantisedArray)
    tokens = jnp.arange(8) % 13
    merged, got, want, again = _merge_run_requantise(qlora, tokens)
    is_value = lambda x: isinstance(x, quax.Value)
    assert not any(is_value(x) for x in jtu.tree_leaves(merged, is_leaf=is_value))
    assert_tree_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert isinstance(again.embed.weight, ql.QuantisedArray)
    del ref


def test_save_load_adapters(getkey, tmp_path):
    qlora, _ = _gpt_pair(getkey())
    path = tmp_path / "a.safetensors"
    ql.save_adapters(path, qlora)
    fresh = ql.loraify(
        ql.unloraify(qlora),
        rank=3,
        key=getkey(),
        where=[eqx.nn.Linear, eqx.nn.Embedding],
    )
    loaded = ql.load_adapters(path, fresh)
    assert _tree_equal(loaded, qlora)


def test_stored_bytes(getkey):
    def build(k1, k2):
        base = _f32(GPT(key=k1, dim=64, vocab=64))
        return ql.loraify(ql.quantise(base, "nf4"), rank=4, key=k2)

    # Bytes depend on shapes and dtypes only: the model is built abstractly
    # (`eval_shape`, nothing compiled) and its arrays are zeros of those shapes.
    is_abstract = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    qlora = jtu.tree_map(
        lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)) if is_abstract(x) else x,
        eqx.filter_eval_shape(build, getkey(), getkey()),
        is_leaf=is_abstract,
    )
    quantised = [x for x in jtu.tree_leaves(qlora, is_leaf=_is_q) if _is_q(x)]
    f32_bytes = sum(4 * q.size for q in quantised)
    q_bytes = sum(q.stored_bytes() for q in quantised)
    assert q_bytes <= 0.15 * f32_bytes
    others = ql.stored_bytes(ql.unloraify(qlora)) - q_bytes  # norms, biases
    assert ql.stored_bytes(qlora) == q_bytes + others
    adapters = ql.count_parameters(qlora).trainable * 4
    assert ql.stored_bytes(qlora, frozen_only=False) == q_bytes + others + adapters


# ------------------------------------------------------------------ memory


def _step_memory(model, tokens):
    from benchmarks.steps import make_step

    # `model` is abstract: its arrays are `jax.ShapeDtypeStruct`s.
    trainable, rest = ql.partition(model)
    frozen, static = eqx.partition(rest, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = optax.sgd(0.1)
    step = make_step(loss, static, opt, quaxified=True)
    x = y = jax.ShapeDtypeStruct((tokens.shape[0], tokens.shape[1] - 1), tokens.dtype)
    args = (trainable, jax.eval_shape(opt.init, trainable), frozen, x, y)
    return jax.jit(step).lower(*args).compile().memory_analysis()


def test_memory(getkey):
    from benchmarks.models import GPT as BenchGPT

    def models(depth, k1, k2):
        base = BenchGPT(256, 256, 4, depth, scan=True, key=k1)
        lora = ql.loraify(base, rank=8, key=k2, exclude="head")
        return lora, ql.quantise(lora, "nf4")

    with jax.enable_x64(False):
        # XLA's memory analysis needs only shapes and dtypes: the models and tokens
        # are abstract (`eval_shape`), so building them compiles nothing.
        tokens = jax.ShapeDtypeStruct((1, 9), jnp.int32)
        temps = {}
        for depth in (2, 4):
            lora, qlora = eqx.filter_eval_shape(models, depth, getkey(), getkey())
            m_lora, m_q = _step_memory(lora, tokens), _step_memory(qlora, tokens)
            # The step's arguments: the frozen base is most of them.
            ratio = m_q.argument_size_in_bytes / m_lora.argument_size_in_bytes
            assert ratio <= 0.2, ratio
            temps[depth] = m_q.temp_size_in_bytes
        # Scanned blocks: one layer's dequantised weights at a time. Keeping them for
        # the backward would add at least 2 layers' worth for 2 more blocks.
        layer = 12 * 256 * 256 * 4
        assert temps[4] - temps[2] < layer, (temps, layer)


def test_peft_files_of_a_qlora_model(tmp_path):
    import os

    from quaxlora._safetensors import read_safetensors

    from .fixtures.make_peft_fixtures import eqx_base, HERE, MAPPING, ours

    # Built by compiled programs (one each), not by hundreds of eager ops.
    state = read_safetensors(os.path.join(HERE, "base.safetensors"))[0]
    base = eqx.filter_jit(eqx_base)(state)
    io = read_safetensors(os.path.join(HERE, "io.safetensors"))[0]
    plain = eqx.filter_jit(ours)(base)
    quantise = eqx.filter_jit(lambda m: ql.quantise(m, "nf4", block_size=8))
    model = quantise(plain)
    # The files hold the adapters only: the same as the unquantised model's.
    ql.save_peft(tmp_path / "q", model, MAPPING)
    ql.save_peft(tmp_path / "plain", plain, MAPPING)
    got = read_safetensors(tmp_path / "q" / "adapter_model.safetensors")[0]
    want = read_safetensors(tmp_path / "plain" / "adapter_model.safetensors")[0]
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    loaded = ql.load_peft(tmp_path / "q", quantise(base), MAPPING)

    @eqx.filter_jit  # one compile for both (the same structure), not per eager op
    def run(m):
        f = jax.vmap(quax.quaxify(m))
        return f(jnp.asarray(io["tokens"]), jnp.asarray(io["image"]))

    assert_tree_allclose(run(loaded), run(model), **F32)
    assert ql.count_parameters(loaded).total == ql.count_parameters(plain).total
