"""Stop the tinker SDK's background event loop before a test process finalises, so it cannot abort at exit.

Loaded two ways: `tests/conftest.py` imports it into the pytest process, and puts this folder on PYTHONPATH so
that Python loads it as `sitecustomize` in every process a test starts (SDK scripts, the `tinker` CLI, cookbook
recipes, and the servers, where it finds no SDK and does nothing).

Why: the SDK runs all its I/O (heartbeats, futures polling, session teardown) on a daemon thread. CPython 3.11
ends a daemon thread that wakes during interpreter finalisation with `pthread_exit`, and when glibc cannot
unwind that thread's C stack it calls `abort()` without a word: the process dies with SIGABRT (-6, or 134
from a shell) after its work is done and printed. CI saw exactly that twice in one run. Python's `atexit`
runs before finalisation, and this hook, registered before anything imports the SDK, runs after the SDK's
own exit hooks; it stops the loop and waits for the thread to return. A test that exercises the SDK's exit
still sees it, as a user would: the SDK's hooks have run by then.
"""

from __future__ import annotations

import atexit
import sys

SDK_HOLDER_MODULE = "tinker.lib.internal_client_holder"
"""Where SDK 0.38 keeps the one event-loop thread its clients share (`_internal_client_holder_thread_singleton`)."""
JOIN_SECONDS = 10.0


def stop_sdk_loop() -> None:
    """Stop the SDK's event loop (if this process started one) and wait for its thread to end."""
    holder_module = sys.modules.get(SDK_HOLDER_MODULE)
    singleton = getattr(holder_module, "_internal_client_holder_thread_singleton", None)
    loop = getattr(singleton, "_loop", None)
    thread = getattr(singleton, "_thread", None)
    if loop is None or thread is None or not thread.is_alive():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join(JOIN_SECONDS)


atexit.register(stop_sdk_loop)
