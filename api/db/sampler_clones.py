"""Clone ids of a sampling session: what `join_sampling_session` hands each SamplingClient that joins it.

A SamplingClient that was pickled (or rebuilt from a sampler handle) in another process joins its sampling session
before its first sample and numbers its requests from `clone_id * CLONE_SEQ_BLOCK`, so clones never collide on
seq_ids (the original client is 0). The id must be unique per sampling session for good, across server restarts,
so it is the session's `joined_clients` counter, raised by one guarded UPDATE: the row lock (PostgreSQL) or the
write lock (SQLite) makes concurrent joins take different numbers.

Limits: at most `CLONE_SEQ_BLOCK - 1` clones per sampling session.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.db.models import SamplingSession
from loom.types.futures import CLONE_SEQ_BLOCK


class TooManyClones(Exception):
    """The sampling session has handed out every clone id."""


def join_clone(session: Session, sampler: SamplingSession) -> int:
    """Allocate the next clone id of `sampler` (1, 2, ...), in the caller's transaction."""
    raised = session.execute(
        update(SamplingSession)
        .where(SamplingSession.id == sampler.id, SamplingSession.joined_clients < CLONE_SEQ_BLOCK - 1)
        .values(joined_clients=SamplingSession.joined_clients + 1)
        .execution_options(synchronize_session=False)
    )
    if raised.rowcount != 1:
        raise TooManyClones(f"sampling session {sampler.id} cannot take more clients")
    return session.scalar(select(SamplingSession.joined_clients).where(SamplingSession.id == sampler.id))
