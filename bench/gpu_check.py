"""One-command check of the GPU paths, on one GPU in at most 8 minutes; `--dry-run` runs the same code on the CPU
with tiny shapes and gloo instead of NCCL (seconds; tests/test_gpu_check.py runs it in `make test`).

    python bench/gpu_check.py             # a machine with a GPU: real-ish widths, bf16, NCCL
    python bench/gpu_check.py --dry-run   # anywhere

A random-weight Qwen3-MoE teacher (full: hidden 2048, 64 experts top-8 of width 768, 4 layers, vocab 151,936) and a
dense student of its widths are built here and saved to a temp dir; then, one after the other:
  calibrate whole     moe2dense.calibrate.capture on the whole teacher in bf16, all three passes (routing, routed and
                      all-experts outputs), written to a temp dir
  distill fsdp        moe2dense.distill.loop.train_step (Objective + chunked loss, bf16 autocast) with the student
                      under FSDP (fully_shard), activation checkpointing on and the teacher FSDP-sharded
                      (loop.load_sharded_teacher), in a 1-process NCCL group
  distill ddp         the same with the student under DDP and a replicated teacher
  teacher_logits      moe2dense.distill.cache.write_cached_logits with the teacher in bf16 on the device
  lm-eval             moe2dense.evaluate.runner (load_model, load_tasks, evaluate_model) on generated demo tasks
Each prints tokens/s, MFU (distill: 6 x trained params x tokens/s; forward-only checks: 2 x the teacher's active
params per token x tokens/s; over the device's bf16 peak, moe2dense.distill.memory.PEAK_BF16) and the peak device
memory (torch.cuda.max_memory_allocated; the distill checks also the memory plan's estimate). The last table says
PASS/FAIL per check; the exit status is 1 when any failed or the run took longer than its budget.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe2dense.checks import set_offline_env  # noqa: E402
from moe2dense.markdown import render  # noqa: E402

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    experts: int
    top_k: int
    moe_intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    batch: int  # sequences per distill step and per teacher_logits / calibration batch
    calib_batches: int
    steps: int  # timed distill steps (after one warm-up step)
    budget_s: float


SHAPES = {
    "full": Shape(hidden=2048, layers=4, experts=64, top_k=8, moe_intermediate=768, vocab=151936, heads=32,
                  kv_heads=4, head_dim=128, seq_len=1024, batch=8, calib_batches=4, steps=5, budget_s=480),
    "dry": Shape(hidden=32, layers=2, experts=8, top_k=2, moe_intermediate=16, vocab=320, heads=4, kv_heads=2,
                 head_dim=8, seq_len=32, batch=4, calib_batches=2, steps=2, budget_s=60),
}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


@dataclass
class Result:
    check: str
    ok: bool
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    plan_gib: float | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class Env:
    """What the checks share: the device, the shapes, the saved teacher and student, the token rows."""

    device: torch.device
    shape: Shape
    root: Path
    teacher_dir: Path
    student_dir: Path
    rows: np.ndarray  # [n, seq_len] int32
    peak: float | None  # the device's bf16 peak FLOP/s

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _teacher_config(s: Shape):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=4 * s.hidden,
                          moe_intermediate_size=s.moe_intermediate, num_hidden_layers=s.layers,
                          num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                          num_experts=s.experts, num_experts_per_tok=s.top_k, norm_topk_prob=True,
                          max_position_embeddings=max(512, s.seq_len), tie_word_embeddings=False,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _student_config(s: Shape):
    """Dense, of the teacher's widths, its MLP as wide as the k routed experts a token sees (an M2D student)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.top_k * s.moe_intermediate,
                       num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                       head_dim=s.head_dim, max_position_embeddings=max(512, s.seq_len), tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _docs():
    import polars as pl

    rng = np.random.default_rng(0)
    return pl.DataFrame([{"doc_id": f"{d}-{i}", "domain": d, "text": " ".join(rng.choice(WORDS, 80)), "hash": f"{d}{i}"}
                         for d in ("code", "prose") for i in range(5)])


