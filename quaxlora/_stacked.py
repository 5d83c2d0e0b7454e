"""`StackedLoraArray`: several adapters of one frozen weight, along an adapter axis."""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core as jexc
import quax
from jaxtyping import Array

from ._lora_array import scaling_for


_SELECT_FIRST = (
    "Pick one adapter with `quaxlora.select_adapter(model, index)` first — under "
    "`jax.vmap` for one adapter per example — or get the separate models back with "
    "`quaxlora.unstack_adapters(model)`."
)


class StackedLoraArray(quax.ArrayValue):
    """Several LoRA adapters of one frozen weight, for serving or training many
    adapters in one batch. Built by `quaxlora.stack_adapters`; not used directly.

    For a weight of shape `(*batch, out, *rest)`, the factors have a leading adapter
    axis: `a` of shape `(adapters, *batch, rank, *rest)` and `b` of shape
    `(adapters, *batch, out, rank)`, where `rank` is the largest rank of the adapters;
    a smaller adapter is padded with zeros (zero rows of `a`, zero columns of `b`),
    which changes no output and, since the padding's gradient is zero, stays zero
    under training. Each adapter keeps its own rank, alpha and scaling mode (static
    metadata, so that `unstack_adapters` gives back exactly what was stacked); its
    scaling is applied when it is selected.

    The adapter axis is not a batch axis of the weight (unlike the leading `*batch`
    axes of a layer stack), so no dispatch rule ever sees a `StackedLoraArray`:
    `quaxlora.select_adapter` turns it into an ordinary `LoraArray` first, and any
    primitive applied to it directly raises an error saying so.
    """

    weight: Any
    a: Array
    b: Array
    ranks: tuple[int, ...] = eqx.field(static=True)
    alphas: tuple[float, ...] = eqx.field(static=True)
    rslora: tuple[bool, ...] = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)

    @property
    def num_adapters(self) -> int:
        """The number of adapters (the length of the adapter axis)."""
        return self.b.shape[0]

    @property
    def batch_ndim(self) -> int:
        """Number of leading batch axes of the weight (after the adapter axis in `a`
        and `b`)."""
        return self.b.ndim - 3

    @property
    def scalings(self) -> tuple[float, ...]:
        """Each adapter's scale, `alpha / rank` (or `alpha / sqrt(rank)`)."""
        return tuple(
            scaling_for(r, al, rs)
            for r, al, rs in zip(self.ranks, self.alphas, self.rslora)
        )

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.weight.shape, self.weight.dtype)

    def materialise(self) -> Array:
        raise TypeError(
            "A `StackedLoraArray` holds several adapters and cannot be used as one "
            "array. " + _SELECT_FIRST
        )

    @staticmethod
    def default(primitive: jexc.Primitive, values: Any, params: dict[str, Any]) -> Any:
        del values, params
        raise TypeError(
            f"The primitive `{primitive}` met a `StackedLoraArray` (from "
            "`quaxlora.stack_adapters`), which holds several adapters. " + _SELECT_FIRST
        )
