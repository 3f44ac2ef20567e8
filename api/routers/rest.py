"""Run and checkpoint management (Tinker's RestClient surface): weights_info, training runs, checkpoints.

Everything is scoped to the caller's tenant; published checkpoints are readable by everyone through
`weights_info`.

Limits: list endpoints use offset/limit pagination, `limit` in [1, MAX_PAGE_SIZE] and `offset` a non-negative 64-bit
integer (anything else is a 400 naming the parameter); checkpoint deletion removes the files and the row at once.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from api.db.models import Checkpoint, ClientSession, TrainingRun
from api.deps import State, Tenant, owned_run
from api.errors import not_found
from api.paths import parse_tinker_path, readable_checkpoint
from api.session_records import in_projects
from contract.checkpoint_store import delete_checkpoint_uri
from loom.types import Checkpoint as WireCheckpoint
from loom.types import CheckpointsListResponse, Cursor, TrainingRunsResponse, WeightsInfoRequest, WeightsInfoResponse
from loom.types import TrainingRun as WireTrainingRun
from loom.types.limits import INT64_MAX, MAX_PAGE_SIZE

router = APIRouter(prefix="/api/v1")

PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
PageOffset = Annotated[int, Query(ge=0, le=INT64_MAX)]


def _checkpoint(c: Checkpoint) -> WireCheckpoint:
    return WireCheckpoint(
        checkpoint_id=c.checkpoint_id,
        checkpoint_type=c.kind,
        time=c.created_at,
        tinker_path=c.tinker_path,
        size_bytes=c.size_bytes,
        public=c.public,
        expires_at=c.expires_at,
    )


def _run(session, run: TrainingRun) -> WireTrainingRun:
    def last(kind: str) -> WireCheckpoint | None:
        c = session.scalar(
            select(Checkpoint)
            .where(Checkpoint.run_id == run.id, Checkpoint.kind == kind, Checkpoint.ephemeral.is_(False))
            .order_by(Checkpoint.created_at.desc())
            .limit(1)
        )
        return None if c is None else _checkpoint(c)

    return WireTrainingRun(
        training_run_id=run.id,
        base_model=run.base_model,
        model_owner=run.owner,
        is_lora=True,
        lora_rank=run.lora_rank,
        last_request_time=run.last_request_time,
        last_checkpoint=last("training"),
        last_sampler_checkpoint=last("sampler"),
        user_metadata={k: str(v) for k, v in (run.user_metadata or {}).items()},
    )


@router.post("/weights_info")
def weights_info(body: WeightsInfoRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        checkpoint = readable_checkpoint(session, owner, parse_tinker_path(body.tinker_path, "tinker_path"))
        run = session.get(TrainingRun, checkpoint.run_id)
    return WeightsInfoResponse(
        base_model=run.base_model,
        is_lora=True,
        lora_rank=run.lora_rank,
        train_attn=run.train_attn,
        train_mlp=run.train_mlp,
        train_unembed=run.train_unembed,
    ).to_wire()


@router.get("/training_runs")
def list_training_runs(
    state: State, owner: Tenant, limit: PageSize = 20, offset: PageOffset = 0, project_id: str | None = None
) -> dict[str, Any]:
    mine = TrainingRun.owner == owner
    if project_id is not None:  # a run is in its session's project
        mine = mine & TrainingRun.session_id.in_(select(ClientSession.id).where(in_projects([project_id])))
    with state.reading() as session:
        total = session.scalar(select(func.count()).select_from(TrainingRun).where(mine))
        runs = session.scalars(
            select(TrainingRun).where(mine).order_by(TrainingRun.created_at.desc()).offset(offset).limit(limit)
        ).all()
        items = [_run(session, r) for r in runs]
    return TrainingRunsResponse(
        training_runs=items, cursor=Cursor(offset=offset, limit=limit, total_count=total or 0)
    ).to_wire()


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        return _run(session, owned_run(session, owner, run_id)).to_wire()


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        owned_run(session, owner, run_id)
        rows = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.ephemeral.is_(False))
            .order_by(Checkpoint.created_at)
        ).all()
    return CheckpointsListResponse(checkpoints=[_checkpoint(c) for c in rows]).to_wire()


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(run_id: str, kind: str, name: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        owned_run(session, owner, run_id)
        row = session.scalar(
            select(Checkpoint).where(
                Checkpoint.run_id == run_id, Checkpoint.checkpoint_id == f"{kind}/{name}", Checkpoint.owner == owner
            )
        )
        if row is None:
            raise not_found(f"checkpoint tinker://{run_id}/{kind}/{name} not found")
        uri = row.storage_uri
        session.delete(row)
    delete_checkpoint_uri(uri)
    return {"deleted": f"tinker://{run_id}/{kind}/{name}"}
