"""Teacher pieces against hand-computed values, a short real training run, and real-checkpoint validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moe2dense.params import DemoModelParams, DemoTrainParams, TeacherParams
from moe2dense.teacher.build import record_real_teacher
from moe2dense.teacher.demo import batches, demo_config, train_demo
from moe2dense.teacher.metrics import routing_health, unigram_perplexity
from moe2dense.teacher.source import TeacherSourceError, resolve_checkpoint, teacher_checkpoint
from moe2dense.training import warmup_cosine_lr


def test_lr_schedule_warmup_then_cosine_to_floor():
    assert [warmup_cosine_lr(s, 14, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine_lr(4, 14, 4, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_lr(9, 14, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert warmup_cosine_lr(14, 14, 4, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, 14, 4, 0.1, lr=2.0) == pytest.approx(2 * (0.1 + 0.9 * 0.5))


def test_batches_cover_each_row_once_per_epoch():
    train = np.arange(12, dtype=np.int32).reshape(6, 2)
    seen = [b[:, 0].tolist() for b in batches(train, batch_size=2, steps=6, seed=0)]
    first, second = sorted(sum(seen[:3], [])), sorted(sum(seen[3:], []))
    assert first == second == [0, 2, 4, 6, 8, 10]


def test_routing_health_hand_example():
    # 2 layers, 3 experts, 4 tokens, top-1. Layer 0 selections (2, 1, 1); layer 1 all on expert 0.
    h = routing_health(np.array([[2, 1, 1], [4, 0, 0]]), n_tokens=4, top_k=1)
    ent0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397
    assert h["usage_entropy"] == pytest.approx([ent0, 0.0], abs=1e-6)
    assert h["usage_entropy_normalized"] == pytest.approx([ent0 / math.log(3), 0.0], abs=1e-6)
    assert h["max_token_share"] == [0.5, 1.0]
    assert h["balanced_token_share"] == pytest.approx(1 / 3)


def test_unigram_perplexity_hand_example():
    # train counts (2, 1, 0) + 1 -> p = (3, 2, 1) / 6; eval targets are tokens 1 and 2 (first position skipped)
    ppl = unigram_perplexity(np.array([[0, 0, 1]]), np.array([[0, 1, 2]]), vocab_size=3)
    assert ppl == pytest.approx(math.exp(-(math.log(2 / 6) + math.log(1 / 6)) / 2))  # sqrt(18)


def test_demo_training_really_learns_and_balances():
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    m = DemoModelParams(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=16)
    model = Qwen3MoeForCausalLM(demo_config(m, vocab_size=64, seq_len=32, eos_id=0, pad_id=None))
    rng = np.random.default_rng(0)
    # A learnable language: each token is followed by (token * 7 + 3) % 64 most of the time.
    rows = np.empty((64, 32), dtype=np.int32)
    rows[:, 0] = rng.integers(0, 64, 64)
    for j in range(1, 32):
        rows[:, j] = np.where(rng.random(64) < 0.9, (rows[:, j - 1] * 7 + 3) % 64, rng.integers(0, 64, 64))
    log = train_demo(model, rows, DemoTrainParams(tokens=32 * 8 * 60, batch_size=8, lr=1e-2, warmup_steps=5,
                                                  log_every=10), seed=0, progress=False)
    assert log.rows[-1]["loss"] < 0.6 * log.rows[0]["loss"], log.rows
    assert log.tokens == 32 * 8 * 60 and log.tokens_per_s > 0


def test_small_train_split_is_a_clear_error():
    from transformers import Qwen3MoeForCausalLM

    m = DemoModelParams(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=8)
    model = Qwen3MoeForCausalLM(demo_config(m, vocab_size=16, seq_len=8, eos_id=0, pad_id=None))
    with pytest.raises(ValueError, match="fewer than teacher.train.batch_size"):
        train_demo(model, np.zeros((2, 8), dtype=np.int32), DemoTrainParams(batch_size=4), seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny qwen3_moe checkpoint with a tokenizer, as a user would point teacher.source at."""
    from tiny_models import tiny_model

    from moe2dense.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("ckpt")
    tiny_model("qwen3_moe").save_pretrained(path)
    train_bpe(["some text to learn merges from"] * 20, vocab_size=280, min_frequency=1, out_dir=path)
    return path


