"""The API checks, counts and fetches images before anything is queued (`api/images.py`), in-process with the
external queue (no model loads): `asample` and `forward_backward` on the Qwen3-VL miniature accept png/jpeg bytes
and `data:` asset pointers, fill `expected_tokens`, and answer 400 with a machine-readable code for a count that
disagrees (naming both numbers), corrupt, truncated, oversized (bytes and pixels), animated, wrongly declared or
extreme-aspect images, remote URLs from hosts not allowed, two touching images and text that smuggles in the image
token; a text-only model refuses image chunks; the OpenAI endpoint rewrites `image_url` parts the same way."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from api.app import build_state, create_app
from api.db.keys import create_api_key
from api.db.models import Job
from api.images import prepare_messages
from contract.catalogue import SMOLLM2, TINY_QWEN3_VL
from contract.jobs import ChatPrompt, ForwardBackwardJob, SampleJob, parse_payload
from contract.settings import Settings

VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655


def encoded(size: tuple[int, int] = (28, 28), fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes, fmt: str = "png", expected: int | None = None) -> dict:
    chunk = {"type": "image", "data": b64(data), "format": fmt}
    return chunk if expected is None else {**chunk, "expected_tokens": expected}


@pytest.fixture
def api(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path,
        base_models=[TINY_QWEN3_VL.name, SMOLLM2.name],
        queue="external",
        max_image_bytes=200_000,
        max_image_pixels=4_000_000,
    )
    state = build_state(settings)
    with state.transaction() as session:
        _, key = create_api_key(session, "alice", "test")
    with TestClient(create_app(state=state), headers={"X-API-Key": key}) as client:
        yield state, client


def sample(client: TestClient, chunks: list[dict], base_model: str = TINY_QWEN3_VL.name):
    body = {
        "base_model": base_model,
        "prompt": {"chunks": chunks},
        "sampling_params": {"max_tokens": 4},
        "num_samples": 1,
    }
    return client.post("/api/v1/asample", json=body)


def prompt(*middle: dict) -> list[dict]:
    return [
        {"type": "encoded_text", "tokens": [1, VISION_START]},
        *middle,
        {"type": "encoded_text", "tokens": [VISION_END, 2]},
    ]


def error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def queued_payload(state, job_id: str):
    with state.reading() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        return parse_payload(job.kind, job.payload)


def test_an_image_is_counted_and_queued_with_its_token_count(api) -> None:
    state, client = api
    response = sample(client, prompt(image(encoded(), expected=64)))
    assert response.status_code == 200, response.text
    payload = queued_payload(state, response.json()["request_id"])
    assert isinstance(payload, SampleJob)
    chunk = payload.prompt.model_input.chunks[1]
    assert chunk.expected_tokens == 64 and chunk.data == encoded()
    # without expected_tokens the server fills in its own count
    response = sample(client, prompt(image(encoded((640, 480), "JPEG"), "jpeg")))
    assert response.status_code == 200, response.text
    assert queued_payload(state, response.json()["request_id"]).prompt.model_input.chunks[1].expected_tokens == 300


def test_a_wrong_expected_tokens_is_a_400_naming_both_numbers(api) -> None:
    _, client = api
    err = error(sample(client, prompt(image(encoded(), expected=63))))
    assert err["code"] == "image_token_mismatch" and err["param"] == "prompt.chunks.1.expected_tokens"
    assert "63" in err["message"] and "64" in err["message"]


@pytest.mark.parametrize(
    "chunk, words",
    [
        (image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "cannot be decoded"),
        (image(encoded()[:60]), "cannot be decoded"),
        (image(b"GIF89a" + b"\0" * 20), "cannot be decoded"),
        (image(encoded(fmt="JPEG")), "says 'png'"),
        (image(encoded((300, 300), "PNG", compress_level=0)), "bytes"),
        (image(encoded((2100, 2000))), "pixels"),
        (image(encoded((4000, 10))), "more than 200x"),
    ],
    ids=["garbage", "truncated", "gif", "declared-png-is-jpeg", "too-many-bytes", "too-many-pixels", "aspect"],
)
def test_bad_images_are_400_invalid_image(api, chunk: dict, words: str) -> None:
    _, client = api
    err = error(sample(client, prompt(chunk)))
    assert err["code"] == "invalid_image" and err["param"].startswith("prompt.chunks.1"), err
    assert words in err["message"], err["message"]


def test_an_animated_png_is_refused(api) -> None:
    _, client = api
    frames = [Image.new("RGB", (28, 28), color) for color in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    err = error(sample(client, prompt(image(buffer.getvalue()))))
    assert err["code"] == "invalid_image" and "animated" in err["message"]


def test_asset_pointers_take_data_urls_and_only_allowed_hosts(api) -> None:
    state, client = api
    pointer = {"type": "image_asset_pointer", "format": "png", "location": f"data:image/png;base64,{b64(encoded())}"}
    response = sample(client, prompt(pointer))
    assert response.status_code == 200, response.text
    chunk = queued_payload(state, response.json()["request_id"]).prompt.model_input.chunks[1]
    assert chunk.type == "image" and chunk.expected_tokens == 64
    remote = {**pointer, "location": "http://images.example/cat.png"}
    err = error(sample(client, prompt(remote)))
    assert err["code"] == "invalid_image" and "images.example" in err["message"]
    assert err["param"] == "prompt.chunks.1.location"
    local = {**pointer, "location": "file:///etc/passwd"}
    assert "scheme 'file'" in error(sample(client, prompt(local)))["message"]


def test_touching_images_and_smuggled_image_tokens_are_refused(api) -> None:
    _, client = api
    err = error(sample(client, prompt(image(encoded()), image(encoded()))))
    assert err["param"] == "prompt.chunks.2" and "follow each other" in err["message"]
    err = error(sample(client, [{"type": "encoded_text", "tokens": [1, IMAGE_PAD, 2]}]))
    assert err["param"] == "prompt.chunks.0" and "image token" in err["message"]


def test_a_text_model_refuses_images(api) -> None:
    _, client = api
    err = error(sample(client, prompt(image(encoded())), base_model=SMOLLM2.name))
    assert err["param"] == "prompt.chunks.1" and "text-only" in err["message"]


def test_forward_backward_counts_the_images_of_every_datum(api) -> None:
    state, client = api
    session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
    body = {"session_id": session_id, "model_seq_id": 0, "base_model": TINY_QWEN3_VL.name, "lora_config": {"rank": 4}}
    model_id = client.post("/api/v1/create_model", json=body).json()["model_id"]
    chunks = prompt(image(encoded()))
    n = 2 + 64 + 2
    datum = {
        "model_input": {"chunks": chunks},
        "loss_fn_inputs": {
            "target_tokens": {"data": [0] * n, "dtype": "int64", "shape": [n]},
            "weights": {"data": [0.0] * (n - 1) + [1.0], "dtype": "float32", "shape": [n]},
        },
    }
    fb = {"model_id": model_id, "seq_id": 1, "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}}
    response = client.post("/api/v1/forward_backward", json=fb)
    assert response.status_code == 200, response.text
    payload = queued_payload(state, response.json()["request_id"])
    assert isinstance(payload, ForwardBackwardJob)
    assert payload.input.data[0].model_input.chunks[1].expected_tokens == 64
    short = {**datum, "loss_fn_inputs": {"target_tokens": {"data": [0] * 4, "dtype": "int64", "shape": [4]}}}
    bad = {**fb, "seq_id": 2, "forward_backward_input": {"data": [short], "loss_fn": "cross_entropy"}}
    assert error(client.post("/api/v1/forward_backward", json=bad))["param"].startswith("data.0")


def test_openai_image_url_parts_are_refused_by_text_models_before_anything_is_queued(api) -> None:
    state, client = api
    url = f"data:image/jpeg;base64,{b64(encoded((64, 64), 'JPEG'))}"
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": TINY_QWEN3_VL.name, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    job_ids_before = _job_ids(state)
    err = error(client.post("/v1/chat/completions", json={**body, "model": SMOLLM2.name}))
    assert err["code"] == "invalid_image" and "does not take images" in err["message"]
    assert err["param"] == "messages.0.content.1.image_url"
    assert _job_ids(state) == job_ids_before
    bad = {**body, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}]}
    assert error(client.post("/v1/chat/completions", json=bad))["code"] == "invalid_image"


def _job_ids(state) -> set[str]:
    with state.reading() as session:
        return set(session.scalars(select(Job.id)))


def test_openai_image_url_parts_become_counted_image_parts(api) -> None:
    state, _ = api
    url = f"data:image/jpeg;base64,{b64(encoded((64, 64), 'JPEG'))}"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    out = prepare_messages(messages, TINY_QWEN3_VL.vision, TINY_QWEN3_VL.name, state.settings)
    part = out[0]["content"][0]
    assert part["type"] == "image" and part["image"]["expected_tokens"] == 64 and part["image"]["format"] == "jpeg"
    assert ChatPrompt(messages=out).messages == out
