"""`get_adapter(config)`: the registry of supported families, keyed by config.model_type."""

from __future__ import annotations

from transformers import PreTrainedConfig, PreTrainedModel

from moe2dense.quantized import scheme_of

from .adapter import Adapter
from .errors import UnsupportedModelError
from .families import FAMILIES, TEXT_MODEL_OF, UNWRAP_RECIPE
from .generic import discover_spec, spec_for_raw

_REGISTRY = {spec.model_type: spec for spec in FAMILIES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def get_adapter(config: PreTrainedConfig | PreTrainedModel) -> Adapter:
    """The adapter for a config (or a model, whose config is used)."""
    if isinstance(config, PreTrainedModel):
        config = config.config
    model_type = getattr(config, "model_type", None)
    spec = _REGISTRY.get(model_type)
    if spec is None:
        if model_type in TEXT_MODEL_OF:
            raise UnsupportedModelError(_wrapper(model_type))
        spec = discover_spec(config)  # the generic path (arch.generic), verified once weights load
    # A supported scheme (mxfp4, fp8) is dequantized as it is read (quantized.py); any other is refused here.
    scheme_of(getattr(config, "quantization_config", None), f"this {config.model_type} checkpoint")
    return Adapter.from_config(spec, config)


def is_generic(adapter: Adapter) -> bool:
    """True for a family without a written spec: its adapter holds only once `generic.verify_teacher` passed."""
    return adapter.model_type not in _REGISTRY


def _wrapper(model_type: str) -> str:
    return (f"model_type {model_type!r} is a multimodal wrapper; moe2dense converts its text model "
            f"({TEXT_MODEL_OF[model_type]}): {UNWRAP_RECIPE}")


def check_config_keys(raw: dict, source: object) -> None:
    """Refuse a config.json (parsed as plain JSON) that lacks a size the adapter reads: transformers would fill it
    in silently with its library default (num_experts_per_tok=8, a default expert width), and the conversion would
    run on the wrong routing or crash later with a traceback. `source` names the file in the error."""
    model_type = raw.get("model_type")
    if model_type in TEXT_MODEL_OF:
        raise UnsupportedModelError(f"{source}: {_wrapper(model_type)}")
    scheme_of(raw.get("quantization_config"), source)  # an unsupported quantization: refused before any weight
    spec = _REGISTRY.get(model_type) or spec_for_raw(raw, source)
    from transformers import CONFIG_MAPPING

    aliases = CONFIG_MAPPING[model_type].attribute_map  # e.g. qwen3_moe saves num_experts as num_local_experts
    # The layer count: num_hidden_layers, or the first present of a hybrid's per-layer type list / pattern string.
    layers_key = next((k for k in spec.num_layers_keys if k in raw), spec.num_layers_keys[0])
    for attr in (layers_key, spec.top_k_attr, spec.num_experts_attr, spec.intermediate_attr):
        canonical = aliases.get(attr, attr)
        names = [attr, canonical, *(k for k, v in aliases.items() if v == canonical)]
        value = next((raw[n] for n in names if n in raw), None)
        if value is None:
            raise ValueError(f"{source}: {model_type} config has no {attr!r}; moe2dense does not guess it "
                             "(transformers would silently use its library default)")
        if attr != "num_hidden_layers" and attr == layers_key:  # a list of layer types or a pattern string
            if not value or not isinstance(value, (list, str)):
                raise ValueError(f"{source}: {attr}={value!r} must be a non-empty list of layer types")
            continue
        items = value if isinstance(value, list) and value else [value]  # hunyuan's moe_topk may be per layer
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
            raise ValueError(f"{source}: {attr}={value!r} must be a positive integer (or a per-layer list of them)")
