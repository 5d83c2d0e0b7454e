import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import quax
from jaxtyping import Array, PRNGKeyArray


def is_value(x: Any) -> bool:
    """Whether `x` is a quax value (a `LoraArray`, a quantised weight, ...)."""
    return isinstance(x, quax.Value)


def replace_fields(x: Any, **changes: Any) -> Any:
    """The module `x` with some fields (static ones, and `None` ones, included)
    changed, without re-running `__init__` (whose checks need a weight, which an
    adapter pytree lacks)."""
    new = object.__new__(type(x))
    for f in dataclasses.fields(x):
        object.__setattr__(new, f.name, changes.get(f.name, getattr(x, f.name)))
    return new


def dense_weight(w: Any) -> Array:
    """The plain array a base weight stands for (dequantising a quax-valued base)."""
    return w.materialise() if is_value(w) else w


def at_least_float32(dtype: Any) -> Any:
    """`dtype` if it is float32 or wider, else float32. (Not `jnp.promote_types`,
    which raises for bfloat16 or float64 under `jax_numpy_dtype_promotion="strict"`.)
    """
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"`rank` must be a positive int, got {rank!r}.")
    return int(rank)


def scaling_for(rank: int, alpha: float | None, rslora: bool) -> float:
    """The LoRA scale: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA."""
    alpha = rank if alpha is None else alpha
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


