# Importing the rule modules registers their rules with quax.
from . import (
    _conv as _conv,
    _dot_general as _dot_general,
    _gather as _gather,
    _jit as _jit,
    _passthrough as _passthrough,
    _quantised as _quantised,
    _rearrange as _rearrange,
    _reshape as _reshape,
)
