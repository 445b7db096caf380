"""Price of byte-reproducible teacher training: the `teacher` stage's loop with torch's deterministic algorithms
(what the stage runs) vs without (the old setting, whose weights differ run to run), same model and batches.

Both run the demo architecture from params.yaml on identical random batches; rounds alternate (which one goes first
alternates too) so machine noise hits both alike, and the medians are compared. Each round also checks what the
switch buys: the two deterministic runs of a round pair give identical weights.

    python bench/determinism_bench.py [--params params.yaml] [--steps 6] [--rounds 4] [--threads N]
Budget: deterministic tokens/s >= 0.9x non-deterministic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe2dense.params import load_params  # noqa: E402
from moe2dense.teacher.demo import demo_config, train_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: teacher.threads, 0 = all cores)")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1 or (args.threads is not None and args.threads < 0):
        sys.exit("--steps and --rounds must be >= 1, --threads >= 0")
    p = load_params(args.params)
    seq_len, t = p.prepare.seq_len, p.teacher.train
    threads = p.teacher.threads if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    rows = np.random.default_rng(0).integers(0, args.vocab, (args.steps * t.batch_size, seq_len), dtype=np.int32)
    tp = t.model_copy(update={"tokens": args.steps * t.batch_size * seq_len, "warmup_steps": 1, "log_every": 1})
    from transformers import Qwen3MoeForCausalLM

    def run(deterministic: bool):
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(demo_config(p.teacher.demo, args.vocab, seq_len, eos_id=0, pad_id=None))
        log = train_demo(model, rows, tp, seed=0, progress=False, deterministic=deterministic)
        return log.tokens_per_s, [q.detach().clone() for q in model.parameters()]

    run(False), run(True)  # warm up kernels, allocator and lazy imports once for both
    speed: dict[bool, list[float]] = {True: [], False: []}
    weights: dict[bool, list] = {True: [], False: []}
    for r in range(args.rounds):
        for det in ((True, False) if r % 2 else (False, True)):
            tps, w = run(det)
            speed[det].append(tps)
            weights[det].append(w)
        print(f"round {r}: non-deterministic {speed[False][-1]:8.0f} tok/s   deterministic {speed[True][-1]:8.0f} "
              "tok/s", flush=True)

    def all_equal(ws) -> bool:
        return all(all(torch.equal(a, b) for a, b in zip(ws[0], w)) for w in ws[1:])

    md, mn = statistics.median(speed[True]), statistics.median(speed[False])
    ratio = md / mn
    print(f"\nmodel: demo Qwen3-MoE {p.teacher.demo.num_experts} experts top-{p.teacher.demo.num_experts_per_tok}, "
          f"hidden {p.teacher.demo.hidden_size}, batch {t.batch_size} x {seq_len}, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}")
    print(f"identical weights over {args.rounds} runs: deterministic {all_equal(weights[True])}, "
          f"non-deterministic {all_equal(weights[False])}")
    print(f"median tokens/s: non-deterministic {mn:.0f}, deterministic {md:.0f}")
    print(f"ratio deterministic/non-deterministic = {ratio:.3f}  (budget >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")


if __name__ == "__main__":
    main()
