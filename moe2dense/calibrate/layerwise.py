"""Layer-by-layer calibration (`calibrate.offload: layer`): the teacher is never materialised whole.

The model is built on the meta device the way `from_pretrained` builds it, and only the embeddings and ONE decoder
layer hold weights at a time, read from the safetensors files with `CheckpointReader` (no mmap) and put in place by
transformers' own loader (`convert_and_load_state_dict_in_model` with the model's conversion mapping, so on-disk
renames and per-expert -> fused 3-D expert tensors are handled as on a normal load, for every layout and sharding).

The sequence (llm-compressor's sequential pipeline):
1. the model's own forward runs once per batch with every decoder layer replaced by a `_Catcher`, which records what
   the model passes that layer (position embeddings, masks per layer type, per-layer inputs) and returns its input
   unchanged; layer 0's input, the embeddings, goes to a `HiddenBuffer`. The embeddings are then freed.
2. per decoder layer, up to the last MoE layer: load it, run it on every batch's carried hidden states with the
   recorded arguments while the capture hooks of `capture` watch its router, write its outputs back, free it.

The hidden states of all calibration tokens ([tokens, hidden] in the calibration dtype) live in host RAM up to a
limit, else in a np.memmap file in a temp dir removed afterwards. Routing rows and aggregates equal the whole-model
path's (tests/test_layerwise.py, every family).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from moe2dense.arch import Adapter, get_adapter
from moe2dense.arch.registry import is_generic
from moe2dense.checkpoint import CheckpointReader
from moe2dense.teacher.load import CheckpointModel, map_large_allocations, release_freed_memory

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "layer", "none")
# auto keeps the whole model when weights x margin fit: on the host, from_pretrained holds about twice the weights
# while loading (measured: issue 15); on a GPU the model also needs room for activations and the capture buffers.
HOST_MARGIN, DEVICE_MARGIN = 2.0, 1.25
HOST_BUFFER_SHARE = 0.25  # hidden-state buffer in RAM up to this share of available host memory, else memmap


def check_offload(mode: str, key: str = "calibrate.offload") -> str:
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"{key} {mode!r}: choose {', '.join(OFFLOAD_MODES)}")
    return mode


def weight_bytes(reader: CheckpointReader, dtype: torch.dtype) -> int:
    """Bytes of every tensor in the checkpoint once loaded in `dtype` (floating tensors are cast, others kept)."""
    total = 0
    for name in reader.keys():
        itemsize = dtype.itemsize if reader.dtype(name).is_floating_point else reader.dtype(name).itemsize
        total += reader.nbytes(name) // reader.dtype(name).itemsize * itemsize
    return total


def available_bytes(device: torch.device) -> dict[str, int]:
    """Free memory per place the whole-model path needs it: host RAM always (from_pretrained loads on the host),
    plus the GPU's free memory when calibrating on one."""
    free = {"host": psutil.virtual_memory().available}
    if device.type == "cuda":
        free["device"] = torch.cuda.mem_get_info(device)[0]
    return free


def choose_offload(mode: str, checkpoint: str | Path, dtype: torch.dtype, device: torch.device) -> str:
    """`layer` or `none` for calibrate.offload `mode`; auto: none when the teacher in `dtype` fits with margin
    (HOST_MARGIN x on the host, DEVICE_MARGIN x on a GPU), else layer. Logs the choice and why."""
    if check_offload(mode) != "auto":
        log.info("calibrate.offload: %s (as set)", mode)
        return mode
    with CheckpointReader(checkpoint) as reader:
        need = weight_bytes(reader, dtype)
    free = available_bytes(device)
    margins = {"host": HOST_MARGIN, "device": DEVICE_MARGIN}
    short = [place for place, avail in free.items() if need * margins[place] > avail]
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    detail = ", ".join(f"{place} free {gib(avail)} (needs {margins[place]}x)" for place, avail in free.items())
    choice = "layer" if short else "none"
    log.info("calibrate.offload auto -> %s: teacher weights %s in %s; %s", choice, gib(need),
             str(dtype).removeprefix("torch."), detail)
    return choice


class HiddenBuffer:
    """[n_tokens, hidden] in `dtype`: a host tensor when it fits in `host_limit` bytes, else a np.memmap file in a
    temp dir (removed by `close`). Rows of one batch are read and overwritten in place, layer after layer."""

    def __init__(self, n_tokens: int, hidden: int, dtype: torch.dtype, host_limit: int):
        self.nbytes = n_tokens * hidden * dtype.itemsize
        self.dir: str | None = None
        if self.nbytes <= host_limit:
            self.data = torch.empty(n_tokens, hidden, dtype=dtype)
        else:  # numpy has no bfloat16: a byte file viewed as `dtype` by torch
            self.dir = tempfile.mkdtemp(prefix="moe2dense-hidden-")
            raw = np.memmap(Path(self.dir) / "hidden.bin", dtype=np.uint8, mode="w+",
                            shape=(n_tokens, hidden * dtype.itemsize))
            self.data = torch.from_numpy(raw).view(dtype)
        log.info("hidden states of %d tokens: %.1f MiB %s", n_tokens, self.nbytes / 2**20,
                 "in RAM" if self.dir is None else f"memory-mapped in {self.dir}")

    @property
    def spilled(self) -> bool:
        return self.dir is not None

    def close(self) -> None:
        self.data = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class LayerwiseTeacher(CheckpointModel):
    """The teacher at `path` on the meta device; `load_layer` / `free_layer` materialise one decoder layer."""

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device):
        map_large_allocations()
        super().__init__(path, dtype, device)
        self.adapter = get_adapter(self.config)
        if is_generic(self.adapter):  # its blocks are verified against the whole model (arch.generic)
            raise ValueError(f"model_type {self.adapter.model_type!r} has no written family spec: "
                             "calibrate.offload: layer cannot verify it; use calibrate.offload: none")
        self.decoder = Adapter.decoder(self.model)
        # the head is never run during calibration
        self.load([k for k in self.other_keys if not k.startswith("lm_head.")])
        self.check_loaded(self.decoder, "embeddings and norms", skip=lambda name: name.startswith("layers."))
        self.init_buffers()

    @property
    def num_layers(self) -> int:
        return len(self.layer_keys)

    def layer(self, i: int) -> nn.Module:
        return self.decoder.layers[i]

    def load_layer(self, i: int) -> nn.Module:
        self.load(self.layer_keys[i])
        self.check_loaded(self.layer(i), f"decoder layer {i}")
        return self.layer(i)

    def free_layer(self, i: int) -> None:
        self.layer(i).to("meta")

    def free_embeddings(self) -> None:
        """After the catcher pass nothing outside the layers runs again."""
        for name, module in self.decoder.named_children():
            if name != "layers":
                module.to("meta")


