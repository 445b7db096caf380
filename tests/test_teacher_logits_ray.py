"""`teacher_logits` split over Ray workers (issue 15, item 4): each worker writes a contiguous range of batches to
its own Parquet part, the parts are merged in row-id order, and the result is the single-worker file, byte for
byte."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from moe2dense.data.packing import PackedWriter
from moe2dense.distill.cache import FILE, batch_ranges, merge_parts, write_cached_logits, write_cached_logits_ray, \
    write_part
from moe2dense.distill.data import load_rows
from moe2dense.teacher.load import load_frozen
from test_distill import no_teacher_in_driver, ray_cluster  # noqa: F401  (ray_cluster: the module's local Ray)
from tiny_models import tiny_config

KW = dict(top_n=6, temperature=2.0, batch_rows=4, meta={"teacher_top_k": 1})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Qwen3-MoE teacher, a packed train split, and the single-worker cache over 6 batches of its rows
    (the last one short)."""
    root = tmp_path_factory.mktemp("tlray")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).eval().save_pretrained(root / "teacher")
    w = PackedWriter(root / "train.parquet", 16, sep_id=2, row_group_rows=8)
    rng = np.random.default_rng(0)
    for _ in range(60):
        w.add("toy", rng.integers(3, 60, int(rng.integers(10, 40))).tolist())
    w.close()
    rows = load_rows(root / "train.parquet")
    ids = np.arange(1, len(rows), 2)[:22]
    assert len(ids) == 22
    teacher = load_frozen(root / "teacher", torch.float32, torch.device("cpu"), top_k=1)
    single = write_cached_logits(teacher, rows, ids, root / "single", progress=False, **KW)
    return root, teacher, rows, ids, single


def test_batch_ranges_split_at_batch_boundaries():
    assert batch_ranges(22, 4, 2) == [range(0, 3), range(3, 6)]
    assert batch_ranges(22, 4, 4) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    assert batch_ranges(5, 4, 3) == [range(0, 1), range(1, 2)]  # more workers than batches: no empty part
    assert batch_ranges(0, 4, 2) == []


def test_merged_parts_are_the_single_worker_file(setup, tmp_path):
    root, teacher, rows, ids, single = setup
    # uneven parts (1 batch, then 5): each part's batches are the single path's
    parts = [write_part(teacher, rows, ids, tmp_path / f"p{i}.parquet", batches=r, progress=False, **KW)
             for i, r in enumerate([range(0, 1), range(1, 6)])]
    assert [pq.ParquetFile(p).num_row_groups for p in parts] == [1, 5]
    merged = merge_parts(parts, tmp_path / FILE)
    f = pq.ParquetFile(single)
    assert f.num_row_groups == 6 and f.metadata.row_group(5).num_rows == 2
    assert merged.read_bytes() == single.read_bytes()


def test_merge_refuses_parts_of_another_cache(setup, tmp_path):
    root, teacher, rows, ids, _ = setup
    a = write_part(teacher, rows, ids, tmp_path / "a.parquet", batches=range(0, 1), progress=False, **KW)
    b = write_part(teacher, rows, ids, tmp_path / "b.parquet", batches=range(1, 2), progress=False,
                   **{**KW, "temperature": 1.0})
    with pytest.raises(ValueError, match="b.parquet: its schema or metadata differs"):
        merge_parts([a, b], tmp_path / FILE)


def test_ray_workers_write_the_single_worker_file(setup, ray_cluster, tmp_path):
    root, _, _, ids, single = setup
    for workers in (2, 1):
        out = tmp_path / f"ray{workers}"
        path = write_cached_logits_ray(root / "teacher", root / "train.parquet", ids, out, workers=workers,
                                       use_gpu=False, cpus_per_worker=2 // workers, top_k=1, progress=False, **KW)
        assert path.read_bytes() == single.read_bytes(), workers
        assert sorted(p.name for p in out.iterdir()) == [FILE]  # parts and decoded rows removed


@pytest.mark.slow  # two stage subprocesses (~30 s)
def test_stage_on_ray_writes_the_single_worker_file_without_loading_the_teacher(setup, ray_cluster, tmp_path):
    import os
    import subprocess
    import sys

    import ray
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import REPO

    root = setup[0]
    if not (root / "teacher/tokenizer.json").exists():  # the stage validates the teacher dir, tokenizer included
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(root / "teacher")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    files = {}
    for workers in (2, 1):
        repo = tmp_path / f"w{workers}"
        (repo / "models").mkdir(parents=True)
        (repo / "models/teacher").symlink_to(root / "teacher")
        (repo / "data/prepared/packed").mkdir(parents=True)
        (repo / "data/prepared/packed/train.parquet").symlink_to(root / "train.parquet")
        params = yaml.safe_load((REPO / "tests/smoke_params.yaml").read_text())
        params["distill"].update(teacher_logits="cached", cached_top_n=6, tokens=16 * 4 * 5, workers=workers)
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = ["-c", no_teacher_in_driver("stages.teacher_logits")] if workers > 1 else ["-m", "stages.teacher_logits"]
        proc = subprocess.run([sys.executable, *cmd], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sorted(p.name for p in (repo / "teacher_logits").iterdir()) == ["cache.json", FILE]
        files[workers] = (repo / "teacher_logits" / FILE).read_bytes()
    assert pq.ParquetFile(tmp_path / "w2/teacher_logits" / FILE).num_row_groups == 3  # 20 rows, 8 a batch
    assert files[2] == files[1]
