"""Corpus sources, deterministic splits, tokenizer round trip and packing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe2dense import params as P
from moe2dense.data.packing import PackedWriter, iter_packed_batches, packed_tokens
from moe2dense.data.prepare import prepare_corpus
from moe2dense.data.sources import Doc, _capped, iter_corpus
from moe2dense.data.split import assign_split, doc_hash
from moe2dense.data.tokenizer import load_tokenizer, train_bpe


def test_split_is_a_pure_function_of_content():
    texts = [f"document number {i} " * 3 for i in range(2000)]
    a = [assign_split(doc_hash(t), 0.1, 0.1) for t in texts]
    b = [assign_split(doc_hash(t), 0.1, 0.1) for t in reversed(texts)][::-1]
    assert a == b  # order of arrival does not matter
    share = {s: a.count(s) / len(a) for s in ("train", "calibration", "eval")}
    assert abs(share["eval"] - 0.1) < 0.03 and abs(share["calibration"] - 0.1) < 0.03
    assert [assign_split(doc_hash(t, seed=1), 0.1, 0.1) for t in texts] != a  # the seed reshuffles


def test_assign_split_boundaries():
    assert assign_split("0" * 64, 0.1, 0.1) == "eval"
    assert assign_split("f" * 64, 0.1, 0.1) == "train"
    assert assign_split(format(int(0.15 * 2**64), "016x") + "0" * 48, 0.1, 0.1) == "calibration"


def test_builtin_sources_are_deterministic_and_labelled():
    corpus = [P.BibleSource(kind="bible", max_chars=20_000), P.PythonDocsSource(kind="python_docs", max_chars=20_000),
              P.PythonCodeSource(kind="python_code", max_chars=20_000)]
    docs = list(iter_corpus(corpus))
    assert docs == list(iter_corpus(corpus))
    by_domain = {d: sum(len(x.text) for x in docs if x.domain == d) for d in ("bible", "python_docs", "python_code")}
    assert all(0 < n <= 20_000 for n in by_domain.values()), by_domain
    code = [d for d in docs if d.domain == "python_code"]
    assert all("/test" not in d.doc_id and "test_" not in d.doc_id for d in code)
    assert any("def " in d.text for d in code)
    assert any(d.text.startswith(("Genesis", "Exodus")) or " the LORD " in d.text for d in docs if d.domain == "bible")


def test_cap_cuts_at_line_break():
    docs = [Doc("d", "a", "x" * 10), Doc("d", "b", "line one\nline two\nline three")]
    out = list(_capped(docs, 30))
    assert [d.doc_id for d in out] == ["a", "b"] and out[1].text == "line one\nline two"


def test_user_files_jsonl_txt_parquet(tmp_path):
    (tmp_path / "news.jsonl").write_text("\n".join(json.dumps({"body": f"story {i}", "topic": "t" + str(i % 2)})
                                                   for i in range(4)))
    (tmp_path / "poem.txt").write_text("roses are red\nviolets are blue\n")
    pq.write_table(pa.table({"body": ["a parquet doc"]}), tmp_path / "extra.parquet")
    src = P.FilesSource(kind="files", paths=[str(tmp_path / "news.jsonl")], text_column="body", domain_column="topic")
    assert [(d.domain, d.text) for d in iter_corpus([src])][:2] == [("t0", "story 0"), ("t1", "story 1")]
    lines = P.FilesSource(kind="files", paths=[str(tmp_path / "poem.txt")], txt_mode="lines")
    assert [d.text for d in iter_corpus([lines])] == ["roses are red", "violets are blue"]
    whole_dir = P.FilesSource(kind="files", paths=[str(tmp_path)], text_column="body", domain="mine")
    assert {d.domain for d in iter_corpus([whole_dir])} == {"mine"}
    with pytest.raises(KeyError, match="no 'text' field"):
        list(iter_corpus([P.FilesSource(kind="files", paths=[str(tmp_path / "news.jsonl")])]))
    with pytest.raises(FileNotFoundError, match="not found"):
        list(iter_corpus([P.FilesSource(kind="files", paths=[str(tmp_path / "missing.jsonl")])]))


def test_hf_dataset_not_cached_says_how_to_fix():
    src = P.HFDatasetSource(kind="hf_dataset", name="moe2dense-no-such/dataset")
    with pytest.raises(FileNotFoundError, match="could not be loaded offline.*copy the HF cache"):
        list(iter_corpus([src]))


def test_tokenizer_round_trip_and_reload(tmp_path):
    texts = ["In the beginning God created the heaven and the earth.", "def f(x):\n    return x ** 2  # square",
             "Ünïcödé ✓ and tabs\tand   spaces"] * 50
    train_bpe(texts, vocab_size=400, min_frequency=2, out_dir=tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    for text in texts[:3] + ["never seen: 你好, emoji 🚀, bytes \x00\x7f"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and len(tok) <= 400


def test_packing_keeps_every_token_in_order_per_domain(tmp_path):
    path = tmp_path / "p.parquet"
    w = PackedWriter(path, seq_len=4, sep_id=0, row_group_rows=2)
    w.add("a", [1, 2, 3])          # a: 1 2 3 0
    w.add("b", [7, 8])             # b: 7 8 0 (incomplete, dropped)
    w.add("a", [4, 5, 6, 7, 8])    # a: 4 5 6 7 | 8 0 (incomplete, dropped)
    assert w.close() == 2
    assert packed_tokens(path).tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 1 and meta.row_group(0).num_rows == 2
    (ids, domains), = list(iter_packed_batches(path, batch_rows=8))
    assert domains == ["a", "a"] and ids.dtype == np.int64


def test_prepare_corpus_small(tmp_path):
    corpus = [P.BibleSource(kind="bible", max_chars=60_000), P.PythonCodeSource(kind="python_code", max_chars=60_000)]
    params = P.PrepareParams(corpus=corpus, split=P.SplitParams(calibration=0.15, eval=0.15),
                             tokenizer=P.TokenizerParams(vocab_size=300), seq_len=32, row_group_rows=64)
    summary = prepare_corpus(params, tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer")
    for split in ("train", "calibration", "eval"):
        ids = packed_tokens(tmp_path / "packed" / f"{split}.parquet")
        assert ids.shape == (summary["splits"][split]["sequences"], 32) and ids.max() < len(tok)
        groups = pq.ParquetFile(tmp_path / "packed" / f"{split}.parquet").metadata
        assert all(groups.row_group(i).num_rows <= 64 for i in range(groups.num_row_groups))
    texts = {s: set(pq.read_table(tmp_path / "text" / f"{s}.parquet").column("hash").to_pylist())
             for s in ("train", "calibration", "eval")}
    assert not (texts["train"] & texts["eval"]) and not (texts["train"] & texts["calibration"])
    assert set(summary["splits"]["train"]["domains"]) == {"bible", "python_code"}
