"""A Hugging Face Hub-compatible subset, so that `HF_ENDPOINT=<loom url>/hf` loads the server's tokenizers unmodified.

With that variable set, `AutoTokenizer.from_pretrained("<base model id>")` (and so the official tinker SDK's
`get_tokenizer()`, whose `tokenizer_id` is the model's public id) and `huggingface_hub.snapshot_download` / `hf
download` (which fill the Hub cache for `HF_HUB_OFFLINE=1` tools) fetch the tokenizer from Loom instead of
huggingface.co. What `huggingface_hub` 2.x and transformers 5 request, and what they read from the answers:

    HEAD|GET /hf/{repo}/resolve/{revision}/{file}          a file; `X-Repo-Commit`, `ETag` (the SHA-256), `Content-Length`
    GET      /hf/api/models/{repo}[/revision/{revision}]   repo_info / model_info: `sha`, `siblings`, `tags`
    GET      /hf/api/models/{repo}/tree/{revision}[/{path}] list_repo_tree / list_repo_files: one page of files

A repo is a catalogue id or alias and its files are the model's published tokenizer (`api/routers/tokenizers.py`,
no API key either). Loom keeps one revision per model, its current tokenizer: whatever revision is asked for
(`main`, a tag, a commit hash such as those the tinker SDK pins for Kimi models) is answered with it, and
`X-Repo-Commit` / `sha` name its actual revision, so a client cache never files Loom's files under another commit.
Errors carry the Hub's `X-Error-Code` (`RepoNotFound`, `EntryNotFound`, with `X-Repo-Commit` for a missing file, which
`huggingface_hub` then remembers as absent), so clients raise their usual exceptions.

Limits: tokenizer files only (no weights, no model cards), all in the repo's root (a tree under a path is a 404);
files are answered directly (no redirects, no Xet), each presented as a Git LFS object whose SHA-256 is its ETag.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, State
from api.errors import APIError, ErrorCode
from api.routers.tokenizers import catalogue_entry, published, tokenizer_file
from contract.catalogue import BaseModelEntry
from contract.published_tokenizers import PublishedTokenizer
from loom.types import HubLfs, HubModelInfo, HubSibling, HubSiblingLfs, HubTreeEntry, TokenizerFile

router = APIRouter(prefix="/hf")

ERROR_CODE = "X-Error-Code"
REPO_COMMIT = "X-Repo-Commit"


def _repo(state: AppState, repo_id: str) -> tuple[BaseModelEntry, PublishedTokenizer]:
    entry = catalogue_entry(state, repo_id, headers={ERROR_CODE: "RepoNotFound"})
    return entry, published(state, entry)


def _lfs_pointer(file: TokenizerFile) -> bytes:
    """The Git LFS pointer file the Hub would keep in git for `file`."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{file.sha256}\nsize {file.size}\n".encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _model_info(state: AppState, repo_id: str) -> dict[str, Any]:
    entry, tokenizer = _repo(state, repo_id)
    siblings = []
    for file in tokenizer.files:
        pointer = _lfs_pointer(file)
        lfs = HubSiblingLfs(sha256=file.sha256, size=file.size, pointer_size=len(pointer))
        siblings.append(HubSibling(rfilename=file.name, size=file.size, blob_id=_git_blob_id(pointer), lfs=lfs))
    return HubModelInfo(id=entry.name, sha=tokenizer.revision, siblings=siblings).to_wire()


@router.get("/api/models/{repo_id:path}/revision/{revision}")
def model_info_at_revision(repo_id: str, revision: str, state: State) -> dict[str, Any]:
    return _model_info(state, repo_id)


@router.get("/api/models/{repo_id:path}/tree/{revision}")
def repo_tree(repo_id: str, revision: str, state: State) -> list[dict[str, Any]]:
    _, tokenizer = _repo(state, repo_id)
    entries = []
    for file in tokenizer.files:
        pointer = _lfs_pointer(file)
        lfs = HubLfs(oid=file.sha256, size=file.size, pointer_size=len(pointer))
        entries.append(HubTreeEntry(path=file.name, size=file.size, oid=_git_blob_id(pointer), lfs=lfs).to_wire())
    return entries


@router.get("/api/models/{repo_id:path}/tree/{revision}/{path_in_repo:path}")
def repo_tree_under(repo_id: str, revision: str, path_in_repo: str, state: State) -> list[dict[str, Any]]:
    _, tokenizer = _repo(state, repo_id)
    raise APIError(
        404,
        ErrorCode.NOT_FOUND,
        f"{repo_id} has no folder {path_in_repo!r}: a tokenizer's files all lie in the repo's root",
        headers={ERROR_CODE: "EntryNotFound", REPO_COMMIT: tokenizer.revision},
    )


@router.get("/api/models/{repo_id:path}")
def model_info(repo_id: str, state: State) -> dict[str, Any]:
    return _model_info(state, repo_id)


@router.get("/{repo_id:path}/resolve/{revision}/{filename:path}")
@router.head("/{repo_id:path}/resolve/{revision}/{filename:path}", include_in_schema=False)
async def resolve(repo_id: str, revision: str, filename: str, state: State) -> FileResponse:
    _, tokenizer = await run_in_threadpool(_repo, state, repo_id)
    commit = {REPO_COMMIT: tokenizer.revision}
    if tokenizer.file(filename) is None:
        message = f"{repo_id} has no file {filename!r}; its tokenizer files are {[f.name for f in tokenizer.files]}"
        raise APIError(404, ErrorCode.NOT_FOUND, message, headers={**commit, ERROR_CODE: "EntryNotFound"})
    return tokenizer_file(tokenizer, filename, commit)
