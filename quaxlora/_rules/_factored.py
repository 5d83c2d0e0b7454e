"""The factored LoRA product as one differentiable operation: a primitive,
`factored_p`, whose tangent map is made of labelled contractions
(`_contract.contract_p`).

For a `LoraArray` `W = w + s·f2⊗f1` met by an operand `x` (labelled as in
`_contract.py`), `x·W = x·w + s·t·f2` with `t = x·f1` the rank-sized intermediate:
`f1 = a` and `f2 = b` when `W`'s output axis is free or batched, the other way round
when it is contracted (a transposed use, `x @ W`).

**Forward, not differentiated** (inference): two products and a sum,
`x·w + (s·t)·f2`, with the scale folded into the smaller operand.

**Forward under differentiation** (the primal half of the jvp and linearisation
rules): one product.
A sum of two products that an activation consumes is fused by XLA into the
activation and into its derivative, so both products stay alive until the backward
— one extra activation-sized buffer per adapted layer; one product leaves one
buffer. Of the two one-product forms,

- **merged**, `x·(w + s·f2⊗f1)`, forms the dense weight as a `w`-sized temporary
  (`2·w.size·rank` multiply-adds) and copies nothing activation-sized. It is used
  when `w` is float32 or wider: in a narrower dtype, adding a small update to `w`
  would round it away. And only when the adapter branch's input is `x` itself (not
  under LoRA dropout).
- **concatenated**, `[x | s·t]·[w | f2]`, the two operands joined along the
  contracted axis (`t`'s and `f2`'s rank axis is the continuation of the axis `x`
  and `w` contract): a `w`-sized and an `x`-sized temporary; the product
  accumulates `x·w + s·t·f2` in one pass, so a bfloat16 weight keeps its update.

Either is taken when its `w`-sized temporary is at most `FUSE_MAX_COPY` times the
output buffer it saves, and when the two contractions line up. Otherwise (for
example when the product sums over a stacked `LoraArray`'s batch axis), the
two-product form is used. `t = xa·f1` is computed in every form: the backward needs
it.

**Tangent map**, linear in the tangents `dx, df1, df2` (and `dw` only when `w` is
not behind `stop_gradient`):

    dy = dx·w + s·(dx·f1 + x·df1)·f2 + s·t·df2 (+ x·dw)

Forward mode (`jvp`, `jacfwd`) evaluates it. Reverse mode (`grad`, and
`linearize`) takes it from the linearisation rule, with the one-product forward, and
transposes it one contraction at a time through `contract_p`'s transpose rule; from
the residuals `x, w, f1, f2, s·t` and the output cotangent `g` that is

    ∂f2 = s·tᵀ·g          (contracting the rows)
    u   = s·g·f2ᵀ         (rows × rank)
    ∂f1 = uᵀ·x
    ∂x  = g·wᵀ + u·f1
    ∂w  = gᵀ·x            (only when `w` is not behind `stop_gradient`)

each computed in the operand order that needs no relayout of a large array, which
is what keeps autodiff's `gᵀ·t` from writing a transposed copy of the whole
cotangent. The weight is passed as it is, not through `lax.stop_gradient`: the
tangent map simply has no `dw` term, and a residual that is the weight itself (a
scanned parameter slice) is not copied by `lax.scan`, where a `stop_gradient`
output would be stacked over the iterations — a full copy of the block weights.

**Why a primitive.** As a `jax.custom_jvp`, the product cost `grad` a second trace
of its jvp rule: JAX linearises a custom_jvp by tracing the rule with unknown
tangents and partially evaluating the result, a few milliseconds of trace time per
adapted layer (the whole of the benchmark MLP's trace took 1.7× full fine-tuning's).
A primitive can give `grad` its linearisation directly: the one-product forward
at the level below, and a function of the tangents that binds the tangent map's
contractions. Its other rules: a jvp rule (forward mode), a batching rule (a mapped
axis becomes one more label, as for `contract_p`), the two-product forward as its
lowering, and, met with an unknown operand by partial evaluation (another function's
jvp rule that applies the product to a tangent, in which it is linear), the
two-product forward again, whose operations JAX can transpose.
"""

