"""Interchange with Hugging Face PEFT: `adapter_model.safetensors` +
`adapter_config.json`."""

import json
import os
import re
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._lora_array import is_value, LoraArray
from ._paths import model_leaves, path_str, replace_leaves
from ._peft_config import check_variants, rank, selected
from ._peft_names import NameMap, paths_to_peft, peft_to_paths
from ._safetensors import atomic_write, read_safetensors, write_safetensors
from ._trainable import Trainable


PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_LORA_KEYS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}
_KINDS = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.Embedding)
# DoRA: PEFT's magnitude vector, `(out,)` for Linear, `(1, out, 1, ...)` for Conv,
# `(embedding_dim,)` for Embedding (PEFT norms an embedding table per feature).
_MAGNITUDE = ".lora_magnitude_vector"


def _dora_axis(module: Any) -> int:
    """The weight axis PEFT's DoRA magnitude runs along, in quaxlora's layout."""
    return 1 if isinstance(module, eqx.nn.Embedding) else 0


def _modules(model: PyTree) -> dict[str, Any]:
    """`{module path: module}` of the layers PEFT's LoRA can target."""
    is_leaf = lambda x: isinstance(x, _KINDS)
    flat = jtu.tree_leaves_with_path(model, is_leaf=is_leaf)
    return {path_str(p): x for p, x in flat if is_leaf(x)}


def _check_config(config: Any, directory: str) -> None:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(
            f"`directory` {directory!r}: {CONFIG} is not a PEFT LoRA config "
            "(`peft_type` must be 'LORA')."
        )
    unsupported = [
        ("fan_in_fan_out", False),
        ("lora_bias", False),
        ("target_parameters", None),
        ("layer_replication", None),
    ]
    for field, ok in unsupported:
        if config.get(field, ok) not in (ok, [] if ok is None else ok):
            raise ValueError(
                f"`directory` {directory!r}: PEFT's `{field}={config[field]!r}` is "
                "not supported by quaxlora."
            )
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise ValueError(f"`directory` {directory!r}: `lora_alpha` is missing.")
    check_variants(config, directory)


def _alpha(config: dict, name: str) -> float:
    """PEFT's per-module alpha: the first `alpha_pattern` key matching `name`."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return float(config["lora_alpha"])


def _to_factors(name: str, module: Any, A: np.ndarray, B: np.ndarray) -> tuple:
    """PEFT's `lora_A`, `lora_B` as our `a: (r, *w.shape[1:])`, `b: (out, r)`."""
    if isinstance(module, eqx.nn.Embedding):
        # PEFT: delta = (B @ A).T with A (r, vocab), B (dim, r); ours b @ a.
        return B.T, A.T
    if isinstance(module, eqx.nn.Conv) and module.groups != 1:
        raise ValueError(f"PEFT module `{name}`: grouped convolutions unsupported.")
    if B.ndim < 2 or any(d != 1 for d in B.shape[2:]):
        raise ValueError(f"PEFT module `{name}`: `lora_B` has shape {B.shape}.")
    return A, B.reshape(B.shape[:2])


