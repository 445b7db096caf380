"""Deterministic train / calibration / eval assignment by content hash.

Hashing the document text (not its position) keeps a document in the same split when sources are reordered or
extended, and drops exact duplicates that would otherwise leak between splits."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "calibration", "eval")


def doc_hash(text: str, seed: int = 0) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8", errors="replace")).hexdigest()


def assign_split(digest: str, calibration: float, eval: float) -> str:
    """Map a hex digest to a split: its first 64 bits, read as a uniform number in [0, 1), against the fractions."""
    u = int(digest[:16], 16) / 2**64
    if u < eval:
        return "eval"
    if u < eval + calibration:
        return "calibration"
    return "train"