import functools as ft
import math
from typing import Any, NamedTuple

import jax
import jax.core
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax._src import core as _core
from jax._src.interpreters import ad as _ad
from jax.interpreters import ad, batching, mlir, partial_eval as pe

from ._contract import cast, contract, dot, transpose_to


# The differentiated forward is one product when its `w`-sized temporary (`[w | f2]`
# or `w + s·f2⊗f1`) is at most this many times the output buffer it saves (and
# forming it is then cheap against the product, `rows · w.size` multiply-adds).
FUSE_MAX_COPY = 2
# Whether the one-product forward may be the merged form (the tests switch it off
# to check the concatenated form on every shape).
MERGE_FORWARD = True


def _wide(dtype) -> bool:
    """Whether `w + s·f2⊗f1` keeps a small update in `dtype`: float32 or wider."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32


class Spec(NamedTuple):
    """Static description of one factored product (labels as in `_contract.py`)."""

    xl: tuple[str, ...]
    wl: tuple[str, ...]
    f1l: tuple[str, ...]
    f2l: tuple[str, ...]
    tl: tuple[str, ...]
    out: tuple[str, ...]
    scaling: float
    w_grad: bool  # False with `stop_gradient=True`: the tangent map has no `dw` term
    precision: Any
    preferred_element_type: Any
    # Whether the adapter branch's input is `x` itself (no LoRA dropout); set by
    # `factored_product`.
    shared_input: bool = False
    # The result's labels, when they are `out` reordered (`dot_general`'s order with
    # a `LoraArray` on the left): the transpose is then part of the product, so that
    # `grad` does not linearise it as an operation of its own.
    final: tuple[str, ...] | None = None


def concat_label(spec: Spec) -> str | None:
    """The label along which `[x | s·t]·[w | f2]` equals `x·w + s·t·f2`, or None when
    the two contractions do not line up: `x·w` must contract one axis `c`, `t·f2` only
    the rank axis, and with the rank axis renamed `c`, `t` and `f2` must carry the
    axes of `x` and `w`."""
    c1 = [l for l in spec.xl if l in spec.wl and l not in spec.out]
    c2 = [l for l in spec.tl if l in spec.f2l and l not in spec.out]
    if len(c1) != 1 or c2 != ["k"]:
        return None
    (c,) = c1
    renamed = lambda labels: {c if l == "k" else l for l in labels}
    if renamed(spec.tl) != set(spec.xl) or renamed(spec.f2l) != set(spec.wl):
        return None
    return c


def _vmaps(x) -> set[int]:
    """The `vmap`s (their traces) that map `x`."""
    from jax._src.interpreters.batching import BatchTracer

    out = set()
    while isinstance(x, BatchTracer):
        out.add(id(x._trace))
        x = x.val
    return out


def _mapped_like(f2, w) -> bool:
    """Whether `f2` is mapped by no `vmap` that leaves `w` unmapped. Otherwise (per
    example factors against one weight, as `quaxlora.select_adapter` gives under
    `vmap`) `[w | f2]` would copy `w` once per example."""
    return _vmaps(f2) <= _vmaps(w)


# The arithmetic below binds `lax` primitives, not `+` and `*`: on tracers those are
# `jnp.add` and `jnp.multiply`, jitted functions, each of which `grad` linearises as
# a jaxpr of its own; in the rules, the two sums were more than half of their trace
# time.


def _add(a, b):
    """`a + b` for two arrays of one shape, in `a`'s dtype."""
    return lax.add(a, cast(b, a.dtype))


def _scaled(s: float, a, dtype):
    """`(s·a).astype(dtype)`, binding nothing that would be a no-op (the scale is 1
    with the default `alpha = rank`): fewer operations to trace."""
    if s != 1:
        inexact = jnp.issubdtype(a.dtype, jnp.inexact)
        a = lax.mul(a, np.asarray(s, a.dtype)) if inexact else s * a
    return cast(a, dtype)


