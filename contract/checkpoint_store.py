"""Where checkpoint folders live: a local directory tree with a create-only commit protocol.

A checkpoint is written into a private staging folder, a `manifest.json` listing every file's size and SHA-256
is written last, and the folder is renamed into place (atomic on one filesystem); an existing destination is
never overwritten unless the caller asks for it. Readers verify the manifest before trusting any file, so a
torn or tampered checkpoint is refused rather than served (`verified_file` checks one file, for the API's download
route). URIs are `file://` paths.

`CheckpointStore` is what the engine needs of any backend; `open_checkpoint_store(location)` picks one
(`s3://bucket/prefix` → `contract.checkpoint_s3.S3CheckpointStore`, anything else → a local root folder),
`configured_checkpoint_store(settings)` opens the deployment's, and `delete_checkpoint_uri` deletes a checkpoint
given either kind of URI (`discard_checkpoint_uris`: several, best effort, for files no database row names any
more). Workers write and read checkpoints; the API copies and deletes them (and reads the tokenizers workers
publish, `contract/published_tokenizers.py`) and `loom gc` sweeps what no database
row names, so the store lives in the contract both sides share.

Limits: this backend is local-filesystem only (S3 lives in `contract/checkpoint_s3.py`, imported only when used,
so boto3 is needed only where an `s3://` location is configured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from contract.settings import Settings

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


class CheckpointCorrupt(RuntimeError):
    """A stored checkpoint is missing files or a file's checksum does not match its manifest."""


class CheckpointExists(RuntimeError):
    """A checkpoint with this name already exists and overwrite was not requested."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class GcReport:
    deleted: list[str] = field(default_factory=list)
    aborted_uploads: list[tuple[str, str]] = field(default_factory=list)  # (key, upload id)


class CheckpointStore(Protocol):
    def write(
        self, owner: str, run_id: str, checkpoint_id: str, fill: Callable[[Path], None], overwrite: bool = False
    ) -> tuple[str, int]: ...

    def folder_uri(self, owner: str, run_id: str, checkpoint_id: str) -> str:
        """The URI `write` gives (or gave) this checkpoint, whether or not it exists."""
        ...

    def open(self, uri: str) -> Path: ...

    def gc(self, committed_uris: Iterable[str] | None, older_than: timedelta, now: datetime | None = None) -> GcReport:
        """Delete stored files no committed checkpoint reaches, once older than `older_than`."""
        ...


def _local_folder(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _verified(uri: str, name: str, meta: dict) -> Path:
    path = _local_folder(uri) / name
    if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
        raise CheckpointCorrupt(f"{uri}: {name} does not match its manifest checksum")
    return path


class LocalCheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _folder(self, owner: str, run_id: str, checkpoint_id: str) -> Path:
        for part in (owner, run_id, *checkpoint_id.split("/")):
            if part in ("", ".", "..") or "\\" in part or part.startswith("/"):
                raise ValueError(f"{part!r} cannot name a folder of checkpoint {checkpoint_id!r}")
        safe_run = run_id.replace(":", "_")
        return self.root / owner / safe_run / checkpoint_id

    def folder_uri(self, owner: str, run_id: str, checkpoint_id: str) -> str:
        return self._folder(owner, run_id, checkpoint_id).as_uri()

    def write(
        self, owner: str, run_id: str, checkpoint_id: str, fill: Callable[[Path], None], overwrite: bool = False
    ) -> tuple[str, int]:
        """Create a checkpoint by calling `fill(staging_dir)`; returns (uri, total bytes)."""
        final = self._folder(owner, run_id, checkpoint_id)
        if final.exists() and not overwrite:
            raise CheckpointExists(f"checkpoint {checkpoint_id} already exists for run {run_id}")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=final.parent))
        try:
            fill(staging)
            files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(staging.iterdir())}
            (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return final.as_uri(), sum(f["bytes"] for f in files.values())

    def open(self, uri: str) -> Path:
        """The verified local folder of a committed checkpoint."""
        for name, meta in self.files(uri).items():
            _verified(uri, name, meta)
        return _local_folder(uri)

    @staticmethod
    def files(uri: str) -> dict[str, dict]:
        """The files a committed checkpoint's manifest lists: name -> {"bytes", "sha256"}."""
        manifest_path = _local_folder(uri) / MANIFEST
        if not manifest_path.exists():
            raise CheckpointCorrupt(f"{uri} has no manifest (never committed, or deleted)")
        return json.loads(manifest_path.read_text())["files"]

    @staticmethod
    def verified_file(uri: str, name: str) -> Path:
        """File `name` of a committed checkpoint, once it matches its manifest entry; a name the manifest does not
        list (`../x`, `manifest.json`, ...) is a `KeyError`."""
        return _verified(uri, name, LocalCheckpointStore.files(uri)[name])

    @staticmethod
    def delete_uri(uri: str) -> None:
        shutil.rmtree(_local_folder(uri), ignore_errors=True)

    def gc(self, committed_uris: Iterable[str] | None, older_than: timedelta, now: datetime | None = None) -> GcReport:
        """Remove staging folders left by crashed writes and, when `committed_uris` is given, checkpoint folders
        the database does not know, once their last change is older than `older_than`."""
        cutoff = ((now or datetime.now(UTC)) - older_than).timestamp()
        known = None if committed_uris is None else set(committed_uris)
        report = GcReport()
        for folder in [p for p in self.root.rglob(".staging-*") if p.is_dir()]:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                report.deleted.append(str(folder))
        if known is not None:
            for manifest in list(self.root.rglob(MANIFEST)):
                folder = manifest.parent
                if folder.as_uri() not in known and manifest.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
                    report.deleted.append(str(folder))
        return report


def open_checkpoint_store(
    location: str | Path, cache_dir: Path | None = None, max_cache_bytes: int | None = None
) -> CheckpointStore:
    """`s3://bucket/prefix` → S3 (endpoint and credentials from the AWS environment; `cache_dir` holds verified
    downloads, up to `max_cache_bytes`); a path or `file://` URI → a local root folder (no cache needed)."""
    text = str(location)
    if text.startswith("s3://"):
        from contract.checkpoint_s3 import DEFAULT_CACHE_BYTES, S3CheckpointStore

        if cache_dir is None:
            raise ValueError(f"the S3 checkpoint store {text} needs a local cache folder for verified downloads")
        return S3CheckpointStore.from_url(text, cache_dir, max_cache_bytes or DEFAULT_CACHE_BYTES)
    return LocalCheckpointStore(Path(text.removeprefix("file://")))


def configured_checkpoint_store(settings: Settings) -> CheckpointStore:
    """The deployment's checkpoint store (a local folder, or S3 with a local cache of verified downloads)."""
    return open_checkpoint_store(
        settings.checkpoint_url, settings.checkpoint_cache_dir, settings.checkpoint_cache_bytes
    )


def delete_checkpoint_uri(uri: str) -> None:
    """Delete a checkpoint's stored files, wherever its URI points (`file://` or `s3://`)."""
    if uri.startswith("s3://"):
        from contract.checkpoint_s3 import delete_s3_uri

        delete_s3_uri(uri)
    else:
        LocalCheckpointStore.delete_uri(uri)


def discard_checkpoint_uris(uris: Iterable[str]) -> None:
    """Delete the stored files of checkpoints no row names any more, best effort: a failure is logged and the
    files are left to `loom gc` (which removes stored files no committed row names)."""
    for uri in uris:
        try:
            delete_checkpoint_uri(uri)
        except Exception:
            log.warning("could not delete checkpoint files %s (left to loom gc)", uri, exc_info=True)
