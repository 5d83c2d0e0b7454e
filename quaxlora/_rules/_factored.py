"""The factored LoRA product as one differentiable operation: a `custom_jvp` whose
tangent map is made of labelled contractions (`_contract.contract_p`).

For a `LoraArray` `W = w + s·f2⊗f1` met by an operand `x` (labelled as in
`_contract.py`), `x·W = x·w + s·t·f2` with `t = x·f1` the rank-sized intermediate:
`f1 = a` and `f2 = b` when `W`'s output axis is free or batched, the other way round
when it is contracted (a transposed use, `x @ W`).

**Forward, not differentiated** (inference): two products and a sum,
`x·w + (s·t)·f2`, with the scale folded into the smaller operand.

**Forward under differentiation** (the primal half of the jvp rule): one product.
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

Forward mode (`jvp`, `jacfwd`, `linearize`) evaluates it. Reverse mode transposes
it, one contraction at a time, through `contract_p`'s transpose rule; from the
residuals `x, w, f1, f2, s·t` and the output cotangent `g` that is

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
"""

import functools as ft
from typing import Any, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np

from ._contract import cast, contract, dot, size_of, transpose_to


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
# `jnp.add` and `jnp.multiply`, jitted functions, and under `grad` each jitted call
# in the jvp rule is partially evaluated as a jaxpr of its own, which made the
# rule's two sums more than half of its trace time.


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


def forward(spec: Spec, x, w, f1, f2, xa=None, *, fuse: bool, dot=dot):
    """`x·w + s·(xa·f1)·f2`, and `t = xa·f1`, where `xa` is the adapter branch's
    input (`x`, or `x` after LoRA dropout). `dot` computes one labelled product
    (`_contract.contract` where an operand is a quax value)."""
    kw = dict(
        precision=spec.precision, preferred_element_type=spec.preferred_element_type
    )
    xa = x if xa is None else xa
    t = dot(xa, spec.xl, f1, spec.f1l, spec.tl, **kw)
    # `s·t` joins `x` in one array, so `x` must be able to hold it.
    fuse = fuse and jnp.issubdtype(x.dtype, jnp.inexact)
    c = concat_label(spec) if fuse else None
    y_size = size_of(spec.out, x, spec.xl, w, spec.wl)
    if c is not None and w.size <= FUSE_MAX_COPY * y_size and _mapped_like(f2, w):
        if (
            MERGE_FORWARD
            and spec.shared_input
            and _wide(w.dtype)
            and _mapped_like(f1, w)
        ):
            d = dot(f2, spec.f2l, f1, spec.f1l, spec.wl, precision=spec.precision)
            merged = _add(w, _scaled(spec.scaling, d, w.dtype))
            return dot(x, spec.xl, merged, spec.wl, spec.out, **kw), t
        renamed = lambda labels: tuple(c if l == "k" else l for l in labels)
        st = transpose_to(_scaled(spec.scaling, t, x.dtype), renamed(spec.tl), spec.xl)
        f2w = transpose_to(_scaled(1, f2, w.dtype), renamed(spec.f2l), spec.wl)
        xx = lax.concatenate([x, st], spec.xl.index(c))
        ww = lax.concatenate([w, f2w], spec.wl.index(c))
        return dot(xx, spec.xl, ww, spec.wl, spec.out, **kw), t
    base = dot(x, spec.xl, w, spec.wl, spec.out, **kw)
    # Fold the scale into whichever operand of the second product is smaller.
    if t.size < f2.size:
        st, sf2 = _scaled(spec.scaling, t, t.dtype), _scaled(1, f2, t.dtype)
    else:
        st, sf2 = t, _scaled(spec.scaling, f2, t.dtype)
    delta = dot(st, spec.tl, sf2, spec.f2l, spec.out, **kw)
    return _add(base, delta), t


def factored_product(spec: Spec, x, w, f1, f2, xa=None):
    """`einsum(x, w + s·f2⊗f1 -> out)` without forming the sum; see the module
    docstring. All operands are plain arrays; `xa`, the adapter branch's input,
    defaults to `x` (it differs under LoRA dropout)."""
    if xa is None or xa is x:
        return _factored_product(spec._replace(shared_input=True), x, w, f1, f2, x)
    return _factored_product(spec, x, w, f1, f2, xa)


@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _factored_product(spec: Spec, x, w, f1, f2, xa):
    return forward(spec, x, w, f1, f2, xa, fuse=False)[0]


@ft.partial(_factored_product.defjvp, symbolic_zeros=True)
def _jvp(spec: Spec, primals, tangents):
    x, w, f1, f2, xa = primals
    dx, dw, df1, df2, dxa = (None if _is_zero(d) else d for d in tangents)
    y, t = forward(spec, x, w, f1, f2, xa, fuse=True)
    kw = dict(
        precision=spec.precision, preferred_element_type=spec.preferred_element_type
    )
    s = spec.scaling
    # dy = dx·w + s·(dxa·f1 + xa·df1)·f2 + s·t·df2 (+ x·dw): labelled
    # contractions, whose transposes are the backward of the module docstring.
    terms, dt = [], []
    if dx is not None:
        terms.append(contract(dx, spec.xl, w, spec.wl, spec.out, **kw))
    if dxa is not None:
        dt.append(contract(dxa, spec.xl, f1, spec.f1l, spec.tl, **kw))
    if df1 is not None:
        dt.append(contract(xa, spec.xl, df1, spec.f1l, spec.tl, **kw))
    if dt:
        sdt = _scaled(s, ft.reduce(_add, dt), t.dtype)
        terms.append(contract(sdt, spec.tl, f2, spec.f2l, spec.out, **kw))
    if df2 is not None:
        st = _scaled(s, t, t.dtype)
        terms.append(contract(st, spec.tl, df2, spec.f2l, spec.out, **kw))
    if dw is not None and spec.w_grad:
        terms.append(contract(x, spec.xl, dw, spec.wl, spec.out, **kw))
    if not terms:
        return y, jnp.zeros_like(y)
    dy = _scaled(1, terms[0], y.dtype)
    for term in terms[1:]:
        dy = _add(dy, term)
    return y, dy


def _is_zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)
