"""Settings every test tier needs before any test module is imported.

Triton's interpreter (TRITON_INTERPRET=1) must be chosen before `triton` is first imported: its language's own
@triton.jit helpers are decorated at import, and torch imports triton as soon as anything touches
`torch._dynamo` (activation checkpointing, transformers' model code). So on machines without CUDA it is set
here, once, for the whole session (and the servers the end-to-end tests start, which inherit it and never run
a kernel on CPU unless told to).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
