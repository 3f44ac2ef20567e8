"""Run and checkpoint management (Tinker's RestClient surface): weights_info, training runs, checkpoints.

Everything is scoped to the caller's tenant: runs and checkpoints are listed for their owner only (with
`access_scope=accessible`, run listings and `GET /training_runs/{id}` also show other tenants' runs that have a
published checkpoint, with only those checkpoints), and only the owner may delete a checkpoint, publish or unpublish
it, or set its TTL (anyone else gets the 404 of a missing one).
A published checkpoint is readable by every tenant (`weights_info`, sampling, `load_weights`, OpenAI model names:
see `api/paths.py`). Unpublishing takes that back at once: another tenant's sampling session on it answers 404 from
its next sample on (samples already queued finish, since they carry the weights' location), while a run another
tenant already created from it (`load_weights`) keeps the weights it loaded.

TTL: `PUT .../ttl` sets `expires_at` to now + `ttl_seconds` (3600 s to 10 years) or clears it (`null`). An expired
checkpoint is gone for clients at once (404, left out of listings); its row and files are deleted by the workers'
idle sweep and by `loom gc` (`api.db.checkpoints.sweep_expired_checkpoints`).

Every change and every `weights_info` read is written to the checkpoint owner's audit log in the same transaction
(`api/db/audit.py`), a read by another tenant under that reader's name.

Limits: list endpoints use offset/limit pagination, `limit` in [1, MAX_PAGE_SIZE] and `offset` a non-negative 64-bit
integer (anything else is a 400 naming the parameter); checkpoint deletion removes the files and the row at once.
Hidden checkpoints (a sampling session's snapshot, recovery checkpoints) are never listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from sqlalchemy import ColumnElement, func, select

from api.db.audit import Event, ReadPurpose, checkpoint_event, checkpoint_read
from api.db.models import Checkpoint, ClientSession, TrainingRun
from api.db.types import utcnow
from api.deps import State, Tenant, owned_run
from api.errors import APIError, ErrorCode, not_found
from api.paths import TinkerPath, listed_checkpoint, owned_checkpoint, parse_tinker_path, readable_checkpoint
from api.session_records import in_projects
from contract.checkpoint_store import delete_checkpoint_uri
from loom.types import Checkpoint as WireCheckpoint
from loom.types import (
    CheckpointsListResponse,
    Cursor,
    SetCheckpointTtlRequest,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
)
from loom.types import TrainingRun as WireTrainingRun
from loom.types.limits import INT64_MAX, MAX_PAGE_SIZE

router = APIRouter(prefix="/api/v1")

PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
PageOffset = Annotated[int, Query(ge=0, le=INT64_MAX)]
AccessScope = Literal["owned", "accessible"]


def _checkpoint(c: Checkpoint) -> WireCheckpoint:
    return WireCheckpoint(
        checkpoint_id=c.checkpoint_id,
        checkpoint_type=c.kind,
        time=c.created_at,
        tinker_path=c.tinker_path,
        size_bytes=c.size_bytes,
        public=c.public,
        user_metadata={k: str(v) for k, v in (c.user_metadata or {}).items()} or None,
        expires_at=c.expires_at,
    )


def _published_by_others(owner: str) -> ColumnElement[bool]:
    """Another tenant's checkpoint this tenant may read: listed and published."""
    return listed_checkpoint() & Checkpoint.public.is_(True) & (Checkpoint.owner != owner)


def _runs_in_scope(owner: str, access_scope: AccessScope) -> ColumnElement[bool]:
    """`owned`: the caller's runs; `accessible`: also every run with a checkpoint published to everyone."""
    mine = TrainingRun.owner == owner
    if access_scope == "owned":
        return mine
    return mine | TrainingRun.id.in_(select(Checkpoint.run_id).where(_published_by_others(owner)))


def _last_checkpoints(session, runs: Sequence[TrainingRun], viewer: str) -> dict[tuple[str, str], WireCheckpoint]:
    """The newest training and sampler checkpoint of each run that `viewer` may see, by (run id, kind): all listed
    ones of the viewer's own runs, only the published ones of another tenant's. One query per kind of owner."""
    found: dict[tuple[str, str], WireCheckpoint] = {}
    own = [run.id for run in runs if run.owner == viewer]
    others = [run.id for run in runs if run.owner != viewer]
    for ids, visible in ((own, listed_checkpoint()), (others, _published_by_others(viewer))):
        if not ids:
            continue
        newest = func.row_number().over(
            partition_by=(Checkpoint.run_id, Checkpoint.kind), order_by=Checkpoint.created_at.desc()
        )
        ranked = (
            select(Checkpoint.id, newest.label("newest"))
            .where(Checkpoint.run_id.in_(ids), Checkpoint.kind.in_(("training", "sampler")), visible)
            .subquery()
        )
        rows = session.scalars(
            select(Checkpoint).join(ranked, ranked.c.id == Checkpoint.id).where(ranked.c.newest == 1)
        )
        found.update({(c.run_id, c.kind): _checkpoint(c) for c in rows})
    return found


def _runs(session, runs: Sequence[TrainingRun], viewer: str) -> list[WireTrainingRun]:
    """The wire form of `runs` as `viewer` sees them: another tenant's run shows only its published checkpoints."""
    last = _last_checkpoints(session, runs, viewer)
    return [
        WireTrainingRun(
            training_run_id=run.id,
            base_model=run.base_model,
            model_owner=run.owner,
            is_lora=True,
            lora_rank=run.lora_rank,
            last_request_time=run.last_request_time,
            last_checkpoint=last.get((run.id, "training")),
            last_sampler_checkpoint=last.get((run.id, "sampler")),
            user_metadata={k: str(v) for k, v in (run.user_metadata or {}).items()},
        )
        for run in runs
    ]


