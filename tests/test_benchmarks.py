"""The benchmarks' smoke tests: `python -m benchmarks.run --quick` and
`python -m benchmarks.multi_adapter --quick` run end to end, and their deterministic
figures (XLA's FLOP counts) and outputs hold. Timings are not asserted: they belong to
the benchmarks."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import quaxlora as ql
from benchmarks import models, multi_adapter, run


def test_quick_benchmark_suite(tmp_path):
    with jax.enable_x64(False), jax.default_matmul_precision("default"):
        run.main(["--quick", "--no-peft", "--no-scan", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("mlp", "gpt", "minilm"):
        r = results[name]
        full, lora = r["step_full"]["flops"], r["step_quaxlora"]["flops"]
        floor = r["step_floor"]["flops"]
        # No weight gradient; the adapters cost more than the frozen floor.
        assert floor < lora < full
        # The analytic count is of matmuls only; on these tiny models the
        # elementwise rest is a few percent (test_cost.py holds the 3% bound).
        analytic = r["analytic_flops_lora"]
        assert analytic <= lora <= 1.1 * analytic
        # Merged inference is the base model's program.
        assert r["infer_merged"]["flops"] == r["infer_base"]["flops"]
        assert r["infer_base"]["flops"] < r["infer_unmerged"]["flops"]
        for figure in ("step_time", "step_ratio", "infer_ratio", "trace_time"):
            assert r[figure]
        assert r["compile_time"]["full"] > 0 and r["compile_time"]["quaxlora"] > 0
    # QLoRA stores the frozen base in 4 bits (`--quick` runs it on the MLP only).
    frozen = results["mlp"]["frozen_bytes"]
    assert frozen["qlora"] < 0.3 * frozen["lora"]
    table = (tmp_path / "results.md").read_text()
    assert "frozen floor" in table and "| gpt | train step" in table
    assert "| minilm | step compile, s" in table
    # DoRA rows: the norms add rank-sized work only (a few percent of FLOPs here).
    for name in ("mlp", "gpt"):
        d = results["dora"][name]
        lora, dora = d["lora_cost"]["flops"], d["dora_cost"]["flops"]
        assert lora < dora < 1.25 * lora
    assert "DoRA ÷ LoRA" in table
    assert "| mlp | QLoRA (NF4 base)" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000


@pytest.mark.no_leak_check  # select_adapter under vmap: see tests/test_stack.py
def test_variants_agree():
    with jax.enable_x64(False), jax.default_matmul_precision("default"):
        b = multi_adapter.build(models.QUICK, jr.key(0), adapters=3)
        v = b["variants"]
        mixed = v["mixed"].jit(*v["mixed"].args)
        grouped = v["grouped"].jit(*v["grouped"].args)
        x = b["x"]
        # Each adapter's merged model alone: one compiled program serves them all.
        run_merged = eqx.filter_jit(lambda m, x: jax.vmap(quax.quaxify(m))(x)[0])
        for i, model in enumerate(b["models"]):
            alone = run_merged(ql.merge(model), x[i : i + 1])
            np.testing.assert_allclose(mixed[i], alone, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(grouped[i], alone, rtol=1e-4, atol=1e-4)
        assert not np.allclose(mixed[0], jnp.asarray(mixed[1]))
        assert isinstance(b["stacked"].blocks[0].q.weight, ql.StackedLoraArray)
        assert eqx.tree_equal(ql.unstack_adapters(b["stacked"]), b["models"])


@pytest.mark.no_leak_check
def test_multi_adapter_quick_run():
    with jax.enable_x64(False), jax.default_matmul_precision("default"):
        res = multi_adapter.main(["--quick", "--reps", "1"])
    assert set(res["time"]) == {"single", "mixed", "grouped", "loop"}
    assert all(t > 0 for t in res["time"].values())
