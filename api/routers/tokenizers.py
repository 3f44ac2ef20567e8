"""Base models' tokenizer files over HTTP, what Loom's SDK loads a tokenizer from (`loom.tokenizers`).

    GET       /api/v1/tokenizers/{base_model}                     the revision and files (`TokenizerFilesResponse`)
    GET|HEAD  /api/v1/tokenizers/{base_model}/files/{filename}    one file, with `ETag` (its SHA-256) and
                                                                  `Content-Length`; `Range` requests work

`base_model` is a catalogue id or alias, slashes included. The files are those the model's workers publish
(`contract/published_tokenizers.py`): exactly the tokenizer the server encodes with, loadable by a stock
`transformers` without remote code. `published` and `tokenizer_file` are shared with the Hugging Face Hub subset
(`api/routers/hub.py`).

No API key is needed: these are the public tokenizer files of the base models the server trains, and the Hub
subset must serve `huggingface_hub`, which sends the user's Hugging Face token (never a Loom key) if any.

Errors: an unknown model or file is a 404; a model whose workers have not published its tokenizer yet (separate
workers still starting) is a 503 with `Retry-After`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, State
from api.errors import APIError, ErrorCode, not_found, unavailable
from contract.catalogue import BaseModelEntry
from contract.published_tokenizers import PublishedTokenizer, TokenizerNotPublished, open_published_tokenizer
from loom.types import TokenizerFilesResponse

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1")


def catalogue_entry(state: AppState, base_model: str, headers: dict[str, str] | None = None) -> BaseModelEntry:
    entry = state.catalogue.resolve(base_model)
    if entry is None:
        message = f"base model {base_model!r} is not served here; this server serves {sorted(state.catalogue.names)}"
        raise APIError(404, ErrorCode.MODEL_NOT_FOUND, message, headers=headers)
    return entry


def published(state: AppState, entry: BaseModelEntry) -> PublishedTokenizer:
    """`entry`'s published tokenizer, or a 503 while no worker of it has published one."""
    try:
        return open_published_tokenizer(state.store, entry)
    except TokenizerNotPublished as exc:
        log.warning("serving no tokenizer for %s: %s", entry.name, exc)  # the store's reason, for the operator only
        raise unavailable(
            f"the tokenizer of {entry.name} is not available yet: no worker serving it has published it; retry once "
            "one has started"
        ) from exc


def tokenizer_file(tokenizer: PublishedTokenizer, filename: str, headers: dict[str, str]) -> FileResponse:
    """`filename` of `tokenizer` with its SHA-256 as ETag (and `headers`); 404 for a name it does not hold."""
    found = tokenizer.file(filename)
    if found is None:
        raise not_found(f"the tokenizer has no file {filename!r}; it has {[f.name for f in tokenizer.files]}")
    return FileResponse(
        tokenizer.folder / found.name,
        media_type="application/octet-stream",
        headers={"ETag": f'"{found.sha256}"', **headers},
    )


@router.get("/tokenizers/{base_model:path}/files/{filename}")
@router.head("/tokenizers/{base_model:path}/files/{filename}", include_in_schema=False)
async def get_tokenizer_file(base_model: str, filename: str, state: State) -> FileResponse:
    tokenizer = await run_in_threadpool(published, state, catalogue_entry(state, base_model))
    return tokenizer_file(tokenizer, filename, {})


@router.get("/tokenizers/{base_model:path}")
def list_tokenizer_files(base_model: str, state: State) -> dict[str, Any]:
    entry = catalogue_entry(state, base_model)
    tokenizer = published(state, entry)
    return TokenizerFilesResponse(
        base_model=entry.name, revision=tokenizer.revision, files=list(tokenizer.files)
    ).to_wire()