def _onto(out, *operand_labels) -> tuple[str, ...]:
    """The labels of `out` that the operands carry, in `out`'s order: the output of
    their product. Under `vmap` an operand may lack the mapped axis that `out` has."""
    return tuple(l for l in out if any(l in labels for labels in operand_labels))


def _sum_onto(terms, out, sizes, dtype) -> Any:
    """The sum of `(array, labels)` terms, in `dtype`, labelled `out`: a term whose
    labels (a subsequence of `out`) lack one of `out` is broadcast along it."""

    def onto(z, zl):
        z = cast(z, dtype)
        if tuple(zl) == tuple(out):
            return z
        shape = tuple(sizes[l] for l in out)
        return lax.broadcast_in_dim(z, shape, tuple(out.index(l) for l in zl))

    return ft.reduce(lax.add, [onto(z, zl) for z, zl in terms])


def _final(spec: Spec, y):
    """`y`, labelled `spec.out`, in the order of `spec.final`."""
    return y if spec.final is None else transpose_to(y, spec.out, spec.final)


def _sizes(spec: Spec, x, w, f1, f2) -> dict[str, int]:
    return (
        dict(zip(spec.xl, x.shape))
        | dict(zip(spec.wl, w.shape))
        | dict(zip(spec.f1l, f1.shape))
        | dict(zip(spec.f2l, f2.shape))
    )


def forward(spec: Spec, x, w, f1, f2, xa=None, *, fuse: bool, dot=dot):
    """`x·w + s·(xa·f1)·f2`, and `t = xa·f1`, where `xa` is the adapter branch's
    input (`x`, or `x` after LoRA dropout). `dot` computes one labelled product
    (`_contract.contract` where an operand is a quax value)."""
    kw = dict(
        precision=spec.precision, preferred_element_type=spec.preferred_element_type
    )
    xa = x if xa is None else xa
    t = dot(xa, spec.xl, f1, spec.f1l, spec.tl, **kw)
    sizes = _sizes(spec, x, w, f1, f2)
    # `s·t` joins `x` in one array, so `x` must be able to hold it.
    fuse = fuse and jnp.issubdtype(x.dtype, jnp.inexact)
    c = concat_label(spec) if fuse else None
    y_size = math.prod(sizes[l] for l in spec.out)
    if c is not None and w.size <= FUSE_MAX_COPY * y_size and _mapped_like(f2, w):
        if (
            MERGE_FORWARD
            and spec.shared_input
            and _wide(w.dtype)
            # (not a factor mapped over an axis of a `vmap` that `w` is not)
            and {*spec.f1l, *spec.f2l} - {"k"} <= set(spec.wl)
            and _mapped_like(f1, w)
        ):
            dl = _onto(spec.wl, spec.f1l, spec.f2l)
            d = dot(f2, spec.f2l, f1, spec.f1l, dl, precision=spec.precision)
            d = _scaled(spec.scaling, d, w.dtype)
            merged = _sum_onto([(w, spec.wl), (d, dl)], spec.wl, sizes, w.dtype)
            return _final(spec, dot(x, spec.xl, merged, spec.wl, spec.out, **kw)), t
        renamed = lambda labels: tuple(c if l == "k" else l for l in labels)
        st = transpose_to(_scaled(spec.scaling, t, x.dtype), renamed(spec.tl), spec.xl)
        f2w = transpose_to(_scaled(1, f2, w.dtype), renamed(spec.f2l), spec.wl)
        xx = lax.concatenate([x, st], spec.xl.index(c))
        ww = lax.concatenate([w, f2w], spec.wl.index(c))
        return _final(spec, dot(xx, spec.xl, ww, spec.wl, spec.out, **kw)), t
    bl = _onto(spec.out, spec.xl, spec.wl)
    base = dot(x, spec.xl, w, spec.wl, bl, **kw)
    # Fold the scale into whichever operand of the second product is smaller.
    if t.size < f2.size:
        st, sf2 = _scaled(spec.scaling, t, t.dtype), _scaled(1, f2, t.dtype)
    else:
        st, sf2 = t, _scaled(spec.scaling, f2, t.dtype)
    dl = _onto(spec.out, spec.tl, spec.f2l)
    delta = dot(st, spec.tl, sf2, spec.f2l, dl, **kw)
    y = _sum_onto([(base, bl), (delta, dl)], spec.out, sizes, base.dtype)
    return _final(spec, y), t


