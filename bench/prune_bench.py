"""Dense-to-dense width pruning benchmark (issue 16): the two budgets, measured side by side in one run.

(a) Minitron importance capture <= 1.15 x a plain forward of the dense teacher over the same tokens. Both run the
    same code (moe2dense.baselines.importance.forward_tokens: the base model over the calibration batches, no LM
    head), the capture with its hooks; interleaved over --reps repetitions in this process, median of the paired
    ratios. The model is a random dense Qwen3 held in memory (its own dtype, --dtype): a Qwen3-32B-width model cannot
    run a CPU forward within the 6 GiB this machine allows, so the capture model is narrower (printed).
(b) Pruning peak RSS <= 1.5 x (pruned student bytes + one teacher layer bytes). The teacher is a random-weight dense
    Qwen3 checkpoint written tensor by tensor in bf16 (names and shapes from the meta-device model, so exactly what
    save_pretrained writes), default Qwen3-32B widths with 2 layers. Each pruning (magnitude importance + the streamed
    copy, as stage prune runs them) runs in a fresh child that reports its VmHWM (the peak RSS of that process image;
    ru_maxrss in brackets, which can carry the parent's peak across fork + exec). Two targets: one reached by MLP
    width alone and one that also cuts hidden channels. An import-only child gives the baseline, printed for
    information.

    python bench/prune_bench.py            # Qwen3-32B widths, 2 layers (5.1 GB bf16 teacher), ~5 min, < 6 GiB RSS
    python bench/prune_bench.py --parts capture --threads 1 --reps 7   # (a) alone, steadier on a shared machine
    python bench/prune_bench.py --small    # quick self-check (~40 s); its raw memory ratios FAIL by design: the
                                           # imports (~0.46 GB) are 10x its 0.05 GB model, see the net rows
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would flood the table

import numpy as np
import torch
import transformers  # noqa: F401  (the children import exactly this module's imports)
from transformers import AutoModelForCausalLM, Qwen3Config

from moe2dense.baselines import importance as I
from moe2dense.baselines.prune import choose_sizes, prune, read_layout
from moe2dense.checkpoint import CheckpointReader, ShardedWriter
from moe2dense.data.packing import PackedWriter

GB = 1e9
CAPTURE_BUDGET, MEMORY_BUDGET = 1.15, 1.5


def qwen3(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, vocab: int, layers: int
          ) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       tie_word_embeddings=False, max_position_embeddings=4096, dtype="bfloat16")


def write_teacher(config: Qwen3Config, out: Path) -> None:
    """Random bf16 weights, one tensor in memory at a time."""
    with torch.device("meta"):
        layout = [(n, tuple(t.shape)) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()]
    config.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")  # the pruned dir gets a copy; nothing here reads it
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(out, [(n, s, torch.bfloat16) for n, s in layout], max_shard_bytes=2**30) as writer:
        for name, shape in layout:
            t = torch.empty(shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:  # fp32 randoms in chunks of rows: a whole fp32 embedding would be 2x the bf16 one
                step = max(1, 2**25 // math.prod(shape[1:]))
                for i in range(0, shape[0], step):
                    rows = min(step, shape[0] - i)
                    t[i:i + rows] = torch.randn((rows, *shape[1:]), generator=g).mul_(0.02)
            writer.write(name, t)
            del t


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(a) -> None:
    """Fresh interpreter: nothing (import baseline) or one pruning to --target parameters. One JSON line."""
    import moe2dense.assemble  # noqa: F401  (pruning imports it for the tokenizer copy and the card)

    out: dict = {}
    if a.child == "prune":
        start = time.perf_counter()
        layout = read_layout(a.teacher)
        sizes = choose_sizes(layout, a.target, 0.6)
        scores = I.importance("magnitude", I.ImportanceInputs(Path(a.teacher)))
        prune(layout, a.teacher, a.out, sizes, scores.mlp, scores.hidden, importance="magnitude", source=a.teacher,
              tokens=0, tokenizer_dir=a.teacher, max_shard_bytes=2**30, progress=False)
        out = {"seconds": time.perf_counter() - start, "hidden": sizes.hidden, "width": sizes.width,
               "parameters": sizes.parameters}
    print(json.dumps(out | {"vmhwm_kib": vm_hwm_kib(),
                            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [f"--{k}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensor_bytes(path: Path, prefix: str = "") -> int:
    with CheckpointReader(path) as r:
        return sum(r.nbytes(n) for n in r.keys() if n.startswith(prefix))


# ------------------------------------------------------------------------------------------------- (b) memory
def memory(a, root: Path) -> list[tuple[str, float, float]]:
    config = qwen3(a.hidden, a.intermediate, a.heads, a.kv_heads, a.head_dim, a.vocab, a.layers)
    teacher = root / "teacher"
    start = time.perf_counter()
    write_teacher(config, teacher)
    os.sync()
    layout = read_layout(teacher)
    t_bytes, layer_bytes = tensor_bytes(teacher), tensor_bytes(teacher, "model.layers.0.")
    print(f"(b) teacher: dense Qwen3, hidden {a.hidden}, MLP {a.intermediate}, {a.heads} x {a.head_dim} heads "
          f"({a.kv_heads} kv), vocab {a.vocab}, {a.layers} layers, bf16, untied: {t_bytes / GB:.3f} GB "
          f"(one layer {layer_bytes / GB:.3f} GB), written + synced in {time.perf_counter() - start:.1f} s")
    H, I_ = a.hidden, a.intermediate
    targets = {"MLP width only (keeps 50%)": layout.num_parameters(H, I_ // 2),
               "MLP -60% + hidden channels": layout.num_parameters(int(0.7 * H), int(0.4 * I_))}
    base = run_child("import")
    base_b = base["vmhwm_kib"] * 1024
    print(f"    import-only child: VmHWM {base_b / GB:.3f} GB [{base['maxrss_kib'] * 1024 / GB:.3f}]")
    rows = []
    for label, target in targets.items():
        out = root / "pruned"
        r = run_child("prune", teacher=teacher, out=out, target=target)
        s_bytes = tensor_bytes(out)
        ref = s_bytes + layer_bytes
        peak = r["vmhwm_kib"] * 1024
        print(f"    {label}: hidden {r['hidden']}, MLP {r['width']}, {r['parameters']:,} parameters (target "
              f"{target:,}); student {s_bytes / GB:.3f} GB + layer = {ref / GB:.3f} GB; peak {peak / GB:.3f} GB "
              f"[{r['maxrss_kib'] * 1024 / GB:.3f}] = {peak / ref:.3f}x (net of imports {(peak - base_b) / ref:.3f}x)"
              f", {r['seconds']:.1f} s")
        # --small: a 0.05 GB model next to ~0.5 GB of imports and allocator slack: the ratios are information only
        raw, net = (float("inf"), float("inf")) if a.small else (MEMORY_BUDGET, float("inf"))
        rows.append((f"(b) pruning peak RSS / (student + one layer), {label}", peak / ref, raw))
        rows.append(("(b) the same, net of the import-only child's peak", (peak - base_b) / ref, net))
        shutil.rmtree(out)
        os.sync()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"    RUSAGE_CHILDREN ru_maxrss (max over the children, incl. fork-time parent pages): "
          f"{children / GB:.3f} GB")
    shutil.rmtree(teacher)
    return rows


# ------------------------------------------------------------------------------------------------- (a) capture
def capture(a, root: Path) -> list[tuple[str, float, float]]:
    rows = np.random.default_rng(0).integers(0, a.vocab, size=(a.batches * a.batch_size, a.seq_len)).astype(np.int32)
    cal = root / "calibration.parquet"
    w = PackedWriter(cal, a.seq_len, sep_id=0, row_group_rows=a.batch_size)
    w.rows, w.row_domains = list(rows), ["d"] * len(rows)
    w.close()
    inputs = I.ImportanceInputs(root, cal, batch_size=a.batch_size)
    print(f"(a) capture model: dense Qwen3 in memory, hidden {a.cap_hidden}, MLP {a.cap_intermediate}, "
          f"{a.cap_heads} x {a.head_dim} heads ({a.cap_kv_heads} kv), vocab {a.vocab}, {a.layers} layers; "
          f"{len(rows)} sequences x {a.seq_len} tokens in batches of {a.batch_size}; {torch.get_num_threads()} "
          f"torch threads, {a.reps} interleaved repetitions (+1 warm-up); wall and process CPU time")
    out = []
    for dtype in a.dtypes.split(","):
        config = qwen3(a.cap_hidden, a.cap_intermediate, a.cap_heads, a.cap_kv_heads, a.head_dim, a.vocab, a.layers)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
        I.forward_tokens(model, inputs, "warm-up")
        I.capture_minitron(model, inputs)
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "capture": []}
        steps = {"plain": lambda: I.forward_tokens(model, inputs, "plain forward"),
                 "capture": lambda: I.capture_minitron(model, inputs)}
        for _ in range(a.reps):
            for name, step in steps.items():
                cpu, wall = time.process_time(), time.perf_counter()
                step()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        for k, what in enumerate(("wall", "CPU")):
            ratios = [c[k] / p[k] for c, p in zip(times["capture"], times["plain"])]
            plain = statistics.median(p[k] for p in times["plain"])
            cap = statistics.median(c[k] for c in times["capture"])
            print(f"    {dtype} {what}: plain forward median {plain:.2f} s, capture median {cap:.2f} s "
                  f"({len(rows) * a.seq_len / cap:.0f} tokens/s); paired ratios "
                  f"{', '.join(f'{r:.3f}' for r in ratios)}")
            best = min(c[k] for c in times["capture"]) / min(p[k] for p in times["plain"])
            print(f"    {dtype} {what}: fastest capture / fastest plain forward = {best:.3f} (the least disturbed "
                  f"runs of each, on a shared machine)")
            out.append((f"(a) minitron capture / plain forward, {dtype}, {what} time (median of paired ratios)",
                        statistics.median(ratios), CAPTURE_BUDGET))
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=25600)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cap-hidden", type=int, default=1024, help="(a) the capture model's hidden size")
    ap.add_argument("--cap-intermediate", type=int, default=5120)
    ap.add_argument("--cap-heads", type=int, default=8)
    ap.add_argument("--cap-kv-heads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="(a) the capture's dtypes, comma-separated")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 keeps a shared "
                                                           "machine's other processes from stalling parallel kernels")
    ap.add_argument("--parts", default="memory,capture", help="which budgets to measure: memory, capture or both")
    ap.add_argument("--small", action="store_true", help="quick self-check: narrow teacher and capture model")
    ap.add_argument("--root", default=None, help="where the temp dir goes (default: the system temp dir)")
    # internal: the child processes
    ap.add_argument("--child", choices=["import", "prune"], help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a)
    if a.small:
        a.hidden, a.intermediate, a.heads, a.kv_heads, a.vocab = 512, 2560, 8, 2, 16000
        a.cap_hidden, a.cap_intermediate, a.cap_heads, a.cap_kv_heads = 256, 1280, 4, 2
        a.seq_len, a.batches, a.reps = 128, 2, 5
    transformers.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="prune_bench_", dir=a.root))
    try:
        parts = a.parts.split(",")
        rows = (memory(a, root) if "memory" in parts else []) + (capture(a, root) if "capture" in parts else [])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| budget | measured | limit | |\n|---|---:|---:|---|")
    for name, value, limit in rows:
        print(f"| {name} | {value:.3f} | {limit} | {'PASS' if value <= limit else 'FAIL'} |")
    sys.exit(0 if all(v <= lim for _, v, lim in rows) else 1)


if __name__ == "__main__":
    main()
