"""`POST /api/v1/copy_weights`: copy a checkpoint the caller can read into a new checkpoint the caller owns.

As in Tinker, the copy keeps the source's kind and name and belongs to a new training run that cannot be trained on
(status `unloaded`; its checkpoint loads, samples, publishes and expires like any other). The run is either
- run 0 of a new session of the caller in project `destination_project_id` (what the SDK's `RestClient.copy_weights`
  and `ServiceClient.copy_weights` send; the session is finished at once, no client holds it), or
- run `<session_id>:train:<model_seq_id>` of one of the caller's sessions (a slot already taken is a 409).
The copy's `ttl_seconds` sets its own expiry (the source's is not inherited), and its `user_metadata` (and its run's)
names the source under `copied_from`. The copy is a `checkpoint_copy` in the caller's audit log and a
`checkpoint_read` (purpose `copy`) in the source owner's, both in the transaction that records the copy.

Retries: the SDK sends one `X-Idempotency-Key` for every retry of one copy. The new session's id is derived from
(tenant, key), so a retry whose first attempt already committed answers the same path instead of copying twice;
the same key with another source is a 409.

Limits: unlike Tinker, whose copies share storage with their source, Loom copies the files (through the checkpoint
store, so with S3 a verified download and an upload, inside the request): a copy outlives its source's deletion or
expiry. Loom has no weights access tokens (a checkpoint is readable by its owner, or by anyone once published), so
`weights_access_token` is ignored, and projects are labels on sessions, with no membership to check.
"""

from __future__ import annotations

import secrets
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db.audit import Event, ReadPurpose, checkpoint_read
from api.db.checkpoints import CheckpointRecord, record_checkpoint
from api.db.models import Checkpoint, CheckpointKind, ClientSession, RunStatus, TrainingRun
from api.db.types import utcnow
from api.deps import State, Tenant, owned_session
from api.errors import APIError, ErrorCode, invalid
from api.paths import live_checkpoint, parse_tinker_path, readable_checkpoint
from contract.checkpoint_store import MANIFEST, configured_checkpoint_store, discard_checkpoint_uris
from contract.settings import Settings
from loom.types import CopyWeightsRequest, CopyWeightsResponse
from loom.types.sessions import ClientSessionFinished, ClientSessionFinishReason

router = APIRouter(prefix="/api/v1")

COPIED_FROM = "copied_from"
"""The `user_metadata` key of a copy (and of its run) that names the checkpoint it was copied from."""

_RETRY_SESSIONS = uuid.UUID("6f1c3a52-2b0e-4d8e-9a57-3c0c1d7f5e21")
"""The uuid5 namespace of the sessions a copy with an idempotency key is made in (one per tenant and key)."""


@dataclass(frozen=True)
class _Destination:
    session_id: str
    model_seq_id: int
    project_id: str | None
    """Set when the copy gets a new session, in this project."""

    @property
    def run_id(self) -> str:
        return f"{self.session_id}:train:{self.model_seq_id}"


@dataclass(frozen=True)
class _Source:
    path: str
    checkpoint_id: str
    kind: CheckpointKind
    storage_uri: str
    run: dict[str, Any]
    """The source run's LoRA facts, which the copy's run repeats."""


def _destination(body: CopyWeightsRequest, request: Request, owner: str) -> _Destination:
    if body.session_id is not None or body.model_seq_id is not None:
        if body.session_id is None or body.model_seq_id is None:
            raise invalid("session_id and model_seq_id go together", "session_id")
        if body.destination_project_id is not None:
            raise invalid("give destination_project_id, or session_id and model_seq_id, not both", "session_id")
        return _Destination(body.session_id, body.model_seq_id, None)
    if not body.destination_project_id:
        raise invalid("give destination_project_id, or session_id and model_seq_id", "destination_project_id")
    key = request.headers.get("x-idempotency-key")
    session_id = uuid.uuid5(_RETRY_SESSIONS, f"{owner}\n{key}") if key else uuid.uuid4()
    return _Destination(str(session_id), 0, body.destination_project_id)


