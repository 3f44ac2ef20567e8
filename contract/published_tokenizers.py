"""Each served base model's client tokenizer, published by its workers in the checkpoint store for the API to serve.

A worker exports the tokenizer it encodes with (`worker/models/tokenizer_export.py`: files that a stock transformers
install loads without remote code) and `publish_tokenizer` commits that folder to the deployment's checkpoint store,
under the owner folder `TOKENIZERS_OWNER` (`<store>/.tokenizers/<model cache name>/files`). The API, which may run
on another machine with neither the model nor transformers, serves the files from there (`api/routers/tokenizers.py`,
`api/routers/hub.py`), so every client loads exactly the server's tokenizer. The store's commit protocol makes each
publication atomic and verified; a changed tokenizer replaces the published one, an unchanged one is not rewritten
(restarting workers writes nothing).

`open_published_tokenizer` gives readers a `PublishedTokenizer`: the verified local folder, each file's size and
SHA-256, and a revision (40 hex digits over the file names and digests) that changes whenever a file does.

Limits: flat folders only, as the store keeps no sub-folders (a tokenizer with `additional_chat_templates/` is
refused at publish). `loom gc` keeps the published tokenizers of every catalogue model (`published_tokenizer_uris`);
a model dropped from the catalogue loses its tokenizer at the next gc.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from contract.catalogue import BaseModelEntry
from contract.checkpoint_store import MANIFEST, CheckpointCorrupt, CheckpointStore, sha256_file
from loom.types import TokenizerFile

TOKENIZERS_OWNER = ".tokenizers"
"""The store's owner folder for published tokenizers (tenants' folders are named by their owner)."""
PUBLISHED_FOLDER = "files"


class TokenizerNotPublished(RuntimeError):
    """No worker has published this model's tokenizer yet (or the stored copy does not verify)."""


@dataclass(frozen=True)
class PublishedTokenizer:
    folder: Path
    """The verified local copy of the published files (for an S3 store: an entry of its download cache)."""
    files: tuple[TokenizerFile, ...]
    """Sorted by name."""
    revision: str
    """40 hex digits naming this exact set of files (what a Hub client keeps as the commit of a snapshot)."""

    def file(self, name: str) -> TokenizerFile | None:
        return next((f for f in self.files if f.name == name), None)


def tokenizer_uri(store: CheckpointStore, entry: BaseModelEntry) -> str:
    return store.folder_uri(TOKENIZERS_OWNER, entry.cache_name, PUBLISHED_FOLDER)


def _digests(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 of a flat tokenizer folder; a sub-folder is refused (the store keeps none)."""
    nested = [p.name for p in folder.iterdir() if not p.is_file()]
    if nested:
        raise ValueError(f"{folder}: a published tokenizer folder must be flat, but it holds {sorted(nested)}")
    return {p.name: sha256_file(p) for p in folder.iterdir()}


def _revision(digests: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(sorted(digests.items())).encode(), usedforsecurity=False).hexdigest()


def open_published_tokenizer(store: CheckpointStore, entry: BaseModelEntry) -> PublishedTokenizer:
    """`entry`'s published tokenizer, verified against its manifest; `TokenizerNotPublished` when there is none."""
    uri = tokenizer_uri(store, entry)
    try:
        folder = store.open(uri)
    except CheckpointCorrupt as exc:
        raise TokenizerNotPublished(f"{entry.name}: {exc}") from exc
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    files = tuple(
        TokenizerFile(name=name, size=meta["bytes"], sha256=meta["sha256"]) for name, meta in sorted(listed.items())
    )
    return PublishedTokenizer(folder, files, _revision({f.name: f.sha256 for f in files}))


def publish_tokenizer(store: CheckpointStore, entry: BaseModelEntry, exported: Path) -> str:
    """Commit the tokenizer folder `exported` as `entry`'s published tokenizer, unless the same files already are;
    returns its revision."""
    digests = _digests(exported)
    revision = _revision(digests)
    try:
        if open_published_tokenizer(store, entry).revision == revision:
            return revision
    except TokenizerNotPublished:
        pass  # first publication, or a damaged copy to replace

    def fill(staging: Path) -> None:
        for name in digests:
            shutil.copyfile(exported / name, staging / name)

    store.write(TOKENIZERS_OWNER, entry.cache_name, PUBLISHED_FOLDER, fill, overwrite=True)
    return revision


def published_tokenizer_uris(store: CheckpointStore, entries: Iterable[BaseModelEntry]) -> list[str]:
    """Where the tokenizers of `entries` are published: what `loom gc` must keep."""
    return [tokenizer_uri(store, entry) for entry in entries]
