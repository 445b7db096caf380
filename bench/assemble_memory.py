"""Assembly memory and time benchmark on a synthetic multi-shard Qwen3-MoE teacher (issue 4).

The teacher checkpoint is streamed to disk tensor by tensor (random bf16, never a model in memory) with the names
and shapes `Qwen3MoeForCausalLM.save_pretrained` writes: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`,
router `mlp.gate.weight`, attention q/k/v/o + q_norm/k_norm, norms, embed_tokens, untied lm_head. The naming is
checked each run against a tiny real model's `save_pretrained`. Two plans are assembled: pure pruning (K = k = top-k,
one expert per group, scale m/k) and grouping (K = 2k -> k, two experts per group merged 0.5/0.5, no alignment).

Budgets:
  (1) peak RSS of `assemble` <= 1.5 x (student bytes + largest teacher layer bytes), the teacher >= 4x the student.
      Each assembly runs in a fresh child process that reports its own VmHWM (/proc/self/status: the peak RSS of
      that process image; ru_maxrss can carry the parent's peak across fork/vfork + exec). A child that only does
      the same imports gives the import baseline: the ratio net of it is printed for information.
  (2) assembly wall time <= 2 x (read every teacher tensor once with CheckpointReader.read + write a student-sized
      set of tensors once with ShardedWriter). Timed in this process, alternating baseline / pure / grouping over
      --reps repetitions; medians and per-repetition paired ratios. The teacher was just written and synced, so every
      timed step reads it from the page cache (24 GiB RAM holds it); each step's output is deleted and synced
      before the next step, so all start from the same cache state.

    python bench/assemble_memory.py            # teacher 3.65 GB, student 0.83 GB, 7 repetitions (~2-3 min)
    python bench/assemble_memory.py --small    # quick self-check (0.23 GB teacher, ~30 s)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers  # noqa: F401  (the children import exactly this module's imports)
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig

from moe2dense.assemble import assemble
from moe2dense.checkpoint import CheckpointReader, ShardedWriter
from moe2dense.plan import ConversionPlan, read_plan

GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------- the synthetic teacher
def teacher_config(a) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
        moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, head_dim=a.head_dim, num_experts=a.experts, num_experts_per_tok=a.top_k,
        norm_topk_prob=True, tie_word_embeddings=False, dtype="bfloat16")


def disk_layout(config: Qwen3MoeConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor save_pretrained writes, from the meta-device state dict: the fused in-memory
    experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)) become per-expert gate/up (I, H) and down (H, I)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = []
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            E, two_i, H = shape
            for e in range(E):
                out += [(f"{base}{e}.gate_proj.weight", (two_i // 2, H)), (f"{base}{e}.up_proj.weight", (two_i // 2, H))]
        elif name.endswith(".mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            E, H, I = shape
            out += [(f"{base}{e}.down_proj.weight", (H, I)) for e in range(E)]
        else:
            out.append((name, shape))
    return out


def check_layout_naming() -> None:
    """disk_layout must name and shape tensors exactly as a real tiny model's save_pretrained does."""
    tiny = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(tiny, dtype=torch.bfloat16).save_pretrained(d)
        with CheckpointReader(d) as r:
            real = {n: r.shape(n) for n in r.keys()}
    mine = dict(disk_layout(tiny))
    if real != mine:
        raise AssertionError(f"synthetic layout differs from save_pretrained: only real {sorted(set(real) - set(mine))}"
                             f", only synthetic {sorted(set(mine) - set(real))}, shapes "
                             f"{[n for n in real.keys() & mine.keys() if real[n] != mine[n]]}")


