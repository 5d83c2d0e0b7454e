# Importing the rule modules registers their rules with quax.
from . import _dot_general as _dot_general, _structural as _structural
from . import _conv as _conv, _gather as _gather
