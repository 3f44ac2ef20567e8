"""Chat-formatted model inputs with images for Qwen3-VL base models, as the cookbook's Qwen3-VL renderer builds them.

`chat_input(tokenizer, messages)` renders messages in the Qwen3-VL chat format: each turn is
``<|im_start|>{role}\\n … <|im_end|>\\n``, an image part sits between ``<|vision_start|>`` and ``<|vision_end|>`` as
an `ImageChunk` whose `expected_tokens` is computed from the image's size (`ImageGeometry.tokens`, the server's own
arithmetic), and with `add_generation_prompt` the input ends with ``<|im_start|>assistant\\n``. A message's content
is a string or a list of parts: ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": ...}`` where the
image is png/jpeg bytes or a Pillow image (sent as PNG).

`completion_datum(prompt, completion)` is the supervised datum that teaches `completion` (token ids) after
`prompt`: inputs shifted by one, weights on the completion only (image positions get target 0, weight 0).

Limits: needs Pillow (``pip install pillow``) to read image sizes; the SDK itself does not depend on it. Text is
encoded with the given tokenizer's ``encode`` (special tokens written in the text are read as special tokens, as
Hugging Face tokenizers do); the geometry must be the server's (`QWEN3_VL_GEOMETRY` for the built-in models and
Qwen3-VL's published settings).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from .types import Datum, EncodedTextChunk, ImageChunk, ModelInput, TensorData
from .types.images import QWEN3_VL_GEOMETRY, ImageGeometry

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - exercised only without Pillow
        raise ImportError("loom.vision needs Pillow to read image sizes: pip install pillow") from exc
    return Image


def image_chunk(image: Any, geometry: ImageGeometry = QWEN3_VL_GEOMETRY) -> ImageChunk:
    """An `ImageChunk` of png/jpeg bytes or a Pillow image, with its token count for `geometry`."""
    pil = _pillow()
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        with pil.open(io.BytesIO(data)) as opened:
            fmt, (width, height) = opened.format, opened.size
        if fmt not in ("PNG", "JPEG"):
            raise ValueError(f"images must be png or jpeg bytes, not {fmt}")
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, fmt, (width, height) = buffer.getvalue(), "PNG", image.size
    return ImageChunk(data=data, format=fmt.lower(), expected_tokens=geometry.tokens(height, width))


def chat_input(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    geometry: ImageGeometry = QWEN3_VL_GEOMETRY,
) -> ModelInput:
    """`messages` in the Qwen3-VL chat format as a `ModelInput` of text and image chunks (module docstring)."""
    chunks: list[EncodedTextChunk | ImageChunk] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            chunks.append(EncodedTextChunk(tokens=list(tokenizer.encode("".join(text), add_special_tokens=False))))
            text.clear()

    for message in messages:
        text.append(f"<|im_start|>{message['role']}\n")
        content = message.get("content") or ""
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part["type"] == "text":
                text.append(part["text"])
            elif part["type"] == "image":
                text.append(VISION_START)
                flush()
                chunks.append(image_chunk(part["image"], geometry))
                text.append(VISION_END)
            else:
                raise ValueError(f"content part type {part['type']!r} is not supported (text or image)")
        text.append("<|im_end|>\n")
    if add_generation_prompt:
        text.append("<|im_start|>assistant\n")
    flush()
    return ModelInput(chunks=chunks)


def completion_datum(prompt: ModelInput, completion: Sequence[int]) -> Datum:
    """The cross-entropy datum teaching `completion` after `prompt` (module docstring)."""
    if not completion:
        raise ValueError("completion holds no tokens")
    model_input = prompt.append(EncodedTextChunk(tokens=list(completion[:-1]))) if len(completion) > 1 else prompt
    flat = prompt.token_ids(0) + list(completion)
    targets = flat[1:]
    weights = [0.0] * (prompt.length - 1) + [1.0] * len(completion)
    return Datum(
        model_input=model_input,
        loss_fn_inputs={
            "target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )
