"""Clone ids of a sampling session: what `join_sampling_session` hands each SamplingClient that joins it.

A SamplingClient that was pickled (or rebuilt from a sampler handle) in another process joins its sampling session
before its first sample and numbers its requests from `clone_id * CLONE_SEQ_BLOCK`, so clones never collide on
seq_ids (the original client is 0). The id must be unique per sampling session for good, across server restarts,
so it is kept in the database: each join adds a row to `sampling_sessions` whose id is
`<sampler_id>/clone/<n>` (a `/` cannot occur in a sampler id, so no route ever resolves such a row as a sampler),
and the primary key makes concurrent joins take different numbers.

Limits: the schema has no counter column for this (a `sampling_sessions.joined_clients` column would replace the
marker rows); listings of samplers skip the marker rows with `not_clone_marker()`. At most `CLONE_SEQ_BLOCK - 1`
clones per sampling session.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, func, not_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db.models import SamplingSession
from loom.types.futures import CLONE_SEQ_BLOCK

CLONE_MARK = "/clone/"

MAX_JOIN_ATTEMPTS = 64
"""How many numbers one join tries when concurrent joins keep taking the one it picked."""


class TooManyClones(Exception):
    """The sampling session has handed out every clone id."""


def not_clone_marker() -> ColumnElement[bool]:
    """A filter keeping real sampling sessions and dropping the rows that record joined clones."""
    return not_(SamplingSession.id.contains(CLONE_MARK, autoescape=True))


def join_clone(session: Session, sampler: SamplingSession) -> int:
    """Allocate the next clone id of `sampler` (1, 2, ...), in the caller's transaction."""
    prefix = f"{sampler.id}{CLONE_MARK}"
    clone_id = 1 + (
        session.scalar(
            select(func.count())
            .select_from(SamplingSession)
            .where(SamplingSession.id.startswith(prefix, autoescape=True))
        )
        or 0
    )
    for _ in range(MAX_JOIN_ATTEMPTS):
        if clone_id >= CLONE_SEQ_BLOCK:
            break
        marker = SamplingSession(
            id=f"{prefix}{clone_id}",
            owner=sampler.owner,
            session_id=sampler.session_id,
            base_model=sampler.base_model,
            model_path=sampler.model_path,
        )
        try:
            with session.begin_nested():
                session.add(marker)
            return clone_id
        except IntegrityError:
            clone_id += 1  # a concurrent join took this number
    raise TooManyClones(f"sampling session {sampler.id} cannot take more clients")
