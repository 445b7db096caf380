"""Bounded-memory safetensors I/O.

The `safetensors` library maps files with mmap; every page touched then counts as resident memory of the process,
which defeats streaming a 30B teacher layer by layer. Here the format is parsed directly and tensors are read with
`preadv` into fresh buffers (or written with `pwrite` at precomputed offsets), so memory holds only what is asked for.

Format: 8-byte little-endian u64 header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}, then the data buffer
(offsets relative to its start).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from moe2dense.quantized import dequantized_dtype, scheme_of
from moe2dense.teacher.source import VOCAB_FILES

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # block scales of ue8m0 fp8 checkpoints
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# The weight dtypes a `dtype` param may name (calibrate, assemble, evaluate; params.py's Literals spell the same).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a Hugging Face tokenizer may consist of: copied beside a student, and into a real teacher's pointer dir.
TOKENIZER_FILES = (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # same bound as the safetensors library: a larger "length" means a corrupt file
_MAX_IO = 1 << 30  # Linux transfers at most ~2 GiB per read/write call; stay well below


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _parse_header(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    base, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt or unsupported header entry for {name!r}: {info!r}") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise ValueError(f"{path}: tensor {name!r} has offsets [{begin}, {end}] inconsistent with shape {shape}, "
                             f"dtype {info['dtype']} or data size {data_size} (truncated file?)")
        entries[name] = _Entry(path, dtype, shape, base + begin, nbytes)
    return entries


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A writable/readable byte view of a contiguous CPU tensor (numpy has no bf16/fp8, so go through uint8)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class CheckpointReader:
    """Tensors of a checkpoint dir (model.safetensors, or model.safetensors.index.json + shards, or, failing both,
    every *.safetensors file in the dir) or of a single .safetensors file. Reads with os.preadv into fresh tensors.

    `bytes_read` counts tensor data bytes read so far (headers excluded), so callers/tests can check that
    `read_rows` touches only the rows asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._entries: dict[str, _Entry] = {}
        weight_map = None
        if self.path.is_file():
            files = [self.path]
        elif not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {self.path} (expected a .safetensors file or a dir)")
        elif (self.path / SINGLE_FILE).is_file():
            files = [self.path / SINGLE_FILE]
        elif (self.path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path / INDEX_FILE}: corrupt index ({e!r})") from e
            files = [self.path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{self.path / INDEX_FILE} names missing shard files: {missing}")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no checkpoint in {self.path}: looked for {SINGLE_FILE}, {INDEX_FILE} "
                                        f"and *.safetensors")
        for f in files:
            for name, entry in _parse_header(f).items():
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} is in both {self._entries[name].file} and {f}")
                self._entries[name] = entry
        for name, fname in (weight_map or {}).items():
            if name not in self._entries or self._entries[name].file.name != Path(fname).name:
                raise ValueError(f"{self.path / INDEX_FILE} maps {name!r} to {fname}, which does not contain it")
        # A quantized checkpoint (config.json's quantization_config) shows its float twin's tensors (quantized.py).
        self.quantization, self._qconfig, self._packed, self._hidden = None, {}, {}, set()
        self.dequantized_dtype = torch.bfloat16
        config = self.path / "config.json"
        if self.path.is_dir() and config.is_file():
            try:
                raw = json.loads(config.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config}: not valid JSON ({e})") from None
            qconfig = raw.get("quantization_config") if isinstance(raw, dict) else None
            self.quantization = scheme_of(qconfig, config)
            if self.quantization is not None:
                self._qconfig, self.dequantized_dtype = dict(qconfig), dequantized_dtype(raw)
                heads = {n: (e.dtype, e.shape) for n, e in self._entries.items()}
                self._packed = self.quantization.pair(heads, self._qconfig)
                self._hidden = {n for p in self._packed.values() for n in (p.values, p.scales)} - set(self._packed)
                self._hidden |= {n for n in self._entries if n.endswith(self.quantization.extra_suffixes)}

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.path}") from None

    def keys(self) -> list[str]:
        """The float twin's tensor names: a quantized tensor's parts appear as the one tensor they store."""
        return sorted((set(self._entries) - self._hidden) | set(self._packed))

    def __contains__(self, name: object) -> bool:
        return name in self._packed or (name in self._entries and name not in self._hidden)

    def raw_keys(self) -> list[str]:
        """The names as stored (quantized parts included)."""
        return sorted(self._entries)

    def is_quantized(self, name: str) -> bool:
        return name in self._packed

    def shape(self, name: str) -> tuple[int, ...]:
        return self._packed[name].shape if name in self._packed else self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.dequantized_dtype if name in self._packed else self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        if name in self._packed:
            return math.prod(self._packed[name].shape) * self.dequantized_dtype.itemsize
        return self._entry(name).nbytes

    def file_of(self, name: str) -> Path:
        return self._entry(self._packed[name].values if name in self._packed else name).file

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def _pread_into(self, file: Path, buf: memoryview, offset: int) -> None:
        fd, done = self._fd(file), 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:done + _MAX_IO]], offset + done)
            if n == 0:
                raise OSError(f"{file}: unexpected end of file at byte {offset + done}")
            done += n
        self.bytes_read += done

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in memory the tensor owns (not a view of a file mapping); a quantized one dequantized
        into `dequantized_dtype`."""
        if name in self._packed:
            return self.quantization.read(self, self._packed[name], None, self._qconfig, self.dequantized_dtype)
        return self.read_raw(name)

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """tensor[rows] along dim 0, reading only those rows' bytes (of a quantized tensor: only their parts)."""
        if name in self._packed:
            rows = [int(r) for r in rows]
            bad = [r for r in rows if not 0 <= r < self._packed[name].shape[0]]
            if bad:
                raise IndexError(f"read_rows({name!r}): rows {bad[:10]} out of range for dim 0 of size "
                                 f"{self._packed[name].shape[0]}")
            return self.quantization.read(self, self._packed[name], rows, self._qconfig, self.dequantized_dtype)
        return self.read_raw_rows(name, rows)

    def read_raw(self, name: str) -> torch.Tensor:
        """A tensor as stored."""
        e = self._entry(name)
        raw = torch.empty(e.nbytes, dtype=torch.uint8)
        self._pread_into(e.file, _as_bytes(raw), e.offset)
        return raw.view(e.dtype).reshape(e.shape)

    def read_raw_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """tensor[rows] along dim 0 as stored, reading only those rows' bytes; each run of consecutive rows is one
        read straight into the result, so nothing larger than the result is ever allocated."""
        e = self._entry(name)
        if not e.shape:
            raise ValueError(f"read_rows({name!r}): tensor is 0-d")
        n = e.shape[0]
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < n]
        if bad:
            raise IndexError(f"read_rows({name!r}): rows {bad[:10]} out of range for dim 0 of size {n}")
        row_bytes = e.nbytes // n if n else 0
        raw = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
        out = _as_bytes(raw)
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                self._pread_into(e.file, out[start * row_bytes:i * row_bytes], e.offset + rows[start] * row_bytes)
                start = i
        return raw.view(e.dtype).reshape(len(rows), *e.shape[1:])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Streams tensors into safetensors shards whose layout is fixed up front from `plan`, so tensors can be written
    one at a time in any order and memory never holds more than the tensor being written.

    Shards are named as transformers' save_pretrained names them; with several, close() also writes
    model.safetensors.index.json. `files` are the shard paths, `total_bytes` the summed tensor bytes (the index's
    total_size)."""

    def __init__(self, out_dir: str | os.PathLike, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        meta = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError(f"safetensors metadata must map str to str, got {metadata!r}")
        self._plan: dict[str, tuple[tuple[int, ...], torch.dtype, int]] = {}  # name -> (shape, dtype, shard index)
        shards: list[list[tuple[str, int]]] = [[]]  # per shard: (name, nbytes) in plan order
        shard_bytes = 0
        for name, shape, dtype in plan:
            shape = tuple(int(d) for d in shape)
            if name in self._plan:
                raise ValueError(f"duplicate tensor name in plan: {name!r}")
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"{name!r}: dtype {dtype} has no safetensors equivalent")
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, nbytes))
            shard_bytes += nbytes
            self._plan[name] = (shape, dtype, len(shards) - 1)
        self.total_bytes = sum(nb for shard in shards for _, nb in shard)
        self._files = [self.out_dir / _shard_name(i, len(shards)) for i in range(len(shards))]
        self._offsets: dict[str, int] = {}
        self._written: set[str] = set()
        self._fds: list[int] = []
        self._created: list[Path] = []  # what abort() may delete: never a file this writer did not create
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            for path, shard in zip(self._files, shards):
                self._create_shard(path, shard, meta)
        except BaseException:
            self.abort()
            raise

    def _create_shard(self, path: Path, shard: list[tuple[str, int]], meta: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": meta}
        rel: dict[str, int] = {}
        pos = 0
        for name, nbytes in shard:
            shape, dtype, _ = self._plan[name]
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            rel[name] = pos
            pos += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the safetensors library pads so the data buffer starts 8-byte aligned
        base = 8 + len(blob)
        self._offsets.update({name: base + off for name, off in rel.items()})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        self._created.append(path)
        self._pwrite(fd, memoryview(struct.pack("<Q", len(blob)) + blob), 0)
        os.ftruncate(fd, base + pos)

    @staticmethod
    def _pwrite(fd: int, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, buf[done:done + _MAX_IO], offset + done)

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ValueError(f"write({name!r}): writer for {self.out_dir} is closed")
        if name not in self._plan:
            raise ValueError(f"write({name!r}): not in the plan")
        if name in self._written:
            raise ValueError(f"write({name!r}): already written")
        shape, dtype, shard = self._plan[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"write({name!r}): expected shape {shape} dtype {dtype}, "
                             f"got shape {tuple(tensor.shape)} dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        self._pwrite(self._fds[shard], _as_bytes(t), self._offsets[name])
        self._written.add(name)

    def close(self) -> list[Path]:
        """Finish: every planned tensor must have been written. Returns the shards (and index) written."""
        index = self.out_dir / INDEX_FILE
        sharded = len(self._files) > 1
        if not self._closed:
            missing = [n for n in self._plan if n not in self._written]
            if missing:
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise ValueError(f"{len(missing)} tensors never written to {self.out_dir}: {missing[:10]}{more}")
            self._close_fds()
            if sharded:
                self._created.append(index)
                weight_map = {n: self._files[s].name for n, (_, _, s) in self._plan.items()}
                index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                                            indent=2, sort_keys=True) + "\n")
            self._closed = True
        return self.files + ([index] if sharded else [])

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        """Close and delete every file this writer created (e.g. after a failed conversion)."""
        self._close_fds()
        self._closed = True
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
