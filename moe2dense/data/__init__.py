"""Corpus sources, deterministic splits, tokenizer and packing into Parquet."""
