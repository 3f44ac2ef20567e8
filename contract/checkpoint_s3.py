"""S3 checkpoint backend (boto3): `LocalCheckpointStore`'s `write` / `open` / delete protocol on a bucket, plus `gc`.

Key layout, for the checkpoint folder F = `<prefix>/<owner>/<run>/<checkpoint_id>` (URI `s3://<bucket>/F`):

    F/attempts/<attempt>/<file>   the files of ONE write attempt; <attempt> = UTC time + 96 random bits, never reused
    F/manifest.json               the commit record: {"attempt": <attempt>, "files": {<file>: {bytes, sha256}}}

Commit protocol: `write` calls `fill(staging_dir)` locally, uploads every file under a fresh attempt prefix (boto3
managed transfer: multipart above `multipart_threshold`), then PUTs `F/manifest.json` LAST, create-only
(`IfNoneMatch="*"`: S3 answers 412 when the name exists → `CheckpointExists`) or, with `overwrite=True`, as a plain
PUT (last writer wins), and only then returns; the caller marks the database row committed after that. A PUT
replaces an object atomically and a manifest names exactly one attempt whose keys no other write uses, so a reader
sees the old checkpoint or the new one, never a mix. A crash or error before the manifest PUT leaves an attempt no
manifest names: invisible to `open`, removed by `gc`. Overwritten attempts are likewise left for `gc`, so a reader
that fetched the old manifest just before an overwrite can still finish (after `gc` removed them, `open` notices
the manifest changed and retries once with the new one).

`open(uri)` trusts only `F/manifest.json`: it downloads the named attempt into a local cache folder (a private
temp folder renamed into place), checks every size and SHA-256 and raises `CheckpointCorrupt` on a missing
manifest or file or any mismatch. Cache entries are keyed by URI + manifest bytes (an overwrite is a new entry),
re-verified on reuse, and evicted least-recently-opened first beyond `max_cache_bytes`.

`gc(committed_uris, older_than)` deletes, once older than the grace period: attempt objects no kept manifest
names, manifests whose URI is not in `committed_uris` (None keeps every manifest; this catches a crash after the
manifest PUT but before the database commit, whose retry gets `CheckpointExists` as with the local store), and
stale multipart uploads. `delete_s3_uri` removes a manifest first, then the attempt it names. Path components
`attempts` and `manifest.json` are reserved, so no checkpoint's keys fall inside another's.

`presigned_file_urls(uri, expires_in)` hands out boto3 presigned GET URLs of the files the manifest names (its
attempt's keys), for downloads that go straight to the bucket.

Limits: the grace period must exceed the longest write (upload) time, or `gc` may delete the shards of a write
still in progress (its manifest would then name missing files, which `open` refuses). Checkpoint files are flat
(no sub-folders). A path handed out by `open` may be evicted once other checkpoints fill the cache (also by
another process sharing the cache folder): use it right away, as the engine does. Downloads within one store are
serialised. Endpoint, region and credentials come from the standard AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), read by boto3 itself; the cache folder and its bound are passed in
(the `checkpoint_cache_dir` / `checkpoint_cache_bytes` settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from contract.checkpoint_store import MANIFEST, CheckpointCorrupt, CheckpointExists, GcReport, sha256_file

log = logging.getLogger(__name__)

ATTEMPTS = "attempts"
RESERVED = frozenset({"", ".", "..", ATTEMPTS, MANIFEST})
ATTEMPT_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{24}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CACHE_BYTES = 20 << 30


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/prefix` → (bucket, key prefix without surrounding slashes)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, key.strip("/")


def env_client(config: Config | None = None) -> Any:
    """An S3 client configured from the standard AWS environment variables and files (and `config`)."""
    return boto3.session.Session().client("s3", config=config)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is_missing(error: ClientError) -> bool:
    return _code(error) in ("404", "NoSuchKey", "NotFound")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _valid_entry(name: Any, meta: Any) -> bool:
    return (
        isinstance(name, str)
        and "/" not in name
        and "\\" not in name
        and name not in RESERVED
        and isinstance(meta, dict)
        and isinstance(meta.get("bytes"), int)
        and meta["bytes"] >= 0
        and isinstance(meta.get("sha256"), str)
        and SHA256_RE.match(meta["sha256"]) is not None
    )


def _parse_manifest(uri: str, raw: bytes) -> dict[str, Any]:
    """The manifest's content, validated so that no entry can name a key or a path outside its attempt."""
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise CheckpointCorrupt(f"{uri}: unreadable manifest ({error})") from error
    attempt = manifest.get("attempt") if isinstance(manifest, dict) else None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not (isinstance(attempt, str) and ATTEMPT_RE.match(attempt) and isinstance(files, dict)):
        raise CheckpointCorrupt(f"{uri}: malformed manifest")
    if not all(_valid_entry(name, meta) for name, meta in files.items()):
        raise CheckpointCorrupt(f"{uri}: malformed manifest entry")
    return manifest


