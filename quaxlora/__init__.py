"""quaxlora: LoRA for Equinox models, through quax multiple dispatch."""

from importlib.metadata import version as _version

from . import _quax_compat as _quax_compat, _rules as _rules, conv as conv
from ._adapters import (
    combine_adapters as combine_adapters,
    with_adapters as with_adapters,
)
from ._dropout import set_dropout_key as set_dropout_key
from ._init import residual_to_lora as residual_to_lora
from ._io import load_adapters as load_adapters, save_adapters as save_adapters
from ._lora_array import LoraArray as LoraArray
from ._loraify import loraify as loraify
from ._loraplus import loraplus as loraplus
from ._merge import merge as merge, unloraify as unloraify, unmerge as unmerge
from ._peft import load_peft as load_peft, save_peft as save_peft
from ._quantised import (
    quantise as quantise,
    QuantisedArray as QuantisedArray,
    stored_bytes as stored_bytes,
)
from ._stack import (
    select_adapter as select_adapter,
    stack_adapters as stack_adapters,
    unstack_adapters as unstack_adapters,
)
from ._stacked import StackedLoraArray as StackedLoraArray
from ._train import (
    count_parameters as count_parameters,
    ParameterCount as ParameterCount,
    partition as partition,
    Trainable as Trainable,
    trainable_spec as trainable_spec,
)


__version__ = _version("quaxlora")


def __getattr__(name: str):
    if name == "is_trainable":
        raise AttributeError(
            "`quaxlora.is_trainable` is now `quaxlora.trainable_spec`: it takes the "
            "whole model and returns a filter spec, `eqx.partition(model, "
            "ql.trainable_spec(model))` (it is not a per-leaf filter like Equinox's "
            "`is_*` functions)."
        )
    raise AttributeError(f"module 'quaxlora' has no attribute {name!r}")
