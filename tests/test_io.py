"""Content keys (moe2dense/io.py): the screen's cache key and the distillation run name hash exactly the bytes they
hashed before the hashers were folded into io.py, so users' caches and resumable runs keep their names."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from moe2dense.io import digest_paths, hash_files, hash_parquet_footer


def _tree(root):
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "a.bin").write_bytes(b"1")
    (root / "d" / "sub" / "b.txt").write_bytes(b"hello")
    (root / "single.txt").write_bytes(b"xyz")


def test_digest_paths_keeps_the_screens_key(tmp_path):
    _tree(tmp_path)
    # The value moe2dense.screen.digest_paths gave before the fold (names relative to each root's parent, sizes, bytes).
    assert digest_paths([tmp_path / "d", tmp_path / "single.txt"]) == \
        "291b07b23c79a5158341c8075ff094df73381591336cad2bddb31f109564298d"
    (tmp_path / "d" / "sub" / "b.txt").write_bytes(b"hellO")
    assert digest_paths([tmp_path / "d", tmp_path / "single.txt"]) != \
        "291b07b23c79a5158341c8075ff094df73381591336cad2bddb31f109564298d"


def test_hash_files_keeps_the_distill_run_names_bytes(tmp_path):
    _tree(tmp_path)
    h = hashlib.sha256()
    hash_files(h, sorted([tmp_path / "single.txt", tmp_path / "d" / "a.bin"]), lambda f: f.name)
    # The value distill/driver.py's _hash_files gave before the fold (each file's name, then its bytes).
    assert h.hexdigest() == "6eabb24519cce8611b54e2d8fe81354fe7e2d050102ab5d4c8aabb0050fcd017"


def test_parquet_footer_hash_ignores_mtime_and_sees_content(tmp_path):
    def write(path, values):
        pq.write_table(pa.table({"x": values}), path)
        return path

    def key(path):
        h = hashlib.sha256()
        hash_parquet_footer(h, path)
        return h.hexdigest()

    a, b = write(tmp_path / "a.parquet", [1, 2, 3]), write(tmp_path / "b.parquet", [1, 2, 3])
    os.utime(b, (0, 0))
    assert key(a) == key(b) != key(write(tmp_path / "c.parquet", [1, 2, 4]))
    data = a.read_bytes()
    footer_len = int.from_bytes(data[-8:-4], "little")
    assert data[-4:] == b"PAR1"
    assert key(a) == hashlib.sha256(f"{len(data)}:".encode() + data[-8 - footer_len:-8]).hexdigest()
