"""Peak memory of the chunked distillation loss vs the naive full-logits loss (forward + backward).

Budget: at vocab 151,936 and 8,192 tokens, the peak memory of `chunked_kd_loss` is at most 0.3x that of
`full_kd_loss` (the naive loss that materialises the [tokens, vocab] fp32 logits).

Each measurement runs in its own subprocess: random student hidden states [T, H] and LM head [V, H] (fp32, both
requiring grad) and an online teacher (its own hidden states and head; `teacher_chunk` computes the dense teacher
logits of the requested tokens). The figure is the subprocess's peak RSS during loss + backward minus its RSS just
before the call (the kernel's peak counter, VmHWM, is reset through /proc/self/clear_refs right before the call).

The naive loss needs several [T, V] fp32 buffers (5 GB each at 8,192 tokens), more than this machine has, so it runs
at two small token counts (its peak must be linear in tokens), then at the largest count whose linear prediction
fits in MemAvailable with a margin and --keep-free-gb to spare; the naive peak at --tokens is measured when it fits,
else extrapolated from that line (the largest count's deviation from the line is printed). The chunked loss runs at
the naive count (same-count ratio and wall-time ratio, information) and at --tokens (the budget figure).

    python bench/distill_loss_memory.py                  # 8,192 tokens, vocab 151,936, hidden 512, chunk 1024
    python bench/distill_loss_memory.py --tokens 4096 --chunk-tokens 512 --loss jsd
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

BUDGET = 0.3
MARGIN = 1.25  # headroom on the naive loss's predicted peak before running it


def meminfo_kb(key: str, path: str = "/proc/meminfo") -> int:
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def worker(a) -> None:
    """One measurement: print {"peak_mb", "seconds", "loss"} as JSON."""
    import gc

    import torch

    from moe2dense.distill.losses import chunked_kd_loss, full_kd_loss

    g = torch.Generator().manual_seed(0)
    T, H, V = a.worker_tokens, a.hidden, a.vocab
    hidden = torch.randn(T, H, generator=g).requires_grad_()
    head = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    t_hidden = torch.randn(T, H, generator=g)
    t_head = torch.randn(V, H, generator=g) / H ** 0.5
    fn = {"chunked": chunked_kd_loss, "full": full_kd_loss}[a.worker]
    gc.collect()
    baseline = meminfo_kb("VmRSS", "/proc/self/status")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    loss = fn(hidden, head, lambda s, e: t_hidden[s:e] @ t_head.T, loss=a.loss, chunk_tokens=a.chunk_tokens)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = meminfo_kb("VmHWM", "/proc/self/status")
    print(json.dumps({"peak_mb": (peak - baseline) / 1024, "seconds": seconds, "loss": loss.item()}))


def measure(a, mode: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--worker-tokens", str(tokens), "--vocab", str(a.vocab),
           "--hidden", str(a.hidden), "--chunk-tokens", str(a.chunk_tokens), "--loss", a.loss]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"  {mode:<8} {tokens:>6,} tokens: peak {out['peak_mb']:>9,.0f} MB above baseline, "
          f"{out['seconds']:7.2f} s, loss {out['loss']:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--small-tokens", type=int, nargs=2, default=[512, 1024],
                    help="two token counts for the naive loss's linear fit")
    ap.add_argument("--keep-free-gb", type=float, default=6.0, help="memory left free while the naive loss runs")
    ap.add_argument("--worker", choices=["chunked", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-tokens", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    print(f"loss {a.loss}, vocab {a.vocab:,}, hidden {a.hidden}, fp32, chunk {a.chunk_tokens} tokens; "
          f"peak RSS above the pre-call baseline, forward + backward, one subprocess per row")
    (n1, n2) = a.small_tokens
    p1, p2 = (measure(a, "full", n)["peak_mb"] for n in (n1, n2))
    slope = (p2 - p1) / (n2 - n1)

    def predict(n: int) -> float:
        return p1 + slope * (n - n1)

    print(f"  naive linear fit: {slope:.2f} MB per token = {slope * 2 ** 20 / (4 * a.vocab):.1f} [T, V] fp32 buffers")
    free_mb = meminfo_kb("MemAvailable") / 1024 - a.keep_free_gb * 1024
    counts = sorted({n2 * 2 ** i for i in range(1, 8) if n2 * 2 ** i < a.tokens} | {a.tokens})
    fits = [n for n in counts if predict(n) * MARGIN <= free_mb]
    n_big = max(fits, default=n2)
    full_big = measure(a, "full", n_big)
    deviation = full_big["peak_mb"] / predict(n_big) - 1
    chunked_big = measure(a, "chunked", n_big)
    chunked = chunked_big if n_big == a.tokens else measure(a, "chunked", a.tokens)
    naive = full_big["peak_mb"] if n_big == a.tokens else predict(a.tokens)

    print(f"\nnaive peak at {n_big:,} tokens: measured {full_big['peak_mb']:,.0f} MB, linear fit from {n1}/{n2} "
          f"predicts {predict(n_big):,.0f} MB ({deviation:+.1%}): the naive peak is linear in tokens")
    same = chunked_big["peak_mb"] / full_big["peak_mb"]
    print(f"chunked / naive at {n_big:,} tokens      = {same:.3f}x   (information: the chunked peak is ~constant in "
          f"tokens, so the ratio falls as tokens grow)")
    print(f"wall time chunked / naive at {n_big:,} = {chunked_big['seconds'] / full_big['seconds']:.2f}x   "
          f"({chunked_big['seconds']:.1f} s vs {full_big['seconds']:.1f} s; information)")
    how = "measured" if n_big == a.tokens else "linear extrapolation"
    ratio = chunked["peak_mb"] / naive
    print(f"chunked peak at {a.tokens:,} tokens = {chunked['peak_mb']:,.0f} MB; naive {naive:,.0f} MB ({how})")
    print(f"chunked / naive at {a.tokens:,} tokens   = {ratio:.3f}x   budget <= {BUDGET}x  "
          f"{'OK' if ratio <= BUDGET else 'MISSED'}")


if __name__ == "__main__":
    main()
