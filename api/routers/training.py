"""Tinker training endpoints: create_model, get_info, forward_backward (JSON and protobuf), forward, optim_step,
save_weights, save_weights_for_sampler, save_weights_external, load_weights, unload_model.

Each mutating call checks ownership and validates the request against the base model *before* queueing, so bad
input is a 400 with a machine-readable error instead of a failed future; the worker trusts what it is handed.
Accepted requests become jobs (`contract/jobs.py` payloads) in the run's ordered "train" lane: seq 0 is the run's
creation, the client numbers its ops from 1, and `unload_model`, which Tinker does not number, takes the seq after
the newest op submitted so far.

A training op may be numbered at most `SEQ_ID_WINDOW` ahead of the run's newest submitted op (a seq_id far ahead
would wait forever for the ops before it); a replay of a submitted seq_id is always accepted.

`get_info` names the base model's public id as `tokenizer_id`; the tokenizer's files are served by
`api/routers/tokenizers.py` and, for Hugging Face Hub clients (`HF_ENDPOINT`), `api/routers/hub.py`.

`load_weights` (into a run, or creating one from a checkpoint) is a `checkpoint_read` (purpose `load_weights`) in
the checkpoint owner's audit log, in the transaction that queues the load.

Limits: checkpoint names must match `CHECKPOINT_NAME_PATTERN` (so never `.` or `..`); `ttl_seconds` bounds are
declared on the wire types (`loom.types.limits`).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.admission import WorkerBudget
from api.db.audit import ReadPurpose, checkpoint_read
from api.db.custom_losses import owned_custom_loss
from api.db.jobs import next_training_seq, seq_beyond_window
from api.db.models import Checkpoint, RunStatus, SamplingSession, TrainingRun
from api.deps import State, Tenant, app_state, enqueue, live_session, owned_run
from api.errors import APIError, ErrorCode, invalid, invalid_from_validation
from api.images import prepare_forward_backward
from api.openapi import raw_body
from api.paths import parse_tinker_path, readable_checkpoint
from api.proto.codec import ProtoDecodeError, decode_forward_backward_request
from api.refusals import note_ordered_op
from api.stability import recorded_targets
from contract.age_encryption import BadRecipient, parse_recipients
from contract.jobs import (
    DEFAULT_LORA_RANK,
    CheckpointTarget,
    CreateModelJob,
    CustomLossSpec,
    ForwardBackwardJob,
    ForwardJob,
    JobKind,
    JobPayload,
    LoadWeightsJob,
    OptimStepJob,
    RunLora,
    SaveWeightsExternalJob,
    SaveWeightsForSamplerJob,
    SaveWeightsJob,
    UnloadModelJob,
    default_lora_seed,
)
from loom.types import (
    CreateModelRequest,
    ForwardBackwardInput,
    ForwardBackwardRequest,
    ForwardRequest,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoraConfig,
    ModelData,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
    UntypedAPIFuture,
)
from loom.types.limits import CHECKPOINT_NAME_PATTERN, SEQ_ID_WINDOW
from loom.types.validation import InvalidRequest, check_adam, check_forward_backward

router = APIRouter(prefix="/api/v1")

RAW_BODY_MODELS = (ForwardBackwardRequest, ForwardRequest)
"""Bodies read raw (JSON or protobuf) by the routes below, whose schemas `api/openapi.py` publishes."""

CHECKPOINT_NAME = re.compile(CHECKPOINT_NAME_PATTERN)


def _future(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    return UntypedAPIFuture(request_id=request_id, model_id=model_id).to_wire()


def _parse(model: type[BaseModel], data: bytes | dict[str, Any]) -> Any:
    """`model` from a JSON body (parsed and validated in one pass) or from a decoded protobuf body."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise invalid(f"body is not valid JSON: {errors[0]['msg']}") from exc
        raise invalid_from_validation(errors) from exc


def _seq(request: Request, owner: str, model_id: str, seq_id: int | None, kind: JobKind) -> int:
    """The seq_id of an ordered op of `model_id`; from here on, a refusal of this request takes that seq
    (`api/refusals.py`), so the run's later ops never wait for it."""
    if seq_id is None or seq_id < 1:
        raise invalid("seq_id is required and must be >= 1 (seq 0 is the run's creation)", "seq_id")
    note_ordered_op(request, owner, model_id, seq_id, kind)
    return seq_id


