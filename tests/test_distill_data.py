"""Bounded-memory distillation data: the training rows decoded once and memory-mapped, cached teacher logits read
by row group on demand (issue 15, item 3)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from moe2dense.data.packing import PackedWriter
from moe2dense.distill.cache import CachedTeacher, write_cached_logits
from moe2dense.distill.data import decode_rows, load_rows, open_rows


def _packed(path, docs: int = 50, seq: int = 16, group: int = 8):
    w = PackedWriter(path, seq, sep_id=2, row_group_rows=group)
    rng = np.random.default_rng(0)
    for _ in range(docs):
        w.add("toy", rng.integers(3, 60, int(rng.integers(10, 40))).tolist())
    w.close()
    return path


def test_decoded_rows_are_a_memory_map_of_exactly_the_packed_rows(tmp_path):
    path = _packed(tmp_path / "train.parquet")
    assert pq.ParquetFile(path).num_row_groups > 2  # the decoder streams several row groups
    npy = decode_rows(path, tmp_path / "rows")
    rows = open_rows(npy)
    assert isinstance(rows, np.memmap) and not rows.flags.writeable
    want = load_rows(path)
    assert rows.dtype == np.int32 and np.array_equal(rows, want)
    mtime = npy.stat().st_mtime_ns
    assert decode_rows(path, tmp_path / "rows") == npy and npy.stat().st_mtime_ns == mtime  # decoded once
    assert list((tmp_path / "rows").iterdir()) == [npy]  # no temp leftovers
    _packed(path, docs=60)  # a rebuilt split gets its own file
    assert decode_rows(path, tmp_path / "rows") != npy


def test_load_rows_limit_reads_only_the_first_rows(tmp_path):
    path = _packed(tmp_path / "eval.parquet")
    everything = load_rows(path)
    for limit in (1, 7, 8, 9, len(everything), len(everything) + 5):
        assert np.array_equal(load_rows(path, limit=limit), everything[:limit])


class _Uniformish(torch.nn.Module):
    """A stand-in teacher: logits a fixed function of the ids, so every cached value is known."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = type("C", (), {"vocab_size": vocab})()
        self.w = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, use_cache=False):
        return type("O", (), {"logits": self.w[input_ids % self.w.shape[0]]})()


def test_cached_teacher_reads_row_groups_on_demand_with_a_bounded_lru(tmp_path):
    rows = load_rows(_packed(tmp_path / "train.parquet"))
    ids = np.arange(0, len(rows), 2)
    teacher = _Uniformish(64)
    path = write_cached_logits(teacher, rows, ids, tmp_path / "cache", top_n=5, temperature=1.0, batch_rows=4,
                               progress=False)
    cached = CachedTeacher(path, cache_groups=2)
    assert cached._file.num_row_groups == -(-len(ids) // 4)
    batch = np.array([ids[-1], ids[0], ids[5], ids[9], ids[0]])
    target = cached.target(batch, 1.0, torch.device("cpu"))(0, len(batch) * rows.shape[1])
    logp = teacher(torch.from_numpy(rows[batch].astype(np.int64))).logits.float().log_softmax(-1)
    top = logp.reshape(-1, 64).topk(5, dim=-1)
    assert torch.equal(target.indices, top.indices) and torch.equal(target.logprobs, top.values)
    info = cached.group.cache_info()
    # four groups touched in the order last, 0, 1, 2, 0: with two held, group 0 was evicted and read again
    assert info.currsize == 2 and info.misses == 5
