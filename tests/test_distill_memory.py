"""The distillation memory plan (hand-computed bytes, the teacher sharded only when it must be, the error naming
the params), its shapes read without weights, activation checkpointing (same loss and grads, layers recomputed),
the FSDP-sharded teacher (same logits as replicated, on CPU with gloo), MFU."""

from __future__ import annotations

import logging
import tempfile

import pytest
import torch

from moe2dense.distill import memory as M
from tiny_models import tiny_model

STUDENT = M.ModelShape(params=1000, trained=800, layers=2, hidden=8, vocab=50)
TEACHER = M.ModelShape(params=2000, trained=0, layers=2, hidden=16, vocab=50)


def _setup(**kw) -> M.Setup:
    base = dict(workers=2, cuda=True, strategy="ddp", micro_tokens=32, chunk_tokens=16,
                activation_checkpointing=False, teacher_cached=False)
    return M.Setup(**{**base, **kw})


def test_ddp_plan_counts_each_component_by_hand():
    p = M.plan(STUDENT, TEACHER, 4000, _setup(), capacity=None)
    assert {name: b for name, b, _ in p.rows} == {
        "student weights": 4 * 1000, "student grads": 4 * 800, "AdamW state": 8 * 800,
        "DDP gradient buckets": 4 * 800,
        "teacher weights": 4000,  # bf16 bytes as given, replicated
        "teacher forward": 32 * 16 * 18 * 2,  # tokens x hidden x (17 + 1) x 2 B
        "activations": 32 * 8 * 2 * 2 * 17,  # tokens x hidden x 2 B x layers x 17
        "loss chunk": 16 * 50 * 4 * 2}
    assert p.total == 63040 and not p.shard_teacher and p.trained_params == 800
    table = p.table().splitlines()
    assert table[0] == "| per device | GiB | how |" and table[-1].startswith("| total | 0.000 |")


def test_checkpointing_cpu_and_cached_teacher():
    p = M.plan(STUDENT, TEACHER, 4000, _setup(activation_checkpointing=True, cuda=False, teacher_cached=True,
                                              workers=1), capacity=None)
    rows = {name: b for name, b, _ in p.rows}
    assert "teacher weights" not in rows and "teacher forward" not in rows and "DDP gradient buckets" not in rows
    assert rows["activations"] == 32 * 8 * 4 * (2 + 17)  # fp32 on CPU: 2 layer inputs + one recomputed layer


def test_fsdp_shards_the_teacher_only_when_a_replicated_one_does_not_fit():
    s = _setup(strategy="fsdp")
    replicated = 2000 + 1600 + 3200 + 4000 + 18432 + 17408 + 6400  # student / 2 workers, no DDP buckets
    assert M.plan(STUDENT, TEACHER, 4000, s, capacity=None).total == replicated
    roomy = M.plan(STUDENT, TEACHER, 4000, s, capacity=replicated * 2)
    assert not roomy.shard_teacher and roomy.total == replicated
    tight = M.plan(STUDENT, TEACHER, 4000, s, capacity=57000)  # 0.9 x 57000 = 51300 < 53040
    assert tight.shard_teacher and tight.total == replicated - 2000
    M.check(tight, s, 57000)  # 51040 fits 51300
    assert not M.plan(STUDENT, TEACHER, 4000, _setup(strategy="fsdp", workers=1), capacity=100).shard_teacher


def test_a_plan_that_does_not_fit_names_the_params_to_change():
    s = _setup(strategy="fsdp")
    p = M.plan(STUDENT, TEACHER, 4000, s, capacity=45000)
    with pytest.raises(ValueError) as err:
        M.check(p, s, 45000, "NVIDIA H200")
    msg = str(err.value)
    assert "\n" not in msg and "NVIDIA H200" in msg and "distill.batch_size" in msg
    assert "distill.activation_checkpointing" in msg and "distill.teacher_logits" in msg
    assert "distill.workers" in msg and "distill.strategy" not in msg  # fsdp already


def test_cpu_plans_are_logged_never_refused(caplog):
    s = _setup(cuda=False)
    p = M.plan(STUDENT, TEACHER, 4000, s, capacity=None)
    with caplog.at_level(logging.INFO, logger="moe2dense.distill.memory"):
        M.check(p, s, capacity=1)
    assert "| student weights |" in caplog.text


def test_shapes_come_from_configs_and_headers(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    teacher = tiny_model("qwen3_moe")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           tie_word_embeddings=False))
    student.save_pretrained(tmp_path / "student")
    shape, nbytes = M.teacher_shape(tmp_path / "teacher", torch.bfloat16)
    n = sum(x.numel() for x in teacher.parameters())
    assert (shape.params, shape.layers, shape.hidden, shape.vocab, nbytes) == (n, 2, 32, 64, 2 * n)
    s = M.student_shape(tmp_path / "student", ["embeddings"])
    total = sum(x.numel() for x in student.parameters())
    assert (s.params, s.trained, s.layers, s.hidden, s.vocab) == (total, total - 64 * 16, 3, 16, 64)


