"""`tinker://<run_id>/<weights|sampler_weights|external_weights>/<name>` paths: parsing and tenant-checked lookup.

Limits: a checkpoint is readable by its owner, or by anyone once published (`public`), and changed (published, its
TTL set, deleted, ...) by its owner only; expired or uncommitted checkpoints answer 404 like missing ones, and so
does another tenant's checkpoint to anyone but a reader of a published one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, select
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


def live_checkpoint() -> ColumnElement[bool]:
    """The checkpoints that exist for clients: committed, and not expired (an expired one awaits the sweep)."""
    return Checkpoint.committed.is_(True) & (Checkpoint.expires_at.is_(None) | (Checkpoint.expires_at > utcnow()))


def listed_checkpoint() -> ColumnElement[bool]:
    """The checkpoints listings show (and usage counts): live, and not hidden (a sampling session's snapshot or a
    recovery checkpoint)."""
    return live_checkpoint() & Checkpoint.ephemeral.is_(False)


def _checkpoint_at(path: TinkerPath) -> ColumnElement[bool]:
    return (Checkpoint.run_id == path.run_id) & (Checkpoint.checkpoint_id == path.checkpoint_id) & live_checkpoint()


def readable_checkpoint(session: Session, owner: str, path: TinkerPath) -> Checkpoint:
    """The live checkpoint at `path` if `owner` may read it (it is theirs, or published); else 404."""
    checkpoint = session.scalar(
        select(Checkpoint).where(_checkpoint_at(path), (Checkpoint.owner == owner) | Checkpoint.public.is_(True))
    )
    if checkpoint is None:
        raise not_found(f"checkpoint {path} not found")
    return checkpoint


def owned_checkpoint(session: Session, owner: str, path: TinkerPath) -> Checkpoint:
    """The live checkpoint at `path` if `owner` owns it (only the owner may change it, published or not); else 404."""
    checkpoint = session.scalar(select(Checkpoint).where(_checkpoint_at(path), Checkpoint.owner == owner))
    if checkpoint is None:
        raise not_found(f"checkpoint {path} not found")
    return checkpoint
