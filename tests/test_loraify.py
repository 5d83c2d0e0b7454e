import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import quaxlora as ql

from .helpers import assert_tree_allclose


def _is_lora(x):
    return isinstance(x, ql.LoraArray)


def _loras(model):
    return [
        x for x in jax.tree_util.tree_leaves(model, is_leaf=_is_lora) if _is_lora(x)
    ]


class Custom(eqx.Module):
    layers: list
    heads: dict
    pair: tuple
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        k = jr.split(key, 6)
        self.layers = [eqx.nn.Linear(4, 8, key=k[0]), eqx.nn.Linear(8, 8, key=k[1])]
        self.heads = {"cls": eqx.nn.Linear(8, 3, key=k[2])}
        self.pair = (eqx.nn.MLP(8, 8, 8, 1, key=k[3]), jnp.ones(8))
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[4])
        self.norm = eqx.nn.LayerNorm(8)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        x = self.pair[0](x) * self.pair[1]
        x = self.norm(x)
        x = self.attn(x[None], x[None], x[None])[0]
        return self.heads["cls"](x)


@pytest.fixture
def custom(getkey):
    return Custom(getkey())


def test_default_targets_every_linear(custom, getkey):
    lora = ql.loraify(custom, rank=2, key=getkey())
    # 2 layers + head + 2 MLP linears + 4 attention projections.
    assert len(_loras(lora)) == 9
    assert not isinstance(lora.norm.weight, ql.LoraArray)
    x = jr.normal(getkey(), (4,))
    assert_tree_allclose(quax.quaxify(lora)(x), custom(x), rtol=1e-5, atol=1e-6)


def test_original_unchanged(custom, getkey):
    before = jax.tree_util.tree_map(lambda x: x, custom)
    ql.loraify(custom, rank=2, key=getkey())
    assert eqx.tree_equal(before, custom)


@pytest.mark.parametrize(
    "where,expected",
    [
        ("layers.0", 2),  # a suffix match, as PEFT: also pair.0.layers.0
        (["query_proj", "value_proj"], 2),
        (r"attn\..*", 4),
        (lambda path, m: m.out_features == 8, 8),
        (eqx.nn.Linear, 9),
        ((eqx.nn.Linear,), 9),
        (["heads.cls", eqx.nn.LayerNorm], 1),
    ],
)
def test_where_forms(custom, getkey, where, expected):
    assert (
        len(_loras(ql.loraify(custom, rank=2, where=where, key=getkey()))) == expected
    )


def test_paths_seen_by_predicate(custom, getkey):
    seen = []
    ql.loraify(custom, rank=2, where=lambda p, m: seen.append(p) or True, key=getkey())
    assert "layers.0" in seen and "heads.cls" in seen
    assert "pair.0.layers.1" in seen and "attn.query_proj" in seen


def test_exclude(custom, getkey):
    lora = ql.loraify(custom, rank=2, exclude=["heads.cls", r"attn\..*"], key=getkey())
    assert len(_loras(lora)) == 4
    assert not isinstance(lora.heads["cls"].weight, ql.LoraArray)


def test_exclude_by_type_and_predicate(custom, getkey):
    # `exclude` takes every form `where` takes, not only strings.
    everything = (eqx.nn.Linear,)
    n = len(_loras(ql.loraify(custom, rank=2, where=everything, key=getkey())))
    attn_only = ql.loraify(
        custom,
        rank=2,
        where=everything,
        exclude=lambda path, module: path.startswith("attn"),
        key=getkey(),
    )
    assert len(_loras(attn_only)) == n - 4
    assert not isinstance(attn_only.attn.query_proj.weight, ql.LoraArray)
    assert isinstance(attn_only.layers[0].weight, ql.LoraArray)
    mlp = eqx.nn.MLP(3, 3, 4, 1, key=getkey())
    mixed = {"mlp": mlp, "conv": eqx.nn.Conv1d(2, 2, 3, key=getkey())}
    where = (eqx.nn.Linear, eqx.nn.Conv)
    no_conv = ql.loraify(mixed, rank=1, where=where, exclude=eqx.nn.Conv, key=getkey())
    assert not isinstance(no_conv["conv"].weight, ql.LoraArray)
    assert isinstance(no_conv["mlp"].layers[0].weight, ql.LoraArray)