def test_mfu_and_peaks():
    assert M.mfu(1_000_000, 1000.0, 1e12, 2) == pytest.approx(6e9 / 2e12)
    assert M.mfu(1, 1.0, None, 1) is None
    assert M.peak_flops(torch.device("cpu")) is None
    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12, "Tesla T4": None}
    for name, peak in names.items():
        assert next((v for k, v in M.PEAK_BF16 if k in name), None) == peak


# ---------------------------------------------------------------- activation checkpointing
def _objective_step(checkpointing: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from moe2dense.distill.loop import Objective

    torch.manual_seed(0)
    student = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           tie_word_embeddings=False, attention_dropout=0.0)).train()
    if checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    # a pre-hook: the recompute stops (early) once it has every saved tensor, before the MLP's forward hooks
    student.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    target = torch.randn(16, 64, generator=gen)
    cfg = dict(loss="forward_kl", temperature=1.0, loss_options={}, ce_weight=0.0, chunk_tokens=5)
    loss = Objective(student, cfg)(ids, lambda a, b: target[a:b], torch.full_like(ids, 0))
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in student.named_parameters()}, len(calls)


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    loss_off, grads_off, calls_off = _objective_step(False)
    loss_on, grads_on, calls_on = _objective_step(True)
    assert (calls_off, calls_on) == (1, 2)  # the layer really was recomputed in backward
    assert torch.allclose(loss_on, loss_off, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for k in grads_off:
        assert torch.allclose(grads_on[k], grads_off[k], atol=1e-6), k


# ---------------------------------------------------------------- the FSDP-sharded teacher
def test_sharded_teacher_gives_the_replicated_teachers_logits():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moe2dense import lm_head
    from moe2dense.distill.loop import _online_target, load_sharded_teacher

    teacher = tiny_model("qwen3_moe").eval().requires_grad_(False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _online_target(teacher, ids)(0, 16)
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", store=dist.FileStore(store.name, 1), rank=0, world_size=1)
        try:
            teacher = load_sharded_teacher(lambda: teacher, torch.device("cpu"))
            got = _online_target(teacher, ids)(0, 16)
            layer_weights = list(lm_head.decoder(teacher).layers[0].parameters())
            assert layer_weights and all(isinstance(w, DTensor) for w in layer_weights)  # resharded after forward
            assert not isinstance(teacher.get_output_embeddings().weight, DTensor)  # replicated for the loss
        finally:
            dist.destroy_process_group()
    torch.testing.assert_close(got, ref)


def _sharded_rank(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a 2-process gloo group: the teacher loaded in turns and sharded, then its logits."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moe2dense import lm_head
    from moe2dense.distill.loop import _online_target, load_sharded_teacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        teacher = load_sharded_teacher(lambda: tiny_model("qwen3_moe").eval().requires_grad_(False),
                                       torch.device("cpu"))
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        logits = _online_target(teacher, ids)(0, 16)
        local = lm_head.decoder(teacher).layers[0].mlp.gate.weight
        assert isinstance(local, DTensor) and local.to_local().shape[0] < local.shape[0]  # half the rows here
        torch.save(logits, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_teacher_and_give_its_logits(tmp_path):
    import torch.multiprocessing as mp

    from moe2dense.distill.loop import _online_target

    mp.spawn(_sharded_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "logits")), nprocs=2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _online_target(tiny_model("qwen3_moe").eval().requires_grad_(False), ids)(0, 16)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"logits.{rank}"), ref)


def test_prepare_refuses_a_plan_a_gpu_cannot_hold_before_loading_a_weight(tmp_path, monkeypatch):
    """driver.plan_memory reads configs and safetensors headers only (from_pretrained is never called)."""
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from moe2dense.distill import driver
    from moe2dense.params import DistillParams

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "teacher")
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(
        tmp_path / "student")
    monkeypatch.setattr(driver, "gpu_memory", lambda: (2**16, "NVIDIA H200"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    p = DistillParams(batch_size=8, workers=2, strategy="fsdp", activation_checkpointing=True)
    with pytest.raises(ValueError, match=r"^distill memory plan: .* GiB of NVIDIA H200; lower distill.batch_size"):
        driver.plan_memory(p, tmp_path / "student", tmp_path / "teacher", seq_len=64, workers=2, use_gpu=True,
                           cached=False)
    monkeypatch.setattr(driver, "gpu_memory", lambda: (2**40, "NVIDIA H200"))
    plan = driver.plan_memory(p, tmp_path / "student", tmp_path / "teacher", seq_len=64, workers=2, use_gpu=True,
                              cached=False)
    assert not plan.shard_teacher and plan.trained_params == sum(
        x.numel() for x in Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        num_key_value_heads=1, head_dim=8)).parameters())
