"""moe2dense.checkpoint: pread-based safetensors reader and streaming sharded writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from moe2dense.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader, ShardedWriter


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (also for NaNs and dtypes without arithmetic, like fp8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(7, 5, generator=g),
        "b.bf16": torch.randn(4, 3, 2, generator=g).to(torch.bfloat16),
        "c.i64": torch.randint(-2**40, 2**40, (9,), generator=g),
        "d.bool": torch.rand(3, 4, generator=g) > 0.5,
        "e.scalar": torch.tensor(3.25, dtype=torch.float64),
        "f.empty": torch.empty(0, 4, dtype=torch.float16),
        "g.f16": torch.randn(6, 6, generator=g).half(),
        "h.fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "i.u8": torch.randint(0, 256, (10,), generator=g, dtype=torch.uint8),
    }


def _plan(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_writer_round_trip_sharded(tmp_path):
    tensors = _mixed_tensors()
    with ShardedWriter(tmp_path, _plan(tensors), max_shard_bytes=100, metadata={"source": "test"}) as w:
        for name in reversed(list(tensors)):
            w.write(name, tensors[name])
    files = w.close()  # idempotent once closed
    shards = w.files
    assert len(shards) > 2
    assert [f.name for f in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    assert files == [*shards, tmp_path / INDEX_FILE]

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == w.total_bytes == sum(t.nbytes for t in tensors.values())
    loaded = {}
    for shard in shards:
        part = load_file(shard)
        assert all(index["weight_map"][n] == shard.name for n in part)
        loaded.update(part)
        raw = shard.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        assert n % 8 == 0
        header = json.loads(raw[8:8 + n])
        assert header["__metadata__"] == {"format": "pt", "source": "test"}
        names = [k for k in header if k != "__metadata__"]
        assert names == [k for k in tensors if k in names]  # plan order inside a shard
        ends = [0] + [header[k]["data_offsets"][1] for k in names]
        assert [header[k]["data_offsets"][0] for k in names] == ends[:-1]  # no holes
        assert len(raw) == 8 + n + ends[-1]
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert _bits_equal(loaded[name], t), name

    with CheckpointReader(tmp_path) as r:
        assert r.keys() == sorted(tensors)
        for name, t in tensors.items():
            assert _bits_equal(r.read(name), t), name


def test_writer_single_shard_and_zero_size(tmp_path):
    tensors = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.zeros(0, dtype=torch.int32)}
    with ShardedWriter(tmp_path, _plan(tensors)) as w:
        for name, t in tensors.items():
            w.write(name, t)
    assert [p.name for p in w.close()] == [SINGLE_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    loaded = load_file(tmp_path / SINGLE_FILE)
    assert all(_bits_equal(loaded[n], t) for n, t in tensors.items())


@pytest.fixture
def saved(tmp_path):
    """The same tensors saved by the safetensors library as one file and as a dir with an index and two shards."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "w": torch.randn(11, 3, 4, generator=g),
        "b": torch.randn(11, 5, generator=g).to(torch.bfloat16),
        "i": torch.randint(0, 100, (11,), generator=g),
        "s": torch.tensor(7, dtype=torch.int16),
    }
    single = tmp_path / "one.safetensors"
    save_file(tensors, single)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    parts = {"model-00001-of-00002.safetensors": ["w", "s"], "model-00002-of-00002.safetensors": ["b", "i"]}
    for fname, names in parts.items():
        save_file({n: tensors[n] for n in names}, sharded / fname, metadata={"format": "pt"})
    weight_map = {n: fname for fname, names in parts.items() for n in names}
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tensors, single, sharded


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_reader_on_safetensors_files(saved, which):
    tensors, single, sharded = saved
    with CheckpointReader(single if which == "single" else sharded) as r:
        assert r.keys() == sorted(tensors)
        assert "w" in r and "nope" not in r
        for name, t in tensors.items():
            assert r.shape(name) == tuple(t.shape)
            assert r.dtype(name) == t.dtype
            assert r.nbytes(name) == t.nbytes
            got = r.read(name)
            assert _bits_equal(got, t), name
            assert got.untyped_storage().nbytes() == t.nbytes  # a fresh buffer of exactly the tensor
        if which == "sharded":
            assert r.file_of("w").name == "model-00001-of-00002.safetensors"
            assert r.file_of("b").name == "model-00002-of-00002.safetensors"
        for name in ("w", "b", "i"):
            for rows in ([5, 0, 9], [3, 3, 4, 5, 6, 2], [10], [], list(range(11))[:8], [7, 6, 5]):
                assert _bits_equal(r.read_rows(name, rows), tensors[name][rows]), (name, rows)
        assert _bits_equal(r.read_rows("w", torch.tensor([2, 1])), tensors["w"][[2, 1]])
        with pytest.raises(IndexError, match="out of range"):
            r.read_rows("w", [11])
        with pytest.raises(ValueError, match="0-d"):
            r.read_rows("s", [0])


