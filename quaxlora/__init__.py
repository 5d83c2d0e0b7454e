"""quaxlora: LoRA for Equinox models, through quax multiple dispatch."""

from importlib.metadata import version as _version

from . import _rules as _rules
from ._adapters import (
    adapters as adapters,
    combine_adapters as combine_adapters,
    unmerge as unmerge,
    with_adapters as with_adapters,
)
from ._io import load_adapters as load_adapters, save_adapters as save_adapters
from ._lora_array import LoraArray as LoraArray
from ._loraify import loraify as loraify
from ._merge import merge as merge, unloraify as unloraify
from ._peft import load_peft as load_peft, save_peft as save_peft
from ._quantised import (
    quantise as quantise,
    QuantisedArray as QuantisedArray,
    stored_bytes as stored_bytes,
)
from ._rules._conv import conv_plan as conv_plan, ConvPlan as ConvPlan
from ._train import (
    count_parameters as count_parameters,
    is_trainable as is_trainable,
    ParameterCount as ParameterCount,
    partition as partition,
    Trainable as Trainable,
)


__version__ = _version("quaxlora")