def _manifest_bytes(client: Any, uri: str, bucket: str, folder: str) -> bytes:
    try:
        return client.get_object(Bucket=bucket, Key=f"{folder}/{MANIFEST}")["Body"].read()
    except ClientError as error:
        if _is_missing(error):
            raise CheckpointCorrupt(f"{uri} has no manifest (never committed, or deleted)") from error
        raise


def _first_mismatch(folder: Path, files: dict[str, dict[str, Any]]) -> str | None:
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            return name
    return None


class S3CheckpointStore:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache_dir: Path,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        client: Any = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache_dir = cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_cache_bytes = max_cache_bytes
        self.client = client or env_client()
        self.transfer = transfer or TransferConfig()
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, cache_dir: Path, max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> S3CheckpointStore:
        bucket, prefix = parse_s3_uri(url)
        return cls(bucket, prefix, cache_dir, max_cache_bytes)

    def _folder(self, owner: str, run_id: str, checkpoint_id: str) -> str:
        relative = f"{owner}/{run_id.replace(':', '_')}/{checkpoint_id}"
        if any(part in RESERVED for part in relative.split("/")):
            raise ValueError(f"checkpoint name {relative!r} has an empty or reserved path component")
        return _join(self.prefix, relative)

    def folder_uri(self, owner: str, run_id: str, checkpoint_id: str) -> str:
        return f"s3://{self.bucket}/{self._folder(owner, run_id, checkpoint_id)}"

    # -- write ---------------------------------------------------------------------------------------------

    def write(
        self, owner: str, run_id: str, checkpoint_id: str, fill: Callable[[Path], None], overwrite: bool = False
    ) -> tuple[str, int]:
        """Create a checkpoint by calling `fill(staging_dir)`; returns (uri, total bytes) once it is committed."""
        folder = self._folder(owner, run_id, checkpoint_id)
        uri, manifest_key = self.folder_uri(owner, run_id, checkpoint_id), f"{folder}/{MANIFEST}"
        if not overwrite and self._exists(self.bucket, manifest_key):
            raise CheckpointExists(f"checkpoint {checkpoint_id} already exists for run {run_id}")
        attempt = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(12)}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.cache_dir))
        try:
            fill(staging)
            files: dict[str, dict[str, Any]] = {}
            for path in sorted(staging.iterdir()):
                if not path.is_file() or path.name in RESERVED:
                    raise ValueError(f"checkpoint files must be plain files not named {MANIFEST}: {path.name}")
                files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            data_keys = [f"{folder}/{ATTEMPTS}/{attempt}/{name}" for name in files]
            for name, key in zip(files, data_keys):
                self.client.upload_file(str(staging / name), self.bucket, key, Config=self.transfer)
            self._commit(uri, manifest_key, {"attempt": attempt, "files": files}, data_keys, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return uri, sum(f["bytes"] for f in files.values())

    def _commit(
        self, uri: str, manifest_key: str, manifest: dict[str, Any], data_keys: list[str], overwrite: bool
    ) -> None:
        """PUT the manifest: the single step that makes the checkpoint visible."""
        condition = {} if overwrite else {"IfNoneMatch": "*"}
        body = json.dumps(manifest, indent=1).encode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=manifest_key, Body=body, ContentType="application/json", **condition
            )
        except ClientError as error:
            if _code(error) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise
            self._delete_keys(self.bucket, data_keys)  # we lost the race: our attempt is garbage
            raise CheckpointExists(f"{uri} was created by another writer") from error

    # -- open ----------------------------------------------------------------------------------------------

    def open(self, uri: str) -> Path:
        """The verified local folder (files + manifest.json) of a committed checkpoint."""
        bucket, folder = parse_s3_uri(uri)
        with self._lock:
            raw = self._manifest_bytes(uri, bucket, folder)
            try:
                return self._fetch(uri, bucket, folder, raw)
            except CheckpointCorrupt:
                again = self._manifest_bytes(uri, bucket, folder)
                if again == raw:
                    raise
                return self._fetch(uri, bucket, folder, again)  # overwritten while we read: one retry

    def _manifest_bytes(self, uri: str, bucket: str, folder: str) -> bytes:
        return _manifest_bytes(self.client, uri, bucket, folder)

    def _fetch(self, uri: str, bucket: str, folder: str, raw: bytes) -> Path:
        manifest = _parse_manifest(uri, raw)
        files = manifest["files"]
        entry = self.cache_dir / hashlib.sha256(uri.encode() + b"\0" + raw).hexdigest()[:32]
        if entry.is_dir():
            if _first_mismatch(entry, files) is None:
                os.utime(entry)
                return entry
            shutil.rmtree(entry, ignore_errors=True)  # a damaged cached copy: fetch it again
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.cache_dir))
        try:
            for name in files:
                key = f"{folder}/{ATTEMPTS}/{manifest['attempt']}/{name}"
                try:
                    self.client.download_file(bucket, key, str(tmp / name), Config=self.transfer)
                except ClientError as error:
                    if _is_missing(error):
                        raise CheckpointCorrupt(f"{uri}: {name} is missing from the store") from error
                    raise
            bad = _first_mismatch(tmp, files)
            if bad is not None:
                raise CheckpointCorrupt(f"{uri}: {bad} does not match its manifest checksum")
            (tmp / MANIFEST).write_bytes(raw)
            try:
                tmp.rename(entry)
            except OSError:  # another process installed the same entry first; use it if it verifies
                if _first_mismatch(entry, files) is not None:
                    raise CheckpointCorrupt(f"{uri}: cached copy at {entry} does not verify") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._evict(keep=entry)
        return entry

    def _evict(self, keep: Path) -> None:
        """Remove least-recently-opened entries until the cache fits; entries that vanish meanwhile are skipped."""
        entries: list[tuple[float, int, Path]] = []
        for path in self.cache_dir.iterdir():
            try:
                if path.is_dir() and not path.name.startswith("."):
                    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                    entries.append((path.stat().st_mtime, size, path))
            except OSError:  # removed by another process sharing this cache folder
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_cache_bytes:
                break
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= size

    # -- delete and gc -------------------------------------------------------------------------------------

    def delete(self, uri: str) -> None:
        delete_s3_uri(uri, self.client)

    def gc(self, committed_uris: Iterable[str] | None, older_than: timedelta, now: datetime | None = None) -> GcReport:
        """Delete what no kept manifest reaches and is older than `older_than`; abort stale multipart uploads.

        A manifest is kept when its URI is in `committed_uris` (all are kept when that is None) or it is younger
        than the grace period (a write whose database row is not committed yet)."""
        cutoff = (now or datetime.now(UTC)) - older_than
        known = None if committed_uris is None else {u.rstrip("/") for u in committed_uris}
        root = f"{self.prefix}/" if self.prefix else ""
        objects = dict(self._list(root))
        reachable: set[str] = set()
        unreadable_folders: set[str] = set()
        report = GcReport()
        for key, modified in objects.items():
            if not key.endswith(f"/{MANIFEST}") or f"/{ATTEMPTS}/" in key.removeprefix(root):
                continue
            folder = key.removesuffix(f"/{MANIFEST}")
            uri = f"s3://{self.bucket}/{folder}"
            if known is not None and uri not in known and modified <= cutoff:
                report.deleted.append(key)  # committed in S3 but unknown to the caller: crash before the DB commit
                continue
            reachable.add(key)
            try:
                manifest = _parse_manifest(uri, self._manifest_bytes(uri, self.bucket, folder))
            except CheckpointCorrupt:
                log.warning("gc: keeping every attempt of %s, whose manifest is unreadable or gone", uri)
                unreadable_folders.add(folder)
                continue
            reachable.update(f"{folder}/{ATTEMPTS}/{manifest['attempt']}/{name}" for name in manifest["files"])
        for key, modified in objects.items():
            folder, sep, _ = key.removeprefix(root).partition(f"/{ATTEMPTS}/")
            if sep and key not in reachable and root + folder not in unreadable_folders and modified <= cutoff:
                report.deleted.append(key)
        self._delete_keys(self.bucket, report.deleted)
        for upload in self._uploads(root):
            if upload["Key"].startswith(root) and upload["Initiated"] <= cutoff:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                report.aborted_uploads.append((upload["Key"], upload["UploadId"]))
        return report

    def _list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], obj["LastModified"]

    def _uploads(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Uploads", [])

    def _exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
        return True

    def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        _delete_keys(self.client, bucket, keys)


def _delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        result = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if result.get("Errors"):
            raise RuntimeError(f"S3 refused to delete {len(result['Errors'])} object(s): {result['Errors'][:3]}")


def delete_s3_uri(uri: str, client: Any = None) -> None:
    """Delete a checkpoint: its manifest first (readers stop seeing it), then the attempt it names.

    Other attempts under the same name (crashed or overwritten writes) are left to `gc`."""
    client = client or env_client()
    bucket, folder = parse_s3_uri(uri)
    try:
        raw = client.get_object(Bucket=bucket, Key=f"{folder}/{MANIFEST}")["Body"].read()
    except ClientError as error:
        if _is_missing(error):
            return
        raise
    client.delete_object(Bucket=bucket, Key=f"{folder}/{MANIFEST}")
    try:
        manifest = _parse_manifest(uri, raw)
    except CheckpointCorrupt:
        return  # nothing trustworthy names the data; gc removes it
    _delete_keys(client, bucket, [f"{folder}/{ATTEMPTS}/{manifest['attempt']}/{name}" for name in manifest["files"]])


def presigned_file_urls(uri: str, expires_in: int, client: Any = None) -> dict[str, str]:
    """file name -> a presigned GET URL (valid `expires_in` seconds) of each file of a committed checkpoint.

    The URLs name the attempt the manifest names now; a later overwrite or delete leaves them pointing at objects
    `gc` removes after its grace period. URLs are signed with SigV4 (what every S3 region accepts; at most 7 days)."""
    client = client or env_client(Config(signature_version="s3v4"))
    bucket, folder = parse_s3_uri(uri)
    manifest = _parse_manifest(uri, _manifest_bytes(client, uri, bucket, folder))
    return {
        name: client.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket, "Key": f"{folder}/{ATTEMPTS}/{manifest['attempt']}/{name}"},
            ExpiresIn=expires_in,
        )
        for name in manifest["files"]
    }
