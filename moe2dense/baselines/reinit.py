"""The random baselines: the M2D student's architecture with every MLP re-initialised (random_ffn: embeddings,
attention and norms stay the MoE teacher's, which the student carries unchanged) or everything initialised from
scratch (random_init), by the model's own initializer (`_init_weights`, config.initializer_range) after a fixed seed."""
from __future__ import annotations

import re
from pathlib import Path

import torch


def mlp_modules(model, teacher_config) -> list[str]:
    """Qualified names of the student's MLP modules: `<...>.layers.<i>.<dense MLP attribute>` (mlp for most
    families, feed_forward, mixer, ...), the attribute from the teacher family's spec."""
    from moe2dense.arch import get_adapter

    attr = get_adapter(teacher_config).spec.dense_mlp_attr
    pattern = re.compile(rf"(.+\.)?layers\.\d+\.{re.escape(attr)}")
    names = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"the student has no module named like {pattern.pattern}: random_ffn cannot find its MLPs")
    return names


def build(kind: str, student_dir: str | Path, teacher_config, seed: int):
    """(model, re-initialised MLP module names) of baseline `kind` (random_ffn | random_init), in the student's
    dtype. Deterministic: the same seed gives the same weights on the same machine."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "random_init":
        config = AutoConfig.from_pretrained(str(student_dir), local_files_only=True)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=config.dtype), []
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype="auto", local_files_only=True)
    names = mlp_modules(model, teacher_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for sub in model.get_submodule(name).modules():
                for p in sub.parameters(recurse=False):
                    p._is_hf_initialized = False  # loaded weights are flagged; the initializer skips flagged ones
                model._init_weights(sub)
    return model, names