def _from_factors(module: Any, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if isinstance(module, eqx.nn.Embedding):
        return b.T, a.T
    return a, b.reshape(b.shape + (1,) * (a.ndim - 2))


def _peft_keys(tensors: dict, config: dict) -> tuple[dict, dict, dict]:
    """Sort PEFT's tensors (without `PREFIX`) into LoRA factors `{module: {"A", "B"}}`,
    base-layer tensors of adapted modules `{key: x}` (`fc.base_layer.bias`: a bias
    trained with `bias="lora_only"` or `"all"`), and other tensors `{key: x}`
    (`modules_to_save`, biases of other modules)."""
    factors: dict[str, dict[str, np.ndarray]] = {}
    based: dict[str, np.ndarray] = {}
    plain: dict[str, np.ndarray] = {}
    to_save = config.get("modules_to_save") or []
    for key, x in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"PEFT tensor `{key}` does not start with {PREFIX!r}.")
        key = key[len(PREFIX) :]
        suffix = next((s for s in _LORA_KEYS if key.endswith(s)), None)
        if key.endswith(_MAGNITUDE):
            factors.setdefault(key[: -len(_MAGNITUDE)], {})["M"] = x
        elif suffix is not None:
            factors.setdefault(key[: -len(suffix)], {})[_LORA_KEYS[suffix]] = x
        elif "lora_" in key:
            raise ValueError(f"PEFT tensor `{key}` is of a kind quaxlora cannot load.")
        elif ".base_layer." in key:
            based[key] = x
        else:
            # With `bias="all"`, PEFT also saves the `modules_to_save` wrapper's own
            # biases: the frozen original's (skipped) and the trained copy's again.
            module, wrapper, rest = _wrapped(key, to_save)
            if wrapper == "original_module":
                continue
            plain.setdefault(f"{module}.{rest}" if wrapper else key, x)
    for key in based:
        module = key.partition(".base_layer.")[0]
        if module not in factors:
            raise ValueError(
                f"PEFT tensor `{key}`: the file has no LoRA factors for `{module}`."
            )
    return factors, based, plain


def _peft_magnitude(p: str, module: Any, leaf: LoraArray) -> np.ndarray:
    """A DoRA magnitude in PEFT's layout; PEFT norms along one fixed axis."""
    if leaf.dora_axis != _dora_axis(module):
        raise ValueError(
            f"Cannot save the DoRA adapter at `{p}` for PEFT: its magnitude runs "
            f"along axis {leaf.dora_axis}, PEFT's along axis {_dora_axis(module)}."
        )
    m = np.asarray(leaf.magnitude)
    if isinstance(module, eqx.nn.Conv):
        return m.reshape((1, -1) + (1,) * (leaf.ndim - 2))
    return m


def _wrapped(key: str, to_save: Any) -> tuple[str, str | None, str]:
    """`head.modules_to_save.bias` as `("head", "modules_to_save", "bias")` when `head`
    is in `modules_to_save`; else `(key, None, "")`."""
    for wrapper in ("original_module", "modules_to_save"):
        module, sep, rest = key.partition(f".{wrapper}.")
        if sep and any(module == m or module.endswith("." + m) for m in to_save):
            return module, wrapper, rest
    return key, None, ""


def _is_bias(path: str) -> bool:
    return path == "bias" or path.endswith(".bias")


def _mark_biases(
    leaves: dict[str, Any], new: dict[str, Any], targets: list[str], bias: str
) -> None:
    """Mark as `Trainable` the biases PEFT's `bias` mode trains (as `loraify`'s
    `bias` argument does), keeping the file's values where it has them."""
    if bias == "none":
        return
    owners = set(targets)
    for path, leaf in leaves.items():
        if path in new or not _is_bias(path) or not eqx.is_inexact_array(leaf):
            continue
        if bias == "all" or path.rpartition(".")[0] in owners:
            new[path] = Trainable(leaf)


def _trainable(key: str, x: np.ndarray, old: Any) -> Trainable:
    base = old.array if isinstance(old, Trainable) else old
    if base is None or isinstance(base, LoraArray) or not hasattr(base, "shape"):
        raise ValueError(f"PEFT tensor `{key}` has no plain array to replace.")
    squeeze = lambda s: tuple(d for d in s if d != 1)
    if squeeze(x.shape) != squeeze(base.shape):  # eqx Conv biases are (out, 1, ...)
        raise ValueError(
            f"PEFT tensor `{key}` has shape {x.shape}; the model's is {base.shape}."
        )
    return Trainable(jnp.asarray(x.reshape(base.shape), base.dtype))


