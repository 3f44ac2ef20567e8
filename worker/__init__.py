"""Loom worker: holds frozen base models, per-run LoRA adapters and their optimizers, and executes jobs.

Imports only `loom` (wire types), `gpu_kernels` and `api.db` (job leases and results), never the rest of `api`.
"""