def write_teacher(config: Qwen3MoeConfig, out: Path, shard_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    layout = disk_layout(config)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    plan = [(n, s, torch.bfloat16) for n, s in layout]
    with ShardedWriter(out, plan, max_shard_bytes=shard_bytes) as writer:
        for name, shape in layout:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            writer.write(name, t)
    return layout


def largest_layer(reader: CheckpointReader) -> tuple[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    for n in reader.keys():
        parts = n.split(".")
        key = f"model.layers.{parts[2]}" if n.startswith("model.layers.") else n
        sizes[key] += reader.nbytes(n)
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


# --------------------------------------------------------------------------------------------------------- the plans
def make_plan(config: Qwen3MoeConfig, K: int, k: int, seed: int = 0) -> dict:
    """K experts per layer (a random subset, best first), merged pairwise in order into k groups, scale m/k, m = 1
    (norm_topk_prob renormalises the top-k weights to sum to 1)."""
    E, L, per = config.num_experts, config.num_hidden_layers, K // k
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in range(L):
        sel = torch.randperm(E, generator=g)[:K].tolist()
        groups = [sel[i * per:(i + 1) * per] for i in range(k)]
        layers[str(layer)] = {"routed_mass": 1.0, "shared": [],
                              "groups": [{"experts": grp, "weights": [1.0 / per] * per, "scale": 1.0 / k}
                                         for grp in groups]}
    pure = K == k
    return {"teacher": {"model_type": "qwen3_moe", "num_experts": E, "top_k": config.num_experts_per_tok,
                        "num_layers": L, "moe_layers": list(range(L)), "dense_layers": []},
            "score_method": "frequency", "merge_scores": "frequency", "experts_per_layer": K, "blocks_per_layer": k,
            "pure_pruning": pure, "group_method": None if pure else "synthetic_pairs", "align": False,
            "scaling": "uniform", "layers": layers}


# ------------------------------------------------------------------------------------------------------- the children
def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(a) -> None:
    """Runs in a fresh interpreter after this module's imports: nothing, or one assembly. Prints one JSON line."""
    seconds = 0.0
    if a.child == "assemble":
        plan = read_plan(a.plan)
        start = time.perf_counter()
        assemble(a.teacher, plan, a.out, max_shard_bytes=a.shard_bytes, progress=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"vmhwm_kib": vm_hwm_kib(), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "seconds": seconds}))


def run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- the timings
def io_baseline(teacher: Path, student_layout: list[tuple[str, tuple[int, ...], torch.dtype]], out: Path,
                shard_bytes: int, source: torch.Tensor) -> float:
    """Read every teacher tensor once (fresh tensors, discarded), write a student-shaped set once."""
    start = time.perf_counter()
    with CheckpointReader(teacher) as reader:
        for n in reader.keys():
            reader.read(n)
    with ShardedWriter(out, student_layout, max_shard_bytes=shard_bytes) as writer:
        for n, shape, dtype in student_layout:
            numel = 1
            for d in shape:
                numel *= d
            writer.write(n, source[:numel].view(shape))
    return time.perf_counter() - start


