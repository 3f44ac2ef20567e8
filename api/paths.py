"""`tinker://<run_id>/<weights|sampler_weights|external_weights>/<name>` paths: parsing and tenant-checked lookup.

Limits: a checkpoint is readable by its owner, or by anyone once published (`public`); expired or uncommitted
checkpoints answer 404 like missing ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import Checkpoint
from api.db.types import utcnow
from api.errors import invalid, not_found

KINDS = ("weights", "sampler_weights", "external_weights")


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"


def parse_tinker_path(path: str, param: str = "path") -> TinkerPath:
    if not path.startswith("tinker://"):
        raise invalid(f"{path!r} is not a tinker:// path", param)
    parts = path.removeprefix("tinker://").split("/")
    if len(parts) != 3 or parts[1] not in KINDS or not parts[0] or not parts[2]:
        raise invalid(
            f"{path!r} must look like tinker://<run_id>/weights/<name>, .../sampler_weights/<name> or "
            ".../external_weights/<name>",
            param,
        )
    return TinkerPath(parts[0], parts[1], parts[2])


def is_live(checkpoint: Checkpoint) -> bool:
    """Committed and not expired."""
    return checkpoint.committed and (checkpoint.expires_at is None or checkpoint.expires_at > utcnow())


def readable_checkpoint(session: Session, owner: str, path: TinkerPath) -> Checkpoint:
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.run_id == path.run_id, Checkpoint.checkpoint_id == path.checkpoint_id)
    )
    visible = checkpoint is not None and (checkpoint.owner == owner or checkpoint.public)
    live = visible and is_live(checkpoint)
    if not live:
        raise not_found(f"checkpoint {path} not found")
    return checkpoint
