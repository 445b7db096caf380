"""On-disk layout of a calibration run (Parquet, hive-partitioned by layer) with its writers and readers.

    <root>/meta.json                                 run metadata (sorted keys, no timestamps)
    <root>/routing/layer=<L>/part-00000.parquet      one row per token: seq, pos, domain, experts[k], weights[k],
                                                     optional probs[E] (float16)
    <root>/stats/layer=<L>/stats.parquet             one row per expert: the LayerStats sums, gram row[E]

The hive key `layer` lives only in the directory name, never in a file's schema (readers add it from the path;
a column of the same name would clash). Every file is written to `<name>.tmp` and then os.replace'd, so a
reader never sees a half-written file; the caller makes `root` itself a temp dir and renames it when done.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from moe2dense.scoring import LayerStats

COMPRESSION = "zstd"  # small files (stats): best ratio
# Routing rows stream while the teacher runs: zstd cost ~4x lz4's CPU for ~6% smaller files (262k rows: 0.58 s vs
# 0.15 s, 2-core VM), and on 2 cores that CPU comes out of the forward's share (routing capture 1.22x -> see bench).
ROUTING_COMPRESSION = "lz4"
# LayerStats vectors stored as float64 columns (gram is stored separately as a fixed-size list row).
_STAT_VECTORS = (
    "count", "prob_sum", "prob_sum_selected", "weight_sum",
    "norm_sum_routed", "gnorm_sum_routed", "norm_sum_all", "sqnorm_sum_all",
)


def routing_path(root: str | os.PathLike, layer: int) -> Path:
    return Path(root) / "routing" / f"layer={layer}" / "part-00000.parquet"


def stats_path(root: str | os.PathLike, layer: int) -> Path:
    return Path(root) / "stats" / f"layer={layer}" / "stats.parquet"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _fixed_list(a: np.ndarray, size: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), size)


def routing_schema(top_k: int, num_experts: int, store_probs: bool) -> pa.Schema:
    fields = [
        pa.field("seq", pa.int32()),
        pa.field("pos", pa.int32()),
        pa.field("domain", pa.dictionary(pa.int32(), pa.string())),
        pa.field("experts", pa.list_(pa.int16(), top_k)),
        pa.field("weights", pa.list_(pa.float32(), top_k)),
    ]
    if store_probs:
        fields.append(pa.field("probs", pa.list_(pa.float16(), num_experts)))
    return pa.schema(fields)


class RoutingWriter:
    """Streams per-token routing of one layer into `routing/layer=<L>/part-00000.parquet`.

    Every ParquetWriter.write_table call makes at least one row group, so batches are buffered and written as
    row groups of exactly `row_group_rows` (the last one shorter): a few large groups compress and scan well, and
    memory stays bounded by one group plus the incoming batch however many tokens pass through.
    """

    def __init__(self, root, layer: int, top_k: int, num_experts: int, store_probs: bool = False,
                 row_group_rows: int = 65536):
        self.top_k, self.num_experts, self.store_probs = top_k, num_experts, store_probs
        self.row_group_rows = row_group_rows
        self.path = routing_path(root, layer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = routing_schema(top_k, num_experts, store_probs)
        # The buffer holds domain as plain strings; each row group is dictionary-encoded on its own when written.
        self._buffer_schema = self.schema.set(2, pa.field("domain", pa.string()))
        # Plain encoding for float16: BYTE_STREAM_SPLIT would compress better but polars cannot read it.
        # Dictionary encoding only for domain: tried on the float weights and expert ids it costs 3.5x the write time
        # (57 vs 16 ms per 65,536-row group) for a larger file.
        self._writer = pq.ParquetWriter(_tmp(self.path), self.schema, compression=ROUTING_COMPRESSION,
                                        use_dictionary=["domain"])
        self._buffer: list[pa.Table] = []
        self._rows = 0
        self.rows_written = 0

    def append(self, seq, pos, domain, experts, weights, probs=None) -> None:
        """Add a batch of n tokens: seq, pos (n,); domain (n,) strings or one string; experts, weights (n, k);
        probs (n, E), required iff store_probs. Torch or numpy inputs."""
        experts = _numpy(experts, np.int16)
        n = experts.shape[0]
        weights = _numpy(weights, np.float32)
        seq, pos = _numpy(seq, np.int32), _numpy(pos, np.int32)
        if experts.shape != (n, self.top_k) or weights.shape != (n, self.top_k):
            raise ValueError(f"experts {experts.shape} and weights {weights.shape} must be (n, top_k={self.top_k})")
        if seq.shape != (n,) or pos.shape != (n,):
            raise ValueError(f"seq {seq.shape} and pos {pos.shape} must be ({n},)")
        if n and (experts.min() < 0 or experts.max() >= self.num_experts):
            raise ValueError(f"expert ids must be in [0, {self.num_experts}), got [{experts.min()}, {experts.max()}]")
        if (probs is not None) != self.store_probs:
            raise ValueError(f"probs must be given iff store_probs (store_probs={self.store_probs})")
        domain = pa.repeat(domain, n) if isinstance(domain, str) else pa.array(np.asarray(domain), pa.string())
        if len(domain) != n:
            raise ValueError(f"domain has {len(domain)} entries for {n} tokens")
        columns = [pa.array(seq), pa.array(pos), domain, _fixed_list(experts, self.top_k),
                   _fixed_list(weights, self.top_k)]
        if self.store_probs:
            probs = _numpy(probs, np.float16)
            if probs.shape != (n, self.num_experts):
                raise ValueError(f"probs {probs.shape} must be (n, E={self.num_experts})")
            columns.append(_fixed_list(probs, self.num_experts))
        self._buffer.append(pa.Table.from_arrays(columns, schema=self._buffer_schema))
        self._rows += n
        if self._rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._rows:
            return
        table = pa.concat_tables(self._buffer)
        R = self.row_group_rows
        end = self._rows if final else self._rows // R * R
        for start in range(0, end, R):
            group = table.slice(start, min(R, end - start)).combine_chunks()
            group = group.set_column(2, self.schema.field("domain"), pc.dictionary_encode(group["domain"]))
            self._writer.write_table(group, row_group_size=R)
        rest = table.slice(end)
        # combine_chunks copies the remainder so the written rows' buffers can be freed.
        self._buffer = [rest.combine_chunks()] if rest.num_rows else []
        self._rows = rest.num_rows
        self.rows_written += end

    def close(self) -> Path:
        """Write the remaining rows and publish the file atomically. Returns its path."""
        if self._writer is None:
            return self.path
        self._flush(final=True)
        self._writer.close()
        self._writer = None
        os.replace(_tmp(self.path), self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file (nothing is published)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            _tmp(self.path).unlink(missing_ok=True)

    def __enter__(self) -> RoutingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_table_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, _tmp(path), compression=COMPRESSION)
    os.replace(_tmp(path), path)


def write_stats(root, layer: int, stats: LayerStats) -> Path:
    """One row per expert; fields that were not captured are left out of the file (read back as None)."""
    E = stats.num_experts
    cols = {
        "expert": pa.array(np.arange(E, dtype=np.int32)),
        "n_tokens": pa.array(np.full(E, stats.n_tokens, dtype=np.int64)),
        "top_k": pa.array(np.full(E, stats.top_k, dtype=np.int32)),
    }
    for name in _STAT_VECTORS:
        if (v := getattr(stats, name)) is not None:
            cols[name] = pa.array(v.double().cpu().numpy())
    if stats.gram is not None:
        cols["gram"] = _fixed_list(stats.gram.double().cpu().numpy(), E)
    path = stats_path(root, layer)
    _write_table_atomic(pa.table(cols), path)
    return path


def _layer_dirs(base: Path) -> list[tuple[int, Path]]:
    return sorted((int(d.name.split("=", 1)[1]), d) for d in base.glob("layer=*") if d.is_dir())


_RERUN = "rerun `dvc repro calibrate`"


def read_stats(root) -> dict[int, LayerStats]:
    """layer -> LayerStats for every layer under `root/stats`, in layer order. A missing, corrupt or inconsistent
    file is a ValueError naming it (never a raw pyarrow traceback)."""
    out = {}
    layers = _layer_dirs(Path(root) / "stats")
    if not layers:
        raise FileNotFoundError(f"{Path(root) / 'stats'}: no calibration statistics; {_RERUN}")
    for layer, d in layers:
        path = d / "stats.parquet"
        try:
            t = pq.ParquetFile(path).read().sort_by("expert")  # ParquetFile: no hive key inference
            E = t.num_rows
            if t["expert"].to_pylist() != list(range(E)):
                raise ValueError(f"expected one row per expert 0..{E - 1}")
            vec = {n: torch.tensor(t[n].to_numpy()) for n in _STAT_VECTORS if n in t.column_names}
            gram = None
            if "gram" in t.column_names:
                gram = torch.tensor(t["gram"].combine_chunks().flatten().to_numpy().reshape(E, E))
            out[layer] = LayerStats(n_tokens=int(t["n_tokens"][0].as_py()), top_k=int(t["top_k"][0].as_py()),
                                    gram=gram, **vec)
        except (pa.ArrowException, OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: unreadable calibration statistics ({err}); {_RERUN}") from None
    return out


def write_meta(root, meta: dict) -> Path:
    path = Path(root) / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _tmp(path).write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    os.replace(_tmp(path), path)
    return path


def read_meta(root) -> dict:
    path = Path(root) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {_RERUN}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {_RERUN}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object; {_RERUN}")
    return meta


def scan_routing(root) -> pl.LazyFrame:
    """All layers' routing as one LazyFrame; `layer` (Int32) comes from the hive directory names. The glob only
    matches published `*.parquet` files, never an in-progress `*.tmp`."""
    return pl.scan_parquet(Path(root) / "routing" / "layer=*" / "*.parquet",
                           hive_partitioning=True, hive_schema={"layer": pl.Int32})


def routing_batches(root, layer: int, top_k: int, batch_size: int = 65536):
    """One layer's routed expert ids as [tokens, top_k] int arrays, streamed one row batch at a time; a missing or
    corrupt file is a ValueError naming it."""
    path = routing_path(root, layer)
    try:
        for batch in pq.ParquetFile(path).iter_batches(columns=["experts"], batch_size=batch_size):
            yield batch.column(0).flatten().to_numpy().reshape(-1, top_k)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: unreadable calibration routing ({str(err).splitlines()[0]}); {_RERUN}") from None


def usage_by_domain(root) -> pl.DataFrame:
    """Expert usage per layer and domain: `count` = selections of the expert by the domain's tokens, `share` =
    count / all selections of that (layer, domain), so shares sum to 1 per layer and domain (sf sums to k)."""
    try:
        return _usage_by_domain(root)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise ValueError(f"{Path(root) / 'routing'}: unreadable calibration routing "
                         f"({str(err).splitlines()[0]}); {_RERUN}") from None


def _usage_by_domain(root) -> pl.DataFrame:
    return (
        scan_routing(root)
        .select("layer", "domain", pl.col("experts").alias("expert"))
        .explode("expert")
        .group_by("layer", "domain", "expert")
        .agg(count=pl.len().cast(pl.Int64))
        .collect(engine="streaming")
        .lazy()  # the aggregate is small: finish it in memory
        .with_columns(
            pl.col("domain").cast(pl.String),
            pl.col("expert").cast(pl.Int32),
            share=pl.col("count") / pl.col("count").sum().over("layer", "domain"),
        )
        .sort("layer", "domain", "expert")
        .collect()
    )
