"""What the `teacher` stage does, as library functions: train + evaluate the demo teacher, or validate and record
a real checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from moe2dense.checkpoint import TOKENIZER_FILES
from moe2dense.data.packing import packed_tokens, read_packed
from moe2dense.data.tokenizer import eos_id, load_tokenizer
from moe2dense.params import TeacherParams
from moe2dense.teacher.demo import demo_config, dense_demo_config, num_parameters, train_demo
from moe2dense.teacher.metrics import perplexity_and_usage, unigram_perplexity
from moe2dense.teacher.source import POINTER, resolve_checkpoint, weight_files

def eval_rows(path: Path, max_tokens: int) -> tuple[np.ndarray, list[str]]:
    """Evenly spaced eval rows up to `max_tokens`, so every domain (packed in blocks) is represented."""
    table = read_packed(path)
    ids = packed_tokens(path)
    n = max(1, min(len(ids), max_tokens // ids.shape[1]))
    pick = np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))
    domains = table.column("domain").to_pylist()
    return ids[pick], [domains[i] for i in pick]


def build_demo_teacher(t: TeacherParams, data_dir: Path, out: Path, progress: bool = True,
                       dense: bool = False) -> tuple[dict, list, dict]:
    """Train the demo Qwen3-MoE (or, `dense`, the d2d baseline's dense Qwen3 of the same total size, with the same
    recipe, data and seed) on data_dir/packed/train.parquet, save it to `out`, return (metrics, loss log,
    timings). Metrics and weights are byte-identical for the same params, data and thread count; the wall-clock
    figures are returned apart, for the untracked timings file."""
    from transformers import GenerationConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    train = packed_tokens(data_dir / "packed" / "train.parquet")
    cfg = (dense_demo_config if dense else demo_config)(t.demo, len(tokenizer), train.shape[1], eos_id(tokenizer),
                                                        tokenizer.pad_token_id)
    model = (Qwen3ForCausalLM if dense else Qwen3MoeForCausalLM)(cfg)
    log = train_demo(model, train, t.train, t.seed, progress=progress, desc="dense teacher" if dense else "teacher")

    ids, domains = eval_rows(data_dir / "packed" / "eval.parquet", t.train.eval_tokens)
    quality = perplexity_and_usage(model, ids, domains)
    unigram = unigram_perplexity(train, ids, cfg.vocab_size)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    if dense:
        moe = num_parameters(demo_config(t.demo, cfg.vocab_size, train.shape[1], cfg.eos_token_id, cfg.pad_token_id))
        shape = {"active_parameters": n_params, "intermediate_size": cfg.intermediate_size,
                 "moe_teacher_parameters": moe, "parameter_ratio_to_moe_teacher": round(n_params / moe, 6)}
    else:
        per_tok = t.demo.num_experts_per_tok / t.demo.num_experts
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        shape = {"active_parameters": int(n_params - expert_params * (1 - per_tok)), "num_experts": cfg.num_experts,
                 "top_k": cfg.num_experts_per_tok, "moe_layers": cfg.num_hidden_layers}
    metrics = {
        "source": "demo",
        "trained": True,
        "model_type": cfg.model_type,
        "parameters": n_params,
        **shape,
        "train_tokens": log.tokens,
        "final_train_loss": log.rows[-1]["loss"],
        "eval_tokens": quality["eval_tokens"],
        "perplexity": round(quality["perplexity"], 4),
        "perplexity_by_domain": {d: round(v, 4) for d, v in quality["perplexity_by_domain"].items()},
        "unigram_perplexity": round(unigram, 4),
        "perplexity_vs_unigram": round(quality["perplexity"] / unigram, 4),
        **quality["routing"],
    }
    timings = {"train_seconds": round(log.seconds, 3), "train_tokens_per_s": round(log.tokens_per_s, 1),
               "threads": torch.get_num_threads()}
    return metrics, log.rows, timings


def moe_shape(config) -> dict:
    """What the metrics say of a real MoE teacher; an unsupported family or quantization fails here, with what to
    do."""
    from moe2dense.arch import get_adapter

    adapter = get_adapter(config)
    return {"num_experts": adapter.num_experts, "top_k": adapter.top_k, "moe_layers": len(adapter.moe_layers)}


def dense_shape(config) -> dict:
    """What the metrics say of a real dense teacher (the d2d baseline); a family width pruning cannot handle fails
    here, naming the supported ones."""
    from moe2dense.baselines.prune import dense_family

    dense_family(config)
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers}


def record_real_teacher(source: str, out: Path, shape=moe_shape) -> dict:
    """Validate a real checkpoint offline (config, family, a quantization moe2dense reads, weights, tokenizer) and
    write a pointer dir instead of copying the weights. `shape(config)`: the family check and the metrics it adds
    (moe_shape, dense_shape)."""
    from transformers import AutoConfig

    from moe2dense.quantized import quant_method
    from moe2dense.teacher.source import check_tokenizer, validate_checkpoint_dir

    path = resolve_checkpoint(source)
    validate_checkpoint_dir(path)  # config keys, safetensors headers, tokenizer files: no weight is read
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    described = shape(config)
    files = weight_files(path)
    check_tokenizer(load_tokenizer(path), path)  # it must load offline with a vocabulary: prepare and evaluate use it
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (path / name).is_file():
            shutil.copy2(path / name, out / name)
    quantization = getattr(config, "quantization_config", None)  # read dequantized, layer by layer (quantized.py)
    record = {"source": source, "path": str(path), "model_type": config.model_type, "weights": files}
    (out / POINTER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {
        "source": source,
        "trained": False,
        "model_type": config.model_type,
        **described,
        **({"quantization": quant_method(quantization)} if quantization else {}),
        "weight_files": len(files),
    }
