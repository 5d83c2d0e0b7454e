"""quaxlora: LoRA for Equinox models, through quax multiple dispatch."""

import importlib.metadata

from . import _rules as _rules
from ._lora_array import LoraArray as LoraArray
from ._loraify import loraify as loraify
from ._merge import merge as merge, unloraify as unloraify
from ._train import (
    count_parameters as count_parameters,
    is_trainable as is_trainable,
    ParameterCount as ParameterCount,
    partition as partition,
    Trainable as Trainable,
)


__version__ = importlib.metadata.version("quaxlora")
