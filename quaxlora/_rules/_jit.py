"""`jax.jit` inside a quaxified function, when nothing quax reaches it.

quax interprets every `jit` it meets by re-tracing the jitted function's jaxpr under
`quaxify`, so that a quax value passed into it meets the rules. A jitted function
that receives only plain arrays — most of `jax.numpy` and `jax.nn` (layer norms,
GELU, softmax, the loss) — cannot meet a `LoraArray`, so re-tracing it only costs
trace time (about half of quaxify's trace-time overhead on the benchmark GPT; the
figures are on the benchmarks page). This more specific rule binds such a call as
it is.
"""

from typing import Any

import quax
from jax.extend.core.primitives import jit_p
from jaxtyping import ArrayLike


@quax.register(jit_p)
def _(*args: ArrayLike, **params: Any) -> Any:
    return jit_p.bind(*args, **params)
