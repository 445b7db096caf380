"""Cached teacher logits: the teacher's top-N next-token log-probabilities for every training row a run visits,
computed once into Parquet (stage `teacher_logits`, cached by DVC) so each student run of a sweep skips the teacher.

    row: int64              the packed training row
    indices: list<int32>    seq_len * N token ids, position-major
    logprobs: list<float32> log p_T of those ids at the distillation temperature T

Log-probs are taken over the whole vocabulary before truncation, so the probability mass outside the top N (the
tail) is known exactly: 1 - sum exp(logprobs). The sparse-support losses use it as one extra bin.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from moe2dense.distill.losses import SparseTarget

FILE = "teacher_logits.parquet"
CACHE_GROUPS = 16  # decoded row groups a worker keeps (each batch_rows x seq_len x N x 8 bytes)


def write_cached_logits(teacher, rows: np.ndarray, row_ids: np.ndarray, out: str | Path, *, top_n: int,
                        temperature: float, batch_rows: int = 8, progress: bool = True,
                        meta: dict | None = None) -> Path:
    """Run the teacher over rows[row_ids] and write their top-N log-probs to `out`/teacher_logits.parquet."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seq_len, vocab = rows.shape[1], teacher.config.vocab_size
    if top_n > vocab:
        raise ValueError(f"distill.cached_top_n = {top_n} exceeds the vocabulary ({vocab})")
    device = next(teacher.parameters()).device
    schema = pa.schema([("row", pa.int64()), ("indices", pa.list_(pa.int32(), seq_len * top_n)),
                        ("logprobs", pa.list_(pa.float32(), seq_len * top_n))],
                       metadata={"moe2dense": json.dumps({"top_n": top_n, "temperature": temperature,
                                                          "seq_len": seq_len, **(meta or {})})})
    path = out / FILE
    with pq.ParquetWriter(path, schema, compression="lz4") as writer, torch.no_grad():
        for s in tqdm(range(0, len(row_ids), batch_rows), desc="teacher logits", unit="batch", disable=not progress):
            batch = row_ids[s:s + batch_rows]
            ids = torch.from_numpy(rows[batch].astype(np.int64)).to(device)
            logits = teacher(input_ids=ids, use_cache=False).logits.float() / temperature
            top = logits.log_softmax(-1).topk(top_n, dim=-1)
            n = len(batch)
            writer.write_table(pa.table({
                "row": pa.array(batch, pa.int64()),
                "indices": pa.FixedSizeListArray.from_arrays(
                    pa.array(top.indices.to(torch.int32).reshape(-1).cpu().numpy()), seq_len * top_n),
                "logprobs": pa.FixedSizeListArray.from_arrays(
                    pa.array(top.values.reshape(-1).cpu().numpy()), seq_len * top_n),
            }, schema=schema), row_group_size=max(1, n))
    return path


class CachedTeacher:
    """Serves `SparseTarget`s for batches of training rows from a teacher_logits.parquet, reading row groups on demand
    (the writer makes one per `batch_rows` rows): only the row ids are read up front, and at most `cache_groups`
    decoded row groups are held (an LRU), so a worker's memory does not grow with the cache's size."""

    def __init__(self, path: str | Path, cache_groups: int = CACHE_GROUPS):
        path = Path(path)
        self._file = pq.ParquetFile(path / FILE if path.is_dir() else path)
        self.meta = json.loads(self._file.schema_arrow.metadata[b"moe2dense"])
        self._slot: dict[int, tuple[int, int]] = {}  # training row -> (row group, offset in it)
        for group in range(self._file.num_row_groups):
            rows = self._file.read_row_group(group, columns=["row"]).column("row").to_numpy()
            self._slot.update((int(r), (group, i)) for i, r in enumerate(rows))
        self.group = lru_cache(maxsize=cache_groups)(self._read_group)

    def _read_group(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, logprobs) [rows, seq_len, N] of one row group."""
        n, S = self.meta["top_n"], self.meta["seq_len"]
        table = self._file.read_row_group(group, columns=["indices", "logprobs"])
        return tuple(table.column(c).combine_chunks().flatten().to_numpy().reshape(-1, S, n)
                     for c in ("indices", "logprobs"))

    def target(self, row_ids: np.ndarray, temperature: float, device: torch.device):
        """A (start, end) -> SparseTarget function over the flattened tokens of these rows."""
        if abs(temperature - self.meta["temperature"]) > 1e-12:
            raise ValueError(f"cached teacher logits were computed at temperature {self.meta['temperature']}, the "
                             f"run asks for {temperature}: rerun stage teacher_logits")
        missing = [int(r) for r in row_ids if int(r) not in self._slot]
        if missing:
            raise KeyError(f"training rows {missing[:5]} are not in the cached teacher logits; rerun teacher_logits "
                           "with the same distill.tokens, batch_size and seed")
        n = self.meta["top_n"]
        rows = [(self.group(g), i) for g, i in (self._slot[int(r)] for r in row_ids)]
        idx = torch.from_numpy(np.stack([grp[0][i] for grp, i in rows]).reshape(-1, n).astype(np.int64)).to(device)
        logp = torch.from_numpy(np.stack([grp[1][i] for grp, i in rows]).reshape(-1, n)).to(device)
        return lambda start, end: SparseTarget(idx[start:end], logp[start:end])