class LoraArray(quax.ArrayValue):
    """A frozen weight plus a trainable low-rank update, `w + scaling * b @ a`, kept
    in factored form.

    For a weight of shape `(*batch, out, *rest)` — `(out, in)` for `eqx.nn.Linear`,
    `(out, in / groups, *kernel)` for a convolution, `(vocab, dim)` for an embedding
    table — the factors are `a` of shape `(*batch, rank, *rest)` (random init) and `b`
    of shape `(*batch, out, rank)` (zero init), matching the LoRA paper's and PEFT's
    `A` and `B`. The array stands for
    `w + scaling * tensordot(b, a, 1)` (batched over the leading `*batch` axes, as
    produced by layers stacked with `eqx.filter_vmap`), but that sum is never formed:
    under `quax.quaxify`, each primitive that meets a `LoraArray` is computed from the
    factors directly. See the supported-primitives page of the documentation.

    !!! Example

        ```python
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import quaxlora as ql

        w = jnp.ones((4, 3))
        lora = ql.LoraArray(w, rank=2, key=jr.key(0))
        x = jnp.ones(3)
        y = quax.quaxify(lambda w, x: w @ x)(lora, x)  # equals w @ x at init
        ```
    """

    weight: Any
    a: Array
    b: Array
    rank: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    rslora: bool = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    dropout_key: Any
    magnitude: Array | None  # DoRA's trained magnitude; None for plain LoRA
    # DoRA norms carried by a slice of a DoRA array (those of the whole array, which
    # the slice alone cannot compute); None: computed from the factors when needed.
    norm: Array | None
    dora_axis: int = eqx.field(static=True)
    init: str = eqx.field(static=True)

    def __init__(
        self,
        weight: Any,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        rslora: bool = False,
        stop_gradient: bool = True,
        allow_materialise: bool = False,
        dropout: float = 0.0,
        dropout_key: PRNGKeyArray | None = None,
        batch_ndim: int = 0,
        dtype: Any = None,
        key: PRNGKeyArray | None = None,
        a: Array | None = None,
        b: Array | None = None,
        use_dora: bool = False,
        magnitude: Array | None = None,
        dora_axis: int = 0,
        init: str = "default",
    ):
        """**Arguments:**

        - `weight`: the frozen base weight, of shape `(*batch, out, *rest)` with
            `rest` non-empty. May itself be a `quax.ArrayValue` (a quantised base).
        - `rank`: the rank `r` of the update. Inferred from `a` when factors are given.
        - `alpha`: the LoRA alpha; defaults to `rank`, so that `scaling == 1`.
        - `rslora`: use rank-stabilised scaling `alpha / sqrt(rank)` instead of
            `alpha / rank`.
        - `stop_gradient`: no gradient ever reaches the base weight, even when the
            whole model is differentiated (the rules' derivatives have no term in
            it; see the primitives page).
        - `allow_materialise`: for a primitive without a factored rule, form
            `w + scaling * b @ a` densely instead of raising an error.
        - `dropout`: LoRA dropout rate `p` (PEFT's `lora_dropout`): the adapter
            branch sees `x` with each element zeroed with probability `p` (and the
            rest scaled by `1 / (1 - p)`), `x·w + s·b·a·drop(x)`. It is applied only
            while a key is set (`quaxlora.set_dropout_key`), so it is off at
            inference and in `quaxlora.merge`.
        - `dropout_key`: the PRNG key of the dropout mask (see
            `quaxlora.set_dropout_key`, which sets one per layer).
        - `batch_ndim`: how many leading axes of `weight` are batch axes (1 for a
            layer stack built with `eqx.filter_vmap`).
        - `dtype`: dtype of the factors; defaults to the weight's dtype.
        - `key`: PRNG key used to initialise `a`. Required unless `a` and `b` are
            given.
        - `a`, `b`: explicit factors, instead of the default initialisation
            (`a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, `b = 0`).
        - `use_dora`: DoRA (weight-decomposed LoRA): the array stands for
            `m * V / norm(V)` with `V = w + scaling * b @ a`, the norm taken along
            every non-batch axis but `dora_axis`, and `m` a trained magnitude,
            initialised to `norm(V)` (so the array equals `V` at initialisation).
        - `magnitude`: an explicit DoRA magnitude `m`, of shape
            `(*batch, weight.shape[batch_ndim + dora_axis])`; implies `use_dora`.
        - `dora_axis`: the (non-batch) weight axis that DoRA's magnitude runs
            along: 0, the output axis, for a linear or convolution weight (PEFT's
            convention); 1, the feature axis, for an `(vocab, dim)` embedding table.
        - `init`: the name of the initialisation the factors came from (set by
            `quaxlora.loraify`); `"pissa"` and `"olora"` mark an adapter whose
            `weight` is the residual of the original weight, which adapter files
            record.
        """
        shape = tuple(weight.shape)
        if not isinstance(batch_ndim, int) or batch_ndim < 0:
            raise ValueError(
                f"`batch_ndim` must be a non-negative int, got {batch_ndim}"
            )
        if len(shape) < batch_ndim + 2:
            raise ValueError(
                "`LoraArray` needs a weight with at least 2 non-batch axes "
                f"`(out, in, ...)`; got shape {shape} with `batch_ndim={batch_ndim}`."
            )
        if not jnp.issubdtype(weight.dtype, jnp.floating):
            raise ValueError(
                "`LoraArray` needs a floating-point weight; got dtype "
                f"{weight.dtype}. Integer (quantised) bases must be wrapped in a "
                "`quax.ArrayValue` whose dtype is floating."
            )
        batch, out, rest = (
            shape[:batch_ndim],
            shape[batch_ndim],
            shape[batch_ndim + 1 :],
        )
        if a is None and b is None:
            rank = check_rank(rank)
            if key is None:
                raise ValueError("`LoraArray` needs a `key` to initialise `a`.")
            dtype = weight.dtype if dtype is None else dtype
            bound = 1 / math.sqrt(math.prod(rest))
            a = jr.uniform(key, (*batch, rank, *rest), dtype, -bound, bound)
            b = jnp.zeros((*batch, out, rank), dtype)
        elif a is None or b is None:
            raise ValueError("Pass both `a` and `b` to `LoraArray`, or neither.")
        else:
            r = a.shape[batch_ndim] if a.ndim > batch_ndim else None
            rank = check_rank(r if rank is None else rank)
            want_a, want_b = (*batch, rank, *rest), (*batch, out, rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(
                    f"`LoraArray` factors do not match a weight of shape {shape} "
                    f"(`batch_ndim={batch_ndim}`, `rank={rank}`): expected `a` of "
                    f"shape {want_a} and `b` of shape {want_b}, got {tuple(a.shape)} "
                    f"and {tuple(b.shape)}."
                )
            for name, f in (("a", a), ("b", b)):
                if not jnp.issubdtype(f.dtype, jnp.floating):
                    raise ValueError(f"`{name}` must be floating, got {f.dtype}.")
            if dtype is not None:
                a, b = a.astype(dtype), b.astype(dtype)
        self.weight = weight
        self.a = a
        self.b = b
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = rslora
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        if isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.dropout = float(dropout)
        self.dropout_key = dropout_key
        self.norm = None
        self.magnitude = None
        core = len(shape) - batch_ndim
        if isinstance(dora_axis, bool) or dora_axis not in range(core):
            raise ValueError(
                f"`dora_axis` must be a weight axis in `range({core})`, got "
                f"{dora_axis!r}."
            )
        self.dora_axis = int(dora_axis)
        self.init = init
        if magnitude is None and use_dora:
            from ._dora import dora_norm

            magnitude = dora_norm(self).astype(a.dtype)
        if magnitude is not None:
            want = (*batch, shape[batch_ndim + self.dora_axis])
            if tuple(magnitude.shape) != want:
                raise ValueError(
                    f"`magnitude` must have shape {want} for a weight of shape "
                    f"{shape} (`batch_ndim={batch_ndim}`, `dora_axis={dora_axis}`); "
                    f"got {tuple(magnitude.shape)}."
                )
            if not jnp.issubdtype(magnitude.dtype, jnp.floating):
                raise ValueError(
                    f"`magnitude` must be floating, got {magnitude.dtype}."
                )
            self.magnitude = magnitude

    @property
    def w(self) -> Any:
        """The frozen base weight, through `lax.stop_gradient` if `stop_gradient`.

        Rules whose backward keeps the weight use `weight` itself instead, with a
        derivative that ignores its tangent: under `lax.scan` a `stop_gradient`
        output kept for the backward is stacked over the iterations (a weight copy).
        """
        if self.stop_gradient:
            return jtu.tree_map(lax.stop_gradient, self.weight)
        return self.weight

    @property
    def dropout_active(self) -> bool:
        """Whether LoRA dropout applies: `dropout > 0` and a key is set."""
        return self.dropout > 0 and self.dropout_key is not None

    def adapter_input(self, x: Any) -> Any:
        """The input of the adapter branch: `x`, or `x` after LoRA dropout when
        `dropout > 0` and a key is set. The mask has `x`'s shape: under `jax.vmap`
        with one key, every example gets the same mask (vmap over keys too)."""
        if not self.dropout_active:
            return x
        if is_value(x):
            raise TypeError(
                "LoRA dropout needs a plain array as the adapter's input, got a "
                f"`{type(x).__name__}`."
            )
        if self.dropout_key.shape != ():
            raise ValueError(
                "This `LoraArray` holds a stack of dropout keys (a layer stack); "
                "apply it one layer at a time (`lax.scan` over the stack) to use "
                "dropout."
            )
        keep = jr.bernoulli(self.dropout_key, 1 - self.dropout, x.shape)
        scale = jnp.asarray(1 / (1 - self.dropout), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))

    @property
    def scaling(self) -> float:
        """`alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA."""
        return scaling_for(self.rank, self.alpha, self.rslora)

    @property
    def batch_ndim(self) -> int:
        """Number of leading batch axes (shared by `w`, `a` and `b`)."""
        return self.b.ndim - 2

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.weight.shape, self.weight.dtype)

    def __getattribute__(self, name: str, /) -> Any:
        # Plain attribute access. `eqx.Module.__getattribute__` checks every access
        # and wraps each bound method in a new `BoundMethod` module, so that
        # `jax.jit(module.method)` sees the module as a pytree argument. The rules
        # read a `LoraArray`'s fields many times per traced product (a quarter of
        # the Python calls that quaxify added to the benchmark GPT's trace), and
        # nothing passes its methods to `jax.jit`. (quax does the same for its
        # own dense values.)
        return object.__getattribute__(self, name)

    @property
    def use_dora(self) -> bool:
        """Whether this is a DoRA array (it has a `magnitude`)."""
        return self.magnitude is not None

    def delta(self, dtype: Any = None) -> Array:
        """The dense low-rank update `scaling * b @ a`, in `dtype` (default: the
        weight's). (With DoRA this is the update of the direction `V = w + delta`;
        `merged()` is the weight the array stands for.)"""
        n = self.batch_ndim
        batch = tuple(range(n))
        d = lax.dot_general(self.b, self.a, (((n + 1,), (n,)), (batch, batch)))
        return (self.scaling * d).astype(self.dtype if dtype is None else dtype)

    def merged(self) -> Array:
        """The dense array `w + scaling * b @ a` (with DoRA, `m * V / norm(V)` for
        that `V`), regardless of `allow_materialise`."""
        v = dense_weight(self.w) + self.delta()
        if self.magnitude is not None:
            from ._dora import dora_scale, scale_along

            n = self.batch_ndim
            labels = [f"W{i}" for i in range(self.ndim)]
            sl = labels[:n] + [labels[n + self.dora_axis]]
            v = scale_along(v, labels, dora_scale(self).astype(v.dtype), sl)
        return v.astype(self.dtype)

    def materialise(self) -> Array:
        if self.allow_materialise:
            return self.merged()
        raise TypeError(
            "Refusing to materialise a `LoraArray` (that would form the full-size "
            "`w + scaling * b @ a`). Pass `allow_materialise=True` to allow it, or "
            "use `quaxlora.merge` to get a plain model."
        )

    @staticmethod
    def default(primitive: jexc.Primitive, values: Any, params: dict[str, Any]) -> Any:
        loras = [v for v in values if isinstance(v, LoraArray)]
        if not all(v.allow_materialise for v in loras):
            raise TypeError(
                f"quaxlora has no factored rule for the primitive `{primitive}` "
                "applied to a `LoraArray`, and will not form the dense "
                "`w + scaling * b @ a` silently. Either pass "
                "`allow_materialise=True` to `quaxlora.loraify` (or `LoraArray`) to "
                "use the dense fallback for such primitives, exclude this weight "
                "from `loraify`'s targets, or `quaxlora.merge` the model first."
            )
        arrays = [v.materialise() if is_value(v) else v for v in values]
        return primitive.bind(*arrays, **params)
