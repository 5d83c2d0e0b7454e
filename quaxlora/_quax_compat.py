"""`jax.custom_vjp` under `quax.quaxify`, for quax releases that lack it.

quax 0.4.6 (the newest release) has no `process_custom_vjp_call` on its trace, so any
`jax.custom_vjp` met inside `quax.quaxify` raises `NotImplementedError: _QuaxTrace must
override process_custom_vjp_call` — diffrax's adjoints, `eqx.filter_custom_vjp`,
`optax` and `jax.nn` functions alike, even when the custom_vjp only touches plain
arrays. quax's repository has a merged change adding one (nstarman/quax pull request
219) that no release carries yet. Until one does, this module defines the method on
quax's trace; when quax provides its own, it steps aside (`PATCHED` is then `False`,
and `tests/test_custom_vjp.py` notices).

How it works. Inside `quaxify`, each argument of the custom_vjp is a quax value (a
plain array is a dense value). The call is bound once more on the trace below, at the
level of the values' leaves (a `LoraArray` is its `weight`, `a` and `b`), with
`fun`, `fwd` and `bwd` wrapped so that each rebuilds the values from the leaves and
runs the user's function under a quax trace again — so all three see what the primal
sees: a `LoraArray` where the primal had one.

- `fwd`'s residuals and outputs are flattened to leaves; residuals that JAX pruned as
    forwarded inputs are spliced back in first, and the non-dense input values are
    saved as residuals too (the backward needs them, below).
- `bwd` gets the residuals and output cotangents back as values. For an input that
    is a non-dense value it returns a cotangent of the *array the value stands for*
    (for a `LoraArray`, a dense `(out, in)` cotangent); that is pulled back to the
    value's leaves by the derivative of `<value, cotangent>` — computed by the value's
    own `dot_general` rule, so for a `LoraArray` `∂a = s·bᵀ·c`, `∂b = s·c·aᵀ` without
    forming `w + s·b@a`. A cotangent that is itself a value of the input's structure
    is taken leaf by leaf.
"""

import importlib.metadata
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.extend.linear_util as lu
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import quax
from jax._src import core
from jax._src.ad_util import Zero
from jax.custom_derivatives import SymbolicZero


try:  # quax >= 0.4.6
    from quax._trace import _QuaxTrace, _QuaxTracer
except ImportError:  # earlier releases kept the trace in `_core`
    from quax._core import _QuaxTrace, _QuaxTracer  # pyright: ignore


