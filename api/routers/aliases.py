"""Model aliases: a tenant's names for checkpoints (`my-agent:latest` → `tinker://…/sampler_weights/…`), usable as
the OpenAI `model` and re-pointable to a newer checkpoint at any time.

    PUT    /api/v1/aliases/{name}   {"tinker_path": ...}   create or re-point
    GET    /api/v1/aliases                                 the caller's aliases
    DELETE /api/v1/aliases/{name}

Limits: names are 1-128 characters of `[A-Za-z0-9._:/-]` and must not start with `tinker://`; an alias may only
point at a checkpoint its owner can read (checked when it is set).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select

from api.db.models import ModelAlias
from api.db.types import utcnow
from api.deps import State, Tenant
from api.errors import invalid, not_found
from api.paths import parse_tinker_path, readable_checkpoint

router = APIRouter(prefix="/api/v1")

ALIAS_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


class AliasTarget(BaseModel):
    tinker_path: str


def _wire(alias: ModelAlias) -> dict[str, Any]:
    return {"name": alias.name, "tinker_path": alias.tinker_path, "updated_at": alias.updated_at.isoformat()}


@router.put("/aliases/{name:path}")
def set_alias(name: str, body: AliasTarget, state: State, owner: Tenant) -> dict[str, Any]:
    if not ALIAS_NAME.match(name) or name.startswith("tinker:"):
        raise invalid(
            "alias names are 1-128 characters of [A-Za-z0-9._:/-] and must not look like a tinker:// path", "name"
        )
    with state.transaction() as session:
        readable_checkpoint(session, owner, parse_tinker_path(body.tinker_path, "tinker_path"))
        if state.catalogue.resolve(name) is not None:
            raise invalid(f"{name!r} is a base model id", "name")
        alias = session.scalar(select(ModelAlias).where(ModelAlias.owner == owner, ModelAlias.name == name))
        if alias is None:
            alias = ModelAlias(owner=owner, name=name, tinker_path=body.tinker_path)
            session.add(alias)
        else:
            alias.tinker_path, alias.updated_at = body.tinker_path, utcnow()
        session.flush()
        return _wire(alias)


@router.get("/aliases")
def list_aliases(state: State, owner: Tenant) -> dict[str, Any]:
    with state.reading() as session:
        rows = session.scalars(select(ModelAlias).where(ModelAlias.owner == owner).order_by(ModelAlias.name)).all()
        return {"aliases": [_wire(a) for a in rows]}


@router.delete("/aliases/{name:path}")
def delete_alias(name: str, state: State, owner: Tenant) -> dict[str, Any]:
    with state.transaction() as session:
        alias = session.scalar(select(ModelAlias).where(ModelAlias.owner == owner, ModelAlias.name == name))
        if alias is None:
            raise not_found(f"alias {name!r} not found")
        session.delete(alias)
    return {"deleted": name}
