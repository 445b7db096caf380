"""Which packed training rows each worker sees at each step, as a pure function of (seed, step).

Step s of a run with global batch G uses positions s*G .. (s+1)*G - 1 of an endless stream that walks a fresh seeded
permutation of the rows every epoch. Worker r of W takes every W-th of them, and micro-batch a of A every A-th of
those. Because nothing depends on what ran before, a run resumed at step s from a checkpoint continues with exactly
the batches an uninterrupted run would have used: none repeated, none skipped.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def load_rows(path: str | Path) -> np.ndarray:
    """Packed token rows [n, seq_len] as int32 (the ids column of a packed Parquet file)."""
    column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    seq_len = column.type.list_size
    return column.flatten().to_numpy().astype(np.int32, copy=False).reshape(-1, seq_len)


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
