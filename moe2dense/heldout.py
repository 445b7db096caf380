"""Held-out measures over packed token rows (N, seq_len), batched the same way for all: the screen's perplexity,
distillation's KL(teacher || student), and the demo teacher's perplexity per domain with its expert usage.

Each keeps its own reduction (a flat sum, a sum of per-row sums, ...): their figures are DVC-tracked metrics, and
a different summation order changes the last bits."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def batches(rows: np.ndarray, batch_rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(which rows, their token ids as int64) per batch of `batch_rows` consecutive rows."""
    for start in range(0, len(rows), batch_rows):
        part = slice(start, start + batch_rows)
        yield part, torch.from_numpy(rows[part].astype(np.int64))


@torch.inference_mode()
def perplexity(model, rows: np.ndarray, batch_rows: int = 8) -> float:
    """exp(mean next-token NLL) over `rows`."""
    total, n = 0.0, 0
    for _, ids in batches(rows, batch_rows):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        n += ids[:, 1:].numel()
    return math.exp(total / n)


@torch.inference_mode()
def kl(student, teacher, rows: np.ndarray, batch_rows: int = 8) -> float:
    """Mean per-token forward KL(teacher || student) at T = 1 over `rows` (the distillation objective, held out)."""
    total, n = 0.0, 0
    for _, ids in batches(rows, batch_rows):
        log_p = teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        log_q = student(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        n += ids.numel()
    return total / n


@torch.inference_mode()
def perplexity_by_domain_and_usage(model, rows: np.ndarray, domains: list[str],
                                   batch_rows: int = 16) -> tuple[dict[str, float], dict[str, int], torch.Tensor]:
    """({domain: summed next-token NLL}, {domain: predicted tokens}, (layers, experts) top-k selection counts from
    the router logits the model itself returns)."""
    model.eval()
    routed = hasattr(model.config, "num_experts_per_tok")  # a dense model (the d2d teacher): counts stay None
    top_k, n_exp = (model.config.num_experts_per_tok, model.config.num_experts) if routed else (0, 0)
    nll_sum: dict[str, float] = {}
    n_tok: dict[str, int] = {}
    counts = None
    for part, ids in batches(rows, batch_rows):
        out = model(input_ids=ids, use_cache=False, **({"output_router_logits": True} if routed else {}))
        nll = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.size(-1)), ids[:, 1:].reshape(-1),
                              reduction="none").view(ids.size(0), -1).sum(1)
        for d, v in zip(domains[part], nll.tolist()):
            nll_sum[d] = nll_sum.get(d, 0.0) + v
            n_tok[d] = n_tok.get(d, 0) + ids.size(1) - 1
        if not routed:
            continue
        layer_counts = torch.stack([
            torch.bincount(rl.topk(top_k, dim=-1).indices.flatten(), minlength=n_exp) for rl in out.router_logits
        ])
        counts = layer_counts if counts is None else counts + layer_counts
    return nll_sum, n_tok, counts
