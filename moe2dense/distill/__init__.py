"""Knowledge distillation of the dense student from the MoE teacher: losses and chunked loss computation."""
