"""The custom-loss store: losses created with `create_custom_loss`, one per (session, custom_loss_seq_id).

A loss is data (`contract.jobs.CustomLossSpec`: its inputs and traced graph, checked before it is stored) and is
only ever read back by its owner: another tenant's loss is indistinguishable from a missing one.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import CustomLoss
from contract.jobs import CustomLossSpec


def custom_loss_id(session_id: str, custom_loss_seq_id: int) -> str:
    """The loss id of a session's `custom_loss_seq_id`-th loss (a replayed create names the same loss)."""
    return f"{session_id}:loss:{custom_loss_seq_id}"


def store_custom_loss(session: Session, *, owner: str, session_id: str, seq_id: int, spec: CustomLossSpec) -> bool:
    """Store `spec` under its id; False when that id already holds a different loss (a replay of the same
    request stores nothing and answers True)."""
    loss_id = custom_loss_id(session_id, seq_id)
    existing = session.get(CustomLoss, loss_id)
    stored = spec.model_dump(mode="json")
    if existing is not None:
        return existing.spec == stored
    session.add(
        CustomLoss(
            id=loss_id, owner=owner, session_id=session_id, custom_loss_seq_id=seq_id, name=spec.name, spec=stored
        )
    )
    return True


def owned_custom_loss(session: Session, owner: str, loss_id: str) -> tuple[str, CustomLossSpec] | None:
    """(creating session id, spec) of `owner`'s loss `loss_id`, or None."""
    row = session.scalar(select(CustomLoss).where(CustomLoss.id == loss_id, CustomLoss.owner == owner))
    return None if row is None else (row.session_id, CustomLossSpec.model_validate(row.spec))
