"""Importance of a dense teacher's MLP neurons [L, I] and hidden channels [H]: the registry of `baselines.prune.
importance`, keyed by the method table (moe2dense/methods.py, kind "importance"). Adding one: a `Method` entry there
and one function here registered with `register_importance`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from moe2dense import methods as M
from moe2dense.baselines.prune import CHUNK_BYTES, DOWN_PROJ_MODULE, EMBED, HIDDEN_NORM_MODULE, MLP_WEIGHT
from moe2dense.checkpoint import DTYPES, CheckpointReader


@dataclass(frozen=True)
class ImportanceInputs:
    checkpoint: Path  # the dense teacher's weights
    calibration: Path | None = None  # packed Parquet rows (the methods with `calibrated`)
    max_tokens: int | None = None  # whole sequences up to this many tokens; None: all
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"  # of the forward; auto: as stored


@dataclass(frozen=True)
class Importance:
    mlp: torch.Tensor  # [L, I] float32
    hidden: torch.Tensor  # [H] float32
    tokens: int = 0  # calibration tokens read (0: from the weights alone)
    seconds: float = 0.0  # wall time of the capture


@dataclass(frozen=True)
class Importer:
    fn: Callable[[ImportanceInputs], Importance]
    calibrated: bool  # reads the calibration split (and runs the teacher)


IMPORTANCE: dict[str, Importer] = {}


def register_importance(name: str, calibrated: bool):
    M.get("importance", name)  # a name the table does not list fails at import

    def deco(fn):
        IMPORTANCE[name] = Importer(fn, calibrated)
        return fn

    return deco


# ------------------------------------------------------------------------------------------------------- minitron
def sequence_mean_sq(x: torch.Tensor, scratch: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """sum over the batch's sequences of (mean over the sequence of |x|)^2, [channels], fp32.

    Two kernels: |x| into a buffer from `scratch` (channel count -> flat buffer, kept across batches by the
    capture: a fresh activation-sized allocation each call page-faults on CPU), then a batched product with a row of
    1/T. A middle-axis reduction (vector_norm, sum(1)) costs as much as the down_proj matmul itself in bf16 on CPU,
    and per-sequence kernels multiply the parallel regions, which stall when the cores are shared. In bf16/fp16 each
    sequence's mean is rounded to the model's dtype (relative 2^-8 in bf16), then squared and summed in fp32; the
    1/T row (not a sum) keeps fp16 from overflowing on long sequences."""
    B, T = x.shape[:2]
    x = x.reshape(B, T, -1)
    scratch = {} if scratch is None else scratch
    buf = scratch.get(x.shape[2])
    if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype:
        buf = scratch[x.shape[2]] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
    absx = torch.abs(x, out=buf[:x.numel()].view(x.shape))
    mean = torch.full((1, 1, T), 1.0 / T, dtype=x.dtype, device=x.device).expand(B, 1, T)
    m = torch.bmm(mean, absx).reshape(B, -1).float()
    return (m * m).sum(0)


class MinitronCapture:
    """Forward hooks that accumulate, per calibration sequence s, m_s = mean over the sequence of |x| for the input
    of every down_proj (one value per MLP neuron) and the output of every hidden-size norm; importance = the L2 over
    sequences, sqrt(sum_s m_s^2), summed over the norms for the hidden channels. Sums of squares stay in fp32 on the
    model's device; no activation is kept, only one scratch buffer per activation width for |x|."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        device = next(model.parameters()).device
        self.mlp_sq = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.float32, device=device)
        norms = [(n, m) for n, m in model.named_modules() if HIDDEN_NORM_MODULE.fullmatch(n)]
        downs = [(int(mt.group(1)), m) for n, m in model.named_modules() if (mt := DOWN_PROJ_MODULE.fullmatch(n))]
        if len(downs) != cfg.num_hidden_layers or len(norms) != 2 * cfg.num_hidden_layers + 1:
            raise ValueError(f"{type(model).__name__}: found {len(downs)} down_proj and {len(norms)} hidden norms for "
                             f"{cfg.num_hidden_layers} layers; not a Llama-style dense model")
        self.hidden_sq = torch.zeros(len(norms), cfg.hidden_size, dtype=torch.float32, device=device)
        self._scratch: dict[int, torch.Tensor] = {}  # channel count -> flat buffer for |x|
        self.handles = [m.register_forward_pre_hook(self._mlp_hook(layer)) for layer, m in downs]
        self.handles += [m.register_forward_hook(self._norm_hook(i)) for i, (_, m) in enumerate(norms)]

    def _mlp_hook(self, layer: int):
        def hook(module, args):
            self.mlp_sq[layer] += sequence_mean_sq(args[0], self._scratch)
        return hook

    def _norm_hook(self, i: int):
        def hook(module, args, output):
            self.hidden_sq[i] += sequence_mean_sq(output, self._scratch)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp_sq.sqrt().cpu(), self.hidden_sq.sqrt().sum(0).cpu()


