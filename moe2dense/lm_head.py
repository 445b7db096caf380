"""A causal LM's logits from its final hidden states, as its own forward computes them.

Distillation computes logits chunk by chunk from the base model's hidden states and the LM head (the full [T, V]
logits never exist), so it must apply what the family's forward applies after the head: Granite divides by
`logits_scaling`, Gemma soft-caps with `final_logit_softcapping`. One rule per config field; a field that is absent
or None does nothing. tests/test_distill_families.py checks `logits` against `model(ids).logits` for every family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# config field -> (logits, value) -> logits, in the order the families' forwards apply them.
RULES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "logits_scaling": lambda z, v: z / v,  # granite, granitemoe(shared)
    "final_logit_softcapping": lambda z, v: torch.tanh(z / v) * v,  # gemma
}


def transform(config) -> Callable[[Tensor], Tensor] | None:
    """The post-head map of `config`'s family, or None when its forward uses the head's output as is."""
    rules = [(rule, float(getattr(config, field))) for field, rule in RULES.items()
             if getattr(config, field, None) is not None]
    if not rules:
        return None

    def apply(z: Tensor) -> Tensor:
        for rule, value in rules:
            z = rule(z, value)
        return z

    return apply


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding `.layers`): base_model (`model` for most families, `backbone` for
    nemotron_h), or its `.model` where base_model_prefix names no attribute (Llama4ForCausalLM's
    "language_model")."""
    base = model.base_model
    return base if hasattr(base, "layers") else base.model


def hidden_states(model: nn.Module, ids: Tensor) -> Tensor:
    """The decoder's final hidden states [B, S, H]."""
    return decoder(model)(input_ids=ids, use_cache=False).last_hidden_state


def logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """fp32 logits [..., V] of `hidden`, as `model(ids).logits` holds them. The matmul runs in the head's dtype (an
    fp32 copy of a 150k-token head per chunk would cost more than the chunk), then the post-head map in fp32."""
    head = model.get_output_embeddings()
    out = hidden @ head.weight.T
    out = (out if head.bias is None else out + head.bias).float()
    fn = transform(model.config)
    return out if fn is None else fn(out)
