"""safetensors shards read and written one tensor at a time (plain file I/O: no mmap, no whole-shard buffers), so
the streaming merge holds about one tensor besides the adapter; and the base checkpoint's shard layout."""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import QwentuneError
from .checkpoint import read_json

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class ShardReader:
    """Reads a safetensors file tensor by tensor into fresh memory.

    By hand: `safetensors.safe_open` maps the whole file, and the mapped pages of a big shard count against the
    merge's memory; plain reads keep it at one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")  # closed in close() / __exit__
        try:
            (size,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(size))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._fh.close()
            raise QwentuneError(f"not a safetensors file: {exc}", where=str(self.path)) from exc
        self._start = 8 + size
        self.metadata = header.pop("__metadata__", None)
        self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        for key, info in self._entries.items():
            if info["dtype"] not in _ST_DTYPES:
                self._fh.close()
                raise QwentuneError(f"{key}: unsupported safetensors dtype {info['dtype']}", where=str(self.path))

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        info = self._entries[key]
        begin, end = info["data_offsets"]
        dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        self._fh.seek(self._start + begin)
        if self._fh.readinto(buf) != len(buf):
            raise QwentuneError(f"{key}: file ends early", where=str(self.path))
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes a safetensors file whose tensors (name, dtype, shape) are known up front, one tensor at a time.

    By hand: `safetensors.torch.save_file` takes the whole dict of tensors at once, i.e. a whole shard in memory."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        if sys.byteorder != "little":  # safetensors stores little-endian data
            raise QwentuneError("the streaming merge needs a little-endian machine", hint="use streaming=False")
        self.path = Path(path)
        self.keys = [k for k, _, _ in specs]
        self._specs = {k: (d, tuple(sh)) for k, d, sh in specs}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.nbytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._next = 0
        self._fh = open(self.path, "wb")  # closed in close() / __exit__
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.keys[self._next] if self._next < len(self.keys) else None
        dtype, shape = self._specs.get(key, (None, None))
        if key != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise QwentuneError(
                f"internal: wrote {key} {tensor.dtype} {tuple(tensor.shape)}, expected {expected} {dtype} {shape}",
                where=str(self.path),
            )
        if tensor.numel():
            self._fh.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None and self._next != len(self.keys):
            raise QwentuneError(f"internal: {len(self.keys) - self._next} tensors not written", where=str(self.path))


@dataclass
class BaseCheckpoint:
    root: Path
    shards: list[str]
    key_to_shard: dict[str, str]
    indexed: bool

    @classmethod
    def open(cls, root: Path) -> BaseCheckpoint:
        from safetensors import safe_open

        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            key_to_shard = dict(weight_map)
            for shard in shards:
                if not (root / shard).is_file():
                    raise QwentuneError(f"missing shard {shard}", where=str(index))
            return cls(root, shards, key_to_shard, True)
        single = root / "model.safetensors"
        if single.is_file():
            with safe_open(str(single), "pt") as f:
                keys = list(f.keys())
            return cls(root, ["model.safetensors"], {k: "model.safetensors" for k in keys}, False)
        hint = "convert it to safetensors first (the streaming merge reads safetensors shards)"
        if any(root.glob("*.bin")):
            hint += ", or use streaming=False"
        raise QwentuneError("no model.safetensors or model.safetensors.index.json", where=str(root), hint=hint)


def verify_output(tmp: Path) -> None:
    from safetensors import safe_open

    if any(p.suffix == ".bin" for p in tmp.iterdir()):
        raise QwentuneError("a .bin weight file was written", where=str(tmp))
    files = sorted(p for p in tmp.iterdir() if p.suffix == ".safetensors")
    if not files:
        raise QwentuneError("no safetensors weights were written", where=str(tmp))
    for path in files:
        with safe_open(str(path), "pt") as f:
            bad = [k for k in f.keys() if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
        if bad:
            raise QwentuneError(f"adapter keys left in the merged weights: {bad[:3]}", where=str(path))
