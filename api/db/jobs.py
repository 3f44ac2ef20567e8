"""The job store: submit, claim (lease), finish and recover jobs.

Every function works inside the caller's transaction and never commits, so a
caller can make a job and its related rows atomic; wrap calls in
``with session_factory.begin() as session:`` and keep those transactions short
(row locks taken by ``claim_ready_jobs`` are held until commit).

Concurrency. On PostgreSQL, claims lock candidate rows with
``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent claimers never lease the
same job and never wait on each other; finishing a job locks that one row, so a
stale worker racing a lease expiry loses cleanly. On SQLite every transaction
takes the write lock at BEGIN (see ``session.py``), so the same code is
serialized there.

Ordering. Training ops of one run live in the ``"train"`` lane (see
``models.py``) and must run in seq order: a queued train-lane job with a seq_id
is ready only as part of the contiguous chain that starts exactly at its run's
``next_seq_id``. Finishing such a job, successfully or not, advances
``next_seq_id`` past it, so one failed request never wedges the run's queue; a
request refused at submit leaves a failed placeholder at its seq_id
(``record_refusal``) for the same reason: the client may have numbered later
ops after it (the tinker SDK does). A client that instead sends the next op
at the refused seq_id (Loom's SDK does) takes the placeholder's place, as long
as no later op of the run has started. A queued request the client cancels
(``cancel_queued_job``) fails at once and is passed over the same way. An
ordered op whose ``TrainingRun`` row does not exist (yet) waits. Every training
op has a seq_id (``submit_job`` refuses one without); jobs in any other lane are
ready as soon as they are queued.

Payloads. A job's payload is the JSON of its ``contract.jobs`` payload model;
``claimed`` parses it back, so workers only ever see typed payloads.

Fencing. Each lease increments ``fencing_token``; ``complete_job`` and
``fail_job`` only apply while the job is still leased under the caller's token,
so a worker that lost its lease cannot overwrite anything.
"""

import uuid
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timedelta
from itertools import groupby, takewhile
from typing import Any, Literal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db.models import TRAINING_LANE, ErrorCategory, Job, JobState, TrainingRun, lane_for
from api.db.types import utcnow
from contract.jobs import ClaimedJob, JobKind, JobPayload, parse_payload
from loom.types.limits import SEQ_ID_WINDOW

REFUSED_PAYLOAD: dict[str, Any] = {}
"""The payload of the placeholder job a request refused at submit leaves at its seq_id (`record_refusal`)."""

RetryPolicy = Literal["mixed", "alone", "drain"]
"""How `claim_ready_jobs` treats jobs whose earlier lease was lost."""


class JobConflict(Exception):
    """A submission reuses a seq_id or idempotency key of a different request."""

    def __init__(self, existing_job_id: str, message: str) -> None:
        super().__init__(message)
        self.existing_job_id = existing_job_id


def _job_id(lane: str, model_id: str | None, seq_id: int | None) -> str:
    if lane == TRAINING_LANE and model_id is not None and seq_id is not None:
        return f"{model_id}:{seq_id}"
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------
# Submission


