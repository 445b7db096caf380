"""Calibration capture benchmark on a demo-sized Qwen3-MoE (random weights, built from config).

Times, interleaved over repetitions in one run (medians reported; ratios paired per repetition):
  (a) the plain teacher forward over the calibration tokens (the decoder, as capture runs it: no LM head);
  (b) routing-only capture (needs={"routing"}), Parquet rows + stats included;
  (c) all-experts capture (needs=all three passes, what do_acp + ean/reap need);
  (d) routed-outputs capture (needs={"routing", "routed_outputs"}), for information.
Budgets: (b) <= 1.15 x (a); (c) <= 1.5 x ideal, ideal = (a) + (E/k - 1) x t_experts, where t_experts is the routed
expert compute inside the forward, measured in (a) with a pre/post forward hook pair on every MoE layer's experts
module (CPU ops are synchronous, so wall time between the hooks is that module's compute). The all-experts pass
does E/k times the routed expert FLOPs, of which the forward already did one share.

    python bench/calibrate_bench.py                      # 65,536 tokens, 5 repetitions
    python bench/calibrate_bench.py --tokens 16384 --reps 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moe2dense.calibrate.capture import capture

DOMAINS = ("web", "code", "math")
ALL = {"routing", "routed_outputs", "all_outputs"}


def build_model(a) -> torch.nn.Module:
    config = Qwen3MoeConfig(  # the demo teacher's shape (teacher/demo.py: demo_config)
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
        moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=a.hidden // 4, num_experts=a.experts, num_experts_per_tok=a.top_k,
        norm_topk_prob=True, max_position_embeddings=max(512, a.seq_len), tie_word_embeddings=True)
    config._experts_implementation = "grouped_mm"  # as the demo teacher: the fast CPU kernel
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, a.dtype)).eval()


def make_batches(a) -> list[tuple[torch.Tensor, list[str]]]:
    g = torch.Generator().manual_seed(1)
    n_rows = a.tokens // a.seq_len
    ids = torch.randint(0, a.vocab, (n_rows, a.seq_len), generator=g)
    return [(ids[i:i + a.batch_rows], [DOMAINS[(i + j) % 3] for j in range(len(ids[i:i + a.batch_rows]))])
            for i in range(0, n_rows, a.batch_rows)]


class ExpertTimer:
    """Wall time spent inside every MoE layer's experts module (pre/post forward hooks)."""

    def __init__(self, model):
        self.seconds, self._start = 0.0, 0.0
        self.handles = []
        for layer in model.model.layers:
            experts = layer.mlp.experts
            self.handles.append(experts.register_forward_pre_hook(self._pre))
            self.handles.append(experts.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self.seconds += time.perf_counter() - self._start

    def remove(self):
        for h in self.handles:
            h.remove()


def run_forward(model, batches) -> tuple[float, float]:
    timer = ExpertTimer(model)
    start = time.perf_counter()
    with torch.no_grad():
        for ids, _ in batches:
            model.model(input_ids=ids, use_cache=False)
    total = time.perf_counter() - start
    timer.remove()
    return total, timer.seconds


def run_capture(model, batches, needs, a) -> float:
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        capture(model, batches, root, needs=needs, token_chunk=a.token_chunk, row_group_rows=a.row_group_rows,
                progress=False)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--token-chunk", type=int, default=4096)
    ap.add_argument("--row-group-rows", type=int, default=65536)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model = build_model(a)
    batches = make_batches(a)
    n_tokens = sum(ids.numel() for ids, _ in batches)
    E, k = a.experts, a.top_k
    print(f"Qwen3-MoE hidden {a.hidden}, {a.layers} layers, E={E}, k={k}, I={a.moe_intermediate}, vocab {a.vocab}, "
          f"{a.dtype}; {n_tokens:,} tokens in {len(batches)} batches of {a.batch_rows}x{a.seq_len}; "
          f"token_chunk {a.token_chunk}; {torch.get_num_threads()} threads; {a.reps} interleaved repetitions")

    modes = {
        "forward": lambda: run_forward(model, batches),
        "routing": lambda: run_capture(model, batches, {"routing"}, a),
        "all": lambda: run_capture(model, batches, ALL, a),
        "routed": lambda: run_capture(model, batches, {"routing", "routed_outputs"}, a),
    }
    warm = batches[:2]  # first-call costs (kernel selection, lazy imports) stay out of the timings
    run_forward(model, warm)
    for needs in ({"routing"}, ALL, {"routing", "routed_outputs"}):
        run_capture(model, warm, needs, a)

    times: dict[str, list[float]] = {m: [] for m in modes}
    experts: list[float] = []
    for _ in range(a.reps):
        for name, fn in modes.items():
            out = fn()
            if name == "forward":
                out, t_exp = out
                experts.append(t_exp)
            times[name].append(out)
    med = {m: statistics.median(t) for m, t in times.items()}
    t_exp = statistics.median(experts)
    # Ratios are taken per repetition (each against the forward timed just before it), then the median: on a shared
    # machine the speed drifts between repetitions, and pairing cancels most of the drift.
    ideal = [f + (E / k - 1) * x for f, x in zip(times["forward"], experts)]
    r_b = statistics.median(b / f for b, f in zip(times["routing"], times["forward"]))
    r_c = statistics.median(c / i for c, i in zip(times["all"], ideal))
    r_d = statistics.median(d / (f + x) for d, f, x in zip(times["routed"], times["forward"], experts))

    def row(label, t, extra=""):
        print(f"  {label:<44} {t:8.2f} s  {n_tokens / t:>10,.0f} tok/s  {extra}")

    print("\nmedian seconds:")
    row("(a) plain forward (decoder, use_cache=False)", med["forward"])
    row("    of which routed experts (hooks)", t_exp, f"{t_exp / med['forward']:.0%} of the forward")
    row("(b) routing-only capture", med["routing"])
    row("(c) all-experts capture", med["all"])
    row("(d) routed-outputs capture", med["routed"])
    print(f"\nideal all-experts = (a) + (E/k - 1) x experts = {med['forward']:.2f} + {E / k - 1:g} x {t_exp:.2f} "
          f"= {med['forward'] + (E / k - 1) * t_exp:.2f} s (medians; ratios below are per-repetition medians)")
    print(f"(b) / (a)                  = {r_b:.3f}x   budget <= 1.15x  {'OK' if r_b <= 1.15 else 'MISSED'}")
    print(f"(c) / ideal all-experts    = {r_c:.3f}x   budget <= 1.5x   {'OK' if r_c <= 1.5 else 'MISSED'}")
    print(f"(d) / ((a) + experts)      = {r_d:.3f}x   (information: the routed pass recomputes each routed pair)")
    print("per-repetition seconds: " + "; ".join(f"{m} " + ", ".join(f"{t:.2f}" for t in ts)
                                                 for m, ts in times.items()))

if __name__ == "__main__":
    main()
