"""The OpenAPI document: request schemas of the routes that read their body themselves.

`/api/v1/forward_backward` and `/api/v1/forward` take JSON or `application/x-protobuf`, so they read the raw body
and FastAPI cannot derive a request schema. `raw_body(model, message)` is their `openapi_extra`: a requestBody
whose JSON form is `model` and whose protobuf form is the named message of `api/proto/tinker_wire.proto`;
`publish_schemas(app, models)` adds those models (and the types they use) to the document's components, so
clients and fuzzers see every route's body.

Limits: the protobuf form is described (a binary string), not given a schema; components FastAPI already built
are kept as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


def raw_body(model: type[BaseModel], message: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads `model` as JSON or the protobuf `message` from its raw body."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}},
                "application/x-protobuf": {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": f"a serialized `{message}` message (api/proto/tinker_wire.proto), uncompressed",
                    }
                },
            },
        }
    }


def publish_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Make `app.openapi()` list `models` (and their nested types) under components.schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=REF, mode="validation")
                for name, definition in schema.pop("$defs", {}).items():
                    schemas.setdefault(name, definition)
                schemas.setdefault(model.__name__, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
