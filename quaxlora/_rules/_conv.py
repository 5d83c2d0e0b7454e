"""`conv_general_dilated` with a `LoraArray` kernel, and `rev` (kernel flips).

A convolution is linear in its kernel, so with `w + s·b⊗a` as the kernel
`conv(x, w + s·b⊗a) = conv(x, w) + s·conv(x, b⊗a)`, and the second term has two
exact forms — two *plans*:

- **factored** (PEFT's): `b⊗a` is a rank-`r` convolution with kernel `a`, then a
  1×1 convolution (a per-pixel contraction) with `b`. With `G` feature groups,
  output channel `o` only sees input group `o // (out / G)`, so `a` is run once per
  group (tiled to `G·r` output channels, `feature_group_count=G`) and each group's `r`
  channels meet only that group's rows of `b`.
- **delta kernel**: form the kernel-sized `w + s·b⊗a` (one small matmul) and run one
  convolution.

A kernel is small next to its activations, so neither plan wins everywhere: for a
dense convolution the factored extra costs about `r / out` of the base convolution,
for a depthwise one (`G = channels`) about `r` times it, while the delta kernel costs
one kernel-sized product and trains like full fine-tuning of that layer. Each call
picks the plan with the smaller estimated training-step FLOP count; `conv_plan`
reports both estimates.
"""

import dataclasses
import functools as ft
import math
from typing import Any, Literal

import jax
import jax.lax as lax
import jax.numpy as jnp
import quax
from jaxtyping import ArrayLike

from .._dora import dora_scale, scale_along
from .._lora_array import is_value, LoraArray
from ._contract import bind, contract
from ._frozen import apply_frozen


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """How a convolution with a `LoraArray` kernel is computed, and why.

    **Attributes:**

    - `plan`: `"factored"` (`conv(x, w) + conv1x1(conv(x, a), s·b)`) or `"delta"`
        (`conv(x, w + s·b⊗a)`): the one with the smaller `training` estimate.
    - `orientation`: `"out"` when the LoRA output axis is the kernel's output-feature
        axis (the usual case), `"in"` when it is the input-feature axis (then `b` acts
        on the input pixels and `a` is the convolution), `None` when no factored form
        applies (a spatial axis, `batch_group_count > 1`, grouped `"in"`).
    - `base`: FLOPs of the plain convolution `conv(x, w)`.
    - `forward`: `{plan: FLOPs}` of one forward call.
    - `training`: `{plan: FLOPs}` of a forward and backward pass (cotangents of
        the input and of `a` and `b`, and of `w` when `stop_gradient=False`).
    """

    plan: Literal["factored", "delta"]
    orientation: Literal["out", "in"] | None
    base: int
    forward: dict[str, int]
    training: dict[str, int]


def _orientation(lora: LoraArray, params) -> str | None:
    _, rhs_spec, _ = params["dimension_numbers"]
    if lora.batch_ndim != 0 or params["batch_group_count"] != 1:
        return None
    if rhs_spec[0] == 0:
        return "out"
    if rhs_spec[1] == 0 and params["feature_group_count"] == 1:
        return "in"
    return None


def _make_plan(lhs_shape, lora: LoraArray, out_shape, params) -> ConvPlan:
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    groups = params["feature_group_count"]
    w_shape, r = lora.shape, lora.rank
    n = out_shape[out_spec[0]]
    p_out = math.prod(out_shape[i] for i in out_spec[2:])
    p_in = math.prod(lhs_shape[i] for i in lhs_spec[2:])
    c_out, c_in = w_shape[rhs_spec[0]], w_shape[rhs_spec[1]]  # c_in is per group
    k = math.prod(w_shape[i] for i in rhs_spec[2:])
    base = 2 * n * p_out * c_out * c_in * k
    dw = 0 if lora.stop_gradient else base
    # Delta kernel: one kernel-sized product (and its transpose for da, db), then
    # the convolution is trained as in full fine-tuning.
    d = 2 * c_out * r * c_in * k
    forward = {"delta": base + d}
    training = {"delta": 3 * base + 3 * d}
    orientation = _orientation(lora, params)
    if orientation == "out":
        extra = 2 * n * p_out * (groups * r) * c_in * k + 2 * n * p_out * c_out * r
    elif orientation == "in":
        # b is contracted with the (undilated) input pixels; a is an r-channel conv.
        extra = 2 * n * p_in * c_out * r + 2 * n * p_out * r * c_in * k
    else:
        extra = 0  # no factored plan
    if orientation is not None:
        forward["factored"] = base + extra
        # input cotangent (base + extra), cotangents of a and b (extra), and of w.
        training["factored"] = 2 * base + 3 * extra + dw
    plan = min(training, key=lambda name: (training[name], name != "factored"))
    return ConvPlan(plan, orientation, base, forward, training)  # pyright: ignore