def _version(name: str) -> tuple[int, ...]:
    parts = importlib.metadata.version(name).split(".")[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


# jax 0.9.2 added `avals` to `Primitive.bind_with_trace` (jax-ml/jax#35730).
_JAX_GE_0_9_2 = _version("jax") >= (0, 9, 2)


def _typeof(x: Any) -> Any:
    # `core.get_aval` is the name on older jax, which has no `jax.typeof`.
    return jax.typeof(x) if hasattr(jax, "typeof") else core.get_aval(x)  # pyright: ignore[reportAttributeAccessIssue]


def _ct_aval(aval: Any) -> Any:
    return aval.to_ct_aval() if hasattr(aval, "to_ct_aval") else aval.to_tangent_aval()


def _is_dense(value: Any) -> bool:
    return type(value).__name__ == "_DenseArrayValue"


class _nested_trace:  # noqa: N801
    """A new quax trace with `tag` on top of the current one, for a block."""

    def __init__(self, tag: Any):
        self.tag = tag

    def __enter__(self) -> Any:
        self._take = core.take_current_trace()
        trace = _QuaxTrace(self._take.__enter__(), self.tag)
        self._set = core.set_current_trace(trace)
        self._set.__enter__()
        return trace

    def __exit__(self, *exc: Any) -> None:
        self._set.__exit__(*exc)
        self._take.__exit__(*exc)


def _wrap(trace: Any, value: Any) -> Any:
    if type(value) is SymbolicZero:
        return value
    if _is_dense(value) and not isinstance(value.array, (jax.Array, core.Tracer)):
        # A Python or NumPy constant (`eqx.filter_custom_vjp` keeps Python bools
        # among its residuals, and branches on them): passed as it is, as JAX does.
        return value.array
    return _QuaxTracer(trace, value)


def _values(trace: Any, outs: Sequence[Any]) -> list[Any]:
    """Quax values of a function's outputs (a symbolic zero becomes a zero array)."""
    outs = [
        # `SymbolicZero.aval` is typed `AbstractValue`; here it is a `ShapedArray`.
        jnp.zeros(x.aval.shape, x.aval.dtype) if type(x) is SymbolicZero else x  # pyright: ignore[reportAttributeAccessIssue]
        for x in outs
    ]
    return [trace.to_value(x) for x in outs]


@partial(lu.transformation_with_aux2, use_eq_store=True)
def _fun(f: Callable, store: Any, tag: Any, in_tree: Any, *leaves: Any) -> Any:
    with _nested_trace(tag) as trace:
        values = jtu.tree_unflatten(in_tree, leaves)
        outs = _values(trace, f(*[_wrap(trace, v) for v in values]))
    out_leaves, out_tree = jtu.tree_flatten(outs)
    store.store(out_tree)
    return out_leaves


# `DynamicJaxprTrace` may run `fwd` again (it resets the stores of its thunk), hence
# an equality store, as JAX's own `_flatten_fwd` has.
@partial(lu.transformation_with_aux2, use_eq_store=True)
def _fwd(
    f: Callable, store: Any, tag: Any, in_tree: Any, user_trees: Callable, *args: Any
) -> Any:
    leaves, nonzeros = args[::2], args[1::2]
    values = jtu.tree_unflatten(in_tree, leaves)
    # A value is perturbed if any of its leaves is.
    counts = [len(jtu.tree_leaves(v)) for v in values]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    perturbed = [any(nonzeros[s : s + c]) for s, c in zip(starts, counts)]
    with _nested_trace(tag) as trace:
        user_in = [_wrap(trace, v) for v in values]
        user_args = [x for pair in zip(user_in, perturbed) for x in pair]
        outs = f(*user_args)
        _, res_tree, forwards = user_trees()
        n_res = res_tree.num_leaves - sum(i is not None for i in forwards)
        pruned, primals = outs[:n_res], outs[n_res:]
        pruned = iter(pruned)
        res = [next(pruned) if i is None else user_in[i] for i in forwards]
        res, primals = _values(trace, res), _values(trace, primals)
    # The non-dense inputs are kept for `bwd`'s pull-back of their cotangents.
    res = res + [v for v in values if not _is_dense(v)]
    res_leaves, res_tree = jtu.tree_flatten(res)
    out_leaves, out_tree = jtu.tree_flatten(primals)
    out_avals = tuple(type(v).aval(v) for v in primals)
    store.store((out_tree, res_tree, out_avals))
    return [*res_leaves, *out_leaves]


def _pull_back(value: Any, ct: Any) -> Any:
    """Cotangents for the leaves of the quax value `value`, from a cotangent `ct` of
    the array it stands for: the derivative of `<value, ct>`."""
    axes = tuple(range(ct.ndim))
    ct = lax.stop_gradient(ct.astype(value.dtype))
    pair = quax.quaxify(lambda v: lax.dot_general(v, ct, ((axes, axes), ((), ()))))
    out, vjp = jax.vjp(pair, value)
    (leaf_cts,) = vjp(jnp.ones_like(out))
    return jtu.tree_leaves(leaf_cts)


def _leaf_cts(value: Any, ct: Any, avals: Sequence[Any]) -> list[Any]:
    """The cotangents of the leaves of an input (`value`, `None` if dense), from the
    user's cotangent `ct` for it."""
    if ct is None or isinstance(ct, (Zero, SymbolicZero)):
        return [Zero(_ct_aval(a)) for a in avals]
    if _is_dense(ct):
        ct = ct.array
    if value is None:
        return [ct.materialise() if isinstance(ct, quax.Value) else ct]
    if isinstance(ct, quax.Value):
        if jtu.tree_structure(ct) == jtu.tree_structure(value):
            return jtu.tree_leaves(ct)  # leaf by leaf, as quax's custom_jvp does
        ct = ct.materialise()
    return _pull_back(value, ct)


def _out_cts(
    out_tree: Any, avals: Sequence[Any], leaves: Sequence[Any], symbolic_zeros: bool
) -> list[Any]:
    """The output cotangents as values: a symbolic zero where every leaf is one."""
    outs = jtu.tree_unflatten(out_tree, [0] * out_tree.num_leaves)
    cts, i = [], 0
    for v, aval in zip(outs, avals):
        n = len(jtu.tree_leaves(v))
        part, i = leaves[i : i + n], i + n
        if symbolic_zeros and all(type(x) is SymbolicZero for x in part):
            cts.append(SymbolicZero(_ct_aval(aval)))
            continue
        part = [
            jnp.zeros(x.aval.shape, x.aval.dtype) if type(x) is SymbolicZero else x  # pyright: ignore[reportAttributeAccessIssue]
            for x in part
        ]
        cts.append(jtu.tree_unflatten(jtu.tree_structure(v), part))
    return cts


def _bwd(
    f: Callable,
    tag: Any,
    inputs: Sequence[tuple[bool, list[Any]]],
    trees: Callable,
    symbolic_zeros: bool,
) -> Callable:
    # `inputs`: per input value, whether it is dense, and its leaves' avals.
    n_kept = sum(not dense for dense, _ in inputs)

    def bwd(*args: Any) -> list[Any]:
        out_tree, res_tree, out_avals = trees()
        res = jtu.tree_unflatten(res_tree, args[: res_tree.num_leaves])
        res, kept = res[: len(res) - n_kept], iter(res[len(res) - n_kept :])
        cts_out = args[res_tree.num_leaves :]
        outs = _out_cts(out_tree, out_avals, cts_out, symbolic_zeros)
        with _nested_trace(tag) as trace:
            cts = f(*[_wrap(trace, v) for v in (*res, *outs)])
            cts = [
                x
                if x is None or isinstance(x, (Zero, SymbolicZero))
                else trace.to_value(x)
                for x in cts
            ]
        leaf_cts = []
        for (dense, avals), ct in zip(inputs, cts):
            leaf_cts += _leaf_cts(None if dense else next(kept), ct, avals)
        return leaf_cts

    return bwd


def process_custom_vjp_call(
    self: Any, primitive, fun, fwd, bwd, tracers, /, *, out_trees, symbolic_zeros
) -> list[Any]:
    values = [self.to_value(t) for t in tracers]
    leaves, in_tree = jtu.tree_flatten(values)
    avals = tuple(_typeof(x) for x in leaves)
    inputs, i = [], 0
    for v in values:
        n = len(jtu.tree_leaves(v))
        inputs.append((_is_dense(v), list(avals[i : i + n])))
        i += n
    fun, fun_tree = _fun(fun, self.tag, in_tree)
    fwd, fwd_trees = _fwd(fwd, self.tag, in_tree, out_trees)
    bwd = lu.wrap_init(
        _bwd(bwd.call_wrapped, self.tag, inputs, fwd_trees, symbolic_zeros),
        debug_info=bwd.debug_info,
    )

    def trees() -> tuple[Any, Any, list[None]]:
        out_tree, res_tree, _ = fwd_trees()
        return out_tree, res_tree, [None] * res_tree.num_leaves

    params: dict[str, Any] = dict(out_trees=trees, symbolic_zeros=symbolic_zeros)
    if _JAX_GE_0_9_2:
        params["subfuns"] = (fun, fwd, bwd)
        outs = primitive.bind_with_trace(
            self.parent_trace, tuple(leaves), avals, params
        )
    else:
        outs = primitive.bind_with_trace(
            self.parent_trace, (fun, fwd, bwd, *leaves), params
        )
    ran_fun, tree = lu.merge_linear_aux(fun_tree, fwd_trees)
    out_tree = tree if ran_fun else tree[0]
    return [_QuaxTracer(self, v) for v in jtu.tree_unflatten(out_tree, outs)]


# The step aside: only a quax without its own `process_custom_vjp_call` is patched.
PATCHED = "process_custom_vjp_call" not in vars(_QuaxTrace)
if PATCHED:
    _QuaxTrace.process_custom_vjp_call = process_custom_vjp_call