def build_env(device: torch.device, s: Shape, root: Path) -> Env:
    """Random-weight teacher (bf16 on CUDA) and student (fp32) saved under `root`, with a tokenizer; token rows."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    from moe2dense.data.tokenizer import train_bpe

    teacher_dir, student_dir = root / "teacher", root / "student"
    tok = train_bpe(_docs()["text"].to_list(), vocab_size=300, min_frequency=1, out_dir=teacher_dir)
    tok.save_pretrained(str(student_dir))
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds on a GPU for ~2B parameters
        teacher = Qwen3MoeForCausalLM(_teacher_config(s))
        if device.type == "cuda":
            teacher.to(torch.bfloat16)  # the dtype real teachers ship in
        teacher.save_pretrained(teacher_dir)
        del teacher
        Qwen3ForCausalLM(_student_config(s)).save_pretrained(student_dir)
    rows = np.random.default_rng(0).integers(2, min(s.vocab, 300), (4 * s.batch * (s.steps + 1), s.seq_len),
                                             dtype=np.int32)
    from moe2dense.distill.memory import peak_flops

    return Env(device, s, root, teacher_dir, student_dir, rows, peak_flops(device))


def _load_teacher(env: Env):
    from moe2dense.teacher.load import load_frozen, run_dtype

    return load_frozen(env.teacher_dir, run_dtype(env.device), env.device)


def _active_params(model) -> int:
    """Parameters one token's forward multiplies with: all but the experts, plus top_k / E of the experts."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts


def _forward_mfu(env: Env, model, tokens_per_s: float) -> float | None:
    return None if env.peak is None else round(2 * _active_params(model) * tokens_per_s / env.peak, 4)


# ---------------------------------------------------------------- the checks
def check_calibrate_whole(env: Env) -> Result:
    from moe2dense.calibrate.capture import capture

    model = _load_teacher(env)
    s, rng = env.shape, np.random.default_rng(1)
    batches = [(rng.integers(2, 300, (s.batch, s.seq_len)), ["web"] * s.batch) for _ in range(s.calib_batches)]
    env.sync()
    start = time.perf_counter()
    stats = capture(model, batches, env.root / "calibration", needs={"routing", "routed_outputs", "all_outputs"},
                    progress=False)
    env.sync()
    WHOLE_STATS.update(stats)  # the layer-by-layer check compares its statistics with these
    seconds = time.perf_counter() - start
    tokens = s.calib_batches * s.batch * s.seq_len
    if sorted(stats) != list(range(s.layers)) or not (env.root / "calibration").is_dir():
        raise AssertionError(f"capture returned layers {sorted(stats)}, expected {s.layers}")
    return Result("calibrate whole", True, tokens / seconds, _forward_mfu(env, model, tokens / seconds),
                  note=f"{tokens:,} tokens, all passes")


WHOLE_STATS: dict = {}  # layer -> LayerStats of "calibrate whole"


def check_calibrate_layerwise(env: Env) -> Result:
    """calibrate.offload: layer on the same checkpoint and tokens (only the embeddings and one decoder layer on the
    device at a time): its statistics must match the whole-model pass's (bf16 kernels may differ in the last bits;
    selection counts may move by a tie or two)."""
    from moe2dense.calibrate.capture import capture_layerwise
    from moe2dense.teacher.load import run_dtype

    s, rng = env.shape, np.random.default_rng(1)  # the same batches as check_calibrate_whole
    batches = [(rng.integers(2, 300, (s.batch, s.seq_len)), ["web"] * s.batch) for _ in range(s.calib_batches)]
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    env.sync()
    start = time.perf_counter()
    stats = capture_layerwise(env.teacher_dir, batches, env.root / "calibration_layer", dtype=run_dtype(env.device),
                              device=env.device, needs={"routing", "routed_outputs", "all_outputs"}, progress=False)
    env.sync()
    seconds = time.perf_counter() - start
    tokens = s.calib_batches * s.batch * s.seq_len
    if sorted(stats) != sorted(WHOLE_STATS):
        raise AssertionError(f"layer mode captured layers {sorted(stats)}, the whole model {sorted(WHOLE_STATS)}")
    for layer, got in stats.items():
        want = WHOLE_STATS[layer]
        moved = (got.count.double() - want.count.double()).abs().sum().item() / max(1.0, want.count.sum().item())
        if moved > 0.01:
            raise AssertionError(f"layer {layer}: {moved:.1%} of the expert selections differ from the whole model")
        for field in ("prob_sum", "weight_sum", "norm_sum_all", "gram"):
            a, b = getattr(got, field), getattr(want, field)
            if a is not None and not torch.allclose(a.double(), b.double(), rtol=5e-2,
                                                    atol=1e-3 * b.abs().max().item()):
                raise AssertionError(f"layer {layer}: {field} differs from the whole model's")
    return Result("calibrate layer", True, tokens / seconds, note=f"{tokens:,} tokens, all passes, equal to whole")


def layerwise_calibration_checks() -> list[tuple[str, Callable[[Env], Result]]]:
    return [("calibrate layer", check_calibrate_layerwise)]