def submit_job(
    session: Session,
    *,
    owner: str,
    base_model: str,
    model_id: str | None,
    seq_id: int | None,
    payload: JobPayload,
    idempotency_key: str | None = None,
    api_key_id: str | None = None,
) -> tuple[Job, bool]:
    """Queue a job (its kind is the payload's), or return the one already submitted for the same request.

    A request is identified by its (model_id, lane, seq_id) or its
    (owner, idempotency_key). Replaying an identical request returns the existing
    job with ``created=False``; reusing either key for a different request
    raises ``JobConflict``. Raises ``ValueError`` for a training op without the
    model_id and seq_id its ordering depends on.
    """
    lane = lane_for(payload.kind)
    if lane == TRAINING_LANE and model_id is None:
        raise ValueError(f"{payload.kind.value} needs the model_id of its training run")
    if lane == TRAINING_LANE and seq_id is None:
        raise ValueError(f"{payload.kind.value} needs its seq_id: a training op runs at its place in its run's order")
    request = {
        "owner": owner,
        "kind": payload.kind.value,
        "base_model": base_model,
        "model_id": model_id,
        "seq_id": seq_id,
        "payload": payload.to_json(),  # JSON-native already, so a replay compares equal to the stored one
    }
    existing = _find_existing(session, owner, lane, model_id, seq_id, idempotency_key)
    if existing is not None and _is_refusal(existing) and _reopen(session, existing):
        existing = None  # the client sends the op again at the seq_id its refusal took: it takes that place
    if existing is None:
        job = Job(
            id=_job_id(lane, model_id, seq_id),
            lane=lane,
            idempotency_key=idempotency_key,
            api_key_id=api_key_id,
            cost_tokens=payload.cost_tokens(),
            **request,
        )
        try:
            with session.begin_nested():
                session.add(job)
            return job, True
        except IntegrityError:
            # A concurrent submission of the same request won the insert.
            existing = _find_existing(session, owner, lane, model_id, seq_id, idempotency_key)
            if existing is None:
                raise
    _check_same_request(existing, request)
    return existing, False


def _find_existing(
    session: Session,
    owner: str,
    lane: str,
    model_id: str | None,
    seq_id: int | None,
    idempotency_key: str | None,
) -> Job | None:
    matches = []
    if model_id is not None and seq_id is not None:
        matches.append(and_(Job.model_id == model_id, Job.lane == lane, Job.seq_id == seq_id))
    if idempotency_key is not None:
        matches.append(and_(Job.owner == owner, Job.idempotency_key == idempotency_key))
    if not matches:
        return None
    found = session.scalars(select(Job).where(or_(*matches))).all()
    if len(found) > 1:
        raise JobConflict(found[0].id, "seq_id and idempotency key belong to different earlier requests")
    return found[0] if found else None


def _is_refusal(job: Job) -> bool:
    return job.payload == REFUSED_PAYLOAD and job.state == JobState.FAILED.value and job.started_at is None


def _reopen(session: Session, refusal: Job) -> bool:
    """Give a refused op's seq_id back, if nothing after it has run: delete the placeholder and, if the run had
    moved past it, move the run back to it. False when a later op of the run was claimed or finished already."""
    later_ran = session.scalar(
        select(Job.id)
        .where(
            Job.model_id == refusal.model_id,
            Job.lane == TRAINING_LANE,
            Job.seq_id > refusal.seq_id,
            or_(Job.state == JobState.LEASED.value, Job.started_at.is_not(None)),
        )
        .limit(1)
        .with_for_update()
    )
    if later_ran is not None:
        return False
    session.delete(refusal)
    session.flush()
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == refusal.model_id, TrainingRun.next_seq_id > refusal.seq_id)
        .values(next_seq_id=refusal.seq_id)
    )
    return True


def _check_same_request(existing: Job, request: dict[str, Any]) -> None:
    if _is_refusal(existing):
        raise JobConflict(
            existing.id,
            f"seq_id {existing.seq_id} of this run was {existing.error}, and the run has run later ops since: "
            "send the corrected request with a new seq_id",
        )
    differing = sorted(field for field, value in request.items() if getattr(existing, field) != value)
    if differing:
        raise JobConflict(
            existing.id,
            f"request {existing.id} was already submitted with different {', '.join(differing)}",
        )


# ---------------------------------------------------------------------------
# Claiming


