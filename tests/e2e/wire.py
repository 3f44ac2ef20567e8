"""Raw-HTTP helpers for e2e tests that need to send exactly what they want (bad input, odd orderings)."""

from __future__ import annotations

from typing import Any

import httpx

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def new_session(http: httpx.Client) -> str:
    response = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "e2e"})
    response.raise_for_status()
    return response.json()["session_id"]


def result(http: httpx.Client, request_id: str) -> dict[str, Any]:
    """Poll a future until it is final (JSON results)."""
    while True:
        response = http.post("/api/v1/retrieve_future", json={"request_id": request_id}, timeout=60)
        response.raise_for_status()
        body = response.json()
        if body.get("type") != "try_again":
            return body


def new_run(http: httpx.Client, base_model: str = SMOL, rank: int = 4, session_id: str | None = None) -> str:
    session_id = session_id or new_session(http)
    response = http.post(
        "/api/v1/create_model",
        json={"session_id": session_id, "model_seq_id": 0, "base_model": base_model, "lora_config": {"rank": rank}},
    )
    response.raise_for_status()
    future = response.json()
    assert result(http, future["request_id"]) == {"model_id": future["model_id"], "type": "create_model"}
    return future["model_id"]


def datum(tokens: list[int], **inputs: Any) -> dict[str, Any]:
    loss_inputs = {"target_tokens": {"data": tokens[1:] + [tokens[0]], "dtype": "int64"}}
    for key, values in inputs.items():
        loss_inputs[key] = {"data": values, "dtype": "float32"}
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}, "loss_fn_inputs": loss_inputs}


def fb_body(model_id: str, seq_id: int, data: list[dict], loss_fn: str = "cross_entropy", **extra: Any) -> dict:
    return {
        "model_id": model_id,
        "seq_id": seq_id,
        "forward_backward_input": {"data": data, "loss_fn": loss_fn, **extra},
    }


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) >= {"code", "message"}, body
    return body["error"]
