"""PEFT `LoraConfig` fields beyond rank and alpha: the variants quaxlora refuses, and
PEFT's own rules for which module gets which rank and whether it is adapted at all."""

import re


# LoRA variants and options that change what the file's tensors mean; each must be
# off. (`lora_dropout`, `velora_config` (a backward pass), `runtime_config`,
# `ensure_weight_tying` and the `*_config`s of the initialisations below do not
# change the maths of a saved adapter.)
_VARIANTS = {
    "megatron_config": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}
# Initialisations that change the base model's weights (PEFT's residual
# initialisations): the adapter is only right on that changed base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_BIAS_MODES = ("none", "all", "lora_only")


def check_variants(config: dict, directory: str) -> None:
    """Refuse the config fields quaxlora does not implement, naming the field."""
    for field, off in _VARIANTS.items():
        if config.get(field, off) not in (off, [], {}):
            raise ValueError(
                f"`directory` {directory!r}: PEFT's `{field}={config[field]!r}` is "
                "not supported by quaxlora."
            )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"`directory` {directory!r}: PEFT's `init_lora_weights={init!r}` changes "
            "the base model's weights, so this adapter is only right on that changed "
            "base. Convert it to a plain LoRA adapter with PEFT first "
            "(`save_pretrained(..., path_initial_model_for_weight_conversion=...)`)."
        )
    if init not in _SAFE_INITS:
        raise ValueError(
            f"`directory` {directory!r}: PEFT's `init_lora_weights={init!r}` is not "
            "supported by quaxlora."
        )
    if config.get("bias", "none") not in _BIAS_MODES:
        raise ValueError(
            f"`directory` {directory!r}: PEFT's `bias={config['bias']!r}` must be "
            "'none', 'all' or 'lora_only'."
        )


def rank(config: dict, name: str) -> int:
    """PEFT's per-module rank: the first `rank_pattern` key matching `name`."""
    for key, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return int(rank)
    return int(config.get("r", 8))


def _named(patterns: str | list[str], name: str) -> bool:
    """PEFT's `target_modules` / `exclude_modules` rule: a string is a regular
    expression for the whole name; a list holds names or name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith(f".{p}") for p in patterns)


def selected(config: dict, name: str) -> bool:
    """Whether PEFT's `target_modules`, `layers_to_transform`, `layers_pattern`,
    `exclude_modules` and `modules_to_save` select the module `name` for LoRA (as
    PEFT's `check_target_module_exists`); `True` where that depends on the model
    (`"all-linear"`, or no `target_modules`)."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return True
    if config.get("exclude_modules") and _named(config["exclude_modules"], name):
        return False
    for m in config.get("modules_to_save") or []:
        if re.match(rf"(^|.*\.){m}($|\..*)", name):
            return False
    if not _named(targets, name):
        return False
    layers = config.get("layers_to_transform")
    if isinstance(targets, str) or layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    # The layer index is the first numbered segment (after a `layers_pattern`).
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns]
    for regex in regexes or [r".*?\.[^.]*\.(?P<idx>\d+)\."]:
        if (match := re.match(regex, name)) is not None:
            layers = [layers] if isinstance(layers, int) else layers
            return int(match["idx"]) in layers
    return False