def claim_ready_jobs(
    session: Session,
    *,
    base_models: Sequence[str],
    worker_id: str,
    lease_seconds: float,
    limit: int,
    training: bool = True,
    sampling: bool = True,
    sticky: bool = False,
    retries: RetryPolicy = "mixed",
    token_budget: int | None = None,
) -> list[ClaimedJob]:
    """Lease up to ``limit`` ready jobs for the given base models to ``worker_id``.

    Returns units in order of their first job's ``created_at``: single unordered
    jobs, and for each training run the contiguous chain of queued ops starting
    at its ``next_seq_id`` in seq order (cut short if ``limit`` runs out). The
    worker must execute each run's chain in the order given.

    ``training`` / ``sampling`` pick which jobs this worker takes (sample jobs, or
    everything else). With ``sticky``, a run's chain is taken only by the worker
    the run is placed on (``TrainingRun.worker_id``), and at most one unplaced run
    per call becomes placed on the claimer (a conditional update, so two claimers
    cannot both win it).

    ``retries`` says how jobs whose earlier lease was lost (``attempt > 0``: the
    worker running them died) are claimed. ``"mixed"``: like any other job.
    ``"alone"`` (an idle worker): the oldest such job is claimed by itself, so a
    request that kills its worker can only take itself down, never the requests
    that happened to share its tick. ``"drain"`` (a worker still decoding): while
    such a job is ready nothing new is claimed, so the worker becomes idle and
    takes it alone next. In both, chains are cut before a retried job.

    With ``token_budget``, the jobs picked cost at most that many tokens in all
    (``Job.cost_tokens``; the first job is always taken, whatever its cost): a
    unit that does not fit is left for a later claim (a chain is cut where it
    stops fitting) and later, smaller units may still fill the tick.
    """
    if limit <= 0 or not base_models:
        return []
    units: list[list[Job]] = []
    if training:
        new_placements = 1  # take on one new run per claim, so idle workers get a share of a burst of runs
        for chain, placed_on in _ready_chains(session, base_models, limit, worker_id if sticky else None):
            if not sticky or placed_on == worker_id:
                units.append(chain)
            elif new_placements and _place(session, chain[0].model_id, worker_id):
                units.append(chain)
                new_placements -= 1
    units += [[job] for job in _ready_unordered(session, base_models, limit, training, sampling)]
    units.sort(key=lambda unit: (unit[0].created_at, unit[0].id))
    if retries != "mixed":
        units = _isolate_retries(units, retries)
    picked: list[Job] = []
    spent = 0
    for unit in units:
        for job in unit[: limit - len(picked)]:
            if token_budget is not None and picked and spent + job.cost_tokens > token_budget:
                break  # this chain's rest waits (its order must hold); a later unit may still fit
            picked.append(job)
            spent += job.cost_tokens
        if len(picked) == limit:
            break
    now = utcnow()
    for job in picked:
        job.state = JobState.LEASED.value
        job.lease_owner = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.attempt += 1
        job.fencing_token += 1
        job.started_at = now
    session.flush()
    return [claimed(job) for job in picked]


def _isolate_retries(units: list[list[Job]], retries: RetryPolicy) -> list[list[Job]]:
    """The units to claim under ``retries`` ("alone" or "drain"): see `claim_ready_jobs`."""
    retried_heads = [unit[0] for unit in units if unit[0].attempt > 0]
    if retried_heads:
        return [retried_heads[:1]] if retries == "alone" else []
    cut = [[*takewhile(lambda job: job.attempt == 0, unit)] for unit in units]
    return [unit for unit in cut if unit]


def claimed(job: Job) -> ClaimedJob:
    """The detached view of a job row a worker executes, its payload parsed into the contract's type (a payload
    that does not parse becomes `UnreadablePayload`, which fails that job alone)."""
    return ClaimedJob(
        id=job.id,
        kind=JobKind(job.kind),
        owner=job.owner,
        base_model=job.base_model,
        model_id=job.model_id,
        seq_id=job.seq_id,
        payload=parse_payload(job.kind, job.payload),
        fencing_token=job.fencing_token,
    )


def _place(session: Session, model_id: str, worker_id: str) -> bool:
    """Pin an unplaced run to ``worker_id``; True if it is (now or already) placed there."""
    placed = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == model_id, or_(TrainingRun.worker_id.is_(None), TrainingRun.worker_id == worker_id))
        .values(worker_id=worker_id)
    )
    return placed.rowcount == 1


