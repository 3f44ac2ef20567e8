"""Tinker sampling endpoints: create_sampling_session, join_sampling_session, asample, samplers/{id}.

A sampling session binds a base model and optionally LoRA weights (`model_path`); `asample` resolves the session
to the checkpoint's storage location at submit time, so the worker never needs the database to find weights.
The submit answer carries one `sample_sequence_ids` entry per sequence the result will hold, as SDK 0.38 expects.
A SamplingClient unpickled in another process joins the session (`join_sampling_session`) for a clone id of its own
(`api/db/sampler_clones.py`) and numbers its samples in that id's block of seq_ids. A finished session's samplers
take no new samples (410).
Reading weights is a `checkpoint_read` (purpose `sampling`) in the checkpoint owner's audit log: once when a
sampling session is made on a path, and for every sample that names a `model_path` itself.
With `record_stability_info=True` the job is kept as the record stable_reinforce trains against (`api/stability.py`).

Limits: `num_samples` is capped (see `loom.types.validation.check_sample`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.admission import WorkerBudget
from api.db.audit import ReadPurpose, checkpoint_read
from api.db.models import Checkpoint, SamplingSession, TrainingRun
from api.db.sampler_clones import TooManyClones, join_clone
from api.deps import State, Tenant, enqueue, live_session
from api.errors import invalid, not_found
from api.images import prepare_model_input
from api.paths import parse_tinker_path, readable_checkpoint
from api.sampler_completions import note_submitted
from contract.jobs import SampleJob, TinkerPrompt
from loom.types import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    GetSamplerResponse,
    JoinSamplingSessionRequest,
    JoinSamplingSessionResponse,
    SampleRequest,
    UntypedAPIFuture,
)
from loom.types.validation import InvalidRequest, check_sample, max_tokens_of

router = APIRouter(prefix="/api/v1")


def _weights(session: Session, owner: str, model_path: str) -> tuple[Checkpoint, str]:
    """A checkpoint the caller may read, and the base model it was trained on."""
    checkpoint = readable_checkpoint(session, owner, parse_tinker_path(model_path, "model_path"))
    return checkpoint, session.get(TrainingRun, checkpoint.run_id).base_model


@router.post("/create_sampling_session")
def create_sampling_session(body: CreateSamplingSessionRequest, state: State, owner: Tenant) -> dict[str, Any]:
    sampler_id = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    with state.transaction() as session:
        live_session(session, owner, body.session_id)
        checkpoint = None
        if body.model_path is not None:
            checkpoint, base_model = _weights(session, owner, body.model_path)
            if body.base_model is not None and state.model(body.base_model).name != base_model:
                raise invalid(f"{body.model_path} was trained on {base_model}, not {body.base_model}", "base_model")
        else:
            base_model = state.model(body.base_model).name
        existing = session.get(SamplingSession, sampler_id)
        if existing is None:
            session.add(
                SamplingSession(
                    id=sampler_id,
                    owner=owner,
                    session_id=body.session_id,
                    base_model=base_model,
                    model_path=body.model_path,
                )
            )
            if checkpoint is not None:
                checkpoint_read(session, checkpoint, owner, ReadPurpose.SAMPLING)
        elif existing.owner != owner or existing.model_path != body.model_path:
            raise invalid(f"sampling session {sampler_id} already exists with other weights", "sampling_session_seq_id")
    return CreateSamplingSessionResponse(sampling_session_id=sampler_id).to_wire()


def _owned_sampler(session: Session, owner: str, sampler_id: str) -> SamplingSession:
    sampler = session.scalar(
        select(SamplingSession).where(SamplingSession.id == sampler_id, SamplingSession.owner == owner)
    )
    if sampler is None:
        raise not_found(f"sampling session {sampler_id!r} not found")
    return sampler


@router.post("/join_sampling_session")
def join_sampling_session(body: JoinSamplingSessionRequest, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        sampler = _owned_sampler(session, owner, body.sampling_session_id)
        if sampler.session_id is not None:
            live_session(session, owner, sampler.session_id)
        try:
            clone_id = join_clone(session, sampler)
        except TooManyClones as exc:
            raise invalid(str(exc), "sampling_session_id") from exc
    return JoinSamplingSessionResponse(client_counter=clone_id).to_wire()


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        sampler = _owned_sampler(session, owner, sampler_id)
    return GetSamplerResponse(
        sampler_id=sampler.id, base_model=sampler.base_model, model_path=sampler.model_path
    ).to_wire()


@router.post("/asample")
def asample(body: SampleRequest, request: Request, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        if body.sampling_session_id is not None:
            sampler = _owned_sampler(session, owner, body.sampling_session_id)
            if sampler.session_id is not None:
                live_session(session, owner, sampler.session_id)
            base_model, model_path = sampler.base_model, sampler.model_path
        else:
            base_model, model_path = body.base_model, body.model_path
        weights = None
        if model_path is not None:
            weights, base_model = _weights(session, owner, model_path)
    info = state.model(base_model)
    body = body.model_copy(update={"prompt": prepare_model_input(body.prompt, info.vision, state.settings, "prompt")})
    try:
        prompt_tokens = check_sample(body, info.vocab_size, info.max_context_length, info.image_token_id)
    except InvalidRequest as exc:
        raise invalid(f"{exc.param}: {exc}", exc.param) from exc
    budget = WorkerBudget.of(info, state.settings)
    budget.check_sample(len(prompt_tokens), max_tokens_of(body.sampling_params), body.num_samples, "num_samples")
    prompt = TinkerPrompt(
        model_input=body.prompt,
        prompt_logprobs=bool(body.prompt_logprobs),
        topk_prompt_logprobs=body.topk_prompt_logprobs,
    )
    payload = SampleJob(
        prompt=prompt,
        sampling_params=body.sampling_params,
        num_samples=body.num_samples,
        storage_uri=None if weights is None else weights.storage_uri,
        record_stability_info=body.record_stability_info or None,
    )
    seq_id = body.seq_id if body.sampling_session_id is not None else None
    with state.transaction() as session:
        job_id = enqueue(
            session,
            request,
            owner=owner,
            base_model=info.name,
            model_id=body.sampling_session_id,
            seq_id=seq_id,
            payload=payload,
        )
        if weights is not None and body.sampling_session_id is None:  # a session's weights were read at its creation
            checkpoint_read(session, weights, owner, ReadPurpose.SAMPLING)
    state.queue.submitted(info.name, sampling=True)
    if body.sampling_session_id is not None:
        note_submitted(body.sampling_session_id)
    sequence_ids = [f"{job_id}:{i}" for i in range(body.num_samples)]
    return UntypedAPIFuture(request_id=job_id, sample_sequence_ids=sequence_ids).to_wire()