def _out_shape(lhs, lora: LoraArray, params) -> tuple[int, ...]:
    lhs = jax.ShapeDtypeStruct(lhs.shape, lhs.dtype)
    rhs = jax.ShapeDtypeStruct(lora.shape, lora.dtype)
    f = lambda x, w: lax.conv_general_dilated_p.bind(x, w, **params)
    return tuple(jax.eval_shape(f, lhs, rhs).shape)


def _conv(x, w, **params) -> Any:
    return bind(lambda x, w: lax.conv_general_dilated_p.bind(x, w, **params), x, w)


def _base_conv(x, lora: LoraArray, params) -> Any:
    """`conv(x, w)`, with no gradient to `w` when `stop_gradient` (see `_frozen`)."""
    if not lora.stop_gradient or is_value(x) or is_value(lora.weight):
        return _conv(x, lora.w, **params)
    return apply_frozen(ft.partial(_conv, **params), x, lora.weight)


def _merged_kernel_conv(x, lora: LoraArray, params) -> Any:
    """`conv(x, w + s·b⊗a)`: one convolution with the (kernel-sized) merged kernel."""
    return _conv(x, lora.merged(), **params)


def _factored(x, lora: LoraArray, params) -> Any:
    """`conv(x, w) + s·(b ⊗ conv(x, a))`, per feature group."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    groups = params["feature_group_count"]
    a, b = lora.a.astype(lora.dtype), lora.b.astype(lora.dtype)
    sb = (lora.scaling * b).astype(b.dtype)
    base = _base_conv(x, lora, params)
    x = lora.adapter_input(x)  # the adapter branch's input (LoRA dropout)
    out_labels = [f"Y{i}" for i in range(base.ndim)]
    out_labels[out_spec[1]] = "o"
    if _orientation(lora, params) == "in":
        # b acts on the input channels pixel by pixel (commuting with padding,
        # dilation and strides), then a is an r-channel convolution.
        xl = [f"X{i}" for i in range(x.ndim)]
        xl[lhs_spec[1]] = "i"
        tl = [("k" if l == "i" else l) for l in xl]
        t = contract(x, xl, sb.astype(x.dtype), ["i", "k"], tl)
        delta = _conv(t, a, **params)
        return (base + delta.astype(base.dtype)).astype(base.dtype)
    # a in (O, I, *spatial) order, tiled once per group: (G·r, in/G, *kernel).
    a = jnp.transpose(a, rhs_spec)
    a = jnp.tile(a, (groups,) + (1,) * (a.ndim - 1))
    dn = lax.ConvDimensionNumbers(lhs_spec, tuple(range(a.ndim)), out_spec)
    t = _conv(x, a, **{**params, "dimension_numbers": dn})
    # t has the output's layout with G·r channels; split them into (G, r) and meet
    # the matching rows of b, reshaped (G, out/G, r).
    c = out_spec[1]
    t = bind(lambda t: t.reshape(t.shape[:c] + (groups, -1) + t.shape[c + 1 :]), t)
    tl = out_labels[:c] + ["g", "k"] + out_labels[c + 1 :]
    bg = sb.reshape(groups, -1, lora.rank).astype(t.dtype)
    dl = out_labels[:c] + ["g", "j"] + out_labels[c + 1 :]
    delta = contract(t, tl, bg, ["g", "j", "k"], dl)
    delta = bind(lambda d: d.reshape(base.shape), delta)
    return (base + delta.astype(base.dtype)).astype(base.dtype)


def _dora_factored(x, lora: LoraArray, params) -> Any:
    """DoRA, factored: the convolution with `V = w + s·b⊗a`, rescaled per output
    channel (or its input rescaled per input channel, for the "in" orientation),
    or None when the magnitude's axis is not a feature axis of the kernel."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    orientation, d = _orientation(lora, params), lora.dora_axis
    scale = dora_scale(lora)
    if d == 0 and orientation == "out":
        y = _factored(x, lora, params)
        labels = [f"Y{i}" for i in range(y.ndim)]
        return scale_along(y, labels, scale, [labels[out_spec[1]]])
    if d == 0 and orientation == "in":
        labels = [f"X{i}" for i in range(x.ndim)]
        x = scale_along(x, labels, scale, [labels[lhs_spec[1]]])
        return _factored(x, lora, params)
    return None