def _ready_chains(
    session: Session, base_models: Sequence[str], limit: int, placed_on: str | None
) -> list[tuple[list[Job], str | None]]:
    """Per run, the queued train-lane jobs next_seq_id, next_seq_id+1, ... without gaps, and the run's worker.

    With ``placed_on``, only runs that are unplaced or placed on that worker."""
    query = (
        select(Job, TrainingRun.next_seq_id, TrainingRun.worker_id)
        .join(TrainingRun, TrainingRun.id == Job.model_id)
        .where(
            Job.state == JobState.QUEUED.value,
            Job.lane == TRAINING_LANE,
            Job.base_model.in_(base_models),
            Job.seq_id >= TrainingRun.next_seq_id,
            Job.seq_id < TrainingRun.next_seq_id + limit,
        )
        .order_by(Job.model_id, Job.seq_id)
        .with_for_update(skip_locked=True, of=Job)
    )
    if placed_on is not None:
        query = query.where(or_(TrainingRun.worker_id.is_(None), TrainingRun.worker_id == placed_on))
    rows = session.execute(query).all()
    chains = []
    for _, run_rows in groupby(rows, key=lambda row: row[0].model_id):
        run_rows = list(run_rows)
        chain = []
        for expected_seq, (job, next_seq_id, _) in enumerate(run_rows):
            if job.seq_id != next_seq_id + expected_seq:
                break
            chain.append(job)
        if chain:
            chains.append((chain, run_rows[0][2]))
    return chains


