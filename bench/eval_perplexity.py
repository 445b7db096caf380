"""Held-out perplexity through lm-eval vs a plain batched HF forward over the same tokens (run `make demo` first).

    python bench/eval_perplexity.py                        # the demo teacher
    python bench/eval_perplexity.py --model models/student

The demo's perplexity tasks (one per domain, built from data/prepared/text/eval.parquet into a temp dir) are run
(a) through `evaluate_model` (lm-eval's `simple_evaluate` on the in-memory model; the model is loaded and the tasks
are loaded beforehand, task loading timed separately) and (b) by a plain loop: each document tokenized with the same
tokenizer, cut into the same disjoint rolling windows (lm_eval.utils' window functions, prefix token BOS/EOS),
`batch_size` windows per forward under torch.inference_mode, fp32 log_softmax, target log-probs gathered and summed
per domain. The two must agree on bits_per_byte per domain (1e-4 relative). One warm-up each, then `--reps`
alternating rounds; the ratio is the median of the per-round ratios (robust to load that drifts between rounds on a
shared machine). Budget: wall time (a) <= 1.5 x (b). `--profile` prints cProfile's top 15 (cumulative) of one
`evaluate_model` call at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe2dense.evaluate.runner import evaluate_model, load_model, load_tasks  # noqa: E402
from moe2dense.evaluate.tasks import PPL_PREFIX, build_demo_tasks  # noqa: E402
from moe2dense.params import ContinuationParams, EvaluateParams  # noqa: E402

EVAL_TEXT = ROOT / "data/prepared/text/eval.parquet"
BUDGET = 1.5


def plain_windows(tasks_dir: Path, names: list[str], tokenizer, max_length: int):
    """[(task, input ids, target ids)] in lm-eval's request order (tasks in order, docs in file order), and per
    task (bytes, words) as lm-eval counts them."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows, counts = [], {}
    for name in names:
        docs = [json.loads(line)["text"] for line in (tasks_dir / f"{name}.jsonl").read_text().splitlines()]
        counts[name] = (sum(len(d.encode("utf-8")) for d in docs), sum(len(re.split(r"\s+", d)) for d in docs))
        for doc in docs:
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokenizer.encode(doc), prefix_token=prefix, max_seq_len=max_length, context_len=1)):
                windows.append((name, (ctx + cont)[:-1], cont))
    return windows, counts


def plain(model, windows, batch_size: int) -> dict[str, float]:
    """Total log-likelihood per task: `batch_size` windows per forward, right-padded (causal, so padding after a
    window's tokens does not change them)."""
    total = dict.fromkeys(dict.fromkeys(w[0] for w in windows), 0.0)
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            width = max(len(w[1]) for w in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, inp, _) in enumerate(batch):
                ids[row, :len(inp)] = torch.tensor(inp)
            logp = F.log_softmax(model(ids).logits.float(), dim=-1)
            for row, (name, inp, cont) in enumerate(batch):
                pos = torch.arange(len(inp) - len(cont), len(inp))
                total[name] += logp[row, pos, torch.tensor(cont)].sum().item()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/teacher")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    model_dir = ROOT / a.model
    for path in (EVAL_TEXT, model_dir):
        if not path.exists():
            sys.exit(f"{path} is missing: run `make demo` first")
    logging.disable(logging.WARNING)  # lm-eval logs every task and request build
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory() as d:
        tasks_dir = Path(d)
        manifest = build_demo_tasks(EVAL_TEXT, tasks_dir, ContinuationParams(), 0)
        names = [n for n in manifest["tasks"] if n.startswith(PPL_PREFIX)]
        p = EvaluateParams(tasks=names, batch_size=a.batch_size, max_length=a.max_length, device="cpu")
        start = time.perf_counter()
        tasks = load_tasks(p, tasks_dir)
        t_load = time.perf_counter() - start
        try:
            model, tokenizer = load_model(model_dir, p)
            windows, counts = plain_windows(tasks_dir, names, tokenizer, a.max_length)
            res = evaluate_model(model, tokenizer, tasks, p)  # warm-up
            ll = plain(model, windows, a.batch_size)  # warm-up
            t_lm, t_plain = [], []
            for r in range(a.reps):
                start = time.perf_counter()
                evaluate_model(model, tokenizer, tasks, p)
                t_lm.append(time.perf_counter() - start)
                start = time.perf_counter()
                plain(model, windows, a.batch_size)
                t_plain.append(time.perf_counter() - start)
                print(f"round {r + 1}: lm-eval {t_lm[-1]:.2f} s, plain {t_plain[-1]:.2f} s "
                      f"({t_lm[-1] / t_plain[-1]:.2f}x)", flush=True)
            if a.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(evaluate_model, model, tokenizer, tasks, p)
                pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
        finally:
            tasks.close()

    print(f"\n{a.model}: {len(names)} perplexity tasks, {sum(counts[n][0] for n in names):,} bytes, "
          f"{sum(len(w[2]) for w in windows):,} scored tokens in {len(windows)} windows of <= {a.max_length}, "
          f"batch {a.batch_size}, {threads} threads; task loading {t_load:.2f} s (excluded)")
    bad = []
    for name in names:
        nbytes, words = counts[name]
        bpb = -ll[name] / nbytes / math.log(2)
        got = res[name]["bits_per_byte"]
        print(f"  {name:<24} bits/byte lm-eval {got:.6f} plain {bpb:.6f}   word ppl lm-eval "
              f"{res[name]['word_perplexity']:.4f} plain {math.exp(-ll[name] / words):.4f}")
        if abs(got - bpb) > 1e-4 * abs(bpb):
            bad.append(name)
    if bad:
        sys.exit(f"MISMATCH: bits_per_byte of {bad} differ by more than 1e-4 relative; the timings compare "
                 f"different work")
    ratio = statistics.median(x / y for x, y in zip(t_lm, t_plain))
    print(f"medians of {a.reps}: lm-eval {statistics.median(t_lm):.2f} s, plain {statistics.median(t_plain):.2f} s")
    print(f"ratio lm-eval / plain = {ratio:.2f}x (budget <= {BUDGET}x): {'met' if ratio <= BUDGET else 'MISSED'}")


if __name__ == "__main__":
    main()
