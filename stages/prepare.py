"""Stage `prepare`: multi-domain corpus -> deterministic splits -> tokenizer -> packed Parquet (data/prepared)."""

from __future__ import annotations

import logging

from stages._runner import run
from moe2dense.data.prepare import prepare_corpus
from moe2dense.io import atomic_dir, write_json
from moe2dense.params import load_params
from moe2dense.teacher.source import resolve_checkpoint

OUT = "data/prepared"
METRICS = "metrics/prepare.json"


def main() -> None:
    params = load_params()
    # A real teacher brings its own tokenizer; resolve it first so a bad source fails before any corpus work.
    ckpt = None if params.teacher.source == "demo" else resolve_checkpoint(params.teacher.source)
    with atomic_dir(OUT) as out:
        summary = prepare_corpus(params.prepare, out, ckpt)
        write_json(out / "corpus.json", summary)
    write_json(METRICS, summary)
    s = summary["splits"]
    logging.info("sequences of %d tokens: train %d, calibration %d, eval %d; vocab %d", summary["seq_len"],
                 s["train"]["sequences"], s["calibration"]["sequences"], s["eval"]["sequences"], summary["vocab_size"])


if __name__ == "__main__":
    run("prepare", main)
