"""Walking an Equinox model and swapping target weights for `LoraArray`s."""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import quax
from jaxtyping import PRNGKeyArray, PyTree

from ._init import Init, init_factors
from ._lora_array import check_rank, LoraArray, scaling_for
from ._paths import matches, name_matches, path_str, per_target, Where
from ._trainable import is_adapted, Trainable


SUPPORTED = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.Embedding)


def _batch_ndim(module: Any) -> int:
    """Leading batch axes of a layer's weight (1 for a `filter_vmap` layer stack)."""
    core = 2
    if isinstance(module, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
        core += module.num_spatial_dims
    return module.weight.ndim - core


def _is_module(x: Any) -> bool:
    return isinstance(x, SUPPORTED)


def _is_weight_leaf(x: Any) -> bool:
    """An array-like leaf: a quax value (a quantised base, a `LoraArray`) is one."""
    return is_adapted(x) or isinstance(x, quax.Value)


def _is_own(x: Any) -> bool:
    """A module of the user's (or a third-party library's), not one of Equinox's."""
    return isinstance(x, eqx.Module) and not type(x).__module__.startswith("equinox")


def _owner(model: PyTree, path: tuple) -> Any:
    """The node that holds the leaf at `path`, or `None` if it cannot be reached."""
    node = model
    for k in path[:-1]:
        if isinstance(k, jtu.GetAttrKey):
            node = getattr(node, k.name)
        elif isinstance(k, jtu.SequenceKey):
            node = node[k.idx]
        elif isinstance(k, jtu.DictKey):
            node = node[k.key]
        else:
            return None
    return node


def _names(where: Where, path: str) -> bool:
    """Whether a pattern in `where` names `path` exactly or as a dotted suffix (how
    bare array leaves are selected: never by type, predicate or regular expression)."""
    if isinstance(where, str):
        return path == where or path.endswith("." + where)
    if isinstance(where, Sequence) and not isinstance(where, str):
        return any(_names(w, path) for w in where)
    return False


def _layout(value: Any, path: str) -> Any:
    """A per-target layout option: a plain value, or `{pattern: value}` (the first
    matching pattern wins; none matching means not given)."""
    if not isinstance(value, Mapping):
        return value
    return next((v for k, v in value.items() if name_matches(path, k)), None)


def _adapter(
    weight: Any, path: str, out_axis: int | None, fan_in_fan_out: bool, **kwargs
) -> LoraArray:
    """A `LoraArray` on a weight of the layout given by `out_axis` (the axes before it
    are stacked layers) or `fan_in_fan_out` (`(*stack, in, out)`)."""
    shape = tuple(weight.shape)
    if fan_in_fan_out and out_axis is not None:
        raise ValueError(f"`{path}`: pass `out_axis` or `fan_in_fan_out`, not both.")
    if fan_in_fan_out:
        if len(shape) < 2:
            raise ValueError(
                f"`fan_in_fan_out` needs an `(in, out)` weight; `{path}` has shape "
                f"{shape}."
            )
        # The LoRA factors of the `(out, in)` view, initialised as PEFT does, then
        # transposed: the factors swap roles, `b' = aᵀ` and `a' = bᵀ`.
        n = len(shape) - 2
        view = LoraArray(jnp.swapaxes(weight, -1, -2), batch_ndim=n, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("key", "dtype")}
        kwargs["rank"] = view.rank
        swap = lambda x: jnp.swapaxes(x, -1, -2)
        return LoraArray(weight, a=swap(view.b), b=swap(view.a), batch_ndim=n, **kwargs)
    out_axis = 0 if out_axis is None else out_axis
    if not -len(shape) <= out_axis < len(shape) - 1:
        raise ValueError(
            f"`out_axis={out_axis}` does not leave an input axis after the output "
            f"axis of `{path}` (shape {shape}): quaxlora adapts weights laid out "
            "`(*stack, out, in, *kernel)`, or `(*stack, in, out)` with "
            "`fan_in_fan_out=True`."
        )
    return LoraArray(weight, batch_ndim=out_axis % len(shape), **kwargs)


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
    rank: int | Mapping[str, int],
    key: PRNGKeyArray,
    *,
    alpha: float | Mapping[str, float] | None = None,
    where: Where = None,
    exclude: Where = None,
    rslora: bool = False,
    modules_to_save: Where = None,
    bias: Literal["none", "all", "lora_only"] = "none",
    stop_gradient: bool = True,
    allow_materialise: bool = False,
    dtype: Any = None,
    dropout: float = 0.0,
    out_axis: int | Mapping[str, int] | None = None,
    fan_in_fan_out: bool | Mapping[str, bool] = False,
    use_dora: bool = False,
    init: Init = "default",
) -> PyTree:
    """Add LoRA adapters to an Equinox model.

    Every targeted weight becomes a `LoraArray` standing for `w + scaling * b @ a`
    with `b = 0`, so the model's output is unchanged until it is trained. Run the
    result with `quax.quaxify(model)(x)`; train it with `quaxlora.partition`.

    What can be targeted, wherever it sits in the pytree (inside `eqx.nn.MLP`,
    `eqx.nn.MultiheadAttention`, your own modules, lists, dicts, tuples, and layer
    stacks built with `eqx.filter_vmap`):

    - `eqx.nn.Linear`, `eqx.nn.Conv` (1d/2d/3d), `eqx.nn.ConvTranspose` (1d/2d/3d) and
        `eqx.nn.Embedding` (and their subclasses), whose layouts are known. By default
        every `eqx.nn.Linear` is targeted.
    - Any module of your own (or of another library) that holds a `weight` array,
        used however its `__call__` likes (`x @ self.weight`, `jnp.einsum`,
        `lax.conv_general_dilated`). Its weight is taken to be laid out
        `(out, in, *kernel)`, as Equinox's are, unless `out_axis` or `fan_in_fan_out`
        say otherwise. Equinox's other layers (norms, ...) are never adapted.
    - Any bare array leaf, named by its path (`"mixer.proj"`: the whole path or a
        dotted suffix of it, never a regular expression, type or predicate), with its
        layout given by `out_axis` or `fan_in_fan_out`.

    A weight whose layout cannot be inferred (a bare array without `out_axis`, a
    module whose `weight` is 1-D) raises a `ValueError` naming it.

    **Arguments:**

    - `model`: the model, any pytree.
    - `rank`: the LoRA rank, or a mapping `{pattern: rank}` resolved per target
        (the first pattern matching the target's path wins). Positional or keyword.
    - `key`: PRNG key; split once into one key per target, in path order.
        Positional or keyword.
    - `alpha`: the LoRA alpha (default: the rank, i.e. scaling 1), or a mapping
        `{pattern: alpha}`.
    - `where`: what to adapt. A module type or tuple of types; a pattern string,
        matched against the module's dotted path (`"blocks.attn.query_proj"`) as
        PEFT's `target_modules` does — equal, a `"." + pattern` suffix, or a regular
        expression matching the whole path; a list of patterns and types (any may
        match); or a predicate `(path, module) -> bool`. Default: every
        `eqx.nn.Linear` not in `modules_to_save`.
    - `exclude`: what to leave alone, in the same forms as `where`.
    - `rslora`: use rank-stabilised scaling `alpha / sqrt(rank)`.
    - `modules_to_save`: patterns (as in `where`) of modules trained in full, like
        PEFT's `modules_to_save` (e.g. a new classifier head). Their arrays are
        wrapped in `Trainable`, which `quaxlora.trainable_spec` selects.
    - `bias`: as PEFT: `"none"` (no bias is trained), `"all"` (every bias in the
        model is trained) or `"lora_only"` (the biases of adapted layers).
    - `stop_gradient`: no gradient ever reaches a frozen weight, even when the
        whole model is differentiated.
    - `allow_materialise`: allow the dense fallback for primitives without a rule.
    - `dtype`: dtype of the adapter factors (default: each weight's dtype).
    - `dropout`: LoRA dropout rate (PEFT's `lora_dropout`) on the input of each
        adapter branch, `x·w + s·b·a·drop(x)`. Applied only while the model holds
        dropout keys: set them each training step with `quaxlora.set_dropout_key`.
        Linear and convolution layers; embedding lookups have none (as in PEFT).
    - `out_axis`: for targets other than Equinox's layers, the axis of the weight's
        output features; the axes before it are stacked layers (as from
        `eqx.filter_vmap`), those after it the input and kernel axes. An int, or a
        mapping `{pattern: int}` (patterns matched against the target's path).
    - `fan_in_fan_out`: as PEFT's option of that name: for targets other than
        Equinox's layers, the weight is laid out `(*stack, in, out)` (used as
        `x @ weight`). The factors are those of the `(out, in)` view, initialised as
        PEFT's (`a` random over the inputs, `b` zero), stored transposed: the
        `LoraArray` of an `(in, out)` weight has `b` of shape `(in, rank)` and `a` of
        shape `(rank, out)`. A bool, or a mapping `{pattern: bool}`.
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
        same = ql.loraify(mlp, 4, jr.key(1))  # rank and key may be positional
        y = quax.quaxify(lora_mlp)(jnp.ones(4))  # == mlp(jnp.ones(4)) at init


        class MyLinear(eqx.Module):  # a layer of your own, weight (in, out)
            weight: jnp.ndarray

            def __call__(self, x):
                return x @ self.weight


        model = {"proj": MyLinear(jnp.ones((4, 3)))}
        lora = ql.loraify(model, rank=2, key=jr.key(2), where=MyLinear,
                          fan_in_fan_out=True)
        ```
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {bias!r}.")
    explicit = where is not None
    where = eqx.nn.Linear if where is None else where
    flat, _ = jtu.tree_flatten_with_path(
        model, is_leaf=lambda x: _is_module(x) or _is_weight_leaf(x)
    )
    targets, candidates = [], []
    for path, node in flat:
        # A target is (path, selected object, key path of the weight, layout: the
        # known one of an Equinox layer, `None` for a module's, `"bare"` for a leaf).
        if _is_module(node):
            p, obj, at = path_str(path), node, (*path, jtu.GetAttrKey("weight"))
            layout = dict(batch_ndim=_batch_ndim(node))
            by_name = matches(where, p, node)
            excluded = exclude is not None and matches(exclude, p, node)
        elif eqx.is_array(node) or isinstance(node, quax.Value):
            owner = _owner(model, path)
            is_weight = path[-1] == jtu.GetAttrKey("weight") and _is_own(owner)
            if owner is None or (isinstance(owner, eqx.Module) and not _is_own(owner)):
                continue  # a leaf of one of Equinox's own layers (a norm, ...)
            leaf_path, at = path_str(path), path
            if is_weight:  # selected as its module, or by its own path
                p, obj, layout = leaf_path.rpartition(".")[0], owner, None
                by_name = matches(where, p, owner) or _names(where, leaf_path)
                excluded = exclude is not None and (
                    matches(exclude, p, owner) or _names(exclude, leaf_path)
                )
            else:
                p, obj, layout = leaf_path, node, "bare"
                by_name = _names(where, leaf_path)
                excluded = exclude is not None and _names(exclude, leaf_path)
        else:
            continue
        candidates.append(p)
        if not by_name or excluded:
            continue
        if isinstance(node.weight if isinstance(node, SUPPORTED) else node, LoraArray):
            raise ValueError(f"`{p}` already has a LoRA adapter.")
        if modules_to_save is not None and matches(modules_to_save, p, obj):
            if not explicit:
                continue  # trained in full instead
            raise ValueError(
                f"`{p}` is both a LoRA target and in `modules_to_save`; choose one."
            )
        targets.append((p, obj, at, layout))
    if not targets:
        raise ValueError(
            "`loraify` found no layer to adapt: `where` matched no `eqx.nn.Linear`, "
            "`Conv`, `ConvTranspose`, `Embedding`, module with a `weight` or array "
            f"named by its path (after `exclude`). Paths in this model: "
            f"{sorted(set(candidates))}."
        )
    keys = jr.split(key, len(targets))
    adapters = {}
    for (p, obj, at, layout), k in zip(targets, keys):
        r, al = check_rank(per_target(rank, p, "rank")), per_target(alpha, p, "alpha")
        options: dict[str, Any] = dict(
            rank=r,
            alpha=al,
            rslora=rslora,
            stop_gradient=stop_gradient,
            allow_materialise=allow_materialise,
            dropout=dropout,
            dtype=dtype,
            key=k,
        )
        if isinstance(layout, dict):  # one of Equinox's layers: its layout is known
            weight, a, b = init_factors(
                init,
                obj.weight,
                rank=r,
                scaling=scaling_for(r, al, rslora),
                batch_ndim=layout["batch_ndim"],
                dtype=dtype,
                key=k,
            )
            adapters[jtu.keystr(at)] = LoraArray(
                weight,
                **layout,
                **options,
                a=a,
                b=b,
                use_dora=use_dora,
                # PEFT's DoRA norms an embedding table per feature column.
                dora_axis=int(use_dora and isinstance(obj, eqx.nn.Embedding)),
                init=init,
            )
            continue
        if use_dora or init != "default":
            raise ValueError(
                f"`use_dora` and `init` apply to Equinox's layers only; `{p}` is "
                "another module or a bare array (adapt it with the defaults)."
            )
        weight = obj if layout == "bare" else obj.weight
        axis = _layout(out_axis, p)
        transposed = bool(_layout(fan_in_fan_out, p))
        if axis is None and not transposed:
            if layout == "bare":
                raise ValueError(
                    f"`loraify` cannot infer the layout of the array `{p}` (shape "
                    f"{tuple(weight.shape)}): pass `out_axis` (the axis of output "
                    "features; axes before it are stacked layers), or "
                    "`fan_in_fan_out=True` for an `(in, out)` weight."
                )
            if weight.ndim < 2:
                raise ValueError(
                    f"`{p}` has a `weight` of shape {tuple(weight.shape)}, with no "
                    "`(out, in, ...)` layout to adapt; leave it out of `where` (or "
                    "`exclude` it)."
                )
        adapters[jtu.keystr(at)] = _adapter(weight, p, axis, transposed, **options)

    def place(path, leaf):
        return adapters.get(jtu.keystr(path), leaf)

    model = jtu.tree_map_with_path(place, model, is_leaf=_is_weight_leaf)

    target_paths = [p for p, *_ in targets]

    def select(leaf_path: str) -> bool:
        if modules_to_save is not None and _in_module(leaf_path, modules_to_save):
            return True
        if leaf_path.endswith("bias") or leaf_path == "bias":
            owner = leaf_path.rpartition(".")[0]
            return bias == "all" or (bias == "lora_only" and owner in target_paths)
        return False

    return _mark_trainable(model, select)