def _ready_unordered(
    session: Session, base_models: Sequence[str], limit: int, training: bool, sampling: bool
) -> Sequence[Job]:
    if not (training or sampling):
        return []
    query = (
        select(Job)
        .where(
            Job.state == JobState.QUEUED.value,
            Job.base_model.in_(base_models),
            Job.lane != TRAINING_LANE,
        )
        .order_by(Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if not training:
        query = query.where(Job.kind == JobKind.SAMPLE.value)
    elif not sampling:
        query = query.where(Job.kind != JobKind.SAMPLE.value)
    return session.scalars(query).all()


# ---------------------------------------------------------------------------
# Finishing and recovery


def complete_job(session: Session, job_id: str, fencing_token: int, result: dict[str, Any]) -> bool:
    """Record a leased job's result; False (and no change) if the lease is no longer ours."""
    job = _leased_job(session, job_id, fencing_token)
    if job is None:
        return False
    job.result = result
    _finish(session, job, JobState.DONE)
    return True


def fail_job(session: Session, job_id: str, fencing_token: int, error: str, category: ErrorCategory | str) -> bool:
    """Record a leased job's failure; False (and no change) if the lease is no longer ours.

    ``category`` is "user" (bad request), "server" or "unknown"; a failed job is
    final and, like a completed one, lets its run's next op proceed.
    """
    error_category = ErrorCategory(category)
    job = _leased_job(session, job_id, fencing_token)
    if job is None:
        return False
    _record_failure(session, job, error, error_category)
    return True


def renew_leases(session: Session, worker_id: str, lease_seconds: float) -> int:
    """Extend every lease ``worker_id`` holds to ``lease_seconds`` from now (a live worker's heartbeat)."""
    return session.execute(
        update(Job)
        .where(Job.lease_owner == worker_id, Job.state == JobState.LEASED.value)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    ).rowcount


def release_expired_leases(session: Session, now: datetime, *, max_attempts: int = 3) -> int:
    """Requeue jobs whose lease expired before ``now``; fail those that used ``max_attempts``.

    Returns how many jobs were requeued or failed. The attempt count is kept, and
    the fencing token makes the lost worker's late writes no-ops.
    """
    return requeue_leased(session, Job.lease_expires_at < now, max_attempts=max_attempts)


def requeue_leased(session: Session, condition: Any, *, max_attempts: int = 3) -> int:
    """Requeue leased jobs matching ``condition`` (fail those that used ``max_attempts``); returns how many."""
    expired = session.scalars(
        select(Job)
        .where(Job.state == JobState.LEASED.value, condition)
        # One lock order for the run rows _finish may update, so recoverers cannot deadlock.
        .order_by(Job.model_id, Job.seq_id, Job.id)
        .with_for_update(skip_locked=True)
    ).all()
    for job in expired:
        if job.attempt >= max_attempts:
            _record_failure(
                session,
                job,
                f"gave up after the worker running this request was lost {job.attempt} times "
                "(crashed, killed or timed out); it is not retried again so it cannot take down more workers",
                ErrorCategory.SERVER,
            )
        else:
            job.state = JobState.QUEUED.value
            job.lease_owner = None
            job.lease_expires_at = None
    session.flush()
    return len(expired)


def requeue_leases_not_held(
    session: Session, worker_id: str, base_model: str, held: Collection[str], max_attempts: int = 3
) -> int:
    """Requeue the jobs of `base_model` leased to `worker_id` except those in `held` (the ones the worker knows
    it has): what a claim whose commit landed unseen (the connection failed before the answer) leased to it."""
    condition = (Job.lease_owner == worker_id) & (Job.base_model == base_model) & Job.id.not_in(list(held))
    return requeue_leased(session, condition, max_attempts=max_attempts)


def _leased_job(session: Session, job_id: str, fencing_token: int) -> Job | None:
    return session.scalar(
        select(Job)
        .where(Job.id == job_id, Job.state == JobState.LEASED.value, Job.fencing_token == fencing_token)
        .with_for_update()
    )


def _record_failure(session: Session, job: Job, error: str, category: ErrorCategory) -> None:
    job.error = error
    job.error_category = category.value
    _finish(session, job, JobState.FAILED)


def _finish(session: Session, job: Job, state: JobState) -> None:
    """Make ``job`` final and, for an ordered training op, let its run move past it."""
    job.state = state.value
    job.finished_at = utcnow()
    job.lease_expires_at = None
    if job.lane == TRAINING_LANE and job.seq_id is not None:
        _move_run_past(session, job.model_id, job.seq_id)
    session.flush()


def _move_run_past(session: Session, model_id: str, seq_id: int) -> None:
    """The run's next op is the first after `seq_id` not already final (ops refused at submit are final at once)."""
    session.flush()
    final = set(
        session.scalars(
            select(Job.seq_id).where(
                Job.model_id == model_id,
                Job.lane == TRAINING_LANE,
                Job.seq_id > seq_id,
                Job.state.in_([JobState.DONE.value, JobState.FAILED.value]),
            )
        )
    )
    next_seq = seq_id + 1
    while next_seq in final:
        next_seq += 1
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == model_id, TrainingRun.next_seq_id <= seq_id)
        .values(next_seq_id=next_seq)
    )


