"""Held-out quality and routing health of a teacher: perplexity vs a unigram baseline, per-layer expert usage."""

from __future__ import annotations

import math

import numpy as np

from moe2dense.heldout import perplexity_by_domain_and_usage


def perplexity_and_usage(model, ids: np.ndarray, domains: list[str], batch_size: int = 16) -> dict:
    """Next-token perplexity over `ids` (N, seq_len), overall and per domain, plus per-layer routing health (an
    MoE; a dense model's "routing" is empty)."""
    nll_sum, n_tok, counts = perplexity_by_domain_and_usage(model, ids, domains, batch_size)
    total_nll, total_tok = sum(nll_sum.values()), sum(n_tok.values())
    return {
        "perplexity": math.exp(total_nll / total_tok),
        "perplexity_by_domain": {d: math.exp(nll_sum[d] / n_tok[d]) for d in sorted(nll_sum)},
        "eval_tokens": total_tok,
        "routing": {} if counts is None else routing_health(counts.numpy(), n_tokens=len(ids) * ids.shape[1],
                                                            top_k=model.config.num_experts_per_tok),
    }


def routing_health(counts: np.ndarray, n_tokens: int, top_k: int) -> dict:
    """Per-layer usage entropy of the selection distribution (nats, and normalised by log E: 1 = perfectly
    balanced) and the largest share of tokens any one expert serves (count / tokens; balanced = k / E)."""
    shares = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(shares > 0, shares * np.log(shares), 0.0), axis=1)
    return {
        "usage_entropy": [round(float(e), 6) for e in entropy],
        "usage_entropy_normalized": [round(float(e / math.log(counts.shape[1])), 6) for e in entropy],
        "max_token_share": [round(float(m), 6) for m in counts.max(axis=1) / n_tokens],
        "balanced_token_share": top_k / counts.shape[1],
    }


def unigram_perplexity(train: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the train tokens, on the same eval targets the
    teacher predicts (every position but the first of each row)."""
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[eval_ids[:, 1:].ravel()].mean()))
