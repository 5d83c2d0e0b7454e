"""Walking an Equinox model and swapping target weights for `LoraArray`s."""

from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from ._init import Init, init_factors
from ._lora_array import _check_rank, LoraArray, scaling_for
from ._paths import matches, path_str, per_target, Where
from ._train import is_adapted, Trainable


SUPPORTED = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.Embedding)


def _batch_ndim(module: Any) -> int:
    """Leading batch axes of a layer's weight (1 for a `filter_vmap` layer stack)."""
    core = 2
    if isinstance(module, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
        core += module.num_spatial_dims
    return module.weight.ndim - core


def _is_module(x: Any) -> bool:
    return isinstance(x, SUPPORTED)


def _leaf_paths(model: PyTree) -> list[str]:
    return [
        path_str(p) for p, _ in jtu.tree_leaves_with_path(model, is_leaf=is_adapted)
    ]


def _in_module(leaf_path: str, where: Where) -> bool:
    """Whether a leaf lies in a module (a proper prefix of its path) that `where`
    names by pattern."""
    parts = leaf_path.split(".")
    return any(matches(where, ".".join(parts[:i]), None) for i in range(1, len(parts)))


def _mark_trainable(model: PyTree, select) -> PyTree:
    def mark(path, leaf):
        if is_adapted(leaf) or not eqx.is_inexact_array(leaf):
            return leaf
        return Trainable(leaf) if select(path_str(path)) else leaf

    return jtu.tree_map_with_path(mark, model, is_leaf=is_adapted)


def loraify(
    model: PyTree,
    *,
    rank: int | Mapping[str, int],
    key: PRNGKeyArray,
    alpha: float | Mapping[str, float] | None = None,
    where: Where = None,
    exclude: Where = None,
    rslora: bool = False,
    modules_to_save: Where = None,
    bias: Literal["none", "all", "lora_only"] = "none",
    stop_gradient: bool = True,
    allow_materialise: bool = False,
    dtype: Any = None,
    use_dora: bool = False,
    init: Init = "default",
) -> PyTree:
    """Add LoRA adapters to an Equinox model.

    Every targeted layer's `weight` becomes a `LoraArray` standing for
    `w + scaling * b @ a` with `b = 0`, so the model's output is unchanged until it
    is trained. Run the result with `quax.quaxify(model)(x)`; train it with
    `quaxlora.partition`.

    Layers that can be targeted: `eqx.nn.Linear`, `eqx.nn.Conv` (1d/2d/3d),
    `eqx.nn.ConvTranspose` (1d/2d/3d) and `eqx.nn.Embedding`, wherever they sit in
    the pytree (inside `eqx.nn.MLP`, `eqx.nn.MultiheadAttention`, your own modules,
    lists, dicts, tuples, and layer stacks built with `eqx.filter_vmap`). By default
    every `eqx.nn.Linear` is targeted.

    **Arguments:**

    - `model`: the model, any pytree.
    - `rank`: the LoRA rank, or a mapping `{pattern: rank}` resolved per target (the
        first pattern matching the target's path wins).
    - `key`: PRNG key; split once into one key per target, in path order.
    - `alpha`: the LoRA alpha (default: the rank, i.e. scaling 1), or a mapping
        `{pattern: alpha}`.
    - `where`: which layers to adapt. A module type or tuple of types; a pattern
        string, matched against the module's dotted path (`"blocks.attn.query_proj"`)
        as PEFT's `target_modules` does — equal, a `"." + pattern` suffix, or a
        regular expression matching the whole path; a list of patterns and types (any
        may match); or a predicate `(path, module) -> bool`. Only supported layer
        kinds are ever adapted. Default: every `eqx.nn.Linear` not in
        `modules_to_save`.
    - `exclude`: layers to leave alone, in the same forms as `where`.
    - `rslora`: use rank-stabilised scaling `alpha / sqrt(rank)`.
    - `modules_to_save`: patterns (as in `where`) of modules trained in full, like
        PEFT's `modules_to_save` (e.g. a new classifier head). Their arrays are
        wrapped in `Trainable`, which `quaxlora.is_trainable` selects.
    - `bias`: as PEFT: `"none"` (no bias is trained), `"all"` (every bias in the
        model is trained) or `"lora_only"` (the biases of adapted layers).
    - `stop_gradient`: read frozen weights through `lax.stop_gradient`.
    - `allow_materialise`: allow the dense fallback for primitives without a rule.
    - `dtype`: dtype of the adapter factors (default: each weight's dtype).
    - `use_dora`: DoRA (PEFT's `use_dora`): each adapted weight becomes
        `m * V / norm(V)` with `V = w + scaling * b @ a`, the norm taken per output
        unit (per row of a linear or convolution weight, per feature column of an
        embedding table, as PEFT does) and `m` a trained magnitude initialised to
        `norm(V)`. Computed in factored form; see the variants page.
    - `init`: how the factors start (PEFT's `init_lora_weights`): `"default"`
        (`a` uniform, `b = 0`), `"gaussian"` (`a ~ N(0, 1/rank²)`, `b = 0`),
        `"pissa"` (the top-`rank` singular part of the weight, which becomes the
        residual) or `"olora"` (the first `rank` columns of a QR decomposition,
        likewise). The model's output is unchanged at initialisation in every case;
        PiSSA and OLoRA adapters need the residual base weights the returned model
        holds (adapter files record this).

    **Returns:**

    A copy of `model` with adapters in place. Nothing of `model` is modified.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import quaxlora as ql

        mlp = eqx.nn.MLP(4, 2, width_size=32, depth=2, key=jr.key(0))
        lora_mlp = ql.loraify(mlp, rank=4, key=jr.key(1))
        y = quax.quaxify(lora_mlp)(jnp.ones(4))  # == mlp(jnp.ones(4)) at init
        ```
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {bias!r}.")
    explicit = where is not None
    where = eqx.nn.Linear if where is None else where
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=_is_module)
    targets = []
    for i, (path, node) in enumerate(flat):
        p = path_str(path)
        if not _is_module(node) or not matches(where, p, node):
            continue
        if exclude is not None and matches(exclude, p, node):
            continue
        if isinstance(node.weight, LoraArray):
            raise ValueError(f"`{p}` already has a LoRA adapter.")
        if modules_to_save is not None and matches(modules_to_save, p, node):
            if not explicit:
                continue  # trained in full instead
            raise ValueError(
                f"`{p}` is both a LoRA target and in `modules_to_save`; choose one."
            )
        targets.append((i, p, node))
    if not targets:
        raise ValueError(
            "`loraify` found no layer to adapt: `where` matched no `eqx.nn.Linear`, "
            "`Conv`, `ConvTranspose` or `Embedding` (after `exclude`). Module paths "
            f"in this model: {sorted({path_str(p) for p, n in flat if _is_module(n)})}."
        )
    keys = jr.split(key, len(targets))
    leaves = [node for _, node in flat]
    for (i, p, node), k in zip(targets, keys):
        r, al = _check_rank(per_target(rank, p, "rank")), per_target(alpha, p, "alpha")
        weight, a, b = init_factors(
            init,
            node.weight,
            rank=r,
            scaling=scaling_for(r, al, rslora),
            batch_ndim=_batch_ndim(node),
            dtype=dtype,
            key=k,
        )
        lora = LoraArray(
            weight,
            rank=r,
            alpha=al,
            rslora=rslora,
            stop_gradient=stop_gradient,
            allow_materialise=allow_materialise,
            batch_ndim=_batch_ndim(node),
            dtype=dtype,
            key=k,
            a=a,
            b=b,
            use_dora=use_dora,
            # PEFT's DoRA norms an embedding table per feature column.
            dora_axis=int(use_dora and isinstance(node, eqx.nn.Embedding)),
            init=init,
        )
        leaves[i] = eqx.tree_at(lambda m: m.weight, node, lora)
    model = jtu.tree_unflatten(treedef, leaves)

    target_paths = [p for _, p, _ in targets]

    def select(leaf_path: str) -> bool:
        if modules_to_save is not None and _in_module(leaf_path, modules_to_save):
            return True
        if leaf_path.endswith("bias") or leaf_path == "bias":
            owner = leaf_path.rpartition(".")[0]
            return bias == "all" or (bias == "lora_only" and owner in target_paths)
        return False

    return _mark_trainable(model, select)