def record_refusal(session: Session, *, owner: str, model_id: str, seq_id: int, kind: JobKind, error: str) -> bool:
    """Mark `seq_id` of a run as taken by a request refused at submit (a failed job with an empty payload), so the
    run's later ops, which the client numbered after it, do not wait forever for it. Returns False, writing
    nothing, when the run is not `owner`'s, or that seq is already submitted, already passed, or out of the window."""
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == model_id, TrainingRun.owner == owner))
    if run is None or seq_id < max(run.next_seq_id, 1):
        return False
    if seq_beyond_window(session, model_id, seq_id) is not None:
        return False
    refused = Job(
        id=_job_id(TRAINING_LANE, model_id, seq_id),
        owner=owner,
        kind=kind.value,
        lane=TRAINING_LANE,
        base_model=run.base_model,
        model_id=model_id,
        seq_id=seq_id,
        payload=REFUSED_PAYLOAD,
        state=JobState.FAILED.value,
        error=f"refused at submit: {error}",
        error_category=ErrorCategory.USER.value,
        finished_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(refused)
    except IntegrityError:
        return False  # that seq was submitted meanwhile
    if run.next_seq_id == seq_id:  # the run waits for exactly this op; else finishing the op before it moves past it
        _move_run_past(session, model_id, seq_id)
    return True


CANCELLED_ERROR = "cancelled by the client before it started"
"""The error a request cancelled with `cancel_queued_job` fails with."""


def cancel_queued_job(session: Session, job_id: str, owner: str) -> Job | None:
    """Fail `owner`'s job `job_id` with `CANCELLED_ERROR` if it is still queued, so its future resolves; a job a
    worker holds or that is final is left as it is. Returns the job as it now stands (None: no such job of
    `owner`). An ordered training op cancelled this way is passed over like any failed op: the run's later ops
    still run."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.owner == owner).with_for_update())
    if job is None or job.state != JobState.QUEUED.value:
        return job
    ordered = job.lane == TRAINING_LANE and job.seq_id is not None
    run = session.get(TrainingRun, job.model_id, with_for_update=True) if ordered else None
    job.error = CANCELLED_ERROR
    job.error_category = ErrorCategory.USER.value
    job.state = JobState.FAILED.value
    job.finished_at = utcnow()
    session.flush()
    if run is not None and run.next_seq_id == job.seq_id:  # the run waits for exactly this op: move past it now
        _move_run_past(session, job.model_id, job.seq_id)
    return job


# ---------------------------------------------------------------------------
# Reading


def seq_beyond_window(session: Session, model_id: str, seq_id: int) -> int | None:
    """The run's newest submitted seq_id if `seq_id` is more than `SEQ_ID_WINDOW` ahead of it (an op numbered
    that far ahead would wait forever for the ops before it), else None."""
    newest = next_training_seq(session, model_id) - 1
    return newest if seq_id > newest + SEQ_ID_WINDOW else None


def next_training_seq(session: Session, model_id: str) -> int:
    """The seq_id after the newest op submitted to a run's ordered lane (for an op the client does not number)."""
    newest = session.scalar(select(func.max(Job.seq_id)).where(Job.model_id == model_id, Job.lane == TRAINING_LANE))
    return 0 if newest is None else newest + 1


def done_training_ops(session: Session, model_id: str, before_seq: int) -> Iterator[ClaimedJob]:
    """The run's ops that completed, newest first, from just before `before_seq` back to its start: the log
    a run's state is rebuilt from (`worker/run_recovery.py`)."""
    rows = session.scalars(
        select(Job)
        .where(
            Job.model_id == model_id,
            Job.lane == TRAINING_LANE,
            Job.seq_id < before_seq,
            Job.state == JobState.DONE.value,
        )
        .order_by(Job.seq_id.desc())
        .execution_options(yield_per=64)
    )
    return (claimed(row) for row in rows)


def get_job(session: Session, job_id: str, owner: str) -> Job | None:
    """The job if it exists and belongs to ``owner``; another tenant's job is None."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.owner == owner))


def queue_position(session: Session, job: Job) -> int:
    """How many queued jobs for the same base model were submitted before ``job`` (0 unless queued)."""
    if job.state != JobState.QUEUED.value:
        return 0
    ahead = or_(
        Job.created_at < job.created_at,
        and_(Job.created_at == job.created_at, Job.id < job.id),
    )
    count = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.state == JobState.QUEUED.value, Job.base_model == job.base_model, ahead)
    )
    return count or 0


def record_answered(session: Session, *, job_id: str, owner: str, kind: str, result: dict[str, Any]) -> None:
    """Store a request the API answered itself (no worker involved) as a job that is done from the start, so the
    client collects the answer with `retrieve_future` like any other; a replay of the same `job_id` keeps the
    answer already stored."""
    if session.get(Job, job_id) is not None:
        return
    now = utcnow()
    session.add(
        Job(
            id=job_id,
            owner=owner,
            kind=kind,
            lane=kind,
            base_model="",
            payload={},
            state=JobState.DONE.value,
            result=result,
            started_at=now,
            finished_at=now,
        )
    )
