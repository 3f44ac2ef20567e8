"""A base model's tokenizer, loaded from the Loom server (never from a hub): what ``get_tokenizer()`` returns.

``fetch_tokenizer(http, base_model)`` asks ``GET /api/v1/tokenizers/{base_model}`` for the revision and files of the
tokenizer the server encodes with, and keeps them in a local cache with one folder per revision (the revision names
the exact files, so the cache is shared by every server and model with the same tokenizer): a cached revision is
used as is; a new one is downloaded file by file, each checked against its SHA-256, into a temporary folder that is
renamed into place. ``load_tokenizer(folder)`` loads the folder with ``transformers.AutoTokenizer``.

The cache is ``$LOOM_TOKENIZER_CACHE`` or ``~/.cache/loom/tokenizers``.

Limits: loading needs ``transformers`` (imported lazily: the SDK itself depends on httpx and pydantic only). The
listing is asked for on every call (one small request), so a changed server tokenizer is picked up; cached files
are trusted, as Hugging Face's cache trusts its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import errors, types
from .http import HttpClient


def tokenizer_cache_root() -> Path:
    return Path(os.environ.get("LOOM_TOKENIZER_CACHE") or Path.home() / ".cache" / "loom" / "tokenizers")


async def fetch_tokenizer(http: HttpClient, base_model: str, cache_root: Path | None = None) -> Path:
    """The local folder holding the server's tokenizer of ``base_model`` (downloaded unless already cached)."""
    route = f"/api/v1/tokenizers/{quote(base_model)}"
    listing = types.TokenizerFilesResponse.model_validate(await http.get_json(route))
    root = cache_root or tokenizer_cache_root()
    folder = root / listing.revision
    if folder.is_dir():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        for file in listing.files:
            data = (await http.request("GET", f"{route}/files/{quote(file.name)}")).content
            if hashlib.sha256(data).hexdigest() != file.sha256:
                raise errors.LoomError(f"tokenizer file {file.name} of {base_model} does not match its SHA-256")
            (staging / file.name).write_bytes(data)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent download of the same revision that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_tokenizer(folder: Path) -> Any:
    """``transformers.AutoTokenizer`` of a local tokenizer folder, imported lazily."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("get_tokenizer() needs the `transformers` package") from exc
    return AutoTokenizer.from_pretrained(str(folder))
