"""The MoE teacher: train the demo Qwen3-MoE, or resolve and validate a real checkpoint offline."""
