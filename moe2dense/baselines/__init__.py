"""The baselines the M2D student must beat at its own parameter count (docs/architecture.md, "Baselines"): d2d, a
dense teacher width-pruned to the student's size; random_ffn and random_init, the student's architecture with its
MLPs, or everything, re-initialised. All are distilled with the student's own distill params."""
