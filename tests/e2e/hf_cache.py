"""An offline Hugging Face hub cache holding the tokenizer a test server serves, for clients that load tokenizers
by public model id (`AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`: the official SDK's
`get_tokenizer()`, the cookbook's `get_tokenizer`) on a machine with no hub access.

The files are the server's own: the tokenizer folder the worker exports when it loads a base model, plus the model's
`config.json` (transformers' `AutoTokenizer` reads it to pick the tokenizer class). They are laid out as the hub
cache lays out a download (`models--org--name/snapshots/<revision>/`, `refs/main`), so `HF_HUB_OFFLINE=1` with
`HF_HUB_CACHE` (or `HF_HOME`/hub) pointing here resolves them.

Limits: reads the shared model cache on this machine, so the test must run beside the server. Once Loom serves its
tokenizer files over HTTP, this should fill the cache from that route instead.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from contract.catalogue import BaseModelEntry


def fill_hub_cache(hub_dir: Path, entry: BaseModelEntry, model_cache_dir: Path) -> Path:
    """Write `entry`'s tokenizer into the hub cache at `hub_dir` under its public id; returns the snapshot folder."""
    sources = sorted((entry.tokenizer_folder(model_cache_dir)).iterdir()) + [
        entry.folder(model_cache_dir) / "config.json"
    ]
    revision = hashlib.sha1(b"".join(path.read_bytes() for path in sources)).hexdigest()
    repo = hub_dir / f"models--{entry.name.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sources:
        shutil.copyfile(path, snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