class _Stop(Exception):
    """Raised by the last catcher: the rest of the forward (final norm) is not needed."""


class _Catcher(nn.Module):
    """Stands in for decoder layer `index` during the catcher pass: records the arguments the model passes it and
    returns its input unchanged. Attribute reads fall through to the real (meta) layer, which some forwards consult
    (e.g. qwen3_next's `layer_type`)."""

    def __init__(self, layer: nn.Module, index: int, calls: list, last: bool):
        super().__init__()
        self.__dict__["_wrapped"] = layer  # not a submodule: the model's state_dict keys stay as they are
        self.index, self.calls, self.last = index, calls, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, args = args[0], args[1:]
        self.calls.append((hidden if self.index == 0 else None, args, kwargs))
        if self.last:
            raise _Stop
        return hidden


def _catch(teacher: LayerwiseTeacher, ids: torch.Tensor, n_run: int) -> list[tuple]:
    """The model's forward on `ids` with layers [0, n_run) replaced by catchers: per layer (layer-0 input, args,
    kwargs)."""
    layers = teacher.decoder.layers
    originals = [layers[i] for i in range(n_run)]
    calls: list = []
    try:
        for i in range(n_run):
            layers[i] = _Catcher(originals[i], i, calls, last=i == n_run - 1)
        with contextlib.suppress(_Stop):
            teacher.decoder(input_ids=ids.to(teacher.device), use_cache=False)
    finally:
        for i in range(n_run):
            layers[i] = originals[i]
    if len(calls) != n_run:
        raise RuntimeError(f"{teacher.adapter.model_type}: the forward called {len(calls)} of {n_run} decoder layers "
                           "once each; calibrate.offload: layer cannot run this family, use calibrate.offload: none")
    return calls


def run_layerwise(teacher: LayerwiseTeacher, batches: list[tuple[torch.Tensor, list[str]]], on_batch, on_layer,
                  host_limit: int | None = None, progress: bool = True) -> None:
    """Drive the layer-by-layer forward over `batches` (ids [B, S], domains): `on_batch(b)` before batch b runs
    through a layer (sets the capture's row labels), `on_layer(i, loaded)` with True after layer i is loaded (attach
    hooks) and False before it is freed (detach)."""
    adapter = teacher.adapter
    n_run = max(adapter.moe_layers) + 1  # layers past the last MoE layer change no capture
    sizes = [ids.numel() for ids, _ in batches]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    hidden = teacher.model.config.hidden_size
    if host_limit is None:
        host_limit = int(HOST_BUFFER_SHARE * psutil.virtual_memory().available)
    buffer = HiddenBuffer(starts[-1], hidden, teacher.dtype, host_limit)
    recorded: list[list[tuple]] = []
    try:
        with torch.no_grad():
            for b, (ids, _) in enumerate(batches):
                calls = _catch(teacher, ids, n_run)
                buffer.data[starts[b]:starts[b + 1]] = calls[0][0].reshape(-1, hidden).to("cpu", teacher.dtype)
                recorded.append([(args, kwargs) for _, args, kwargs in calls])
            teacher.free_embeddings()
            release_freed_memory()
            bar = tqdm(total=n_run, desc="calibrate layers", unit="layer", disable=not progress)
            for i in range(n_run):
                layer = teacher.load_layer(i)
                on_layer(i, True)
                try:
                    for b, (ids, _) in enumerate(batches):
                        on_batch(b)
                        rows = slice(starts[b], starts[b + 1])
                        x = buffer.data[rows].to(teacher.device).reshape(*ids.shape, hidden)
                        args, kwargs = recorded[b][i]
                        out = layer(x, *args, **kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        buffer.data[rows] = out.reshape(-1, hidden).to("cpu", teacher.dtype)
                finally:
                    on_layer(i, False)
                    teacher.free_layer(i)
                    release_freed_memory()
                bar.update(1)
            bar.close()
    finally:
        buffer.close()


def as_batches(batches: Iterable) -> list[tuple[torch.Tensor, list[str]]]:
    out = []
    for ids, domains in batches:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if len(domains) != ids.shape[0]:
            raise ValueError(f"batch of {ids.shape[0]} sequences has {len(domains)} domain labels")
        out.append((ids, list(domains)))
    if not out or sum(ids.numel() for ids, _ in out) == 0:
        raise ValueError("no calibration tokens: the batches were empty")
    return out
