"""Settings every test tier needs before any test module is imported.

Triton's interpreter (TRITON_INTERPRET=1) must be chosen before `triton` is first imported: its language's own
@triton.jit helpers are decorated at import, and torch imports triton as soon as anything touches
`torch._dynamo` (activation checkpointing, transformers' model code). So on machines without CUDA it is set
here, once, for the whole session (and the servers the end-to-end tests start, which inherit it and never run
a kernel on CPU unless told to).

The tinker SDK's daemon event-loop thread can abort a Python 3.11 process as it exits (`sdk_exit/`): the hook
that stops it first is loaded here for pytest itself and, through PYTHONPATH, for every process a test starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import tests.sdk_exit.sitecustomize  # noqa: F401  (registers the exit hook in this process)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SDK_EXIT_HOOK = Path(__file__).resolve().parent / "sdk_exit"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SDK_EXIT_HOOK), os.environ.get("PYTHONPATH")]))
