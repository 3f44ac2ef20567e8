"""Per-run LoRA adapters and the module wrappers that apply many of them in one forward pass."""
