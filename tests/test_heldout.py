"""The held-out measures (moe2dense/heldout.py) pinned bit for bit to the three loops they replaced (the screen's
perplexity, distillation's KL, the demo teacher's per-domain perplexity and usage): same figures, to the last bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe2dense.distill.loop import Objective, Worker, heldout_kl, heldout_kl_sums
from moe2dense.heldout import kl, perplexity
from moe2dense.teacher.metrics import perplexity_and_usage
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def models():
    return tiny_model("qwen3_moe", seed=0), tiny_model("qwen3_moe", seed=1)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).integers(0, 64, size=(11, 16)).astype(np.int32)  # 11: a short last batch


@torch.inference_mode()
def _screen_perplexity_before(model, rows, batch_rows=8):
    total, n = 0.0, 0
    for s in range(0, len(rows), batch_rows):
        ids = torch.from_numpy(rows[s:s + batch_rows].astype(np.int64))
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                         reduction="sum"))
        n += ids[:, 1:].numel()
    return math.exp(total / n)


@torch.no_grad()
def _heldout_kl_before(student, teacher, rows, batch_rows=8):
    total, n = 0.0, 0
    for s in range(0, len(rows), batch_rows):
        ids = torch.from_numpy(rows[s:s + batch_rows].astype(np.int64))
        log_p = teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        log_q = student(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        n += ids.numel()
    return total / n


@torch.no_grad()
def _teacher_nll_and_counts_before(model, ids, domains, batch_size=16):
    top_k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    nll_sum, n_tok, counts = {}, {}, None
    for i in range(0, len(ids), batch_size):
        batch = torch.from_numpy(ids[i: i + batch_size].astype(np.int64))
        out = model(input_ids=batch, output_router_logits=True)
        nll = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.size(-1)), batch[:, 1:].reshape(-1),
                              reduction="none").view(batch.size(0), -1).sum(1)
        for d, v in zip(domains[i: i + batch_size], nll.tolist()):
            nll_sum[d] = nll_sum.get(d, 0.0) + v
            n_tok[d] = n_tok.get(d, 0) + batch.size(1) - 1
        layer_counts = torch.stack([
            torch.bincount(rl.topk(top_k, dim=-1).indices.flatten(), minlength=n_exp) for rl in out.router_logits
        ])
        counts = layer_counts if counts is None else counts + layer_counts
    return nll_sum, n_tok, counts


@pytest.mark.parametrize("batch_rows", [8, 3, 11])
def test_perplexity_and_kl_equal_the_old_loops_bit_for_bit(models, rows, batch_rows):
    student, teacher = models
    assert perplexity(student, rows, batch_rows) == _screen_perplexity_before(student, rows, batch_rows)
    assert kl(student, teacher, rows, batch_rows) == _heldout_kl_before(student, teacher, rows, batch_rows)
    assert kl(teacher, teacher, rows, batch_rows) == 0.0


def test_perplexity_is_exp_of_the_mean_next_token_nll(models, rows):
    student, _ = models
    with torch.no_grad():
        logits = student(input_ids=torch.from_numpy(rows.astype(np.int64))).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 64), torch.from_numpy(rows[:, 1:].astype(np.int64)).reshape(-1))
    assert perplexity(student, rows, 4) == pytest.approx(math.exp(float(nll)), rel=1e-5)


@pytest.mark.parametrize("batch_rows", [16, 4])
def test_teacher_perplexity_by_domain_and_usage_equal_the_old_loop_bit_for_bit(models, rows, batch_rows):
    teacher = models[1]
    domains = ["a", "b", "a", "c", "b", "a", "a", "c", "b", "b", "a"]
    m = perplexity_and_usage(teacher, rows, domains, batch_rows)
    nll, n_tok, counts = _teacher_nll_and_counts_before(teacher, rows, domains, batch_rows)
    assert m["perplexity"] == math.exp(sum(nll.values()) / sum(n_tok.values()))
    assert m["perplexity_by_domain"] == {d: math.exp(nll[d] / n_tok[d]) for d in sorted(nll)}
    assert m["eval_tokens"] == 11 * 15
    assert m["routing"]["max_token_share"] == [round(float(c), 6) for c in counts.numpy().max(axis=1) / rows.size]
    assert counts.sum().item() == rows.size * 2 * teacher.config.num_hidden_layers  # top-2, every layer


# ---------------------------------------------------------------- the distill workers' held-out KL
def _worker(student, teacher, rank: int, world: int, rows_per_batch: int, teacher_dir=None) -> Worker:
    cfg = {"global_batch": rows_per_batch * world * 2, "accum": 2, "chunk_tokens": 20,  # 20: chunks cross rows
           "teacher_dir": str(teacher_dir), "teacher_top_k": None}
    return Worker(cfg, rank, world, torch.device("cpu"), teacher, None, Objective(student, cfg).train(), [], None,
                  None, None)


@pytest.mark.parametrize("world, rows_per_batch", [(1, 4), (2, 2), (3, 1)])
def test_worker_shares_sum_to_the_heldout_kl_with_as_many_forwards_on_every_rank(models, rows, world,
                                                                                 rows_per_batch):
    """Each rank's (KL sum, tokens) over rows rank::world add up to `kl` over all rows (11 rows: uneven shares; 3
    ranks of 1 row per batch: rank 2 runs a fourth, dropped forward so that DDP/FSDP collectives match)."""
    student, teacher = models
    sums, forwards = torch.zeros(2, dtype=torch.float64), []
    for rank in range(world):
        w = _worker(student, teacher, rank, world, rows_per_batch)
        calls = []
        w.objective.register_forward_hook(lambda *_: calls.append(1))
        sums += heldout_kl_sums(w, rows)
        forwards.append(len(calls))
        assert w.objective.training, "the student goes back to training mode"
    assert sums[1] == rows.size and len(set(forwards)) == 1, forwards
    assert forwards[0] == math.ceil(math.ceil(len(rows) / world) / rows_per_batch)
    assert float(sums[0] / sums[1]) == pytest.approx(kl(student, teacher, rows), rel=1e-5, abs=1e-7)
    if world == 1:
        assert heldout_kl(_worker(student, teacher, 0, 1, rows_per_batch), rows) == float(sums[0] / sums[1])


def test_worker_without_a_teacher_loads_it_for_the_measure_only(models, rows, tmp_path):
    """Cached-logits workers hold no teacher: the measure loads it (fp32 on CPU) and the worker still holds none."""
    student, teacher = models
    teacher.save_pretrained(tmp_path / "teacher")
    w = _worker(student, None, 0, 1, 4, teacher_dir=tmp_path / "teacher")
    assert heldout_kl(w, rows) == heldout_kl(_worker(student, teacher, 0, 1, 4), rows)
    assert w.teacher is None
