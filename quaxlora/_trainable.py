"""`Trainable`: an array of the model trained in full, next to the adapters."""

from typing import Any

import jax.core
import quax
from jaxtyping import Array

from ._lora_array import LoraArray
from ._stacked import StackedLoraArray


class Trainable(quax.ArrayValue):
    """Marks an array of the model as trained in full (PEFT's `modules_to_save`, and
    trained biases). It behaves exactly like the array it wraps: under
    `quax.quaxify` every primitive simply reads `array`.
    """

    array: Array

    def aval(self) -> jax.core.ShapedArray:
        return jax.core.ShapedArray(self.array.shape, self.array.dtype)

    def materialise(self) -> Array:
        return self.array


def is_adapted(x: Any) -> bool:
    """Whether `x` is a `LoraArray`, a `StackedLoraArray` or a `Trainable` (a node
    `trainable_spec` decides)."""
    return isinstance(x, (LoraArray, StackedLoraArray, Trainable))
