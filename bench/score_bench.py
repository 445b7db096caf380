"""Scoring benchmark on a synthetic Qwen3-30B-A3B-shaped calibration set.

Budget (DESIGN): scoring all seven methods for 48 layers x 128 experts, top-8, >= 256k tokens in <= 60 s on 2 cores.

Generates (untimed, in a temp dir) per layer: routing Parquet via RoutingWriter from realistic synthetic routing
(skewed expert popularity + per-domain preferences + per-token noise, softmax, top-k, renormalised weights) and
LayerStats whose routing sums come from that same routing, with synthetic output norms and a PSD Gram matrix
"given" (experts' outputs share a common direction plus a few near-duplicate experts). Then times
(a) read_stats + all seven methods on every layer + do_acp selection at K, and (b) usage_by_domain.

    python bench/score_bench.py                            # full shape, ~2-3 min on 2 cores
    python bench/score_bench.py --layers 4 --tokens 65536  # quick
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe2dense.calibrate.store import RoutingWriter, read_stats, usage_by_domain, write_stats
from moe2dense.scoring import METHODS, LayerStats, score
from moe2dense.selection import select_experts

DOMAINS = np.array(["web", "code", "math", "chat"])
SEQ_LEN = 2048
CHUNK = 32768  # tokens generated per RoutingWriter.append
HIDDEN = 16  # rank of the synthetic router's token-dependent logits


def synth_layer(root, layer: int, n_tokens: int, E: int, k: int, g: torch.Generator) -> None:
    # Router logits = bias (expert popularity: some hot, some nearly dead; plus per-domain preference) + a
    # token-dependent part that is linear in a low-dimensional hidden state, as a real router's logits are.
    bias = 0.8 * torch.randn(E, generator=g) + 0.6 * torch.randn(len(DOMAINS), E, generator=g)
    router = 0.4 * torch.randn(HIDDEN, E, generator=g)
    scale = torch.exp(0.3 * torch.randn(E, generator=g, dtype=torch.float64))  # per-expert output RMS
    f64 = dict(dtype=torch.float64)
    count, prob_sum, prob_sel, weight_sum, norm_routed, gnorm_routed = (torch.zeros(E, **f64) for _ in range(6))
    with RoutingWriter(root, layer, top_k=k, num_experts=E, store_probs=False) as w:
        for start in range(0, n_tokens, CHUNK):
            tok = torch.arange(start, min(start + CHUNK, n_tokens))
            seq = tok // SEQ_LEN
            dom = seq % len(DOMAINS)
            logits = torch.addmm(bias[dom], torch.randn(len(tok), HIDDEN, generator=g), router)
            probs = logits.softmax(-1)
            p_sel, experts = probs.topk(k)
            weights = p_sel / p_sel.sum(-1, keepdim=True)  # norm_topk_prob
            norms = scale[experts] * torch.exp(0.2 * torch.randn(experts.shape, generator=g, **f64))
            w.append(seq, tok % SEQ_LEN, DOMAINS[dom.numpy()], experts, weights)
            ids = experts.reshape(-1)
            count += torch.bincount(ids, minlength=E)
            prob_sum += probs.sum(0).double()  # float32 pairwise sum over one chunk is exact enough
            prob_sel.index_add_(0, ids, p_sel.reshape(-1).double())
            weight_sum.index_add_(0, ids, weights.reshape(-1).double())
            norm_routed.index_add_(0, ids, norms.reshape(-1))
            gnorm_routed.index_add_(0, ids, (weights.double() * norms).reshape(-1))
    # Gram "given": unit directions = shared component + expert-specific part, 4 planted near-duplicate pairs.
    d = torch.randn(E, 256, generator=g, **f64) + 0.7 * torch.randn(1, 256, generator=g, **f64)
    d[E - 4:] = d[:4] + 0.05 * torch.randn(4, 256, generator=g, **f64)
    d = torch.nn.functional.normalize(d, dim=1)
    gram = n_tokens * (scale[:, None] * (d @ d.T) * scale[None, :])  # sum_t f_i . f_j with mean ||f_e||^2 = s_e^2
    write_stats(root, layer, LayerStats(
        n_tokens=n_tokens, top_k=k, count=count, prob_sum=prob_sum, prob_sum_selected=prob_sel,
        weight_sum=weight_sum, norm_sum_routed=norm_routed, gnorm_sum_routed=gnorm_routed,
        norm_sum_all=0.98 * n_tokens * scale, sqnorm_sum_all=gram.diagonal().clone(), gram=gram))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=262_144, help="calibration tokens per layer")
    ap.add_argument("--select", type=int, default=16, help="K for the do_acp selection")
    ap.add_argument("--workdir", default=None, help="parent of the temp dir (default: system temp)")
    a = ap.parse_args()
    L, E, k, N = a.layers, a.experts, a.top_k, a.tokens
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="score_bench_") as root:
        t = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        for layer in range(L):
            synth_layer(root, layer, N, E, k, g)
        t_gen = time.perf_counter() - t
        size_mb = sum(f.stat().st_size for f in Path(root).rglob("*.parquet")) / 2**20

        t0 = time.perf_counter()
        stats = read_stats(root)
        t_read = time.perf_counter() - t0
        per_method = dict.fromkeys(METHODS, 0.0)
        for s in stats.values():
            for m in METHODS:
                t = time.perf_counter()
                score(m, s)
                per_method[m] += time.perf_counter() - t
        t = time.perf_counter()
        for s in stats.values():
            select_experts("do_acp", s, K=a.select, k=k)
        t_select = time.perf_counter() - t
        t_a = time.perf_counter() - t0

        t = time.perf_counter()
        usage = usage_by_domain(root)
        t_b = time.perf_counter() - t
        assert usage["count"].sum() == L * N * k, "usage_by_domain lost selections"

    rows = [("(a) read_stats", t_read)] + [(f"(a)   score {m}", v) for m, v in per_method.items()]
    rows += [(f"(a) do_acp selection, K={a.select}", t_select), ("(a) TOTAL", t_a),
             (f"(b) usage_by_domain ({L * N * k:,} selections)", t_b)]
    print(f"\nscore_bench: {L} layers x {E} experts, top-{k}, {N:,} tokens/layer; cpus={os.cpu_count()}, "
          f"torch threads={torch.get_num_threads()}, load average {load:.1f} at start")
    print(f"synthetic data (untimed): {t_gen:.1f} s to generate, {size_mb:.0f} MiB of Parquet\n")
    print(f"{'stage':<48}{'seconds':>10}")
    print("-" * 58)
    for name, sec in rows:
        print(f"{name:<48}{sec:>10.3f}")
    full = L >= 48 and E >= 128 and k >= 8 and N >= 256 * 1024
    verdict = ("PASS" if t_a <= 60 else "FAIL") if full else "n/a (smaller than the budget shape)"
    print(f"\nbudget: all seven methods for 48x128, top-8, >=256k tokens in <= 60 s on 2 cores: "
          f"(a) = {t_a:.2f} s -> {verdict}" + (f", {60 / t_a:.0f}x headroom" if full else ""))


if __name__ == "__main__":
    main()
