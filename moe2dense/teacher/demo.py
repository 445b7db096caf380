"""The demo teacher: a small Qwen3-MoE trained from scratch on the demo corpus, so the whole pipeline has a real,
routing MoE to convert on a laptop CPU.

The training loop is deliberately plain (no Trainer): one forward, the next-token loss plus the load-balancing
auxiliary loss that keeps the router from collapsing onto a few experts, AdamW, warmup + cosine.

Training is byte-reproducible on one machine (same params, data and thread count -> same weights): the seeds fix the
init and the data order, and torch's deterministic algorithms fix the one run-to-run source, the backward of the
experts kernel's row gather (`hidden_states[perm // k]`), which on CPU accumulates duplicate rows with parallel
atomic adds in whatever order the threads finish."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe2dense.params import DemoModelParams, DemoTrainParams
from moe2dense.training import deterministic_algorithms, warmup_cosine_lr


def demo_config(m: DemoModelParams, vocab_size: int, seq_len: int, eos_id: int, pad_id: int | None):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=4 * m.hidden_size,  # unused: every layer is MoE (decoder_sparse_step=1)
        moe_intermediate_size=m.moe_intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        num_experts=m.num_experts,
        num_experts_per_tok=m.num_experts_per_tok,
        norm_topk_prob=True,
        router_aux_loss_coef=m.router_aux_loss_coef,
        max_position_embeddings=max(512, seq_len),
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    cfg._experts_implementation = "grouped_mm"  # the fast CPU kernel; batched_mm is ~40x slower here
    return cfg


def num_parameters(config) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def dense_demo_config(m: DemoModelParams, vocab_size: int, seq_len: int, eos_id: int, pad_id: int | None,
                      multiple: int = 64):
    """The d2d baseline's dense teacher: a Qwen3 with the MoE demo teacher's attention, embeddings and depth, and the
    MLP width (a multiple of `multiple`) that gives it the MoE teacher's total parameter count."""
    from transformers import Qwen3Config

    target = num_parameters(demo_config(m, vocab_size, seq_len, eos_id, pad_id))

    def config(width: int):
        return Qwen3Config(
            vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=width,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads, head_dim=m.hidden_size // m.num_attention_heads,
            max_position_embeddings=max(512, seq_len), tie_word_embeddings=True, bos_token_id=eos_id,
            eos_token_id=eos_id, pad_token_id=pad_id)

    # the count is affine in the width: two points give it
    base, per = num_parameters(config(multiple)), num_parameters(config(2 * multiple))
    per_neuron = (per - base) / multiple
    width = max(multiple, round((target - (base - per_neuron * multiple)) / per_neuron / multiple) * multiple)
    return config(width)


def lm_loss(model, ids: torch.Tensor, aux_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, next-token cross-entropy, load-balancing loss) for a batch of packed sequences."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    out = model.model(input_ids=ids, **({"output_router_logits": True} if aux_coef > 0 else {}))
    logits = model.lm_head(out.last_hidden_state[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
    if aux_coef > 0:  # balance each layer on its own: the library's joint form lets layers' imbalances cancel
        e, k = model.config.num_experts, model.config.num_experts_per_tok
        aux = torch.stack([load_balancing_loss_func((rl,), e, k) for rl in out.router_logits]).mean()
    else:
        aux = ce.new_zeros(())
    return ce + aux_coef * aux, ce, aux


def batches(train: np.ndarray, batch_size: int, steps: int, seed: int):
    """`steps` batches of rows, a fresh seeded permutation per epoch (no row repeats within an epoch)."""
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(train)), 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(train)), 0
        yield torch.from_numpy(train[order[pos: pos + batch_size]].astype(np.int64))
        pos += batch_size


@dataclass
class TrainLog:
    rows: list[dict] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_demo(model, train: np.ndarray, t: DemoTrainParams, seed: int, progress: bool = True,
               deterministic: bool = True, desc: str = "teacher") -> TrainLog:
    """Train `model` in place on packed rows `train` (N, seq_len) for `t.tokens` tokens. `deterministic=False`
    is the old, run-to-run varying setting, kept only for bench/determinism_bench.py to price the fix."""
    if len(train) < t.batch_size:
        raise ValueError(f"the train split has {len(train)} sequences, fewer than teacher.train.batch_size="
                         f"{t.batch_size}; add text or lower the batch size")
    torch.manual_seed(seed)
    seq_len = train.shape[1]
    steps = max(1, t.tokens // (t.batch_size * seq_len))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)  # a dense teacher (d2d) has no router
    log = TrainLog()
    model.train()
    bar = tqdm(total=steps * t.batch_size * seq_len, desc=f"{desc}: train", unit="tok", unit_scale=True,
               disable=not progress, mininterval=2)
    start = time.perf_counter()
    with deterministic_algorithms(deterministic):
        for step, ids in enumerate(batches(train, t.batch_size, steps, seed)):
            lr = warmup_cosine_lr(step, steps, t.warmup_steps, t.min_lr_ratio, lr=t.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, ce, aux = lm_loss(model, ids, aux_coef)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.tokens += ids.numel()
            bar.update(ids.numel())
            if step % t.log_every == 0 or step == steps - 1:
                ce_v, aux_v = ce.item(), aux.item()  # the only host syncs, once every log_every steps
                log.rows.append({"step": step, "tokens": log.tokens, "loss": round(ce_v, 5),
                                 "aux_loss": round(aux_v, 5), "lr": lr})
                bar.set_postfix(loss=f"{ce_v:.3f}", aux=f"{aux_v:.3f}")
    log.seconds = time.perf_counter() - start
    bar.close()
    model.eval()
    return log
