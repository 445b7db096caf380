"""Which packed training rows each worker sees at each step, as a pure function of (seed, step).

Step s of a run with global batch G uses positions s*G .. (s+1)*G - 1 of an endless stream that walks a fresh seeded
permutation of the rows every epoch. Worker r of W takes every W-th of them, and micro-batch a of A every A-th of
those. Because nothing depends on what ran before, a run resumed at step s from a checkpoint continues with exactly
the batches an uninterrupted run would have used: none repeated, none skipped.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from moe2dense.io import atomic_file, hash_parquet_footer


def seq_len_of(path: str | Path) -> int:
    """Tokens per packed row, from the Parquet schema alone."""
    return pq.read_schema(path).field("input_ids").type.list_size


def _ids(table) -> np.ndarray:
    column = table.column("input_ids").combine_chunks()
    return column.flatten().to_numpy().astype(np.int32, copy=False).reshape(-1, column.type.list_size)


def load_rows(path: str | Path, limit: int | None = None) -> np.ndarray:
    """Packed token rows [n, seq_len] as int32 (the ids column of a packed Parquet file), in memory: the first
    `limit` rows only (row group by row group), or all. Training reads `decode_rows`' memory map instead."""
    f = pq.ParquetFile(path)
    if limit is None:
        return _ids(f.read(columns=["input_ids"]))
    parts, n = [], 0
    for group in range(f.num_row_groups):
        if n >= limit:
            break
        parts.append(_ids(f.read_row_group(group, columns=["input_ids"]))[: limit - n])
        n += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros((0, seq_len_of(path)), np.int32)


def decode_rows(path: str | Path, cache_dir: str | Path) -> Path:
    """The packed rows of `path` decoded once into an uncompressed int32 .npy in `cache_dir` (named by the Parquet's
    footer hash, so a rebuilt split gets a new file), streamed row group by row group. Every worker then maps it
    (`open_rows`): the rows are shared through the page cache, and no worker's memory grows with the number of
    training tokens."""
    path, cache_dir = Path(path), Path(cache_dir)
    h = hashlib.sha256()
    hash_parquet_footer(h, path)
    out = cache_dir / f"rows-{h.hexdigest()[:16]}.npy"
    if out.exists():
        return out
    f = pq.ParquetFile(path)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False,
              "shape": (f.metadata.num_rows, seq_len_of(path))}
    with atomic_file(out, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for group in range(f.num_row_groups):
            fh.write(_ids(f.read_row_group(group, columns=["input_ids"])).tobytes())
    return out


def open_rows(npy: str | Path) -> np.ndarray:
    """`decode_rows`' file as a read-only memory map [n, seq_len] (indexing a batch copies only that batch)."""
    return np.load(npy, mmap_mode="r")


@lru_cache(maxsize=4)
def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def step_rows(step: int, global_batch: int, n_rows: int, seed: int) -> np.ndarray:
    """Row indices of the G sequences of optimizer step `step`."""
    positions = np.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = np.divmod(positions, n_rows)
    return np.array([_permutation(n_rows, seed, int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


def worker_micro_rows(step: int, global_batch: int, n_rows: int, seed: int, rank: int, world: int,
                      accum: int) -> list[np.ndarray]:
    """The `accum` micro-batches (row indices) worker `rank` of `world` runs at `step`."""
    mine = step_rows(step, global_batch, n_rows, seed)[rank::world]
    return [mine[a::accum] for a in range(accum)]


def check_batch_split(global_batch: int, world: int, accum: int) -> None:
    if global_batch % (world * accum):
        raise ValueError(
            f"distill.batch_size = {global_batch} sequences per step must split evenly over {world} worker(s) x "
            f"distill.grad_accum = {accum} micro-batches; use a multiple of {world * accum}"
        )
