"""moe2dense."""
