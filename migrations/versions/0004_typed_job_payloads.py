"""Typed job payloads: rewrite every stored job payload into the shape of `contract/jobs.py`.

Before this revision a job's payload was whatever dict its router built (the Tinker request body plus a
`resolved` section); now each job kind has one payload model, a run's creation from a checkpoint is a
`load_weights` job at seq 0, a forward-only pass is always kind `forward`, and `unload_model` takes its place in
its run's ordered lane. Rows are converted in place (queued ones too, so they run after an upgrade; done ones,
so a run's log can still be replayed); `downgrade` converts back. No table changes.

The conversions are written out here, not imported from the contract: a migration is a snapshot of the schema
and data shapes at its revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOBS = sa.table(
    "jobs",
    sa.column("id", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("lane", sa.String()),
    sa.column("base_model", sa.String()),
    sa.column("model_id", sa.String()),
    sa.column("seq_id", sa.Integer()),
    sa.column("payload", sa.JSON()),
)
Row = dict[str, Any]


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


# -- upgrade: request-shaped dicts -> typed payloads -------------------------------------------------------------


def _seed(lora: dict[str, Any], model_id: str) -> int:
    if lora.get("seed") is not None:
        return int(lora["seed"])
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:4], "big")


def _load_up(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "tinker_path": payload["path"],
        "storage_uri": payload["resolved"]["storage_uri"],
        "with_optimizer": bool(payload.get("optimizer")),
    }


def _up(row: Row) -> Row:
    kind, payload = row["kind"], row["payload"] or {}
    if kind == "create_model" and "resolved" in payload:
        return {"kind": "load_weights", "payload": _load_up(payload)}
    if kind == "create_model":
        lora = payload.get("lora_config") or {}
        return {
            "payload": {
                "lora": {
                    "rank": int(lora.get("rank", 32)),
                    "seed": _seed(lora, row["model_id"]),
                    "train_attn": bool(lora.get("train_attn", True)),
                    "train_mlp": bool(lora.get("train_mlp", True)),
                    "train_unembed": bool(lora.get("train_unembed", True)),
                }
            }
        }
    if kind in ("forward_backward", "forward"):
        forward = kind == "forward" or bool(payload.get("forward_only"))
        return {"kind": "forward" if forward else kind, "payload": {"input": payload["forward_backward_input"]}}
    if kind == "optim_step":
        return {"payload": {"adam": payload.get("adam_params") or {}}}
    if kind == "load_weights":
        return {"payload": _load_up(payload)}
    if kind == "save_weights":
        resolved = payload["resolved"]
        target = {
            "checkpoint_id": resolved["checkpoint_id"],
            "tinker_path": resolved["tinker_path"],
            "ttl_seconds": payload.get("ttl_seconds"),
            "overwrite": bool(payload.get("overwrite")),
        }
        return {"payload": {"target": _without_none(target)}}
    if kind == "save_weights_for_sampler":
        resolved = payload["resolved"]
        target = {
            "checkpoint_id": resolved["checkpoint_id"],
            "tinker_path": resolved["tinker_path"],
            "ttl_seconds": payload.get("ttl_seconds"),
            "ephemeral": bool(resolved.get("ephemeral")),
        }
        job = {"target": _without_none(target), "sampling_session_id": resolved.get("sampling_session_id")}
        return {"payload": _without_none(job)}
    if kind == "unload_model":
        return {"payload": {}}
    if kind == "sample":
        return {"payload": _sample_up(payload)}
    return {}


def _sample_up(payload: dict[str, Any]) -> dict[str, Any]:
    openai = payload.get("openai")
    if openai is None:
        prompt = {
            "type": "tinker",
            "model_input": payload["prompt"],
            "prompt_logprobs": bool(payload.get("prompt_logprobs")),
            "topk_prompt_logprobs": int(payload.get("topk_prompt_logprobs") or 0),
        }
    else:
        reply = {"stream": bool(openai.get("stream")), "top_logprobs": int(openai.get("top_logprobs") or 0)}
        if openai["kind"] == "chat":
            prompt = _without_none({"type": "chat", "messages": openai["messages"], "tools": openai.get("tools")})
        else:
            prompt = {"type": "completion", "prompt": openai["prompt"]}
        prompt |= reply
    job = {
        "prompt": prompt,
        "sampling_params": payload.get("sampling_params") or {},
        "num_samples": int(payload.get("num_samples") or 1),
        "storage_uri": (payload.get("resolved") or {}).get("storage_uri"),
    }
    return _without_none(job)


# -- downgrade: typed payloads -> request-shaped dicts -----------------------------------------------------------


def _load_down(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": payload["tinker_path"],
        "optimizer": bool(payload.get("with_optimizer")),
        "resolved": {"storage_uri": payload["storage_uri"]},
    }


def _down(row: Row) -> Row:
    kind, payload = row["kind"], row["payload"] or {}
    if kind == "load_weights" and row["seq_id"] == 0:
        return {"kind": "create_model", "payload": _load_down(payload)}
    if kind == "load_weights":
        return {"payload": _load_down(payload)}
    if kind == "create_model":
        return {"payload": {"lora_config": payload["lora"]}}
    if kind in ("forward_backward", "forward"):
        return {"payload": {"forward_backward_input": payload["input"], "forward_only": kind == "forward"}}
    if kind == "optim_step":
        return {"payload": {"adam_params": payload.get("adam") or {}}}
    if kind in ("save_weights", "save_weights_for_sampler"):
        target = payload["target"]
        resolved = {"checkpoint_id": target["checkpoint_id"], "tinker_path": target["tinker_path"]}
        name = target["checkpoint_id"].split("/", 1)[1]
        if kind == "save_weights":
            old = {"path": name, "overwrite": bool(target.get("overwrite")), "ttl_seconds": target.get("ttl_seconds")}
            return {"payload": {**old, "resolved": resolved}}
        if target.get("ephemeral"):
            resolved |= {"ephemeral": True, "sampling_session_id": payload.get("sampling_session_id")}
            name = None
        return {"payload": {"path": name, "ttl_seconds": target.get("ttl_seconds"), "resolved": resolved}}
    if kind == "sample":
        return {"payload": _sample_down(payload, row["base_model"])}
    return {}


def _sample_down(payload: dict[str, Any], base_model: str) -> dict[str, Any]:
    prompt = payload["prompt"]
    common = {
        "base_model": base_model,
        "num_samples": payload.get("num_samples", 1),
        "sampling_params": payload.get("sampling_params") or {},
        "resolved": {"storage_uri": payload.get("storage_uri")},
    }
    if prompt["type"] == "tinker":
        return common | {
            "prompt": prompt["model_input"],
            "prompt_logprobs": prompt.get("prompt_logprobs", False),
            "topk_prompt_logprobs": prompt.get("topk_prompt_logprobs", 0),
            "type": "sample",
        }
    openai = {
        "kind": prompt["type"],
        "stream": prompt.get("stream", False),
        "top_logprobs": prompt.get("top_logprobs", 0),
    }
    if prompt["type"] == "chat":
        openai |= {"messages": prompt["messages"], "tools": prompt.get("tools")}
    else:
        openai["prompt"] = prompt["prompt"]
    return common | {"openai": openai}


# -- driving ----------------------------------------------------------------------------------------------------


def _rewrite(convert: Callable[[Row], Row]) -> None:
    """Apply `convert` to every job, one payload in memory at a time (a forward_backward payload can be large)."""
    connection = op.get_bind()
    jobs = connection.execute(
        sa.select(JOBS.c.id, JOBS.c.kind, JOBS.c.base_model, JOBS.c.model_id, JOBS.c.seq_id)
    ).mappings()
    for job in [dict(job) for job in jobs]:
        payload = connection.scalar(sa.select(JOBS.c.payload).where(JOBS.c.id == job["id"]))
        change = convert(job | {"payload": payload})
        if change:
            connection.execute(sa.update(JOBS).where(JOBS.c.id == job["id"]).values(**change))


def _number_unloads() -> None:
    """Give each unload_model without a seq_id the seq after its run's newest op (nothing follows an unload)."""
    connection = op.get_bind()
    unloads = connection.execute(
        sa.select(JOBS.c.id, JOBS.c.model_id).where(JOBS.c.kind == "unload_model", JOBS.c.seq_id.is_(None))
    ).all()
    for job_id, model_id in unloads:
        newest = connection.scalar(
            sa.select(sa.func.max(JOBS.c.seq_id)).where(JOBS.c.model_id == model_id, JOBS.c.lane == "train")
        )
        connection.execute(sa.update(JOBS).where(JOBS.c.id == job_id).values(seq_id=(newest or 0) + 1))


def upgrade() -> None:
    _rewrite(_up)
    _number_unloads()


def downgrade() -> None:
    _rewrite(_down)