def test_real_teacher_is_validated_and_recorded_not_copied(tiny_checkpoint, tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    metrics = record_real_teacher(str(tiny_checkpoint), out)
    assert metrics == {"source": str(tiny_checkpoint), "trained": False, "model_type": "qwen3_moe", "num_experts": 8,
                       "top_k": 2, "moe_layers": 2, "weight_files": 1}
    assert not list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    assert json.loads((out / "source.json").read_text())["path"] == str(tiny_checkpoint.resolve())
    assert teacher_checkpoint(out) == tiny_checkpoint.resolve()


def test_real_teacher_errors(tiny_checkpoint, tmp_path):
    from transformers import LlamaConfig

    with pytest.raises(TeacherSourceError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(TeacherSourceError, match="neither a local directory nor a hub id in the local HF cache"):
        resolve_checkpoint("no-such-org/no-such-moe")
    dense = tmp_path / "dense"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=32).save_pretrained(dense)
    with pytest.raises(ValueError, match="qwen3_moe"):  # lists the supported families
        record_real_teacher(str(dense), tmp_path)
    with pytest.raises(TeacherSourceError, match="holds no teacher"):
        teacher_checkpoint(tmp_path / "empty")


def test_teacher_params_reject_empty_source():
    with pytest.raises(ValueError):
        TeacherParams(source="  ")


def test_smoke_teacher_is_byte_reproducible(tmp_path, smoke_params):
    """The smoke teacher trained twice -> identical weight bytes, metrics and loss log. Two torch threads put the
    parallel CPU reductions in play (the experts kernel's gather backward varied run to run before the fix)."""
    from moe2dense.data.prepare import prepare_corpus
    from moe2dense.params import load_params
    from moe2dense.teacher.build import build_demo_teacher

    p = load_params(smoke_params)
    prepare_corpus(p.prepare, tmp_path / "data", None)
    t = p.teacher.model_copy(update={"threads": 2, "train": p.teacher.train.model_copy(update={"tokens": 4096})})
    threads = torch.get_num_threads()
    runs = []
    try:
        for i in range(2):
            out = tmp_path / f"teacher{i}"
            out.mkdir()
            metrics, rows, timings = build_demo_teacher(t, tmp_path / "data", out, progress=False)
            runs.append(((out / "model.safetensors").read_bytes(), json.dumps(metrics, sort_keys=True), rows))
            assert timings["train_tokens_per_s"] > 0 and "train_tokens_per_s" not in metrics
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored after training


def test_load_teacher_is_frozen_validated_and_routes_to_top_k(tiny_checkpoint, tmp_path):
    """The one teacher loader (calibrate, teacher_logits; distill's workers call load_frozen, which it wraps)."""
    from moe2dense.teacher.load import load_frozen, load_teacher

    ids = torch.arange(3, 19).view(2, 8)
    trained = load_teacher(tiny_checkpoint, "float32", "cpu")
    wide = load_teacher(tiny_checkpoint, "float32", torch.device("cpu"), top_k=4)
    assert not trained.training and not any(p.requires_grad for p in trained.parameters())
    assert (trained.config.num_experts_per_tok, wide.config.num_experts_per_tok) == (2, 4)
    with torch.no_grad():
        assert not torch.equal(trained(input_ids=ids).logits, wide(input_ids=ids).logits)
        same = load_frozen(tiny_checkpoint, torch.float32, torch.device("cpu"))
        assert torch.equal(trained(input_ids=ids).logits, same(input_ids=ids).logits)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):  # validated before any weight is read
        load_teacher(tmp_path)


def test_a_teacher_runs_in_bf16_on_cuda_and_fp32_on_cpu(tiny_checkpoint):
    """run_dtype: what distill's workers, their held-out KL and teacher_logits load the teacher in."""
    from moe2dense.teacher.load import load_teacher, run_dtype

    assert run_dtype(torch.device("cuda", 0)) == torch.bfloat16 and run_dtype(torch.device("cpu")) == torch.float32
    teacher = load_teacher(tiny_checkpoint, run_dtype(torch.device("cpu")), "cpu")
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
