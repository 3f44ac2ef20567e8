"""S3CheckpointStore against a real S3 server process (`moto_server` on a free 127.0.0.1 port).

Checked: round trip (a 12 MiB multipart shard and a small file come back byte-identical); a real engine
checkpoint (tiny Kimi K2: create → train → save_weights to S3 → load_weights back with optimizer state, factors
equal bit-for-bit); a crash between shard upload and manifest leaves nothing visible, a retry commits cleanly and
`gc` removes exactly the orphans; a flipped byte / missing shard / missing manifest in S3 is refused with
`CheckpointCorrupt`; create-only holds even when a second writer passed the early existence check (the manifest's
`IfNoneMatch` PUT decides); `overwrite=True` is atomic for readers; the local cache is reused, repaired and bounded;
`gc` drops manifests unknown to the caller and aborts stale multipart uploads; deletion through the API's queue.

Time is simulated through `gc(now=...)`; nothing asserts on elapsed time. moto reports every multipart upload as
initiated on 2010-11-10 (hard-coded), so "a fresh upload survives gc" cannot be shown on moto; the test shows the
grace-period comparison with a grace longer than that age instead.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from boto3.s3.transfer import TransferConfig

from contract.checkpoint_s3 import S3CheckpointStore
from contract.checkpoint_store import (
    MANIFEST,
    CheckpointCorrupt,
    CheckpointExists,
    LocalCheckpointStore,
    delete_checkpoint_uri,
    open_checkpoint_store,
)
from contract.jobs import LoadWeightsJob
from tests.unit.test_worker_engine import RUN_A, by_id, job, run_a_jobs
from tests.unit.worker_fixtures import fresh_model, run_to_completion
from worker.engine import Engine

pytestmark = pytest.mark.integration

MIB = 1 << 20
LATER = timedelta(hours=2)  # "now" for gc calls that should see today's objects as old
GRACE = timedelta(hours=1)


def _store(bucket: str, cache: Path, **kw) -> S3CheckpointStore:
    store = open_checkpoint_store(f"s3://{bucket}/ckpts", cache_dir=cache)
    assert isinstance(store, S3CheckpointStore)
    for name, value in kw.items():
        setattr(store, name, value)
    return store


@pytest.fixture
def store(bucket, tmp_path) -> S3CheckpointStore:
    return _store(bucket, tmp_path / "cache")


def _reader(bucket: str, tmp_path: Path) -> S3CheckpointStore:
    """A second store with an empty cache: whatever it opens came from S3 just now."""
    return _store(bucket, tmp_path / f"reader-{secrets.token_hex(4)}")


def _keys(s3, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != MANIFEST}


def _filler(files: dict[str, bytes]):
    def fill(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)

    return fill


V1 = {"adapter_model.safetensors": bytes(range(256)) * 64, "adapter_config.json": b'{"r": 4}'}
V2 = {"adapter_model.safetensors": bytes(range(255, -1, -1)) * 64, "trainer_state.json": b'{"steps": 2}'}
FOLDER = "ckpts/alice/s1_train_0/weights/step-1"


def _write(store: S3CheckpointStore, files: dict[str, bytes], overwrite: bool = False) -> str:
    uri, size = store.write("alice", "s1:train:0", "weights/step-1", _filler(files), overwrite=overwrite)
    assert size == sum(len(d) for d in files.values())
    return uri


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_with_multipart_shard(bucket, s3, tmp_path):
    store = _store(
        bucket, tmp_path / "w", transfer=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    )
    files = {"big.bin": os.urandom(12 * MIB), "adapter_config.json": b'{"r": 4}'}
    uri = _write(store, files)
    assert uri == f"s3://{bucket}/{FOLDER}"
    keys = _keys(s3, bucket)
    assert f"{FOLDER}/{MANIFEST}" in keys and len(keys) == 3
    (big,) = [k for k in keys if k.endswith("/big.bin")]
    assert s3.head_object(Bucket=bucket, Key=big)["ETag"].endswith('-3"')  # uploaded in 3 parts
    folder = _reader(bucket, tmp_path).open(uri)
    assert _files(folder) == files


def test_cache_is_reused_repaired_and_bounded(bucket, store, tmp_path):
    uri = _write(store, V1)
    reader = _store(bucket, tmp_path / "cache-r", max_cache_bytes=sum(len(d) for d in V1.values()) + 1000)
    first = reader.open(uri)
    assert reader.open(uri) == first  # reused
    (first / "adapter_config.json").write_bytes(b'{"r": 5}')  # damage the cached copy (same size)
    assert _files(reader.open(uri)) == V1  # re-verified, fetched again
    other, _ = store.write("alice", "s1:train:0", "weights/step-2", _filler(V2))
    second = reader.open(other)
    assert _files(second) == V2
    assert not first.exists(), "the least recently opened entry should have been evicted beyond the bound"


# ------------------------------------------------------------------------------------------ engine checkpoint


def test_engine_checkpoint_round_trips_through_s3(bucket, tmp_path):
    engine = Engine(fresh_model("tiny_kimi_k2"), _store(bucket, tmp_path / "engine"))
    jobs = run_a_jobs()
    by_id_jobs = {job.id: job for job in jobs}
    saved = by_id(run_to_completion(engine, jobs))[f"{RUN_A}:4"]
    assert saved.error is None, saved.error
    record = saved.checkpoint
    # one location per write attempt: the checkpoint id, the writing job's seq (4) and its lease's fencing token
    token = by_id_jobs[f"{RUN_A}:4"].fencing_token
    assert record.storage_uri == f"s3://{bucket}/ckpts/alice/{RUN_A.replace(':', '_')}/weights/a1~4.{token}"
    other = Engine(fresh_model("tiny_kimi_k2"), _reader(bucket, tmp_path))
    payload = LoadWeightsJob(tinker_path=record.tinker_path, storage_uri=record.storage_uri, with_optimizer=True)
    loaded = by_id(run_to_completion(other, [job("alice", "sc:train:0", 0, payload)]))
    assert loaded["sc:train:0:0"].error is None, loaded["sc:train:0:0"].error
    original, restored = engine.pool.run(RUN_A), other.pool.run("sc:train:0")
    assert restored.optimizer.steps == original.optimizer.steps == 1
    assert original.adapter.params.keys() == restored.adapter.params.keys()
    assert any(float(b.detach().abs().max()) > 0 for _, b in original.adapter.params.values())  # trained, not PEFT init
    for name, (a, b) in original.adapter.params.items():
        ra, rb = restored.adapter.params[name]
        assert torch.equal(a, ra) and torch.equal(b, rb), name


# -------------------------------------------------------------------------------------------- crash and retry


def test_crash_between_shards_and_manifest_is_invisible_and_collected(bucket, s3, store, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("worker died before the manifest PUT")

    with monkeypatch.context() as m:
        m.setattr(store, "_commit", crash)
        with pytest.raises(RuntimeError, match="worker died"):
            _write(store, V1)
    orphans = _keys(s3, bucket)
    assert len(orphans) == 2 and all("/attempts/" in k for k in orphans)  # shards uploaded, no manifest
    uri = f"s3://{bucket}/{FOLDER}"
    with pytest.raises(CheckpointCorrupt, match="no manifest"):
        _reader(bucket, tmp_path).open(uri)

    assert _write(store, V2) == uri  # the retry is not blocked by the orphans and sees none of them
    assert _files(_reader(bucket, tmp_path).open(uri)) == V2

    assert store.gc([uri], GRACE).deleted == []  # orphans are younger than the grace period
    report = store.gc([uri], GRACE, now=datetime.now(UTC) + LATER)
    assert set(report.deleted) == orphans
    assert _keys(s3, bucket) == _keys(s3, bucket, f"{FOLDER}/") and not (_keys(s3, bucket) & orphans)
    assert _files(_reader(bucket, tmp_path).open(uri)) == V2


def test_gc_drops_manifests_unknown_to_the_caller(bucket, s3, store, tmp_path):
    kept = _write(store, V1)
    lost, _ = store.write("alice", "s1:train:0", "weights/never-recorded", _filler(V2))  # crash before DB commit
    assert store.gc([kept], GRACE).deleted == []
    assert store.gc(None, GRACE, now=datetime.now(UTC) + LATER).deleted == []  # None: every manifest is a root
    report = store.gc([kept], GRACE, now=datetime.now(UTC) + LATER)
    assert len(report.deleted) == 3 and all("/never-recorded/" in k for k in report.deleted)
    with pytest.raises(CheckpointCorrupt):
        _reader(bucket, tmp_path).open(lost)
    assert _files(_reader(bucket, tmp_path).open(kept)) == V1


# ------------------------------------------------------------------------------------------------ corruption


def _shard_key(s3, bucket: str, name: str) -> str:
    (key,) = [k for k in _keys(s3, bucket) if "/attempts/" in k and k.endswith(f"/{name}")]
    return key


def test_flipped_byte_in_stored_shard_is_refused(bucket, s3, store, tmp_path):
    uri = _write(store, V1)
    key = _shard_key(s3, bucket, "adapter_model.safetensors")
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[100] ^= 0x01  # same size, different content
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(CheckpointCorrupt, match="adapter_model.safetensors"):
        _reader(bucket, tmp_path).open(uri)
    data[100] ^= 0x01
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    assert _files(_reader(bucket, tmp_path).open(uri)) == V1  # the refusal was about the byte, nothing else


def test_missing_shard_or_manifest_is_refused(bucket, s3, store, tmp_path):
    uri = _write(store, V1)
    s3.delete_object(Bucket=bucket, Key=_shard_key(s3, bucket, "adapter_config.json"))
    with pytest.raises(CheckpointCorrupt, match="missing"):
        _reader(bucket, tmp_path).open(uri)
    s3.delete_object(Bucket=bucket, Key=f"{FOLDER}/{MANIFEST}")
    with pytest.raises(CheckpointCorrupt, match="no manifest"):
        _reader(bucket, tmp_path).open(uri)


# ------------------------------------------------------------------------------------- create-only, overwrite


def test_second_writer_gets_checkpoint_exists(bucket, s3, store, tmp_path):
    _write(store, V1)
    with pytest.raises(CheckpointExists):
        _write(_store(bucket, tmp_path / "late"), V2)  # refused by the early check, before uploading


def test_create_only_race_is_decided_by_the_manifest_put(bucket, s3, store, tmp_path):
    racer = _store(bucket, tmp_path / "racer")

    def fill_while_the_other_commits(folder: Path) -> None:
        _filler(V2)(folder)
        _write(racer, V1)  # commits after our existence check passed

    with pytest.raises(CheckpointExists):
        store.write("alice", "s1:train:0", "weights/step-1", fill_while_the_other_commits)
    assert _files(_reader(bucket, tmp_path).open(f"s3://{bucket}/{FOLDER}")) == V1
    assert len(_keys(s3, bucket)) == 1 + len(V1)  # the loser's uploaded attempt was removed


def test_overwrite_is_atomic_for_readers(bucket, s3, store, tmp_path, monkeypatch):
    uri = _write(store, V1)
    old_manifest = s3.get_object(Bucket=bucket, Key=f"{FOLDER}/{MANIFEST}")["Body"].read()
    real_commit = store._commit
    seen_before_commit = {}

    def commit_after_a_read(*args, **kwargs):
        seen_before_commit.update(_files(_reader(bucket, tmp_path).open(uri)))  # new shards are already uploaded
        real_commit(*args, **kwargs)

    monkeypatch.setattr(store, "_commit", commit_after_a_read)
    assert _write(store, V2, overwrite=True) == uri
    assert seen_before_commit == V1
    assert _files(_reader(bucket, tmp_path).open(uri)) == V2  # V1's adapter_config.json is not mixed in

    report = store.gc([uri], GRACE, now=datetime.now(UTC) + LATER)
    assert len(report.deleted) == len(V1) and all(k.endswith(tuple(V1)) for k in report.deleted)

    # A reader that fetched the old manifest just before the overwrite and gc retries with the new one.
    slow = _reader(bucket, tmp_path)
    real_manifest, calls = slow._manifest_bytes, []

    def stale_first(*args):
        calls.append(args)
        return old_manifest if len(calls) == 1 else real_manifest(*args)

    monkeypatch.setattr(slow, "_manifest_bytes", stale_first)
    assert _files(slow.open(uri)) == V2 and len(calls) == 2


# ----------------------------------------------------------------------------------- multipart gc, deletion


def test_gc_aborts_stale_multipart_uploads_under_its_prefix(bucket, s3, store):
    ours = s3.create_multipart_upload(Bucket=bucket, Key=f"{FOLDER}/attempts/x/adapter_model.safetensors")
    s3.upload_part(Bucket=bucket, Key=ours["Key"], UploadId=ours["UploadId"], PartNumber=1, Body=b"part")
    foreign = s3.create_multipart_upload(Bucket=bucket, Key="elsewhere/file.bin")

    def open_uploads() -> set[str]:
        return {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    assert store.gc([], timedelta(days=365 * 100)).aborted_uploads == []  # younger than a century of grace
    assert open_uploads() == {ours["UploadId"], foreign["UploadId"]}
    report = store.gc([], GRACE, now=datetime.now(UTC) + LATER)
    assert report.aborted_uploads == [(ours["Key"], ours["UploadId"])]
    assert open_uploads() == {foreign["UploadId"]}


def test_delete_by_uri_removes_the_checkpoint(bucket, s3, store, tmp_path):
    uri = _write(store, V1)
    assert _keys(s3, bucket)
    delete_checkpoint_uri(uri)  # what the API's checkpoint DELETE route does
    assert _keys(s3, bucket) == set()
    with pytest.raises(CheckpointCorrupt):
        _reader(bucket, tmp_path).open(uri)
    delete_checkpoint_uri(uri)  # idempotent


def test_factory_picks_local_store_for_paths(tmp_path):
    assert isinstance(open_checkpoint_store(tmp_path / "ckpt"), LocalCheckpointStore)
    assert isinstance(open_checkpoint_store((tmp_path / "ckpt2").as_uri()), LocalCheckpointStore)
