"""Host memory of a distillation worker's data path at 1x and 8x the training tokens and the teacher-logits cache.

Budgets (issue 15): a worker's peak RSS at 8x the training tokens within 1.1x of its peak at 1x; a cached-logits
worker's peak RSS independent of the cache's size (within 1.1x at 8x). The same workers reading the split and the
cache whole, as the code did before, are measured beside them.

RSS here is the worker's private (anonymous) memory, RssAnon. The memory-mapped rows a worker has touched also
count in its RSS as file pages (RssFile, printed), but those are the page cache: shared by every worker on the node,
clean and reclaimable, so they are what a memory map is for rather than a copy per worker.

Each measurement runs in its own subprocess, as a Ray worker would: it opens the data the way `distill.loop` does
(the training rows memory-mapped from `distill.data.decode_rows`' file, the logits through `CachedTeacher`) and runs
`--steps` steps of the real batch order (`worker_micro_rows`), materialising every batch (and every target); RssAnon
is sampled after every batch (its peak, and the peak minus the value after imports, are printed). The packed split
(real widths: seq_len 2048 by default) and
the logits cache (top-N int32 ids + fp32 log-probs per token) are synthetic, written by this script into a temp dir
(~1.5 GB of disk at the defaults, ~2 minutes).

    python bench/distill_data_memory.py                 # 1x = 2,048 rows x 2,048 tokens (4.2M tokens), 8x = 33.6M
    python bench/distill_data_memory.py --rows 512 --seq-len 1024 --top-n 32
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BUDGET = 1.1


def rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def write_split(path: Path, rows: int, seq_len: int, group: int = 256) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32(), seq_len))])
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            ids = rng.integers(0, 151_936, n * seq_len, dtype=np.int32)
            w.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), seq_len)},
                                   schema=schema), row_group_size=n)


def write_cache(path: Path, rows: int, seq_len: int, top_n: int, group: int = 8) -> None:
    """A teacher_logits.parquet in `write_cached_logits`' format, with random ids and log-probs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe2dense.distill.cache import FILE

    width = seq_len * top_n
    schema = pa.schema([("row", pa.int64()), ("indices", pa.list_(pa.int32(), width)),
                        ("logprobs", pa.list_(pa.float32(), width))],
                       metadata={"moe2dense": json.dumps({"top_n": top_n, "temperature": 1.0, "seq_len": seq_len})})
    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path / FILE, schema, compression="lz4") as w:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            w.write_table(pa.table({
                "row": pa.array(np.arange(start, start + n), pa.int64()),
                "indices": pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.integers(0, 151_936, n * width, dtype=np.int32)), width),
                "logprobs": pa.FixedSizeListArray.from_arrays(
                    pa.array(-rng.random(n * width, dtype=np.float32) * 10), width),
            }, schema=schema), row_group_size=n)


def worker(a) -> None:
    """Open the data as a distill worker does, run the batch order for --steps steps; print {"peak_mb"} as JSON."""
    import numpy as np
    import torch

    from moe2dense.distill.cache import CachedTeacher
    from moe2dense.distill.data import open_rows, worker_micro_rows

    baseline = anon = rss_kb("RssAnon")
    if a.whole:  # what the workers did before: the whole split, the whole logits cache, in memory
        import pyarrow.parquet as pq

        from moe2dense.distill.data import load_rows

        rows = load_rows(a.split)
        table = pq.read_table(Path(a.cache) / "teacher_logits.parquet") if a.cache else None
        cached = None
        if table is not None:
            checksum = int(table.column("indices").combine_chunks().flatten().to_numpy()[:1].sum())
    else:
        rows, table = open_rows(a.npy), None
        cached = CachedTeacher(a.cache) if a.cache else None
    checksum = locals().get("checksum", 0)
    # with a cache, the run visits exactly the cached rows (0 .. cached-1 here); without, any row of the split
    n_rows = len(cached._slot) if cached is not None else (table.num_rows if a.whole and table is not None
                                                                   else len(rows))
    for step in range(a.steps):
        for idx in worker_micro_rows(step, a.batch, n_rows, 0, 0, 1, 1):
            ids = torch.from_numpy(rows[idx].astype(np.int64))
            checksum += int(ids[:, 0].sum())
            if cached is not None:
                target = cached.target(idx, 1.0, torch.device("cpu"))(0, ids.numel())
                checksum += int(target.indices[0, 0])
            anon = max(anon, rss_kb("RssAnon"))  # sampled while the batch and its target are alive
    print(json.dumps({"peak_mb": anon / 1024, "added_mb": (anon - baseline) / 1024,
                      "file_mb": rss_kb("RssFile") / 1024, "checksum": checksum}))


def measure(split: Path, npy: Path, cache: Path | None, a, whole: bool = False) -> tuple[float, float]:
    """(peak RssAnon, that minus RssAnon after imports, RssFile at the end), MB."""
    cmd = [sys.executable, __file__, "--worker", "--split", str(split), "--npy", str(npy), "--steps", str(a.steps),
           "--batch", str(a.batch)] + (["--whole"] if whole else [])
    if cache is not None:
        cmd += ["--cache", str(cache)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["peak_mb"], r["added_mb"], r["file_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="packed rows at 1x")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top-n", type=int, default=64)
    p.add_argument("--cache-rows", type=int, default=160,
                   help="cached rows at 1x (each seq_len x top_n x 8 bytes: 1 MB at the defaults); more than the "
                        "LRU holds (16 groups of 8 rows), so 1x already shows the bound")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--npy", help=argparse.SUPPRESS)
    p.add_argument("--split", help=argparse.SUPPRESS)
    p.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    from moe2dense.distill.data import decode_rows

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        results = {}
        for scale in (1, 8):
            split = d / f"train{scale}.parquet"
            write_split(split, a.rows * scale, a.seq_len)
            npy = decode_rows(split, d / "rows")
            # the cache covers the rows the run visits; more cached rows = a bigger file, not more rows per step
            cache = d / f"cache{scale}"
            write_cache(cache, a.cache_rows * scale, a.seq_len, a.top_n)
            results[scale] = (measure(split, npy, None, a), measure(split, npy, cache, a))
            whole = measure(split, npy, cache, a, whole=True)
            tokens = a.rows * scale * a.seq_len
            cache_gb = (cache / "teacher_logits.parquet").stat().st_size / 1e9
            (rows_peak, rows_added, rows_file), (cached_peak, cached_added, _) = results[scale]
            print(f"{scale}x: {tokens / 1e6:.1f}M training tokens, logits cache {cache_gb:.2f} GB: worker peak "
                  f"RssAnon {rows_peak:.0f} MB (+{rows_added:.0f} after imports; file-backed resident "
                  f"{rows_file:.0f} MB: libraries and mapped rows, shared) with the rows, {cached_peak:.0f} MB "
                  f"(+{cached_added:.0f}) with rows and cached logits; reading both whole as before: "
                  f"{whole[0]:.0f} MB (+{whole[1]:.0f})")
        rows_ratio = results[8][0][0] / results[1][0][0]
        cache_ratio = results[8][1][0] / results[1][1][0]
        print(f"worker peak RssAnon 8x / 1x: rows {rows_ratio:.3f} (budget {BUDGET}), rows + cached logits "
              f"{cache_ratio:.3f} (budget {BUDGET})")
        ok = rows_ratio <= BUDGET and cache_ratio <= BUDGET
        print("within budget" if ok else "OVER BUDGET")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
