"""Smoke tests: the CNN and language-model examples, at tiny sizes."""

import importlib.util
import math
from pathlib import Path

import equinox as eqx
import jax.tree_util as jtu
import quax

import quaxlora as ql


EXAMPLES = Path(__file__).parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_digits():
    out = _load("conv_digits").main(
        width=8,
        rank=2,
        pretrain_steps=60,
        lora_steps=40,
        batch_size=32,
        progress=False,
        verbose=False,
    )
    for k in ("acc_original", "acc_before", "acc_after", "acc_merged"):
        assert 0.0 <= out[k] <= 1.0
    assert out["acc_original"] > 0.5  # well above chance (0.1)
    losses = out["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert abs(out["acc_after"] - out["acc_merged"]) < 0.01
    assert 0 < out["trainable"] < out["total"]
    assert out["depthwise_plan"] == "delta"
    trainable, _ = ql.partition(out["model"])
    assert ql.count_parameters(trainable).total == out["trainable"]
    assert isinstance(out["model"].depthwise.weight, ql.LoraArray)


def test_tiny_lm():
    out = _load("tiny_lm").main(
        dim=16,
        depth=1,
        heads=2,
        length=16,
        batch_size=4,
        rank=2,
        pretrain_steps=10,
        lora_steps=10,
        max_chars=20_000,
        progress=False,
        verbose=False,
    )
    for k in ("loss_original", "loss_before", "loss_after", "loss_merged"):
        assert math.isfinite(out[k]) and out[k] > 0
    # The LoRA model is evaluated on the same windows before and after.
    assert out["loss_after"] < out["loss_before"]
    assert abs(out["loss_after"] - out["loss_merged"]) < 1e-3
    assert out["perplexity_after"] == math.exp(out["loss_after"])
    assert 0 < out["trainable"] < out["total"]
    model = out["model"]
    assert isinstance(model.embed.weight, ql.LoraArray)
    assert model.blocks.fc1.weight.batch_ndim == 1
    assert not any(isinstance(x, quax.Value) for x in jtu.tree_leaves(ql.merge(model)))
    assert eqx.is_array(ql.merge(model).embed.weight)
