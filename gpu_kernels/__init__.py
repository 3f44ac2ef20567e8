"""Multi-LoRA kernels: Triton versions for GPUs and their torch reference twins (the CPU path)."""