def _torch_layout(module: Any, rest: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if isinstance(module, eqx.nn.Conv) and rest == "bias":
        x = x.reshape(-1)  # torch stores conv biases as (out,)
    return x


def load_peft(directory: str | os.PathLike, model: PyTree, mapping: NameMap) -> PyTree:
    """Load a LoRA adapter saved by Hugging Face PEFT onto an Equinox model.

    Reads `adapter_model.safetensors` and `adapter_config.json` from `directory`
    (as written by PEFT's `save_pretrained`), converts PEFT's layouts to quaxlora's
    (`lora_A`/`lora_B` of `torch.nn.Linear` and `Conv*d` are `a`/`b` as they are;
    `lora_embedding_A`/`lora_embedding_B` are `b`/`a` transposed), and honours `r`,
    `lora_alpha`, `rank_pattern`, `alpha_pattern` and `use_rslora`. Tensors of
    `modules_to_save` modules become `Trainable` arrays, and so do the biases PEFT's
    `bias` mode trains (`"lora_only"`: those of adapted modules, saved as
    `<module>.base_layer.bias`; `"all"`: every bias), as `quaxlora.loraify`'s
    `bias` marks them. Factors are cast to the weight's dtype, as PyTorch does when
    loading a state dict. Config fields that change what the tensors mean and that
    quaxlora does not implement (DoRA, `fan_in_fan_out`, `lora_bias`, an
    initialisation that changes the base weights such as PiSSA, ...) are an error
    naming the field, and so are factors that disagree with the config (a rank
    other than `r`/`rank_pattern` give, a module that `target_modules`,
    `layers_to_transform`, `exclude_modules` or `modules_to_save` do not select).

    **Arguments:**

    - `directory`: the PEFT adapter folder.
    - `model`: the Equinox model equivalent to the PyTorch base model: its
        `eqx.nn.Linear`, `eqx.nn.Conv` and `eqx.nn.Embedding` hold the same weights
        as the corresponding `torch.nn` modules. It is not modified; any adapter it
        already has is dropped.
    - `mapping`: how PEFT's module names (the PyTorch model's attribute paths)
        correspond to quaxlora module paths, in one of three forms:
        - a dict `{PEFT module name: quaxlora module path}`, e.g.
            `{"model.layers.0.self_attn.q_proj": "layers.0.attn.query_proj"}`,
            covering every module in the file (LoRA targets, `modules_to_save`,
            modules of trained biases);
        - a function `quaxlora module path -> PEFT module name` (or `None` for a
            module PEFT does not know), applied to every module of `model`;
        - a list of `(pattern, replacement)` pairs: a quaxlora module path is
            renamed by the first pattern matching it whole, with `replacement` as
            in `re.sub`, e.g.
            `(r"layers\\.(\\d+)\\.attn", r"model.layers.\\1.self_attn")`; a path
            no pattern matches has no PEFT name.

        Every PEFT module in the file must correspond to exactly one module of
        `model`; the error lists those left over.

    **Returns:**

    `model` with the adapter in place. Any mismatch raises a `ValueError` naming the
    PEFT key, and nothing is loaded.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No {CONFIG} in `directory` {directory!r}.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"`directory` {directory!r}: bad {CONFIG} ({e}).") from None
    _check_config(config, directory)
    tensors, _ = read_safetensors(os.path.join(directory, WEIGHTS))
    modules, leaves = _modules(model), model_leaves(model)
    new = {p: x.weight for p, x in leaves.items() if isinstance(x, LoraArray)}
    factors, based, plain = _peft_keys(tensors, config)
    names, owners = peft_to_paths(mapping, model, set(factors), set(plain))
    for key, x in plain.items():
        path = names[owners[key]] + key[len(owners[key]) :]
        new[path] = _trainable(key, x, leaves.get(path))
    for key, x in based.items():
        name, _, rest = key.partition(".base_layer.")
        path = f"{names[name]}.{rest}"
        new[path] = _trainable(key, x, leaves.get(path))
    for name, f in factors.items():
        module = modules.get(names[name])
        dora = bool(config.get("use_dora", False))
        if module is None or set(f) != ({"A", "B", "M"} if dora else {"A", "B"}):
            raise ValueError(
                f"PEFT module `{name}`: no Linear, Conv or Embedding at "
                f"`{names[name]}`, or an incomplete set of factors (`use_dora` "
                "needs `lora_magnitude_vector` too)."
            )
        if not selected(config, name):
            raise ValueError(
                f"PEFT module `{name}` has LoRA factors, but the config's "
                "`target_modules`, `layers_to_transform`, `exclude_modules` or "
                "`modules_to_save` do not select it: PEFT would not adapt it."
            )
        if "r" in config and f["A"].shape[0] != rank(config, name):
            raise ValueError(
                f"PEFT module `{name}`: its factors have rank {f['A'].shape[0]}, but "
                f"the config's `r`/`rank_pattern` give {rank(config, name)}."
            )
        weight = module.weight
        weight = weight.weight if isinstance(weight, LoraArray) else weight
        a, b = _to_factors(name, module, f["A"], f["B"])
        try:
            new[names[name] + ".weight"] = LoraArray(
                weight,
                a=jnp.asarray(a, weight.dtype),
                b=jnp.asarray(b, weight.dtype),
                alpha=_alpha(config, name),
                rslora=bool(config.get("use_rslora", False)),
                magnitude=(
                    jnp.asarray(f["M"].reshape(-1), weight.dtype) if dora else None
                ),
                dora_axis=_dora_axis(module) if dora else 0,
                dropout=float(config.get("lora_dropout") or 0.0),
            )
        except ValueError as e:
            raise ValueError(f"PEFT module `{name}` does not fit: {e}") from None
    targets = [names[n] for n in factors]
    _mark_biases(leaves, new, targets, config.get("bias", "none"))
    return replace_leaves(model, new)


def save_peft(
    directory: str | os.PathLike,
    model: PyTree,
    mapping: NameMap,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Save a model's adapters as a Hugging Face PEFT LoRA adapter.

    Writes `adapter_model.safetensors` (PEFT's key names and layouts) and
    `adapter_config.json` into `directory`, which PEFT's
    `PeftModel.from_pretrained(torch_base_model, directory)` loads. Ranks and alphas
    that differ between targets go into `rank_pattern` / `alpha_pattern`, anchored
    to the exact module name. A `Trainable` bias of an adapted module is written as
    PEFT's `<module>.base_layer.bias` with `bias="lora_only"`; a `Trainable` bias of
    a module whose other arrays are frozen as `<module>.bias` with `bias="all"`
    (what `quaxlora.loraify`'s `bias` argument trains); modules whose arrays are
    all `Trainable` become `modules_to_save`. Each file is written atomically.

    **Arguments:**

    - `directory`: the folder to write (created if needed).
    - `model`: a model with adapters on `eqx.nn.Linear`, `eqx.nn.Conv` (not grouped)
        and `eqx.nn.Embedding` layers, not stacked (no batch axes); all with the
        same scaling mode (PEFT's `use_rslora` is global).
    - `mapping`: a dict `{PEFT module name: quaxlora module path}`, a function
        `quaxlora module path -> PEFT module name | None` or a list of
        `(pattern, replacement)` pairs, as for `quaxlora.load_peft`. Every adapted
        module, and the module of every `Trainable` array (its longest path prefix
        that `mapping` names), must get a PEFT name, each its own; the error lists
        those left over.
    - `base_model_name_or_path`, `task_type`: recorded in the config, as PEFT does.

    **Returns:**

    Nothing.
    """
    modules, leaves = _modules(model), model_leaves(model)
    loras = {p: x for p, x in leaves.items() if isinstance(x, LoraArray)}
    for p, leaf in loras.items():
        if p.removesuffix(".weight") not in modules or p == "weight" or leaf.batch_ndim:
            raise ValueError(
                f"Cannot save the adapter at `{p}` for PEFT: it must be the weight "
                "of an unstacked Linear, Conv or Embedding."
            )
    if not loras:
        raise ValueError("`model` has no `LoraArray` to save.")
    adapted = [p.removesuffix(".weight") for p in loras]
    trained = [p for p, x in leaves.items() if isinstance(x, Trainable)]
    # A trained bias of an adapted module is PEFT's `<module>.base_layer.bias`.
    based = [p for p in trained if _is_bias(p) and p.rpartition(".")[0] in adapted]
    named, owners = paths_to_peft(
        mapping, adapted, [p for p in trained if p not in based]
    )
    # Modules with an array that is not trained in full: a trained bias there is
    # PEFT's `bias="all"`, not a `modules_to_save` module.
    frozen = {
        p.rpartition(".")[0]
        for p, x in leaves.items()
        if not isinstance(x, Trainable) and (is_value(x) or eqx.is_inexact_array(x))
    }
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, LoraArray] = {}
    for p, leaf in loras.items():
        mp = p.removesuffix(".weight")
        A, B = _from_factors(modules[mp], leaf.a, leaf.b)
        emb = isinstance(modules[mp], eqx.nn.Embedding)
        ka, kb = (
            ("lora_embedding_A", "lora_embedding_B")
            if emb
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{named[mp]}.{ka}"] = A
        tensors[f"{PREFIX}{named[mp]}.{kb}"] = B
        if leaf.magnitude is not None:
            m = _peft_magnitude(p, modules[mp], leaf)
            tensors[f"{PREFIX}{named[mp]}{_MAGNITUDE}"] = m
        targets[named[mp]] = leaf
    bias = "lora_only" if based else "none"
    for p in based:
        mp = p.rpartition(".")[0]
        x = _torch_layout(modules[mp], "bias", leaves[p].array)
        tensors[f"{PREFIX}{named[mp]}.base_layer.bias"] = x
    to_save: list[str] = []
    for p, (mp, name) in owners.items():
        rest = p[len(mp) + 1 :]
        x = _torch_layout(modules.get(mp), rest, leaves[p].array)
        tensors[f"{PREFIX}{name}.{rest}"] = x
        if _is_bias(p) and p.rpartition(".")[0] in frozen:
            bias = "all"
        elif name not in to_save:
            to_save.append(name)
    if clash := sorted(set(to_save) & set(targets)):
        raise ValueError(
            f"`{clash[0]}` has both a LoRA adapter and trained arrays other than its "
            "bias; PEFT cannot represent that."
        )
    if len({x.rslora for x in targets.values()}) != 1:
        raise ValueError("PEFT needs one scaling mode: mixed `rslora` adapters.")
    if len({x.magnitude is None for x in targets.values()}) != 1:
        raise ValueError("PEFT's `use_dora` is global: mixed LoRA and DoRA adapters.")
    first = next(iter(targets.values()))
    r, alpha = first.rank, first.alpha
    exact = lambda n: "^" + re.escape(n)  # PEFT matches `(.*\.)?(key)$`
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": first.rslora,
        "target_modules": "^(" + "|".join(re.escape(n) for n in targets) + ")$",
        "rank_pattern": {exact(n): x.rank for n, x in targets.items() if x.rank != r},
        "alpha_pattern": {
            exact(n): x.alpha for n, x in targets.items() if x.alpha != alpha
        },
        "modules_to_save": to_save or None,
        "lora_dropout": first.dropout,
        "fan_in_fan_out": False,
        "bias": bias,
        "use_dora": first.magnitude is not None,
        "init_lora_weights": True,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS), tensors, {"format": "pt"})
    atomic_write(
        os.path.join(directory, CONFIG), [json.dumps(config, indent=2).encode()]
    )
