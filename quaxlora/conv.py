"""Convolutions with a `LoraArray` kernel: which plan quaxlora runs, and why.

`quaxlora.conv.conv_plan` reports, for one convolution, the plan the rule picks
(factored or delta kernel) with the FLOP estimates behind the choice; see the
supported-primitives page.
"""

from ._rules._conv import conv_plan as conv_plan, ConvPlan as ConvPlan
