"""Settings every test tier needs before any test module is imported, and how the test process ends.

Triton's interpreter (TRITON_INTERPRET=1) must be chosen before `triton` is first imported: its language's own
@triton.jit helpers are decorated at import, and torch imports triton as soon as anything touches
`torch._dynamo` (activation checkpointing, transformers' model code). So on machines without CUDA it is set
here, once, for the whole session (and the servers the end-to-end tests start, which inherit it and never run
a kernel on CPU unless told to).

The session ends with `os._exit(exit status)` once pytest has reported everything (`pytest_unconfigure`, last):
the tinker SDK keeps a daemon event-loop thread per process (heartbeats of the sessions the tests opened keep
firing at servers that are gone), and CPython 3.11 can abort a process whose daemon threads wake during
interpreter finalisation. CI saw exactly that: every test reported, then SIGABRT (exit 134) instead of pytest's
status. Skipping finalisation after the report keeps the status pytest computed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if EXIT_STATUS not in config.stash:
        return  # pytest stopped before a session ran (usage error, --help): let it exit its own way
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])