def factored_product(spec: Spec, x, w, f1, f2, xa=None):
    """`einsum(x, w + s·f2⊗f1 -> out)` without forming the sum; see the module
    docstring. All operands are plain arrays; `xa`, the adapter branch's input,
    defaults to `x` (it differs under LoRA dropout)."""
    if xa is None or xa is x:
        spec = spec._replace(shared_input=True)
        return factored_p.bind(x, w, f1, f2, x, spec=spec)
    return factored_p.bind(x, w, f1, f2, xa, spec=spec)


def _tangent(spec: Spec, primals, t, tangents, dtype):
    """The tangent map `dy`, in `dtype`: a sum of labelled contractions, whose
    transposes are the backward of the module docstring. `None` when every term is
    zero."""
    x, w, f1, f2, xa = primals
    dx, dw, df1, df2, dxa = (
        None if type(d) in (ad.Zero, jax.custom_derivatives.SymbolicZero) else d
        for d in tangents
    )
    kw = dict(
        precision=spec.precision, preferred_element_type=spec.preferred_element_type
    )
    s = spec.scaling
    # dy = dx·w + s·(dxa·f1 + xa·df1)·f2 + s·t·df2 (+ x·dw)
    terms, dt = [], []

    def term(a, al, b, bl):
        labels = _onto(spec.out, al, bl)
        terms.append((contract(a, al, b, bl, labels, **kw), labels))

    if dx is not None:
        term(dx, spec.xl, w, spec.wl)
    if dxa is not None:
        dt.append(contract(dxa, spec.xl, f1, spec.f1l, spec.tl, **kw))
    if df1 is not None:
        dt.append(contract(xa, spec.xl, df1, spec.f1l, spec.tl, **kw))
    if dt:
        term(_scaled(s, ft.reduce(_add, dt), t.dtype), spec.tl, f2, spec.f2l)
    if df2 is not None:
        term(_scaled(s, t, t.dtype), spec.tl, df2, spec.f2l)
    if dw is not None and spec.w_grad:
        term(x, spec.xl, dw, spec.wl)
    if not terms:
        return None
    return _final(spec, _sum_onto(terms, spec.out, _sizes(spec, x, w, f1, f2), dtype))


# `factored_p`: the product as one primitive (see "Why a primitive" above). Not
# differentiated, it is the two-product forward. Differentiated, it is never
# staged: its jvp rule (forward mode) and its linearisation rule (`grad`,
# `jax.linearize`) put the one-product forward and the tangent map's contractions
# in its place.


def _impl(x, w, f1, f2, xa, *, spec: Spec):
    return forward(spec, x, w, f1, f2, xa, fuse=False)[0]


def _aval(args, spec: Spec):
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in args]
    z = jax.eval_shape(ft.partial(_impl, spec=spec), *structs)
    return jax.core.ShapedArray(z.shape, z.dtype)


_cached_aval = ft.lru_cache(maxsize=4096)(_aval)


def _abstract_eval(*avals, spec: Spec):
    args = tuple((a.shape, a.dtype) for a in avals)
    try:
        return _cached_aval(args, spec)
    except TypeError:  # an unhashable parameter (a precision config, say)
        return _aval(args, spec)


