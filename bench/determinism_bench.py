"""Price of byte-reproducible teacher training: the `teacher` stage's training step with torch's deterministic
algorithms (what the stage runs) vs without (the old setting, whose weights differ run to run).

Throughput: two copies of the demo model from params.yaml (same init) train on the same random batches in lock-step,
one step each in alternation (which goes first alternates too), so machine noise hits both alike even on a busy
machine; tokens/s from the median step time of each. Each step is the stage's own (`lm_loss`, backward, clip,
AdamW) inside `deterministic_algorithms(on/off)`. Then what the switch buys: `train_demo` run twice per setting,
weights compared.

    python bench/determinism_bench.py [--params params.yaml] [--steps 24] [--check-steps 3] [--threads N]
Budget: deterministic tokens/s >= 0.9x non-deterministic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe2dense.params import load_params  # noqa: E402
from moe2dense.teacher.demo import demo_config, lm_loss, train_demo  # noqa: E402
from moe2dense.training import deterministic_algorithms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per setting")
    ap.add_argument("--check-steps", type=int, default=3, help="steps of each identical-weights run")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: teacher.threads, 0 = all cores)")
    args = ap.parse_args()
    if args.steps < 1 or args.check_steps < 1 or (args.threads is not None and args.threads < 0):
        sys.exit("--steps and --check-steps must be >= 1, --threads >= 0")
    p = load_params(args.params)
    seq_len, t = p.prepare.seq_len, p.teacher.train
    threads = p.teacher.threads if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    n_rows = max(args.steps, args.check_steps) * t.batch_size
    rows = np.random.default_rng(0).integers(0, args.vocab, (n_rows, seq_len), dtype=np.int32)
    from transformers import Qwen3MoeForCausalLM

    def fresh():
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(demo_config(p.teacher.demo, args.vocab, seq_len, eos_id=0, pad_id=None)).train()

    models = {det: fresh() for det in (False, True)}
    opts = {det: torch.optim.AdamW(m.parameters(), lr=t.lr, betas=(0.9, 0.95)) for det, m in models.items()}

    def step(det: bool, ids: torch.Tensor) -> float:
        model, opt = models[det], opts[det]
        start = time.perf_counter()
        with deterministic_algorithms(det):
            loss, _, _ = lm_loss(model, ids, model.config.router_aux_loss_coef)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    batch = [torch.from_numpy(rows[i * t.batch_size:(i + 1) * t.batch_size].astype(np.int64))
             for i in range(args.steps)]
    step(False, batch[0]), step(True, batch[0])  # warm up kernels, allocator and lazy imports once for both
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.steps):
        for det in ((True, False) if i % 2 else (False, True)):
            times[det].append(step(det, batch[i]))
    tokens = t.batch_size * seq_len
    tps = {det: tokens / statistics.median(v) for det, v in times.items()}
    ratio = tps[True] / tps[False]
    pair = statistics.median(n / d for n, d in zip(times[False], times[True]))

    tp = t.model_copy(update={"tokens": args.check_steps * tokens, "warmup_steps": 1, "log_every": 1})

    def weights(det: bool) -> list[torch.Tensor]:
        model = fresh()
        train_demo(model, rows, tp, seed=0, progress=False, deterministic=det)
        return [q.detach() for q in model.parameters()]

    def identical(det: bool) -> bool:
        return all(torch.equal(a, b) for a, b in zip(weights(det), weights(det)))

    print(f"model: demo Qwen3-MoE {p.teacher.demo.num_experts} experts top-{p.teacher.demo.num_experts_per_tok}, "
          f"hidden {p.teacher.demo.hidden_size}, batch {t.batch_size} x {seq_len}, torch threads "
          f"{torch.get_num_threads()}, {args.steps} timed steps per setting, alternating")
    print(f"identical weights in two {args.check_steps}-step train_demo runs: deterministic {identical(True)}, "
          f"non-deterministic {identical(False)}")
    print(f"median step: non-deterministic {statistics.median(times[False]):.3f} s ({tps[False]:.0f} tok/s), "
          f"deterministic {statistics.median(times[True]):.3f} s ({tps[True]:.0f} tok/s); median per-pair speed "
          f"ratio {pair:.3f}")
    print(f"ratio deterministic/non-deterministic = {ratio:.3f}  (budget >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")


if __name__ == "__main__":
    main()