def test_per_target_rank_alpha(custom, getkey):
    lora = ql.loraify(
        custom,
        rank={"layers.0": 1, r".*_proj": 3, ".*": 2},
        alpha={"heads.cls": 8.0, ".*": 1.0},
        key=getkey(),
    )
    assert lora.layers[0].weight.rank == 1
    assert lora.attn.key_proj.weight.rank == 3
    assert lora.layers[1].weight.rank == 2
    assert lora.heads["cls"].weight.scaling == 4.0
    assert lora.layers[1].weight.scaling == 0.5
    with pytest.raises(ValueError, match="No pattern in `rank` matches the target `"):
        ql.loraify(custom, rank={"layers.0": 1}, key=getkey())


def test_rslora(custom, getkey):
    lora = ql.loraify(custom, rank=4, alpha=8, rslora=True, key=getkey())
    assert lora.layers[0].weight.scaling == 4.0


def test_deterministic_keys(custom, getkey):
    key = getkey()
    l1 = ql.loraify(custom, rank=2, key=key)
    l2 = ql.loraify(custom, rank=2, key=key)
    assert eqx.tree_equal(l1, l2)
    a = [x.a for x in _loras(l1)]
    assert not np.allclose(a[1][:, :4], a[2][:, :4])  # distinct keys per target


def test_no_match_error(custom, getkey):
    with pytest.raises(ValueError, match="found no layer to adapt.*layers.0"):
        ql.loraify(custom, rank=2, where="nonexistent", key=getkey())


def test_already_loraified(custom, getkey):
    lora = ql.loraify(custom, rank=2, key=getkey())
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        ql.loraify(lora, rank=2, key=getkey())


def test_modules_to_save_and_bias(custom, getkey):
    lora = ql.loraify(
        custom, rank=2, where="layers.0", modules_to_save=["heads.cls"], key=getkey()
    )
    assert isinstance(lora.heads["cls"].weight, ql.Trainable)
    assert isinstance(lora.heads["cls"].bias, ql.Trainable)
    assert not isinstance(lora.layers[0].bias, ql.Trainable)
    trainable, frozen = ql.partition(lora)
    assert trainable.heads["cls"].weight.array.shape == (3, 8)
    x = jr.normal(getkey(), (4,))
    assert_tree_allclose(quax.quaxify(lora)(x), custom(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="both a LoRA target and in `modules_to_save`"):
        ql.loraify(
            custom,
            rank=2,
            where=eqx.nn.Linear,
            modules_to_save=["heads.cls"],
            key=getkey(),
        )
    # With the default targets, modules to save are simply not adapted.
    dflt = ql.loraify(custom, rank=2, modules_to_save=["heads.cls"], key=getkey())
    assert isinstance(dflt.heads["cls"].weight, ql.Trainable)

    only = ql.loraify(custom, rank=2, where="layers.0", bias="lora_only", key=getkey())
    assert isinstance(only.layers[0].bias, ql.Trainable)
    assert not isinstance(only.layers[1].bias, ql.Trainable)
    every = ql.loraify(custom, rank=2, where="layers.0", bias="all", key=getkey())
    assert isinstance(every.layers[1].bias, ql.Trainable)
    assert isinstance(every.norm.bias, ql.Trainable)
    with pytest.raises(ValueError, match="`bias` must be"):
        ql.loraify(custom, rank=2, bias="some", key=getkey())


def test_count_parameters(custom, getkey):
    lora = ql.loraify(
        custom, rank=2, where=r"layers\.\d", modules_to_save="heads.cls", key=getkey()
    )
    counts = ql.count_parameters(lora)
    base_total = sum(
        x.size for x in jax.tree_util.tree_leaves(custom) if eqx.is_array(x)
    )
    adapters = 2 * (4 + 8) + 2 * (8 + 8)
    head = 3 * 8 + 3
    assert counts.trainable == adapters + head
    assert counts.total == base_total + adapters
    assert counts.per_module["layers.0"] == (2 * (4 + 8), 8 * 4 + 8 + 2 * (4 + 8))
    assert counts.per_module["heads.cls"] == (head, head)
    assert counts.per_module["norm"] == (0, 16)
    assert "trainable params" in str(counts)


def test_stacked_layers(getkey):
    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 5, key=k))(jr.split(getkey(), 4))
    lora = ql.loraify(stack, rank=2, key=getkey())
    assert lora.weight.batch_ndim == 1 and lora.weight.a.shape == (4, 2, 3)


def test_rank_and_key_positional(getkey):
    # The mission's spelling, `loraify(model, rank, key)`, and the keyword one agree.
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    key = getkey()
    assert eqx.tree_equal(ql.loraify(mlp, 2, key), ql.loraify(mlp, rank=2, key=key))
