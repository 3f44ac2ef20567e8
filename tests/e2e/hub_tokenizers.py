"""A server's tokenizer as Hugging Face Hub clients get it from its `/hf` routes, for tests.

- `hub_tokenizer(url, model, cache_dir)`: the tokenizer in this process. `huggingface_hub` reads `HF_ENDPOINT` once,
  when it is imported, so a test cannot point it at a server started later; this passes the endpoint explicitly
  instead (`snapshot_download(endpoint=...)`, what `hf download` does) and loads the snapshot with `AutoTokenizer`.
- `fill_hub_cache(url, model, hub_cache)`: a Hub cache from which tools that only read the cache
  (`HF_HUB_OFFLINE=1`, e.g. the official SDK's `get_tokenizer()` or the cookbook) load `model`'s tokenizer by its id.
  It loads the tokenizer once, in a fresh process with `HF_ENDPOINT=<url>/hf`: that downloads the files and also
  records the ones the repo lacks (`config.json`, ...), which an offline `AutoTokenizer` must know are absent.

tests/e2e/test_tokenizers.py checks the `HF_ENDPOINT` route itself, with the official SDK, in fresh processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LOAD_ONCE = "import sys, transformers; transformers.AutoTokenizer.from_pretrained(sys.argv[1])"


def hub_tokenizer(server_url: str, model: str, cache_dir: Path) -> Any:
    from huggingface_hub import snapshot_download
    from transformers import AutoTokenizer

    snapshot = snapshot_download(model, endpoint=f"{server_url}/hf", cache_dir=cache_dir)
    return AutoTokenizer.from_pretrained(snapshot)


def hub_env(server_url: str, **extra: str) -> dict[str, str]:
    """This process's environment without its Hugging Face settings, with Hub requests going to the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {"HF_ENDPOINT": f"{server_url}/hf", **extra}


def fill_hub_cache(server_url: str, model: str, hub_cache: Path) -> None:
    env = hub_env(server_url, HF_HUB_CACHE=str(hub_cache))
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ONCE, model], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"loading {model} from {server_url}/hf failed:\n{done.stderr[-4000:]}")