@router.post("/weights_info")
def weights_info(body: WeightsInfoRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        checkpoint = readable_checkpoint(session, owner, parse_tinker_path(body.tinker_path, "tinker_path"))
        checkpoint_read(session, checkpoint, owner, ReadPurpose.WEIGHTS_INFO)
        run = session.get(TrainingRun, checkpoint.run_id)
    return WeightsInfoResponse(
        base_model=run.base_model,
        is_lora=True,
        lora_rank=run.lora_rank,
        train_attn=run.train_attn,
        train_mlp=run.train_mlp,
        train_unembed=run.train_unembed,
        train_vision=run.train_vision,
    ).to_wire()


@router.get("/training_runs")
def list_training_runs(
    state: State,
    owner: Tenant,
    limit: PageSize = 20,
    offset: PageOffset = 0,
    project_id: str | None = None,
    access_scope: AccessScope = "owned",
) -> dict[str, Any]:
    mine = _runs_in_scope(owner, access_scope)
    if project_id is not None:  # a run is in its session's project
        mine = mine & TrainingRun.session_id.in_(select(ClientSession.id).where(in_projects([project_id])))
    with state.reading() as session:
        total = session.scalar(select(func.count()).select_from(TrainingRun).where(mine))
        runs = session.scalars(
            select(TrainingRun).where(mine).order_by(TrainingRun.created_at.desc()).offset(offset).limit(limit)
        ).all()
        items = _runs(session, runs, owner)
    return TrainingRunsResponse(
        training_runs=items, cursor=Cursor(offset=offset, limit=limit, total_count=total or 0)
    ).to_wire()


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, state: State, owner: Tenant, access_scope: AccessScope = "owned") -> dict[str, Any]:
    with state.reading() as session:
        run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id, _runs_in_scope(owner, access_scope)))
        if run is None:
            raise not_found(f"training run {run_id!r} not found")
        return _runs(session, [run], owner)[0].to_wire()


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        owned_run(session, owner, run_id)
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.run_id == run_id, listed_checkpoint()).order_by(Checkpoint.created_at)
        ).all()
    return CheckpointsListResponse(checkpoints=[_checkpoint(c) for c in rows]).to_wire()


@router.get("/checkpoints")
def list_user_checkpoints(state: State, owner: Tenant, limit: PageSize = 100, offset: PageOffset = 0) -> dict[str, Any]:
    """The caller's checkpoints across all their runs, newest first."""
    mine = (Checkpoint.owner == owner) & listed_checkpoint()
    with state.reading() as session:
        total = session.scalar(select(func.count()).select_from(Checkpoint).where(mine))
        rows = session.scalars(
            select(Checkpoint)
            .where(mine)
            .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
            .offset(offset)
            .limit(limit)
        ).all()
    return CheckpointsListResponse(
        checkpoints=[_checkpoint(c) for c in rows], cursor=Cursor(offset=offset, limit=limit, total_count=total or 0)
    ).to_wire()


def _path(run_id: str, kind: str, name: str) -> TinkerPath:
    """The checkpoint a REST URL names (`.../checkpoints/<kind>/<name>`, the SDK's checkpoint id unescaped)."""
    return parse_tinker_path(f"tinker://{run_id}/{kind}/{name}", "checkpoint_id")


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(run_id: str, kind: str, name: str, state: State, owner: Tenant) -> dict[str, Any]:
    path = _path(run_id, kind, name)
    with state.transaction() as session:
        row = owned_checkpoint(session, owner, path)
        uri = row.storage_uri
        session.delete(row)
        checkpoint_event(session, row, Event.CHECKPOINT_DELETE, owner)
    delete_checkpoint_uri(uri)
    return {"deleted": str(path)}


def _set_public(run_id: str, kind: str, name: str, state: State, owner: str, public: bool) -> dict[str, Any]:
    path = _path(run_id, kind, name)
    with state.transaction() as session:
        row = owned_checkpoint(session, owner, path)
        if row.public == public:
            already = "public" if public else "private"
            raise APIError(409, ErrorCode.CONFLICT, f"checkpoint {path} is already {already}", "checkpoint_id")
        row.public = public
        checkpoint_event(session, row, Event.CHECKPOINT_PUBLISH if public else Event.CHECKPOINT_UNPUBLISH, owner)
        return _checkpoint(row).to_wire()


@router.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def publish_checkpoint(run_id: str, kind: str, name: str, state: State, owner: Tenant) -> dict[str, Any]:
    """Make the checkpoint readable by every tenant (409 if it already is)."""
    return _set_public(run_id, kind, name, state, owner, True)


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def unpublish_checkpoint(run_id: str, kind: str, name: str, state: State, owner: Tenant) -> dict[str, Any]:
    """Make the checkpoint private again (409 if it is not published)."""
    return _set_public(run_id, kind, name, state, owner, False)


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
def set_checkpoint_ttl(
    run_id: str, kind: str, name: str, body: SetCheckpointTtlRequest, state: State, owner: Tenant
) -> dict[str, Any]:
    """Expire the checkpoint `ttl_seconds` from now, or never (`null`)."""
    path = _path(run_id, kind, name)
    with state.transaction() as session:
        row = owned_checkpoint(session, owner, path)
        row.expires_at = None if body.ttl_seconds is None else utcnow() + timedelta(seconds=body.ttl_seconds)
        expires_at = None if row.expires_at is None else row.expires_at.isoformat()
        checkpoint_event(
            session, row, Event.CHECKPOINT_TTL_SET, owner, ttl_seconds=body.ttl_seconds, expires_at=expires_at
        )
        return _checkpoint(row).to_wire()
