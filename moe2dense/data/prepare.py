"""The `prepare` step as a library function: corpus -> splits (text Parquet) -> tokenizer -> packed Parquet.

Two streaming passes, so memory does not grow with the corpus: the first writes each document's text into its
split's Parquet file; the second re-reads the text in batches, tokenizes and packs. Layout of the output dir:

    text/{train,calibration,eval}.parquet    doc_id, domain, text, hash (zstd)
    tokenizer/                               HF tokenizer dir (trained BPE, or the teacher's own)
    packed/{train,calibration,eval}.parquet  input_ids: fixed_size_list<int32>[seq_len], domain
    corpus.json                              counts per split and domain (also the stage's metrics)
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from moe2dense.data.packing import PackedWriter
from moe2dense.data.sources import iter_corpus
from moe2dense.data.split import SPLITS, assign_split, doc_hash
from moe2dense.data.tokenizer import batched_encode, eos_id, load_tokenizer, train_bpe
from moe2dense.params import PrepareParams

log = logging.getLogger(__name__)

TEXT_SCHEMA = pa.schema([("doc_id", pa.string()), ("domain", pa.string()), ("text", pa.large_string()),
                         ("hash", pa.string())])


class _TextWriter:
    """Buffers documents per split and writes bounded row groups."""

    def __init__(self, path: Path, rows_per_group: int):
        self.writer = pq.ParquetWriter(str(path), TEXT_SCHEMA, compression="zstd")
        self.rows_per_group, self.buf = rows_per_group, []

    def add(self, row: dict) -> None:
        self.buf.append(row)
        if len(self.buf) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.writer.write_table(pa.Table.from_pylist(self.buf, schema=TEXT_SCHEMA))
            self.buf = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def iter_texts(path: Path, batch_rows: int = 256, columns=("text",)) -> Iterator[dict]:
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=batch_rows, columns=list(columns)):
        yield batch.to_pydict()


def write_splits(params: PrepareParams, out: Path) -> dict:
    """Pass 1: stream documents into text/{split}.parquet; returns doc and char counts per split and domain."""
    (out / "text").mkdir(parents=True, exist_ok=True)
    writers = {s: _TextWriter(out / "text" / f"{s}.parquet", 512) for s in SPLITS}
    seen: set[str] = set()
    docs, chars, dupes = Counter(), Counter(), 0
    try:
        for doc in tqdm(iter_corpus(params.corpus), desc="prepare: corpus", unit="doc", mininterval=2):
            h = doc_hash(doc.text, params.seed)
            if h in seen:
                dupes += 1
                continue
            seen.add(h)
            split = assign_split(h, params.split.calibration, params.split.eval)
            writers[split].add({"doc_id": doc.doc_id, "domain": doc.domain, "text": doc.text, "hash": h})
            docs[(split, doc.domain)] += 1
            chars[(split, doc.domain)] += len(doc.text)
    finally:
        for w in writers.values():
            w.close()
    if not docs:
        raise ValueError("prepare.corpus produced no documents; check the sources and their max_chars")
    if not any(split == "train" for split, _ in docs):
        raise ValueError("no document landed in the train split; lower prepare.split.calibration / eval")
    return {"docs": docs, "chars": chars, "duplicates_dropped": dupes}


def build_tokenizer(params: PrepareParams, out: Path, teacher_checkpoint: Path | None):
    """The teacher's own tokenizer when converting a real model; a freshly trained BPE for the demo."""
    tok_dir = out / "tokenizer"
    if teacher_checkpoint is not None:
        from moe2dense.teacher.source import check_tokenizer, validate_checkpoint_dir

        validate_checkpoint_dir(teacher_checkpoint)  # a teacher without tokenizer files would pack separators only
        tok = load_tokenizer(teacher_checkpoint)
        check_tokenizer(tok, teacher_checkpoint)
        tok.save_pretrained(str(tok_dir))
        return tok
    texts = (t for batch in iter_texts(out / "text" / "train.parquet") for t in batch["text"])
    log.info("training a byte-level BPE tokenizer (vocab %d)", params.tokenizer.vocab_size)
    return train_bpe(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency, tok_dir)


def pack_splits(params: PrepareParams, out: Path, tokenizer) -> dict:
    """Pass 2: tokenize each split's text in batches and pack it into fixed-length rows."""
    (out / "packed").mkdir(parents=True, exist_ok=True)
    sep = eos_id(tokenizer)
    tokens, rows = Counter(), {}
    for split in SPLITS:
        writer = PackedWriter(out / "packed" / f"{split}.parquet", params.seq_len, sep, params.row_group_rows)
        n_docs = pq.ParquetFile(str(out / "text" / f"{split}.parquet")).metadata.num_rows
        with tqdm(total=n_docs, desc=f"prepare: tokenize {split}", unit="doc", mininterval=2) as bar:
            for batch in iter_texts(out / "text" / f"{split}.parquet", columns=("text", "domain")):
                for domain, ids in zip(batch["domain"], batched_encode(tokenizer, batch["text"])):
                    writer.add(domain, ids)
                    tokens[(split, domain)] += len(ids) + 1
                bar.update(len(batch["text"]))
        rows[split] = writer.close()
        if rows[split] == 0:
            raise ValueError(f"the {split} split has fewer than prepare.seq_len={params.seq_len} tokens per domain; "
                             f"add text, lower seq_len" + ("" if split == "train" else f" or raise prepare.split.{split}"))
    return {"tokens": tokens, "sequences": rows}


def prepare_corpus(params: PrepareParams, out: Path, teacher_checkpoint: Path | None = None) -> dict:
    """Run both passes into `out` and return the summary written to corpus.json."""
    counts = write_splits(params, out)
    tokenizer = build_tokenizer(params, out, teacher_checkpoint)
    packed = pack_splits(params, out, tokenizer)
    per_domain: dict = defaultdict(dict)
    for (split, domain), n in counts["docs"].items():
        per_domain[split][domain] = {"docs": n, "chars": counts["chars"][(split, domain)],
                                     "tokens": packed["tokens"][(split, domain)]}
    return {
        "splits": {s: {"sequences": packed["sequences"][s], "domains": per_domain.get(s, {})} for s in SPLITS},
        "duplicates_dropped": counts["duplicates_dropped"],
        "vocab_size": len(tokenizer),
        "seq_len": params.seq_len,
        "tokenizer": "teacher" if teacher_checkpoint is not None else "trained_bpe",
    }
