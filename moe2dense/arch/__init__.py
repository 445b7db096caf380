"""MoE family adapters: read routers and experts of a transformers MoE model in one canonical form.

    adapter = get_adapter(model.config)
    routing = adapter.route(model, layer, adapter.router_logits(model, layer, hidden))
    outputs = adapter.all_expert_outputs(model, layer, hidden)      # [E, T, H]
"""

from .adapter import Adapter
from .errors import QuantizedModelError, UnsupportedModelError
from .experts import ExpertWeights, SharedExpert, expert_forward
from .registry import SUPPORTED_MODEL_TYPES, get_adapter
from .routing import Routing
from .spec import ExpertLayout, FamilySpec, RouterSpec

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "ExpertLayout",
    "ExpertWeights",
    "FamilySpec",
    "QuantizedModelError",
    "RouterSpec",
    "Routing",
    "SharedExpert",
    "UnsupportedModelError",
    "expert_forward",
    "get_adapter",
]
