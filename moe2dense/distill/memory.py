"""The distillation memory plan: what one worker's device holds, computed before any worker starts and without
reading a weight (the student is built on the meta device from its config; the teacher's size comes from its
safetensors headers), logged as one table, and an error naming the params to change when a GPU cannot hold it.

Per device, in bytes:
- student: fp32 weights (4 per parameter), fp32 grads (4 per trained parameter) and AdamW's two fp32 moments (8 per
  trained parameter); FSDP divides all three by the workers. DDP (more than one worker) adds its gradient buckets
  (another 4 per trained parameter: Ray's prepare_model keeps DDP's default, buckets separate from the grads).
- teacher: its weights in the device dtype (bf16 on CUDA, fp32 on CPU); none with cached logits; divided by the
  workers when the plan shards it (FSDP, forward only), which it does only when a replicated one does not fit.
- activations of one micro-batch: the Korthikanti et al. (2022) estimate for a transformer layer without stored
  attention scores (flash / SDPA attention): 34 bytes per token and hidden unit in 16-bit activations, i.e. 17
  elements (CUDA autocast: 2-byte elements; CPU: fp32, 4 bytes). Activation checkpointing keeps only each layer's
  input (1 element) plus one layer recomputed at a time. The online teacher (no grad) holds one layer's
  activations and its final hidden states.
- the chunked loss: chunk_tokens x vocab fp32 logits of the student and of the teacher (x 4 bytes x 2).
A GPU is considered able to hold the plan when it fits `USABLE` of its memory (the rest: CUDA context, allocator
fragmentation, what the estimate leaves out).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moe2dense.markdown import render

log = logging.getLogger(__name__)
GIB = 2**30
ACT_ELEMENTS = 17  # elements stored per token, hidden unit and layer for backward (34 bytes at 16 bits)
USABLE = 0.9  # share of a GPU's memory the plan may fill


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model."""

    params: int  # all parameters (tied ones once)
    trained: int  # parameters with requires_grad
    layers: int
    hidden: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    """How the run is laid out on its workers."""

    workers: int
    cuda: bool
    strategy: str  # ddp | fsdp
    micro_tokens: int  # tokens of one micro-batch on one worker
    chunk_tokens: int
    activation_checkpointing: bool
    teacher_cached: bool


@dataclass(frozen=True)
class MemoryPlan:
    rows: tuple[tuple[str, int, str], ...]  # (component, bytes per device, how it is counted)
    shard_teacher: bool
    trained_params: int

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def table(self) -> str:
        rows = [(name, f"{b / GIB:.3f}", how) for name, b, how in self.rows]
        return render(["per device", "GiB", "how"], [*rows, ("total", f"{self.total / GIB:.3f}", "")], "lrl")


