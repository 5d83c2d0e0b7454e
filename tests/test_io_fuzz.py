"""Fuzzing `load_adapters` with mutated, truncated and rewritten files: it either
loads a model of the right structure or raises a clear `ValueError` — never another
exception, never a partial model, never a change to the model passed in."""

import json
import os
import tempfile

import equinox as eqx
import hypothesis.strategies as st
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from hypothesis import given, HealthCheck, settings

import quaxlora as ql
from quaxlora._io import digest
from quaxlora._safetensors import _DTYPES, read_safetensors, write_safetensors


BASE = eqx.nn.MLP(3, 2, 4, 1, key=jr.key(0))
MODEL = ql.loraify(
    BASE, rank=2, key=jr.key(1), where="layers.0", modules_to_save="layers.1"
)
LEAVES = jtu.tree_leaves(MODEL)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        ql.save_adapters(path, MODEL)
        with open(path, "rb") as f:
            return f.read()


VALID = _valid_bytes()


def _signature(model):
    """Paths, shapes and dtypes of the arrays (a loaded alpha may differ)."""
    arrays = eqx.filter(model, eqx.is_array)
    flat = jtu.tree_leaves_with_path(arrays)
    return [(jtu.keystr(p), x.shape, x.dtype) for p, x in flat]


def _check_load(data: bytes, exact: bool = True, field: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        for model in (MODEL, BASE):
            try:
                loaded = ql.load_adapters(path, model)
            except ValueError as e:
                assert "`path`" in str(e) or "does not match `model` at" in str(e)
                if field is not None and "malformed metadata" in str(e):
                    # The error names the target and the field that is wrong.
                    assert "layers.0.weight" in str(e)
                    assert f"`{field}`" in str(e) or f"'{field}'" in str(e)
            else:
                assert _signature(loaded) == _signature(MODEL)
                if exact:  # the checksum lets no change through
                    assert eqx.tree_equal(loaded, MODEL)
            try:
                loaded, _ = ql.load_adapters(path, model, strict=False)
            except ValueError as e:
                assert "`path`" in str(e)
    assert all(x is y for x, y in zip(jtu.tree_leaves(MODEL), LEAVES, strict=True))


def _write_signed(path, tensors, meta):
    """Write a rewritten file with a valid checksum, to reach the later checks."""
    write_safetensors(path, tensors, {**meta, "sha256": digest(tensors, meta)})


def test_valid_file_loads():
    _check_load(VALID)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        with open(path, "wb") as f:
            f.write(VALID)
        assert eqx.tree_equal(ql.load_adapters(path, BASE), MODEL)


@FUZZ
@given(st.integers(0, len(VALID) - 1))
def test_truncated(n):
    _check_load(VALID[:n])


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_mutated_bytes(edits):
    data = bytearray(VALID)
    for i, byte in edits:
        data[i] = byte
    _check_load(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(min_size=1, max_size=16))
def test_inserted_bytes(i, extra):
    _check_load(VALID[:i] + extra + VALID[i:])


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes(data):
    _check_load(data)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = [
    "rank",
    "alpha",
    "rslora",
    "batch_ndim",
    "dtype",
    "weight_shape",
    "weight_dtype",
]


@FUZZ
@given(st.sampled_from(_FIELDS), _json)
def test_rewritten_target_metadata(field, value):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        with open(path, "wb") as f:
            f.write(VALID)
        tensors, meta = read_safetensors(path)
        targets = json.loads(meta["targets"])
        targets["layers.0.weight"][field] = value
        _write_signed(path, tensors, {**meta, "targets": json.dumps(targets)})
        with open(path, "rb") as f:
            data = f.read()
    _check_load(data, exact=False, field=field)


@FUZZ
@given(st.sampled_from(["format", "format_version", "targets", "trainable"]), _json)
def test_rewritten_metadata(key, value):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        with open(path, "wb") as f:
            f.write(VALID)
        tensors, meta = read_safetensors(path)
        meta[key] = value if isinstance(value, str) else json.dumps(value)
        _write_signed(path, tensors, meta)
        with open(path, "rb") as f:
            data = f.read()
    _check_load(data, exact=False)


@FUZZ
@given(
    st.sampled_from(sorted(_DTYPES)),
    st.lists(st.integers(0, 5), max_size=3),
)
def test_rewritten_tensor(dtype, shape):
    """A tensor of another dtype or shape, the file otherwise consistent."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.safetensors")
        with open(path, "wb") as f:
            f.write(VALID)
        tensors, meta = read_safetensors(path)
        tensors["layers.0.weight.a"] = np.zeros(shape, _DTYPES[dtype])
        _write_signed(path, tensors, meta)
        with open(path, "rb") as f:
            data = f.read()
    _check_load(data, exact=False)
