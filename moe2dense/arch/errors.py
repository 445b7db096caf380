"""Errors raised when a model cannot be adapted; both are ValueErrors so CLI/params validation can catch them."""


class UnsupportedModelError(ValueError):
    """The model's family (or a routing/activation variant of it) has no adapter."""


class QuantizedModelError(ValueError):
    """Expert weights are quantized; scoring and merging need them in full precision."""
