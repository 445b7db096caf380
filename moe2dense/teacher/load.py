"""Loading the recorded teacher for inference (calibration, later distillation and evaluation).

A float checkpoint loads with `from_pretrained`. A quantized one (mxfp4, block fp8: moe2dense/quantized.py) is built
on the meta device and filled from `CheckpointReader`, which dequantizes each tensor as it is read, through
transformers' own loader (`convert_and_load_state_dict_in_model`: the model's conversion mapping and dtype plan), one
decoder layer at a time, straight into the run dtype on the device: never a quantized module, never a dequantized
copy of the whole teacher on the host or on disk. `CheckpointModel` is also what layer-by-layer calibration builds on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from moe2dense.checkpoint import DTYPES, CheckpointReader
from moe2dense.teacher.source import teacher_checkpoint, validate_checkpoint_dir

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def resolve_device(device: str, key: str = "calibrate.device") -> torch.device:
    """auto -> cuda when present, else cpu; `key` names the param in the error."""
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"{key} {device!r}: choose auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key}: cuda was asked for but torch sees no CUDA device; use auto or cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"{key} {device!r}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def run_dtype(device: torch.device) -> torch.dtype:
    """The dtype a frozen teacher runs in on `device`: bf16 on CUDA (the dtype real checkpoints are stored in; half
    the memory of fp32), fp32 on CPU (CPU bf16 matmuls are slow, and the CPU demo's outputs stay as they were)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_freed_memory() -> None:
    """glibc's malloc_trim (a no-op elsewhere): hand freed heap pages back to the OS after each layer."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def map_large_allocations(threshold: int = 2**20) -> None:
    """Serve every allocation of `threshold` bytes or more with its own mmap, returned to the OS when freed.
    glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed, after which a layer's tensors
    come from the per-thread heaps, where the next layer's differently sized ones cannot all reuse them: the 8-layer
    Qwen3-30B-shaped bench then peaked anywhere from 1.06x to 1.33x the 2-layer peak. A fixed threshold keeps it
    flat. Process-wide and permanent (glibc has no way back to the dynamic threshold); costs a page fault per page of
    each new large tensor."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold)


@contextlib.contextmanager
def _quiet_sync_loading() -> Iterator[None]:
    """Sequential loading (no reader threads holding every tensor of a layer at once) and no per-call progress bar
    from transformers' loader."""
    from transformers.utils import logging as hf_logging

    old_env, bars = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD"), hf_logging.is_progress_bar_enabled()
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = old_env
        if bars:
            hf_logging.enable_progress_bar()


class _Lazy:
    """A checkpoint tensor read (and dequantized) only when transformers' loader materialises it (`tensor[...]`), so
    a group of tensors is read one conversion at a time."""

    def __init__(self, reader: CheckpointReader, name: str):
        self.reader, self.name = reader, name

    def __getitem__(self, _) -> torch.Tensor:
        return self.reader.read(self.name)


class CheckpointModel:
    """The model at `path` built on the meta device as `from_pretrained` builds it; `load(keys)` reads those
    checkpoint tensors (dequantized if stored quantized) into `dtype` on `device`. `layer_keys[i]` are decoder layer
    i's tensors, `other_keys` the rest (embeddings, final norm, head); layers past num_hidden_layers (multi-token
    prediction) are never part of the forward and never read."""

    def __init__(self, path: str | Path, dtype: torch.dtype, device: torch.device, config=None):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.utils.generic import ContextManagers

        self.path, self.dtype, self.device = Path(path), dtype, device
        self.config = config or AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = AutoModelForCausalLM._model_mapping[type(self.config)]
        with ContextManagers(cls.get_init_context(dtype, False, False, None)):  # as from_pretrained builds it
            self.model = cls(self.config)
        self.model.eval().requires_grad_(False)
        self._dtype_plan = self.model._get_dtype_plan(dtype)
        self._mapping = get_model_conversion_mapping(self.model)
        self.reader = CheckpointReader(path)
        n = self.config.num_hidden_layers
        self.layer_keys: list[list[str]] = [[] for _ in range(n)]
        self.other_keys: list[str] = []
        for key in self.reader.keys():
            m = _LAYER_KEY.search(key)
            if m is None:
                self.other_keys.append(key)
            elif int(m.group(1)) < n:
                self.layer_keys[int(m.group(1))].append(key)

    def load(self, keys: list[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self._dtype_plan, weight_mapping=self._mapping,
                                     device_map={"": self.device})
        with _quiet_sync_loading():
            convert_and_load_state_dict_in_model(self.model, {k: _Lazy(self.reader, k) for k in keys}, config)

    def check_loaded(self, module: nn.Module, what: str, skip=lambda name: False) -> None:
        left = [n for n, p in module.named_parameters() if p.is_meta and not skip(n)]
        if left:
            raise ValueError(f"{self.path}: {what} incomplete after loading, e.g. {left[:3]} not in the checkpoint")

    def init_buffers(self) -> None:
        """What from_pretrained does after loading: non-persistent buffers (rotary inv_freq) computed on the device
        by the model's own init; every parameter still on meta stays there."""
        self.model._move_missing_keys_from_meta_to_device(set(), {"": self.device}, None, None)
        self.model._initialize_missing_keys(False)

    def close(self) -> None:
        self.reader.close()


def load_dequantized(path: str | Path, config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A quantized checkpoint as the model its float twin loads into, filled one decoder layer at a time."""
    from tqdm.auto import tqdm

    m = CheckpointModel(path, dtype, device, config)
    try:
        m.load(m.other_keys)
        for keys in tqdm(m.layer_keys, desc=f"dequantize ({m.reader.quantization.method})", unit="layer"):
            m.load(keys)
            release_freed_memory()
        m.model.tie_weights()
        m.init_buffers()
        m.check_loaded(m.model, "the dequantized model")
    finally:
        m.close()
    return m.model


def from_checkpoint(path: str | Path, dtype: torch.dtype | str, device: torch.device, config=None) -> nn.Module:
    """`from_pretrained(path, dtype, device_map=device)` offline, or `load_dequantized` for a quantized checkpoint;
    dtype "auto" is the checkpoint's own (a quantized one's: the dtype it dequantizes into)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(str(path), local_files_only=True)
    if getattr(config, "quantization_config", None):
        if dtype == "auto":
            with CheckpointReader(path) as reader:
                dtype = reader.dequantized_dtype
        return load_dequantized(path, config, dtype, device)
    # device_map: the weights go straight to `device` (no whole copy on the host first when it is a GPU)
    return AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, device_map=device,
                                                local_files_only=True)


def load_frozen(path: str | Path, dtype: torch.dtype, device: torch.device, top_k: int | None = None):
    """The checkpoint at `path`, offline, frozen (no grads) in eval mode on `device`; `top_k` routes each token to
    that many experts instead of its trained k (distill.teacher_top_k, the paper's Eq. 6)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if top_k is not None:
        config.num_experts_per_tok = top_k
    return from_checkpoint(path, dtype, device, config).eval().requires_grad_(False)


def load_teacher(teacher_dir: str | Path = "models/teacher", dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "auto", top_k: int | None = None):
    """The teacher stage's output (or where its pointer leads), validated, then `load_frozen`."""
    path = teacher_checkpoint(teacher_dir)  # a teacher moved since the teacher stage fails here, naming both
    validate_checkpoint_dir(path)  # a truncated shard or missing config key: one line, before from_pretrained
    return load_frozen(path, DTYPES[dtype] if isinstance(dtype, str) else dtype,
                       resolve_device(device) if isinstance(device, str) else device, top_k)


def teacher_config(teacher_dir: str | Path = "models/teacher"):
    """The teacher's config, after validate_checkpoint_dir: calibrate calls this first, so a moved, truncated or
    incomplete teacher fails in a second with the file named, before any weight is loaded."""
    from transformers import AutoConfig

    path = teacher_checkpoint(teacher_dir)
    validate_checkpoint_dir(path)
    return AutoConfig.from_pretrained(str(path), local_files_only=True)
