"""Packing tokenized documents into fixed-length sequences, written to Parquet with bounded row groups.

Documents are packed per domain (separated by EOS) so every sequence keeps one domain label: calibration and
evaluation report expert usage and perplexity per domain. The tail of each domain that does not fill a whole
sequence is dropped, so every row has exactly `seq_len` tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def packed_schema(seq_len: int) -> pa.Schema:
    return pa.schema([
        ("input_ids", pa.list_(pa.int32(), seq_len)),
        ("domain", pa.dictionary(pa.int32(), pa.string())),
    ])


class Packer:
    """Per-domain packing: each document's ids plus `sep_id` join its domain's carry, and every full `seq_len` row
    comes out. The one rule for the pipeline's packed splits (`PackedWriter`) and `convert`'s calibration rows."""

    def __init__(self, seq_len: int, sep_id: int):
        self.seq_len, self.sep_id = seq_len, sep_id
        self.carry: dict[str, list[int]] = {}  # tokens of the current, not yet full sequence per domain

    def add(self, domain: str, ids: Iterable[int]) -> np.ndarray:
        """The rows this document completes: int32 [n, seq_len], n >= 0."""
        buf = self.carry.setdefault(domain, [])
        buf.extend(ids)
        buf.append(self.sep_id)
        n_full = len(buf) // self.seq_len
        block = np.asarray(buf[: n_full * self.seq_len], dtype=np.int32).reshape(n_full, self.seq_len)
        del buf[: n_full * self.seq_len]
        return block


class PackedWriter:
    """Streams (domain, token ids) into `seq_len` rows; memory stays bounded by `row_group_rows` rows per domain."""

    def __init__(self, path: str | Path, seq_len: int, sep_id: int, row_group_rows: int):
        self.path, self.seq_len, self.sep_id, self.rows_per_group = Path(path), seq_len, sep_id, row_group_rows
        self.schema = packed_schema(seq_len)
        self.writer = pq.ParquetWriter(str(self.path), self.schema, compression="zstd")
        self.packer = Packer(seq_len, sep_id)
        self.rows: list[np.ndarray] = []
        self.row_domains: list[str] = []
        self.n_rows = 0

    def add(self, domain: str, ids: Iterable[int]) -> None:
        block = self.packer.add(domain, ids)
        if len(block):
            self.rows.extend(block)
            self.row_domains.extend([domain] * len(block))
            while len(self.rows) >= self.rows_per_group:
                self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        if n == 0:
            return
        flat = pa.array(np.concatenate(self.rows[:n]), type=pa.int32())
        table = pa.table({
            "input_ids": pa.FixedSizeListArray.from_arrays(flat, self.seq_len),
            "domain": pa.array(self.row_domains[:n], type=pa.string()).dictionary_encode(),
        }, schema=self.schema)
        self.writer.write_table(table, row_group_size=n)
        del self.rows[:n], self.row_domains[:n]
        self.n_rows += n

    def close(self) -> int:
        self._flush(len(self.rows))
        self.writer.close()
        return self.n_rows


def read_packed(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(str(path), columns=columns)


def packed_tokens(path: str | Path) -> np.ndarray:
    """All sequences of a packed file as an (N, seq_len) int32 array."""
    pf = pq.ParquetFile(str(path))
    seq_len = pf.schema_arrow.field("input_ids").type.list_size
    col = pf.read(columns=["input_ids"]).column("input_ids").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, seq_len)


def iter_packed_batches(path: str | Path, batch_rows: int, columns: tuple[str, ...] = ("input_ids", "domain")):
    """Stream (ids (n, seq_len) int64 array, domains list[str]) batches from a packed file."""
    pf = pq.ParquetFile(str(path))
    seq_len = pf.schema_arrow.field("input_ids").type.list_size
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
        # flatten(), not .values: a batch that straddles row groups is a slice, and .values ignores its offset
        ids = batch.column("input_ids").flatten().to_numpy(zero_copy_only=False).reshape(-1, seq_len)
        domains = batch.column("domain").to_pylist() if "domain" in columns else None
        yield ids.astype(np.int64), domains
