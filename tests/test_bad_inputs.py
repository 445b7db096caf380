"""Bad inputs and data safety: each user mistake is one error line naming the file or key, before any weight loads,
and nothing of the user's is ever deleted (the teacher, the data, unrelated files beside --out)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe2dense import params as P
from moe2dense.__main__ import main
from moe2dense.calibrate.store import read_meta, read_stats, routing_batches, usage_by_domain, write_meta
from moe2dense.checkpoint import TOKENIZER_FILES
from moe2dense.data.prepare import build_tokenizer
from moe2dense.data.sources import iter_corpus
from moe2dense.data.tokenizer import train_bpe
from moe2dense.io import atomic_dir, write_json
from moe2dense.teacher.build import record_real_teacher
from moe2dense.teacher.load import load_teacher, teacher_config
from moe2dense.teacher.source import TeacherSourceError, validate_checkpoint_dir
from tiny_models import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE with its own byte-level BPE, saved like a hub checkpoint, inside a folder that holds an
    unrelated file (what a parent-dir --out would destroy)."""
    home = tmp_path_factory.mktemp("home")
    (home / "thesis.txt").write_text("years of work")
    d = home / "teacher"
    texts = [f"In the beginning {i} the word was {i * 7} and the light was good.\n" * 3 for i in range(100)]
    tok = train_bpe(texts, vocab_size=300, min_frequency=2, out_dir=d)
    config = tiny_config("qwen3_moe")
    config.vocab_size, config.max_position_embeddings = 320, 256
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    assert len(tok) <= config.vocab_size
    return d


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(teacher: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(teacher, dest, ignore=shutil.ignore_patterns(*drop))
    return dest


@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the input was checked"))


def _convert(teacher: Path, out: Path, *extra: str) -> int:
    return main(["convert", "--teacher", str(teacher), "--method", "sf", "--experts", "4", "--out", str(out),
                 "--calibration-tokens", "256", "--seq-len", "64", *extra])


# ------------------------------------------------------------------------------------------ --out vs teacher / data
def test_out_overlapping_the_teacher_is_refused_and_nothing_is_deleted(teacher, tmp_path):
    """As users run it: `python -m moe2dense convert ... --out <the teacher's folder> --overwrite` from another
    directory. Before the check, the run ended by replacing that folder: the teacher and every file beside it."""
    out = teacher.parent
    before = _digest(out)
    proc = subprocess.run([sys.executable, "-m", "moe2dense", "convert", "--teacher", str(teacher), "--method", "sf",
                           "--experts", "4", "--out", str(out), "--overwrite"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"[convert] error: --out {out} overlaps the teacher {teacher} (same, inside or containing " \
                          "it); replacing it would delete it: choose another --out\n"
    assert _digest(out) == before  # the teacher and the unrelated file beside it, byte for byte
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_out_inside_the_teacher_or_over_the_data_is_refused(teacher, tmp_path, capsys, no_weights):
    before = _digest(teacher)
    for out in (teacher, teacher / "student"):
        assert _convert(teacher, out, "--overwrite") == 2
        assert "overlaps the teacher" in capsys.readouterr().err
    assert _digest(teacher) == before
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("text " * 100)
    for out in (data, tmp_path):  # the data dir itself, and a folder containing it
        assert _convert(teacher, out, "--data", str(data), "--overwrite") == 2
        assert f"overlaps --data {data}" in capsys.readouterr().err
    assert (data / "a.txt").read_text() == "text " * 100


# ------------------------------------------------------------------------------------------ the teacher's files
def test_teacher_without_tokenizer_files_is_refused_everywhere(teacher, tmp_path, capsys, no_weights):
    bare = _copy(teacher, tmp_path / "bare", drop=TOKENIZER_FILES)
    assert _convert(bare, tmp_path / "o") == 2
    assert f"{bare}: no tokenizer vocabulary" in capsys.readouterr().err
    out = tmp_path / "recorded"
    out.mkdir()
    with pytest.raises(TeacherSourceError, match="no tokenizer vocabulary"):
        record_real_teacher(str(bare), out)  # the teacher stage, which the README says validates it
    assert not list(out.iterdir())
    with pytest.raises(TeacherSourceError, match="no tokenizer vocabulary"):
        build_tokenizer(P.PrepareParams(), tmp_path / "prepared", bare)  # prepare, which packs with it


def test_teacher_moved_after_the_teacher_stage(teacher, tmp_path):
    src = _copy(teacher, tmp_path / "ckpt")
    recorded = tmp_path / "models_teacher"
    recorded.mkdir()
    record_real_teacher(str(src), recorded)
    assert teacher_config(recorded).model_type == "qwen3_moe"
    src.rename(tmp_path / "elsewhere")
    for load in (teacher_config, load_teacher):  # what calibrate, screen and group call first
        with pytest.raises(TeacherSourceError, match=rf"recorded at {src}, which no longer holds a checkpoint \(mov"):
            load(recorded)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model.safetensors: tensor .* \(truncated file\?\)"),
    ("garbage", r"model.safetensors: corrupt safetensors header"),
    ("config_not_json", r"config.json: not valid JSON"),
    ("no_top_k", r"config.json: qwen3_moe config has no 'num_experts_per_tok'; moe2dense does not guess it"),
    ("no_expert_width", r"config.json: qwen3_moe config has no 'moe_intermediate_size'"),
    ("zero_top_k", r"config.json: num_experts_per_tok=0 must be a positive integer"),
])
def test_damaged_checkpoint_is_one_error_naming_the_file(teacher, tmp_path, capsys, no_weights, damage, message):
    ck = _copy(teacher, tmp_path / "ck")
    weights = ck / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "garbage":
        weights.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "config_not_json":
        (ck / "config.json").write_text('{"model_type": "qwen3_moe",')
    elif damage == "no_top_k":
        _edit_config(ck, num_experts_per_tok=None)
    elif damage == "no_expert_width":
        _edit_config(ck, moe_intermediate_size=None)
    else:
        _edit_config(ck, num_experts_per_tok=0)
    with pytest.raises(ValueError, match=message):
        validate_checkpoint_dir(ck)
    with pytest.raises(ValueError, match=message):
        record_real_teacher(str(ck), tmp_path)
    assert _convert(ck, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(ck) in err


# ------------------------------------------------------------------------------------------ convert arguments
@pytest.mark.parametrize("args, message", [
    (["--blocks", "0"], "--blocks: Input should be greater than or equal to 1 (got 0)"),  # params' own errors
    (["--seq-len", "0"], "--seq-len 0 must be in [1, 256]"),
    (["--seq-len", "257"], "--seq-len 257 must be in [1, 256] (the teacher's max_position_embeddings)"),
    (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1 (got 0)"),
    (["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "--device: cuda was asked for but torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_out_of_range_arguments_are_errors_not_defaults(teacher, tmp_path, capsys, no_weights, args, message):
    assert _convert(teacher, tmp_path / "o", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _bad_data(tmp_path: Path, kind: str) -> tuple[Path, str]:
    good = [json.dumps({"text": f"The light {i} shines."}) for i in range(3)]
    if kind == "random_bytes":
        p = tmp_path / "random.txt"
        p.write_bytes(b"plain start " + random.Random(0).randbytes(4096))
        return p, f"{p}: not UTF-8 text (byte 0x"
    if kind == "latin1_line":
        p = tmp_path / "calib.jsonl"
        p.write_bytes(("\n".join(good) + "\n").encode() + b'{"text": "caf\xe9"}\n')
        offset = len(("\n".join(good) + "\n").encode()) + len('{"text": "caf')
        return p, f"{p}:4: not UTF-8 text (byte 0xe9 at byte offset {offset})"
    if kind == "malformed":
        p = tmp_path / "calib.jsonl"
        p.write_text(good[0] + "\n\n" + '{"text": "unterminated\n' + good[1] + "\n")
        return p, f"{p}:3: not valid JSON"
    if kind == "not_an_object":
        p = tmp_path / "calib.jsonl"
        p.write_text(good[0] + '\n"text"\n')
        return p, f"{p}:2: a JSON str, expected one object per line"
    if kind == "wrong_column":
        p = tmp_path / "calib.jsonl"
        p.write_text(good[0] + "\n" + json.dumps({"body": "x"}) + "\n")
        return p, f"{p}:2: no 'text' field"
    if kind == "corrupt_parquet":
        p = tmp_path / "calib.parquet"
        p.write_bytes(b"PAR1" + b"\0" * 100)
        return p, f"{p}: not a readable Parquet file"
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    return p, f"--data {p} has fewer than --seq-len 64 tokens of text"


@pytest.mark.parametrize("kind", ["random_bytes", "latin1_line", "malformed", "not_an_object", "wrong_column",
                                  "corrupt_parquet", "empty"])
def test_bad_calibration_data_fails_before_the_teacher_loads(teacher, tmp_path, capsys, no_weights, kind):
    data, message = _bad_data(tmp_path, kind)
    assert _convert(teacher, tmp_path / "o", "--data", str(data)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_only_an_earlier_student(teacher, tmp_path, capsys, no_weights):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert _convert(teacher, mine, "--overwrite") == 2
    assert f"--out {mine} is not a student written by convert (no moe2dense_plan.json in it)" in capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "mine"


def test_full_disk_under_out_is_one_line_and_keeps_the_previous_student(teacher, tmp_path, capsys, monkeypatch):
    import moe2dense.convert as convert_mod

    def full(checkpoint, plan, out, **kw):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "model.safetensors"))

    monkeypatch.setattr(convert_mod, "assemble", full)
    out = tmp_path / "dense"
    out.mkdir()
    (out / "moe2dense_plan.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"previous student")
    before = _digest(out)
    assert _convert(teacher, out, "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"[convert] error: No space left on device: {tmp_path}/.dense.")
    assert err[-1].endswith("/model.safetensors")
    assert _digest(out) == before and not list(tmp_path.glob(".dense.*"))


# ------------------------------------------------------------------------------------------ prepare corpus
def test_corpus_dir_without_supported_files_is_an_error(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    (tmp_path / "b.csv").write_text("text\nworld\n")
    src = P.FilesSource(kind="files", paths=[str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no corpus files in this directory \(allowed: "
                                                r"\.jsonl, \.json, \.parquet, \.txt; found: \.csv\)"):
        list(iter_corpus([src]))


# ------------------------------------------------------------------------------------------ calibration store
def test_corrupt_calibration_store_names_the_file(tmp_path):
    stats = tmp_path / "stats" / "layer=0" / "stats.parquet"
    stats.parent.mkdir(parents=True)
    stats.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=rf"{stats}: unreadable calibration statistics .*dvc repro calibrate"):
        read_stats(tmp_path)
    with pytest.raises(FileNotFoundError, match="no calibration statistics"):
        read_stats(tmp_path / "nothing")
    (tmp_path / "meta.json").write_text("{truncated")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'meta.json'}: not valid JSON"):
        read_meta(tmp_path)
    routing = tmp_path / "routing" / "layer=0" / "part-00000.parquet"
    routing.parent.mkdir(parents=True)
    routing.write_bytes(b"PAR1garbagePAR1")
    with pytest.raises(ValueError, match="unreadable calibration routing"):
        usage_by_domain(tmp_path)
    with pytest.raises(ValueError, match=rf"{routing}: unreadable calibration routing .*dvc repro calibrate"):
        list(routing_batches(tmp_path, 0, top_k=2))  # what the group stage reads for coactivation grouping
    write_meta(tmp_path, {"ok": 1})
    assert read_meta(tmp_path) == {"ok": 1}


# ------------------------------------------------------------------------------------------ atomic writers
_KILLED_WRITER = """
import sys, time
from moe2dense.io import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half").write_text("x")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_atomic_dir_removes_leftovers_of_a_killed_run_but_not_live_ones(tmp_path):
    target = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    leftover = Path(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert leftover.is_dir() and leftover.name.startswith(f".out.{proc.pid}@")
    live = Path(str(leftover).replace(f".{proc.pid}@", f".{os.getpid()}@"))  # a concurrent writer's, still running
    live.mkdir()
    unrelated = tmp_path / ".out.notes.tmp"
    unrelated.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("ok")
    assert not leftover.exists() and live.is_dir() and unrelated.is_dir()
    assert (target / "done").read_text() == "ok"
    # Killed between its two renames: the previous output sits in `.<name>.<pid>@<host>.old` and `path` is gone.
    # The next writer puts it back (the only copy) before it starts, so a failure of its own loses nothing.
    owner = leftover.name.split(".")[2]  # "<pid>@<host>" of the dead process
    target.rename(tmp_path / f".out.{owner}.old")
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("this run fails too")
    assert (target / "done").read_text() == "ok" and not list(tmp_path.glob(".out.*.old"))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_are_readable_as_the_umask_allows(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "student") as out:
            write_json(out / "moe2dense_plan.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "student").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "student" / "moe2dense_plan.json").stat().st_mode & 0o777 == 0o666 & ~umask

