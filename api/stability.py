"""stable_reinforce's records: a request's provenance spans, checked against the samples its session recorded.

A sample request made with `record_stability_info=True` (SDK 0.38 `SamplingClient(record_stability_info=True)`)
is its own record: its job keeps the prompt (payload) and, once done, each sequence's tokens and the sampler's
logprob of every sampled token (result); sequence `i` of it is `SampledSequence.sequence_id` `"<job id>:<i>"`.
`recorded_targets` reads, for every datum of a stable_reinforce request, the sequences its spans name, checks that
the datum really reproduces them (each spanned input token and target row equals the recorded prompt or sampled
token it claims to be) and returns which target rows are sampled tokens, with the sampler's recorded logprob of
each: the loss trains on exactly those rows, against the sampler's own numbers, never the client's copy.

Limits: a record is usable by training runs of the session that sampled it, for `RECORD_LIFETIME` after the
sample finished (Tinker restarts that day on every use; Loom has no column to note the use, so it does not). A span
naming a missing, unrecorded, unfinished, expired or another session's (or tenant's) sequence is a 400, the same
message for each, so nothing is learned about other tenants' samples. Image positions are compared by where
they are only (`IMAGE_POSITION`), not by which image fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.db.jobs import get_job
from api.db.models import JobState, SamplingSession
from api.db.types import utcnow
from api.errors import APIError, invalid
from contract.jobs import JobKind, RecordedTargets, SampleJob, TinkerPrompt
from loom.types import Datum, ProvenanceSpan, SampleResponse

IMAGE_POSITION = -1
"""What an image position of a prompt or datum is compared as (no token has this id): spans over images match on
where images are, not on which image it is."""
RECORD_LIFETIME = timedelta(days=1)
"""How long after sampling a recorded sequence can be trained on (Tinker's day)."""


@dataclass(frozen=True)
class _Sequence:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]


class _Records:
    """The recorded sequences one request names, each read (and checked usable) once."""

    def __init__(self, session: Session, owner: str, session_id: str) -> None:
        self.session, self.owner, self.session_id = session, owner, session_id
        self.found: dict[str, _Sequence] = {}

    def get(self, sequence_id: str, where: str) -> _Sequence:
        if sequence_id not in self.found:
            sequence = self._read(sequence_id)
            if sequence is None:
                raise invalid(
                    f"sequence {sequence_id!r} is not a sample recorded (record_stability_info=True) by this "
                    f"training run's session within the last {RECORD_LIFETIME.days} day(s)",
                    where,
                )
            self.found[sequence_id] = sequence
        return self.found[sequence_id]

    def _read(self, sequence_id: str) -> _Sequence | None:
        job_id, _, index = sequence_id.rpartition(":")
        job = get_job(self.session, job_id, self.owner) if index.isdigit() else None
        if job is None or job.kind != JobKind.SAMPLE.value or job.state != JobState.DONE.value or job.model_id is None:
            return None
        sampler = self.session.get(SamplingSession, job.model_id)
        if sampler is None or sampler.session_id != self.session_id or job.finished_at is None:
            return None
        if utcnow() - job.finished_at > RECORD_LIFETIME:
            return None
        try:
            payload = SampleJob.model_validate(job.payload)
            response = SampleResponse.model_validate(job.result)
        except ValidationError:
            return None
        if not (payload.record_stability_info and isinstance(payload.prompt, TinkerPrompt)):
            return None
        if int(index) >= len(response.sequences) or response.sequences[int(index)].logprobs is None:
            return None
        sequence = response.sequences[int(index)]
        prompt = payload.prompt.model_input.token_ids(IMAGE_POSITION)
        return _Sequence(prompt, sequence.tokens, sequence.logprobs)


def recorded_targets(session: Session, owner: str, session_id: str, data: list[Datum]) -> list[RecordedTargets]:
    """Per datum of a stable_reinforce request (its spans already tile, `loom.types.validation.check_provenance`):
    which target rows are recorded sampled tokens, and the sampler's logprob of each. Raises a 400 `APIError` for
    a span that names no usable record or does not match it."""
    records = _Records(session, owner, session_id)
    out = []
    for i, datum in enumerate(data):
        tokens = datum.model_input.token_ids(IMAGE_POSITION)
        targets = [int(t) for t in datum.loss_fn_inputs["target_tokens"].dense_data()]
        _match(records, datum.model_input_spans or [], tokens, f"data.{i}.model_input_spans")
        out.append(_match(records, datum.loss_fn_input_spans or [], targets, f"data.{i}.loss_fn_input_spans"))
    return out


def _match(records: _Records, spans: list[ProvenanceSpan], values: list[int], where: str) -> RecordedTargets:
    """Check that `values` reproduce what `spans` claim; the sampled positions and their recorded logprobs."""
    sampled: list[bool] = []
    logprobs: list[float] = []
    for k, span in enumerate(spans):
        sequence = records.get(span.sequence_id, f"{where}.{k}")
        is_sampled = span.type == "sampled_tokens"
        source = sequence.tokens if is_sampled else sequence.prompt
        end = span.offset + span.length
        position = len(sampled)
        if end > len(source) or values[position : position + span.length] != source[span.offset : end]:
            raise _mismatch(span, f"{where}.{k}")
        sampled.extend([is_sampled] * span.length)
        logprobs.extend(sequence.logprobs[span.offset : end] if is_sampled else [0.0] * span.length)
    return RecordedTargets(sampled=sampled, logprobs=logprobs)


def _mismatch(span: ProvenanceSpan, where: str) -> APIError:
    part = "sampled tokens" if span.type == "sampled_tokens" else "prompt"
    return invalid(
        f"these {span.length} positions are not positions {span.offset}..{span.offset + span.length} of the "
        f"{part} of sequence {span.sequence_id!r}",
        where,
    )