def _jvp(primals, tangents, *, spec: Spec):
    y, t = forward(spec, *primals, fuse=True)
    dy = _tangent(spec, primals, t, tangents, y.dtype)
    return y, ad.Zero(jax.typeof(y).to_tangent_aval()) if dy is None else dy


def _linearize(*args, spec: Spec):
    # JAX calls `(is_vjp, nonzeros, *primals)`; only the last two are used.
    nonzeros, primals = args[-6], args[-5:]
    y, t = forward(spec, *primals, fuse=True)
    x_nz, w_nz, f1_nz, f2_nz, xa_nz = nonzeros
    nonzero = x_nz or (w_nz and spec.w_grad) or f1_nz or f2_nz or xa_nz

    def linearized(residuals, *tangents):
        primals, t = residuals
        dy = _tangent(spec, primals, t, tangents, y.dtype)
        return ad.Zero(jax.typeof(y).to_tangent_aval()) if dy is None else dy

    return y, nonzero, (primals, t), linearized


def _partial_eval(trace, *tracers, spec: Spec):
    # Met by partial evaluation with an unknown operand: inside another function's
    # jvp rule that applies the product to a tangent (it is linear in `x`). Staged as
    # the two-product forward, whose operations JAX can transpose.
    if all(t.pval.is_known() for t in tracers):
        return trace.default_process_primitive(factored_p, tracers, dict(spec=spec))
    with _core.set_current_trace(trace):
        return _impl(*tracers, spec=spec)


def _batch(args, dims, *, spec: Spec):
    # The mapped axis becomes one more label, as for `contract_p`: `x`, `w` and the
    # factors each keep it when mapped, and the forward then picks its form by the
    # labels (a factor mapped over an axis `w` is not mapped over is neither
    # concatenated to nor merged into `w`).
    taken = {*spec.xl, *spec.wl, *spec.f1l, *spec.f2l, *spec.tl, *spec.out}
    label = next(f"V{i}" for i in range(len(taken) + 1) if f"V{i}" not in taken)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    x, w, f1, f2, xa = args
    bx, bw, b1, b2, bxa = dims
    if (bx is None) != (bxa is None):  # `x` and `xa` share their labels
        if bx is None:
            x, bx = jnp.broadcast_to(x, (size, *x.shape)), 0
        else:
            xa, bxa = jnp.broadcast_to(xa, (size, *xa.shape)), 0

    def mapped(a, d, labels):
        if d is None:
            return a, labels
        return jnp.moveaxis(a, d, 0), (label, *labels)

    x, xl = mapped(x, bx, spec.xl)
    xa, _ = mapped(xa, bxa, spec.xl)
    w, wl = mapped(w, bw, spec.wl)
    f1, f1l = mapped(f1, b1, spec.f1l)
    f2, f2l = mapped(f2, b2, spec.f2l)
    # `t = xa·f1` in its natural order, keeping what it kept and the mapped axis.
    kept = {*spec.tl, label}
    tl = (
        [l for l in xl if l in f1l and l in kept]
        + [l for l in xl if l not in f1l]
        + [l for l in f1l if l not in xl]
    )
    final = None if spec.final is None else (label, *spec.final)
    new = spec._replace(
        xl=xl,
        wl=wl,
        f1l=f1l,
        f2l=f2l,
        tl=tuple(tl),
        out=(label, *spec.out),
        final=final,
    )
    return factored_p.bind(x, w, f1, f2, xa, spec=new), 0


factored_p = jexc.Primitive("quaxlora_factored")
factored_p.def_impl(_impl)
factored_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(factored_p, mlir.lower_fun(_impl, multiple_results=False))
ad.primitive_jvps[factored_p] = _jvp
pe.custom_partial_eval_rules[factored_p] = _partial_eval
batching.primitive_batchers[factored_p] = _batch
# Not in `jax.interpreters.ad`; without it (another JAX), `grad` linearises through
# the jvp rule instead, the same result traced more slowly.
if hasattr(_ad, "primitive_linearizations"):
    _ad.primitive_linearizations[factored_p] = _linearize