def _rows(student: ModelShape, teacher_bytes: int, teacher: ModelShape | None, s: Setup,
          shard_teacher: bool) -> list[tuple[str, int, str]]:
    fsdp = s.strategy == "fsdp" and s.workers > 1
    div = s.workers if fsdp else 1
    split = f" / {s.workers} workers (fsdp)" if fsdp else ""
    rows = [("student weights", 4 * student.params // div, f"{student.params:,} params x 4 B fp32{split}"),
            ("student grads", 4 * student.trained // div, f"{student.trained:,} trained x 4 B{split}"),
            ("AdamW state", 8 * student.trained // div, f"{student.trained:,} trained x 8 B{split}")]
    if s.strategy == "ddp" and s.workers > 1:
        rows.append(("DDP gradient buckets", 4 * student.trained, f"{student.trained:,} trained x 4 B"))
    elem = 2 if s.cuda else 4
    dtype = "bf16" if s.cuda else "fp32"
    if teacher is not None and not s.teacher_cached:
        tdiv = s.workers if shard_teacher else 1
        rows.append(("teacher weights", teacher_bytes // tdiv,
                     f"in {dtype}" + (f" / {s.workers} workers (fsdp)" if shard_teacher else ", replicated")))
        rows.append(("teacher forward", s.micro_tokens * teacher.hidden * (ACT_ELEMENTS + 1) * elem,
                     f"{s.micro_tokens} tokens x {teacher.hidden} hidden x ({ACT_ELEMENTS} + 1) x {elem} B, "
                     "one layer + final hidden"))
    per_layer = s.micro_tokens * student.hidden * elem
    if s.activation_checkpointing:
        rows.append(("activations", per_layer * (student.layers + ACT_ELEMENTS),
                     f"{s.micro_tokens} tokens x {student.hidden} hidden x {elem} B x ({student.layers} layer "
                     f"inputs + {ACT_ELEMENTS}, checkpointed)"))
    else:
        rows.append(("activations", per_layer * student.layers * ACT_ELEMENTS,
                     f"{s.micro_tokens} tokens x {student.hidden} hidden x {elem} B x {student.layers} layers x "
                     f"{ACT_ELEMENTS}"))
    chunk = min(s.chunk_tokens, s.micro_tokens)
    rows.append(("loss chunk", chunk * student.vocab * 4 * 2, f"{chunk} tokens x {student.vocab} vocab x 4 B x 2"))
    return rows


def plan(student: ModelShape, teacher: ModelShape | None, teacher_bytes: int, s: Setup,
         capacity: int | None) -> MemoryPlan:
    """The per-device plan; the teacher is sharded over the workers only when a GPU of `capacity` bytes cannot
    hold it replicated and more than one worker can share it."""
    rows = _rows(student, teacher_bytes, teacher, s, shard_teacher=False)
    shard = (capacity is not None and teacher is not None and not s.teacher_cached and s.workers > 1
             and sum(b for _, b, _ in rows) > USABLE * capacity)
    if shard:
        rows = _rows(student, teacher_bytes, teacher, s, shard_teacher=True)
    return MemoryPlan(tuple(rows), shard, student.trained)


# What to change when the plan does not fit, each offered only where it would help.
REMEDIES: tuple[tuple[str, object], ...] = (
    ("lower distill.batch_size or raise distill.grad_accum", lambda s: s.micro_tokens > 1),
    ("set distill.activation_checkpointing: true", lambda s: not s.activation_checkpointing),
    ("set distill.strategy: fsdp", lambda s: s.strategy != "fsdp"),
    ("set distill.teacher_logits: cached", lambda s: not s.teacher_cached),
    ("raise distill.workers (more GPUs)", lambda s: True),
)


def check(p: MemoryPlan, s: Setup, capacity: int | None, device_name: str = "GPU") -> None:
    """Log the plan; raise (one line, the params to change) when a GPU of `capacity` bytes cannot hold it. CPU
    workers: a warning when the host's available RAM is below the plan times the workers (they share it)."""
    log.info("distill memory plan per %s worker:\n%s", "GPU" if s.cuda else "CPU", p.table())
    if s.cuda and capacity is not None and p.total > USABLE * capacity:
        fixes = "; ".join(text for text, helps in REMEDIES if helps(s))
        raise ValueError(f"distill memory plan: {p.total / GIB:.1f} GiB per device does not fit {USABLE:.0%} of "
                         f"the {capacity / GIB:.1f} GiB of {device_name}; {fixes}")
    if not s.cuda:
        import psutil

        available = psutil.virtual_memory().available
        if p.total * s.workers > available:
            log.warning("distill memory plan: %d CPU workers x %.1f GiB exceed the %.1f GiB of RAM available",
                        s.workers, p.total / GIB, available / GIB)


def student_shape(student_dir: str | Path, freeze: list[str]) -> ModelShape:
    """The student built on the meta device from its config (no weight read), with distill.freeze applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe2dense.distill.loop import freeze as apply_freeze

    config = AutoConfig.from_pretrained(str(student_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    apply_freeze(model, freeze)
    return ModelShape(params=sum(x.numel() for x in model.parameters()),
                      trained=sum(x.numel() for x in model.parameters() if x.requires_grad),
                      layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size)


def teacher_shape(teacher_dir: str | Path, dtype: torch.dtype) -> tuple[ModelShape, int]:
    """(shape, bytes of its floating-point weights in `dtype`) from the config and the safetensors headers."""
    import math

    from transformers import AutoConfig

    from moe2dense.checkpoint import CheckpointReader

    config = AutoConfig.from_pretrained(str(teacher_dir), local_files_only=True)
    with CheckpointReader(teacher_dir) as reader:
        sizes = [(math.prod(reader.shape(k)), reader.dtype(k)) for k in reader.keys()]
    params = sum(n for n, _ in sizes)
    nbytes = sum(n * (dtype.itemsize if d.is_floating_point else d.itemsize) for n, d in sizes)
    return ModelShape(params, 0, config.num_hidden_layers, config.hidden_size, config.vocab_size), nbytes


def gpu_memory() -> tuple[int, str] | None:
    """(bytes, name) of the smallest local CUDA device, or None when the driver sees none (a remote cluster's GPUs
    are not visible here: the plan is then logged only)."""
    if not torch.cuda.is_available():
        return None
    props = min((torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())),
                key=lambda d: d.total_memory)
    return props.total_memory, props.name


# bf16 dense peak FLOP/s by device name (vendor datasheets; first match wins, so the PCIe H100 comes before "H100").
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 dense peak, or None (CPU, or a GPU not in PEAK_BF16)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def mfu(trained_params: int, tokens_per_s: float, peak: float | None, workers: int) -> float | None:
    """Model FLOPs utilisation: 6 x trained params x tokens/s (forward + backward of the student only; the
    teacher's forward is not counted) over the peak of all workers' devices."""
    return None if peak is None else round(6 * trained_params * tokens_per_s / (peak * workers), 4)
