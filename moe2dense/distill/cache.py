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
import shutil
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


def logits_schema(seq_len: int, top_n: int, temperature: float, meta: dict | None = None) -> pa.Schema:
    """The cache's schema; its metadata is what CachedTeacher checks a run against."""
    return pa.schema([("row", pa.int64()), ("indices", pa.list_(pa.int32(), seq_len * top_n)),
                      ("logprobs", pa.list_(pa.float32(), seq_len * top_n))],
                     metadata={"moe2dense": json.dumps({"top_n": top_n, "temperature": temperature,
                                                        "seq_len": seq_len, **(meta or {})})})


def batch_ranges(n_rows: int, batch_rows: int, parts: int) -> list[range]:
    """Contiguous ranges of batch indices, one per part (empty ones dropped). Parts split at batch boundaries, so
    every batch holds the same rows as on the single-worker path and its numbers are the same."""
    batches = -(-n_rows // batch_rows)
    return [r for r in (range(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(batches), parts) if len(a))]


def write_part(teacher, rows: np.ndarray, row_ids: np.ndarray, path: str | Path, *, top_n: int, temperature: float,
               batch_rows: int = 8, batches: range | None = None, progress: bool = True,
               meta: dict | None = None) -> Path:
    """Run the teacher over the `batches` (all by default) of `batch_rows` rows of rows[row_ids] and write their top-N
    log-probs to the Parquet file `path`, one row group per batch."""
    path = Path(path)
    seq_len, vocab = rows.shape[1], teacher.config.vocab_size
    if top_n > vocab:
        raise ValueError(f"distill.cached_top_n = {top_n} exceeds the vocabulary ({vocab})")
    device = next(teacher.parameters()).device
    schema = logits_schema(seq_len, top_n, temperature, meta)
    batches = range(-(-len(row_ids) // batch_rows)) if batches is None else batches
    with pq.ParquetWriter(path, schema, compression="lz4") as writer, torch.no_grad():
        for b in tqdm(batches, desc="teacher logits", unit="batch", disable=not progress):
            batch = row_ids[b * batch_rows:(b + 1) * batch_rows]
            ids = torch.from_numpy(rows[batch].astype(np.int64)).to(device)
            logits = teacher(input_ids=ids, use_cache=False).logits.float() / temperature
            top = logits.log_softmax(-1).topk(top_n, dim=-1)
            writer.write_table(pa.table({
                "row": pa.array(batch, pa.int64()),
                "indices": pa.FixedSizeListArray.from_arrays(
                    pa.array(top.indices.to(torch.int32).reshape(-1).cpu().numpy()), seq_len * top_n),
                "logprobs": pa.FixedSizeListArray.from_arrays(
                    pa.array(top.values.reshape(-1).cpu().numpy()), seq_len * top_n),
            }, schema=schema), row_group_size=max(1, len(batch)))
    return path


def write_cached_logits(teacher, rows: np.ndarray, row_ids: np.ndarray, out: str | Path, *, top_n: int,
                        temperature: float, batch_rows: int = 8, progress: bool = True,
                        meta: dict | None = None) -> Path:
    """Run the teacher over rows[row_ids] and write their top-N log-probs to `out`/teacher_logits.parquet."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_part(teacher, rows, row_ids, out / FILE, top_n=top_n, temperature=temperature,
                      batch_rows=batch_rows, progress=progress, meta=meta)


def merge_parts(parts: list[Path], path: str | Path) -> Path:
    """Stream the parts' row groups, in the parts' order (their batch ranges'), into one Parquet file at `path`: the
    same schema, metadata and one row group per batch, so the same bytes as the single-worker file."""
    stored = pq.read_schema(parts[0])
    meta = json.loads(stored.metadata[b"moe2dense"])
    # Rebuilt, not reused: Parquet reads the lists' child fields back as `element`, the writer named them `item`,
    # and the Arrow schema embedded in the footer would differ.
    schema = logits_schema(meta.pop("seq_len"), meta.pop("top_n"), meta.pop("temperature"), meta)
    with pq.ParquetWriter(path, schema, compression="lz4") as writer:
        for part in parts:
            f = pq.ParquetFile(part)
            if f.schema_arrow.metadata != stored.metadata or not f.schema_arrow.equals(stored):
                raise ValueError(f"{part}: its schema or metadata differs from {parts[0]}'s; rerun teacher_logits")
            for g in range(f.num_row_groups):
                table = f.read_row_group(g).cast(schema)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
    return Path(path)


def _part_task(teacher_dir: str, rows_npy: str, row_ids: np.ndarray, path: str, batches: range, use_gpu: bool,
               threads: int, top_k: int | None, kw: dict) -> str:
    """One Ray worker's part: it loads the teacher itself on its device, in the dtype the distill workers run it in."""
    from moe2dense.distill.data import open_rows
    from moe2dense.teacher.load import load_frozen, run_dtype
    from moe2dense.training import deterministic_algorithms

    device = torch.device("cuda" if use_gpu else "cpu")  # Ray's num_gpus=1 leaves this worker its own GPU only
    if not use_gpu:
        # CPU matmuls split their sums by thread: the driver's thread count (Ray would set cpus_per_worker) keeps
        # every batch's numbers those of a single worker on this machine.
        torch.set_num_threads(threads)
    # The cache is a DVC output: the same bytes on every rerun, and as the single-worker path writes.
    with deterministic_algorithms(warn_only=True, cuda=use_gpu, fill_uninitialized_memory=True):
        teacher = load_frozen(teacher_dir, run_dtype(device), device, top_k)
        write_part(teacher, open_rows(rows_npy), row_ids, path, batches=batches, progress=False, **kw)
    return path


def write_cached_logits_ray(teacher_dir: str | Path, train_path: str | Path, row_ids: np.ndarray, out: str | Path, *,
                            workers: int, use_gpu: bool, cpus_per_worker: int, top_n: int, temperature: float,
                            top_k: int | None = None, batch_rows: int = 8, progress: bool = True,
                            meta: dict | None = None) -> Path:
    """`write_cached_logits` split over Ray: one task per worker (a GPU each, or `cpus_per_worker` CPUs) computes a
    contiguous range of batches into its own part under `out`/.parts, reading the packed rows of `train_path` from
    one memory-mapped decoded copy there (`decode_rows`, no copy per worker); the parts are then merged into
    `out`/teacher_logits.parquet, the same file as one worker writes, and removed. The caller has validated the
    checkpoint `teacher_dir` (teacher_config), started Ray (driver.start_ray) and chosen the workers (plan_workers)."""
    import ray

    from moe2dense.distill.data import decode_rows

    out = Path(out)
    parts_dir = out / ".parts"
    rows_npy = decode_rows(train_path, parts_dir)
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else cpus_per_worker)(_part_task)
    kw = dict(top_n=top_n, temperature=temperature, batch_rows=batch_rows, meta=meta)
    ids_ref = ray.put(np.asarray(row_ids))
    ranges = batch_ranges(len(row_ids), batch_rows, workers) or [range(0)]  # no rows: one empty part, as one worker
    parts = [parts_dir / f"part-{i:05d}.parquet" for i in range(len(ranges))]
    pending = [task.remote(str(Path(teacher_dir).resolve()), str(rows_npy.resolve()), ids_ref, str(part.resolve()), r,
                           use_gpu, torch.get_num_threads(), top_k, kw) for part, r in zip(parts, ranges)]
    with tqdm(total=len(pending), desc="teacher logits (parts)", unit="part", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # a failed worker's error surfaces here
            bar.update(len(done))
    path = merge_parts(parts, out / FILE)
    shutil.rmtree(parts_dir)
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