def _done_before(session: Session, owner: str, to: _Destination, source: _Source) -> str | None:
    """The path of this very copy if an earlier attempt made it; None if its run is free; 409 if taken."""
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == to.run_id, TrainingRun.owner == owner))
    if run is None:
        return None
    copy = session.scalar(
        select(Checkpoint).where(
            Checkpoint.run_id == run.id, Checkpoint.checkpoint_id == source.checkpoint_id, live_checkpoint()
        )
    )
    if copy is not None and copy.user_metadata.get(COPIED_FROM) == source.path:
        return copy.tinker_path
    param = "model_seq_id" if to.project_id is None else "X-Idempotency-Key"
    raise APIError(409, ErrorCode.CONFLICT, f"training run {to.run_id} already exists", param)


def _copy_files(settings: Settings, owner: str, run_id: str, source: _Source) -> tuple[str, int]:
    """Copy the source's verified files to a location of their own; returns (storage uri, bytes)."""
    store = configured_checkpoint_store(settings)
    folder = store.open(source.storage_uri)

    def fill(staging: Path) -> None:
        for file in folder.iterdir():
            if file.name != MANIFEST:
                shutil.copyfile(file, staging / file.name)

    location = f"{source.checkpoint_id}~copy.{secrets.token_hex(8)}"  # never a concurrent attempt's
    return store.write(owner, run_id, location, fill)


def _record_copy(
    session: Session, owner: str, to: _Destination, source: _Source, uri: str, size: int, ttl: int | None
) -> str:
    if to.project_id is not None:
        finished = ClientSessionFinished(
            reason=ClientSessionFinishReason(type="success"), detail="made by copy_weights"
        )
        session.add(
            ClientSession(
                id=to.session_id,
                owner=owner,
                project_id=to.project_id,
                finished_at=utcnow(),
                finish_status=finished.to_wire(),
            )
        )
    else:
        owned_session(session, owner, to.session_id)
    copied_from = {COPIED_FROM: source.path}
    session.add(
        TrainingRun(
            id=to.run_id,
            owner=owner,
            session_id=to.session_id,
            model_seq_id=to.model_seq_id,
            user_metadata=copied_from,
            status=RunStatus.UNLOADED.value,
            **source.run,
        )
    )
    session.flush()
    tinker_path = f"tinker://{to.run_id}/{source.checkpoint_id}"
    record = CheckpointRecord(
        run_id=to.run_id,
        owner=owner,
        checkpoint_id=source.checkpoint_id,
        kind=source.kind,
        tinker_path=tinker_path,
        storage_uri=uri,
        size_bytes=size,
        ttl_seconds=ttl,
        ephemeral=False,
        user_metadata=copied_from,
        event=Event.CHECKPOINT_COPY,
    )
    record_checkpoint(session, record)
    return tinker_path


@router.post("/copy_weights")
def copy_weights(body: CopyWeightsRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    to = _destination(body, request, owner)
    with state.reading() as session:
        found = readable_checkpoint(session, owner, parse_tinker_path(body.source_path, "source_path"))
        run = session.get(TrainingRun, found.run_id)
        source = _Source(
            path=found.tinker_path,
            checkpoint_id=found.checkpoint_id,
            kind=CheckpointKind(found.kind),
            storage_uri=found.storage_uri,
            run={
                "base_model": run.base_model,
                "lora_rank": run.lora_rank,
                "train_attn": run.train_attn,
                "train_mlp": run.train_mlp,
                "train_unembed": run.train_unembed,
                "train_vision": run.train_vision,
                "seed": run.seed,
            },
        )
        done = _done_before(session, owner, to, source)
        if to.project_id is None:
            owned_session(session, owner, to.session_id)
    if done is None:
        uri, size = _copy_files(state.settings, owner, to.run_id, source)
        try:
            with state.transaction() as session:
                done = _record_copy(session, owner, to, source, uri, size, body.ttl_seconds)
                checkpoint_read(session, found, owner, ReadPurpose.COPY)
        except IntegrityError:  # a concurrent attempt of the same copy committed first
            discard_checkpoint_uris([uri])
            with state.reading() as session:
                done = _done_before(session, owner, to, source)
            if done is None:
                raise
        except Exception:
            discard_checkpoint_uris([uri])
            raise
    return CopyWeightsResponse(tinker_path=done).to_wire()
