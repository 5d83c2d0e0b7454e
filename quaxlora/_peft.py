"""Interchange with Hugging Face PEFT: `adapter_model.safetensors` +
`adapter_config.json`."""

import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._adapters import model_leaves, replace_leaves
from ._io import read_safetensors, write_safetensors
from ._lora_array import LoraArray
from ._paths import path_str
from ._train import Trainable


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


def _split(key: str, mapping: Mapping[str, str]) -> tuple[str, str]:
    """A non-LoRA key `name.rest` as (name, rest), `name` the longest mapped one."""
    for name in sorted(mapping, key=len, reverse=True):
        if key.startswith(name + "."):
            return name, key[len(name) + 1 :]
    raise ValueError(f"`mapping` has no entry for the PEFT module of `{key}`.")


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


def load_peft(
    directory: str | os.PathLike, model: PyTree, mapping: Mapping[str, str]
) -> PyTree:
    """Load a LoRA adapter saved by Hugging Face PEFT onto an Equinox model.

    Reads `adapter_model.safetensors` and `adapter_config.json` from `directory`
    (as written by PEFT's `save_pretrained`), converts PEFT's layouts to quaxlora's
    (`lora_A`/`lora_B` of `torch.nn.Linear` and `Conv*d` are `a`/`b` as they are;
    `lora_embedding_A`/`lora_embedding_B` are `b`/`a` transposed), and honours `r`,
    `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora` and `use_dora`
    (DoRA's `lora_magnitude_vector`, per output unit as PEFT defines it: per row of
    a linear or convolution weight, per feature column of an embedding). Tensors of
    `modules_to_save` modules become `Trainable` arrays. Factors are cast to the
    weight's dtype, as PyTorch does when loading a state dict.

    **Arguments:**

    - `directory`: the PEFT adapter folder.
    - `model`: the Equinox model equivalent to the PyTorch base model: its
        `eqx.nn.Linear`, `eqx.nn.Conv` and `eqx.nn.Embedding` hold the same weights
        as the corresponding `torch.nn` modules. It is not modified; any adapter it
        already has is dropped.
    - `mapping`: `{PEFT module name: quaxlora module path}`, e.g.
        `{"model.layers.0.self_attn.q_proj": "layers.0.attn.query_proj"}`, covering
        every module in the file (LoRA targets and `modules_to_save`).

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
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, x in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"PEFT tensor `{key}` does not start with {PREFIX!r}.")
        key = key[len(PREFIX) :]
        if key.endswith(_MAGNITUDE):
            factors.setdefault(key[: -len(_MAGNITUDE)], {})["M"] = x
            continue
        suffix = next((s for s in _LORA_KEYS if key.endswith(s)), None)
        if suffix is not None:
            factors.setdefault(key[: -len(suffix)], {})[_LORA_KEYS[suffix]] = x
            continue
        if "lora_" in key:
            raise ValueError(f"PEFT tensor `{key}` is of a kind quaxlora cannot load.")
        name, rest = _split(key, mapping)
        path = f"{mapping[name]}.{rest}"
        new[path] = _trainable(key, x, leaves.get(path))
    for name, f in factors.items():
        if name not in mapping:
            raise ValueError(f"`mapping` has no entry for the PEFT module `{name}`.")
        module = modules.get(mapping[name])
        dora = bool(config.get("use_dora", False))
        if module is None or set(f) != ({"A", "B", "M"} if dora else {"A", "B"}):
            raise ValueError(
                f"PEFT module `{name}`: no Linear, Conv or Embedding at "
                f"`{mapping[name]}`, or an incomplete set of factors (`use_dora` "
                "needs `lora_magnitude_vector` too)."
            )
        weight = module.weight
        weight = weight.weight if isinstance(weight, LoraArray) else weight
        a, b = _to_factors(name, module, f["A"], f["B"])
        try:
            new[mapping[name] + ".weight"] = LoraArray(
                weight,
                a=jnp.asarray(a, weight.dtype),
                b=jnp.asarray(b, weight.dtype),
                alpha=_alpha(config, name),
                rslora=bool(config.get("use_rslora", False)),
                magnitude=(
                    jnp.asarray(f["M"].reshape(-1), weight.dtype) if dora else None
                ),
                dora_axis=_dora_axis(module) if dora else 0,
            )
        except ValueError as e:
            raise ValueError(f"PEFT module `{name}` does not fit: {e}") from None
    return replace_leaves(model, new)


def save_peft(
    directory: str | os.PathLike,
    model: PyTree,
    mapping: Mapping[str, str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Save a model's adapters as a Hugging Face PEFT LoRA adapter.

    Writes `adapter_model.safetensors` (PEFT's key names and layouts) and
    `adapter_config.json` into `directory`, which PEFT's
    `PeftModel.from_pretrained(torch_base_model, directory)` loads. Ranks and alphas
    that differ between targets go into `rank_pattern` / `alpha_pattern`, anchored
    to the exact module name; `Trainable` arrays become `modules_to_save`. Each file
    is written atomically.

    **Arguments:**

    - `directory`: the folder to write (created if needed).
    - `model`: a model with adapters on `eqx.nn.Linear`, `eqx.nn.Conv` (not grouped)
        and `eqx.nn.Embedding` layers, not stacked (no batch axes); all with the
        same scaling mode (PEFT's `use_rslora` is global), and all DoRA or none
        (`use_dora` likewise; the magnitude is written as `lora_magnitude_vector`).
    - `mapping`: `{PEFT module name: quaxlora module path}`, as for `load_peft`,
        covering every adapted module.
    - `base_model_name_or_path`, `task_type`: recorded in the config, as PEFT does.

    **Returns:**

    Nothing.
    """
    inverse = {v: k for k, v in mapping.items()}
    modules = _modules(model)
    tensors: dict[str, np.ndarray] = {}
    targets: dict[str, LoraArray] = {}
    to_save: list[str] = []
    for p, leaf in model_leaves(model).items():
        if isinstance(leaf, LoraArray):
            mp = p.removesuffix(".weight")
            module = modules.get(mp)
            if module is None or mp not in inverse or leaf.batch_ndim:
                raise ValueError(
                    f"Cannot save the adapter at `{p}` for PEFT: it must be the "
                    "weight of an unstacked Linear, Conv or Embedding named in "
                    "`mapping`."
                )
            name = inverse[mp]
            A, B = _from_factors(module, leaf.a, leaf.b)
            emb = isinstance(module, eqx.nn.Embedding)
            ka, kb = (
                ("lora_embedding_A", "lora_embedding_B")
                if emb
                else (
                    "lora_A.weight",
                    "lora_B.weight",
                )
            )
            tensors[f"{PREFIX}{name}.{ka}"] = A
            tensors[f"{PREFIX}{name}.{kb}"] = B
            if leaf.magnitude is not None:
                tensors[f"{PREFIX}{name}{_MAGNITUDE}"] = _peft_magnitude(
                    p, module, leaf
                )
            targets[name] = leaf
        elif isinstance(leaf, Trainable):
            mp = next(
                (
                    m
                    for m in sorted(inverse, key=len, reverse=True)
                    if p.startswith(m + ".")
                ),
                None,
            )
            if mp is None:
                raise ValueError(f"`mapping` has no module containing `{p}`.")
            name, rest = inverse[mp], p[len(mp) + 1 :]
            x = np.asarray(leaf.array)
            if isinstance(modules.get(mp), eqx.nn.Conv) and rest == "bias":
                x = x.reshape(-1)  # torch stores conv biases as (out,)
            tensors[f"{PREFIX}{name}.{rest}"] = x
            if name not in to_save:
                to_save.append(name)
    if not targets:
        raise ValueError("`model` has no `LoraArray` to save.")
    if clash := sorted(set(to_save) & set(targets)):
        raise ValueError(
            f"`{clash[0]}` has both a LoRA adapter and trained arrays; PEFT cannot "
            "represent that."
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
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": first.magnitude is not None,
        "init_lora_weights": True,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS), tensors, {"format": "pt"})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, os.path.join(directory, CONFIG))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
