"""Quantized teachers (moe2dense/quantized.py): MXFP4 (GPT-OSS) and block-wise FP8 (DeepSeek-V3) checkpoints that
the test quantizes itself from a bf16 model, writing the packed formats from their definitions.

Pinned: the dequantized tensors equal transformers' own dequantizers and a plain NumPy one, bit for bit; the reader
shows a quantized checkpoint as its float twin (the bf16 checkpoint holding those dequantized values); `convert` in
both offload modes writes the twin's student byte for byte; the whole-model loader gives the twin's logits; an
unsupported scheme or a broken packed format is refused in one line before any weight is read."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_config

from quantize import numpy_fp8, numpy_mxfp4, quantize_checkpoint, quantize_fp8

from moe2dense.__main__ import main
from moe2dense.arch import QuantizedModelError, get_adapter
from moe2dense.checkpoint import CheckpointReader
from moe2dense.convert import PLAN_FILE
from moe2dense.data.tokenizer import train_bpe
from moe2dense.quantized import dequantize_fp8, dequantize_mxfp4
from moe2dense.teacher.load import load_frozen
from moe2dense.teacher.source import validate_checkpoint_dir

CPU = torch.device("cpu")
FP8_BLOCK = [16, 16]  # DeepSeek-V3 publishes [128, 128]; the tiny model needs smaller blocks to have several


# --------------------------------------------------------------------------------------------------- checkpoints
def quantizable_config(scheme: str):
    """The tiny family a published scheme goes with: gpt_oss (experts 32 wide: MXFP4 packs 32 input values per
    scale) for mxfp4, deepseek_v3 for fp8."""
    if scheme == "fp8":
        return tiny_config("deepseek_v3")
    config = tiny_config("gpt_oss")
    config.hidden_size, config.intermediate_size = 64, 32
    return config


@pytest.fixture(scope="module", params=["mxfp4", "fp8"])
def pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(scheme, quantized dir, float twin dir): a bf16 tiny teacher with a tokenizer, quantized by the definitions
    in tests/quantize.py; the twin holds the reference (NumPy) dequantization of the same tensors."""
    from transformers import AutoModelForCausalLM

    scheme = request.param
    root = tmp_path_factory.mktemp(scheme)
    q_dir, twin_dir = root / "quantized", root / "twin"
    texts = [f"In the beginning {i} the word was {i * 7} and the light was good.\n" * 3 for i in range(200)]
    for d in (q_dir, twin_dir):
        d.mkdir()
        train_bpe(texts, vocab_size=300, min_frequency=2, out_dir=d)
    config = quantizable_config(scheme)
    config.vocab_size, config.max_position_embeddings = 320, 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias") and ".experts." in name:
                p.normal_(0.0, 0.1)  # gpt_oss inits expert biases to zero
    model.to(torch.bfloat16).save_pretrained(twin_dir)
    twin = quantize_checkpoint(twin_dir, q_dir, scheme, FP8_BLOCK)
    save_file(twin, twin_dir / "model.safetensors", metadata={"format": "pt"})
    for f in twin_dir.glob("*.json"):
        if not (q_dir / f.name).exists():
            shutil.copy(f, q_dir / f.name)
    return scheme, q_dir, twin_dir