def _active_run(session: Session, owner: str, model_id: str) -> TrainingRun:
    run = owned_run(session, owner, model_id)
    if run.status != RunStatus.ACTIVE.value:
        raise APIError(409, ErrorCode.CONFLICT, f"training run {model_id} was unloaded", "model_id")
    live_session(session, owner, run.session_id)
    return run


def _create_run(
    session: Session,
    request: Request,
    owner: str,
    session_id: str,
    model_seq_id: int,
    base_model: str,
    lora: LoraConfig,
    meta: dict,
) -> TrainingRun:
    live_session(session, owner, session_id)
    model_id = f"{session_id}:train:{model_seq_id}"
    run = session.get(TrainingRun, model_id)
    if run is not None:
        return run  # a replayed create: the job store dedupes the seq-0 job itself
    app_state(request).rate_limiter.check_new_run(session, owner, request.state.tenant_limits)
    run = TrainingRun(
        id=model_id,
        owner=owner,
        session_id=session_id,
        model_seq_id=model_seq_id,
        base_model=base_model,
        lora_rank=lora.rank,
        train_attn=lora.train_attn,
        train_mlp=lora.train_mlp,
        train_unembed=lora.train_unembed,
        train_vision=bool(lora.train_vision),
        seed=lora.seed,
        user_metadata=meta,
        next_seq_id=0,
    )
    session.add(run)
    session.flush()
    return run


def _enqueue_op(session: Session, request: Request, run: TrainingRun, seq_id: int, payload: JobPayload) -> str:
    """Queue an op of `run` in its ordered lane; returns the request id. A save of a checkpoint the tenant will see
    must fit its stored-bytes quota (hidden sampling snapshots are not counted)."""
    newest = seq_beyond_window(session, run.id, seq_id)
    if newest is not None:
        raise invalid(f"seq_id {seq_id} is more than {SEQ_ID_WINDOW} ahead of the run's newest op ({newest})", "seq_id")
    if isinstance(payload, SaveWeightsJob | SaveWeightsForSamplerJob) and not payload.target.ephemeral:
        app_state(request).rate_limiter.check_new_checkpoint(session, run.owner, request.state.tenant_limits)
    return enqueue(
        session,
        request,
        owner=run.owner,
        base_model=run.base_model,
        model_id=run.id,
        seq_id=seq_id,
        payload=payload,
    )


def _submitted(state: State, run: TrainingRun, request_id: str) -> dict[str, Any]:
    state.queue.submitted(run.base_model, run.worker_id)
    return _future(request_id, run.id)


@router.post("/create_model")
def create_model(body: CreateModelRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    info = state.model(body.base_model)
    lora = body.lora_config or LoraConfig(rank=DEFAULT_LORA_RANK)
    if lora.rank > info.max_lora_rank:
        raise invalid(
            f"lora_config.rank {lora.rank} exceeds max LoRA rank {info.max_lora_rank} for {info.name}",
            "lora_config.rank",
        )
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed or lora.train_vision):
        raise invalid("lora_config trains nothing: enable train_attn, train_mlp or train_unembed", "lora_config")
    if lora.train_vision and info.vision is None:
        raise invalid(f"{info.name} has no vision tower to train", "lora_config.train_vision")
    with state.transaction() as session:
        run = _create_run(
            session, request, owner, body.session_id, body.model_seq_id, info.name, lora, body.user_metadata or {}
        )
        seed = lora.seed if lora.seed is not None else default_lora_seed(run.id)
        payload = CreateModelJob(
            lora=RunLora(
                rank=lora.rank,
                seed=seed,
                train_attn=lora.train_attn,
                train_mlp=lora.train_mlp,
                train_unembed=lora.train_unembed,
                train_vision=bool(lora.train_vision),
            )
        )
        job_id = _enqueue_op(session, request, run, 0, payload)
    return _submitted(state, run, job_id)


