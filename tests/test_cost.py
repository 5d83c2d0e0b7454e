"""Deterministic cost guards, from XLA's own cost and memory analysis.

FLOP counts and shapes of compiled programs do not depend on the machine's load, so a
rule that starts materialising `w + s·b@a`, a full-size gradient of a frozen weight,
or a transposed copy of a large cotangent fails here rather than in a benchmark.
"""

import re
from unittest import mock

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
import quax
from jax.interpreters import ad

import quaxlora as ql
import quaxlora._rules._factored as factored


WIDTH, DEPTH, BATCH, RANK = 256, 4, 64, 8


@pytest.fixture(autouse=True)
def _float32():
    # XLA's counts are for the model as benchmarked: float32, default precision.
    with jax.enable_x64(False), jax.default_matmul_precision("default"):
        yield


def _mlp(key):
    return eqx.nn.MLP(WIDTH, WIDTH, WIDTH, DEPTH - 1, key=key)


def _loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _data(key):
    kx, ky = jr.split(key)
    return jr.normal(kx, (BATCH, WIDTH)), jr.normal(ky, (BATCH, WIDTH))


def _lora_step(model, opt):
    arrays, static = eqx.partition(model, eqx.is_array)
    trainable, frozen = eqx.partition(arrays, ql.trainable_spec(model))

    def step(trainable, opt_state, frozen, x, y):
        def f(t):
            return quax.quaxify(_loss)(eqx.combine(t, frozen, static), x, y)

        grads = jax.grad(f)(trainable)
        # optax mixes Python floats with its int32 step count: standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    return step, (trainable, opt.init(trainable), frozen)


def _full_step(model, opt):
    params, static = eqx.partition(model, eqx.is_array)

    def step(params, opt_state, x, y):
        grads = jax.grad(lambda p: _loss(eqx.combine(p, static), x, y))(params)
        # optax mixes Python floats with its int32 step count: standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step, (params, opt.init(params))


def _compile(fn, *args, donate=()):
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def _bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _analytic_lora_flops(n, d, depth, r):
    # Per layer: forward x·wᵀ, x·aᵀ, t·bᵀ; backward tᵀ·g (grad b), g·b, gtᵀ·x
    # (grad a), and where the input needs a gradient (δ, all but the first layer)
    # g·w and gt·a. See docs/benchmarks.md.
    flops = 0
    for i in range(depth):
        delta = int(i > 0)
        flops += 2 * n * (d * d * (1 + delta) + r * (3 * d + (2 + delta) * d))
    return flops


def test_lora_step_flops_match_analytic(getkey):
    model = ql.loraify(_mlp(getkey()), rank=RANK, key=getkey())
    step, state = _lora_step(model, optax.adam(1e-3))
    compiled = _compile(step, *state, *_data(getkey()))
    analytic = _analytic_lora_flops(BATCH, WIDTH, DEPTH, RANK)
    # The remainder is elementwise work (relu, bias, loss, Adam on the factors).
    assert analytic <= _flops(compiled) <= 1.03 * analytic


def test_lora_step_cheaper_than_full(getkey):
    mlp = _mlp(getkey())
    opt = optax.adam(1e-3)
    x, y = _data(getkey())
    full, fstate = _full_step(mlp, opt)
    lora, lstate = _lora_step(ql.loraify(mlp, rank=RANK, key=getkey()), opt)
    cf = _compile(full, *fstate, x, y, donate=(0, 1))
    cl = _compile(lora, *lstate, x, y, donate=(0, 1))
    # No weight gradients: (1 + δ)/(2 + δ) of the matmuls, ≈ 0.7 here.
    assert _flops(cl) < 0.75 * _flops(cf)
    # No frozen-size gradient or optimiser state (Adam keeps two moments).
    assert _bytes(cl) < 0.55 * _bytes(cf)


def test_no_frozen_size_arrays_in_grads_or_opt_state(getkey):
    model = ql.loraify(_mlp(getkey()), rank=RANK, key=getkey())
    opt = optax.adam(1e-3)
    step, (trainable, opt_state, frozen) = _lora_step(model, opt)
    x, y = _data(getkey())
    new_trainable, new_state = jax.eval_shape(step, trainable, opt_state, frozen, x, y)
    frozen_size = WIDTH * WIDTH
    for leaf in jax.tree_util.tree_leaves((new_trainable, new_state)):
        assert leaf.size < frozen_size
    # And in the compiled program: its outputs are the factors and Adam's two moments
    # of them (plus Adam's step count), nothing of a frozen weight's size.
    compiled = _compile(step, trainable, opt_state, frozen, x, y)
    factor_bytes = sum(
        l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(trainable)
    )
    out = compiled.memory_analysis().output_size_in_bytes
    assert 3 * factor_bytes <= out <= 3 * factor_bytes + 1024  # + tuple tables