def test_reader_falls_back_to_all_safetensors_in_dir(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "first.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "second.safetensors")
    with CheckpointReader(tmp_path) as r:
        assert r.keys() == ["a", "b"]
        assert torch.equal(r.read("b"), torch.zeros(3))


def test_read_rows_reads_only_those_rows(tmp_path):
    rows, cols = 64, 2**18  # 64 MB of float32
    t = torch.arange(rows, dtype=torch.float32).unsqueeze(1).expand(rows, cols)
    with ShardedWriter(tmp_path, [("big", (rows, cols), torch.float32)]) as w:
        w.write("big", t)
    with CheckpointReader(tmp_path) as r:
        got = r.read_rows("big", [40, 3])
        assert r.bytes_read == 2 * cols * 4
        assert torch.equal(got, t[[40, 3]])
        assert got.untyped_storage().nbytes() == 2 * cols * 4
        r.read_rows("big", [10, 11, 12])
        assert r.bytes_read == 5 * cols * 4


def test_qwen3_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    state = model.state_dict()
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="10KB")
    assert (src / INDEX_FILE).exists()  # really sharded by transformers

    with CheckpointReader(src) as r:
        assert r.keys() == sorted(state)
        for name, t in state.items():
            assert _bits_equal(r.read(name), t), name

        dst = tmp_path / "ours"
        plan = [(n, r.shape(n), r.dtype(n)) for n in r.keys()]
        with ShardedWriter(dst, plan, max_shard_bytes=10_000) as w:
            for name in reversed(r.keys()):
                w.write(name, r.read(name))
    model.config.save_pretrained(dst)
    assert len(w.files) > 1

    loaded, info = AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


def test_reader_errors(tmp_path, saved):
    tensors, single, _ = saved
    with CheckpointReader(single) as r, pytest.raises(KeyError, match="missing.weight") as exc:
        r.read("missing.weight")
    assert str(single) in str(exc.value)
    with CheckpointReader(single) as r, pytest.raises(KeyError, match="nope"):
        r.shape("nope")

    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        CheckpointReader(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        CheckpointReader(empty)

    raw = single.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    cases = {
        "short.safetensors": raw[:5],  # not even a header length
        "huge_len.safetensors": struct.pack("<Q", 10**12) + raw[8:],
        "bad_json.safetensors": raw[:8] + b"{" + b" " * (n - 1) + raw[8 + n:],
        "truncated.safetensors": raw[:-16],  # data buffer shorter than the header promises
    }
    for fname, blob in cases.items():
        (tmp_path / fname).write_bytes(blob)
        with pytest.raises(ValueError, match=fname):
            CheckpointReader(tmp_path / fname)


def test_writer_errors_and_abort(tmp_path):
    plan = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16), ("c", (5,), torch.int64)]
    with pytest.raises(ValueError, match="duplicate"):
        ShardedWriter(tmp_path / "dup", [*plan, ("a", (1,), torch.float32)])

    w = ShardedWriter(tmp_path / "w", plan, max_shard_bytes=24)
    created = w.files
    assert len(created) == 3 and all(f.exists() for f in created)
    with pytest.raises(ValueError, match=r"'a'.*\(2, 3\).*\(3, 2\)"):
        w.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"'b'.*bfloat16.*float32"):
        w.write("b", torch.zeros(4))
    with pytest.raises(ValueError, match="not in the plan"):
        w.write("zzz", torch.zeros(1))
    w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="already written"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"2 tensors never written.*'b', 'c'"):
        w.close()
    w.abort()
    assert not any(f.exists() for f in created)
    assert not (tmp_path / "w" / INDEX_FILE).exists()

    # context manager: an exception inside deletes the files, and so does leaving with tensors missing
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path / "x", plan) as w:
        w.write("a", torch.zeros(2, 3))
        raise RuntimeError("boom")
    assert not any(f.exists() for f in w.files)
    with pytest.raises(ValueError, match="never written"), ShardedWriter(tmp_path / "y", plan) as w:
        w.write("c", torch.zeros(5, dtype=torch.int64))
    assert not any(f.exists() for f in w.files)


def test_dtype_names_are_the_params_dtype_names():
    """checkpoint.DTYPES is what calibrate.dtype, assemble.dtype and evaluate.dtype may name (besides `auto`)."""
    import typing

    from moe2dense.checkpoint import DTYPES
    from moe2dense.params import AssembleParams, CalibrateParams, EvaluateParams

    for section in (CalibrateParams, AssembleParams, EvaluateParams):
        names = set(typing.get_args(section.model_fields["dtype"].annotation)) - {"auto"}
        assert names == set(DTYPES), section.__name__
    assert all(DTYPES[name] == getattr(torch, name) for name in DTYPES)


def test_tokenizer_files_cover_every_vocabulary_file_and_are_copied_by_assemble(tmp_path):
    from moe2dense.assemble import copy_tokenizer
    from moe2dense.checkpoint import TOKENIZER_FILES
    from moe2dense.teacher.source import VOCAB_FILES

    assert set(VOCAB_FILES) <= set(TOKENIZER_FILES) and len(set(TOKENIZER_FILES)) == len(TOKENIZER_FILES)
    assert "generation_config.json" not in TOKENIZER_FILES and "config.json" not in TOKENIZER_FILES
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "added_tokens.json", "config.json"):
        (tmp_path / "src" / name).write_text(name)
    copy_tokenizer(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["added_tokens.json", "tokenizer_config.json",
                                                                    "vocab.txt"]
