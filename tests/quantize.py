"""Test-side quantizers: the published packed formats written from their definitions (OCP MX for MXFP4, DeepSeek-V3's
block-wise FP8), NumPy reference dequantizers, and a float checkpoint rewritten quantized."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moe2dense.quantized import FP4_E2M1

def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] float -> blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32]: per 32 input values one
    e8m0 exponent floor(log2(amax)) - 2 (e2m1's largest exponent), values rounded to the nearest e2m1 (OCP MX)."""
    E, n_in, n_out = w.shape
    x = w.transpose(1, 2).float().reshape(E, n_out, n_in // 32, 32)
    amax = x.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    v = x / torch.exp2(exp)[..., None]
    mags = torch.tensor(FP4_E2M1[:8])
    idx = (v.abs()[..., None] - mags).abs().argmin(-1) + 8 * (v < 0).long()
    packed = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def numpy_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """The reference: [E, out, G, 16] / [E, out, G] -> float32 [E, in, out]."""
    b, s = blocks.numpy(), scales.numpy().astype(np.int32) - 127
    vals = np.asarray(FP4_E2M1, dtype=np.float32)[np.stack([b & 0x0F, b >> 4], axis=-1)]  # [E, out, G, 16, 2]
    with np.errstate(over="ignore"):  # 4 x 2^127 and up are inf in float32, as in every dequantizer
        vals = np.ldexp(vals.reshape(*b.shape[:-1], 32), s[..., None]).astype(np.float32)
    return vals.reshape(b.shape[0], b.shape[1], -1).transpose(0, 2, 1)


def quantize_fp8(w: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> float8_e4m3fn [R, C] and fp32 weight_scale_inv [ceil(R/bm), ceil(C/bn)] = block amax / 448."""
    R, C = w.shape
    bm, bn = block
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(R / bm), math.ceil(C / bn))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def numpy_fp8(q: torch.Tensor, s: torch.Tensor, block: list[int]) -> np.ndarray:
    R, C = q.shape
    full = np.repeat(np.repeat(s.float().numpy(), block[0], 0), block[1], 1)[:R, :C]
    return (q.float().numpy() * full).astype(np.float32)


def fp8_quantized(name: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's published split: every decoder Linear in fp8, the router, norms, embeddings and head in bf16."""
    return ".layers." in name and name.endswith(".weight") and t.dim() == 2 and not name.endswith("mlp.gate.weight")



MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def fp8_config(block: list[int]) -> dict:
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block}


def quantize_checkpoint(src: Path, dst: Path, scheme: str, block: list[int] | None = None) -> dict:
    """Rewrite the float checkpoint in `src` (model.safetensors + config.json) quantized into `dst` (other files are
    the caller's): gpt_oss's fused experts as MXFP4, or every decoder Linear as block FP8. Returns the float twin's
    tensors: the quantized ones as the NumPy reference dequantizes them, in the source's dtype."""
    quantized, twin = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if scheme == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t)
            quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
            twin[name] = torch.from_numpy(numpy_mxfp4(blocks, scales)).to(t.dtype).contiguous()
        elif scheme == "fp8" and fp8_quantized(name, t):
            q, s = quantize_fp8(t, block)
            quantized[name], quantized[name.removesuffix("weight") + "weight_scale_inv"] = q, s
            twin[name] = torch.from_numpy(numpy_fp8(q, s, block)).to(t.dtype)
        else:
            quantized[name] = twin[name] = t
    dst.mkdir(parents=True, exist_ok=True)
    save_file(quantized, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG if scheme == "mxfp4" else fp8_config(block)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return twin