def resolve_dtype(checkpoint: Path, dtype: str) -> torch.dtype:
    """auto: the dtype the embedding is stored in (the model's own)."""
    if dtype != "auto":
        return DTYPES[dtype]
    with CheckpointReader(checkpoint) as reader:
        return reader.dtype(EMBED)


def calibration_rows(path: Path, max_tokens: int | None) -> int:
    """Rows the capture reads: whole sequences up to max_tokens (calibration_batches' rule)."""
    meta = pq.ParquetFile(path)
    seq_len = meta.schema_arrow.field("input_ids").type.list_size
    rows = meta.metadata.num_rows
    return rows if max_tokens is None else min(rows, max_tokens // seq_len)


def forward_tokens(model: torch.nn.Module, inputs: ImportanceInputs, desc: str) -> tuple[int, float]:
    """One pass of the base model (no LM head: nothing here reads logits) over the calibration rows; returns
    (tokens, seconds). The plain forward the capture is timed against runs exactly this."""
    from moe2dense.calibrate.capture import calibration_batches

    device = next(model.parameters()).device
    tokens = 0
    bar = tqdm(total=calibration_rows(inputs.calibration, inputs.max_tokens), desc=desc, unit="seq")
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, _ in calibration_batches(inputs.calibration, inputs.batch_size, inputs.max_tokens):
            model.model(input_ids=torch.from_numpy(ids).to(device), use_cache=False)
            tokens += ids.size
            bar.update(len(ids))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    return tokens, time.perf_counter() - start


def capture_minitron(model: torch.nn.Module, inputs: ImportanceInputs) -> Importance:
    capture = MinitronCapture(model)
    try:
        tokens, seconds = forward_tokens(model, inputs, "minitron importance")
    finally:
        capture.remove()
    if tokens == 0:
        raise ValueError(f"{inputs.calibration}: no whole calibration sequence within baselines.prune."
                         f"calibration_tokens = {inputs.max_tokens}")
    mlp, hidden = capture.result()
    return Importance(mlp, hidden, tokens, seconds)


@register_importance("minitron", calibrated=True)
def minitron(inputs: ImportanceInputs) -> Importance:
    from moe2dense.teacher.load import load_frozen, resolve_device

    device = resolve_device(inputs.device, "baselines.prune.device")
    model = load_frozen(inputs.checkpoint, resolve_dtype(inputs.checkpoint, inputs.dtype), device)
    return capture_minitron(model, inputs)


# ------------------------------------------------------------------------------------------------------ magnitude
def _row_norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float32)


@register_importance("magnitude", calibrated=False)
def magnitude(inputs: ImportanceInputs) -> Importance:
    """Per neuron norm(gate row) + norm(up row) + norm(down column); per hidden channel the norm of its embedding
    column. Reads the checkpoint tensor by tensor (the embedding in row chunks); runs no forward."""
    with CheckpointReader(inputs.checkpoint) as reader:
        n_layers = 1 + max(int(DOWN_PROJ_MODULE.match(n).group(1)) for n in reader.keys()
                           if DOWN_PROJ_MODULE.match(n))
        mlp = torch.stack([
            _row_norms(reader.read(MLP_WEIGHT.format(layer=layer, proj="gate")), 1)
            + _row_norms(reader.read(MLP_WEIGHT.format(layer=layer, proj="up")), 1)
            + _row_norms(reader.read(MLP_WEIGHT.format(layer=layer, proj="down")), 0)
            for layer in tqdm(range(n_layers), desc="magnitude importance", unit="layer")])
        V, H = reader.shape(EMBED)
        step = max(1, CHUNK_BYTES // (H * reader.dtype(EMBED).itemsize))
        sq = torch.zeros(H, dtype=torch.float32)
        for i in range(0, V, step):
            sq += _row_norms(reader.read_rows(EMBED, range(i, min(V, i + step))), 0).square()
    return Importance(mlp, sq.sqrt())


M.check_registry("importance", IMPORTANCE)


def importance(name: str, inputs: ImportanceInputs) -> Importance:
    return IMPORTANCE[name].fn(inputs)


def needs_calibration(name: str) -> bool:
    return IMPORTANCE[name].calibrated