def _distill_worker(env: Env, strategy: str):
    """A loop.Worker as build_worker makes it, without Ray: the same Objective, optimizer and schedule, wrapped by
    FSDP2 (fully_shard per decoder layer, then the objective) or DDP in this process's 1-rank group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    from moe2dense import lm_head
    from moe2dense.distill.loop import Objective, Worker, load_sharded_teacher
    from moe2dense.training import warmup_cosine_lr

    s = env.shape
    cfg = {"loss": "forward_kl", "loss_options": {}, "temperature": 1.0, "ce_weight": 0.0, "chunk_tokens": 1024,
           "accum": 1, "global_batch": s.batch, "seed": 0, "grad_clip": 1.0, "steps": s.steps + 1}
    fsdp = strategy == "fsdp"
    if fsdp:  # sharded as build_worker shards a teacher that does not fit: loaded on the host, layers moved over
        from moe2dense.teacher.load import load_frozen

        dtype = torch.bfloat16 if env.cuda else torch.float32
        teacher = load_sharded_teacher(lambda: load_frozen(env.teacher_dir, dtype, torch.device("cpu")), env.device)
    else:
        teacher = _load_teacher(env)
    student = AutoModelForCausalLM.from_pretrained(env.student_dir, dtype=torch.float32, local_files_only=True)
    if fsdp:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.to(env.device).train()
    objective = Objective(student, cfg)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (dist.get_world_size(),))
        for layer in lm_head.decoder(student).layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(objective, mesh=mesh)
    else:
        objective = DistributedDataParallel(objective, device_ids=[env.device.index] if env.cuda else None)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: warmup_cosine_lr(i, cfg["steps"], 1, 0.1))
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)  # DTensors count their global size
    return Worker(cfg, 0, 1, env.device, teacher, None, objective, params, optimizer, scheduler, None), trained


def _plan(env: Env, strategy: str, checkpointing: bool) -> float:
    """The memory plan's total (GiB) for this check's run: 1 worker, so the teacher counts whole."""
    from moe2dense.distill import memory as M

    s = env.shape
    setup = M.Setup(workers=1, cuda=env.cuda, strategy=strategy, micro_tokens=s.batch * s.seq_len,
                    chunk_tokens=1024, activation_checkpointing=checkpointing, teacher_cached=False)
    teacher, nbytes = M.teacher_shape(env.teacher_dir, torch.bfloat16 if env.cuda else torch.float32)
    p = M.plan(M.student_shape(env.student_dir, []), teacher, nbytes, setup, capacity=None)
    return p.total / GIB


def _distill(env: Env, strategy: str) -> Result:
    import math

    from moe2dense.distill.loop import train_step
    from moe2dense.distill.memory import mfu

    w, trained = _distill_worker(env, strategy)
    s = env.shape
    losses = [train_step(w, env.rows, 0)]  # warm-up: kernel selection, lazy FSDP init
    env.sync()
    start = time.perf_counter()
    for step in range(1, s.steps + 1):
        losses.append(train_step(w, env.rows, step))
    env.sync()
    seconds = time.perf_counter() - start
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    tokens_per_s = s.steps * s.batch * s.seq_len / seconds
    fsdp = strategy == "fsdp"
    return Result(f"distill {strategy}", True, tokens_per_s, mfu(trained, tokens_per_s, env.peak, 1),
                  plan_gib=_plan(env, strategy, checkpointing=fsdp),
                  note=f"{s.steps} steps x {s.batch}x{s.seq_len}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                       + (", act. checkpointing, sharded teacher" if fsdp else ""))


def check_distill_fsdp(env: Env) -> Result:
    return _distill(env, "fsdp")


def check_distill_ddp(env: Env) -> Result:
    return _distill(env, "ddp")


def check_teacher_logits(env: Env) -> Result:
    import pyarrow.parquet as pq

    from moe2dense.distill.cache import write_cached_logits

    model = _load_teacher(env)
    s = env.shape
    row_ids = np.arange(2 * s.batch)
    env.sync()
    start = time.perf_counter()
    path = write_cached_logits(model, env.rows, row_ids, env.root / "teacher_logits", top_n=64, temperature=1.0,
                               batch_rows=s.batch, progress=False)
    env.sync()
    seconds = time.perf_counter() - start
    table = pq.read_table(path)
    logp = table.column("logprobs").combine_chunks().flatten().to_numpy()
    if table.num_rows != len(row_ids) or not (np.isfinite(logp).all() and (logp <= 0).all()):
        raise AssertionError(f"{path}: {table.num_rows} rows (expected {len(row_ids)}) or invalid log-probs")
    tokens = len(row_ids) * s.seq_len
    return Result("teacher_logits", True, tokens / seconds, _forward_mfu(env, model, tokens / seconds),
                  note=f"{tokens:,} tokens, top 64")


def check_lm_eval(env: Env) -> Result:
    from moe2dense.evaluate.runner import evaluate_model, load_model, load_tasks
    from moe2dense.evaluate.tasks import build_demo_tasks
    from moe2dense.params import ContinuationParams, EvaluateParams

    _docs().write_parquet(env.root / "eval.parquet")
    tasks_dir = env.root / "eval_tasks"
    tasks_dir.mkdir()
    build_demo_tasks(env.root / "eval.parquet", tasks_dir, ContinuationParams(
        items_per_domain=4, distractors=3, context_chars=80, continuation_words=4), seed=0)
    p = EvaluateParams(tasks=["demo"], batch_size=4, max_length=256, device=env.device.type)
    tasks = load_tasks(p, tasks_dir)
    try:
        model, tok = load_model(env.teacher_dir, p)
        start = time.perf_counter()
        result = evaluate_model(model, tok, tasks, p)
        env.sync()
        seconds = time.perf_counter() - start
    finally:
        tasks.close()
    bpb = [result[t]["bits_per_byte"] for t in ("demo_ppl_code", "demo_ppl_prose")]
    if not all(np.isfinite(bpb)) or "acc" not in result["demo_continuation"]:
        raise AssertionError(f"lm-eval result incomplete: {result}")
    return Result("lm-eval", True, note=f"{len(tasks.names)} demo tasks in {seconds:.1f} s, "
                                        f"{result['size']['dtype']}, bpb {bpb[0]:.2f}")


CHECKS: list[tuple[str, Callable[[Env], Result]]] = [
    ("calibrate whole", check_calibrate_whole),
    *layerwise_calibration_checks(),
    ("distill fsdp", check_distill_fsdp),
    ("distill ddp", check_distill_ddp),
    ("teacher_logits", check_teacher_logits),
    ("lm-eval", check_lm_eval),
]


def run_check(env: Env, name: str, fn: Callable[[Env], Result]) -> Result:
    """One check, its peak device memory and wall time; an exception makes it a FAIL with its first line."""
    if env.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    start = time.perf_counter()
    try:
        r = fn(env)
    except Exception as err:  # noqa: BLE001  (every failure is reported, the other checks still run)
        traceback.print_exc()
        r = Result(name, False, note=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    r.seconds = time.perf_counter() - start
    if env.cuda:
        r.peak_gib = torch.cuda.max_memory_allocated(env.device) / GIB
    print(f"{'PASS' if r.ok else 'FAIL'} {name} ({r.seconds:.1f} s)", flush=True)
    return r


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(results: list[Result], device_name: str) -> str:
    rows = [(r.check, "PASS" if r.ok else "FAIL", _fmt(r.tokens_per_s, ",.0f"), _fmt(r.mfu, ".3f"),
             _fmt(r.peak_gib, ".2f"), _fmt(r.plan_gib, ".2f"), f"{r.seconds:.1f}", r.note) for r in results]
    return (f"device: {device_name}\n\n"
            + render(["check", "status", "tokens/s", "MFU", "peak GiB", "plan GiB", "s", "note"], rows, "llrrrrrl"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, gloo instead of NCCL")
    a = ap.parse_args(argv)
    set_offline_env()
    import datasets
    import torch.distributed as dist
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-load bars would bury the per-check lines
    datasets.disable_progress_bars()

    if a.dry_run:
        device, backend, shape = torch.device("cpu"), "gloo", SHAPES["dry"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a machine with a GPU, or pass --dry-run", file=sys.stderr)
            return 2
        device, backend, shape = torch.device("cuda", 0), "nccl", SHAPES["full"]
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe2dense-gpucheck-") as tmp:
        root = Path(tmp)
        dist.init_process_group(backend, store=dist.FileStore(str(root / "store"), 1), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        try:
            setup = run_check_env(device, shape, root)
            results = [setup[1]] if setup[0] is None else [setup[1]] + [run_check(setup[0], n, f) for n, f in CHECKS]
        finally:
            dist.destroy_process_group()
    total = time.perf_counter() - start
    results.append(Result("time budget", total <= shape.budget_s, seconds=total,
                          note=f"whole run {total:.0f} s of at most {shape.budget_s:.0f} s"))
    print("\n" + report(results, device_name), flush=True)
    return 0 if all(r.ok for r in results) else 1


def run_check_env(device: torch.device, shape: Shape, root: Path) -> tuple[Env | None, Result]:
    """Build the models (itself a check: a failure here fails the run with the reason)."""
    start = time.perf_counter()
    try:
        env = build_env(device, shape, root)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return None, Result("build models", False, seconds=time.perf_counter() - start,
                            note=f"{type(err).__name__}: {str(err).splitlines()[0]}")
    s = shape
    return env, Result("build models", True, seconds=time.perf_counter() - start,
                       note=f"teacher Qwen3-MoE h{s.hidden} E{s.experts} k{s.top_k} L{s.layers} V{s.vocab}; "
                            f"dense student I{s.top_k * s.moe_intermediate}")


if __name__ == "__main__":
    sys.exit(main())
