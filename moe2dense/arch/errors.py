"""Errors raised when a model cannot be adapted; both are ValueErrors so CLI/params validation can catch them."""

from moe2dense.quantized import QuantizedModelError  # noqa: F401  (its home: the quantized-checkpoint reader)


class UnsupportedModelError(ValueError):
    """The model's family (or a routing/activation variant of it) has no adapter."""