def timed_assemble(teacher: Path, plan: dict, out: Path, shard_bytes: int) -> float:
    start = time.perf_counter()
    assemble(teacher, ConversionPlan.model_validate(plan), out, max_shard_bytes=shard_bytes, progress=False)
    return time.perf_counter() - start


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mib", type=int, default=1024, help="max shard size, teacher and student")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="quick self-check: hidden 512, I 256, vocab 8000, 16 MiB "
                                                         "shards")
    ap.add_argument("--root", default=None, help="where the temp dir goes (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (teacher, plans, student)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    # internal: the child processes
    ap.add_argument("--child", choices=["import", "assemble"], help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        return child(a)
    if a.small:
        a.hidden, a.moe_intermediate, a.heads, a.kv_heads, a.head_dim, a.vocab, a.shard_mib = 512, 256, 4, 2, 128, 8000, 16
    shard_bytes = a.shard_mib * 2**20
    K_group = 2 * a.top_k
    if K_group > a.experts:
        raise SystemExit(f"grouping plan needs 2 x top-k = {K_group} <= experts = {a.experts}")

    transformers.utils.logging.disable_progress_bar()
    check_layout_naming()
    config = teacher_config(a)
    est = sum(2 * n for n in (torch.Size(s).numel() for _, s in disk_layout(config)))
    root = Path(tempfile.mkdtemp(prefix="assemble_memory_", dir=a.root))
    free = shutil.disk_usage(root).free
    if free < 3 * est:
        shutil.rmtree(root)
        raise SystemExit(f"{root}: {free / GB:.1f} GB free, need 3 x the teacher's {est / GB:.2f} GB")
    teacher, plans_dir = root / "teacher", root / "plans"
    plans_dir.mkdir()
    try:
        start = time.perf_counter()
        write_teacher(config, teacher, shard_bytes)
        os.sync()
        t_write = time.perf_counter() - start
        with CheckpointReader(teacher) as r:
            teacher_bytes = sum(r.nbytes(n) for n in r.keys())
            n_tensors = len(r.keys())
            n_shards = len({r.file_of(n) for n in r.keys()})
            big_name, big_bytes = largest_layer(r)
        plans = {"pure": make_plan(config, a.top_k, a.top_k), "grouping": make_plan(config, K_group, a.top_k)}
        for name, plan in plans.items():
            (plans_dir / f"{name}.json").write_text(json.dumps(plan))
        print(f"Qwen3-MoE teacher: hidden {a.hidden}, {a.layers} layers, E={a.experts}, top-{a.top_k}, "
              f"I={a.moe_intermediate}, heads {a.heads}/{a.kv_heads} x {a.head_dim}, vocab {a.vocab}, bf16, untied; "
              f"{teacher_bytes / GB:.3f} GB in {n_tensors} tensors, {n_shards} shards of <= {a.shard_mib} MiB "
              f"(written + synced in {t_write:.1f} s) under {root}")
        print(f"plans: pure pruning K=k={a.top_k} (one expert per group, scale 1/k); grouping K={K_group} -> "
              f"k={a.top_k} (pairs merged 0.5/0.5, align false); {torch.get_num_threads()} torch threads")

        # ---- (1) peak RSS, one fresh child per assembly
        base = run_child("import")
        rss = {}
        for name in plans:
            out = root / f"student_{name}"
            rss[name] = run_child("assemble", teacher=teacher, plan=plans_dir / f"{name}.json", out=out,
                                  shard_bytes=shard_bytes)
            if name == "pure":
                keep = out
            else:
                clear(out)
        student_bytes = dir_bytes(keep)
        with CheckpointReader(keep) as r:
            student_layout = [(n, r.shape(n), r.dtype(n)) for n in r.keys()]
            student_tensor_bytes = sum(r.nbytes(n) for n in r.keys())
            n_student_shards = len({r.file_of(n) for n in r.keys()})
        width = json.loads((keep / "config.json").read_text())["intermediate_size"]
        size_ratio = teacher_bytes / student_tensor_bytes
        mem_ref = student_tensor_bytes + big_bytes
        print(f"student: dense qwen3, width {width}, {student_tensor_bytes / GB:.3f} GB tensors "
              f"({student_bytes / GB:.3f} GB files, {n_student_shards} shard(s)); teacher / student = {size_ratio:.2f}x "
              f"{'(>= 4: OK)' if size_ratio >= 4 else '(< 4: too small a teacher for the budget, enlarge it)'}")
        print(f"largest teacher layer: {big_name} = {big_bytes / GB:.3f} GB; "
              f"reference student + largest layer = {mem_ref / GB:.3f} GB")
        base_b = base["vmhwm_kib"] * 1024
        print("\n(1) peak RSS (VmHWM of a fresh child; ru_maxrss in brackets):")
        print(f"  import-only baseline (torch, transformers, moe2dense.assemble) {base_b / GB:7.3f} GB "
              f"[{base['maxrss_kib'] * 1024 / GB:.3f}]")
        mem_ratio, net_ratio = {}, {}
        for name, r in rss.items():
            peak = r["vmhwm_kib"] * 1024
            mem_ratio[name] = peak / mem_ref
            net_ratio[name] = (peak - base_b) / mem_ref
            print(f"  assemble, {name:<8}  peak {peak / GB:7.3f} GB [{r['maxrss_kib'] * 1024 / GB:.3f}]  "
                  f"/ reference = {mem_ratio[name]:.3f}x   net of imports {(peak - base_b) / GB:.3f} GB = "
                  f"{net_ratio[name]:.3f}x   (child wall {r['seconds']:.1f} s)")

        # ---- (2) wall time, in this process, interleaved
        print(f"\n(2) wall time, {a.reps} interleaved repetitions in this process; the teacher is in the page cache "
              f"(written + synced just before), each step's output is deleted + synced before the next step")
        source = torch.randn(max(torch.Size(s).numel() for _, s, _ in student_layout)).to(torch.bfloat16)
        with torch.device("meta"):  # first-use costs (lazy modeling imports) stay out of the timings
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(keep))
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"baseline": [], "pure": [], "grouping": []}
        touched: dict[str, list[float]] = {m: [] for m in times}  # GB of fresh anonymous pages (minor faults)
        scratch = root / "timed_out"
        steps = {"baseline": lambda: io_baseline(teacher, student_layout, scratch, shard_bytes, source),
                 "pure": lambda: timed_assemble(teacher, plans["pure"], scratch, shard_bytes),
                 "grouping": lambda: timed_assemble(teacher, plans["grouping"], scratch, shard_bytes)}
        for _ in range(a.reps):
            for name, step in steps.items():
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times[name].append(step())
                touched[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) * PAGE / GB)
                clear(scratch)
        load_after = os.getloadavg()
        med = {m: statistics.median(t) for m, t in times.items()}
        time_ratio = {n: statistics.median(t / b for t, b in zip(times[n], times["baseline"]))
                      for n in ("pure", "grouping")}
        moved = (teacher_bytes + student_tensor_bytes) / GB
        print(f"  baseline: read teacher once + write student once   {med['baseline']:7.2f} s  "
              f"({moved / med['baseline']:.2f} GB/s over {moved:.2f} GB)")
        for n in ("pure", "grouping"):
            print(f"  assemble, {n:<8}                                {med[n]:7.2f} s  "
                  f"ratio {time_ratio[n]:.3f}x (per-repetition median)")
        print("  fresh memory first touched in this process (minor page faults, median GB): "
              + ", ".join(f"{m} {statistics.median(v):.2f}" for m, v in touched.items())
              + " (page-cache pages of the written files not included)")
        print("  per-repetition seconds: " + "; ".join(f"{m} " + ", ".join(f"{t:.2f}" for t in ts)
                                                    for m, ts in times.items()))
        print(f"  load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before, "
              f"{'/'.join(f'{x:.1f}' for x in load_after)} after, on {os.cpu_count()} CPUs (above ~0.5: other jobs "
              f"shared the cores)")
        malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        print(f"  glibc malloc environment: {malloc or 'default (large blocks are mmap-ed and unmapped on free)'}")

        ok = lambda v, b: "OK" if v <= b else "MISSED"  # noqa: E731
        print(f"\nsummary (teacher {teacher_bytes / GB:.2f} GB = {size_ratio:.2f}x the student's "
              f"{student_tensor_bytes / GB:.2f} GB; largest layer {big_bytes / GB:.3f} GB):")
        for n in ("pure", "grouping"):
            print(f"peak RSS / (student + largest layer), {n:<8} = {mem_ratio[n]:.3f}x   budget <= 1.5x  "
                  f"{ok(mem_ratio[n], 1.5)}   (net of imports {net_ratio[n]:.3f}x, information)")
        for n in ("pure", "grouping"):
            print(f"assembly / (read teacher + write student), {n:<8} = {time_ratio[n]:.3f}x   budget <= 2x  "
                  f"{ok(time_ratio[n], 2.0)}")
        if a.small:
            print("--small is a self-check of the bench: at this size the import baseline dominates the peak RSS, "
                  "so budget (1) means something only at the default size")
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