def test_merged_inference_flops_equal_base(getkey):
    mlp = _mlp(getkey())
    lora = ql.loraify(mlp, rank=RANK, key=getkey())
    x, _ = _data(getkey())

    def flops(model, quaxified=False):
        params, static = eqx.partition(model, eqx.is_array)
        run = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
        return _flops(_compile(quax.quaxify(run) if quaxified else run, params, x))

    base, merged = flops(mlp), flops(ql.merge(lora))
    unmerged = flops(lora, quaxified=True)
    assert merged == base
    # Unmerged: plus x·aᵀ and t·bᵀ, the sum with the base output and the scale.
    adapter = DEPTH * 2 * BATCH * RANK * 2 * WIDTH
    assert base + adapter < unmerged <= base + adapter + DEPTH * BATCH * (WIDTH + RANK)


def test_grad_of_b_does_not_transpose_cotangent(getkey):
    # The gradient of `b` contracts the (tokens, out) cotangent with the small
    # (tokens, rank) `a·x`; computed big-operand-first, XLA writes a transposed copy
    # of the whole cotangent, an (out, tokens) array. It must not appear.
    tokens, din, dout = 96, 64, 160
    lin = eqx.nn.Linear(din, dout, key=getkey())
    trainable, frozen = ql.partition(ql.loraify(lin, rank=RANK, key=getkey()))
    x = jr.normal(getkey(), (4, tokens // 4, din))

    def loss(t, x):
        model = eqx.combine(t, frozen)
        y = quax.quaxify(lambda m, x: jax.vmap(jax.vmap(m))(x))(model, x)
        return jnp.sum(jnp.tanh(y))

    hlo = _compile(jax.grad(loss, argnums=(0, 1)), trainable, x).as_text()
    assert f"f32[{dout},{tokens}]" not in hlo
    assert f"f32[{dout},4,{tokens // 4}]" not in hlo


def _dots_reading(hlo: str, shape: str) -> list[tuple[str, int]]:
    """Every `dot` of an optimised HLO module that reads an array of `shape`
    (`"f32[96,160]"`), as (which operand, its first contracting dimension)."""
    found = []
    for comp in hlo.split("\n\n"):
        shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", comp))
        pattern = r"dot\(%([\w.\-]+), %([\w.\-]+)\), lhs_contracting_dims=\{(\d+)"
        for line in comp.splitlines():
            m = re.search(pattern, line)
            if m is None:
                continue
            lhs, rhs, lc = m.groups()
            rc = re.search(r"rhs_contracting_dims=\{(\d+)", line).group(1)
            for side, name, c in (("lhs", lhs, lc), ("rhs", rhs, rc)):
                if shapes.get(name) == shape:
                    found.append((side, int(c)))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot layouts")
def test_factor_gradients_read_the_cotangent_row_major(getkey):
    # The backward reads the (tokens, out) cotangent g in three products: g·wᵀ,
    # g·b and the gradient of `b`, tᵀ·g. XLA folds the final transpose of
    # (tᵀ·g)ᵀ into the product, making it gᵀ·t: g on the left with its row axis
    # contracted, which XLA:CPU runs as a generic matmul about 3× slower than
    # tᵀ·g. `contract_p`'s CPU lowering pins small transposes (a 32 KiB copy of
    # `t`), so every product reads g as a row-major left operand or as the right
    # operand of a plain matrix product.
    tokens, din, dout = 96, 64, 160
    lin = eqx.nn.Linear(din, dout, key=getkey())
    trainable, frozen = ql.partition(ql.loraify(lin, rank=RANK, key=getkey()))
    x = jr.normal(getkey(), (tokens, din))

    def loss(t, x):
        model = eqx.combine(t, frozen)
        y = quax.quaxify(lambda m, x: jax.vmap(m)(x))(model, x)
        return jnp.sum(jnp.tanh(y))

    hlo = _compile(jax.grad(loss, argnums=(0, 1)), trainable, x).as_text()
    reads = _dots_reading(hlo, f"f32[{tokens},{dout}]")
    assert len(reads) == 3, reads  # g·wᵀ, g·b and tᵀ·g
    assert ("lhs", 0) not in reads, reads


def _temp_bytes(compiled) -> int:
    return compiled.memory_analysis().temp_size_in_bytes


def test_lora_step_keeps_one_activation_per_layer(getkey):
    # A sum of two products feeding the activation would be fused by XLA into both
    # the activation and its derivative, keeping both products alive until the
    # backward. Where the differentiated forward is one product (here
    # w.size <= 2·output size), the step's temporaries stay within a weight copy or
    # two of full fine-tuning's; the two-product form needs about one more
    # activation per layer.
    width, depth, batch = 128, 6, 128
    mlp = eqx.nn.MLP(width, width, width, depth - 1, key=getkey())
    opt = optax.adam(1e-3)
    kx, ky = jr.split(getkey())
    x, y = jr.normal(kx, (batch, width)), jr.normal(ky, (batch, width))
    full, fstate = _full_step(mlp, opt)
    full_temp = _temp_bytes(_compile(full, *fstate, x, y, donate=(0, 1)))
    model = ql.loraify(mlp, rank=RANK, key=getkey())
    lora, lstate = _lora_step(model, opt)
    fused = _temp_bytes(_compile(lora, *lstate, x, y, donate=(0, 1)))
    with mock.patch.object(factored, "FUSE_MAX_COPY", 0):
        lora, lstate = _lora_step(model, opt)  # a new function: traced afresh
        two_product = _temp_bytes(_compile(lora, *lstate, x, y, donate=(0, 1)))
    with mock.patch.object(factored, "MERGE_FORWARD", False):
        lora, lstate = _lora_step(model, opt)
        concatenated = _temp_bytes(_compile(lora, *lstate, x, y, donate=(0, 1)))
    weight = 4 * width * (width + RANK)
    activation = 4 * batch * width
    # `fused` is the merged product x·(w + s·b·a) (a float32 weight): one weight-sized
    # temporary and no copy of `x`, so it keeps less than [x | s·t]·[w | b] does.
    assert fused < concatenated <= full_temp + 2 * weight
    assert fused <= full_temp + weight
    assert two_product > concatenated + (depth // 2) * activation


def test_scanned_lora_step_stores_no_weight_copy():
    # Under `lax.scan` over a layer stack, a value computed from a frozen weight and
    # needed by the backward (a `stop_gradient` read of it) is stacked over the
    # iterations: a full copy of the block weights per step. The LoRA step may need
    # more than the frozen floor only by the inputs its `∂a` needs (one activation
    # per adapted layer), far less than a copy of the block weights. The shape is
    # abstract: nothing is allocated.
    from benchmarks.scan_memory import measure

    vocab, d, heads, depth, seq = 512, 512, 8, 4, 64
    results = measure(vocab, d, heads, depth, seq)
    floor = results["frozen floor"][1]
    lora = results["quaxlora LoRA"][1]
    block_weights = 4 * depth * 12 * d * d
    # q, k and v share their input; o, fc1 and fc2 each need their own.
    inputs = 4 * depth * seq * (3 * d + 4 * d)
    assert lora <= floor + inputs + block_weights // 8
    assert results["quaxlora LoRA"][0] < 0.5 * results["full fine-tuning"][0]


def test_grad_linearises_each_product_once_without_jitted_arithmetic(
    getkey, monkeypatch
):
    # A trace-time guard (the timings are in the benchmarks): under `grad` each
    # factored product is linearised by its own rule, once per layer, not through
    # its jvp rule and partial evaluation; and the rule binds no jitted function
    # (`+` on tracers is `jnp.add`, a `jit` that `grad` would linearise as a jaxpr
    # of its own).
    from jax._src.interpreters import ad as jax_ad
    from jax.extend.core.primitives import jit_p

    p = factored.factored_p
    calls = {"linearize": 0, "jvp": 0, "jit inside": 0}
    inside = [False]

    def within(f):
        def run(*args, **kwargs):
            inside[0] = True
            try:
                return f(*args, **kwargs)
            finally:
                inside[0] = False

        return run

    lin, jvp, bind = (
        jax_ad.primitive_linearizations[p],
        ad.primitive_jvps[p],
        jit_p.bind,
    )

    def counted_lin(*args, **params):
        calls["linearize"] += 1
        y, nonzero, residuals, linearized = within(lin)(*args, **params)
        return y, nonzero, residuals, within(linearized)

    def counted_jvp(*args, **params):
        calls["jvp"] += 1
        return jvp(*args, **params)

    def counted_bind(*args, **params):
        calls["jit inside"] += inside[0]
        return bind(*args, **params)

    monkeypatch.setitem(jax_ad.primitive_linearizations, p, counted_lin)
    monkeypatch.setitem(ad.primitive_jvps, p, counted_jvp)
    monkeypatch.setattr(jit_p, "bind", counted_bind)
    model = ql.loraify(_mlp(getkey()), rank=RANK, key=getkey())
    step, state = _lora_step(model, optax.adam(1e-3))
    jax.jit(step).trace(*state, *_data(getkey()))
    assert calls == {"linearize": DEPTH, "jvp": 0, "jit inside": 0}
