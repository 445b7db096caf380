"""Quantized checkpoints read as their dequantized twin.

A published teacher may store its weights quantized, as `quantization_config.quant_method` in its config.json says.
`scheme_of` picks the scheme from `SCHEMES` (or refuses an unsupported one in one line, before any weight is read).
`CheckpointReader` then shows the checkpoint under the names and shapes of its float twin (what `save_pretrained` of
the dequantized model writes) and dequantizes each tensor as it is read, into the checkpoint's own float dtype
(`config.json`'s dtype, bf16 for every published one): a quantized teacher reads exactly as the bf16 copy a user would
otherwise have written to disk, one tensor (one layer) at a time, and nothing quantized ever reaches a student.

The formats, from their definitions:
- mxfp4 (transformers' GPT-OSS serialisation, OCP microscaling): `<p>_blocks` uint8 [..., rows, G, 16], two e2m1
  values a byte (low nibble first), and `<p>_scales` uint8 [..., rows, G], one e8m0 exponent (2^(s-127)) per 32
  values. The blocks hold each expert matrix as [out, in]; the float parameter `<p>` is [..., in, out] = [..., G*32,
  rows].
- fp8 (DeepSeek-V3's block-wise FP8, transformers' finegrained FP8): `<m>.weight` float8 [..., out, in] with
  `<m>.weight_scale_inv` [..., ceil(out/bm), ceil(in/bn)] for `weight_block_size` (bm, bn) (no block size: one scale
  per tensor); w = q * s, computed in fp32 and rounded once. Scales are fp32, or e8m0 (`ue8m0` checkpoints). Fused
  expert parameters pair `<p>` with `<p>_scale_inv` the same way.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from moe2dense.checkpoint import CheckpointReader

log = logging.getLogger(__name__)

# Elements per dequantization step: its scratch buffers (a few MiB) are allocated once per tensor and stay in cache
# step after step; fresh buffers of a whole tensor would cost more in page faults than the arithmetic does.
_STEP_ELEMENTS = 1 << 20
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizedModelError(ValueError):
    """A quantized checkpoint moe2dense cannot dequantize: an unsupported scheme, or tensors that break its format."""


@dataclass(frozen=True)
class Packed:
    """A float tensor stored as quantized parts: `values` and `scales` are raw tensor names in the checkpoint."""
    values: str
    scales: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Scheme:
    """One quant_method: how its raw tensors pair into float tensors, and how a pair dequantizes."""
    method: str
    published: tuple[str, ...]  # published checkpoints stored this way (the README's table lists them)
    pair: Callable[[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict], dict[str, Packed]]
    # (reader, packed, rows or None, qconfig, dtype) -> the float tensor (those rows of dim 0 only)
    read: Callable[[CheckpointReader, Packed, Sequence[int] | None, dict, torch.dtype], torch.Tensor]
    extra_suffixes: tuple[str, ...] = ()  # raw tensors the float twin does not have (static activation scales)


# ------------------------------------------------------------------------------------------------------------- mxfp4
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _mxfp4_table(dtype: torch.dtype) -> torch.Tensor:
    """Every (scale byte, value byte) -> the byte's two values (low nibble first) times 2^(scale-127), in `dtype`,
    each pair stored as one integer word: [256 * 256]. Exact: an e2m1 value times a power of two needs two
    significant bits, and the fp32 products are rounded once into `dtype`, as a dequantize-then-cast would."""
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)  # byte b -> (lut[b & 15], lut[b >> 4])
    products = torch.ldexp(pairs.expand(256, 256, 2), (torch.arange(256) - 127)[:, None, None])  # [scale, byte, 2]
    word = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
    return products.to(dtype).contiguous().view(word).reshape(-1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., rows, G, 16] uint8 blocks and [..., rows, G] uint8 e8m0 scales -> [..., G*32, rows] in `dtype`: one
    table lookup per byte (`_mxfp4_table`), then the transpose into the float parameter's layout."""
    if blocks.dim() < 4 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise QuantizedModelError(f"mxfp4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)}: expected "
                                  "[experts, rows, G, 16] and [experts, rows, G]")
    *lead, rows, groups, _ = blocks.shape
    table = _mxfp4_table(dtype)
    out = torch.empty(*lead, groups * 32, rows, dtype=dtype)
    flat_blocks, flat_scales = blocks.reshape(-1, rows, groups, 16), scales.reshape(-1, rows, groups)
    flat_out = out.reshape(-1, groups * 32, rows)
    step = max(1, _STEP_ELEMENTS // (groups * 32))  # rows per step
    idx = torch.empty(min(step, rows) * groups * 16, dtype=torch.int32)  # scratch, reused step after step
    words = torch.empty(idx.numel(), dtype=table.dtype)
    for m in range(flat_blocks.shape[0]):
        for r0 in range(0, rows, step):
            blk = flat_blocks[m, r0:r0 + step]
            n = blk.shape[0] * groups * 16
            i = idx[:n].view(blk.shape)
            i.copy_(blk).add_(flat_scales[m, r0:r0 + step, :, None].int() * 256)
            torch.index_select(table, 0, idx[:n], out=words[:n])
            flat_out[m, :, r0:r0 + step] = words[:n].view(dtype).view(blk.shape[0], groups * 32).T
    return out


def _pair_mxfp4(raw: dict[str, tuple[torch.dtype, tuple[int, ...]]], qconfig: dict) -> dict[str, Packed]:
    out = {}
    for name, (dtype, shape) in raw.items():
        if not name.endswith("_blocks"):
            continue
        base, scales = name[:-len("_blocks")], name[:-len("_blocks")] + "_scales"
        if scales not in raw:
            raise QuantizedModelError(f"mxfp4 tensor {name!r} has no {scales!r} beside it")
        sdtype, sshape = raw[scales]
        if dtype != torch.uint8 or sdtype != torch.uint8 or len(shape) < 4 or shape[-1] != 16 \
                or sshape != shape[:-1]:
            raise QuantizedModelError(f"mxfp4 tensors {name!r} {shape} {dtype} / {scales!r} {sshape} {sdtype}: "
                                      "expected uint8 [experts, rows, G, 16] and uint8 [experts, rows, G]")
        out[base] = Packed(name, scales, (*shape[:-3], shape[-2] * 32, shape[-3]))
    return out


def _read_mxfp4(reader: CheckpointReader, p: Packed, rows: Sequence[int] | None, qconfig: dict,
                dtype: torch.dtype) -> torch.Tensor:
    if rows is None:
        return dequantize_mxfp4(reader.read_raw(p.values), reader.read_raw(p.scales), dtype)
    return dequantize_mxfp4(reader.read_raw_rows(p.values, rows), reader.read_raw_rows(p.scales, rows), dtype)


# --------------------------------------------------------------------------------------------------------------- fp8
_FP8_VALUE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _scale_values(scales: torch.Tensor) -> torch.Tensor:
    """fp32 multipliers from stored inverse scales: fp32/bf16 as they are; e8m0 (a uint8 or float8_e8m0fnu
    exponent byte) as 2^(s-127)."""
    if scales.dtype == torch.uint8:
        return torch.exp2(scales.float() - 127.0)
    return scales.float()


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """float8 [..., R, C] and scales [..., ceil(R/bm), ceil(C/bn)] (`block` None: one scale) -> [..., R, C] in
    `dtype`: each value times its block's scale in fp32, rounded once to `dtype` (what `(w.float() * s).to(dtype)`
    gives, the float8 bytes become float16 by integer shifts, in scratch buffers that stay in cache)."""
    *lead, R, C = weight.shape
    bm, bn = block if block else (max(R, 1), max(C, 1))
    want = (*lead, math.ceil(R / bm), math.ceil(C / bn))
    s = _scale_values(scale_inv)
    if block is None and s.numel() == 1:
        s = s.reshape(1, 1).expand(*want)
    if tuple(s.shape) != want:
        raise QuantizedModelError(f"fp8 weight {tuple(weight.shape)} with block {block}: expected scales {want}, "
                                  f"got {tuple(scale_inv.shape)}")
    if weight.dtype not in _FP8_VALUE_DTYPES:
        raise QuantizedModelError(f"fp8 weight of dtype {weight.dtype}: expected one of {_FP8_VALUE_DTYPES}")
    e4m3 = weight.dtype == torch.float8_e4m3fn
    # float8 bits -> float16 bits, exactly: e5m2 is fp16's top byte; e4m3fn's exponent/mantissa shifted by 7 is
    # fp16 at 2^-8 of the value (bias 15 vs 7), so its scales take the factor 2^8 (exact: a power of two).
    s = s * (256.0 if e4m3 else 1.0)
    out = torch.empty(weight.shape, dtype=dtype)
    flat_w, flat_s, flat_out = weight.reshape(-1, R, C).view(torch.int8), s.reshape(-1, *want[-2:]), \
        out.reshape(-1, R, C)
    step = max(1, _STEP_ELEMENTS // max(C * bm, 1)) * bm  # whole row blocks per step
    # Scratch reused step after step, so it stays in cache and nothing is allocated per step (a mixed-dtype
    # torch.mul allocates its fp32 cast each time: with layer mode's 1 MiB mmap threshold, ~10x slower).
    n = min(step, R) * C
    bits, wide, magnitudes = torch.empty(n, dtype=torch.int16), torch.empty(n), torch.empty(n, dtype=torch.int8)
    full = C // bn * bn  # columns in whole blocks
    for m in range(flat_w.shape[0]):
        for r0 in range(0, R, step):
            w8 = flat_w[m, r0:r0 + step]
            rows = w8.shape[0]
            x = bits[:rows * C].view(rows, C).copy_(w8)  # sign-extended
            if e4m3:
                x.bitwise_left_shift_(7).bitwise_and_(~0x4000)  # the sign to bit 15, the exponent bias to fp16's
            else:
                x.bitwise_left_shift_(8)
            f = wide[:rows * C].view(rows, C).copy_(x.view(torch.float16))
            sc = flat_s[m, r0 // bm:(r0 + rows + bm - 1) // bm].repeat_interleave(bm, 0)[r0 % bm:r0 % bm + rows]
            if full:  # in fp32, then rounded once into `dtype`
                f[:, :full].unflatten(1, (full // bn, bn)).mul_(sc[:, :full // bn, None])
            if full < C:  # the ragged last column block
                f[:, full:].mul_(sc[:, -1:])
            if e4m3 and int(torch.bitwise_and(w8, 0x7F, out=magnitudes[:rows * C].view(rows, C)).max()) == 0x7F:
                f[(w8 & 0x7F) == 0x7F] = float("nan")  # e4m3fn's NaN (it has no inf), which the shifts made finite
            flat_out[m, r0:r0 + rows].copy_(f)
    return out


_FP8_SCALE = (".weight_scale_inv", "_scale_inv")  # per-module Linear weights; fused expert parameters


def _fp8_block(qconfig: dict) -> tuple[int, int] | None:
    block = qconfig.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise QuantizedModelError(f"quantization_config.weight_block_size {block!r}: expected two positive integers")
    return int(block[0]), int(block[1])


def _pair_fp8(raw: dict[str, tuple[torch.dtype, tuple[int, ...]]], qconfig: dict) -> dict[str, Packed]:
    block, out = _fp8_block(qconfig), {}
    for name in raw:
        suffix = next((s for s in _FP8_SCALE if name.endswith(s)), None)
        if suffix is None:
            continue
        values = name[:-len(suffix)] + (".weight" if suffix == ".weight_scale_inv" else "")
        if values not in raw or raw[values][0] not in _FP8_VALUE_DTYPES:
            raise QuantizedModelError(f"fp8 scale {name!r} has no float8 tensor {values!r} beside it")
        shape = raw[values][1]
        if len(shape) < 2:
            raise QuantizedModelError(f"fp8 tensor {values!r} has shape {shape}; expected [..., out, in]")
        *lead, R, C = shape
        bm, bn = block or (R, C)
        want = tuple([*lead, math.ceil(R / bm), math.ceil(C / bn)])
        if raw[name][1] != want and not (block is None and math.prod(raw[name][1]) == 1):
            raise QuantizedModelError(f"fp8 scale {name!r} has shape {raw[name][1]}; weight_block_size {block} over "
                                      f"{values!r} {shape} needs {want}")
        out[values] = Packed(values, name, shape)
    stray = [n for n, (dt, _) in raw.items() if dt in _FP8_VALUE_DTYPES and n not in out]
    if stray:
        raise QuantizedModelError(f"fp8 tensor {stray[0]!r} has no weight_scale_inv beside it")
    return out


def _read_fp8(reader: CheckpointReader, p: Packed, rows: Sequence[int] | None, qconfig: dict,
              dtype: torch.dtype) -> torch.Tensor:
    block = _fp8_block(qconfig)
    if rows is None:
        return dequantize_fp8(reader.read_raw(p.values), reader.read_raw(p.scales), block, dtype)
    if len(p.shape) > 2:  # rows of a fused [experts, out, in] tensor: each expert has its own scale grid
        return dequantize_fp8(reader.read_raw_rows(p.values, rows), reader.read_raw_rows(p.scales, rows), block, dtype)
    # rows of one [out, in] matrix: each row with its own row of scales (a block of one row)
    bm = block[0] if block else p.shape[0]
    weight = reader.read_raw_rows(p.values, rows)
    scales = reader.read_raw_rows(p.scales, [int(r) // bm for r in rows]) if block else reader.read_raw(p.scales)
    return dequantize_fp8(weight, scales, (1, block[1]) if block else None, dtype)


SCHEMES: dict[str, Scheme] = {s.method: s for s in (
    Scheme("mxfp4", ("openai/gpt-oss-20b", "openai/gpt-oss-120b"), _pair_mxfp4, _read_mxfp4),
    Scheme("fp8", ("deepseek-ai/DeepSeek-V3", "-V3.1", "-R1", "Qwen/Qwen3-30B-A3B-FP8", "Qwen/Qwen3-235B-A22B-FP8",
                   "MiniMaxAI/MiniMax-M2"), _pair_fp8, _read_fp8, extra_suffixes=(".activation_scale", ".input_scale")),
)}

# The way out for a scheme moe2dense does not read, by quant_method.
_WAY_OUT = {
    "compressed-tensors": "from transformers import CompressedTensorsConfig; AutoModelForCausalLM.from_pretrained("
    "path, quantization_config=CompressedTensorsConfig(run_compressed=False), dtype=torch.bfloat16)",
    "bitsandbytes": "load the original (unquantized) checkpoint instead: bitsandbytes weights cannot be saved "
    "dequantized losslessly",
}
_DEFAULT_WAY_OUT = ("load it on a machine where transformers runs that scheme, call model.dequantize() if the "
                    "scheme has it, and save_pretrained a bf16 copy")


def quant_method(qconfig: object) -> str:
    """quant_method of a quantization_config (a config.json dict or a transformers QuantizationConfig)."""
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method))  # QuantizationMethod is a str Enum


def scheme_of(qconfig: object, source: object = "the checkpoint") -> Scheme | None:
    """The scheme for a config's `quantization_config` (None when there is none); an unsupported one is refused in
    one line that names it, what is supported, and the way out."""
    if not qconfig:
        return None
    method = quant_method(qconfig)
    if method in SCHEMES:
        return SCHEMES[method]
    how = _WAY_OUT.get(method, _DEFAULT_WAY_OUT)
    raise QuantizedModelError(
        f"{source} is quantized with {method!r}, which moe2dense does not read (it reads "
        f"{', '.join(SCHEMES)} as they are published). Dequantize it first ({how}), then use that directory.")


def dequantized_dtype(raw_config: dict) -> torch.dtype:
    """The dtype a quantized checkpoint dequantizes into: its config's float dtype (bf16 when it names none)."""
    name = raw_config.get("dtype") or raw_config.get("torch_dtype")
    return _FLOAT_DTYPES.get(str(name), torch.bfloat16)
