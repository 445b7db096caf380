"""Layer-by-layer calibration memory (issue 15): peak RSS flat in the number of layers.

A random-weight bf16 teacher of Qwen3-30B-A3B's widths (hidden 2048, 128 experts top-8, expert width 768, vocab
151,936, 32 heads x 128, 4 KV heads, untied head) is written tensor by tensor with the per-expert names
save_pretrained writes (bench/assemble_memory.py's `write_teacher`, never a model in memory), with 2, 4 and 8 layers.
Each is calibrated in a fresh child process by the calibrate entry point in layer mode
(`capture_checkpoint(offload="layer")`, bf16, CPU) with the passes `convert --method do_acp` runs, so the
all-experts pass runs too; the child reports its VmHWM (peak RSS). A child that only imports gives the baseline.

Budgets (PASS/FAIL):
  (1) flat: peak(8 layers) <= 1.15 x peak(2 layers) (the largest and smallest layer counts given);
  (2) bounded: peak <= 2.5 x (one decoder layer + one embedding matrix), in bytes of the calibration dtype. Checked
      at full size only: with --small the import baseline (0.46 GB) and fixed costs (pyarrow, oneDNN scratch) are
      as large as the 0.2 GB layer, so there it is printed (gross and net of the baseline) but not judged.

    python bench/calibrate_offload_memory.py           # real widths: 2/4/8 layers, ~11 GB of disk at most
    python bench/calibrate_offload_memory.py --small   # quick self-check (`make bench` without FULL)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from assemble_memory import check_layout_naming, disk_layout, largest_layer, teacher_config, vm_hwm_kib, write_teacher
from moe2dense.checkpoint import CheckpointReader

GB = 1e9


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def child(a) -> None:
    """A fresh interpreter: nothing (import baseline) or one layer-by-layer calibration. Prints one JSON line."""
    seconds = 0.0
    if a.child == "calibrate":
        from moe2dense.calibrate.capture import capture_checkpoint
        from moe2dense.checks import calibrated_passes
        from moe2dense.convert import ConvertArgs, convert_params

        needs = calibrated_passes(convert_params(ConvertArgs(teacher=a.teacher, out="-", method="do_acp",
                                                             experts=2 * a.top_k)))
        g = torch.Generator().manual_seed(0)
        rows = a.tokens // a.seq_len
        ids = torch.randint(0, a.vocab, (rows, a.seq_len), generator=g)
        batches = [(ids[i:i + a.batch_size], ["bench"] * len(ids[i:i + a.batch_size]))
                   for i in range(0, rows, a.batch_size)]
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="moe2dense-bench-calibration-") as out:
            capture_checkpoint(a.teacher, batches, out, offload="layer", dtype=torch.bfloat16,
                               device=torch.device("cpu"), needs=needs, progress=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"vmhwm_kib": vm_hwm_kib(), "seconds": seconds}))


def run_child(mode: str, a, **kw) -> dict:
    args = {"vocab": a.vocab, "top_k": a.top_k, "tokens": a.tokens, "seq_len": a.seq_len,
            "batch_size": a.batch_size, **kw}
    cmd = [sys.executable, __file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens (few: the hidden-state buffer is "
                    "tokens x hidden x 2 bytes, not what this measures)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--shard-mib", type=int, default=4096, help="max teacher shard size")
    ap.add_argument("--small", action="store_true", help="quick self-check: hidden 1024, 64 experts top-4, I 512, "
                    "vocab 16000, 8 x 128 heads, 128 tokens (a 0.2 GB layer, 1.7 GB teacher at 8 layers)")
    ap.add_argument("--root", default=None, help="where the temp dir goes (default: the system temp dir)")
    ap.add_argument("--child", choices=["import", "calibrate"], help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    if a.small:
        a.hidden, a.experts, a.top_k, a.moe_intermediate, a.vocab = 1024, 64, 4, 512, 16000
        a.heads, a.kv_heads, a.head_dim, a.shard_mib, a.tokens, a.seq_len = 8, 2, 128, 512, 128, 64
    check_layout_naming()
    root = Path(tempfile.mkdtemp(prefix="moe2dense-offload-bench-", dir=a.root))
    base = run_child("import", a)["vmhwm_kib"] * 1024
    results = []
    try:
        for n in sorted(a.layers):
            cfg = teacher_config(argparse.Namespace(**{**vars(a), "layers": n}))
            teacher = root / f"teacher-{n}"
            need, free = sum(2 * _numel(s) for _, s in disk_layout(cfg)), shutil.disk_usage(root).free
            if need * 1.1 > free:
                raise SystemExit(f"{n}-layer teacher needs {need / GB:.1f} GB of disk, {root} has {free / GB:.1f} GB "
                                 "free: pass --root elsewhere or fewer --layers")
            start = time.perf_counter()
            write_teacher(cfg, teacher, a.shard_mib * 2**20)
            with CheckpointReader(teacher) as r:
                _, layer_bytes = largest_layer(r)
                embed = r.nbytes("model.embed_tokens.weight")
                total = sum(r.nbytes(k) for k in r.keys())
            wrote = time.perf_counter() - start
            res = run_child("calibrate", a, teacher=teacher)
            shutil.rmtree(teacher)  # one teacher on disk at a time
            results.append({"layers": n, "teacher_gb": total / GB, "layer_gb": layer_bytes / GB,
                            "embed_gb": embed / GB, "peak_gb": res["vmhwm_kib"] * 1024 / GB,
                            "seconds": res["seconds"], "write_s": wrote})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nlayer-by-layer calibration (bf16, CPU, {a.tokens} tokens, do_acp passes); hidden {a.hidden}, "
          f"{a.experts} experts top-{a.top_k}, I {a.moe_intermediate}, vocab {a.vocab}; import baseline "
          f"{base / GB:.2f} GB")
    print(f"{'layers':>6} {'teacher GB':>10} {'layer GB':>8} {'embed GB':>8} {'peak GB':>8} {'budget GB':>9} "
          f"{'peak/budget':>11} {'net/budget':>10} {'calib s':>7}")
    bounded = True
    for r in results:
        budget = 2.5 * (r["layer_gb"] + r["embed_gb"])
        gross, net = r["peak_gb"] / budget, (r["peak_gb"] - base / GB) / budget
        bounded &= gross <= 1.0
        print(f"{r['layers']:>6} {r['teacher_gb']:>10.2f} {r['layer_gb']:>8.3f} {r['embed_gb']:>8.3f} "
              f"{r['peak_gb']:>8.2f} {budget:>9.2f} {gross:>11.2f} {net:>10.2f} {r['seconds']:>7.1f}")
    flat = results[-1]["peak_gb"] / results[0]["peak_gb"]
    print(f"(1) peak {results[-1]['layers']} layers / peak {results[0]['layers']} layers = {flat:.3f} (<= 1.15): "
          f"{'PASS' if flat <= 1.15 else 'FAIL'}")
    print(f"(2) peak <= 2.5 x (one decoder layer + one embedding matrix): "
          f"{'not judged (--small)' if a.small else 'PASS' if bounded else 'FAIL'}")
    ok = flat <= 1.15 and (bounded or a.small)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
