"""moe2dense.lm_head: the logits distillation computes chunk by chunk equal every family's own forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from transformers import PretrainedConfig

from moe2dense import lm_head


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_from_hidden_states_equal_the_models_forward(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = lm_head.logits(model, lm_head.hidden_states(model, ids))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_post_head_rules_by_hand():
    z = torch.tensor([[-3.0, 0.0, 6.0]])
    assert lm_head.transform(PretrainedConfig()) is None
    assert lm_head.transform(PretrainedConfig(final_logit_softcapping=None)) is None
    scaled = lm_head.transform(PretrainedConfig(logits_scaling=4.0))(z)
    torch.testing.assert_close(scaled, torch.tensor([[-0.75, 0.0, 1.5]]))
    capped = lm_head.transform(PretrainedConfig(final_logit_softcapping=3.0))(z)
    torch.testing.assert_close(capped, 3.0 * torch.tanh(torch.tensor([[-1.0, 0.0, 2.0]])))


def test_chunked_loss_applies_the_post_head_map_with_its_gradient():
    from moe2dense.distill.losses import chunked_kd_loss, kd_loss

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(10, 6, generator=g), torch.randn(7, 6, generator=g)
    teacher = torch.randn(10, 7, generator=g)
    cap = lm_head.transform(PretrainedConfig(final_logit_softcapping=2.0))
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    got = chunked_kd_loss(h1, weight, lambda s, e: teacher[s:e], chunk_tokens=3, head_transform=cap)
    want = kd_loss(cap(h2 @ weight.T), teacher).mean()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(h1.grad, h2.grad)
    plain = chunked_kd_loss(hidden, weight, lambda s, e: teacher[s:e], chunk_tokens=3)
    assert abs(float(plain) - float(got.detach())) > 1e-3  # the map changes the loss: a dropped transform fails