# ------------------------------------------------------------------------------------------------ dequantizers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantization_equals_transformers_and_numpy(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 40, 4), generator=g, dtype=torch.uint8)
    scales[0, 0, 0], scales[1, 2, 3] = 0, 254  # the extremes of e8m0: 2^-127 (subnormal) and 2^127
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert ours.shape == (3, 128, 40) and ours.dtype == dtype
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert torch.equal(ours.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(ours, torch.from_numpy(numpy_mxfp4(blocks, scales)).to(dtype))


def test_mxfp4_by_hand():
    """One block: byte 0x21 = (0.5 low nibble, 1.0 high), 0xF7 = (6.0, -6.0), scale byte 128 = x2."""
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0], blocks[0, 0, 0, 1] = 0x21, 0xF7
    out = dequantize_mxfp4(blocks, torch.full((1, 1, 1), 128, dtype=torch.uint8), torch.float32)
    assert out.shape == (1, 32, 1)
    assert out[0, :4, 0].tolist() == [1.0, 2.0, 12.0, -12.0] and not out[0, 4:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dequantization_equals_transformers_and_numpy(dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * 3
    q, s = quantize_fp8(w, FP8_BLOCK)
    ours = dequantize_fp8(q, s, tuple(FP8_BLOCK), dtype)
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, torch.from_numpy(numpy_fp8(q, s, FP8_BLOCK)).to(dtype))
    # transformers needs shapes divisible by the block; DeepSeek's grid is ceil(R/bm) x ceil(C/bn): NumPy only
    q, s = quantize_fp8(w[:40, :37], FP8_BLOCK)
    assert s.shape == (3, 3)
    assert torch.equal(dequantize_fp8(q, s, tuple(FP8_BLOCK), dtype),
                       torch.from_numpy(numpy_fp8(q, s, FP8_BLOCK)).to(dtype))


def test_fp8_ue8m0_scales_and_by_hand():
    """Scales stored as e8m0 exponent bytes (ue8m0 checkpoints): byte 126 = 0.5; the value 1.5 in e4m3 is 0x3C."""
    q = torch.full((2, 2), 0x3C, dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = dequantize_fp8(q, torch.tensor([[126]], dtype=torch.uint8), (128, 128), torch.float32)
    assert out.tolist() == [[0.75, 0.75], [0.75, 0.75]]
    e8m0 = torch.tensor([[126]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert torch.equal(dequantize_fp8(q, e8m0, (128, 128), torch.float32), out)


# ------------------------------------------------------------------------------------------------------ reader
def test_reader_shows_the_float_twin(pair):
    scheme, q_dir, twin_dir = pair
    with CheckpointReader(q_dir) as q, CheckpointReader(twin_dir) as t:
        assert q.quantization.method == scheme and t.quantization is None
        assert q.keys() == t.keys()
        assert any(q.is_quantized(k) for k in q.keys()) and len(q.raw_keys()) > len(q.keys())
        for k in t.keys():
            assert q.shape(k) == t.shape(k) and q.dtype(k) == t.dtype(k) and q.nbytes(k) == t.nbytes(k), k
            assert torch.equal(q.read(k), t.read(k)), k
            if q.is_quantized(k):
                rows = [q.shape(k)[0] - 1, 0, 1]
                assert torch.equal(q.read_rows(k, rows), t.read(k)[rows]), k
        fused = [k for k in q.keys() if q.is_quantized(k) and len(q.shape(k)) == 3]
        if fused:  # gpt_oss: reading two experts reads only their packed rows
            before = q.bytes_read
            q.read_rows(fused[0], [1, 2])
            E = q.shape(fused[0])[0]
            total = sum(q._entries[fused[0] + part].nbytes for part in ("_blocks", "_scales"))
            assert q.bytes_read - before == 2 * total // E


def test_adapter_and_validation_accept_the_published_schemes(pair):
    _, q_dir, _ = pair
    raw = validate_checkpoint_dir(q_dir)
    from transformers import AutoConfig

    assert get_adapter(AutoConfig.from_pretrained(q_dir)).model_type == raw["model_type"]


# --------------------------------------------------------------------------------------------------- the stages
def test_convert_quantized_teacher_writes_the_twins_student(pair, tmp_path):
    """convert on the quantized checkpoint (layer and whole-model calibration) = convert on its float twin, byte for
    byte: calibrate, group and assemble all read the dequantized weights the twin stores."""
    scheme, q_dir, twin_dir = pair
    outs = {}
    for name, teacher, offload in (("twin", twin_dir, "none"), ("none", q_dir, "none"), ("layer", q_dir, "layer")):
        outs[name] = tmp_path / name
        assert main(["convert", "--teacher", str(teacher), "--method", "do_acp", "--experts", "4", "--group",
                     "output", "--calibration-tokens", "256", "--seq-len", "64", "--offload", offload,
                     "--out", str(outs[name])]) == 0
    weights = {n: (d / "model.safetensors").read_bytes() for n, d in outs.items()}
    plans = {n: (d / PLAN_FILE).read_text() for n, d in outs.items()}
    assert weights["none"] == weights["twin"] == weights["layer"]
    assert plans["none"] == plans["layer"]
    config = json.loads((outs["none"] / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with CheckpointReader(outs["none"]) as student:
        assert student.quantization is None
        assert all(student.dtype(k) in (torch.bfloat16, torch.float32) for k in student.keys())


def test_whole_model_load_gives_the_twins_logits(pair):
    """teacher_logits, distill and evaluate load the teacher whole (load_frozen / from_checkpoint): a quantized
    checkpoint, dequantized layer by layer, is the twin's model: the same parameters, the same logits."""
    from moe2dense.evaluate.runner import load_model
    from moe2dense.params import EvaluateParams

    _, q_dir, twin_dir = pair
    q, t = (load_frozen(d, torch.float32, CPU) for d in (q_dir, twin_dir))
    assert not any(p.is_meta for p in q.parameters()) and not q.training
    qs, ts = q.state_dict(), t.state_dict()
    assert qs.keys() == ts.keys() and all(torch.equal(qs[k], ts[k]) for k in ts)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, t(ids).logits)
    model, _ = load_model(q_dir, EvaluateParams(dtype="auto", device="cpu"))
    assert next(model.parameters()).dtype == torch.bfloat16  # "auto": the dtype it dequantizes into


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_unsupported_scheme_is_refused_before_any_weight(pair, method, tmp_path, monkeypatch, capsys):
    _, q_dir, _ = pair
    bad = tmp_path / "bad"
    shutil.copytree(q_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))

    def no_reads(*a, **k):
        raise AssertionError("a weight was read")
    monkeypatch.setattr(CheckpointReader, "read_raw", no_reads)
    monkeypatch.setattr(CheckpointReader, "read_raw_rows", no_reads)
    with pytest.raises(QuantizedModelError, match=f"quantized with '{method}'"):
        validate_checkpoint_dir(bad)
    with pytest.raises(QuantizedModelError, match="mxfp4, fp8"):
        CheckpointReader(bad)
    assert main(["convert", "--teacher", str(bad), "--method", "sf", "--experts", "2", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and method in err and "Dequantize it first" in err
    assert not (tmp_path / "o").exists()


def test_broken_packed_tensors_are_refused(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": {
        "quant_method": "mxfp4"}}))
    save_file({"a.experts.down_proj_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8)}, d / "model.safetensors")
    with pytest.raises(QuantizedModelError, match="has no 'a.experts.down_proj_scales'"):
        CheckpointReader(d)
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    save_file({"l.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, d / "model.safetensors")
    with pytest.raises(QuantizedModelError, match="'l.weight' has no weight_scale_inv"):
        CheckpointReader(d)
    save_file({"l.weight": torch.zeros(300, 4).to(torch.float8_e4m3fn), "l.weight_scale_inv": torch.ones(2, 1)},
              d / "model.safetensors")
    with pytest.raises(QuantizedModelError, match=r"needs \(3, 1\)"):
        CheckpointReader(d)


def test_readme_lists_each_scheme_and_its_checkpoints():
    from moe2dense.quantized import SCHEMES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    for method, scheme in SCHEMES.items():
        assert method in rows, f"README's quantized-teacher table has no row for {method}"
        assert all(f"`{c}`" in rows[method] for c in scheme.published), method


def test_teacher_stage_records_a_quantized_checkpoint_as_it_is(pair, tmp_path):
    """`teacher.source` pointing at a published quantized checkpoint: validated, recorded by a pointer (no copy of its
    weights), its scheme in the metrics."""
    from moe2dense.teacher.build import record_real_teacher

    scheme, q_dir, _ = pair
    out = tmp_path / "teacher"
    out.mkdir()
    metrics = record_real_teacher(str(q_dir), out)
    assert metrics["quantization"] == scheme and metrics["num_experts"] == 8 and not list(out.glob("*.safetensors"))
    assert json.loads((out / "source.json").read_text())["path"] == str(q_dir.resolve())


def test_fp8_e5m2_and_nan_bytes_dequantize_as_torch_converts_them():
    """The float8 -> float16 bit shifts agree with torch's own conversion on all 256 bytes of both formats, NaN
    included (e4m3fn's 0x7F / 0xFF), across a ragged block grid."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(3, 1)  # [3, 256]: a 2 x 2 grid of 2 x 128
    scales = torch.tensor([[0.5, 3.0], [0.25, 1.0]])
    for fmt in (torch.float8_e4m3fn, torch.float8_e5m2):
        w = every.view(fmt)
        expected = w.float() * scales.repeat_interleave(2, 0)[:3].repeat_interleave(128, 1)
        for dtype in (torch.float32, torch.bfloat16):
            got = dequantize_fp8(w, scales, (2, 128), dtype)
            torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=0, equal_nan=True, msg=str(fmt))
