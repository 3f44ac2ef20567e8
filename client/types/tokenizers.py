"""Tokenizer files served by Loom: its own listing, and the Hugging Face Hub shapes of its Hub-compatible subset.

- ``GET /api/v1/tokenizers/{base_model}`` answers :class:`TokenizerFilesResponse`: the revision and the files of the
  tokenizer the server encodes with (what Loom's SDK downloads and caches).
- Under ``/hf`` the server speaks the part of the Hub API that ``huggingface_hub`` uses to load a tokenizer:
  :class:`HubModelInfo` (``/api/models/{repo}[/revision/{rev}]``) and :class:`HubTreeEntry`
  (``/api/models/{repo}/tree/{rev}``), in the field names ``huggingface_hub``'s ``ModelInfo`` and ``RepoFile`` read.
  Every file is presented as a Git LFS object whose SHA-256 is the file's (the ETag the resolve route sends).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import WireModel


class TokenizerFile(WireModel):
    name: str
    size: int
    sha256: str


class TokenizerFilesResponse(WireModel):
    base_model: str
    """The catalogue id of the model (what ``get_info`` names as ``tokenizer_id``)."""
    revision: str
    """40 hex digits naming this exact set of files; it changes whenever a file does."""
    files: list[TokenizerFile]


class HubLfs(WireModel):
    oid: str
    """The file's SHA-256."""
    size: int
    pointer_size: int = Field(alias="pointerSize")


class HubSiblingLfs(WireModel):
    sha256: str
    size: int
    pointer_size: int = Field(alias="pointerSize")


class HubSibling(WireModel):
    rfilename: str
    size: int
    blob_id: str = Field(alias="blobId")
    lfs: HubSiblingLfs


class HubModelInfo(WireModel):
    id: str
    sha: str
    """The revision (what the Hub calls the commit)."""
    private: bool = False
    gated: bool = False
    disabled: bool = False
    tags: list[str] = Field(default_factory=list)
    siblings: list[HubSibling]


class HubTreeEntry(WireModel):
    type: Literal["file"] = "file"
    path: str
    size: int
    oid: str
    """The Git blob id of the file's LFS pointer, as the Hub gives for LFS files."""
    lfs: HubLfs