@quax.register(lax.conv_general_dilated_p)
def _(lhs: ArrayLike | quax.ArrayValue, rhs: LoraArray, **params) -> Any:
    plan = _make_plan(jnp.shape(lhs), rhs, _out_shape(lhs, rhs, params), params)
    if rhs.dropout_active:
        # LoRA dropout acts on the adapter branch's input: only the factored plan
        # has one.
        if plan.orientation is None:
            raise TypeError(
                "LoRA dropout on this convolution needs the factored plan, which "
                "this layout has not (see `quaxlora.conv.conv_plan`); use `dropout=0` "
                "for this layer."
            )
        return _factored(lhs, rhs, params)
    if plan.plan == "factored":
        if rhs.magnitude is None:
            return _factored(lhs, rhs, params)
        out = _dora_factored(lhs, rhs, params)
        if out is not None:
            return out
    # The delta kernel (with DoRA, `m·V/‖V‖` itself: `merged` is kernel-sized).
    return _merged_kernel_conv(lhs, rhs, params)


def conv_plan(
    lhs: Any,
    rhs: LoraArray,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> ConvPlan:
    """Which plan quaxlora uses for `lax.conv_general_dilated(lhs, rhs, ...)` with a
    `LoraArray` kernel, with the FLOP estimates behind the choice.

    **Arguments:**

    - `lhs`: the input, an array or anything with `.shape` and `.dtype`
        (`jax.ShapeDtypeStruct`).
    - `rhs`: the `LoraArray` kernel.
    - The rest: as `jax.lax.conv_general_dilated`.

    **Returns:**

    A `ConvPlan`.

    !!! Example

        ```python
        conv = eqx.nn.Conv2d(32, 32, 3, groups=32, key=jr.key(0))  # depthwise
        lora = ql.LoraArray(conv.weight, rank=4, key=jr.key(1))
        x = jnp.ones((1, 32, 28, 28))
        plan = ql.conv.conv_plan(x, lora, (1, 1), "SAME", feature_group_count=32)
        plan.plan  # "delta"
        ```
    """
    params, out_shape = conv_params(
        lhs,
        rhs,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
    )
    return _make_plan(tuple(lhs.shape), rhs, out_shape, params)


def conv_params(lhs: Any, rhs: Any, **kwargs) -> tuple[dict[str, Any], tuple]:
    """The primitive parameters (and output shape) that
    `lax.conv_general_dilated(lhs, rhs, **kwargs)` binds."""
    lhs_s = jax.ShapeDtypeStruct(lhs.shape, lhs.dtype)
    rhs_s = jax.ShapeDtypeStruct(rhs.shape, rhs.dtype)
    jaxpr = jax.make_jaxpr(lambda x, w: lax.conv_general_dilated(x, w, **kwargs))
    (eqn,) = [
        e for e in jaxpr(lhs_s, rhs_s).eqns if e.primitive is lax.conv_general_dilated_p
    ]
    return dict(eqn.params), tuple(eqn.outvars[0].aval.shape)