@router.post("/get_info")
def get_info(body: GetInfoRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        run = owned_run(session, owner, body.model_id)
    info = state.model(run.base_model)
    return GetInfoResponse(
        model_data=ModelData(
            arch=info.arch,
            model_name=info.name,
            tokenizer_id=info.name,
        ),
        model_id=run.id,
        is_lora=True,
        lora_rank=run.lora_rank,
        model_name=info.name,
    ).to_wire()


async def _forward_backward_body(request: Request) -> bytes | dict[str, Any]:
    """A JSON body as it came (parsed with its model, in one pass), or a protobuf body decoded to a dict."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if "application/x-protobuf" in content_type:
        try:
            return decode_forward_backward_request(body)
        except ProtoDecodeError as exc:
            raise invalid(f"malformed protobuf ForwardBackwardRequest: {exc}") from exc
    if "json" not in content_type and content_type:
        raise APIError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"unsupported content-type {content_type!r}")
    return body


def _queue_forward_backward(state: State, request: Request, owner: str, fb: ForwardBackwardRequest):
    kind = JobKind.FORWARD if fb.is_forward_only else JobKind.FORWARD_BACKWARD
    seq_id = _seq(request, owner, fb.model_id, fb.seq_id, kind)
    fb_input = fb.forward_backward_input
    with state.transaction() as session:
        run = _active_run(session, owner, fb.model_id)
        custom_loss = _custom_loss(session, owner, run, fb_input)
    info = state.model(run.base_model)
    fb_input = prepare_forward_backward(fb_input, info.vision, state.settings)
    try:
        custom_inputs = custom_loss.inputs if custom_loss is not None else ()
        check_forward_backward(fb_input, info.vocab_size, info.max_context_length, custom_inputs, info.image_token_id)
    except InvalidRequest as exc:
        raise invalid(str(exc) if exc.param is None else f"{exc.param}: {exc}", exc.param) from exc
    WorkerBudget.of(info, state.settings).check_forward_backward(fb_input)
    recorded = None
    if fb_input.loss_fn == "stable_reinforce":
        with state.reading() as session:
            recorded = recorded_targets(session, owner, run.session_id, fb_input.data)
    job = ForwardJob if fb.is_forward_only else ForwardBackwardJob
    payload = job(input=fb_input, custom_loss=custom_loss, recorded=recorded)
    with state.transaction() as session:
        job_id = _enqueue_op(session, request, run, seq_id, payload)
    return _submitted(state, run, job_id)


def _custom_loss(session: Session, owner: str, run: TrainingRun, fb: ForwardBackwardInput) -> CustomLossSpec | None:
    """The stored loss a `custom` request names by `loss_fn_config.loss_id` (None for the built-in losses): 404
    when the tenant has no such loss, 400 when it belongs to another session than the run's."""
    loss_id = (fb.loss_fn_config or {}).get("loss_id")
    if fb.loss_fn != "custom" or not isinstance(loss_id, str):
        return None  # a missing or numeric loss_id is refused with the other config checks
    found = owned_custom_loss(session, owner, loss_id)
    if found is None:
        raise APIError(404, ErrorCode.NOT_FOUND, f"custom loss {loss_id!r} not found", "loss_fn_config.loss_id")
    session_id, spec = found
    if session_id != run.session_id:
        raise invalid(
            f"custom loss {loss_id!r} was created in session {session_id}; only that session's runs can use it",
            "loss_fn_config.loss_id",
        )
    return spec


def _note_decoded(request: Request, owner: str, raw: bytes | dict[str, Any]) -> None:
    """A decoded protobuf body names its op before its fields are validated (a JSON body is parsed in one pass)."""
    if isinstance(raw, dict) and isinstance(raw.get("model_id"), str) and type(raw.get("seq_id")) is int:
        kind = JobKind.FORWARD if raw.get("forward_only") else JobKind.FORWARD_BACKWARD
        note_ordered_op(request, owner, raw["model_id"], raw["seq_id"], kind)


@router.post("/forward_backward", openapi_extra=raw_body(ForwardBackwardRequest, "ForwardBackwardRequest"))
async def forward_backward(request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    raw = await _forward_backward_body(request)
    _note_decoded(request, owner, raw)
    fb = await run_in_threadpool(_parse, ForwardBackwardRequest, raw)
    return await run_in_threadpool(_queue_forward_backward, state, request, owner, fb)


@router.post("/forward", openapi_extra=raw_body(ForwardRequest, "ForwardBackwardRequest"))
async def forward(request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    raw = await _forward_backward_body(request)
    fwd = await run_in_threadpool(_parse, ForwardRequest, raw)
    fb = fwd.to_forward_backward_request()
    return await run_in_threadpool(_queue_forward_backward, state, request, owner, fb)


@router.post("/optim_step")
def optim_step(body: OptimStepRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    seq_id = _seq(request, owner, body.model_id, body.seq_id, JobKind.OPTIM_STEP)
    try:
        check_adam(body.adam_params.to_wire())
    except InvalidRequest as exc:
        raise invalid(f"{exc.param}: {exc}", exc.param) from exc
    with state.transaction() as session:
        run = _active_run(session, owner, body.model_id)
        job_id = _enqueue_op(session, request, run, seq_id, OptimStepJob(adam=body.adam_params))
    return _submitted(state, run, job_id)


def _checkpoint_name(name: str | None, param: str = "path") -> str:
    if name is None or not CHECKPOINT_NAME.fullmatch(name):
        raise invalid(f"checkpoint name must match {CHECKPOINT_NAME_PATTERN}", param)
    return name


def _name_taken(session: Session, run_id: str, checkpoint_id: str) -> bool:
    return (
        session.scalar(
            select(Checkpoint.id).where(Checkpoint.run_id == run_id, Checkpoint.checkpoint_id == checkpoint_id)
        )
        is not None
    )


@router.post("/save_weights")
def save_weights(body: SaveWeightsRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    seq_id = _seq(request, owner, body.model_id, body.seq_id, JobKind.SAVE_WEIGHTS)
    name = _checkpoint_name(body.path)
    with state.transaction() as session:
        run = _active_run(session, owner, body.model_id)
        checkpoint_id = f"weights/{name}"
        if not body.overwrite and _name_taken(session, run.id, checkpoint_id):
            raise APIError(
                409, ErrorCode.CONFLICT, f"checkpoint {checkpoint_id} already exists (pass overwrite=True)", "path"
            )
        target = CheckpointTarget(
            checkpoint_id=checkpoint_id,
            tinker_path=f"tinker://{run.id}/{checkpoint_id}",
            ttl_seconds=body.ttl_seconds,
            overwrite=body.overwrite,
        )
        job_id = _enqueue_op(session, request, run, seq_id, SaveWeightsJob(target=target))
    return _submitted(state, run, job_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: SaveWeightsForSamplerRequest, request: Request, state: State, owner: Tenant
) -> dict[str, Any]:
    seq_id = _seq(request, owner, body.model_id, body.seq_id, JobKind.SAVE_WEIGHTS_FOR_SAMPLER)
    with state.transaction() as session:
        run = _active_run(session, owner, body.model_id)
        sampler_id: str | None = None
        if body.path is not None:
            name = _checkpoint_name(body.path)
            if _name_taken(session, run.id, f"sampler_weights/{name}"):
                raise APIError(409, ErrorCode.CONFLICT, f"sampler checkpoint {name} already exists", "path")
        elif body.sampling_session_seq_id is not None:
            name = f"ephemeral-{body.sampling_session_seq_id:06d}-seq{seq_id}"
            sampler_id = f"{run.session_id}:sample:{body.sampling_session_seq_id}"
        else:
            raise invalid("save_weights_for_sampler needs a path or a sampling_session_seq_id", "path")
        checkpoint_id = f"sampler_weights/{name}"
        tinker_path = f"tinker://{run.id}/{checkpoint_id}"
        if sampler_id is not None and session.get(SamplingSession, sampler_id) is None:
            session.add(
                SamplingSession(
                    id=sampler_id,
                    owner=owner,
                    session_id=run.session_id,
                    base_model=run.base_model,
                    model_path=tinker_path,
                )
            )
        target = CheckpointTarget(
            checkpoint_id=checkpoint_id,
            tinker_path=tinker_path,
            ttl_seconds=body.ttl_seconds,
            ephemeral=sampler_id is not None,
        )
        payload = SaveWeightsForSamplerJob(target=target, sampling_session_id=sampler_id)
        job_id = _enqueue_op(session, request, run, seq_id, payload)
    return _submitted(state, run, job_id)


@router.post("/save_weights_external")
def save_weights_external(
    body: SaveWeightsExternalRequest, request: Request, state: State, owner: Tenant
) -> dict[str, Any]:
    """The run's adapter as a PEFT folder to download (`external_weights_urls`), optionally age-encrypted."""
    seq_id = _seq(request, owner, body.model_id, body.seq_id, JobKind.SAVE_WEIGHTS_EXTERNAL)
    name = _checkpoint_name(body.path)
    if body.age_encryption_recipients is not None:
        try:
            parse_recipients(body.age_encryption_recipients)
        except BadRecipient as exc:
            raise invalid(f"age_encryption_recipients{exc}", "age_encryption_recipients") from exc
    with state.transaction() as session:
        run = _active_run(session, owner, body.model_id)
        checkpoint_id = f"external_weights/{name}"
        if _name_taken(session, run.id, checkpoint_id):
            raise APIError(409, ErrorCode.CONFLICT, f"checkpoint {checkpoint_id} already exists", "path")
        target = CheckpointTarget(
            checkpoint_id=checkpoint_id, tinker_path=f"tinker://{run.id}/{checkpoint_id}", ttl_seconds=body.ttl_seconds
        )
        payload = SaveWeightsExternalJob(target=target, age_recipients=body.age_encryption_recipients)
        job_id = _enqueue_op(session, request, run, seq_id, payload)
    return _submitted(state, run, job_id)


def _training_checkpoint(session: Session, owner: str, path: str) -> Checkpoint:
    parsed = parse_tinker_path(path)
    if parsed.kind != "weights":
        raise invalid(
            "load_weights needs a tinker://<run>/weights/<name> path (sampler weights hold no optimizer state)", "path"
        )
    return readable_checkpoint(session, owner, parsed)


@router.post("/load_weights")
def load_weights(body: LoadWeightsRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        checkpoint = _training_checkpoint(session, owner, body.path)
        source = session.get(TrainingRun, checkpoint.run_id)
        if body.model_id is not None:
            run = _active_run(session, owner, body.model_id)
            seq_id = _seq(request, owner, body.model_id, body.seq_id, JobKind.LOAD_WEIGHTS)
        else:
            base = state.model(body.base_model or source.base_model)
            if base.name != source.base_model:
                raise invalid(f"checkpoint was trained on {source.base_model}, not {base.name}", "base_model")
            lora = LoraConfig(
                rank=source.lora_rank,
                seed=source.seed,
                train_attn=source.train_attn,
                train_mlp=source.train_mlp,
                train_unembed=source.train_unembed,
                train_vision=source.train_vision,
            )
            run = _create_run(
                session,
                request,
                owner,
                body.session_id,
                body.model_seq_id or 0,
                base.name,
                lora,
                body.user_metadata or {},
            )
            seq_id = 0
        if run.base_model != source.base_model or run.lora_rank != source.lora_rank:
            raise invalid(
                f"checkpoint ({source.base_model}, rank {source.lora_rank}) does not fit run {run.id} ({run.base_model}, rank {run.lora_rank})",
                "path",
            )
        payload = LoadWeightsJob(
            tinker_path=body.path, storage_uri=checkpoint.storage_uri, with_optimizer=body.optimizer
        )
        job_id = _enqueue_op(session, request, run, seq_id, payload)
        checkpoint_read(session, checkpoint, owner, ReadPurpose.LOAD_WEIGHTS)
    return _submitted(state, run, job_id)


@router.post("/unload_model")
def unload_model(body: UnloadModelRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        run = _active_run(session, owner, body.model_id)
        run.status = RunStatus.UNLOADED.value
        # After every op submitted before it, so the run's earlier requests still run first.
        job_id = _enqueue_op(session, request, run, next_training_seq(session, run.id), UnloadModelJob())
    return _submitted(state, run, job_id)
