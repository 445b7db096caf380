"""Layer-by-layer calibration (calibrate.offload: layer) gives the whole-model capture's routing rows, stats and
selections on every family's saved tiny checkpoint; the hidden states spill to a memmap that is removed; auto
chooses as documented; bad offload values are one-line errors; the all-experts block is sized by its budget."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_convert import teacher  # noqa: F401  (the tiny Qwen3-MoE teacher with a tokenizer)
from tiny_models import FAMILIES, tiny_config, tiny_model

import moe2dense.calibrate.layerwise as LW
from moe2dense.__main__ import main
from moe2dense.arch import get_adapter
from moe2dense.calibrate import capture as C
from moe2dense.calibrate.capture import capture_checkpoint, expert_chunk
from moe2dense.calibrate.store import read_meta, routing_path
from moe2dense.convert import PLAN_FILE
from moe2dense.params import ParamsError, parse_params
from moe2dense.selection import score_frame, select_from_scores

ALL = {"routing", "routed_outputs", "all_outputs"}
CPU = torch.device("cpu")
METHODS = ["sf", "pp", "cp", "ean", "reap", "acp", "do_acp"]


def _batches(vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (3, 12), generator=g), ["web", "code", "web"]),
            (torch.randint(0, vocab, (2, 12), generator=g), ["math", "math"])]


def _calibrate(ckpt: Path, out: Path, offload: str, **kw) -> dict:
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    return capture_checkpoint(ckpt, _batches(vocab), out, offload=offload, dtype=torch.float32, device=CPU,
                              needs=ALL, store_probs=True, token_chunk=7, progress=False, writer_threads=0, **kw)


def _assert_same_run(a_root: Path, a: dict, b_root: Path, b: dict, layers: list[int]) -> None:
    assert a.keys() == b.keys() == set(layers)
    for layer in layers:
        for field in ("count", "prob_sum", "prob_sum_selected", "weight_sum", "norm_sum_routed", "gnorm_sum_routed",
                      "norm_sum_all", "sqnorm_sum_all", "gram"):
            torch.testing.assert_close(getattr(a[layer], field), getattr(b[layer], field), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"layer {layer} {field}: {m}")
        ra, rb = (pq.read_table(routing_path(r, layer)).to_pydict() for r in (a_root, b_root))
        for col in ("seq", "pos", "domain", "experts"):
            assert ra[col] == rb[col], (layer, col)
        np.testing.assert_allclose(ra["weights"], rb["weights"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ra["probs"], rb["probs"], rtol=1e-3, atol=1e-3)  # float16
    meta_a, meta_b = read_meta(a_root), read_meta(b_root)
    shared_a, shared_b = meta_a.pop("shared_gate_mean"), meta_b.pop("shared_gate_mean")
    assert meta_a == meta_b and shared_a.keys() == shared_b.keys()
    for key in shared_a:
        assert shared_a[key] == pytest.approx(shared_b[key], rel=1e-5)


def _save(family: str, path: Path) -> Path:
    tiny_model(family).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_mode_equals_whole_model(family, tmp_path):
    ckpt = _save(family, tmp_path / "teacher")
    whole = _calibrate(ckpt, tmp_path / "whole", "none")
    layer = _calibrate(ckpt, tmp_path / "layer", "layer")
    adapter = get_adapter(tiny_config(family))
    _assert_same_run(tmp_path / "whole", whole, tmp_path / "layer", layer, adapter.moe_layers)
    K, k = adapter.top_k + 2, adapter.top_k
    frames = [score_frame(s, METHODS) for s in (whole, layer)]
    for method in METHODS:
        assert select_from_scores(frames[0], method, K, k) == select_from_scores(frames[1], method, K, k), method


def test_hidden_states_spill_to_a_memmap_that_is_removed(tmp_path, monkeypatch):
    ckpt = _save("qwen3_moe", tmp_path / "teacher")
    buffers = []

    class Spy(LW.HiddenBuffer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            buffers.append(self)
            self.spilled_dir = self.dir

    monkeypatch.setattr(LW, "HiddenBuffer", Spy)
    ram = _calibrate(ckpt, tmp_path / "ram", "layer", host_limit=2**30)
    spilled = _calibrate(ckpt, tmp_path / "spill", "layer", host_limit=0)
    assert [b.spilled_dir is None for b in buffers] == [True, False]
    assert not Path(buffers[1].spilled_dir).exists()  # removed afterwards
    layers = get_adapter(tiny_config("qwen3_moe")).moe_layers
    _assert_same_run(tmp_path / "ram", ram, tmp_path / "spill", spilled, layers)
    for layer in ram:  # the same bytes went through the layers: bit-identical
        assert torch.equal(ram[layer].gram, spilled[layer].gram)


def test_spill_buffer_roundtrips_bfloat16(tmp_path):
    buf = LW.HiddenBuffer(5, 3, torch.bfloat16, host_limit=0)
    try:
        x = torch.randn(5, 3).to(torch.bfloat16)
        buf.data[1:4] = x[1:4]
        assert buf.spilled and torch.equal(buf.data[1:4], x[1:4])
        assert (Path(buf.dir) / "hidden.bin").stat().st_size == 5 * 3 * 2
    finally:
        d = buf.dir
        buf.close()
    assert not Path(d).exists()


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """A header-only-correct safetensors file: name -> (dtype, shape, itemsize), zero data."""
    header, pos = {}, 0
    for name, (dtype, shape, itemsize) in tensors.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * pos)


def test_auto_chooses_whole_model_only_when_it_fits_with_margin(tmp_path, monkeypatch):
    # 10 bf16 weights + 4 fp32 weights + 3 int64 positions: in float32 (10 + 4) * 4 + 3 * 8 = 80 bytes,
    # in bfloat16 (10 + 4) * 2 + 24 = 52 bytes (integer tensors keep their dtype).
    _safetensors(tmp_path / "model.safetensors", {"a": ("BF16", [2, 5], 2), "b": ("F32", [4], 4),
                                                  "pos": ("I64", [3], 8)})
    from moe2dense.checkpoint import CheckpointReader
    with CheckpointReader(tmp_path) as r:
        assert LW.weight_bytes(r, torch.float32) == 80 and LW.weight_bytes(r, torch.bfloat16) == 52

    def choose(free: dict, dtype=torch.float32) -> str:
        monkeypatch.setattr(LW, "available_bytes", lambda device: free)
        return LW.choose_offload("auto", tmp_path, dtype, CPU)

    assert choose({"host": 160}) == "none"  # 80 x HOST_MARGIN 2.0 = 160 fits
    assert choose({"host": 159}) == "layer"
    assert choose({"host": 104}, torch.bfloat16) == "none"
    assert choose({"host": 10**6, "device": 100}) == "none"  # 80 x DEVICE_MARGIN 1.25 = 100 fits the GPU
    assert choose({"host": 10**6, "device": 99}) == "layer"
    assert choose({"host": 159, "device": 10**6}) == "layer"  # from_pretrained loads on the host first
    monkeypatch.setattr(LW, "available_bytes", lambda device: pytest.fail("explicit modes measure nothing"))
    assert LW.choose_offload("layer", tmp_path, torch.float32, CPU) == "layer"
    assert LW.choose_offload("none", tmp_path, torch.float32, CPU) == "none"


def test_auto_logs_the_choice_and_why(tmp_path, monkeypatch, caplog):
    _safetensors(tmp_path / "model.safetensors", {"a": ("F32", [2**20], 4)})
    monkeypatch.setattr(LW, "available_bytes", lambda device: {"host": 2**30})
    with caplog.at_level("INFO", logger=LW.__name__):
        assert LW.choose_offload("auto", tmp_path, torch.float32, CPU) == "none"
    assert "calibrate.offload auto -> none: teacher weights 0.0 GiB in float32; host free 1.0 GiB (needs 2.0x)" \
        in caplog.text


def test_bad_offload_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ParamsError) as err:
        parse_params({"calibrate": {"offload": "disk"}}, "params.yaml")
    line = "calibrate.offload: Input should be 'auto', 'layer' or 'none' (got 'disk')"
    assert line in str(err.value).splitlines()[-1]
    with pytest.raises(ValueError, match=r"^calibrate.offload 'disk': choose auto, layer, none$"):
        LW.check_offload("disk")
    ckpt = _save("qwen3_moe", tmp_path / "teacher")
    capsys.readouterr()
    assert main(["convert", "--teacher", str(ckpt), "--method", "sf", "--experts", "4", "--offload", "disk",
                 "--out", str(tmp_path / "dense")]) == 2
    assert capsys.readouterr().err == ("[convert] error: --offload: Input should be 'auto', 'layer' or 'none' "
                                       "(got 'disk')\n")


def test_generic_family_is_refused_in_layer_mode(tmp_path, monkeypatch):
    ckpt = _save("qwen3_moe", tmp_path / "teacher")
    monkeypatch.setattr(LW, "is_generic", lambda adapter: True)
    with pytest.raises(ValueError, match=r"^model_type 'qwen3_moe' has no written family spec: calibrate.offload: "
                                         r"layer cannot verify it; use calibrate.offload: none$"):
        _calibrate(ckpt, tmp_path / "out", "layer")


def test_expert_chunk_is_bounded_by_the_budget_and_token_chunk():
    adapter = get_adapter(tiny_config("qwen3_moe"))  # 8 experts, moe_intermediate_size 16
    E, I, H = adapter.num_experts, adapter.intermediate_size, 32
    per_token = E * (5 * I + 2 * H) * 2  # bf16: 8 * (80 + 64) * 2 = 2304 bytes
    assert per_token == 2304
    assert expert_chunk(adapter, H, torch.bfloat16, 4096, 10 * 2304 + 5) == 10
    assert expert_chunk(adapter, H, torch.bfloat16, 7, 10 * 2304) == 7
    assert expert_chunk(adapter, H, torch.float32, 4096, 10 * 2304) == 5
    assert expert_chunk(adapter, H, torch.bfloat16, 4096, 1) == 1


def test_gram_from_fp32_slices_equals_the_whole_block(tmp_path, monkeypatch):
    """Slicing the block for its fp32 copy changes only the summation order (bf16 teacher)."""
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    batches = _batches(model.config.vocab_size)
    whole = C.capture(model, batches, tmp_path / "a", needs=ALL, token_chunk=64, progress=False)
    monkeypatch.setattr(C, "FP32_SLICE_BYTES", 8 * 32 * 4 * 3)  # 3 tokens per fp32 slice
    sliced = C.capture(model, batches, tmp_path / "b", needs=ALL, token_chunk=64, progress=False)
    for layer in whole:
        for field in ("gram", "norm_sum_all", "sqnorm_sum_all", "norm_sum_routed"):
            torch.testing.assert_close(getattr(whole[layer], field), getattr(sliced[layer], field), rtol=1e-5, atol=0)


def test_convert_gives_the_same_student_in_both_modes(teacher, tmp_path, caplog):
    """`convert --offload layer` and `--offload none`: the same plan and byte-identical student weights."""
    students = {}
    for mode in ("none", "layer"):
        out = tmp_path / mode
        with caplog.at_level("INFO"):
            assert main(["convert", "--teacher", str(teacher), "--method", "do_acp", "--experts", "4", "--group",
                         "output", "--calibration-tokens", "256", "--seq-len", "64", "--offload", mode,
                         "--out", str(out)]) == 0
        assert f"calibrate.offload: {mode} (as set)" in caplog.text
        students[mode] = out
    assert (students["none"] / PLAN_FILE).read_text() == (students["layer"] / PLAN_FILE).read_text()
    weights = [(students[mode] / "model.safetensors").read_bytes() for mode in ("none", "layer")]
    assert weights[0] == weights[1]
