"""The safetensors file format: reading with every rule of the format checked, and
atomic writing. Used by the adapter files (`_io`) and the PEFT interchange (`_peft`)."""

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np


_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to `path` atomically: into a temporary file in the same folder,
    flushed to disk, then renamed over `path`. On any error, whatever was at `path`
    is untouched, and the temporary file is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]
) -> None:
    """Write `tensors` to `path` in the safetensors format, atomically (see
    `atomic_write`)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name, x in tensors.items():
        x = np.asarray(x)
        if x.dtype not in _CODES:
            raise TypeError(f"Cannot save `{name}` of dtype {x.dtype} to safetensors.")
        if x.dtype.byteorder == ">":
            x = x.astype(x.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(x).tobytes()
        header[name] = {
            "dtype": _CODES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    atomic_write(path, [struct.pack("<Q", len(head)) + head, *chunks])


def _mode(path: str) -> int:
    """The permissions a plainly created file would get (`mkstemp` uses 0o600)."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _tensor(buf: memoryview, name: str, info: Any) -> tuple[np.ndarray, tuple]:
    """One tensor of the byte buffer, checked against the safetensors rules."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor `{name}` has a malformed entry")
    dtype, shape, span = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise ValueError(f"tensor `{name}` has unsupported dtype {dtype!r}")
    ints = lambda xs: (
        isinstance(xs, list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in xs)
    )
    if not ints(shape) or not ints(span) or len(span) != 2:
        raise ValueError(f"tensor `{name}` has a malformed shape or offsets")
    start, stop = span
    size = math.prod(shape) * _DTYPES[dtype].itemsize
    if not start <= stop <= len(buf) or stop - start != size:
        raise ValueError(f"tensor `{name}`'s data is out of bounds (truncated?)")
    x = np.frombuffer(buf[start:stop], _DTYPES[dtype].newbyteorder("<"))
    return x.reshape(shape).astype(_DTYPES[dtype]), (start, stop)


def read_safetensors(
    path: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole safetensors file, checking it against the format's rules:
    `(tensors, metadata)`. A malformed file raises `ValueError`, a missing one
    `FileNotFoundError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No file at `path` {path!r}.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        if len(data) < 8:
            raise ValueError(f"the file is only {len(data)} bytes long (truncated?)")
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError("its header runs past the end of the file (truncated?)")
        try:
            header = json.loads(data[8 : 8 + n], object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"its header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise ValueError("its metadata is not a map of strings")
        buf = memoryview(data)[8 + n :]
        tensors, spans = {}, []
        for name, info in header.items():
            tensors[name], span = _tensor(buf, name, info)
            spans.append(span)
        end = 0
        for start, stop in sorted(spans):
            if start != end:
                raise ValueError("its tensors overlap or leave holes in the data")
            end = stop
        if end != len(buf):
            raise ValueError("it has trailing bytes after the tensor data")
    except ValueError as e:
        raise ValueError(
            f"`path` {path!r} is not a valid safetensors file: {e}."
        ) from None
    return tensors, metadata
