"""Teacher training throughput: the `teacher` stage's loop vs a plain PyTorch loop, same model and batches.

The plain loop is what a user would write: `model(input_ids, labels)` (Hugging Face's loss, with the router
auxiliary loss switched on through the config), backward, clip, AdamW step. Both run on the demo architecture from
params.yaml with identical random batches; rounds alternate so machine noise hits both alike.

    python bench/teacher_throughput.py [--params params.yaml] [--steps 8] [--rounds 3]
Budget (issue 2): stage tokens/s >= 0.95x the plain loop.
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
from moe2dense.params import DemoTrainParams, load_params  # noqa: E402
from moe2dense.teacher.demo import demo_config, train_demo  # noqa: E402


def plain_loop(model, rows: np.ndarray, batch_size: int, steps: int) -> float:
    model.config.output_router_logits = True  # HF adds router_aux_loss_coef * aux to the loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    start, tokens = time.perf_counter(), 0
    for step in range(steps):
        ids = torch.from_numpy(rows[step * batch_size:(step + 1) * batch_size].astype(np.int64))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
    return tokens / (time.perf_counter() - start)


def stage_loop(model, rows: np.ndarray, t: DemoTrainParams, steps: int) -> float:
    tp = t.model_copy(update={"tokens": steps * t.batch_size * rows.shape[1], "warmup_steps": 2})
    return train_demo(model, rows, tp, seed=0, progress=True).tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=None)
    args = ap.parse_args()
    p = load_params(args.params)
    seq_len = args.seq_len or p.prepare.seq_len
    t = p.teacher.train
    rows = np.random.default_rng(0).integers(0, args.vocab, (args.steps * t.batch_size, seq_len), dtype=np.int32)
    from transformers import Qwen3MoeForCausalLM

    def fresh():
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(demo_config(p.teacher.demo, args.vocab, seq_len, eos_id=0, pad_id=None))

    plain_loop(fresh(), rows, t.batch_size, 2)  # warm up kernels and allocator once
    plain, stage = [], []
    for r in range(args.rounds):
        plain.append(plain_loop(fresh(), rows, t.batch_size, args.steps))
        stage.append(stage_loop(fresh(), rows, t, args.steps))
        print(f"round {r}: plain {plain[-1]:8.0f} tok/s   stage {stage[-1]:8.0f} tok/s", flush=True)
    mp, ms = statistics.median(plain), statistics.median(stage)
    ratio = ms / mp
    print(f"\nmodel: demo Qwen3-MoE {p.teacher.demo.num_experts} experts top-{p.teacher.demo.num_experts_per_tok}, "
          f"batch {t.batch_size} x {seq_len}, torch threads {torch.get_num_threads()}")
    print(f"median tokens/s: plain loop {mp:.0f}, teacher stage {ms:.0f}")
    print(f"ratio stage/plain = {ratio:.3f}  (budget >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")


if __name__ == "__main__":
    main()
